//! Attention over the KV cache with the KVLink segment mask: the segment buffer's
//! layout, the row, decode, flash and tensor-core kernels and their split-K combine,
//! attention over several sequences sharing a cache, and the attention-mass capture.

use super::kernels::*;
use super::{coop, need, need_len, u32_of};
use crate::error::{Error, Result};
use crate::gpu::{grid_1d, Kernel, Step, Tensor};

/// The attention kernels' segment buffer for `segs` in a cache of `capacity` slots:
/// `capacity` segment ids (0 past `segs`), then for each slot the first slot where its
/// segment id occurs (0 for segment 0), where a document query starts scanning keys.
pub fn segment_words(segs: &[u32], capacity: usize) -> Vec<u32> {
    let mut words = vec![0u32; 2 * capacity];
    let (ids, starts) = words.split_at_mut(capacity);
    sequence_segments(segs, 0, &mut ids[..segs.len()], &mut starts[..segs.len()]);
    words
}

/// The segment ids and starts of one sequence whose slots begin at `base` of a cache
/// that holds several side by side ([`attention_sequences`]): `ids[i] = segs[i]`, and
/// `starts[i]` is `base` plus the first index of `segs[i]` for a document, `base` for
/// segment 0 (a segment-0 query sees its own sequence from its start, nothing below).
pub fn sequence_segments(segs: &[u32], base: u32, ids: &mut [u32], starts: &mut [u32]) {
    ids.copy_from_slice(segs);
    let mut first = std::collections::HashMap::new();
    for (i, &s) in segs.iter().enumerate() {
        starts[i] = if s != 0 {
            base + *first.entry(s).or_insert(i as u32)
        } else {
            base
        };
    }
}

/// The operands of one attention call: `t` queries (f32 `[t, heads, head_dim]`, in cache
/// slots `qslot`) over the cache `kc`/`vc` with the KVLink segment mask (`seg`, laid out
/// by [`segment_words`]; all zeros = causal), the result in `out` (same shape as `q`).
#[derive(Clone, Copy)]
pub struct Attn<'a> {
    pub q: &'a Tensor,
    pub t: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub kc: &'a Tensor,
    pub vc: &'a Tensor,
    pub qslot: &'a Tensor,
    pub seg: &'a Tensor,
    pub out: &'a Tensor,
}

impl Attn<'_> {
    /// The shape checks every attention kernel shares.
    pub(super) fn check(&self) -> Result<()> {
        let (t, heads, kv_heads, head_dim) = (self.t, self.heads, self.kv_heads, self.head_dim);
        need(kv_heads > 0 && heads.is_multiple_of(kv_heads), || {
            format!("attention: {heads} heads not a multiple of {kv_heads} kv heads")
        })?;
        need(head_dim <= 256 && head_dim.is_multiple_of(2), || {
            format!("attention: head_dim {head_dim} must be even and <= 256")
        })?;
        need_len(self.q, t * heads * head_dim, "attention q")?;
        need_len(self.out, t * heads * head_dim, "attention out")?;
        need_len(self.qslot, t, "attention qslot")?;
        need(
            self.seg.numel().is_multiple_of(2) && self.seg.numel() >= 2,
            || "attention: the segment buffer holds ids then starts (2 x slots)".into(),
        )
    }

    /// Cache slots (the segment buffer holds ids then starts).
    pub(super) fn cap(&self) -> usize {
        self.seg.numel() / 2
    }

    /// Query rows per KV head.
    pub(super) fn rows(&self) -> usize {
        self.t * (self.heads / self.kv_heads)
    }

    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    /// The bindings of the attention kernels: Q, K, V, query slots, segments, O.
    fn bufs(&self) -> [&Tensor; 6] {
        [self.q, self.kc, self.vc, self.qslot, self.seg, self.out]
    }

    /// The parameters of the split kernels (flash, decode, tensor-core flash):
    /// t, heads, kv_heads, cache slots, scale, splits, `extra`, key tiles per split.
    pub(super) fn split_params(&self, splits: usize, extra: usize, per: usize) -> Result<[u32; 8]> {
        need((1..=1024).contains(&splits), || {
            format!("attention: {splits} key splits")
        })?;
        Ok([
            self.t as u32,
            self.heads as u32,
            self.kv_heads as u32,
            u32_of(self.cap(), "attention cache slots")?,
            self.scale().to_bits(),
            splits as u32,
            u32_of(extra, "attention rows")?,
            u32_of(per, "attention key tiles per split")?,
        ])
    }
}

/// Attention of [`Attn`]'s queries over the cache with the KVLink segment mask: the decode
/// kernel for few rows, else tensor-core flash, else flash, else one workgroup per row.
pub fn attention(step: &mut Step, a: &Attn) -> Result<()> {
    a.check()?;
    if a.t == 0 {
        return Ok(());
    }
    let (t, heads, kv_heads, head_dim, cap) = (a.t, a.heads, a.kv_heads, a.head_dim, a.cap());
    if let Some(splits) = decode_fits(step, a, t) {
        return decode_attention(step, a, splits, t);
    }
    if let Some((shape, br, bc)) = coop::flash_usable(step, head_dim) {
        let row_tiles = a.rows().div_ceil(br);
        let forced = step.gpu().tuning.flash_splits;
        let mut splits = coop::flash_splits(row_tiles, kv_heads, cap, bc, forced);
        // Keep the partials (splits x rows x (head_dim + 4) floats) under 64 MiB.
        while splits > 1 && splits * t * heads * (head_dim + 4) * 4 > 64 << 20 {
            splits = splits.div_ceil(2);
        }
        return coop::flash(step, shape, a, splits);
    }
    let flash = flash_kernel(head_dim).filter(|_| big_wg_memory(step));
    if let Some((k, br)) = flash {
        let splits = if step.serial() {
            1
        } else {
            attention_splits(t, heads, kv_heads, cap, head_dim, br, 32)
        };
        return flash_attention(step, a, k, br, splits);
    }
    // Head sizes without a flash variant: one workgroup per (query, head). (A
    // barrier-free one-invocation-per-(query, head) variant gave NaNs on llvmpipe past
    // ~1k keys, so CPU adapters run this one too.)
    attention_rows(step, a)
}

/// Whether 32 KiB of workgroup memory (the decode and flash kernels) is there.
fn big_wg_memory(step: &Step) -> bool {
    step.gpu().limits.max_compute_workgroup_storage_size >= 32 << 10
}

/// The key splits of the decode kernel for `a`'s queries in groups of `group`, or None
/// where it cannot serve (head size, workgroup memory, too many rows per workgroup).
fn decode_fits(step: &Step, a: &Attn, group: usize) -> Option<usize> {
    let rows = group * (a.heads / a.kv_heads);
    if !(big_wg_memory(step) && rows <= DECODE_ROWS && decode_kernel(a.head_dim).is_some()) {
        return None;
    }
    Some(if step.serial() {
        1
    } else {
        let max = step.gpu().tuning.decode_splits;
        decode_splits(a.t, a.heads, a.cap(), a.head_dim, max)
    })
}

/// [`attention`] for queries of several sequences that share one cache, each in its own
/// slot range: a segment-0 query sees the slots from its sequence's start
/// ([`sequence_segments`]) to itself, so rows of different requests decode together.
/// The decode kernel with one query per workgroup group, each reading only its own keys
/// split from its own start, where the head size and workgroup memory allow; else one
/// workgroup per (query, head). (The tiled kernels bound a workgroup's keys by all of
/// its rows and take segment-0 starts as 0: they serve one sequence per cache.)
///
/// `longest`: the most keys a query sees (its sequence's start to itself); the splits
/// cover that many from each query's start, not the whole cache (most of which holds
/// other sequences). A hint for speed only: keys past it go to the last split. A query's
/// result depends only on its own keys and the chunks per split, which stay one (so the
/// result does not depend on the batch) while `longest` is at most 4,032 keys and the
/// partials fit 64 MiB.
pub fn attention_sequences(step: &mut Step, a: &Attn, longest: usize) -> Result<()> {
    a.check()?;
    if decode_fits(step, a, 1).is_none() {
        return attention_rows(step, a);
    }
    // Chunks a query's keys can meet: its start need not fall on a chunk boundary.
    let chunks = longest.max(1).div_ceil(DECODE_CHUNK) + 1;
    let splits = if step.serial() {
        1
    } else {
        let max = step.gpu().tuning.decode_splits;
        decode_splits(a.t, a.heads, chunks * DECODE_CHUNK, a.head_dim, max)
    };
    let per = chunks.div_ceil(splits).max(1);
    decode_dispatch(step, a, chunks.div_ceil(per), per, 1)
}

/// [`attention`] (or [`attention_sequences`]: the kernel bounds each query by its own
/// start) with attention.wgsl, one workgroup per (query, head): the fallback for head
/// sizes without a decode or flash variant. Public so tests can check it.
pub fn attention_rows(step: &mut Step, a: &Attn) -> Result<()> {
    a.check()?;
    if a.t == 0 {
        return Ok(());
    }
    let params = [
        a.t as u32,
        a.heads as u32,
        a.kv_heads as u32,
        a.head_dim as u32,
        a.scale().to_bits(),
        u32_of(a.cap(), "attention cache slots")?,
    ];
    let groups = u32_of(a.t * a.heads, "attention rows")?;
    step.dispatch(ATTENTION, &params, &a.bufs(), grid_1d(groups));
    Ok(())
}

/// The flash-attention kernel for a head size and its rows per workgroup.
fn flash_kernel(head_dim: usize) -> Option<(Kernel, usize)> {
    match head_dim {
        32 => Some((FLASH_D32, 32)),
        64 => Some((FLASH_D64, 32)),
        128 => Some((FLASH_D128, 16)),
        _ => None,
    }
}

/// Key splits for a GPU. Split z covers the key tiles [z * per, (z + 1) * per) of the
/// cache, fixed by the cache size alone, so a row's result does not depend on the other
/// queries of the batch. Splitting pays when the queries alone leave a large GPU idle
/// (fewer than ~256 workgroups); at most 64 splits. [`flash_attention`] derives the tiles
/// per split from the count.
#[allow(clippy::too_many_arguments)]
fn attention_splits(
    t: usize,
    heads: usize,
    kv_heads: usize,
    cap: usize,
    head_dim: usize,
    br: usize,
    bc: usize,
) -> usize {
    let base = (t * heads / kv_heads).div_ceil(br) * kv_heads;
    let tiles = cap.div_ceil(bc).max(1);
    if base >= 256 || tiles < 4 {
        return 1;
    }
    let mut per = tiles.div_ceil(64).max(2);
    // Keep the partials (splits x rows x (head_dim + 4) floats) under 64 MiB.
    while tiles.div_ceil(per) * t * heads * (head_dim + 4) * 4 > 64 << 20 {
        per *= 2;
    }
    tiles.div_ceil(per)
}

/// Rows per KV head (queries x grouped heads) up to which [`attention`] takes the decode
/// kernel: its limit (RMAX in attention_decode.wgsl). Flash tiles 32 rows (16 at D = 128),
/// so below 16 rows its tile is over half padding; per key and thread flash does 64 FMAs
/// whatever the rows, the decode kernel at 16 rows 32 (D = 64) or 64 (D = 128), fewer
/// with fewer rows; and flash spends 4 barriers and a serial 32-key softmax per 32 keys
/// against the decode kernel's 3 barriers and 4-threads-a-row statistics per 64 keys.
pub const DECODE_ROWS: usize = 16;

/// Keys per chunk of the decode kernel (one per thread).
const DECODE_CHUNK: usize = 64;

/// The decode-attention kernel for a head size.
fn decode_kernel(head_dim: usize) -> Option<Kernel> {
    match head_dim {
        32 => Some(DECODE_D32),
        64 => Some(DECODE_D64),
        128 => Some(DECODE_D128),
        _ => None,
    }
}

/// Key splits of the decode kernel on a GPU: one per chunk of 64 of `cap` slots (the
/// cache's, or in [`attention_sequences`] the longest sequence's), at most 64 (past 4096
/// slots a split takes several chunks), so a row's result does not depend on the other
/// rows of its batch; fewer where the partials (splits x rows x (head_dim + 4) floats)
/// would pass 64 MiB.
/// `KVLINK_DECODE_SPLITS=N` caps the count (fewer splits: fewer workgroups, and with one
/// split no combine dispatch; for tuning).
fn decode_splits(t: usize, heads: usize, cap: usize, head_dim: usize, max: usize) -> usize {
    let mut splits = cap.div_ceil(DECODE_CHUNK).clamp(1, max.min(64));
    while splits > 1 && splits * t * heads * (head_dim + 4) * 4 > 64 << 20 {
        splits = splits.div_ceil(2);
    }
    splits
}

/// [`attention`] with the decode kernel (head sizes 32, 64, 128) and an explicit number
/// of key splits (> 1 adds the combine pass). The queries go in groups of `group`
/// (group x grouped heads at most [`DECODE_ROWS`] rows), a workgroup per (KV head, key
/// split, group): the queries of one sequence share a group and their key reads
/// (`group` = t), queries of different sequences in one cache take a group each (1).
/// Public so tests can check every split count.
pub fn decode_attention(step: &mut Step, a: &Attn, splits: usize, group: usize) -> Result<()> {
    let per = a
        .cap()
        .div_ceil(DECODE_CHUNK)
        .div_ceil(splits.max(1))
        .max(1);
    decode_dispatch(step, a, splits, per, group)
}

/// The decode kernel with `splits` splits of `per` chunks each (from each query group's
/// first visible chunk; the last split takes the rest).
fn decode_dispatch(
    step: &mut Step,
    a: &Attn,
    splits: usize,
    per: usize,
    group: usize,
) -> Result<()> {
    let kernel = decode_kernel(a.head_dim).ok_or_else(|| {
        Error::Input(format!(
            "decode attention: head_dim {} is not 32, 64 or 128",
            a.head_dim
        ))
    })?;
    a.check()?;
    let group = group.min(a.t).max(1);
    let rows = group * (a.heads / a.kv_heads);
    need(rows <= DECODE_ROWS, || {
        format!("decode attention: {rows} rows per workgroup, at most {DECODE_ROWS}")
    })?;
    let params = a.split_params(splits, group, per)?;
    if a.t == 0 {
        return Ok(());
    }
    let groups = [
        a.kv_heads as u32,
        splits as u32,
        u32_of(a.t.div_ceil(group), "decode attention query groups")?,
    ];
    let layout = SplitLayout::Decode { group, per };
    split_attention(step, kernel, &params, groups, a, splits, layout)
}

/// How a split kernel's splits divide the keys, for the combine pass.
#[derive(Clone, Copy)]
enum SplitLayout {
    /// Split z: the cache slots [z * span, (z + 1) * span) (flash).
    Absolute { span: usize },
    /// Split z: `per` chunks from the chunk of its query group's first visible slot
    /// (`group` queries a group), the last split to the end (the decode kernel).
    Decode { group: usize, per: usize },
}

/// [`attention`] with its flash kernel and an explicit number of key splits (> 1 adds
/// a combine pass over a scratch buffer). Public so tests can check every split count.
pub fn flash_attention(
    step: &mut Step,
    a: &Attn,
    kernel: Kernel,
    br: usize,
    splits: usize,
) -> Result<()> {
    tiled_attention(step, a, kernel, br, 32, splits)
}

/// A tiled flash kernel (flash_attention.wgsl or the tensor-core flash_coop.wgsl) with
/// `br` query rows and `bc` keys per tile: a workgroup per (row tile, KV head, split).
pub(super) fn tiled_attention(
    step: &mut Step,
    a: &Attn,
    kernel: Kernel,
    br: usize,
    bc: usize,
    splits: usize,
) -> Result<()> {
    a.check()?;
    let per = a.cap().div_ceil(bc).div_ceil(splits.max(1)).max(1);
    let params = a.split_params(splits, a.rows(), per)?;
    if a.t == 0 {
        return Ok(());
    }
    let groups = [
        u32_of(a.rows().div_ceil(br), "attention row tiles")?,
        a.kv_heads as u32,
        splits as u32,
    ];
    let layout = SplitLayout::Absolute { span: bc * per };
    split_attention(step, kernel, &params, groups, a, splits, layout)
}

/// Dispatch an attention kernel (flash or decode: bindings Q, K, V, query slots,
/// segments, O, partials) over `splits` key splits of `span` cache slots each: with one
/// split it writes O itself; with more it writes partials to a scratch buffer and
/// attention_combine.wgsl merges them into O.
fn split_attention(
    step: &mut Step,
    kernel: Kernel,
    params: &[u32; 8],
    groups: [u32; 3],
    a: &Attn,
    splits: usize,
    layout: SplitLayout,
) -> Result<()> {
    let [q, kc, vc, qslot, seg, out] = a.bufs();
    if splits == 1 {
        let dummy = step.gpu().dummy();
        step.dispatch(
            kernel,
            params,
            &[q, kc, vc, qslot, seg, out, &dummy],
            groups,
        );
        return Ok(());
    }
    let r = a.t * a.heads;
    let part = step
        .gpu()
        .scratch("attention splits", splits * r * (a.head_dim + 4))?;
    step.dispatch(kernel, params, &[q, kc, vc, qslot, seg, out, &part], groups);
    // attention_combine.wgsl merges the splits into O.
    let d4 = a.head_dim / 4;
    let (span, group, chunk) = match layout {
        SplitLayout::Absolute { span } => (span, 0, 0),
        SplitLayout::Decode { group, per } => (DECODE_CHUNK * per, group, DECODE_CHUNK),
    };
    let params = [
        u32_of(r, "attention rows")?,
        d4 as u32,
        splits as u32,
        u32_of(span, "attention split span")?,
        a.heads as u32,
        u32_of(a.cap(), "attention cache slots")?,
        group as u32,
        chunk as u32,
    ];
    step.dispatch(
        ATTENTION_COMBINE,
        &params,
        &[&part, out, qslot, seg],
        grid_1d(u32_of((r * d4).div_ceil(64), "attention combine")?),
    );
    Ok(())
}

/// Attention mass per group of key slots for query `row` of a batch, per head:
/// `out[out_off + h * n_groups + g]` = softmax weight (KVLink mask as in `attention`)
/// summed over visible keys s with `group[s] == g`. For inspection, not the hot path.
#[allow(clippy::too_many_arguments)]
pub fn attention_mass(
    step: &mut Step,
    q: &Tensor,
    row: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    kc: &Tensor,
    qslot: &Tensor,
    seg: &Tensor,
    group: &Tensor,
    n_groups: usize,
    out: &Tensor,
    out_off: usize,
) -> Result<()> {
    need(n_groups > 0, || "attention_mass: no groups".into())?;
    need_len(q, (row + 1) * heads * head_dim, "attention_mass q")?;
    need_len(qslot, row + 1, "attention_mass qslot")?;
    need_len(out, out_off + heads * n_groups, "attention_mass out")?;
    need(group.numel() * 2 >= seg.numel(), || {
        "attention_mass: group per slot".into()
    })?;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let params = [
        row as u32,
        heads as u32,
        kv_heads as u32,
        head_dim as u32,
        scale.to_bits(),
        (seg.numel() / 2) as u32,
        n_groups as u32,
        out_off as u32,
    ];
    let groups = [heads.div_ceil(32) as u32, 1, 1];
    step.dispatch(
        ATTENTION_MASS,
        &params,
        &[q, kc, qslot, seg, group, out],
        groups,
    );
    Ok(())
}
