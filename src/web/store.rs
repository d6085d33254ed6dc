//! Document caches in the browser.
use super::api::source_name;
use crate::engine::{CacheSource, Engine};
use crate::error::Result;

#[derive(Clone)]
pub struct OpfsStore {}

impl OpfsStore {
    pub async fn open() -> Result<OpfsStore> {
        Err(crate::Error::Input("not yet".into()))
    }
}

/// Make a document's cache resident: GPU LRU, else the store, else computed.
pub async fn doc_cache(
    engine: &Engine,
    _store: Option<&OpfsStore>,
    tokens: &[u32],
) -> Result<&'static str> {
    let key = engine.doc_key(tokens);
    if engine.doc_resident(&key) {
        return Ok(source_name(CacheSource::Gpu));
    }
    engine.precompute(tokens)?;
    Ok(source_name(CacheSource::Computed))
}
