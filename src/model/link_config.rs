//! The link-token configuration of a KVLink fine-tuned model (the adapter's
//! `kvlink.json`): which ids are link tokens and markers. It describes the model's
//! vocabulary, so it lives with the model; the prompt plan (`link::plan`) uses it.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// Most link tokens per document a configuration may ask for (the checkpoints use 5).
pub const MAX_LINK_TOKENS: usize = 256;
/// Most document slots a configuration may declare (the checkpoints: 40).
pub const MAX_SLOTS: usize = 1 << 16;

/// Link-token configuration of a KVLink fine-tuned model (all off for plain models).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkConfig {
    /// Link tokens after each document (k; the released checkpoints use 5).
    #[serde(default, alias = "link_tokens")]
    pub k: usize,
    /// Id of the first link token: slot j uses `link_base + k*j + i`, i < k.
    #[serde(default)]
    pub link_base: Option<u32>,
    /// KV-START marker before the first document.
    #[serde(default)]
    pub kv_start: Option<u32>,
    /// KV-END marker after the last document's link tokens.
    #[serde(default)]
    pub kv_end: Option<u32>,
    /// Most document slots the model was trained with (checkpoints: 40); 0 = no limit.
    #[serde(default)]
    pub max_slots: usize,
}

impl LinkConfig {
    /// Read `kvlink.json` (fields as in this struct) if it exists next to the model.
    pub fn from_file(path: &std::path::Path) -> Result<Option<LinkConfig>> {
        if !path.exists() {
            return Ok(None);
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, path).map(Some)
    }

    /// Parse the bytes of a `kvlink.json` (`path` only names it in messages) and check
    /// [`LinkConfig::check_bounds`].
    pub fn parse(bytes: &[u8], path: &std::path::Path) -> Result<LinkConfig> {
        let c: LinkConfig = serde_json::from_slice(bytes)
            .map_err(|e| Error::bad_model(path, format!("invalid kvlink.json: {e}")))?;
        c.check_bounds()
            .map_err(|m| Error::bad_model(path, format!("kvlink.json: {m}")))?;
        Ok(c)
    }

    /// The checks that need no model: `k` and `max_slots` within [`MAX_LINK_TOKENS`]
    /// and [`MAX_SLOTS`] (a plan holds `k` tokens per document).
    pub fn check_bounds(&self) -> std::result::Result<(), String> {
        if self.k > MAX_LINK_TOKENS {
            return Err(format!(
                "k = {} link tokens per document is more than {MAX_LINK_TOKENS}",
                self.k
            ));
        }
        if self.max_slots > MAX_SLOTS {
            return Err(format!(
                "max_slots {} is more than {MAX_SLOTS}",
                self.max_slots
            ));
        }
        Ok(())
    }

    /// Check every id the configuration can produce lies inside the vocabulary.
    pub fn validate(&self, vocab: usize, n_docs: usize) -> Result<()> {
        self.check_bounds()
            .map_err(|m| Error::Input(format!("link tokens: {m}")))?;
        let check = |what: &str, id: u32| {
            if id as usize >= vocab {
                Err(Error::Input(format!(
                    "{what} id {id} is outside the model's vocabulary ({vocab})"
                )))
            } else {
                Ok(())
            }
        };
        if let Some(s) = self.kv_start {
            check("KV-START", s)?;
        }
        if let Some(e) = self.kv_end {
            check("KV-END", e)?;
        }
        if self.k > 0 {
            let base = self.link_base.ok_or_else(|| {
                Error::Input("link tokens requested (k > 0) but no link base id given".into())
            })?;
            if self.max_slots > 0 && n_docs > self.max_slots {
                return Err(Error::Input(format!(
                    "{n_docs} documents but the model's link tokens cover at most {} slots",
                    self.max_slots
                )));
            }
            // k <= MAX_LINK_TOKENS, so this only overflows for absurd n_docs.
            let last = (self.k as u64)
                .checked_mul(n_docs.max(1) as u64)
                .and_then(|n| (base as u64).checked_add(n - 1));
            if last.is_none_or(|l| l >= vocab as u64 || l > u32::MAX as u64) {
                let last = last.map_or("overflow".to_string(), |l| l.to_string());
                return Err(Error::Input(format!(
                    "link token ids {base}..={last} for {n_docs} documents go beyond the \
                     vocabulary ({vocab})"
                )));
            }
        }
        Ok(())
    }

    /// Id of link token `i` of document slot `slot`: `link_base + k*slot + i`, `None`
    /// where that does not fit a u32.
    pub fn try_link_id(&self, slot: usize, i: usize) -> Option<u32> {
        let off = self.k.checked_mul(slot)?.checked_add(i)?;
        self.link_base
            .unwrap_or(0)
            .checked_add(u32::try_from(off).ok()?)
    }

    /// [`LinkConfig::try_link_id`], with `u32::MAX` (outside every vocabulary) where the
    /// id does not fit.
    pub fn link_id(&self, slot: usize, i: usize) -> u32 {
        self.try_link_id(slot, i).unwrap_or(u32::MAX)
    }
}
