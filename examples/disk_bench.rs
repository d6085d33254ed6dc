//! Where the time of a document-cache disk hit goes: file read, checksum, host copies and
//! GPU upload, for a store of random K/V in the shape of a random model.
//!
//!     cargo run --release --example disk_bench -- [SHAPE] [DOCS] [DOC_LEN] [REPEATS]
//!
//! SHAPE is a `--random-model` shape (default llama-3.2-1b: 16.8 MB of K/V per 512-token
//! document). The store lives in a temp directory (page-cached, as in `kvlink bench ttft`)
//! and is deleted at the end. "engine" is the whole disk path as a request sees it
//! (`Engine::doc_caches` after the GPU-resident caches were dropped, until the uploads
//! have run on the GPU); the other lines time its parts on their own.

use kvlink::engine::CacheSource;
use kvlink::gpu::{AdapterChoice, Gpu, Tensor};
use kvlink::kv::store::{EntryHeader, PayloadSink};
use kvlink::kv::{checksum64, DiskStore, DocKv};
use kvlink::model::random::RandomModel;
use kvlink::model::WeightSource;
use kvlink::Engine;
use std::time::Instant;

fn par_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism()
        .map_or(4, |n| n.get())
        .min(16);
    let per = items.len().div_ceil(threads).max(1);
    std::thread::scope(|s| {
        let f = &f;
        let hs: Vec<_> = items
            .chunks(per)
            .map(|c| s.spawn(move || c.iter().map(f).collect::<Vec<_>>()))
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

/// Reads and verifies, keeps nothing: the store's own cost.
struct Discard;

impl PayloadSink for Discard {
    type Output = ();
    fn write(&mut self, _: usize, _: usize, _: &[u8]) {}
    fn finish(self) -> kvlink::Result<()> {
        Ok(())
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn time(repeats: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up
    median(
        (0..repeats)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect(),
    )
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let shape = args.get(1).map_or("llama-3.2-1b", |s| s.as_str());
    let n_docs: usize = args.get(2).map_or(Ok(10), |s| s.parse())?;
    let doc_len: usize = args.get(3).map_or(Ok(512), |s| s.parse())?;
    let repeats: usize = args.get(4).map_or(Ok(5), |s| s.parse())?;

    let src = RandomModel::new(shape, 1)?;
    let cfg = src.config().clone();
    let gpu = Gpu::new(&AdapterChoice::from_env())?;
    let t = Instant::now();
    let engine = Engine::load(gpu.clone(), &src, 256, &mut |_, _| {})?;
    eprintln!(
        "loaded {shape} in {:.1} s on {}",
        t.elapsed().as_secs_f64(),
        gpu.report.name
    );

    let dir = std::env::temp_dir().join(format!("kvlink-disk-bench-{}", std::process::id()));
    let store = DiskStore::open(&dir)?;
    let (n_layers, kv_dim) = (cfg.num_hidden_layers, cfg.kv_dim());
    let docs: Vec<Vec<u32>> = (0..n_docs)
        .map(|j| {
            (0..doc_len as u32)
                .map(|i| 1000 + (i * 7 + j as u32) % 5000)
                .collect()
        })
        .collect();
    for (j, d) in docs.iter().enumerate() {
        let mut kv = DocKv::zeros(doc_len, n_layers, kv_dim);
        let mut s = 0x9e37_79b9_7f4a_7c15u64 ^ j as u64;
        for l in kv.k.iter_mut().chain(kv.v.iter_mut()) {
            for w in l.chunks_exact_mut(8) {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                // Finite f16 values (exponent bits never all ones).
                w.copy_from_slice(&(s & 0x3bff_3bff_3bff_3bff).to_le_bytes());
            }
        }
        store.put(
            &engine.doc_key(d),
            engine.fingerprint(),
            engine.tokenizer_fingerprint(),
            d,
            &kv,
        )?;
    }
    let kv_bytes = (n_docs * doc_len * n_layers * kv_dim * 2 * 2) as f64;
    let paths: Vec<_> = docs
        .iter()
        .map(|d| store.path_for(&engine.doc_key(d)))
        .collect();
    println!(
        "{n_docs} docs x {doc_len} tokens of {shape} ({n_layers} layers, kv_dim {kv_dim}): {:.1} MB of K/V, {} threads",
        kv_bytes / 1e6,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let gbs = |ms: f64| kv_bytes / 1e6 / ms;
    let line = |what: &str, ms: f64| println!("  {what:<44} {ms:>8.2} ms {:>6.2} GB/s", gbs(ms));

    engine.set_store(Some(store.clone()));
    let refs: Vec<&[u32]> = docs.iter().map(|d| d.as_slice()).collect();
    // (whole, until doc_caches returned) per repeat, after one warm-up
    let runs: Vec<(f64, f64)> = (0..=repeats)
        .map(|_| {
            engine.clear_doc_caches();
            gpu.queue.submit([]);
            gpu.wait().unwrap();
            let t = Instant::now();
            let (_, from) = engine.doc_caches(&refs).unwrap();
            assert!(from.iter().all(|s| *s == CacheSource::Disk), "{from:?}");
            let returned = t.elapsed().as_secs_f64() * 1e3;
            gpu.queue.submit([]);
            gpu.wait().unwrap();
            (t.elapsed().as_secs_f64() * 1e3, returned)
        })
        .skip(1)
        .collect();
    let engine_ms = median(runs.iter().map(|r| r.0).collect());
    let returned_ms = median(runs.iter().map(|r| r.1).collect());
    engine.clear_doc_caches();
    engine.set_store(None);
    line("engine: doc_caches from disk, uploads done", engine_ms);
    line("  of which until doc_caches returned", returned_ms);

    let read = time(repeats, || {
        par_map(&paths, |p| std::fs::read(p).unwrap());
    });
    line("  read files into Vecs (threads)", read);
    let files = par_map(&paths, |p| std::fs::read(p).unwrap());
    let hash = time(repeats, || {
        par_map(&files, |b| checksum64(&b[..b.len() - 8]));
    });
    line("  xxh64 of the files (threads)", hash);
    let hash1 = time(repeats, || {
        checksum64(&files[0][..files[0].len() - 8]);
    });
    println!(
        "  {:<44} {hash1:>8.2} ms {:>6.2} GB/s",
        "  xxh64 of one file (one thread)",
        files[0].len() as f64 / 1e6 / hash1
    );
    drop(files);
    let get = |d: &Vec<u32>| {
        store
            .get(
                &engine.doc_key(d),
                engine.fingerprint(),
                engine.tokenizer_fingerprint(),
                d,
            )
            .unwrap()
            .into_hit()
            .unwrap()
    };
    let gets = time(repeats, || {
        par_map(&docs, get);
    });
    line("  DiskStore::get (threads)", gets);
    let verify = time(repeats, || {
        par_map(&docs, |d| {
            store
                .get_with(
                    &engine.doc_key(d),
                    engine.fingerprint(),
                    engine.tokenizer_fingerprint(),
                    d,
                    |_: &EntryHeader| Ok(Discard),
                    &mut kvlink::kv::store::ReadTimes::default(),
                )
                .unwrap()
                .into_hit()
                .unwrap()
        });
    });
    line("  DiskStore::get_with, sink discards (threads)", verify);
    let kvs: Vec<DocKv> = par_map(&docs, get);
    let shape2 = [doc_len, kv_dim];
    let upload = time(repeats, || {
        let t: Vec<Tensor> = kvs
            .iter()
            .flat_map(|kv| kv.k.iter().chain(&kv.v))
            .map(|b| Tensor::from_f16_bytes(&gpu, &shape2, b, "doc kv").unwrap())
            .collect();
        gpu.queue.submit([]);
        gpu.wait().unwrap();
        drop(t);
    });
    line("  upload DocKvs (create_buffer_init, serial)", upload);

    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
