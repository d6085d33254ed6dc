//! The engine's use of the document caches on the real model: a GPU-resident cache is
//! served only for exactly its token ids, and a store that cannot be written or read
//! costs reuse, never the answer.

mod common;

use common::model::engine;
use common::tempdir::tempdir;
use kvlink::engine::CacheSource;
use kvlink::kv::{DiskStore, DocKv, KvFormat};
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

/// f16 values of a part's bytes.
fn f32s(part: &[u8]) -> Vec<f32> {
    part.chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

#[test]
fn q8_store_hits_upload_the_values_the_host_dequantizes() {
    let _g = STORE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let e = engine();
    let td = tempdir("q8-engine");
    let store = DiskStore::open(td.path()).unwrap();
    let a = doc("The lighthouse keeper logged every ship that passed the cape in 1911.\n");
    let b = doc("Its lamp burned whale oil until the harbour board bought kerosene.\n");
    let budget = e.doc_cache_budget();
    let r = (|| -> kvlink::Result<()> {
        e.set_store(Some(store.clone()));
        e.set_store_format(KvFormat::Q8);
        e.clear_doc_caches();
        let (computed, from) = e.doc_caches(&[&a, &b])?;
        assert_eq!(from, vec![CacheSource::Computed; 2]);
        // Hits from the q8 entries: into pool rows, then (no budget) into tensors of
        // their own.
        for budget in [budget, 0] {
            e.clear_doc_caches();
            e.set_doc_cache_budget(budget);
            let (hits, from) = e.doc_caches(&[&a, &b])?;
            assert_eq!(from, vec![CacheSource::Disk; 2], "budget {budget}");
            for ((hit, comp), toks) in hits.iter().zip(&computed).zip([&a, &b]) {
                let host = match store.get(
                    &e.doc_key(toks),
                    e.fingerprint(),
                    e.tokenizer_fingerprint(),
                    toks,
                )? {
                    kvlink::kv::Lookup::Hit(kv) => kv,
                    other => panic!("the q8 entry: {other:?}"),
                };
                let (gk, gv) = hit.download(e.gpu())?;
                let (ck, cv) = comp.download(e.gpu())?;
                for ((g, h), c) in gk
                    .iter()
                    .chain(&gv)
                    .zip(host.k.iter().chain(&host.v))
                    .zip(ck.iter().chain(&cv))
                {
                    // The reading thread turns the parts into f16 as `get` does: the
                    // uploaded values are the host's, bit for bit.
                    assert!(
                        g == h,
                        "the GPU's q8 hit differs from the host's dequantization"
                    );
                    let (g, c) = (f32s(g), f32s(c));
                    // Both within half a step (block absmax / 254, plus roundings) of
                    // the computed f16 cache, and not equal to it (quantized).
                    let mut moved = false;
                    for (gb, cb) in g.chunks(32).zip(c.chunks(32)) {
                        let absmax = cb.iter().fold(0f32, |m, v| m.max(v.abs()));
                        for (x, y) in gb.iter().zip(cb) {
                            let tol = absmax / 254.0 * (1.0 + 1.0 / 1024.0) + y.abs() / 1024.0;
                            assert!(
                                (x - y).abs() <= tol,
                                "{x} vs computed {y} (absmax {absmax})"
                            );
                            moved |= x != y;
                        }
                    }
                    assert!(moved, "a hit equal to the f16 cache: not from the q8 entry");
                }
            }
        }
        Ok(())
    })();
    e.set_doc_cache_budget(budget);
    e.set_store(None);
    e.set_store_format(KvFormat::F16);
    e.clear_doc_caches();
    r.unwrap();
}

#[test]
fn new_caches_are_encoded_once_for_both_tiers_and_shared_hits_keep_their_format() {
    use common::mem_shared::MemShared;
    use kvlink::kv::store::Q8_ENTRY_VERSION;
    let _g = STORE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let e = engine();
    let (td1, td2) = (tempdir("both-tiers-1"), tempdir("both-tiers-2"));
    let store1 = DiskStore::open(td1.path()).unwrap();
    let store2 = DiskStore::open(td2.path()).unwrap();
    let mem = std::sync::Arc::new(MemShared::default());
    let a = doc("The ferry to the island leaves twice a day, at seven and at five.\n");
    let r = (|| -> kvlink::Result<()> {
        e.set_store(Some(store1.clone()));
        e.set_shared_store(Some(mem.clone()));
        e.set_store_format(KvFormat::Q8);
        e.clear_doc_caches();
        let (_, from) = e.doc_caches(&[&a])?;
        assert_eq!(from, vec![CacheSource::Computed]);
        let key = e.doc_key(&a);
        let shared = mem.entry(&key).expect("the new cache in the shared tier");
        assert_eq!(shared[4..8], Q8_ENTRY_VERSION.to_le_bytes());
        // Quantized once: the same entry, creation time included, in both tiers.
        let disk = std::fs::read(store1.path_for(&key)).unwrap();
        assert!(disk == shared, "disk and shared entries differ");
        // Another server: its own empty disk store, writing f16. The shared tier's hit
        // goes to its disk as the shared tier has it (q8), not re-encoded.
        e.set_store(Some(store2.clone()));
        e.set_store_format(KvFormat::F16);
        e.clear_doc_caches();
        let (_, from) = e.doc_caches(&[&a])?;
        assert_eq!(from, vec![CacheSource::Shared]);
        let disk = std::fs::read(store2.path_for(&key)).unwrap();
        assert!(disk == shared, "the shared hit was re-encoded for the disk");
        // And serves from there next.
        e.clear_doc_caches();
        let (_, from) = e.doc_caches(&[&a])?;
        assert_eq!(from, vec![CacheSource::Disk]);
        Ok(())
    })();
    e.set_store(None);
    e.set_shared_store(None);
    e.set_store_format(KvFormat::F16);
    e.clear_doc_caches();
    r.unwrap();
}

#[test]
fn store_specs_refuse_bad_settings_and_warn_for_an_unusable_directory() {
    use kvlink::setup::StoreSpec;
    let _g = STORE_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let e = engine();
    let td = tempdir("spec");
    let mut warnings = Vec::new();
    let bad = [
        StoreSpec {
            locations: vec![td.path().join("a"), td.path().join("b")],
            ..Default::default()
        },
        StoreSpec {
            locations: vec!["redis://127.0.0.1:1".into(), "redis://127.0.0.1:2".into()],
            ..Default::default()
        },
        StoreSpec {
            max_gb: Some(0.0),
            ..Default::default()
        },
        StoreSpec {
            max_gb: Some(f64::NAN),
            no_disk: true,
            ..Default::default()
        },
        StoreSpec {
            ttl_hours: Some(-1.0),
            ..Default::default()
        },
    ];
    for spec in bad {
        let err = spec.apply(e, &mut |w| warnings.push(w.to_string()));
        assert!(
            matches!(err, Err(kvlink::Error::Input(_))),
            "{spec:?}: {err:?}"
        );
    }
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(e.store().is_none(), "a refused spec set a store");
    // A directory that cannot be a store (a file is in the way): a warning, no store.
    let file = td.path().join("file");
    std::fs::write(&file, b"").unwrap();
    let spec = StoreSpec {
        locations: vec![file.clone()],
        format: KvFormat::Q8,
        ..Default::default()
    };
    let r = spec.apply(e, &mut |w| warnings.push(w.to_string()));
    let (format, store) = (e.store_format(), e.store());
    e.set_store_format(KvFormat::F16);
    r.unwrap();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains(&file.display().to_string()),
        "{warnings:?}"
    );
    assert!(store.is_none());
    assert_eq!(format, KvFormat::Q8);
    // A usable one is the engine's store, with its cap.
    let spec = StoreSpec {
        locations: vec![td.path().join("store")],
        max_gb: Some(0.5),
        ..Default::default()
    };
    spec.apply(e, &mut |w| panic!("warning {w}")).unwrap();
    let store = e.store().expect("the store");
    e.set_store(None);
    assert_eq!(store.dir(), td.path().join("store"));
    assert_eq!(store.max_bytes(), 500_000_000);
}
