//! Batched decode (`link::batch::DecodeBatch`) on the real SmolLM2 model: requests that
//! join a shared arena at different steps, decode together and leave, produce exactly
//! the greedy tokens each produces alone (`Engine::ask`), including a request that
//! reuses the slots another left; the same when steps are pipelined (each fed on the GPU
//! by the step before, queued before that step's tokens are read), with a sequence that
//! leaves while a step of it is queued and another that joins into its slots; and the
//! batch refuses what it cannot do.

mod common;

use common::model::engine;
use kvlink::engine::StartOptions;
use kvlink::link::batch::{DecodeBatch, SeqId};
use kvlink::{GenerateParams, Mode, Request};

fn request(docs: &[&str], question: &str, mode: Mode) -> Request {
    let mut r = Request::new(docs.iter().map(|d| d.to_string()).collect(), question);
    r.mode = mode;
    r
}

fn params(n: usize) -> GenerateParams {
    GenerateParams {
        max_tokens: n,
        stop_at_eos: false,
        ..Default::default()
    }
}

/// The greedy tokens of `req` decoded alone.
fn alone(req: &Request, n: usize) -> Vec<u32> {
    let mut out = Vec::new();
    engine()
        .ask(req, &params(n), |t| {
            out.push(t);
            true
        })
        .expect("ask");
    out
}

struct Live {
    which: usize,
    id: SeqId,
    tokens: Vec<u32>,
}

#[test]
fn batched_greedy_decode_equals_decoding_alone() {
    let e = engine();
    let docs_a = [
        "Marie Curie was a physicist and chemist who discovered radium and polonium.",
        "The Eiffel Tower is in Paris and was finished in 1889.",
    ];
    let docs_c = [
        "The river Seine flows through Paris to the English Channel.",
        "Coffee was first roasted in the fifteenth century.",
        "A library in the mountain town lends books by train.",
    ];
    // (request, tokens to generate, step at which it joins)
    let reqs = [
        (
            request(&docs_a, "What did Marie Curie discover?", Mode::Kvlink),
            9,
            0,
        ),
        (request(&[], "Name three colours.", Mode::Full), 7, 2),
        (
            request(&docs_c, "Where does the Seine flow?", Mode::Kvlink),
            8,
            3,
        ),
        // The first request again, after it left: it takes the slots it gave back.
        (
            request(&docs_a, "What did Marie Curie discover?", Mode::Kvlink),
            9,
            10,
        ),
    ];
    let want: Vec<Vec<u32>> = reqs.iter().map(|(r, n, _)| alone(r, *n)).collect();
    assert_eq!(want[0], want[3]);

    // Prefill each alone (as the server does), then decode in the batch.
    let started: Vec<_> = reqs
        .iter()
        .map(|(r, n, _)| {
            let s = e.start_request(r, StartOptions::generate(*n, true));
            let s = s.expect("prefill");
            (s.plan, s.cache, s.out)
        })
        .collect();
    let room = |i: usize| started[i].0.len() + reqs[i].1;
    // Room for the first three at once, not for a fourth: the last one must reuse.
    let slots = room(0) + room(1) + room(2);
    let mut batch = DecodeBatch::new(e.model(), slots).expect("arena");
    let mut live: Vec<Live> = Vec::new();
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
    let mut waiting: Vec<usize> = (0..reqs.len()).collect();
    let mut step = 0;
    while !(waiting.is_empty() && live.is_empty()) {
        assert!(step < 100, "the batch stopped making progress");
        // Join whoever is due and fits.
        let mut still = Vec::new();
        for i in waiting {
            let (plan, cache, out) = &started[i];
            let id = if reqs[i].2 <= step {
                batch
                    .join(e.model(), cache, plan.len(), room(i))
                    .expect("join")
            } else {
                None
            };
            match id {
                Some(id) => {
                    let first = out.token.expect("greedy first token");
                    live.push(Live {
                        which: i,
                        id,
                        tokens: vec![first],
                    });
                }
                None => still.push(i),
            }
        }
        waiting = still;
        // Leave when done.
        live.retain(|l| {
            if l.tokens.len() < reqs[l.which].1 {
                return true;
            }
            got[l.which] = l.tokens.clone();
            assert!(batch.leave(l.id));
            false
        });
        if live.is_empty() {
            step += 1;
            continue;
        }
        let inputs: Vec<(SeqId, u32)> = live
            .iter()
            .map(|l| (l.id, *l.tokens.last().unwrap()))
            .collect();
        let out = batch.step(e.model(), &inputs, true).expect("step");
        assert_eq!(out.tokens.len(), live.len());
        for (l, t) in live.iter_mut().zip(out.tokens) {
            l.tokens.push(t);
        }
        step += 1;
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g, w,
            "request {i}: batched tokens differ from decoding alone"
        );
    }
}

/// Pipelined as the server runs it: a step is queued, fed on the GPU by the step before,
/// before that step's tokens are read. `b` ends while a step of it is queued and leaves;
/// `c` (the same request) joins into the slots it gave back, which drains the queued step
/// and restarts with tokens from the host. Every sequence's tokens equal its tokens alone.
#[test]
fn pipelined_batch_decode_equals_decoding_alone() {
    let e = engine();
    let m = e.model();
    let docs = [
        "Marie Curie was a physicist and chemist who discovered radium and polonium.",
        "The Eiffel Tower is in Paris and was finished in 1889.",
    ];
    let reqs = [
        (
            request(&docs, "What did Marie Curie discover?", Mode::Kvlink),
            12,
        ),
        (request(&[], "Name three colours.", Mode::Full), 5),
        (request(&[], "Name three colours.", Mode::Full), 5),
    ];
    let want: Vec<Vec<u32>> = reqs.iter().map(|(r, n)| alone(r, *n)).collect();
    let started: Vec<_> = reqs
        .iter()
        .map(|(r, n)| {
            let s = e.start_request(r, StartOptions::generate(*n, true));
            let s = s.expect("prefill");
            (s.plan, s.cache, s.out)
        })
        .collect();
    let room = |i: usize| started[i].0.len() + reqs[i].1;
    // Exactly room for two: c fits only into the slots b gave back.
    let mut batch = DecodeBatch::new(m, room(0) + room(1)).expect("arena");
    let join = |batch: &mut DecodeBatch, i: usize| {
        let (plan, cache, out) = &started[i];
        let id = batch.join(m, cache, plan.len(), room(i)).expect("join");
        Live {
            which: i,
            id: id.expect("room in the arena"),
            tokens: vec![out.token.expect("greedy first token")],
        }
    };
    let mut live = vec![join(&mut batch, 0), join(&mut batch, 1)];
    let mut pipe = batch.pipe(m).expect("pipe");
    let mut got: Vec<Vec<u32>> = vec![Vec::new(); reqs.len()];
    // The queued step whose tokens are unread, with its sequences in row order.
    let mut queued: Option<(kvlink::model::llama::PendingToken, Vec<SeqId>)> = None;
    let mut followed = 0;
    let mut c_joined = false;
    for _ in 0..100 {
        if live.is_empty() {
            break;
        }
        let ids: Vec<SeqId> = live.iter().map(|l| l.id).collect();
        let follow = queued.as_ref().is_some_and(|(_, q)| *q == ids)
            && ids.iter().all(|&id| batch.seq_room_left(id) > Some(0));
        if !follow {
            // Drain: read the queued step, then feed tokens from the host.
            if let Some((p, q)) = queued.take() {
                let tokens = m.read_tokens(p).expect("read");
                for (id, t) in q.iter().zip(tokens) {
                    if let Some(l) = live.iter_mut().find(|l| l.id == *id) {
                        l.tokens.push(t);
                    }
                }
            }
        } else {
            followed += 1;
        }
        let host: Vec<u32> = live.iter().map(|l| *l.tokens.last().unwrap()).collect();
        let tokens = (!follow).then_some(host.as_slice());
        let p = batch.step_async(m, &mut pipe, &ids, tokens).expect("step");
        // Read the older step, if one was queued before this one.
        if let Some((older, q)) = queued.replace((p, ids)) {
            let tokens = m.read_tokens(older).expect("read");
            for (id, t) in q.iter().zip(tokens) {
                if let Some(l) = live.iter_mut().find(|l| l.id == *id) {
                    l.tokens.push(t);
                }
            }
        }
        // Whoever has its tokens leaves, even with a step of it queued.
        live.retain_mut(|l| {
            if l.tokens.len() < reqs[l.which].1 {
                return true;
            }
            got[l.which] = std::mem::take(&mut l.tokens);
            assert!(batch.leave(l.id));
            false
        });
        if got[1].len() == reqs[1].1 && !c_joined {
            live.push(join(&mut batch, 2));
            c_joined = true;
        }
    }
    assert!(followed > 5, "too few steps fed on the GPU: {followed}");
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(
            g, w,
            "request {i}: pipelined tokens differ from decoding alone"
        );
    }
}

#[test]
fn batch_refuses_what_it_cannot_do() {
    let e = engine();
    let req = request(&[], "Hello", Mode::Full);
    let s = e.start_request(&req, StartOptions::generate(4, true));
    let (plan, cache) = s.map(|s| (s.plan, s.cache)).expect("prefill");
    let n = plan.len();
    let mut batch = DecodeBatch::new(e.model(), n + 2).expect("arena");
    // More room than the arena has: an error, not a wait.
    assert!(batch.join(e.model(), &cache, n, n + 3).is_err());
    // Fewer slots than filled, or more filled than the cache holds: errors.
    assert!(batch.join(e.model(), &cache, n, n - 1).is_err());
    assert!(batch.join(e.model(), &cache, n + 1, n + 2).is_err());
    let id = batch.join(e.model(), &cache, n, n + 2).unwrap().unwrap();
    // No room left for a second one now: None (wait), not an error.
    assert!(batch.join(e.model(), &cache, n, n).unwrap().is_none());
    assert!(batch.step(e.model(), &[], true).is_err());
    assert!(batch.step(e.model(), &[(id, 1), (id, 2)], true).is_err());
    batch.step(e.model(), &[(id, 1)], true).unwrap();
    let out = batch.step(e.model(), &[(id, 2)], false).unwrap();
    assert_eq!(out.logits.len(), e.config().vocab_size);
    // Both reserved slots are used: a third step is refused.
    assert!(batch.step(e.model(), &[(id, 3)], true).is_err());
    assert_eq!(batch.seq_room_left(id), Some(0));
    assert!(batch.leave(id));
    assert!(!batch.leave(id));
    assert!(batch.step(e.model(), &[(id, 3)], true).is_err());
    // Out-of-vocabulary tokens are refused like everywhere else.
    let id = batch.join(e.model(), &cache, n, n + 1).unwrap().unwrap();
    let vocab = e.config().input_vocab() as u32;
    assert!(batch.step(e.model(), &[(id, vocab)], true).is_err());
    // A pipelined step: the first needs its tokens, in the right number; a step that
    // takes its tokens from the GPU must be of the previous step's sequences.
    let mut pipe = batch.pipe(e.model()).unwrap();
    assert!(batch.step_async(e.model(), &mut pipe, &[id], None).is_err());
    assert!(batch
        .step_async(e.model(), &mut pipe, &[id], Some(&[1, 2]))
        .is_err());
    assert!(batch
        .step_async(e.model(), &mut pipe, &[id], Some(&[vocab]))
        .is_err());
    let p = batch
        .step_async(e.model(), &mut pipe, &[id], Some(&[1]))
        .unwrap();
    assert_eq!(e.model().read_tokens(p).unwrap().len(), 1);
    assert!(batch.leave(id));
    let other = batch.join(e.model(), &cache, n, n + 1).unwrap().unwrap();
    assert!(batch
        .step_async(e.model(), &mut pipe, &[other], None)
        .is_err());
}
