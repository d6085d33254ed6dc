//! Host-side document KV cache: disk store, keys, hashes, LRU index.

mod common;

use common::mem_shared::MemShared;
use common::tempdir::tempdir;
use common::Rng;

use kvlink::kv::quant::Q8_BLOCK;
use kvlink::kv::store::{
    decode_entry, encode_entry_as, EntryHeader, PayloadSink, ReadTimes, PRUNE_AT_OPEN_AFTER,
    PRUNE_MARKER, Q8_ENTRY_VERSION,
};
use kvlink::kv::{
    checksum64, fnv1a64, xxh64, DiskStore, DocKey, DocKv, KvFormat, Lookup, Lru, Xxh64,
    CACHE_FORMAT_VERSION,
};
use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

const MODEL: &str = "model:smollm2-135m:q4_1:abc123";
const TOK: &str = "tok:smollm2:def456";

// --- helpers ------------------------------------------------------------------------------

fn random_kv(seed: u64, n_tokens: usize, n_layers: usize, kv_dim: usize) -> DocKv {
    let mut r = Rng::seeded(seed);
    let lb = n_tokens * kv_dim * 2;
    DocKv {
        n_tokens,
        n_layers,
        kv_dim,
        k: (0..n_layers).map(|_| r.bytes(lb)).collect(),
        v: (0..n_layers).map(|_| r.bytes(lb)).collect(),
    }
}

fn tokens(seed: u64, n: usize) -> Vec<u32> {
    let mut r = Rng::seeded(seed ^ 0x5555);
    (0..n).map(|_| (r.next_u64() % 128_256) as u32).collect()
}

fn hit(l: Lookup) -> DocKv {
    match l {
        Lookup::Hit(kv) => kv,
        other => panic!("expected Hit, got {other:?}"),
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for shard in fs::read_dir(dir).unwrap() {
        let shard = shard.unwrap().path();
        if shard.is_dir() {
            for f in fs::read_dir(&shard).unwrap() {
                out.push(f.unwrap().file_name().to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    out
}

/// Rewrites the trailing checksum so that only the intended change is seen.
fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - 8;
    let sum = checksum64(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum.to_le_bytes());
}

// --- hashes and keys ----------------------------------------------------------------------

#[test]
fn xxh64_known_vectors() {
    assert_eq!(xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
    assert_eq!(xxh64(b"a", 0), 0xD24E_C4F1_A98C_6E5B);
    assert_eq!(xxh64(b"abc", 0), 0x44BC_2CF5_AD77_0999);
    assert_eq!(
        xxh64(b"Nobody inspects the spammish repetition", 0),
        0xFBCE_A83C_8A37_8BF1
    );
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
}

#[test]
fn xxh64_streaming_matches_one_shot() {
    let data = Rng::seeded(7).bytes(1000);
    for len in [0usize, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 65, 100, 1000] {
        let want = xxh64(&data[..len], 42);
        for split in [1usize, 3, 5, 16, 31, 32, 33, 64] {
            let mut h = Xxh64::new(42);
            for c in data[..len].chunks(split) {
                h.update(c);
            }
            assert_eq!(h.finish(), want, "len {len} split {split}");
        }
    }
}

#[test]
fn doc_key_depends_on_every_field() {
    let t = tokens(1, 50);
    let k = DocKey::new(MODEL, TOK, &t);
    assert_eq!(k, DocKey::new(MODEL, TOK, &t));
    assert_eq!(k.as_str().len(), 32);
    assert!(k
        .as_str()
        .bytes()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    assert_eq!(DocKey::from_hex(k.as_str()), Some(k.clone()));
    assert_eq!(DocKey::from_hex("xyz"), None);
    assert_eq!(k.to_string(), k.as_str());

    let mut t2 = t.clone();
    t2[49] ^= 1;
    let mut keys = HashSet::new();
    keys.insert(k.clone());
    assert!(keys.insert(DocKey::new("other-model", TOK, &t)));
    assert!(keys.insert(DocKey::new(MODEL, "other-tok", &t)));
    assert!(keys.insert(DocKey::new(MODEL, TOK, &t2)));
    assert!(keys.insert(DocKey::new(MODEL, TOK, &t[..49])));
    assert!(keys.insert(DocKey::new(MODEL, TOK, &[])));
    assert!(keys.insert(DocKey::with_version(
        CACHE_FORMAT_VERSION + 1,
        MODEL,
        TOK,
        &t
    )));
    // Length prefixes: moving bytes between the fingerprints changes the key.
    assert_ne!(DocKey::new("ab", "c", &t), DocKey::new("a", "bc", &t));
    // No collisions over many small token sequences.
    let mut many = HashSet::new();
    for i in 0..20_000u32 {
        assert!(many.insert(DocKey::new(MODEL, TOK, &[i, i / 7])));
    }
}

#[test]
fn doc_kv_validate_and_bytes() {
    let kv = random_kv(1, 5, 3, 8);
    kv.validate().unwrap();
    assert_eq!(kv.bytes(), 2 * 3 * 5 * 8 * 2);
    assert_eq!(kv.layer_bytes(), 5 * 8 * 2);
    let mut bad = kv.clone();
    bad.k[1].pop();
    assert!(bad.validate().is_err());
    let mut bad = kv.clone();
    bad.v.pop();
    assert!(bad.validate().is_err());
    let mut bad = kv.clone();
    bad.n_tokens = 6;
    assert!(bad.validate().is_err());
    DocKv::zeros(0, 2, 4).validate().unwrap();
}

// --- disk store -----------------------------------------------------------------------------

#[test]
fn round_trip_and_layout() {
    let td = tempdir("roundtrip");
    let store = DiskStore::open(td.path().join("kv")).unwrap();
    let t = tokens(2, 17);
    let kv = random_kv(2, 17, 3, 24);
    let key = DocKey::new(MODEL, TOK, &t);
    assert!(!store.contains(&key));
    assert!(matches!(
        store.get(&key, MODEL, TOK, &t).unwrap(),
        Lookup::Miss
    ));

    store.put(&key, MODEL, TOK, &t, &kv).unwrap();
    assert!(store.contains(&key));
    let p = store.path_for(&key);
    assert_eq!(
        p,
        td.path()
            .join("kv")
            .join(&key.as_str()[..2])
            .join(format!("{key}.kvc"))
    );
    let raw = fs::read(&p).unwrap();
    assert_eq!(&raw[..4], b"KVLC");
    assert_eq!(
        u32::from_le_bytes(raw[4..8].try_into().unwrap()),
        CACHE_FORMAT_VERSION
    );
    let got = hit(store.get(&key, MODEL, TOK, &t).unwrap());
    assert_eq!(got, kv);

    // Payload order: all K layers, then all V layers, right before the checksum.
    let payload: Vec<u8> = kv.k.iter().chain(kv.v.iter()).flatten().copied().collect();
    let end = raw.len() - 8;
    assert_eq!(&raw[end - payload.len()..end], &payload[..]);
    assert_eq!(checksum64(&raw[..end]).to_le_bytes(), raw[end..]);

    let entries = store.entries().unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].key, key);
    assert_eq!(entries[0].n_tokens, 17);
    assert_eq!(entries[0].n_layers, 3);
    assert_eq!(entries[0].kv_dim, 24);
    assert_eq!(entries[0].bytes, raw.len() as u64);
    assert_eq!(entries[0].model_fingerprint, MODEL);
    assert_eq!(entries[0].tokenizer_fingerprint, TOK);
    assert_eq!(store.total_bytes().unwrap(), raw.len() as u64);

    // Empty document and a second entry.
    let k0 = DocKey::new(MODEL, TOK, &[]);
    store
        .put(&k0, MODEL, TOK, &[], &DocKv::zeros(0, 3, 24))
        .unwrap();
    assert_eq!(
        hit(store.get(&k0, MODEL, TOK, &[]).unwrap()),
        DocKv::zeros(0, 3, 24)
    );
    assert_eq!(store.entries().unwrap().len(), 2);

    assert!(store.remove(&key).unwrap());
    assert!(!store.remove(&key).unwrap());
    assert!(!store.contains(&key));
    assert!(matches!(
        store.get(&key, MODEL, TOK, &t).unwrap(),
        Lookup::Miss
    ));
    // No temp files left behind.
    assert!(files_in(store.dir()).iter().all(|f| f.ends_with(".kvc")));
}

#[test]
fn put_rejects_inconsistent_input() {
    let td = tempdir("putreject");
    let store = DiskStore::open(td.path()).unwrap();
    let t = tokens(3, 4);
    let kv = random_kv(3, 4, 2, 8);
    let key = DocKey::new(MODEL, TOK, &t);
    // Key for other fields.
    assert!(store
        .put(&DocKey::new("m2", TOK, &t), MODEL, TOK, &t, &kv)
        .is_err());
    // Token count differs from the DocKv.
    let t5 = tokens(3, 5);
    assert!(store
        .put(&DocKey::new(MODEL, TOK, &t5), MODEL, TOK, &t5, &kv)
        .is_err());
    // Invalid DocKv.
    let mut bad = kv.clone();
    bad.v[0].truncate(3);
    assert!(store.put(&key, MODEL, TOK, &t, &bad).is_err());
    assert!(files_in(store.dir()).is_empty());
}

#[test]
fn reuse_across_instances() {
    let td = tempdir("reopen");
    let t = tokens(4, 33);
    let kv = random_kv(4, 33, 4, 16);
    let key = DocKey::new(MODEL, TOK, &t);
    {
        let s = DiskStore::open(td.path()).unwrap();
        s.put(&key, MODEL, TOK, &t, &kv).unwrap();
    }
    let s2 = DiskStore::open(td.path()).unwrap();
    assert_eq!(hit(s2.get(&key, MODEL, TOK, &t).unwrap()), kv);
}

const CHILD_ENV: &str = "KVLINK_KV_TEST_CHILD_DIR";

/// Helper run by `reuse_across_processes` in a child process; does nothing otherwise.
#[test]
#[ignore]
fn child_writer() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = DiskStore::open(&dir).unwrap();
    // Read what the parent wrote.
    let tp = tokens(10, 21);
    let got = hit(store
        .get(&DocKey::new(MODEL, TOK, &tp), MODEL, TOK, &tp)
        .unwrap());
    assert_eq!(got, random_kv(10, 21, 3, 32));
    // Write one for the parent.
    let tc = tokens(11, 19);
    store
        .put(
            &DocKey::new(MODEL, TOK, &tc),
            MODEL,
            TOK,
            &tc,
            &random_kv(11, 19, 3, 32),
        )
        .unwrap();
}

#[test]
fn reuse_across_processes() {
    let td = tempdir("xproc");
    let store = DiskStore::open(td.path()).unwrap();
    let tp = tokens(10, 21);
    store
        .put(
            &DocKey::new(MODEL, TOK, &tp),
            MODEL,
            TOK,
            &tp,
            &random_kv(10, 21, 3, 32),
        )
        .unwrap();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_writer", "--ignored", "--test-threads=1"])
        .env(CHILD_ENV, td.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("1 passed"),
        "child did not run the helper: {stdout}"
    );
    let tc = tokens(11, 19);
    let got = hit(store
        .get(&DocKey::new(MODEL, TOK, &tc), MODEL, TOK, &tc)
        .unwrap());
    assert_eq!(got, random_kv(11, 19, 3, 32));
}

#[test]
fn wrong_model_tokenizer_or_tokens_refused() {
    let td = tempdir("mismatch");
    let store = DiskStore::open(td.path()).unwrap();
    let t = tokens(5, 12);
    let kv = random_kv(5, 12, 2, 16);
    let key = DocKey::new(MODEL, TOK, &t);
    store.put(&key, MODEL, TOK, &t, &kv).unwrap();

    // Another model has another key: plain miss.
    let key_b = DocKey::new("other-model", TOK, &t);
    assert_ne!(key, key_b);
    assert!(matches!(
        store.get(&key_b, "other-model", TOK, &t).unwrap(),
        Lookup::Miss
    ));
    // Same key file, but asked for another model / tokenizer / tokens: refused.
    for (m, tk, ids) in [
        ("other-model", TOK, t.clone()),
        (MODEL, "other-tok", t.clone()),
        (MODEL, TOK, tokens(6, 12)),
        (MODEL, TOK, t[..11].to_vec()),
    ] {
        match store.get(&key, m, tk, &ids).unwrap() {
            Lookup::Mismatch(why) => assert!(!why.is_empty()),
            other => panic!("expected Mismatch, got {other:?}"),
        }
    }
    // The entry itself is intact and still served to the right caller.
    assert_eq!(hit(store.get(&key, MODEL, TOK, &t).unwrap()), kv);

    // A simulated key collision: another document's file under this key.
    let t2 = tokens(7, 12);
    let key2 = DocKey::new(MODEL, TOK, &t2);
    fs::create_dir_all(store.path_for(&key2).parent().unwrap()).unwrap();
    fs::copy(store.path_for(&key), store.path_for(&key2)).unwrap();
    assert!(matches!(
        store.get(&key2, MODEL, TOK, &t2).unwrap(),
        Lookup::Mismatch(_)
    ));
    // Recomputing and storing replaces it.
    let kv2 = random_kv(7, 12, 2, 16);
    store.put(&key2, MODEL, TOK, &t2, &kv2).unwrap();
    assert_eq!(hit(store.get(&key2, MODEL, TOK, &t2).unwrap()), kv2);
}

#[test]
fn wrong_format_version_refused() {
    let td = tempdir("version");
    let store = DiskStore::open(td.path()).unwrap();
    let t = tokens(8, 9);
    let key = DocKey::new(MODEL, TOK, &t);
    store
        .put(&key, MODEL, TOK, &t, &random_kv(8, 9, 2, 8))
        .unwrap();
    let p = store.path_for(&key);
    let mut raw = fs::read(&p).unwrap();
    raw[4..8].copy_from_slice(&(Q8_ENTRY_VERSION + 1).to_le_bytes());
    reseal(&mut raw);
    fs::write(&p, &raw).unwrap();
    match store.get(&key, MODEL, TOK, &t).unwrap() {
        Lookup::Mismatch(why) => assert!(why.contains("version"), "{why}"),
        other => panic!("expected Mismatch, got {other:?}"),
    }
    // Older version too.
    raw[4..8].copy_from_slice(&0u32.to_le_bytes());
    reseal(&mut raw);
    fs::write(&p, &raw).unwrap();
    assert!(matches!(
        store.get(&key, MODEL, TOK, &t).unwrap(),
        Lookup::Mismatch(_)
    ));
}

#[test]
fn corrupt_payload_detected_and_moved_aside() {
    let td = tempdir("corrupt");
    let store = DiskStore::open(td.path()).unwrap();
    let t = tokens(9, 20);
    let kv = random_kv(9, 20, 3, 16);
    let key = DocKey::new(MODEL, TOK, &t);
    store.put(&key, MODEL, TOK, &t, &kv).unwrap();
    let p = store.path_for(&key);
    let mut raw = fs::read(&p).unwrap();
    let i = raw.len() - 8 - kv.bytes() / 2; // middle of the payload
    raw[i] ^= 0x10;
    fs::write(&p, &raw).unwrap();

    match store.get(&key, MODEL, TOK, &t).unwrap() {
        Lookup::Corrupt(why) => assert!(why.contains("checksum"), "{why}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(!p.exists());
    assert!(!store.contains(&key));
    let names = files_in(store.dir());
    assert_eq!(names, vec![format!("{key}.kvc.corrupt")]);
    assert!(matches!(
        store.get(&key, MODEL, TOK, &t).unwrap(),
        Lookup::Miss
    ));
    assert_eq!(store.total_bytes().unwrap(), 0);

    // Recompute, store, hit; prune clears the moved-aside file.
    store.put(&key, MODEL, TOK, &t, &kv).unwrap();
    assert_eq!(hit(store.get(&key, MODEL, TOK, &t).unwrap()), kv);
    let st = store.prune(u64::MAX).unwrap();
    assert_eq!(st.removed_entries, 0);
    assert_eq!(st.freed_bytes, raw.len() as u64);
    assert_eq!(files_in(store.dir()), vec![format!("{key}.kvc")]);
}

#[test]
fn truncated_and_garbage_files_are_corrupt() {
    let td = tempdir("trunc");
    let store = DiskStore::open(td.path()).unwrap();
    let t = tokens(12, 10);
    let kv = random_kv(12, 10, 2, 8);
    let key = DocKey::new(MODEL, TOK, &t);
    store.put(&key, MODEL, TOK, &t, &kv).unwrap();
    let p = store.path_for(&key);
    let good = fs::read(&p).unwrap();

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated by one", good[..good.len() - 1].to_vec()),
        ("truncated half", good[..good.len() / 2].to_vec()),
        ("empty", vec![]),
        ("three bytes", b"KVL".to_vec()),
        ("extra byte", [good.clone(), vec![0]].concat()),
        ("bad magic", [b"XXXX".to_vec(), good[4..].to_vec()].concat()),
        ("garbage", Rng::seeded(1).bytes(5000)),
    ];
    for (name, bytes) in cases {
        fs::write(&p, &bytes).unwrap();
        match store.get(&key, MODEL, TOK, &t).unwrap() {
            Lookup::Corrupt(_) => {}
            other => panic!("{name}: expected Corrupt, got {other:?}"),
        }
        assert!(!p.exists(), "{name}: corrupt file not moved aside");
        assert!(
            matches!(store.get(&key, MODEL, TOK, &t).unwrap(), Lookup::Miss),
            "{name}"
        );
    }

    // Header claiming an enormous shape (checksum resealed): refused without allocating.
    let hlen = u32::from_le_bytes(good[8..12].try_into().unwrap()) as usize;
    let json = String::from_utf8(good[12..12 + hlen].to_vec()).unwrap();
    for (from, to) in [
        ("\"n_layers\":2", "\"n_layers\":9999999999999"),
        ("\"kv_dim\":8", "\"kv_dim\":99999999999999999"),
        ("\"n_tokens\":10", "\"n_tokens\":18446744073709551615"),
        ("\"dtype\":\"f16\"", "\"dtype\":\"f32\""),
    ] {
        assert!(json.contains(from), "{json}");
        let j2 = json.replace(from, to);
        let mut raw = good[..8].to_vec();
        raw.extend_from_slice(&(j2.len() as u32).to_le_bytes());
        raw.extend_from_slice(j2.as_bytes());
        raw.extend_from_slice(&good[12 + hlen..]);
        reseal(&mut raw);
        fs::write(&p, &raw).unwrap();
        assert!(
            matches!(store.get(&key, MODEL, TOK, &t).unwrap(), Lookup::Corrupt(_)),
            "{to}"
        );
    }
}

#[test]
fn reads_never_panic_or_hit_on_mutated_bytes() {
    let td = tempdir("fuzz");
    let store = DiskStore::open(td.path()).unwrap();
    let t = tokens(13, 3);
    let kv = random_kv(13, 3, 2, 4);
    let key = DocKey::new(MODEL, TOK, &t);
    store.put(&key, MODEL, TOK, &t, &kv).unwrap();
    let p = store.path_for(&key);
    let good = fs::read(&p).unwrap();
    // Every truncation.
    for n in 0..good.len() {
        fs::write(&p, &good[..n]).unwrap();
        let r = store.get(&key, MODEL, TOK, &t).unwrap();
        assert!(matches!(r, Lookup::Corrupt(_)), "len {n}: {r:?}");
    }
    // Every single-byte change (without and with resealing the checksum).
    let mut rng = Rng::seeded(99);
    for i in 0..good.len() {
        for reseal_it in [false, true] {
            let mut raw = good.clone();
            raw[i] ^= 1 << (rng.next_u64() % 8);
            if reseal_it && i < raw.len() - 8 {
                reseal(&mut raw);
            }
            fs::write(&p, &raw).unwrap();
            match store.get(&key, MODEL, TOK, &t).unwrap() {
                Lookup::Hit(got) => {
                    // Only a resealed change can read back (e.g. in the payload or the
                    // created time); a payload change must then show in the result.
                    assert!(
                        reseal_it && i < good.len() - 8,
                        "byte {i}: unsealed change accepted"
                    );
                    let payload_start = good.len() - 8 - kv.bytes();
                    assert_eq!(got == kv, i < payload_start, "byte {i}");
                }
                Lookup::Miss => panic!("byte {i}: file vanished"),
                Lookup::Mismatch(_) | Lookup::Corrupt(_) => {}
            }
        }
    }
}

#[test]
fn concurrent_writers_and_readers() {
    let td = tempdir("concurrent");
    let store = DiskStore::open(td.path()).unwrap();
    let t = tokens(14, 64);
    let key = DocKey::new(MODEL, TOK, &t);
    let variants: Vec<DocKv> = (0..8).map(|i| random_kv(100 + i, 64, 4, 64)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicU64::new(0));

    std::thread::scope(|s| {
        let readers: Vec<_> = (0..3)
            .map(|_| {
                let (store, t, key, variants, stop, hits) =
                    (&store, &t, &key, &variants, stop.clone(), hits.clone());
                s.spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match store.get(key, MODEL, TOK, t).unwrap() {
                            Lookup::Hit(kv) => {
                                assert!(variants.contains(&kv), "reader saw a torn entry");
                                hits.fetch_add(1, Ordering::Relaxed);
                            }
                            Lookup::Miss => {}
                            other => panic!("reader saw {other:?}"),
                        }
                    }
                })
            })
            .collect();
        let writers: Vec<_> = variants
            .iter()
            .map(|kv| {
                let (store, t, key) = (&store, &t, &key);
                s.spawn(move || {
                    for _ in 0..10 {
                        store.put(key, MODEL, TOK, t, kv).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().unwrap();
        }
        // Let readers see the final state too.
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        for r in readers {
            r.join().unwrap();
        }
    });
    assert!(hits.load(Ordering::Relaxed) > 0);
    let got = hit(store.get(&key, MODEL, TOK, &t).unwrap());
    assert!(variants.contains(&got));
    assert_eq!(files_in(store.dir()), vec![format!("{key}.kvc")]);
}

#[test]
fn prune_removes_oldest_first() {
    let td = tempdir("prune");
    let store = DiskStore::open(td.path()).unwrap();
    let base = SystemTime::now() - Duration::from_secs(1000);
    let mut keys = Vec::new();
    for i in 0..5u64 {
        let t = tokens(200 + i, 8);
        let key = DocKey::new(MODEL, TOK, &t);
        store
            .put(&key, MODEL, TOK, &t, &random_kv(i, 8, 2, 8))
            .unwrap();
        let f = fs::File::options()
            .write(true)
            .open(store.path_for(&key))
            .unwrap();
        f.set_modified(base + Duration::from_secs(10 * i)).unwrap();
        keys.push((key, t));
    }
    // Sizes differ slightly (the header holds the token ids as JSON).
    let sizes: Vec<u64> = keys
        .iter()
        .map(|(k, _)| fs::metadata(store.path_for(k)).unwrap().len())
        .collect();
    assert_eq!(store.total_bytes().unwrap(), sizes.iter().sum::<u64>());
    // A hit refreshes entry 0, so entries 1 and 2 are now the oldest.
    let (k0, t0) = &keys[0];
    assert!(store.get(k0, MODEL, TOK, t0).unwrap().is_hit());

    let keep3 = sizes[0] + sizes[3] + sizes[4];
    let st = store.prune(keep3).unwrap();
    assert_eq!(st.removed_entries, 2);
    assert_eq!(st.freed_bytes, sizes[1] + sizes[2]);
    assert_eq!(st.remaining_bytes, keep3);
    let left: Vec<bool> = keys.iter().map(|(k, _)| store.contains(k)).collect();
    assert_eq!(left, vec![true, false, false, true, true]);
    assert_eq!(store.total_bytes().unwrap(), keep3);

    let st = store.prune(sizes[0] + 1).unwrap();
    assert_eq!(st.removed_entries, 2);
    let left: Vec<bool> = keys.iter().map(|(k, _)| store.contains(k)).collect();
    assert_eq!(left, vec![true, false, false, false, false]);

    assert_eq!(store.prune(0).unwrap().removed_entries, 1);
    assert!(store.entries().unwrap().is_empty());
}

// --- lifecycle: cap, eviction, stale files ------------------------------------------------

fn put_seed(store: &DiskStore, seed: u64) -> (DocKey, Vec<u32>) {
    let t = tokens(1000 + seed, 16);
    let key = DocKey::new(MODEL, TOK, &t);
    store
        .put(&key, MODEL, TOK, &t, &random_kv(seed, 16, 2, 32))
        .unwrap();
    (key, t)
}

fn set_age(path: &Path, age: Duration) {
    let f = fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() - age).unwrap();
}

/// The pid of a process that has exited (a child, waited for).
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn put_keeps_the_store_under_its_cap_evicting_least_recently_used() {
    let td = tempdir("cap");
    // Measure one entry (all have the same size here), then cap at three of them.
    let probe = tempdir("cap-probe");
    let (k, _) = put_seed(&DiskStore::open(probe.path()).unwrap(), 0);
    let size = fs::metadata(DiskStore::open(probe.path()).unwrap().path_for(&k))
        .unwrap()
        .len();
    let cap = 3 * size + size / 2;
    let store = DiskStore::open_with_cap(td.path(), cap).unwrap();
    assert_eq!(store.max_bytes(), cap);
    let mut keys = Vec::new();
    for i in 0..10u64 {
        keys.push(put_seed(&store, i));
        assert!(
            store.total_bytes().unwrap() <= cap,
            "after put {i}: {} bytes, cap {cap}",
            store.total_bytes().unwrap()
        );
        // Keep entry 0 in use: a hit makes it the most recently used.
        std::thread::sleep(Duration::from_millis(5));
        let (k0, t0) = &keys[0];
        assert!(
            store.get(k0, MODEL, TOK, t0).unwrap().is_hit(),
            "entry 0 evicted"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let left: Vec<usize> = (0..10).filter(|&i| store.contains(&keys[i].0)).collect();
    assert_eq!(
        left,
        vec![0, 8, 9],
        "kept: the one in use and the newest two"
    );
}

#[test]
fn a_put_over_the_cap_prunes_to_a_low_water_mark() {
    let td = tempdir("cap-slack");
    let probe = tempdir("cap-slack-probe");
    let ps = DiskStore::open(probe.path()).unwrap();
    let (k, _) = put_seed(&ps, 0);
    let size = fs::metadata(ps.path_for(&k)).unwrap().len();
    // Ten and a half entries fit; the eleventh put prunes to 90% (9.45 entries: 9
    // left), so the next put fits without another scan.
    let store = DiskStore::open_with_cap(td.path(), 10 * size + size / 2).unwrap();
    for i in 0..11 {
        put_seed(&store, i);
    }
    assert_eq!(store.entries().unwrap().len(), 9);
    put_seed(&store, 11);
    assert_eq!(store.entries().unwrap().len(), 10);
}

#[test]
fn put_larger_than_the_cap_is_refused_clearly() {
    let td = tempdir("cap-small");
    let store = DiskStore::open_with_cap(td.path(), 1000).unwrap();
    let t = tokens(5, 64);
    let err = store
        .put(
            &DocKey::new(MODEL, TOK, &t),
            MODEL,
            TOK,
            &t,
            &random_kv(5, 64, 2, 32),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("cap"), "{err}");
    assert!(files_in(td.path()).is_empty(), "{:?}", files_in(td.path()));
}

#[test]
fn open_prunes_dead_writers_temp_files_and_corrupt_files_only() {
    let td = tempdir("stale");
    let store = DiskStore::open(td.path()).unwrap();
    let (key, t) = put_seed(&store, 1);
    let shard = store.path_for(&key).parent().unwrap().to_path_buf();
    let dead = dead_pid();
    let me = std::process::id();
    let tmp = |pid: u32, n: u32| shard.join(format!(".{key}.{pid}.1.{n}.tmp"));
    let cases = [
        // (file, age, removed by the next open)
        (tmp(dead, 0), Duration::from_secs(600), true),
        (tmp(dead, 1), Duration::from_secs(5), false),
        (tmp(me, 2), Duration::from_secs(600), false),
        (tmp(me, 3), Duration::from_secs(7200), true),
    ];
    for (p, age, _) in &cases {
        fs::write(p, b"partial").unwrap();
        set_age(p, *age);
    }
    let corrupt = shard.join(format!("{key}.kvc.corrupt"));
    fs::write(&corrupt, b"bad").unwrap();
    let st = DiskStore::inspect(td.path()).stats().unwrap();
    assert_eq!(
        (
            st.entries,
            st.tmp_files,
            st.stale_tmp_files,
            st.corrupt_files
        ),
        (1, 4, 2, 1)
    );

    // The prune when the store was opened above is now long ago.
    set_age(&td.path().join(PRUNE_MARKER), PRUNE_AT_OPEN_AFTER);
    let store = DiskStore::open(td.path()).unwrap();
    for (p, age, removed) in &cases {
        assert_eq!(!p.exists(), *removed, "{} aged {age:?}", p.display());
    }
    assert!(!corrupt.exists());
    assert!(store.get(&key, MODEL, TOK, &t).unwrap().is_hit());
}

fn mtime(p: &Path) -> SystemTime {
    fs::metadata(p).unwrap().modified().unwrap()
}

#[test]
fn open_skips_the_scan_when_the_last_prune_is_recent() {
    let td = tempdir("open-recent");
    let store = DiskStore::open(td.path()).unwrap();
    let (a, _) = put_seed(&store, 1);
    let (b, _) = put_seed(&store, 2);
    let bytes = |k: &DocKey| fs::metadata(store.path_for(k)).unwrap().len();
    let size = bytes(&a);
    let marker = td.path().join(PRUNE_MARKER);
    // A prune leaves the marker: the entry bytes it left.
    let total = bytes(&a) + bytes(&b);
    assert_eq!(store.prune(u64::MAX).unwrap().remaining_bytes, total);
    assert_eq!(
        fs::read_to_string(&marker).unwrap().trim(),
        total.to_string()
    );
    let corrupt = store.path_for(&a).with_extension("kvc.corrupt");
    fs::write(&corrupt, b"bad").unwrap();

    // Opened again soon after: no scan (the corrupt file stays)...
    let again = DiskStore::open_with_cap(td.path(), total + size / 2).unwrap();
    assert!(corrupt.exists(), "open scanned the store");
    // ... but the marker's total stands for one: the next put passes the cap and
    // prunes (to 90%: two entries left of three, the least recently used goes).
    set_age(&store.path_for(&a), Duration::from_secs(100));
    set_age(&store.path_for(&b), Duration::from_secs(50));
    let (c, _) = put_seed(&again, 3);
    assert!(!corrupt.exists());
    let left: Vec<bool> = [&a, &b, &c].iter().map(|k| again.contains(k)).collect();
    assert_eq!(left, vec![false, true, true]);

    // A cap below what the last prune left: open prunes at once.
    let total = bytes(&b) + bytes(&c);
    assert_eq!(store.prune(u64::MAX).unwrap().remaining_bytes, total);
    fs::write(&corrupt, b"bad").unwrap();
    DiskStore::open_with_cap(td.path(), size + size / 2).unwrap();
    assert!(!corrupt.exists());
    assert_eq!(store.entries().unwrap().len(), 1);

    // The last prune long ago (or its marker unreadable): open scans.
    for spoil in [false, true] {
        fs::write(&corrupt, b"bad").unwrap();
        if spoil {
            fs::write(&marker, b"not a number").unwrap();
        } else {
            set_age(&marker, PRUNE_AT_OPEN_AFTER);
        }
        DiskStore::open(td.path()).unwrap();
        assert!(!corrupt.exists(), "spoilt marker {spoil}: no scan");
    }
}

#[test]
fn touch_refreshes_the_lru_order_at_most_every_interval() {
    let td = tempdir("touch");
    let every = Duration::from_millis(400);
    let store = DiskStore::open(td.path()).unwrap().with_touch_after(every);
    let (a, _) = put_seed(&store, 1);
    let (b, _) = put_seed(&store, 2);
    let t0 = std::time::Instant::now();
    let (pa, pb) = (store.path_for(&a), store.path_for(&b));
    // a is the older of the two on disk.
    set_age(&pa, Duration::from_secs(3600));
    set_age(&pb, Duration::from_secs(1800));
    let old = SystemTime::now() - Duration::from_secs(3000);
    // Just written by this process: touching is not due, and does nothing.
    assert!(!store.touch(&a));
    assert!(mtime(&pa) < old, "touched before it was due");
    // Once due, a touch refreshes it (and then is not due again for a while).
    std::thread::sleep(every.saturating_sub(t0.elapsed()) + Duration::from_millis(50));
    assert!(store.touch(&a));
    assert!(mtime(&pa) > old);
    set_age(&pa, Duration::from_secs(3600));
    assert!(!store.touch(&a));
    assert!(mtime(&pa) < old);
    // The interval is per entry: b was not touched since its put, long enough ago.
    assert!(store.touch(&b));
    std::thread::sleep(every + Duration::from_millis(50));
    assert!(store.touch(&a));
    // The LRU order follows: pruning to one entry keeps a, the most recently touched.
    set_age(&pb, Duration::from_secs(60));
    let size = fs::metadata(&pa).unwrap().len();
    assert_eq!(store.prune(size).unwrap().removed_entries, 1);
    assert!(store.contains(&a) && !store.contains(&b));
    // A missing entry: false, and no error.
    assert!(!store.touch(&b));
    // A hit also counts as a refresh.
    let fresh = DiskStore::open(td.path()).unwrap().with_touch_after(every);
    let (k, t) = put_seed(&fresh, 9);
    std::thread::sleep(every + Duration::from_millis(50));
    set_age(&fresh.path_for(&k), Duration::from_secs(3600));
    assert!(fresh.get(&k, MODEL, TOK, &t).unwrap().is_hit());
    assert!(mtime(&fresh.path_for(&k)) > old);
    assert!(!fresh.touch(&k), "a hit just refreshed it");
}

#[test]
fn prune_is_skipped_while_another_process_prunes() {
    let td = tempdir("prune-lock");
    let store = DiskStore::open(td.path()).unwrap();
    put_seed(&store, 2);
    let lock = fs::File::options()
        .write(true)
        .open(td.path().join(".prune.lock"))
        .unwrap();
    lock.lock().unwrap();
    let st = store.prune(0).unwrap();
    assert!(st.skipped_busy);
    assert_eq!(store.entries().unwrap().len(), 1);
    lock.unlock().unwrap();
    let st = store.prune(0).unwrap();
    assert!(!st.skipped_busy);
    assert_eq!(st.removed_entries, 1);
}

// --- LRU ------------------------------------------------------------------------------------

#[test]
fn lru_eviction_order_and_budget() {
    let mut lru: Lru<&str, u32> = Lru::new(100);
    assert!(lru.insert("a", 1, 30).is_empty());
    assert!(lru.insert("b", 2, 30).is_empty());
    assert!(lru.insert("c", 3, 30).is_empty());
    assert_eq!(lru.len(), 3);
    assert_eq!(lru.used_bytes(), 90);
    // Touch "a": "b" becomes least recently used.
    assert_eq!(lru.get(&"a"), Some(&1));
    assert_eq!(lru.get(&"zz"), None);
    assert_eq!(
        lru.keys_lru_order().copied().collect::<Vec<_>>(),
        vec!["b", "c", "a"]
    );
    let ev = lru.insert("d", 4, 30);
    assert_eq!(ev, vec![("b", 2)]);
    assert_eq!(lru.used_bytes(), 90);
    // peek does not refresh: "c" is evicted next, then "a".
    assert_eq!(lru.peek(&"c"), Some(&3));
    let ev = lru.insert("e", 5, 60);
    assert_eq!(ev, vec![("c", 3), ("a", 1)]);
    assert_eq!(lru.used_bytes(), 90);
    assert!(lru.used_bytes() <= lru.budget_bytes());
    assert_eq!(lru.len(), 2);
    assert!(lru.contains(&"d") && lru.contains(&"e"));

    assert_eq!(lru.remove(&"d"), Some(4));
    assert_eq!(lru.remove(&"d"), None);
    assert_eq!(lru.used_bytes(), 60);
    // Replacing a key returns the old value and updates the size.
    let ev = lru.insert("e", 50, 10);
    assert_eq!(ev, vec![("e", 5)]);
    assert_eq!(lru.used_bytes(), 10);
    assert_eq!(lru.get(&"e"), Some(&50));

    // Shrinking the budget evicts oldest first.
    lru.insert("f", 6, 40);
    lru.insert("g", 7, 40);
    assert_eq!(lru.set_budget(50), vec![("e", 50), ("f", 6)]);
    assert_eq!(lru.used_bytes(), 40);
    assert_eq!(lru.pop_lru(), Some(("g", 7)));
    assert!(lru.is_empty());
    assert_eq!(lru.used_bytes(), 0);
}

#[test]
fn lru_oversized_entry_not_inserted() {
    let mut lru: Lru<u32, String> = Lru::new(100);
    lru.insert(1, "one".into(), 60);
    let ev = lru.insert(2, "two".into(), 101);
    assert_eq!(ev, vec![(2, "two".to_string())]);
    // Nothing else was evicted for it.
    assert_eq!(lru.len(), 1);
    assert_eq!(lru.used_bytes(), 60);
    assert!(!lru.contains(&2));
    // Exactly the budget fits (evicting the rest).
    let ev = lru.insert(3, "three".into(), 100);
    assert_eq!(ev, vec![(1, "one".to_string())]);
    assert_eq!(lru.used_bytes(), 100);
    // Zero-byte entries always fit.
    assert!(lru.insert(4, "four".into(), 0).is_empty());
    assert_eq!(lru.len(), 2);
    let mut zero: Lru<u32, ()> = Lru::new(0);
    assert_eq!(zero.insert(1, (), 1), vec![(1, ())]);
    assert!(zero.is_empty());
}

#[test]
fn lru_randomized_against_model() {
    // Compare with a simple Vec-based reference implementation.
    let mut rng = Rng::seeded(5);
    let budget = 1000u64;
    let mut lru: Lru<u64, u64> = Lru::new(budget);
    let mut model: Vec<(u64, u64, u64)> = Vec::new(); // (key, val, bytes), oldest first
    for step in 0..5000u64 {
        let k = rng.next_u64() % 40;
        match rng.next_u64() % 3 {
            0 => {
                let got = lru.get(&k).copied();
                let pos = model.iter().position(|e| e.0 == k);
                assert_eq!(got, pos.map(|p| model[p].1), "step {step}");
                if let Some(p) = pos {
                    let e = model.remove(p);
                    model.push(e);
                }
            }
            1 => {
                let got = lru.remove(&k);
                let pos = model.iter().position(|e| e.0 == k);
                assert_eq!(got, pos.map(|p| model.remove(p).1));
            }
            _ => {
                let bytes = rng.next_u64() % 300;
                let mut want = Vec::new();
                if let Some(p) = model.iter().position(|e| e.0 == k) {
                    let e = model.remove(p);
                    want.push((e.0, e.1));
                }
                if bytes > budget {
                    want.push((k, step));
                } else {
                    while model.iter().map(|e| e.2).sum::<u64>() + bytes > budget {
                        let e = model.remove(0);
                        want.push((e.0, e.1));
                    }
                    model.push((k, step, bytes));
                }
                assert_eq!(lru.insert(k, step, bytes), want, "step {step}");
            }
        }
        assert_eq!(lru.len(), model.len());
        assert_eq!(lru.used_bytes(), model.iter().map(|e| e.2).sum::<u64>());
        assert!(lru.used_bytes() <= budget);
    }
}

/// Records what `get_with` hands it: each part's bytes, checking they arrive in order.
struct Recorder {
    parts: Vec<Vec<u8>>,
    finished: Arc<AtomicBool>,
}

impl PayloadSink for Recorder {
    type Output = Vec<Vec<u8>>;
    fn write(&mut self, part: usize, offset: usize, bytes: &[u8]) {
        assert!(
            self.parts[..part].iter().all(|p| !p.is_empty()),
            "part {part} before an earlier one"
        );
        assert_eq!(self.parts[part].len(), offset, "part {part} out of order");
        self.parts[part].extend_from_slice(bytes);
    }
    fn finish(self) -> kvlink::Result<Vec<Vec<u8>>> {
        self.finished.store(true, Ordering::SeqCst);
        Ok(self.parts)
    }
}

#[test]
fn get_with_streams_parts_in_order_and_finishes_only_verified_hits() {
    let td = tempdir("getwith");
    let store = DiskStore::open(td.path()).unwrap();
    // Layers of 300 * 512 * 2 bytes: more than one read chunk each.
    let t = tokens(21, 300);
    let kv = random_kv(21, 300, 2, 512);
    let key = DocKey::new(MODEL, TOK, &t);
    store.put(&key, MODEL, TOK, &t, &kv).unwrap();
    let finished = Arc::new(AtomicBool::new(false));
    let get = |model: &str| {
        let f = finished.clone();
        let sink = |h: &EntryHeader| {
            assert_eq!((h.n_tokens, h.n_layers, h.kv_dim), (300, 2, 512));
            Ok(Recorder {
                parts: vec![Vec::new(); 2 * h.n_layers],
                finished: f,
            })
        };
        store.get_with(&key, model, TOK, &t, sink, &mut ReadTimes::default())
    };
    match get(MODEL).unwrap() {
        Lookup::Hit(parts) => {
            let want: Vec<Vec<u8>> = kv.k.iter().chain(&kv.v).cloned().collect();
            assert!(parts == want, "parts differ from what was stored");
        }
        other => panic!("expected Hit, got {other:?}"),
    }
    assert!(finished.swap(false, Ordering::SeqCst));

    // Another model's entry under this key: no sink is made.
    match get("other model").unwrap() {
        Lookup::Mismatch(why) => assert!(why.contains("model"), "{why}"),
        other => panic!("expected Mismatch, got {other:?}"),
    }
    assert!(!finished.load(Ordering::SeqCst));

    // A corrupt payload: the sink saw the bytes but is dropped, never finished.
    let p = store.path_for(&key);
    let mut raw = fs::read(&p).unwrap();
    let i = raw.len() - 8 - kv.bytes() / 3;
    raw[i] ^= 0x01;
    fs::write(&p, &raw).unwrap();
    match get(MODEL).unwrap() {
        Lookup::Corrupt(why) => assert!(why.contains("checksum"), "{why}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert!(!finished.load(Ordering::SeqCst));
    assert!(matches!(get(MODEL).unwrap(), Lookup::Miss));

    // A sink that cannot be made is an error, not a miss.
    store.put(&key, MODEL, TOK, &t, &kv).unwrap();
    let no_room = |_: &EntryHeader| Err::<Recorder, _>(kvlink::Error::Input("no room".into()));
    let r = store.get_with(&key, MODEL, TOK, &t, no_room, &mut ReadTimes::default());
    assert!(r.is_err());
    assert!(
        store.contains(&key),
        "a sink failure is not the entry's fault"
    );
}

#[test]
fn get_with_counts_entries_and_payload_bytes() {
    let td = tempdir("readtimes");
    let store = DiskStore::open(td.path()).unwrap();
    let t = tokens(22, 300);
    let kv = random_kv(22, 300, 2, 512);
    let key = DocKey::new(MODEL, TOK, &t);
    store.put(&key, MODEL, TOK, &t, &kv).unwrap();
    let mut times = ReadTimes::default();
    let get = |model: &str, times: &mut ReadTimes| {
        let sink = |h: &EntryHeader| {
            Ok(Recorder {
                parts: vec![Vec::new(); 2 * h.n_layers],
                finished: Arc::new(AtomicBool::new(false)),
            })
        };
        store.get_with(&key, model, TOK, &t, sink, times).unwrap()
    };
    assert!(matches!(get(MODEL, &mut times), Lookup::Hit(_)));
    assert_eq!((times.entries, times.bytes), (1, kv.bytes() as u64));
    // A mismatched entry is read through (to tell it from a corrupt one): counted too.
    assert!(matches!(get("other", &mut times), Lookup::Mismatch(_)));
    assert_eq!((times.entries, times.bytes), (2, 2 * kv.bytes() as u64));
    // The phases are measured, not left at zero: 600 KB are read and hashed.
    assert!(!times.read.is_zero() && !times.hash.is_zero(), "{times:?}");
    let mut sum = ReadTimes::default();
    sum.add(&times);
    sum.add(&times);
    assert_eq!(
        (sum.entries, sum.bytes, sum.read),
        (4, 4 * kv.bytes() as u64, 2 * times.read)
    );
}

/// A shared tier in memory, for what writes to one.
#[test]
fn push_copies_intact_entries_under_their_header_keys() {
    use kvlink::kv::shared::push_store;
    let td = tempdir("push");
    let store = DiskStore::open(td.path()).unwrap();
    let (a, _) = put_seed(&store, 1);
    let (b, _) = put_seed(&store, 2);
    let (c, _) = put_seed(&store, 3);
    // b corrupt; c's file renamed to another key's name
    let pb = store.path_for(&b);
    let mut raw = fs::read(&pb).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 0x40;
    fs::write(&pb, &raw).unwrap();
    let other = DocKey::new(MODEL, TOK, &tokens(77, 5));
    let c_bytes = fs::read(store.path_for(&c)).unwrap();
    fs::create_dir_all(store.path_for(&other).parent().unwrap()).unwrap();
    fs::rename(store.path_for(&c), store.path_for(&other)).unwrap();
    let mem = MemShared::default();
    let mut calls = Vec::new();
    let st = push_store(&store, &mem, &mut |d, n| calls.push((d, n))).unwrap();
    assert_eq!((st.pushed, st.skipped), (2, 1), "{st:?}");
    assert_eq!(calls.last(), Some(&(3, 3)));
    let got = mem.0.lock().unwrap().clone();
    let keys: Vec<&String> = got.keys().collect();
    let mut want = [a.to_string(), c.to_string()];
    want.sort();
    assert_eq!(keys, want.iter().collect::<Vec<_>>());
    assert_eq!(got[&a.to_string()], fs::read(store.path_for(&a)).unwrap());
    assert_eq!(got[&c.to_string()], c_bytes);
    assert_eq!(
        st.pushed_bytes,
        (got[&a.to_string()].len() + c_bytes.len()) as u64
    );
    // what was pushed reads back as the disk entry it came from
    assert!(kvlink::kv::store::check_entry(&got[&a.to_string()]).is_ok());
    assert!(kvlink::kv::store::check_entry(&raw).is_err());
}

// --- the q8 format ------------------------------------------------------------------------

/// A cache of finite f16 values (standard normal), with one all-zero block and one block
/// with an outlier in layer 0's K.
fn finite_kv(seed: u64, n_tokens: usize, n_layers: usize, kv_dim: usize) -> DocKv {
    let mut r = Rng::seeded(seed);
    let mut part = |outliers: bool| -> Vec<u8> {
        let mut x: Vec<f32> = (0..n_tokens * kv_dim).map(|_| r.unit() * 3.0).collect();
        if outliers {
            x[..Q8_BLOCK].fill(0.0);
            x[Q8_BLOCK + 5] = 400.0;
        }
        x.iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect()
    };
    DocKv {
        n_tokens,
        n_layers,
        kv_dim,
        k: (0..n_layers).map(|l| part(l == 0)).collect(),
        v: (0..n_layers).map(|_| part(false)).collect(),
    }
}

fn f32s(part: &[u8]) -> Vec<f32> {
    part.chunks_exact(2)
        .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

/// Each value of `got` within half a quantization step of `want` (the block's absmax /
/// 254, and the f16 roundings of the scale and of the result); and some values not
/// equal (it was quantized).
fn assert_within_half_a_step(got: &DocKv, want: &DocKv) {
    let mut moved = 0;
    for (g, w) in got.k.iter().chain(&got.v).zip(want.k.iter().chain(&want.v)) {
        let (g, w) = (f32s(g), f32s(w));
        for (gb, wb) in g.chunks(Q8_BLOCK).zip(w.chunks(Q8_BLOCK)) {
            let absmax = wb.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in gb.iter().zip(wb) {
                let tol = absmax / 254.0 * (1.0 + 1.0 / 1024.0) + b.abs() / 2048.0;
                assert!((a - b).abs() <= tol, "{a} vs {b}: block absmax {absmax}");
                moved += (a != b) as usize;
            }
        }
    }
    assert!(moved > 0, "no value changed: not quantized");
}

/// A disk hit's q8 parts are turned into f16 on the host as they are read
/// (`quant::dequantize`, a few blocks at a time): every value is the f16 rounding of the
/// exact f32 product, for parts of more than one of its chunks and a partial last one.
#[test]
fn q8_parts_dequantize_to_the_rounded_product() {
    let mut rng = Rng::new();
    for blocks in [1, 9, 64, 70, 129] {
        let n = blocks * Q8_BLOCK;
        // Every byte value (-128 too: sign-extended), scales of either sign, one of them 0.
        let q: Vec<i8> = (0..n).map(|_| rng.below(256) as u8 as i8).collect();
        let scales: Vec<half::f16> = (0..blocks)
            .map(|b| match b % 5 {
                4 => half::f16::ZERO,
                _ => half::f16::from_f32((rng.unit() - 0.5) * 0.2),
            })
            .collect();
        let mut part: Vec<u8> = q.iter().map(|&x| x as u8).collect();
        for s in &scales {
            part.extend_from_slice(&s.to_bits().to_le_bytes());
        }
        part.resize(part.len().next_multiple_of(4), 0);
        assert_eq!(part.len(), KvFormat::Q8.part_bytes(n));
        let mut out = vec![0xA5u8; 2 * n];
        kvlink::kv::quant::dequantize(&part, n, &mut out).unwrap();
        for (i, c) in out.chunks_exact(2).enumerate() {
            // 8-bit value x 11-bit scale: exact in f32, then one f16 rounding.
            let want = half::f16::from_f32(q[i] as f32 * scales[i / Q8_BLOCK].to_f32());
            let got = half::f16::from_le_bytes([c[0], c[1]]);
            assert_eq!(got.to_bits(), want.to_bits(), "{blocks} blocks, value {i}");
        }
        // A part or an output of the wrong size is an error, not a panic.
        assert!(kvlink::kv::quant::dequantize(&part[1..], n, &mut out).is_err());
        assert!(kvlink::kv::quant::dequantize(&part, n, &mut out[2..]).is_err());
    }
}

/// Parts that arrive in pieces (a disk read's chunks: a part bigger than one) are
/// gathered and turned into f16 once whole, part after part; a piece out of order is an
/// error.
#[test]
fn q8_parts_in_pieces_dequantize_as_whole_parts() {
    use kvlink::kv::quant::{dequantize, PartDequantizer};
    let mut rng = Rng::new();
    let n = 70 * Q8_BLOCK;
    let bytes = KvFormat::Q8.part_bytes(n);
    let mut parts = Vec::new();
    for _ in 0..3 {
        let mut kv = vec![0u8; 2 * n];
        for c in kv.chunks_exact_mut(2) {
            c.copy_from_slice(&half::f16::from_f32(rng.unit() - 0.5).to_le_bytes());
        }
        let mut q = Vec::new();
        kvlink::kv::quant::quantize(&kv, &mut q).unwrap();
        let mut want = vec![0u8; 2 * n];
        dequantize(&q, n, &mut want).unwrap();
        parts.push((q, want));
    }
    let mut d = PartDequantizer::new(n);
    // Whole, then in pieces of 1,000 bytes (the last shorter), then whole again.
    for (i, (q, want)) in parts.iter().enumerate() {
        if i == 1 {
            let pieces: Vec<_> = q.chunks(1000).collect();
            for (j, p) in pieces.iter().enumerate() {
                let got = d.push(j * 1000, p);
                if j + 1 < pieces.len() {
                    assert!(got.is_none(), "piece {j}: a part before its last byte");
                } else {
                    assert_eq!(got.unwrap().unwrap(), &want[..], "part {i} in pieces");
                }
            }
        } else {
            assert_eq!(d.push(0, q).unwrap().unwrap(), &want[..], "part {i} whole");
        }
    }
    // A piece that skips bytes, or runs past the part's end: errors.
    let q = &parts[0].0;
    assert!(d.push(0, &q[..100]).is_none());
    assert!(d.push(200, &q[200..300]).unwrap().is_err());
    assert!(d.push(0, &q[..100]).is_none());
    assert!(d.push(100, &[0u8; 1]).is_none());
    let mut long = q[101..].to_vec();
    long.push(0);
    assert!(d.push(101, &long).unwrap().is_err());
    assert_eq!(bytes, q.len());
}

#[test]
fn q8_entries_round_trip_within_half_a_step_in_half_the_bytes() {
    let td = tempdir("q8");
    let store = DiskStore::open(td.path()).unwrap();
    let (n, layers, kv_dim) = (37, 3, 64);
    let kv = finite_kv(21, n, layers, kv_dim);
    let t = tokens(21, n);
    let key = DocKey::new(MODEL, TOK, &t);
    store
        .put_as(&key, MODEL, TOK, &t, &kv, KvFormat::Q8)
        .unwrap();
    let raw = fs::read(store.path_for(&key)).unwrap();
    assert_eq!(raw[4..8], Q8_ENTRY_VERSION.to_le_bytes());
    let hl = u32::from_le_bytes(raw[8..12].try_into().unwrap()) as usize;
    let header: EntryHeader = serde_json::from_slice(&raw[12..12 + hl]).unwrap();
    assert_eq!(header.dtype, "q8");
    // Values, then scales (a whole number of words), per part.
    let part = n * kv_dim + (n * kv_dim / Q8_BLOCK * 2).next_multiple_of(4);
    assert_eq!(raw.len(), 12 + hl + 2 * layers * part + 8);
    assert!(2 * layers * part < kv.bytes() * 54 / 100);
    let got = hit(store.get(&key, MODEL, TOK, &t).unwrap());
    assert_eq!(
        (got.n_tokens, got.n_layers, got.kv_dim),
        (n, layers, kv_dim)
    );
    assert_within_half_a_step(&got, &kv);
    // The all-zero block stays exactly zero; the outlier is kept to its f16 rounding.
    let k0 = f32s(&got.k[0]);
    assert!(k0[..Q8_BLOCK].iter().all(|&x| x == 0.0));
    assert!((k0[Q8_BLOCK + 5] - 400.0).abs() <= 400.0 / 2048.0);
    // The shared tier's bytes are the same entry.
    let bytes = encode_entry_as(MODEL, TOK, &t, &kv, KvFormat::Q8, header.created_unix_ms).unwrap();
    assert_eq!(bytes, raw);
    assert_eq!(hit(decode_entry(&bytes, MODEL, TOK, &t)), got);
    // A plain put of the same document is f16 (version 1) and exact again.
    store.put(&key, MODEL, TOK, &t, &kv).unwrap();
    assert_eq!(
        fs::read(store.path_for(&key)).unwrap()[4..8],
        CACHE_FORMAT_VERSION.to_le_bytes()
    );
    assert_eq!(hit(store.get(&key, MODEL, TOK, &t).unwrap()), kv);
}

#[test]
fn q8_falls_back_to_f16_where_it_cannot_store_a_cache() {
    let td = tempdir("q8-fallback");
    let store = DiskStore::open(td.path()).unwrap();
    // Rows that are not whole blocks, and a value that is not finite: stored exactly.
    let mut nan = finite_kv(5, 8, 2, 64);
    nan.v[1][6..8].copy_from_slice(&half::f16::NAN.to_le_bytes());
    for (seed, kv) in [(4, finite_kv(4, 8, 2, 48)), (5, nan)] {
        let t = tokens(seed, 8);
        let key = DocKey::new(MODEL, TOK, &t);
        store
            .put_as(&key, MODEL, TOK, &t, &kv, KvFormat::Q8)
            .unwrap();
        let raw = fs::read(store.path_for(&key)).unwrap();
        assert_eq!(raw[4..8], CACHE_FORMAT_VERSION.to_le_bytes());
        let got = hit(store.get(&key, MODEL, TOK, &t).unwrap());
        assert_eq!(got.k, kv.k);
        // (NaN != NaN: compare the bytes)
        assert_eq!(got.v, kv.v);
    }
}

#[test]
fn q8_entries_that_do_not_add_up_are_corrupt() {
    let td = tempdir("q8-corrupt");
    let store = DiskStore::open(td.path()).unwrap();
    let t = tokens(6, 16);
    let key = DocKey::new(MODEL, TOK, &t);
    let kv = finite_kv(6, 16, 2, 32);
    store
        .put_as(&key, MODEL, TOK, &t, &kv, KvFormat::Q8)
        .unwrap();
    let p = store.path_for(&key);
    let good = fs::read(&p).unwrap();
    let check = |raw: &[u8], want: &str| {
        fs::write(&p, raw).unwrap();
        match store.get(&key, MODEL, TOK, &t).unwrap() {
            Lookup::Corrupt(why) => assert!(why.contains(want), "{why}"),
            other => panic!("expected Corrupt ({want}), got {other:?}"),
        }
    };
    // A flipped scale byte (the checksum).
    let mut raw = good.clone();
    let n = raw.len();
    raw[n - 20] ^= 0x40;
    check(&raw, "checksum");
    // A q8 entry whose prefix says version 1 (f16), resealed.
    let mut raw = good.clone();
    raw[4..8].copy_from_slice(&CACHE_FORMAT_VERSION.to_le_bytes());
    reseal(&mut raw);
    check(&raw, "version");
    // A version-2 entry whose header names another dtype, resealed.
    let hl = u32::from_le_bytes(good[8..12].try_into().unwrap()) as usize;
    for dtype in ["f16", "bf16"] {
        let mut h: EntryHeader = serde_json::from_slice(&good[12..12 + hl]).unwrap();
        h.dtype = dtype.into();
        let json = serde_json::to_vec(&h).unwrap();
        let mut raw = good[..8].to_vec();
        raw.extend_from_slice(&(json.len() as u32).to_le_bytes());
        raw.extend_from_slice(&json);
        raw.extend_from_slice(&good[12 + hl..]);
        reseal(&mut raw);
        check(&raw, "dtype");
    }
    // An f16 payload's length under a q8 header: the length check.
    let mut raw = good.clone();
    raw.truncate(n - 8);
    raw.extend_from_slice(&[0u8; 64]);
    raw.extend_from_slice(&[0u8; 8]);
    reseal(&mut raw);
    check(&raw, "length");
}

#[test]
fn put_entry_writes_intact_entries_verbatim_and_refuses_the_rest() {
    let td = tempdir("put-entry");
    let store = DiskStore::open(td.path()).unwrap();
    for (seed, format) in [(7, KvFormat::F16), (8, KvFormat::Q8)] {
        let t = tokens(seed, 16);
        let key = DocKey::new(MODEL, TOK, &t);
        let kv = finite_kv(seed, 16, 2, 32);
        let entry = encode_entry_as(MODEL, TOK, &t, &kv, format, 1234).unwrap();
        store.put_entry(&key, &entry).unwrap();
        assert_eq!(fs::read(store.path_for(&key)).unwrap(), entry, "{format:?}");
        // It reads back as the same entry through the store as through decode_entry.
        let want = hit(decode_entry(&entry, MODEL, TOK, &t));
        let got = hit(store.get(&key, MODEL, TOK, &t).unwrap());
        assert_eq!((got.k, got.v), (want.k, want.v), "{format:?}");
    }
    // Refused, and nothing written: another key, a flipped payload byte, a truncation,
    // bytes that are no entry, an entry over the cap.
    let t = tokens(9, 16);
    let key = DocKey::new(MODEL, TOK, &t);
    let entry = encode_entry_as(MODEL, TOK, &t, &finite_kv(9, 16, 2, 32), KvFormat::Q8, 1).unwrap();
    let other = DocKey::new(MODEL, TOK, &tokens(10, 16));
    let err = store.put_entry(&other, &entry).unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");
    let mut flipped = entry.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 1;
    let err = store.put_entry(&key, &flipped).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    let err = store
        .put_entry(&key, &entry[..entry.len() - 1])
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an intact cache entry"), "{err}");
    assert!(store.put_entry(&key, b"not an entry").is_err());
    let small = DiskStore::open_with_cap(td.path().join("small"), entry.len() as u64 - 1).unwrap();
    let err = small.put_entry(&key, &entry).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
    assert!(!store.contains(&key) && !store.contains(&other) && !small.contains(&key));
    let kvc: Vec<String> = files_in(td.path())
        .into_iter()
        .filter(|f| !f.starts_with(".prune") && !f.starts_with(".last-prune"))
        .collect();
    assert_eq!(kvc.len(), 2, "{kvc:?}");
}

#[test]
fn convert_rewrites_intact_entries_in_the_other_format_keeping_their_last_use() {
    use kvlink::kv::convert::convert_store;
    let td = tempdir("convert");
    let store = DiskStore::open(td.path()).unwrap();
    let put = |seed: u64, kv: &DocKv, format: KvFormat| {
        let t = tokens(seed, kv.n_tokens);
        let key = DocKey::new(MODEL, TOK, &t);
        store.put_as(&key, MODEL, TOK, &t, kv, format).unwrap();
        (key, t)
    };
    let (a, b) = (finite_kv(20, 16, 2, 32), finite_kv(21, 8, 3, 64));
    let (ka, ta) = put(20, &a, KvFormat::F16);
    let (kb, tb) = put(21, &b, KvFormat::F16);
    let (kc, tc) = put(22, &finite_kv(22, 16, 2, 32), KvFormat::Q8);
    let mut nan = finite_kv(23, 8, 2, 64);
    nan.k[0][2..4].copy_from_slice(&half::f16::NAN.to_le_bytes());
    let (kn, tn) = put(23, &nan, KvFormat::F16);
    // Corrupt (a flipped payload byte), and an intact entry under another key's name.
    let (kx, _) = put(24, &finite_kv(24, 16, 2, 32), KvFormat::F16);
    let mut raw = fs::read(store.path_for(&kx)).unwrap();
    let mid = raw.len() / 2;
    raw[mid] ^= 4;
    fs::write(store.path_for(&kx), &raw).unwrap();
    let (ky, _) = put(25, &finite_kv(25, 16, 2, 32), KvFormat::F16);
    let kz = DocKey::new(MODEL, TOK, &tokens(26, 16));
    fs::create_dir_all(store.path_for(&kz).parent().unwrap()).unwrap();
    fs::rename(store.path_for(&ky), store.path_for(&kz)).unwrap();
    // Distinct last uses, to see them kept.
    let keys = [&ka, &kb, &kc, &kn, &kx, &kz];
    for (i, k) in keys.iter().enumerate() {
        set_age(
            &store.path_for(k),
            Duration::from_secs(1000 * (i as u64 + 1)),
        );
    }
    let mtimes = |store: &DiskStore| -> Vec<SystemTime> {
        keys.iter()
            .map(|k| fs::metadata(store.path_for(k)).unwrap().modified().unwrap())
            .collect()
    };
    let before = mtimes(&store);
    let f16_bytes: u64 = [&ka, &kb]
        .iter()
        .map(|k| fs::metadata(store.path_for(k)).unwrap().len())
        .sum();
    let mut calls = Vec::new();
    let st = convert_store(&store, KvFormat::Q8, &mut |d, n| calls.push((d, n))).unwrap();
    assert_eq!(
        (st.converted, st.unchanged, st.kept_f16, st.skipped),
        (2, 1, 1, 2),
        "{st:?}"
    );
    assert_eq!(calls.last(), Some(&(6, 6)));
    assert_eq!(st.bytes_before, f16_bytes);
    let q8_bytes: u64 = [&ka, &kb]
        .iter()
        .map(|k| fs::metadata(store.path_for(k)).unwrap().len())
        .sum();
    assert_eq!(st.bytes_after, q8_bytes);
    assert!(q8_bytes * 100 < f16_bytes * 56, "{q8_bytes} of {f16_bytes}");
    assert_eq!(mtimes(&store), before, "last-use times changed");
    let formats: Vec<KvFormat> = store.entries().unwrap().iter().map(|e| e.format).collect();
    assert_eq!(
        formats.iter().filter(|f| **f == KvFormat::Q8).count(),
        3,
        "{formats:?}"
    );
    // The converted entries are what a q8 put of the same caches writes.
    let q8_of = |kv: &DocKv, t: &[u32]| {
        let bytes = encode_entry_as(MODEL, TOK, t, kv, KvFormat::Q8, 0).unwrap();
        hit(decode_entry(&bytes, MODEL, TOK, t))
    };
    let (ga, gb) = (
        hit(store.get(&ka, MODEL, TOK, &ta).unwrap()),
        hit(store.get(&kb, MODEL, TOK, &tb).unwrap()),
    );
    for (g, w) in [(&ga, q8_of(&a, &ta)), (&gb, q8_of(&b, &tb))] {
        assert_eq!((&g.k, &g.v), (&w.k, &w.v));
    }
    let gn = hit(store.get(&kn, MODEL, TOK, &tn).unwrap());
    assert_eq!((gn.k, gn.v), (nan.k.clone(), nan.v.clone()));
    // Back to f16: the dequantized values, bit for bit. The NaN, corrupt and misfiled
    // entries are f16 already: left alone, unread.
    let gc = hit(store.get(&kc, MODEL, TOK, &tc).unwrap());
    let before = mtimes(&store); // (a hit is a use)
    let st = convert_store(&store, KvFormat::F16, &mut |_, _| {}).unwrap();
    assert_eq!(
        (st.converted, st.unchanged, st.kept_f16, st.skipped),
        (3, 3, 0, 0),
        "{st:?}"
    );
    assert_eq!(mtimes(&store), before);
    for (k, t, want) in [(&ka, &ta, &ga), (&kb, &tb, &gb), (&kc, &tc, &gc)] {
        let raw = fs::read(store.path_for(k)).unwrap();
        assert_eq!(raw[4..8], CACHE_FORMAT_VERSION.to_le_bytes());
        let got = hit(store.get(k, MODEL, TOK, t).unwrap());
        assert_eq!((&got.k, &got.v), (&want.k, &want.v));
    }
}
