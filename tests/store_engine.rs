//! The engine's use of the document caches on the real model: a GPU-resident cache is
//! served only for exactly its token ids, and a store that cannot be written or read
//! costs reuse, never the answer.

mod common;

use common::model::engine;
use common::tempdir::tempdir;
use kvlink::engine::CacheSource;
use kvlink::kv::{DiskStore, DocKv};
use std::sync::Mutex;

/// The tests share one engine; those that set its store take turns.
static STORE_LOCK: Mutex<()> = Mutex::new(());

fn doc(text: &str) -> Vec<u32> {
    engine().tokenizer().encode(text, false).unwrap()
}

#[test]
fn gpu_cache_is_served_only_for_its_own_token_ids() {
    let _g = STORE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let e = engine();
    e.set_store(None);
    let a = doc("The river runs north past the old castle.\n");
    let b = doc("Marie Curie discovered radium in the year 1898.\n");
    let c = e.config();
    // Another document's cache (here: B's tokens, zero K/V) resident under A's key, as a
    // hash collision or a stale key would leave it.
    let kv = DocKv::zeros(b.len(), c.num_hidden_layers, c.kv_dim());
    e.insert_doc_with_key(e.doc_key(&a), &b, &kv).unwrap();
    let (caches, from) = e.doc_caches(&[&a]).unwrap();
    assert_eq!(
        from,
        vec![CacheSource::Computed],
        "the foreign cache was served"
    );
    assert_eq!(caches[0].tokens, a);
    // A's own cache now sits under A's key and is served.
    let (caches, from) = e.doc_caches(&[&a]).unwrap();
    assert_eq!(from, vec![CacheSource::Gpu]);
    assert_eq!(caches[0].tokens, a);
    e.clear_doc_caches();
}

#[test]
fn unwritable_store_is_a_warning_not_an_error() {
    let _g = STORE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let e = engine();
    let td = tempdir("unwritable");
    let store = DiskStore::open(td.path()).unwrap();
    // Every shard directory name is taken by a file: no entry can be written (as with a
    // full disk or a read-only directory, which root would still write).
    for i in 0..=255u8 {
        std::fs::write(td.path().join(format!("{i:02x}")), b"").unwrap();
    }
    e.set_store(Some(store.clone()));
    e.clear_doc_caches();
    let d = doc("The museum of history opened its garden to the city in winter.\n");
    let r = e.doc_caches(&[&d]);
    e.set_store(None);
    let (caches, from) = r.expect("a failed store write must not fail the request");
    assert_eq!(from, vec![CacheSource::Computed]);
    assert_eq!(caches[0].tokens, d);
    assert!(store.entries().unwrap().is_empty());
    e.clear_doc_caches();
}

#[test]
fn gpu_hits_keep_the_disk_entry_recent_for_lru_eviction() {
    let _g = STORE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let e = engine();
    let td = tempdir("touch");
    let every = std::time::Duration::from_millis(300);
    let store = DiskStore::open(td.path()).unwrap().with_touch_after(every);
    e.set_store(Some(store.clone()));
    e.clear_doc_caches();
    let d = doc("The train station north of the bridge has a coffee garden.\n");
    let r = (|| {
        let (_, from) = e.doc_caches(&[&d])?;
        assert_eq!(from, vec![CacheSource::Computed]);
        let p = store.path_for(&e.doc_key(&d));
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let mtime = || std::fs::metadata(&p).unwrap().modified().unwrap();
        // Just written: a GPU hit right after does not touch the file (rate-limited,
        // no file system call on the request's path)...
        let (_, from) = e.doc_caches(&[&d])?;
        assert_eq!(from, vec![CacheSource::Gpu]);
        assert!(mtime() < old + std::time::Duration::from_secs(1));
        // ... one after the interval does.
        std::thread::sleep(every + std::time::Duration::from_millis(50));
        let (_, from) = e.doc_caches(&[&d])?;
        assert_eq!(from, vec![CacheSource::Gpu]);
        assert!(
            mtime() > old + std::time::Duration::from_secs(1800),
            "mtime not refreshed"
        );
        kvlink::Result::Ok(())
    })();
    e.set_store(None);
    e.clear_doc_caches();
    r.unwrap();
}
