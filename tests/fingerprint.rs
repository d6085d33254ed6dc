//! Model fingerprints cover every weight byte (a change anywhere gives another
//! fingerprint, so document caches of the two files are never mixed), and a file's hash
//! is remembered by path, size and mtime so it is computed once.

mod common;

use common::tempdir::tempdir;
use kvlink::model::convert::write_hf_folder;
use kvlink::model::hf::HfModel;
use kvlink::model::random::RandomModel;
use kvlink::model::{GgufModel, WeightSource};
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

fn set_mtime(p: &Path, ago: Duration) {
    fs::File::options()
        .write(true)
        .open(p)
        .unwrap()
        .set_modified(SystemTime::now() - ago)
        .unwrap();
}

fn flip(p: &Path, at: usize) {
    let mut b = fs::read(p).unwrap();
    b[at] ^= 0x10;
    fs::write(p, b).unwrap();
}

fn sidecars(dir: &Path) -> Vec<std::path::PathBuf> {
    fs::read_dir(dir)
        .map(|r| r.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// One test: it points KVLINK_CACHE (where hashes are remembered) at a temp dir.
#[test]
fn fingerprint_covers_every_byte_and_is_remembered() {
    let model = common::model::model_path();
    let cache = tempdir("fp-cache");
    std::env::set_var("KVLINK_CACHE", cache.path());
    let side = kvlink::model::fingerprint::sidecar_dir();
    assert!(side.starts_with(cache.path()));

    // GGUF: a copy of the test model, one weight byte changed between the sample points
    // an earlier fingerprint read (4096 chunks of 64 bytes, evenly spaced).
    let td = tempdir("fp-gguf");
    let p = td.path().join("m.gguf");
    fs::copy(&model, &p).unwrap();
    set_mtime(&p, Duration::from_secs(3600));
    let fp0 = GgufModel::open(&p).unwrap().fingerprint();
    assert_eq!(fp0.len(), 32);
    assert_eq!(sidecars(&side).len(), 1, "the hash is remembered");
    assert_eq!(GgufModel::open(&p).unwrap().fingerprint(), fp0);

    let data_offset = GgufModel::open(&p).unwrap().file().data_offset;
    let len = fs::metadata(&p).unwrap().len() as usize;
    let stride = (len - data_offset) / 4096;
    assert!(stride > 200);
    let at = data_offset + 1000 * stride + stride / 2;
    flip(&p, at);
    set_mtime(&p, Duration::from_secs(1800));
    let fp1 = GgufModel::open(&p).unwrap().fingerprint();
    assert_ne!(
        fp1, fp0,
        "a changed weight byte must change the fingerprint"
    );
    flip(&p, at);
    set_mtime(&p, Duration::from_secs(900));
    assert_eq!(GgufModel::open(&p).unwrap().fingerprint(), fp0);

    // The remembered hash is what is used while path, size and mtime match (here the
    // sidecar is doctored to prove it), and is not once the mtime moves.
    let sc = sidecars(&side).pop().unwrap();
    let text = fs::read_to_string(&sc).unwrap();
    assert!(text.contains(&fp0), "{text}");
    fs::write(&sc, text.replace(&fp0, &"ab".repeat(16))).unwrap();
    assert_eq!(GgufModel::open(&p).unwrap().fingerprint(), "ab".repeat(16));
    set_mtime(&p, Duration::from_secs(600));
    assert_eq!(GgufModel::open(&p).unwrap().fingerprint(), fp0);

    // A file modified just now is hashed but not remembered (its mtime may not move
    // on the next change within the same clock tick).
    let q = td.path().join("fresh.gguf");
    fs::copy(&model, &q).unwrap();
    let n = sidecars(&side).len();
    assert_eq!(GgufModel::open(&q).unwrap().fingerprint(), fp0);
    assert_eq!(sidecars(&side).len(), n);

    // HF folder: one byte in the middle of the weights.
    let hf = tempdir("fp-hf");
    let dir = hf.path().join("m");
    let src = RandomModel::new("tiny", 3).unwrap();
    write_hf_folder(&src, &dir, |_, _| {}).unwrap();
    let st = dir.join("model.safetensors");
    set_mtime(&st, Duration::from_secs(3600));
    let h0 = HfModel::open(&dir).unwrap().fingerprint();
    // Between the points an earlier fingerprint sampled: 1024 chunks of 64 bytes, evenly
    // spaced over the data after the safetensors header.
    let bytes = fs::read(&st).unwrap();
    let data_off = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let stride = (bytes.len() - data_off - 64) / 1023;
    assert!(
        stride > 200,
        "tiny model too small to test this: stride {stride}"
    );
    let at = data_off + 500 * stride + stride / 2;
    flip(&st, at);
    set_mtime(&st, Duration::from_secs(1800));
    let h1 = HfModel::open(&dir).unwrap().fingerprint();
    assert_ne!(h1, h0, "a changed weight byte must change the fingerprint");
}
