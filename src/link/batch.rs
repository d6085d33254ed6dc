//! Batched decode: sequences of different requests decode together, one forward pass
//! per step for all of them, so the weights are read once per step instead of once per
//! sequence (what makes concurrent users cheap on a GPU).
//!
//! A request is prefilled on its own as always (its plan, reused document caches, link
//! tokens, question), into its own [`KvCache`]. [`DecodeBatch::join`] then moves its
//! filled slots into a range of one shared arena (a copy per layer, once per request)
//! with its segments rebased ([`KvCache::set_sequence_segments`]); each step feeds every
//! sequence one token at its next slot, and attention lets a row see only its own
//! sequence ([`crate::ops::attention_sequences`]). Sequences join and leave between
//! steps; the arena's free slots are handed out first fit ([`super::pool::FreeList`]).
//! Greedy steps can be pipelined ([`DecodeBatch::step_async`]): each step's argmaxes
//! stay on the GPU as the next step's inputs, so the next step is queued before the
//! host reads this one's tokens.

use super::pool::FreeList;
use crate::gpu::Step;
use crate::model::llama::{Batch, DecodePipe, ForwardOut, KvCache, Llama, PendingToken};
use crate::{Error, Result};
use std::collections::HashMap;

/// A sequence of a [`DecodeBatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SeqId(u64);

struct Seq {
    /// First arena slot.
    base: usize,
    /// Slots reserved (filled ones and those still to decode).
    room: usize,
    /// Slots filled: the next token goes to `base + len`, at RoPE position `len`.
    len: usize,
}

/// Sequences decoding together in one KV arena.
pub struct DecodeBatch {
    arena: KvCache,
    free: FreeList,
    seqs: HashMap<SeqId, Seq>,
    next_id: u64,
}

impl DecodeBatch {
    /// An arena of `slots` cache slots (shared by all sequences at once).
    pub fn new(model: &Llama, slots: usize) -> Result<DecodeBatch> {
        if slots == 0 {
            return Err(Error::Input(
                "a decode batch needs at least one slot".into(),
            ));
        }
        Ok(DecodeBatch {
            arena: model.new_cache(slots)?,
            free: FreeList::new(slots),
            seqs: HashMap::new(),
            next_id: 0,
        })
    }

    /// Slots in the arena.
    pub fn slots(&self) -> usize {
        self.arena.capacity
    }

    /// Sequences in the batch.
    pub fn len(&self) -> usize {
        self.seqs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Bytes of GPU memory the arena holds.
    pub fn bytes(&self) -> u64 {
        self.arena.bytes()
    }

    /// Move a prefilled request in: slots `0..len` of `cache` (keys, values and
    /// segments), reserving `room` slots in all (`len` plus the tokens still to decode).
    /// `Ok(None)` when the arena has no free range that large now (try again after a
    /// sequence leaves); an error when it never could.
    pub fn join(
        &mut self,
        model: &Llama,
        cache: &KvCache,
        len: usize,
        room: usize,
    ) -> Result<Option<SeqId>> {
        if len == 0 || len > cache.len {
            return Err(Error::Input(format!(
                "join: {len} filled slots of a cache of {} ({} filled)",
                cache.capacity, cache.len
            )));
        }
        if room < len || room > self.slots() {
            return Err(Error::Input(format!(
                "join: {room} slots for a sequence of {len} in an arena of {}",
                self.slots()
            )));
        }
        let Some(base) = self.free.alloc(room) else {
            return Ok(None);
        };
        let gpu = model.gpu();
        // The request's segment ids (a small read; the prefill has finished anyway),
        // then segment 0 for the slots still to decode.
        let mut segs = gpu.read_u32(&cache.seg)?;
        segs.truncate(len);
        segs.resize(room, 0);
        self.arena.set_sequence_segments(gpu, base, &segs)?;
        let kvd = model.cfg.kv_dim();
        let (from, bytes) = (0, (len * kvd * 2) as u64);
        let to = (base * kvd * 2) as u64;
        let mut st = Step::new(gpu);
        for l in 0..model.cfg.num_hidden_layers {
            st.copy(&cache.k[l], from, &self.arena.k[l], to, bytes);
            st.copy(&cache.v[l], from, &self.arena.v[l], to, bytes);
        }
        st.submit();
        self.arena.len = self.arena.len.max(base + len);
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, Seq { base, room, len });
        Ok(Some(id))
    }

    /// Take a sequence out; its slots go back to the arena. False if it is not here.
    pub fn leave(&mut self, id: SeqId) -> bool {
        match self.seqs.remove(&id) {
            Some(s) => {
                self.free.release(s.base, s.room);
                true
            }
            None => false,
        }
    }

    /// Slots a sequence may still fill.
    pub fn seq_room_left(&self, id: SeqId) -> Option<usize> {
        self.seqs.get(&id).map(|s| s.room - s.len)
    }

    /// Slots and RoPE positions of the next token of each sequence in `ids` (each once,
    /// each with a slot left).
    fn next_slots(&self, ids: &[SeqId]) -> Result<(Vec<u32>, Vec<i32>)> {
        let mut slots = Vec::with_capacity(ids.len());
        let mut positions = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            if ids[..i].contains(id) {
                return Err(Error::Input(format!("{id:?} twice in one decode step")));
            }
            let s = self
                .seqs
                .get(id)
                .ok_or_else(|| Error::Input(format!("{id:?} is not in the batch")))?;
            if s.len >= s.room {
                return Err(Error::Input(format!(
                    "{id:?} has used all of its {} slots",
                    s.room
                )));
            }
            positions.push(s.len as i32);
            slots.push((s.base + s.len) as u32);
        }
        Ok((slots, positions))
    }

    /// Count one more filled slot for each of `ids`.
    fn advance(&mut self, ids: impl IntoIterator<Item = SeqId>) {
        for id in ids {
            if let Some(s) = self.seqs.get_mut(&id) {
                s.len += 1;
            }
        }
    }

    /// A [`BatchPipe`] for [`DecodeBatch::step_async`].
    pub fn pipe(&self, model: &Llama) -> Result<BatchPipe> {
        Ok(BatchPipe {
            pipe: model.decode_pipe_rows(self.seqs.len().max(1))?,
            last: Vec::new(),
        })
    }

    /// One greedy decode step of the sequences `ids`, submitted without waiting
    /// ([`Llama::read_tokens`] waits for it and gives each row's token, in order). Each
    /// sequence feeds `tokens[i]`, or with None the token the pipe's previous step
    /// produced for it, which stays on the GPU: then `ids` must be that step's, in the
    /// same order. So the next step is queued before this one's tokens are read, and
    /// the GPU never waits for the host. A sequence that turns out to have ended when its
    /// tokens are read may leave with a step of it still queued: that step writes only
    /// its own slots, before anything that later joins into them.
    pub fn step_async(
        &mut self,
        model: &Llama,
        pipe: &mut BatchPipe,
        ids: &[SeqId],
        tokens: Option<&[u32]>,
    ) -> Result<PendingToken> {
        if tokens.is_none() && ids != pipe.last.as_slice() {
            return Err(Error::Input(
                "a decode step takes its tokens from the previous one only for the same \
                 sequences in the same order"
                    .into(),
            ));
        }
        let (slots, positions) = self.next_slots(ids)?;
        let p = model.decode_sequences_async(
            &mut pipe.pipe,
            &mut self.arena,
            &slots,
            &positions,
            tokens,
        )?;
        self.advance(ids.iter().copied());
        pipe.last = ids.to_vec();
        Ok(p)
    }

    /// One decode step: each `(sequence, token)` feeds the token at the sequence's next
    /// slot. With `greedy`, [`ForwardOut::tokens`] holds each input's argmax in order;
    /// else [`ForwardOut::logits`] holds each input's row of logits.
    pub fn step(
        &mut self,
        model: &Llama,
        inputs: &[(SeqId, u32)],
        greedy: bool,
    ) -> Result<ForwardOut> {
        if inputs.is_empty() {
            return Err(Error::Input("a decode step of no sequences".into()));
        }
        let ids: Vec<SeqId> = inputs.iter().map(|&(id, _)| id).collect();
        let tokens: Vec<u32> = inputs.iter().map(|&(_, t)| t).collect();
        let (slots, positions) = self.next_slots(&ids)?;
        let batch = Batch {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
        };
        let out = model.forward_sequences(&mut self.arena, &batch, greedy)?;
        self.advance(ids);
        Ok(out)
    }
}

/// The pipelined decoder's state for a [`DecodeBatch`]: the GPU token buffer steps pass
/// on and the sequences of the last step queued.
pub struct BatchPipe {
    pipe: DecodePipe,
    last: Vec<SeqId>,
}
