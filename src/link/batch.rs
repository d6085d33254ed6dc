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

use super::pool::FreeList;
use crate::gpu::Step;
use crate::model::llama::{Batch, ForwardOut, KvCache, Llama};
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
        let mut tokens = Vec::with_capacity(inputs.len());
        let mut positions = Vec::with_capacity(inputs.len());
        let mut slots = Vec::with_capacity(inputs.len());
        for (i, (id, tok)) in inputs.iter().enumerate() {
            if inputs[..i].iter().any(|(o, _)| o == id) {
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
            tokens.push(*tok);
            positions.push(s.len as i32);
            slots.push((s.base + s.len) as u32);
        }
        let batch = Batch {
            tokens: &tokens,
            positions: &positions,
            slots: &slots,
        };
        let out = model.forward_sequences(&mut self.arena, &batch, greedy)?;
        for (id, _) in inputs {
            if let Some(s) = self.seqs.get_mut(id) {
                s.len += 1;
            }
        }
        Ok(out)
    }
}
