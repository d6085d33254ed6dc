//! `kvlink serve`: an OpenAI-compatible HTTP server (axum on tokio) in front of one
//! engine. The engine runs on its own thread and takes jobs from a queue (a channel);
//! handlers validate input, queue a job and stream or collect its tokens. A client that
//! goes away closes its job's channel, which stops the generation at the next token.
//!
//! Routes: `POST /v1/chat/completions`, `POST /v1/completions` (OpenAI shapes, `stream`
//! as server-sent events; extensions `documents`, `kvlink_mode`, `top_k`, `ignore_eos`
//! in, `kvlink` (TTFT, cache hits) out), `POST/GET /v1/documents`,
//! `GET/DELETE /v1/documents/{id}`, `GET /v1/models`, `GET /health`, `GET /metrics`.

pub mod api;
pub mod loadgen;
mod metrics;
mod worker;

use crate::link::Mode;
use crate::model::ChatMessage;
use crate::sampling::SamplingParams;
use crate::{Engine, GenerateParams, Request};
use api::{ApiError, ChatBody, Common, CompletionBody, DocumentBody};
use axum::body::Body;
use axum::extract::{MatchedPath, Path, State as AxState};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;
use web_time::Instant;
use worker::{GenEvent, GenJob, GenSummary, Job};

/// Limits and names of a server.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Engine jobs (generations, document encodings) waiting or running; beyond it
    /// requests are refused with 503.
    pub max_queue: usize,
    /// Largest request body accepted (413 beyond it).
    pub max_body_bytes: usize,
    /// Most documents one request may name.
    pub max_documents: usize,
    /// The `model` reported in responses and by `/v1/models`.
    pub model_name: String,
    /// Generations decoding together at most (1: one after another, each with the
    /// pipelined one-sequence decoder).
    pub max_batch: usize,
    /// KV slots of the batch decoder's arena (prompts and answers of the generations
    /// decoding together); at least the context. Allocated on the first generation.
    pub batch_slots: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_queue: 64,
            max_body_bytes: 8 << 20,
            max_documents: 16,
            model_name: "kvlink".into(),
            max_batch: 16,
            batch_slots: 8192,
        }
    }
}

/// A registered document.
#[derive(Clone, Debug, Serialize)]
pub struct DocRecord {
    /// Content hash of the (normalized) text: XXH3-128, hex.
    pub id: String,
    pub object: &'static str,
    pub title: Option<String>,
    pub tokens: usize,
    pub bytes: usize,
    pub created: u64,
    /// Where its cache came from when this server registered it: gpu, disk, redis or
    /// computed.
    pub cache: &'static str,
    #[serde(skip)]
    pub text: String,
    #[serde(skip)]
    key: crate::kv::DocKey,
}

pub(crate) struct State {
    engine: Arc<Engine>,
    cfg: ServerConfig,
    jobs: Mutex<std::sync::mpsc::Sender<Job>>,
    /// Jobs waiting or running.
    queue: AtomicUsize,
    /// Generations in the batch decoder now.
    decoding: AtomicUsize,
    docs: Mutex<BTreeMap<String, DocRecord>>,
    metrics: metrics::Metrics,
    next_id: AtomicU64,
}

/// A running server: the address it listens on; `wait` blocks until it stops.
pub struct Server {
    pub addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Bind `addr` (e.g. "127.0.0.1:0" for any free port) and serve on background
    /// threads: the HTTP runtime and the engine thread.
    pub fn start(engine: Engine, cfg: ServerConfig, addr: &str) -> std::io::Result<Server> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let engine = Arc::new(engine);
        let (tx, rx) = std::sync::mpsc::channel();
        let state = Arc::new(State {
            engine: engine.clone(),
            cfg,
            jobs: Mutex::new(tx),
            queue: AtomicUsize::new(0),
            decoding: AtomicUsize::new(0),
            docs: Mutex::new(BTreeMap::new()),
            metrics: metrics::Metrics::default(),
            next_id: AtomicU64::new(1),
        });
        let st = state.clone();
        std::thread::Builder::new()
            .name("kvlink-engine".into())
            .spawn(move || worker::run(engine, st, rx))?;
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let st = state.clone();
        let thread = std::thread::Builder::new()
            .name("kvlink-http".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()?;
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::from_std(listener)?;
                    axum::serve(listener, router(st))
                        .with_graceful_shutdown(async {
                            let _ = stop_rx.await;
                        })
                        .await
                })
            })?;
        Ok(Server {
            addr,
            state,
            shutdown: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Register a document (as `POST /v1/documents` does), blocking until it is stored.
    pub fn add_document(&self, text: &str, title: Option<String>) -> Result<DocRecord, ApiError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .map_err(ApiError::internal)?;
        rt.block_on(add_document(&self.state, text, title))
            .map(|(d, _)| d)
    }

    /// Block until the server stops (it runs until the process ends).
    pub fn wait(mut self) -> std::io::Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the HTTP thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.shutdown.take() {
            let _ = s.send(());
        }
    }
}

fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/documents", post(post_document).get(list_documents))
        .route(
            "/v1/documents/{id}",
            get(get_document).delete(delete_document),
        )
        .fallback(|| async { ApiError::not_found("no such route").into_response() })
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .with_state(state)
}

/// Count every request by route and status.
async fn count(
    AxState(st): AxState<Arc<State>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "other".into());
    let r = next.run(req).await;
    st.metrics.request(&route, r.status().as_u16());
    r
}

async fn read_body(st: &State, body: Body) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, st.cfg.max_body_bytes)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!(
                    "the request body is larger than {} bytes (the server's --max-body-mb)",
                    st.cfg.max_body_bytes
                ),
            )
            .code("body_too_large")
        })
}

async fn health(AxState(st): AxState<Arc<State>>) -> Json<serde_json::Value> {
    Json(json!({
        "status": "ok",
        "model": st.cfg.model_name,
        "queue_depth": st.queue.load(Ordering::SeqCst),
        "documents": st.docs.lock().unwrap_or_else(|e| e.into_inner()).len(),
    }))
}

async fn metrics_text(AxState(st): AxState<Arc<State>>) -> Response {
    let g = metrics::Gauges {
        queue_depth: st.queue.load(Ordering::SeqCst),
        decoding: st.decoding.load(Ordering::SeqCst),
        gpu_cache_bytes: st.engine.doc_cache_bytes(),
        gpu_pool_bytes: st.engine.doc_pool().bytes(),
        gpu_pool_slabs: st.engine.doc_pool().slabs(),
        documents: st.docs.lock().unwrap_or_else(|e| e.into_inner()).len(),
    };
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.metrics.render(&g),
    )
        .into_response()
}

async fn models(AxState(st): AxState<Arc<State>>) -> Json<serde_json::Value> {
    Json(json!({"object": "list", "data": [{
        "id": st.cfg.model_name, "object": "model", "created": 0, "owned_by": "kvlink"
    }]}))
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Queue a job unless the queue is full (503).
fn submit(st: &State, job: Job) -> Result<(), ApiError> {
    let depth = st.queue.fetch_add(1, Ordering::SeqCst);
    if depth >= st.cfg.max_queue {
        st.queue.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            format!(
                "the server is busy ({depth} requests queued, --max-queue {}); retry later",
                st.cfg.max_queue
            ),
        )
        .code("queue_full"));
    }
    let sent = st.jobs.lock().unwrap_or_else(|e| e.into_inner()).send(job);
    if sent.is_err() {
        st.queue.fetch_sub(1, Ordering::SeqCst);
        return Err(ApiError::internal("the engine thread has stopped"));
    }
    Ok(())
}

/// Documents are stored as `kvlink ask --doc` reads files: trailing whitespace trimmed,
/// one line break at the end, so both give the same tokens and share caches.
fn normalize(text: &str) -> String {
    format!("{}\n", text.trim_end())
}

fn doc_id(text: &str) -> String {
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(text.as_bytes()))
}

/// The name of a cache tier in responses and metrics.
fn tier_name(s: crate::engine::CacheSource) -> &'static str {
    use crate::engine::CacheSource;
    match s {
        CacheSource::Gpu => "gpu",
        CacheSource::Disk => "disk",
        CacheSource::Shared => "redis",
        CacheSource::Computed => "computed",
    }
}

/// Register a document; returns it and whether it was new.
async fn add_document(
    st: &Arc<State>,
    text: &str,
    title: Option<String>,
) -> Result<(DocRecord, bool), ApiError> {
    if text.trim().is_empty() {
        return Err(ApiError::invalid(
            "the document text is empty",
            Some("text"),
        ));
    }
    let text = normalize(text);
    let id = doc_id(&text);
    if let Some(d) = st.docs.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
        return Ok((d.clone(), false));
    }
    let (reply, rx) = oneshot::channel();
    submit(
        st,
        Job::AddDocument {
            text: text.clone(),
            reply,
        },
    )?;
    let (tokens, key, from) = rx
        .await
        .map_err(|_| ApiError::internal("the engine dropped the job"))??;
    let tier = tier_name(from);
    st.metrics.registered(tier);
    let rec = DocRecord {
        id: id.clone(),
        object: "document",
        title,
        tokens,
        bytes: text.len(),
        created: now_s(),
        cache: tier,
        text,
        key,
    };
    let mut docs = st.docs.lock().unwrap_or_else(|e| e.into_inner());
    let d = docs.entry(id).or_insert(rec);
    Ok((d.clone(), true))
}

async fn post_document(AxState(st): AxState<Arc<State>>, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&st, body).await?;
        let b: DocumentBody = api::parse(&bytes)?;
        add_document(&st, &b.text, b.title).await
    }
    .await;
    match r {
        Ok((d, new)) => (
            if new {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            },
            Json(d),
        )
            .into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list_documents(AxState(st): AxState<Arc<State>>) -> Json<serde_json::Value> {
    let docs = st.docs.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<&DocRecord> = docs.values().collect();
    v.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
    Json(json!({"object": "list", "data": v}))
}

async fn get_document(AxState(st): AxState<Arc<State>>, Path(id): Path<String>) -> Response {
    match st.docs.lock().unwrap_or_else(|e| e.into_inner()).get(&id) {
        Some(d) => {
            let mut v = serde_json::to_value(d).unwrap_or_default();
            v["text"] = json!(d.text);
            Json(v).into_response()
        }
        None => ApiError::not_found(format!("no document {id}")).into_response(),
    }
}

async fn delete_document(AxState(st): AxState<Arc<State>>, Path(id): Path<String>) -> Response {
    let rec = st
        .docs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    let Some(rec) = rec else {
        return ApiError::not_found(format!("no document {id}")).into_response();
    };
    let engine = st.engine.clone();
    let r = tokio::task::spawn_blocking(move || engine.forget_doc(&rec.key)).await;
    match r {
        Ok(Ok(_)) => Json(json!({"id": id, "object": "document", "deleted": true})).into_response(),
        Ok(Err(e)) => ApiError::internal(e).into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// Check the shared fields and turn them into generation parameters and documents.
fn common_params(
    st: &State,
    c: &Common,
) -> Result<(GenerateParams, Vec<String>, Mode, Vec<String>), ApiError> {
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("only n = 1 is supported", Some("n")));
    }
    let max_tokens = c.max_completion_tokens.or(c.max_tokens).unwrap_or(256);
    if max_tokens == 0 {
        return Err(ApiError::invalid(
            "max_tokens must be at least 1",
            Some("max_tokens"),
        ));
    }
    let sampling = SamplingParams {
        temperature: c.temperature.unwrap_or(0.0),
        top_k: c.top_k.unwrap_or(0),
        top_p: c.top_p.unwrap_or(1.0),
        seed: c.seed.unwrap_or(0),
    };
    sampling.validate().map_err(|e| {
        let p = if e.to_string().contains("top-p") {
            "top_p"
        } else {
            "temperature"
        };
        ApiError::invalid(e.to_string(), Some(p))
    })?;
    let stops = c.stop.as_ref().map(|s| match s {
        api::OneOrMany::One(s) => vec![s.clone()],
        api::OneOrMany::Many(v) => v.clone(),
    });
    let stops: Vec<String> = stops
        .unwrap_or_default()
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect();
    if stops.len() > 4 {
        return Err(ApiError::invalid("at most 4 stop sequences", Some("stop")));
    }
    let mode = match c.kvlink_mode.as_deref().unwrap_or("kvlink") {
        "kvlink" => Mode::Kvlink,
        "full" => Mode::Full,
        "naive" => Mode::Naive,
        m => {
            return Err(ApiError::invalid(
                format!("kvlink_mode must be kvlink, full or naive, not {m:?}"),
                Some("kvlink_mode"),
            ))
        }
    };
    if c.documents.len() > st.cfg.max_documents {
        return Err(ApiError::invalid(
            format!(
                "{} documents, more than the server allows per request ({})",
                c.documents.len(),
                st.cfg.max_documents
            ),
            Some("documents"),
        )
        .code("too_many_documents"));
    }
    let docs = st.docs.lock().unwrap_or_else(|e| e.into_inner());
    let texts = c
        .documents
        .iter()
        .enumerate()
        .map(|(i, id)| {
            docs.get(id).map(|d| d.text.clone()).ok_or_else(|| {
                ApiError::invalid(
                    format!("unknown document {id:?}: register it with POST /v1/documents"),
                    Some(&format!("documents[{i}]")),
                )
                .code("document_not_found")
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let params = GenerateParams {
        max_tokens,
        sampling,
        stop_at_eos: !c.ignore_eos,
    };
    Ok((params, texts, mode, stops))
}

/// What a chat body asks: the system prompt, earlier turns and the question.
type ChatAsk = (Option<String>, Vec<ChatMessage>, String);

/// The request a chat body asks for: leading system (or developer) messages, joined,
/// then the conversation, user and assistant turns, the last one the user's (the
/// question; documents go before it).
fn chat_request(b: &ChatBody) -> Result<ChatAsk, ApiError> {
    let Some((last, rest)) = b.messages.split_last() else {
        return Err(ApiError::invalid("messages is empty", Some("messages")));
    };
    let text = |i: usize, m: &api::Message| {
        m.content.text().ok_or_else(|| {
            ApiError::invalid(
                "only text content is supported",
                Some(&format!("messages[{i}].content")),
            )
        })
    };
    if last.role != "user" {
        return Err(ApiError::invalid(
            "the last message must be the user's",
            Some(&format!("messages[{}].role", rest.len())),
        ));
    }
    let mut system = Vec::new();
    let mut history = Vec::new();
    for (i, m) in rest.iter().enumerate() {
        let role = |msg: &str| ApiError::invalid(msg, Some(&format!("messages[{i}].role")));
        match m.role.as_str() {
            "system" | "developer" if history.is_empty() => system.push(text(i, m)?),
            "system" | "developer" => {
                return Err(role(
                    "system and developer messages must come before the conversation",
                ))
            }
            "user" | "assistant" => {
                history.push(ChatMessage::new(m.role.as_str(), text(i, m)?));
            }
            r => {
                return Err(role(&format!(
                    "unsupported role {r:?}: use system, developer, user or assistant"
                )))
            }
        }
    }
    let system = (!system.is_empty()).then(|| system.join("\n"));
    Ok((system, history, text(rest.len(), last)?))
}

async fn chat(AxState(st): AxState<Arc<State>>, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&st, body).await?;
        let v = api::parse_json(&bytes)?;
        let b: ChatBody = api::from_value(&v)?;
        let common: Common = api::from_value(&v)?;
        let (system, history, question) = chat_request(&b)?;
        let req = Request {
            system,
            history,
            documents: Vec::new(),
            question,
            raw: false,
            mode: Mode::Kvlink,
        };
        Ok::<_, ApiError>((req, common))
    }
    .await;
    match r {
        Ok((req, common)) => answer(st, Kind::Chat, req, common).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(AxState(st): AxState<Arc<State>>, body: Body) -> Response {
    let r = async {
        let bytes = read_body(&st, body).await?;
        let v = api::parse_json(&bytes)?;
        let b: CompletionBody = api::from_value(&v)?;
        let common: Common = api::from_value(&v)?;
        let mut p = b.prompt.into_vec();
        if p.len() != 1 {
            return Err(ApiError::invalid(
                "prompt must be one string",
                Some("prompt"),
            ));
        }
        Ok((p.remove(0), common))
    }
    .await;
    match r {
        Ok((prompt, common)) => {
            let req = Request {
                raw: true,
                ..Request::new(Vec::new(), prompt)
            };
            answer(st, Kind::Completion, req, common).await
        }
        Err(e) => e.into_response(),
    }
}

/// Validate, queue and answer a generation (streamed or whole) of `req` (its documents
/// and mode are taken from `common`).
async fn answer(st: Arc<State>, kind: Kind, mut req: Request, common: Common) -> Response {
    let r = async {
        let (params, documents, mode, stops) = common_params(&st, &common)?;
        req.documents = documents;
        req.mode = mode;
        // Plan here (tokenizing only) so a prompt over the context is a 400 before any
        // stream starts.
        let engine = st.engine.clone();
        let req2 = req.clone();
        tokio::task::spawn_blocking(move || {
            let plan = engine.plan(&req2)?;
            if plan.len() + 1 >= engine.context() {
                return Err(crate::Error::Input(format!(
                    "the prompt is {} tokens, which leaves no room to answer in the context ({})",
                    plan.len(),
                    engine.context()
                )));
            }
            Ok(())
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| {
            let mut e = match e {
                // The template refused the messages (e.g. roles that do not alternate).
                crate::Error::Template(m) => ApiError::invalid(
                    format!("the model's chat template refused the messages: {m}"),
                    None,
                ),
                e => ApiError::from_engine(e),
            };
            if e.param.is_none() {
                e.param = Some(
                    if kind == Kind::Chat {
                        "messages"
                    } else {
                        "prompt"
                    }
                    .into(),
                );
            }
            e
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        submit(
            &st,
            Job::Generate(GenJob {
                req,
                params,
                stops,
                queued: Instant::now(),
                tx,
            }),
        )?;
        Ok::<_, ApiError>(rx)
    }
    .await;
    let rx = match r {
        Ok(rx) => rx,
        Err(e) => return e.into_response(),
    };
    let n = st.next_id.fetch_add(1, Ordering::Relaxed);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{n}"),
        Kind::Completion => format!("cmpl-{n}"),
    };
    let model = common.model.unwrap_or_else(|| st.cfg.model_name.clone());
    let head = Head {
        id,
        model,
        created: now_s(),
        kind,
    };
    if common.stream {
        stream(head, rx).into_response()
    } else {
        collect(head, rx).await
    }
}

struct Head {
    id: String,
    model: String,
    created: u64,
    kind: Kind,
}

fn usage(s: &GenSummary) -> serde_json::Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
    })
}

/// The `kvlink` extension of a response: timings and where document caches came from.
fn kvlink_ext(s: &GenSummary) -> serde_json::Value {
    let t = &s.timings;
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    json!({
        "ttft_ms": ms(t.ttft),
        "queue_ms": s.queue_ms,
        "lookup_ms": ms(t.lookup),
        "assemble_ms": ms(t.assemble),
        "prefill_ms": ms(t.prefill),
        "prefill_tokens": t.prefill_tokens,
        "decode_tok_s": s.decode_tok_s,
        "cache_hits": {
            "gpu": t.cached_docs - t.disk_docs - t.shared_docs,
            "disk": t.disk_docs,
            "redis": t.shared_docs,
            "computed": t.computed_docs,
            "prefix": t.prefix_cached,
        },
    })
}

fn object(kind: Kind, chunk: bool) -> &'static str {
    match (kind, chunk) {
        (Kind::Chat, false) => "chat.completion",
        (Kind::Chat, true) => "chat.completion.chunk",
        (Kind::Completion, _) => "text_completion",
    }
}

async fn collect(h: Head, mut rx: mpsc::UnboundedReceiver<GenEvent>) -> Response {
    let mut text = String::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenEvent::Text(s) => text.push_str(&s),
            GenEvent::Error(e) => return e.into_response(),
            GenEvent::Done(s) => {
                let choice = match h.kind {
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": s.finish_reason,
                    }),
                    Kind::Completion => json!({
                        "index": 0, "text": text, "logprobs": null,
                        "finish_reason": s.finish_reason,
                    }),
                };
                return Json(json!({
                    "id": h.id,
                    "object": object(h.kind, false),
                    "created": h.created,
                    "model": h.model,
                    "choices": [choice],
                    "usage": usage(&s),
                    "kvlink": kvlink_ext(&s),
                }))
                .into_response();
            }
        }
    }
    ApiError::internal("the generation ended without a result").into_response()
}

fn chunk(h: &Head, text: Option<&str>, role: bool, finish: Option<&str>) -> serde_json::Value {
    let choice = match h.kind {
        Kind::Chat => {
            let mut delta = json!({});
            if role {
                delta["role"] = json!("assistant");
            }
            if let Some(t) = text {
                delta["content"] = json!(t);
            }
            json!({"index": 0, "delta": delta, "finish_reason": finish})
        }
        Kind::Completion => json!({
            "index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish,
        }),
    };
    json!({
        "id": h.id,
        "object": object(h.kind, true),
        "created": h.created,
        "model": h.model,
        "choices": [choice],
    })
}

/// Server-sent events: a role chunk (chat), one chunk per piece of text, a last chunk
/// with the finish reason, usage and the `kvlink` extension, then `[DONE]`. Dropping
/// the stream (the client went away) closes the job's channel and stops the engine.
fn stream(h: Head, rx: mpsc::UnboundedReceiver<GenEvent>) -> impl IntoResponse {
    let h = Arc::new(h);
    let first = (h.kind == Kind::Chat).then(|| chunk(&h, Some(""), true, None));
    let head = tokio_stream::iter(first.map(|v| Ok(Event::default().data(v.to_string()))));
    let body = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |ev| {
        let v = match ev {
            GenEvent::Text(s) => chunk(&h, Some(&s), false, None),
            GenEvent::Error(e) => e.json(),
            GenEvent::Done(s) => {
                let mut v = chunk(&h, None, false, Some(s.finish_reason));
                v["usage"] = usage(&s);
                v["kvlink"] = kvlink_ext(&s);
                v
            }
        };
        Ok::<_, std::convert::Infallible>(Event::default().data(v.to_string()))
    });
    let done = tokio_stream::once(Ok(Event::default().data("[DONE]")));
    Sse::new(head.chain(body).chain(done)).keep_alive(KeepAlive::default())
}
