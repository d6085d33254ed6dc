//! A shared cache tier in this process's memory, standing in for Redis.

use kvlink::kv::{DocKey, SharedStore};
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Entries by key (`DocKey`'s text).
#[derive(Default)]
pub struct MemShared(pub Mutex<BTreeMap<String, Vec<u8>>>);

impl MemShared {
    /// A copy of the entry under `key`, if any.
    pub fn entry(&self, key: &DocKey) -> Option<Vec<u8>> {
        self.0.lock().unwrap().get(&key.to_string()).cloned()
    }
}

impl SharedStore for MemShared {
    fn describe(&self) -> String {
        "memory".into()
    }
    fn get(&self, key: &DocKey) -> kvlink::Result<Option<Vec<u8>>> {
        Ok(self.entry(key))
    }
    fn put(&self, key: &DocKey, entry: &[u8]) -> kvlink::Result<()> {
        self.0
            .lock()
            .unwrap()
            .insert(key.to_string(), entry.to_vec());
        Ok(())
    }
    fn remove(&self, key: &DocKey) -> kvlink::Result<bool> {
        Ok(self.0.lock().unwrap().remove(&key.to_string()).is_some())
    }
}
