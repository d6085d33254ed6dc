//! `kvlink serve` over loopback: the OpenAI-shaped endpoints, documents, errors,
//! metrics, cancellation, the queue limit and a short load test. One server with the
//! real model (SmolLM2-135M) for the whole binary; a tiny random model for the
//! cancellation and queue tests.

mod common;

use common::tempdir::{tempdir, TempDir};
use kvlink::server::{Server, ServerConfig};
use kvlink::Engine;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const CTX: usize = 2048;

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(Duration::from_secs(300)))
        .build()
        .into()
}

/// The real-model server (started once; its store lives in a temp dir).
fn server() -> &'static str {
    // A static is never dropped: its store goes under the build's temp dir (emptied
    // here), not the system's, so that runs leave nothing behind in /tmp.
    static S: OnceLock<(String, Server, std::path::PathBuf)> = OnceLock::new();
    &S.get_or_init(|| {
        let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("serve-store");
        let _ = std::fs::remove_dir_all(&dir);
        let engine = Engine::load(
            common::gpu().clone(),
            common::model::source().as_ref(),
            CTX,
            &mut |_, _| {},
        )
        .expect("load engine");
        engine.set_store(Some(kvlink::kv::DiskStore::open(&dir).unwrap()));
        let cfg = ServerConfig {
            max_body_bytes: 64 << 10,
            ..Default::default()
        };
        let s = Server::start(engine, cfg, "127.0.0.1:0").expect("start server");
        (format!("http://{}", s.addr), s, dir)
    })
    .0
}

/// POST JSON (or raw bytes); (status, body as JSON, or Null if it is not JSON).
fn post_raw(base: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let mut r = agent()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .send(&body[..])
        .expect("request");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn post(base: &str, path: &str, v: &Value) -> (u16, Value) {
    post_raw(base, path, v.to_string().into_bytes())
}

/// POST a streaming request (200 expected) and hand every server-sent event to `each`
/// until `[DONE]`; whether `[DONE]` came.
fn post_stream(base: &str, path: &str, body: &Value, mut each: impl FnMut(Value)) -> bool {
    let r = agent()
        .post(format!("{base}{path}"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("request");
    assert_eq!(r.status().as_u16(), 200);
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let line = line.unwrap();
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            return true;
        }
        each(serde_json::from_str(data).unwrap());
    }
    false
}

fn get(base: &str, path: &str) -> (u16, String) {
    let mut r = agent()
        .get(format!("{base}{path}"))
        .call()
        .expect("request");
    (
        r.status().as_u16(),
        r.body_mut().read_to_string().unwrap_or_default(),
    )
}

fn delete(base: &str, path: &str) -> u16 {
    agent()
        .delete(format!("{base}{path}"))
        .call()
        .expect("request")
        .status()
        .as_u16()
}

fn register(base: &str, text: &str) -> String {
    let (s, v) = post(base, "/v1/documents", &json!({"text": text, "title": "t"}));
    assert!(s == 200 || s == 201, "register: {s} {v}");
    v["id"].as_str().unwrap().to_string()
}

const DOC_A: &str = "The Zorblax lighthouse stands on Kelp Island. Its keeper, Mira Vance, \
                     paints the tower green every spring.";
const DOC_B: &str = "Kelp Island has one bakery, run by Tomas Reyes, famous for seaweed bread.";
const QUESTION: &str = "What color is the Zorblax lighthouse painted?";

fn assert_error(status: u16, v: &Value, want_status: u16, what: &str) {
    assert_eq!(status, want_status, "{what}: {v}");
    let e = &v["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {v}"
    );
    assert!(e["type"].is_string(), "{what}: {v}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{what}: {v}"
    );
}

/// Greedy answers over registered documents equal `kvlink ask`'s for the same files and
/// question; streaming gives the same text; registration is idempotent.
#[test]
fn greedy_chat_matches_kvlink_ask() {
    let base = server();
    let (s1, a1) = post(base, "/v1/documents", &json!({"text": DOC_A}));
    let (s2, a2) = post(
        base,
        "/v1/documents",
        &json!({"text": DOC_A, "title": "again"}),
    );
    assert!(s1 == 201 || s1 == 200, "{s1} {a1}");
    assert_eq!(s2, 200, "a second registration is not new: {a2}");
    assert_eq!(a1["id"], a2["id"]);
    let b = register(base, DOC_B);
    let ids = json!([a1["id"], b]);

    let body = json!({
        "messages": [{"role": "user", "content": QUESTION}],
        "documents": ids, "max_tokens": 16, "temperature": 0,
    });
    let (s, v) = post(base, "/v1/chat/completions", &body);
    assert_eq!(s, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let usage = &v["usage"];
    let ct = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=16).contains(&ct), "{v}");
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        usage["prompt_tokens"].as_u64().unwrap() + ct
    );
    // Registered documents are on the GPU already.
    assert_eq!(v["kvlink"]["cache_hits"]["gpu"], 2, "{v}");
    assert!(v["kvlink"]["ttft_ms"].as_f64().unwrap() > 0.0);

    // The same through `kvlink ask` (its own process, no store).
    let dir = tempdir("serve-ask");
    let (fa, fb) = (dir.path().join("a.txt"), dir.path().join("b.txt"));
    std::fs::write(&fa, DOC_A).unwrap();
    std::fs::write(&fb, DOC_B).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvlink"))
        .args([
            "ask",
            "--no-store",
            "--json",
            "--ctx",
            &CTX.to_string(),
            "-n",
            "16",
        ])
        .arg("--model")
        .arg(common::model::model_path())
        .arg("--doc")
        .arg(&fa)
        .arg("--doc")
        .arg(&fb)
        .args(["-q", QUESTION])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ask: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        answer,
        ask["answer"].as_str().unwrap(),
        "server vs kvlink ask"
    );
    assert!(!answer.trim().is_empty());

    // Streaming: the deltas add up to the same text, then [DONE].
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    let mut text = String::new();
    let mut last = Value::Null;
    let done = post_stream(base, "/v1/chat/completions", &stream_body, |v| {
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        last = v;
    });
    assert!(done, "no [DONE]");
    assert_eq!(text, answer, "streamed vs whole");
    assert!(last["choices"][0]["finish_reason"].is_string(), "{last}");
    assert_eq!(last["usage"]["completion_tokens"], ct);

    // /v1/completions: the raw prompt, same shapes.
    let (s, v) = post(
        base,
        "/v1/completions",
        &json!({"prompt": "The capital of France is", "max_tokens": 4, "documents": [b]}),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());

    // A stop sequence cuts the text before it.
    if let Some(word) = answer.split_whitespace().nth(1) {
        let mut b2 = body.clone();
        b2["stop"] = json!(word);
        let (s, v) = post(base, "/v1/chat/completions", &b2);
        assert_eq!(s, 200, "{v}");
        let t = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(
            !t.contains(word) && answer.starts_with(t),
            "{t:?} vs {answer:?}"
        );
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }
}

#[test]
fn documents_register_list_get_delete() {
    let base = server();
    let text = "Doc for the CRUD test: the river Qell flows north.";
    let id = register(base, text);
    let (s, list) = get(base, "/v1/documents");
    assert_eq!(s, 200);
    let list: Value = serde_json::from_str(&list).unwrap();
    assert!(list["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|d| d["id"] == id.as_str()));
    let (s, d) = get(base, &format!("/v1/documents/{id}"));
    assert_eq!(s, 200);
    let d: Value = serde_json::from_str(&d).unwrap();
    assert_eq!(d["text"].as_str().unwrap().trim_end(), text);
    assert!(d["tokens"].as_u64().unwrap() > 5);
    assert_eq!(delete(base, &format!("/v1/documents/{id}")), 200);
    assert_eq!(get(base, &format!("/v1/documents/{id}")).0, 404);
    assert_eq!(delete(base, &format!("/v1/documents/{id}")), 404);
    let (s, v) = post(
        base,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Where?"}], "documents": [id]}),
    );
    assert_error(s, &v, 400, "deleted document");
    assert_eq!(v["error"]["code"], "document_not_found");
}

/// Bad input: a 4xx with an OpenAI-style error each time, and the server goes on
/// serving with its documents intact.
#[test]
fn bad_input_gets_openai_errors() {
    let base = server();
    let keep = register(
        base,
        "A document that must survive bad requests: owls hoot.",
    );
    let chat = "/v1/chat/completions";
    let user = json!([{"role": "user", "content": "Hi"}]);

    let (s, v) = post_raw(base, chat, b"{\"messages\": [".to_vec());
    assert_error(s, &v, 400, "malformed JSON");
    let (s, v) = post(base, chat, &json!({"messages": user, "max_tokens": "many"}));
    assert_error(s, &v, 400, "wrong type");
    assert_eq!(v["error"]["param"], "max_tokens");
    let (s, v) = post(base, chat, &json!({"messages": "hello"}));
    assert_error(s, &v, 400, "messages not a list");
    let (s, v) = post(base, chat, &json!({"messages": []}));
    assert_error(s, &v, 400, "no messages");
    let (s, v) = post(base, chat, &json!({"messages": user, "temperature": -1}));
    assert_error(s, &v, 400, "negative temperature");
    let (s, v) = post(
        base,
        chat,
        &json!({"messages": user, "kvlink_mode": "fast"}),
    );
    assert_error(s, &v, 400, "unknown mode");
    let (s, v) = post(
        base,
        chat,
        &json!({"messages": user, "documents": ["nope"]}),
    );
    assert_error(s, &v, 400, "unknown document");
    assert_eq!(v["error"]["param"], "documents[0]");
    let many: Vec<String> = (0..17).map(|_| keep.clone()).collect();
    let (s, v) = post(base, chat, &json!({"messages": user, "documents": many}));
    assert_error(s, &v, 400, "too many documents");
    let long = "lorem ipsum dolor ".repeat(1200);
    let (s, v) = post(
        base,
        chat,
        &json!({"messages": [{"role": "user", "content": long}]}),
    );
    assert_error(s, &v, 400, "prompt over the context");
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (s, v) = post(base, "/v1/documents", &json!({"text": long}));
    assert_error(s, &v, 400, "document over the context");
    let (s, v) = post(base, "/v1/documents", &json!({"text": "  "}));
    assert_error(s, &v, 400, "empty document");
    let (s, v) = post_raw(base, "/v1/documents", vec![b' '; 100 << 10]);
    assert_error(s, &v, 413, "oversize body");
    let (s, v) = post(base, "/v1/nothing", &json!({}));
    assert_error(s, &v, 404, "unknown route");

    // Still serving, the document still there and usable.
    assert_eq!(get(base, "/health").0, 200);
    assert_eq!(get(base, &format!("/v1/documents/{keep}")).0, 200);
    let (s, v) = post(
        base,
        chat,
        &json!({"messages": [{"role": "user", "content": "What do owls do?"}],
                "documents": [keep], "max_tokens": 4}),
    );
    assert_eq!(s, 200, "{v}");
}

#[test]
fn health_and_metrics() {
    let base = server();
    let (s, h) = get(base, "/health");
    assert_eq!(s, 200);
    assert_eq!(serde_json::from_str::<Value>(&h).unwrap()["status"], "ok");
    let id = register(base, "Metrics doc: the moon of Varn is blue.");
    let (s, v) = post(
        base,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "Color?"}], "documents": [id], "max_tokens": 3}),
    );
    assert_eq!(s, 200, "{v}");
    let (s, m) = get(base, "/metrics");
    assert_eq!(s, 200);
    for want in [
        "kvlink_requests_total{route=\"/v1/chat/completions\",status=\"200\"}",
        "kvlink_ttft_seconds_bucket{le=\"+Inf\"}",
        "kvlink_decode_seconds_per_token_count",
        "kvlink_doc_cache_total{tier=\"gpu\"}",
        "kvlink_doc_cache_total{tier=\"disk\"}",
        "kvlink_queue_depth",
        "kvlink_gpu_doc_cache_bytes",
    ] {
        assert!(m.contains(want), "missing {want} in\n{m}");
    }
    let bytes: f64 = metric(&m, "kvlink_gpu_doc_cache_bytes").unwrap();
    assert!(bytes > 0.0);
    // the resident caches live in the pool: at least their bytes, in at least one slab
    let pool: f64 = metric(&m, "kvlink_gpu_pool_bytes").unwrap();
    assert!(pool >= bytes, "pool {pool} < resident {bytes}");
    assert!(metric(&m, "kvlink_gpu_pool_slabs").unwrap() >= 1.0);
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A client that goes away stops its generation; beyond --max-queue requests get 503.
#[test]
fn disconnect_cancels_and_full_queue_refuses() {
    let src = kvlink::model::random::RandomModel::new("tiny", 3).unwrap();
    let engine = Engine::load(common::gpu().clone(), &src, 2048, &mut |_, _| {}).unwrap();
    let cfg = ServerConfig {
        max_queue: 1,
        ..Default::default()
    };
    let s = Server::start(engine, cfg, "127.0.0.1:0").unwrap();
    let base = format!("http://{}", s.addr);
    let long = json!({"prompt": "a b c", "max_tokens": 2000, "ignore_eos": true, "stream": true});
    let r = agent()
        .post(format!("{base}/v1/completions"))
        .header("content-type", "application/json")
        .send(long.to_string())
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let mut lines = BufReader::new(r.into_body().into_reader()).lines();
    // The first text chunk: the generation is running.
    loop {
        let l = lines.next().unwrap().unwrap();
        if l.starts_with("data: ") {
            break;
        }
    }
    let (st, v) = post(
        &base,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2}),
    );
    assert_error(st, &v, 503, "queue full");
    assert_eq!(v["error"]["code"], "queue_full");
    drop(lines); // the client goes away
    let t0 = Instant::now();
    loop {
        let m = get(&base, "/metrics").1;
        if metric(&m, "kvlink_cancelled_total") == Some(1.0)
            && metric(&m, "kvlink_queue_depth") == Some(0.0)
        {
            let n = metric(&m, "kvlink_generated_tokens_total").unwrap();
            assert!(n < 1500.0, "the generation ran to the end ({n} tokens)");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "not cancelled:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Serving again.
    let (st, v) = post(
        &base,
        "/v1/completions",
        &json!({"prompt": "x", "max_tokens": 2}),
    );
    assert_eq!(st, 200, "{v}");

    // A client waiting for a whole (not streamed) answer goes away too.
    let body = json!({"prompt": "a b c", "max_tokens": 2000, "ignore_eos": true}).to_string();
    let mut c = std::net::TcpStream::connect(s.addr).unwrap();
    write!(
        c,
        "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let t0 = Instant::now();
    while metric(&get(&base, "/metrics").1, "kvlink_queue_depth") != Some(1.0) {
        if t0.elapsed() > Duration::from_secs(60) {
            c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut got = vec![0; 4096];
            let n = std::io::Read::read(&mut c, &mut got).unwrap_or(0);
            panic!(
                "the request never started; it got: {:?}\nmetrics:\n{}",
                String::from_utf8_lossy(&got[..n]),
                get(&base, "/metrics").1
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(c);
    loop {
        let m = get(&base, "/metrics").1;
        if metric(&m, "kvlink_cancelled_total") == Some(2.0)
            && metric(&m, "kvlink_queue_depth") == Some(0.0)
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "not cancelled:\n{m}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Multi-turn chat: the whole conversation goes through the chat template (every
/// message's text as data), the documents before the last user message as `kvlink ask`
/// places them; the model sees the earlier turns.
#[test]
fn multi_turn_chat() {
    use kvlink::model::ChatMessage;
    let base = server();
    let id = register(base, DOC_A);
    let system = "You are a helpful assistant.";
    let turns = [
        ("user", "My name is Zed. Please remember my name."),
        (
            "assistant",
            "Nice to meet you, Zed! I will remember your name.",
        ),
    ];
    let mut messages = vec![json!({"role": "system", "content": system})];
    messages.extend(turns.iter().map(|(r, c)| json!({"role": r, "content": c})));
    messages.push(json!({"role": "user", "content": QUESTION}));
    let (s, v) = post(
        base,
        "/v1/chat/completions",
        &json!({"messages": messages, "documents": [id], "max_tokens": 12}),
    );
    assert_eq!(s, 200, "{v}");

    // The prompt is the engine's layout of the conversation: the earlier turns in the
    // head, before the document; the question after it.
    let tok = common::model::source().tokenizer().unwrap();
    let req = kvlink::Request {
        system: Some(system.into()),
        history: turns
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect(),
        ..kvlink::Request::new(vec![format!("{}\n", DOC_A)], QUESTION)
    };
    let (head, docs, tail) = kvlink::engine::tokenize_request(&tok, &req).unwrap();
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        head.len() + docs[0].len() + tail.len(),
        "{v}"
    );
    let head = tok.decode(&head).unwrap();
    assert!(
        head.contains(turns[0].1) && head.contains(turns[1].1) && head.contains(system),
        "{head:?}"
    );
    assert!(!head.contains(QUESTION) && tok.decode(&tail).unwrap().contains(QUESTION));
    // A conversation's head is prefilled, not cached like a document's.
    assert_eq!(v["kvlink"]["cache_hits"]["prefix"], false, "{v}");

    // The model uses the earlier turns.
    let (s, v) = post(
        base,
        "/v1/chat/completions",
        &json!({"messages": [
            {"role": "user", "content": turns[0].1},
            {"role": "assistant", "content": turns[1].1},
            {"role": "user", "content": "What is my name?"},
        ], "max_tokens": 12}),
    );
    assert_eq!(s, 200, "{v}");
    let answer = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(answer.contains("Zed"), "{answer:?}");

    // Roles out of place: 400s naming the message.
    for (msgs, param) in [
        (
            json!([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                   {"role": "user", "content": "c"}]),
            "messages[1].role",
        ),
        (
            json!([{"role": "tool", "content": "a"}, {"role": "user", "content": "c"}]),
            "messages[0].role",
        ),
        (
            json!([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
            "messages[1].role",
        ),
    ] {
        let (s, v) = post(base, "/v1/chat/completions", &json!({"messages": msgs}));
        assert_error(s, &v, 400, "roles");
        assert_eq!(v["error"]["param"], param, "{v}");
    }
}

/// The load generator (`kvlink bench serve`), short: 40 requests from 4 concurrent
/// clients mixing document registration and streamed questions over shared documents:
/// no errors, every question answered from cached documents; TTFT percentiles printed.
#[test]
fn loopback_load() {
    use kvlink::server::loadgen::{run, LoadConfig};
    let base = server();
    let cfg = LoadConfig {
        requests: 40,
        clients: 4,
        max_tokens: 4,
        ..Default::default()
    };
    let r = run(base, &cfg).unwrap();
    eprintln!("load: {r}");
    assert_eq!(r.errors, 0, "{r}");
    assert_eq!(r.registrations, 10, "{r}");
    assert_eq!(r.questions, 30, "{r}");
    // Two shared documents per question, registered before the run: never computed.
    assert_eq!(r.cache_hits.get("computed"), Some(&0), "{r}");
    assert_eq!(r.cache_hits.get("gpu"), Some(&60), "{r}");
    assert!(r.ttft_p50_ms > 0.0 && r.ttft_p99_ms >= r.ttft_p50_ms, "{r}");
    assert!(r.engine_ttft_p50_ms > 0.0, "{r}");
}

/// Generations that arrive together decode together (the batch decoder: one forward
/// pass per step for all of them, fed more than one row on average) and each gives the
/// same greedy text as when it runs alone, with the server set to one at a time.
#[test]
fn concurrent_generations_batch_and_match_one_at_a_time() {
    let start = |max_batch: usize| {
        let engine = Engine::load(
            common::gpu().clone(),
            common::model::source().as_ref(),
            1024,
            &mut |_, _| {},
        )
        .expect("load engine");
        let cfg = ServerConfig {
            max_batch,
            batch_slots: 2048,
            ..Default::default()
        };
        Server::start(engine, cfg, "127.0.0.1:0").expect("start server")
    };
    let prompts = [
        "The capital of France is",
        "Water boils at",
        "One, two, three,",
        "The largest planet is",
        "My favourite colour is",
    ];
    let ask_n = |base: &str, p: &str, n: usize| -> String {
        let body = json!({"prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": true});
        let (st, v) = post(base, "/v1/completions", &body);
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], n, "{v}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let ask = |base: &str, p: &str| ask_n(base, p, 10);
    let alone_server = start(1);
    let base = format!("http://{}", alone_server.addr);
    let alone: Vec<String> = prompts.iter().map(|p| ask(&base, p)).collect();
    // Long enough for several of the lone decoder's chunks (16 tokens each).
    let long_alone = ask_n(&base, prompts[0], 40);
    let steps = |base: &str| {
        let m = get(base, "/metrics").1;
        let n = |name| metric(&m, name).unwrap_or_else(|| panic!("no {name} in\n{m}"));
        (
            n("kvlink_decode_steps_total"),
            n("kvlink_decode_step_rows_total"),
        )
    };
    assert_eq!(steps(&base), (0.0, 0.0), "one at a time: no batch steps");

    let batched = start(4);
    let base = format!("http://{}", batched.addr);
    // One generation alone on the batching server decodes on the pipelined decoder, on
    // its own cache (no batch step), and gives the same text.
    assert_eq!(
        ask_n(&base, prompts[0], 40),
        long_alone,
        "a lone generation on the batching server"
    );
    assert_eq!(
        steps(&base),
        (0.0, 0.0),
        "a lone generation takes no batch step"
    );
    // A lone generation (streamed) joins the arena mid-way when a second one comes:
    // both keep their one-at-a-time text.
    std::thread::scope(|sc| {
        let body = json!({"prompt": prompts[0], "max_tokens": 40, "temperature": 0,
                          "ignore_eos": true, "stream": true});
        let (mut text, mut second) = (String::new(), None);
        let done = post_stream(&base, "/v1/completions", &body, |v| {
            text += v["choices"][0]["text"].as_str().unwrap_or("");
            // The first chunk: the lone generation is decoding; now the second comes.
            second.get_or_insert_with(|| sc.spawn(|| ask(&base, prompts[1])));
        });
        assert!(done, "no [DONE]");
        assert_eq!(
            text, long_alone,
            "the lone generation after joining the arena"
        );
        let second = second.expect("a streamed chunk").join().unwrap();
        assert_eq!(second, alone[1], "the generation that joined it");
    });
    let (n, _) = steps(&base);
    assert!(n > 0.0, "the two did not decode in batch steps");
    let together: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = prompts.iter().map(|p| sc.spawn(|| ask(&base, p))).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(a, b, "prompt {i} ({:?}): batched text differs", prompts[i]);
    }
    let (n, rows) = steps(&base);
    assert!(
        n > 0.0 && rows / n > 1.0,
        "no step fed several generations: {n} steps, {rows} rows"
    );
    // Sampled generations in the same batches (their steps read every row's logits back
    // and sample on the host): they run to length, and the greedy ones beside them still
    // give their one-at-a-time text.
    let sampled = |p: &str| -> Value {
        let body = json!({"prompt": p, "max_tokens": 10, "temperature": 0.9, "seed": 7,
                          "ignore_eos": true});
        let (st, v) = post(&base, "/v1/completions", &body);
        assert_eq!(st, 200, "{v}");
        v
    };
    let (mixed_greedy, mixed_sampled): (Vec<String>, Vec<Value>) = std::thread::scope(|sc| {
        let g: Vec<_> = prompts[..2]
            .iter()
            .map(|p| sc.spawn(|| ask(&base, p)))
            .collect();
        let r: Vec<_> = prompts[2..4]
            .iter()
            .map(|p| sc.spawn(|| sampled(p)))
            .collect();
        (
            g.into_iter().map(|h| h.join().unwrap()).collect(),
            r.into_iter().map(|h| h.join().unwrap()).collect(),
        )
    });
    assert_eq!(
        mixed_greedy[..],
        alone[..2],
        "greedy text beside sampled generations"
    );
    for v in &mixed_sampled {
        assert_eq!(v["usage"]["completion_tokens"], 10, "{v}");
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    }
    let m = get(&base, "/metrics").1;
    assert_eq!(metric(&m, "kvlink_decoding"), Some(0.0), "{m}");
    assert_eq!(metric(&m, "kvlink_queue_depth"), Some(0.0), "{m}");
}

/// A `redis-server` of its own on a free loopback port (no persistence), killed on drop.
struct RedisServer {
    child: std::process::Child,
    url: String,
    _dir: TempDir,
}

impl RedisServer {
    /// `None` if `redis-server` is not installed.
    fn start() -> Option<RedisServer> {
        use std::process::{Command, Stdio};
        Command::new("redis-server")
            .arg("--version")
            .output()
            .ok()?;
        let dir = tempdir("redis");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--dir"])
            .arg(dir.path())
            .stdout(Stdio::null())
            .spawn()
            .expect("start redis-server");
        let r = RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}"),
            _dir: dir,
        };
        let t0 = Instant::now();
        while r.con().is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Some(r)
    }

    fn con(&self) -> redis::RedisResult<redis::Connection> {
        let mut c = redis::Client::open(self.url.as_str())?.get_connection()?;
        redis::cmd("PING").query::<String>(&mut c)?;
        Ok(c)
    }

    /// The kvlink entries: key (without the prefix) -> value.
    fn entries(&self) -> std::collections::BTreeMap<String, Vec<u8>> {
        let mut c = self.con().unwrap();
        let keys: Vec<String> = redis::cmd("KEYS").arg("kvlink:kv:*").query(&mut c).unwrap();
        keys.into_iter()
            .map(|k| {
                let v: Vec<u8> = redis::cmd("GET").arg(&k).query(&mut c).unwrap();
                (k["kvlink:kv:".len()..].to_string(), v)
            })
            .collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `kvlink serve` process on a free loopback port; its stderr is collected. Killed on
/// drop.
struct ServeProcess {
    child: std::process::Child,
    base: String,
    log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl ServeProcess {
    fn start(args: &[&str]) -> ServeProcess {
        use std::process::{Command, Stdio};
        let mut child = Command::new(env!("CARGO_BIN_EXE_kvlink"))
            .args(["serve", "--port", "0", "--ctx", &CTX.to_string()])
            .arg("--model")
            .arg(common::model::model_path())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start kvlink serve");
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(a) = line.split("listening on ").nth(1) {
                    let _ = tx.send(a.trim().to_string());
                }
                l.lock().unwrap().push_str(&(line + "\n"));
            }
        });
        let base = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                panic!("kvlink serve did not start:\n{}", log.lock().unwrap());
            }
        };
        ServeProcess { child, base, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The payload of an entry (after magic, version and header; before the checksum).
fn entry_payload(b: &[u8]) -> &[u8] {
    let hlen = u32::from_le_bytes(b[8..12].try_into().unwrap()) as usize;
    &b[12 + hlen..b.len() - 8]
}

/// `--store redis://`: a second server process reuses the caches the first computed
/// (redis hits, no recompute: the same answer), the redis entries are the disk store's
/// format under the same keys, a redis hit fills the disk tier, DELETE removes the
/// entry, and a redis that goes away costs warnings, not failed requests.
#[test]
fn redis_tier_shared_between_two_servers() {
    let Some(redis) = RedisServer::start() else {
        common::skip(
            "redis",
            "redis_tier_shared_between_two_servers",
            "redis-server is not installed (apt-get install redis-server)",
        );
        return;
    };
    let (da, db) = (tempdir("redis-a"), tempdir("redis-b"));
    let store = |d: &TempDir| d.path().to_str().unwrap().to_string();
    let (sa, sb) = (store(&da), store(&db));
    let a = ServeProcess::start(&["--store", &sa, "--store", &redis.url]);
    let doc = "The Quillon observatory sits on Mount Sarn. Its telescope, named Old Brass, \
               was built in 1911 by the glassmaker Ada Fenn.";
    let question = "Who built the telescope at the Quillon observatory?";
    let (s, d) = post(&a.base, "/v1/documents", &json!({"text": doc}));
    assert_eq!(s, 201, "{d}");
    assert_eq!(d["cache"], "computed", "{d}");
    let id = d["id"].as_str().unwrap().to_string();
    let chat = |base: &str| {
        let (s, v) = post(
            base,
            "/v1/chat/completions",
            &json!({"messages": [{"role": "user", "content": question}],
                    "documents": [id], "max_tokens": 16}),
        );
        assert_eq!(s, 200, "{v}");
        v
    };
    let va = chat(&a.base);
    let answer = va["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!answer.trim().is_empty(), "{va}");

    // The document and the prompt head, in the disk store's format under its keys.
    let shared = redis.entries();
    let disk = kvlink::kv::DiskStore::inspect(da.path()).entries().unwrap();
    assert_eq!(shared.len(), 2, "{:?}", shared.keys());
    for e in &disk {
        let v = shared
            .get(e.key.as_str())
            .unwrap_or_else(|| panic!("{} is on disk, not in redis", e.key));
        let f = std::fs::read(&e.path).unwrap();
        assert_eq!(&v[..4], b"KVLC");
        assert_eq!(v.len(), f.len());
        assert_eq!(entry_payload(v), entry_payload(&f), "{}", e.key);
    }
    assert_eq!(disk.len(), shared.len());

    // The second server: the document's cache (and the prompt head's) come from redis.
    let b = ServeProcess::start(&["--store", &sb, "--store", &redis.url]);
    let (s, d) = post(&b.base, "/v1/documents", &json!({"text": doc}));
    assert_eq!(s, 201, "{d}");
    assert_eq!(d["cache"], "redis", "not a redis hit: {d}\n{}", b.log());
    assert_eq!(d["id"], id.as_str());
    let vb = chat(&b.base);
    assert_eq!(
        vb["choices"][0]["message"]["content"], answer,
        "the answer from redis caches differs"
    );
    assert_eq!(vb["kvlink"]["cache_hits"]["computed"], 0, "{vb}");
    assert_eq!(vb["kvlink"]["cache_hits"]["prefix"], true, "{vb}");
    let m = get(&b.base, "/metrics").1;
    assert_eq!(
        metric(&m, "kvlink_doc_registrations_total{tier=\"redis\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "kvlink_doc_registrations_total{tier=\"computed\"}"),
        Some(0.0),
        "{m}"
    );
    // The hits filled b's disk tier.
    let disk_b = kvlink::kv::DiskStore::inspect(db.path()).entries().unwrap();
    assert_eq!(disk_b.len(), 2, "{disk_b:?}");

    // The registration made the document resident: the chat took it from b's GPU.
    assert_eq!(vb["kvlink"]["cache_hits"]["gpu"], 1, "{vb}");

    // A corrupt shared entry is a miss (recomputed, with a warning), not an error.
    let before = redis.entries();
    let other = "The Quillon observatory's café sells plum tea.";
    let (s, d) = post(&a.base, "/v1/documents", &json!({"text": other}));
    assert_eq!((s, &d["cache"]), (201, &json!("computed")), "{d}");
    let after = redis.entries();
    let key = after.keys().find(|k| !before.contains_key(*k)).unwrap();
    let mut bad = after[key].clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    let mut c = redis.con().unwrap();
    redis::cmd("SET")
        .arg(format!("kvlink:kv:{key}"))
        .arg(&bad)
        .query::<()>(&mut c)
        .unwrap();
    let (s, d) = post(&b.base, "/v1/documents", &json!({"text": other}));
    assert_eq!((s, &d["cache"]), (201, &json!("computed")), "{d}");
    assert!(b.log().contains("corrupt"), "{}", b.log());
    // b recomputed it and shared the good entry again.
    let now = &redis.entries()[key];
    assert!(
        now != &bad && now.len() == bad.len(),
        "the corrupt entry stayed"
    );

    // DELETE removes the shared entry too.
    assert_eq!(delete(&b.base, &format!("/v1/documents/{id}")), 200);
    let left = redis.entries();
    assert!(
        !left.is_empty() && left.len() == after.len() - 1,
        "{:?}",
        left.keys()
    );
    assert_eq!(left.len(), 2, "the document's entry is still in redis");

    // Redis goes away: requests still succeed, with a warning.
    drop(redis);
    let (s, d) = post(
        &b.base,
        "/v1/documents",
        &json!({"text": "After the outage: the ferry to Sarn leaves at noon."}),
    );
    assert_eq!(s, 201, "{d}");
    assert_eq!(d["cache"], "computed");
    let (s, v) = post(
        &b.base,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "When does the ferry leave?"}],
                "documents": [d["id"]], "max_tokens": 4}),
    );
    assert_eq!(s, 200, "{v}");
    let log = b.log();
    assert!(
        log.contains("warning") && log.contains("redis://"),
        "no warning about redis:\n{log}"
    );
}

/// `kvlink store push` fills a Redis tier with a disk store's intact entries.
#[test]
fn store_push_fills_redis_from_a_disk_store() {
    use kvlink::kv::{DiskStore, DocKey, DocKv};
    let Some(redis) = RedisServer::start() else {
        common::skip(
            "redis",
            "store_push_fills_redis_from_a_disk_store",
            "redis-server is not installed (apt-get install redis-server)",
        );
        return;
    };
    let dir = tempdir("push-cli");
    let store = DiskStore::open(dir.path()).unwrap();
    let mut keys = Vec::new();
    for seed in 0..3u32 {
        let t: Vec<u32> = (0..9).map(|i| seed * 100 + i).collect();
        let key = DocKey::new("model-fp", "tok-fp", &t);
        let mut kv = DocKv::zeros(t.len(), 2, 8);
        kv.k[0][0] = seed as u8 + 1;
        store.put(&key, "model-fp", "tok-fp", &t, &kv).unwrap();
        keys.push(key);
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvlink"))
        .args(["store", "push", "--json", "--to", &redis.url, "--store"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["pushed"].as_u64(), v["skipped"].as_u64()),
        (Some(3), Some(0)),
        "{v}"
    );
    let got = redis.entries();
    for k in &keys {
        let want = std::fs::read(store.path_for(k)).unwrap();
        assert_eq!(got.get(&k.to_string()), Some(&want), "entry {k}");
    }
    // a --to that is not Redis, or no store there: clear errors
    for (to, store_dir) in [
        ("http://x", dir.path().to_path_buf()),
        (redis.url.as_str(), dir.path().join("none")),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvlink"))
            .args(["store", "push", "--to", to, "--store"])
            .arg(&store_dir)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("redis://") || err.contains("no document store"),
            "{err}"
        );
    }
}
