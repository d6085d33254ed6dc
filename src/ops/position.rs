//! Positions and the KV cache: RoPE (fused with the cache write, in place, or as a
//! rotation of cached keys by a position delta), the gather-and-rotate assembly of
//! document caches, plain cache writes, and the q8 cache parts of the disk store turned
//! back into f16.

use super::kernels::*;
use super::{need, need_dtype, need_len, u32_of};
use crate::error::Result;
use crate::gpu::{grid_1d, DType, Kernel, Step, Tensor};

/// After the fused QKV projection (`qkv`: f32 `[t, q_dim + 2 kv_dim]`), rotate Q and K
/// at their positions and store them: Q to `q` (f32 `[t, heads, head_dim]`), K and V to
/// the f16 caches. `idx` holds `[t]` cache slots followed by `[t]` positions (i32).
#[allow(clippy::too_many_arguments)]
pub fn rope_kv(
    step: &mut Step,
    qkv: &Tensor,
    t: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    idx: &Tensor,
    inv_freq: &Tensor,
    interleaved: bool,
    q: &Tensor,
    kc: &Tensor,
    vc: &Tensor,
) -> Result<()> {
    let all = heads + 2 * kv_heads;
    need(head_dim.is_multiple_of(4) && head_dim > 0, || {
        format!("rope_kv: head_dim {head_dim} must be a multiple of 4")
    })?;
    need_dtype(qkv, DType::F32, "rope_kv qkv")?;
    need_dtype(q, DType::F32, "rope_kv q")?;
    need_dtype(kc, DType::F16, "rope_kv k cache")?;
    need_dtype(vc, DType::F16, "rope_kv v cache")?;
    need_len(qkv, t * all * head_dim, "rope_kv qkv")?;
    need_len(q, t * heads * head_dim, "rope_kv q")?;
    need_len(idx, 2 * t, "rope_kv slots and positions")?;
    need_len(inv_freq, head_dim / 2, "rope_kv inv_freq")?;
    need(
        kc.numel() == vc.numel() && kc.numel().is_multiple_of(kv_heads * head_dim),
        || "rope_kv: K and V caches must both be [slots, kv_dim]".into(),
    )?;
    let threads = t * all * head_dim / 4;
    if threads == 0 {
        return Ok(());
    }
    let params = [
        t as u32,
        heads as u32,
        kv_heads as u32,
        head_dim as u32,
        interleaved as u32,
    ];
    step.dispatch(
        ROPE_KV,
        &params,
        &[qkv, idx, inv_freq, q, kc, vc],
        grid_1d(u32_of(threads.div_ceil(256), "rope_kv size")?),
    );
    Ok(())
}

/// Rotate `t` rows of `heads` heads (f32 `[t, heads, head_dim]`) in place at `pos[i]`.
#[allow(clippy::too_many_arguments)]
pub fn rope(
    step: &mut Step,
    x: &Tensor,
    t: usize,
    heads: usize,
    head_dim: usize,
    pos: &Tensor,
    inv_freq: &Tensor,
    interleaved: bool,
) -> Result<()> {
    need_dtype(x, DType::F32, "rope x")?;
    need_len(x, t * heads * head_dim, "rope x")?;
    need_len(pos, t, "rope positions")?;
    need_len(inv_freq, head_dim / 2, "rope inv_freq")?;
    need(head_dim.is_multiple_of(2), || {
        format!("rope: head_dim {head_dim} must be even")
    })?;
    let n = t * heads * head_dim / 2;
    if n == 0 {
        return Ok(());
    }
    let params = [
        t as u32,
        heads as u32,
        head_dim as u32,
        0,
        interleaved as u32,
    ];
    step.dispatch(
        ROPE,
        &params,
        &[x, pos, inv_freq],
        grid_1d(n.div_ceil(256) as u32),
    );
    Ok(())
}

/// Rotate cached keys of slots `slot0 .. slot0 + n` in place, slot `slot0 + s` by
/// `deltas[s]` positions (0 = untouched). kc: f16 `[slots, kv_heads, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn rotate_keys(
    step: &mut Step,
    kc: &Tensor,
    slot0: usize,
    n: usize,
    kv_heads: usize,
    head_dim: usize,
    deltas: &Tensor,
    inv_freq: &Tensor,
    interleaved: bool,
) -> Result<()> {
    need_dtype(kc, DType::F16, "rotate_keys cache")?;
    need_len(kc, (slot0 + n) * kv_heads * head_dim, "rotate_keys cache")?;
    need_len(deltas, n, "rotate_keys deltas")?;
    let shape = [n, kv_heads, head_dim, slot0, interleaved as usize];
    key_turn(step, ROTATE_KEYS, shape, &[kc, deltas, inv_freq])
}

/// The dispatch of the key-rotating kernels (rotate_keys, assemble_kv): one thread per
/// (slot, head, quarter of head_dim); `shape` is their parameters
/// `[slots, kv_heads, head_dim, slot0, interleaved]`.
fn key_turn(step: &mut Step, k: Kernel, shape: [usize; 5], bufs: &[&Tensor]) -> Result<()> {
    let [n, kv_heads, head_dim, ..] = shape;
    need(head_dim.is_multiple_of(4), || {
        format!("{}: head_dim {head_dim} must be a multiple of 4", k.entry)
    })?;
    let threads = n * kv_heads * head_dim / 4;
    if threads == 0 {
        return Ok(());
    }
    let params = shape.map(|x| x as u32);
    step.dispatch(k, &params, bufs, grid_1d(threads.div_ceil(256) as u32));
    Ok(())
}

/// Gather K/V rows of a document-cache pool slab into a request's cache, turning keys
/// by their deltas on the way: slot `slot0 + s` gets slab row `table[2s]` (`u32::MAX`:
/// left untouched) with its key rotated by `table[2s + 1]` positions (i32 bits; 0: copied
/// exactly). `ks`/`vs` f16 `[rows, kv_heads, head_dim]`, `kc`/`vc` f16 `[slots, ..]`.
/// The host checks every row against the slab (the kernel does not).
#[allow(clippy::too_many_arguments)]
pub fn assemble_kv(
    step: &mut Step,
    ks: &Tensor,
    vs: &Tensor,
    table: &Tensor,
    kc: &Tensor,
    vc: &Tensor,
    slot0: usize,
    n: usize,
    kv_heads: usize,
    head_dim: usize,
    inv_freq: &Tensor,
    interleaved: bool,
) -> Result<()> {
    let kvd = kv_heads * head_dim;
    for (t, what) in [
        (ks, "slab k"),
        (vs, "slab v"),
        (kc, "cache k"),
        (vc, "cache v"),
    ] {
        need_dtype(t, DType::F16, &format!("assemble_kv {what}"))?;
    }
    need(
        ks.numel() == vs.numel() && ks.numel().is_multiple_of(kvd.max(1)),
        || {
            format!(
                "assemble_kv: slab k/v of {} and {} elements for kv_dim {kvd}",
                ks.numel(),
                vs.numel()
            )
        },
    )?;
    need_len(kc, (slot0 + n) * kvd, "assemble_kv cache k")?;
    need_len(vc, (slot0 + n) * kvd, "assemble_kv cache v")?;
    need_len(table, 2 * n, "assemble_kv table")?;
    need_len(inv_freq, head_dim / 2, "assemble_kv inv_freq")?;
    let shape = [n, kv_heads, head_dim, slot0, interleaved as usize];
    key_turn(step, ASSEMBLE_KV, shape, &[ks, vs, table, inv_freq, kc, vc])
}

/// Store `t` new keys/values (f32 `[t, kv_dim]`) into the f16 cache at `slots[i]`.
#[allow(clippy::too_many_arguments)]
pub fn kv_write(
    step: &mut Step,
    k: &Tensor,
    v: &Tensor,
    t: usize,
    slots: &Tensor,
    kc: &Tensor,
    vc: &Tensor,
    kv_dim: usize,
) -> Result<()> {
    need_len(k, t * kv_dim, "kv_write k")?;
    need_len(v, t * kv_dim, "kv_write v")?;
    need_len(slots, t, "kv_write slots")?;
    need_dtype(kc, DType::F16, "kv_write cache")?;
    let n = t * kv_dim / 2;
    if n == 0 {
        return Ok(());
    }
    step.dispatch(
        KV_WRITE,
        &[t as u32, kv_dim as u32],
        &[k, v, slots, kc, vc],
        grid_1d(n.div_ceil(256) as u32),
    );
    Ok(())
}
