//! The KVLink invariant (KVLINK.md §3) on the real SmolLM2 model: reusing document
//! caches (encode alone, rotate, concatenate, prefill the seg-0 tokens) gives the same
//! logits as one forward pass over the whole prompt with the §2 mask; with one document
//! after an empty prefix both equal a plain causal prefill; without the rotation
//! (`naive`) they measurably differ.

mod common;

use common::model::{engine, source};
use common::reference::RefModel;
use common::Rng;
use kvlink::{Mode, Request};

const WORDS: &[&str] = &[
    "river",
    "castle",
    "engine",
    "winter",
    "Paris",
    "seven",
    "orange",
    "the",
    "a",
    "blue",
    "library",
    "mountain",
    "quickly",
    "because",
    "Marie",
    "Curie",
    "discovered",
    "radium",
    "in",
    "1898",
    "and",
    "won",
    "two",
    "Nobel",
    "prizes",
    "city",
    "of",
    "light",
    "bridge",
    "train",
    "station",
    "north",
    "garden",
    "coffee",
    "museum",
    "history",
    ".",
    ",",
];

fn text(rng: &mut Rng, n: usize) -> String {
    (0..n)
        .map(|_| WORDS[rng.below(WORDS.len() as u32) as usize])
        .collect::<Vec<_>>()
        .join(" ")
}

use common::top10_diff as diff;

fn logits(req: &Request, mode: Mode) -> (kvlink::PromptPlan, Vec<f32>) {
    let mut r = req.clone();
    r.mode = mode;
    let (plan, lg, _) = engine().request_logits(&r).unwrap();
    (plan, lg)
}

#[test]
fn reuse_equals_masked_forward_and_cpu_reference() {
    let mut rng = Rng::new();
    let docs: Vec<String> = (0..3)
        .map(|_| {
            let n = 20 + rng.below(25) as usize;
            format!("{}\n", text(&mut rng, n))
        })
        .collect();
    let mut req = Request::new(docs, format!("Question: {}?", text(&mut rng, 6)));
    req.system = Some("Answer from the documents.".into());
    engine().clear_doc_caches();
    let (plan, kv) = logits(&req, Mode::Kvlink);
    let (plan2, masked) = logits(&req, Mode::Masked);
    assert_eq!(plan, plan2);
    assert!(plan.prefix_len > 0 && plan.docs.len() == 3);
    let (d, same) = diff(&kv, &masked);
    eprintln!("kvlink vs masked: max |dlogprob| top-10 = {d:.4}");
    assert!(
        same && d < common::LOGPROB_TOL,
        "kvlink vs masked: {d}, same argmax: {same}"
    );

    // the masked pass itself against the independent CPU reference with the §2 mask
    let r = RefModel::load(source().as_ref());
    let want = &r.forward(&plan.tokens, &plan.positions, &plan.segments, true)[0];
    let (d, same) = diff(&masked, want);
    eprintln!("masked vs CPU reference: {d:.4}");
    assert!(
        same && d < common::LOGPROB_TOL,
        "masked vs reference: {d}, same argmax: {same}"
    );

    // warm caches give the same answer as cold ones
    let (_, kv2) = logits(&req, Mode::Kvlink);
    assert!(diff(&kv2, &kv).0 < 1e-4);

    // naive reuse (no rotation) differs measurably
    let (_, naive) = logits(&req, Mode::Naive);
    let (dn, _) = diff(&naive, &masked);
    eprintln!("naive vs masked: {dn:.4}");
    assert!(
        dn > 0.2,
        "naive should differ from the masked pass, differs by {dn}"
    );
}

#[test]
fn one_document_after_empty_prefix_equals_causal_prefill() {
    let mut rng = Rng::new();
    let doc = text(&mut rng, 30);
    let mut req = Request::new(vec![doc], format!(" {}", text(&mut rng, 5)));
    req.raw = true;
    let (plan, kv) = logits(&req, Mode::Kvlink);
    assert_eq!(plan.docs[0].start, plan.prefix_len);
    let (_, masked) = logits(&req, Mode::Masked);
    let (_, full) = logits(&req, Mode::Full);
    for (name, other) in [("masked", &masked), ("full", &full)] {
        let (d, same) = diff(&kv, other);
        eprintln!("kvlink vs {name}: {d:.4}");
        assert!(same && d < common::LOGPROB_TOL, "kvlink vs {name}: {d}");
    }
}

#[test]
fn bad_requests_are_refused() {
    let e = engine();
    let empty = Request::new(vec!["  ".into()], "q?");
    assert!(e.plan(&empty).unwrap_err().to_string().contains("empty"));
    let no_q = Request::new(vec!["doc".into()], " ");
    assert!(e.plan(&no_q).is_err());
    let long = Request::new(vec!["word ".repeat(e.context() + 10)], "q?");
    assert!(e.plan(&long).unwrap_err().to_string().contains("context"));
    let many = Request::new(vec!["some words here ".repeat(40); 200], "q?");
    assert!(e.plan(&many).unwrap_err().to_string().contains("context"));
}

#[test]
fn document_caches_persist_on_disk_and_corrupt_entries_are_recomputed() {
    let e = engine();
    let mut rng = Rng::new();
    let dir = common::tempdir::tempdir("store"); // removed even when an assert fails
    let store = kvlink::kv::DiskStore::open(dir.path()).unwrap();
    e.set_store(Some(store.clone()));
    let docs: Vec<String> = (0..2)
        .map(|_| format!("{}\n", text(&mut rng, 15)))
        .collect();
    let mut req = Request::new(docs, "Which words repeat?");
    req.raw = true; // no prefix: the store then holds exactly the two documents
    e.clear_doc_caches();
    let (_, cold, t1) = e.request_logits(&req).unwrap();
    assert_eq!((t1.computed_docs, t1.cached_docs), (2, 0));
    // (other tests share the engine, and so this store while it is set: look only at
    // this test's own entries)
    let plan = e.plan(&req).unwrap();
    let keys: Vec<_> = (0..2).map(|j| e.doc_key(plan.doc_tokens(j))).collect();
    assert!(
        keys.iter().all(|k| store.contains(k)),
        "documents not stored"
    );
    // a new process would start with an empty GPU cache: drop it and read from disk
    e.clear_doc_caches();
    let (_, warm, t2) = e.request_logits(&req).unwrap();
    assert_eq!((t2.disk_docs, t2.computed_docs), (2, 0));
    // read straight into the pool's rows, as computed caches are
    for j in 0..2 {
        // (Gpu, or Disk again if a test beside this one cleared the shared engine's caches)
        let (dc, _) = e.precompute_from(plan.doc_tokens(j)).unwrap();
        assert!(dc.slab().is_some(), "document {j} from disk is not pooled");
    }
    assert!(
        diff(&warm, &cold).0 < 1e-5,
        "caches from disk changed the logits"
    );
    // flip a payload byte of one entry: detected, moved aside, recomputed
    let victim = store.path_for(&keys[0]);
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&victim, &bytes).unwrap();
    e.clear_doc_caches();
    let (_, again, t3) = e.request_logits(&req).unwrap();
    assert_eq!((t3.disk_docs, t3.computed_docs), (1, 1));
    // The recomputed document was encoded alone, the original together with the other
    // one: on GPU kernels the GEMM's summation order depends on how many rows a batch
    // has (skinny / split-K kernels), so its f16 K/V may differ in the last bit.
    let d = diff(&again, &cold).0;
    assert!(d < 2e-3, "recomputed cache changed the logits by {d}");
    e.set_store(None);
}

#[test]
fn attention_mass_capture_matches_cpu_reference() {
    // A small random model: the capture is about plumbing and arithmetic, not quality.
    let src = kvlink::model::random::RandomModel::new("tiny", 3).unwrap();
    let e = kvlink::Engine::load(common::gpu().clone(), &src, 512, &mut |_, _| {}).unwrap();
    let mut rng = Rng::new();
    let docs: Vec<String> = (0..3).map(|_| text(&mut rng, 8)).collect();
    let mut req = Request::new(docs, "which?");
    req.system = Some("sys".into());
    req.mode = Mode::Masked;
    let params = kvlink::GenerateParams {
        max_tokens: 3,
        stop_at_eos: false,
        ..Default::default()
    };
    let (_, cap) = e.ask_with_attention(&req, &params, |_| true).unwrap();
    assert_eq!(cap.tokens.len(), 3);
    assert_eq!(cap.groups.len(), 3 + 4);
    let g = cap.groups.len();
    for row in cap.mass.chunks(g) {
        let s: f32 = row.iter().sum();
        assert!((s - 1.0).abs() < 1e-3, "a row sums to {s}");
    }
    // first generated token: its query is the prompt's last row
    let plan = e.plan(&req).unwrap();
    let (groups, _) = plan.groups();
    let r = RefModel::load(&src);
    let attn = r.last_row_attention(&plan.tokens, &plan.positions, &plan.segments);
    for (l, heads) in attn.iter().enumerate() {
        for (h, w) in heads.iter().enumerate() {
            let mut want = vec![0.0f32; g];
            for (s, x) in w.iter().enumerate() {
                want[groups[s] as usize] += x;
            }
            for (k, wk) in want.iter().enumerate() {
                let got = cap.at(0, l, h, k);
                assert!(
                    (got - wk).abs() < 2e-3,
                    "layer {l} head {h} group {k}: {got} vs {wk}"
                );
            }
        }
    }
}

/// Pooled staging uploads (the disk-hit path): written in pieces, padded to whole words,
/// and the staging buffers reused across uploads without mixing up their contents; an
/// upload dropped unfinished (a corrupt entry) leaves the pool usable.
#[test]
fn staged_uploads_round_trip_and_reuse_staging() {
    let g = common::gpu();
    let mut rng = Rng::new();
    for round in 0..4 {
        // [3, 3] f16: 18 bytes per tensor, padded to 20 on the GPU.
        let (n, shape) = (5, [3usize, 3]);
        let bytes = 18;
        let want: Vec<Vec<u8>> = (0..n)
            .map(|_| (0..bytes).map(|_| rng.next_u64() as u8).collect())
            .collect();
        if round == 1 {
            let mut dropped = g.upload_f16(n, &shape, "test").unwrap();
            dropped.write(0, 0, &want[0]);
        }
        let mut up = g.upload_f16(n, &shape, "test").unwrap();
        for (i, w) in want.iter().enumerate().rev() {
            up.write(i, 0, &w[..7]);
            up.write(i, 7, &w[7..]);
        }
        let tensors = up.finish();
        g.wait().unwrap();
        for (t, w) in tensors.iter().zip(&want) {
            let words = g.read_words(t).unwrap();
            let got: &[u8] = bytemuck::cast_slice(&words);
            assert_eq!(&got[..bytes], &w[..], "round {round}");
            assert_eq!(&got[bytes..], &[0, 0], "round {round}: padding");
        }
    }
    // into rows of larger buffers: only those bytes change
    let big: Vec<kvlink::gpu::Tensor> = (0..2)
        .map(|_| kvlink::gpu::Tensor::from_u32(g, &[16], &[0xdead_beef; 16], "rows").unwrap())
        .collect();
    let want: Vec<Vec<u8>> = (0..2)
        .map(|_| (0..12).map(|_| rng.next_u64() as u8).collect())
        .collect();
    let dests = vec![(big[0].clone(), 8), (big[1].clone(), 48)];
    let mut up = g.upload_into(dests, 12, "rows").unwrap();
    for (i, w) in want.iter().enumerate() {
        up.write(i, 0, w);
    }
    up.finish();
    for (t, (w, off)) in big.iter().zip(want.iter().zip([8usize, 48])) {
        let words = g.read_words(t).unwrap();
        let got: &[u8] = bytemuck::cast_slice(&words);
        assert_eq!(&got[off..off + 12], &w[..]);
        let rest: Vec<u8> = got[..off].iter().chain(&got[off + 12..]).copied().collect();
        assert!(
            rest.chunks(4).all(|c| c == 0xdead_beefu32.to_le_bytes()),
            "bytes outside changed"
        );
    }
    // not whole words, or past the end: refused
    assert!(g.upload_into(vec![(big[0].clone(), 2)], 12, "x").is_err());
    assert!(g.upload_into(vec![(big[0].clone(), 0)], 10, "x").is_err());
    assert!(g.upload_into(vec![(big[0].clone(), 56)], 12, "x").is_err());
}

#[test]
fn pooled_caches_in_several_slabs_assemble_like_own_buffers() {
    use kvlink::link::{assemble_and_prefill, encode_documents, DocCache, DocPool};
    use kvlink::model::llama::Logits;
    let e = engine();
    let m = &e.model();
    let mut rng = Rng::new();
    let docs: Vec<String> = (0..4)
        .map(|_| {
            let n = 10 + rng.below(20) as usize;
            format!("{}\n", text(&mut rng, n))
        })
        .collect();
    let mut req = Request::new(docs, format!("Question: {}?", text(&mut rng, 5)));
    req.system = Some("Answer from the documents.".into());
    let plan = e.plan(&req).unwrap();
    let toks: Vec<&[u32]> = (0..plan.docs.len()).map(|j| plan.doc_tokens(j)).collect();
    let prefix = &plan.tokens[..plan.prefix_len];
    assert!(!prefix.is_empty());
    let own = encode_documents(m, &toks, 512, None).unwrap();
    let own_prefix = encode_documents(m, &[prefix], 512, None).unwrap().remove(0);
    assert!(own.iter().all(|d| d.slab().is_none()));

    // slabs as small as the longest document: the documents spread over several
    let longest = toks.iter().map(|t| t.len()).max().unwrap();
    let (layers, kvd) = (e.config().num_hidden_layers, e.config().kv_dim());
    let pool = DocPool::new(e.gpu().clone(), layers, kvd, 1 << 30).with_first_slab_rows(longest);
    let mut pooled = encode_documents(m, &toks, 512, Some(&pool)).unwrap();
    assert!(pooled.iter().all(|d| d.slab().is_some()));
    assert!(pool.slabs() >= 2, "{} slabs", pool.slabs());
    // the rows read back are the document's, byte for byte
    for (a, b) in pooled.iter().zip(&own) {
        assert!(a.download(e.gpu()).unwrap() == b.download(e.gpu()).unwrap());
    }
    // mixed: the prefix moved into the pool, one document left in its own buffers
    let pooled_prefix = encode_documents(m, &[prefix], 512, None)
        .unwrap()
        .remove(0)
        .into_pool(&pool)
        .unwrap();
    assert!(pooled_prefix.slab().is_some());
    // (encoded in the same batch as `own`: alone, the GEMMs would sum in another order)
    pooled[1] = encode_documents(m, &toks, 512, None).unwrap().remove(1);
    let run = |prefix: &DocCache, docs: &[DocCache], mode: Mode| {
        let refs: Vec<&DocCache> = docs.iter().collect();
        let (_, out, _, _) = assemble_and_prefill(
            m,
            &plan,
            Some(prefix),
            &refs,
            mode,
            0,
            512,
            Logits::Last,
            false,
        )
        .unwrap();
        out.logits
    };
    for mode in [Mode::Kvlink, Mode::Naive] {
        let want = run(&own_prefix, &own, mode);
        let got = run(&pooled_prefix, &pooled, mode);
        let (d, same) = diff(&got, &want);
        eprintln!("{mode}: pooled vs own buffers: {d:.2e}");
        assert!(
            same && d < 1e-5,
            "{mode}: pooled vs own buffers differ by {d}"
        );
    }

    // no budget: nothing is pooled; dropping the documents frees their slabs
    let none = DocPool::new(e.gpu().clone(), layers, kvd, 0);
    assert!(encode_documents(m, &toks, 512, Some(&none)).unwrap()[0]
        .slab()
        .is_none());
    assert_eq!(none.slabs(), 0);
    drop((pooled, pooled_prefix));
    pool.trim();
    assert_eq!((pool.slabs(), pool.bytes()), (0, 0));
}
