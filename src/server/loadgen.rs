//! A bounded load generator for `kvlink serve` on loopback (`kvlink bench serve`, and
//! the server tests): `requests` requests from `clients` concurrent clients, mixing
//! document registrations and streamed questions over shared documents; it reports
//! errors and TTFT percentiles. Only loopback addresses are accepted, every request has
//! a timeout, and the run stops after `requests` requests.

use serde::Serialize;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Requests in all (registrations and questions).
    pub requests: usize,
    /// Concurrent clients (threads, each one request at a time).
    pub clients: usize,
    /// Distinct documents: the first `shared` are registered before the run and asked
    /// about; registrations during the run go through all of them (so some are new and
    /// some are repeats, which the server answers from its registry).
    pub documents: usize,
    /// Documents registered before the run; each question names two of them.
    pub shared: usize,
    /// Every `register_every`-th request registers a document (0: none do).
    pub register_every: usize,
    /// Tokens generated per question.
    pub max_tokens: usize,
    /// Timeout of one request.
    pub timeout: Duration,
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            requests: 40,
            clients: 4,
            documents: 8,
            shared: 4,
            register_every: 4,
            max_tokens: 8,
            timeout: Duration::from_secs(600),
        }
    }
}

/// What a run measured. Times in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    pub requests: usize,
    pub clients: usize,
    pub registrations: usize,
    pub questions: usize,
    pub errors: usize,
    /// The first few errors, for the report.
    pub error_samples: Vec<String>,
    pub wall_s: f64,
    pub requests_per_s: f64,
    /// TTFT as the client sees it: from sending a question to its first generated text
    /// (queueing included).
    pub ttft_p50_ms: f64,
    pub ttft_p99_ms: f64,
    /// TTFT as the engine reports it (`kvlink.ttft_ms`: lookup, assembly and prefill;
    /// no queueing).
    pub engine_ttft_p50_ms: f64,
    pub engine_ttft_p99_ms: f64,
    /// Whole request (registration or question), client side.
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    /// Document caches used by the questions, by tier (from the responses).
    pub cache_hits: std::collections::BTreeMap<String, u64>,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests ({} registrations, {} questions) from {} clients in {:.1} s \
             ({:.2} req/s), {} errors\nTTFT (client, queueing included): p50 {:.0} ms, p99 \
             {:.0} ms\nTTFT (engine): p50 {:.0} ms, p99 {:.0} ms\nrequest latency: p50 {:.0} \
             ms, p99 {:.0} ms\ndocument caches used: {:?}",
            self.requests,
            self.registrations,
            self.questions,
            self.clients,
            self.wall_s,
            self.requests_per_s,
            self.errors,
            self.ttft_p50_ms,
            self.ttft_p99_ms,
            self.engine_ttft_p50_ms,
            self.engine_ttft_p99_ms,
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.cache_hits
        )?;
        for e in &self.error_samples {
            write!(f, "\nerror: {e}")?;
        }
        Ok(())
    }
}

/// The `p` quantile (0..=1) of `v` (nearest rank); 0 for none.
pub fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize]
}

/// Whether `base` (`http://HOST:PORT`) names this machine.
fn is_loopback(base: &str) -> bool {
    let rest = base.strip_prefix("http://").unwrap_or("");
    let host = rest.split('/').next().unwrap_or("");
    let host = match host.strip_prefix('[') {
        Some(h) => h.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// A fact about an invented town per document, so that questions have answers.
fn document(i: usize) -> String {
    format!(
        "Load document {i}: the town of Brel{i} has {} bridges, and its market opens on day \
         {} of every month.",
        i * 3 + 2,
        i % 28 + 1
    )
}

struct Client {
    agent: ureq::Agent,
    base: String,
}

enum Outcome {
    Registered,
    /// Client TTFT, engine TTFT (ms), cache hits.
    Answered(f64, f64, Value),
}

impl Client {
    fn post(&self, path: &str, body: &Value) -> Result<ureq::http::Response<ureq::Body>, String> {
        self.agent
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .send(body.to_string())
            .map_err(|e| format!("{path}: {e}"))
    }

    fn register(&self, text: &str) -> Result<String, String> {
        let mut r = self.post("/v1/documents", &json!({"text": text}))?;
        let status = r.status().as_u16();
        let body = r.body_mut().read_to_string().unwrap_or_default();
        if status != 200 && status != 201 {
            return Err(format!("/v1/documents: {status} {body}"));
        }
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        v["id"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| format!("no id in {body}"))
    }

    /// A streamed question: time to its first text, and the last chunk's `kvlink`.
    fn ask(&self, question: &str, docs: &[&str], max_tokens: usize) -> Result<Outcome, String> {
        let t0 = Instant::now();
        let body = json!({
            "messages": [{"role": "user", "content": question}],
            "documents": docs, "max_tokens": max_tokens, "stream": true,
        });
        let r = self.post("/v1/chat/completions", &body)?;
        let status = r.status().as_u16();
        if status != 200 {
            let mut r = r;
            let body = r.body_mut().read_to_string().unwrap_or_default();
            return Err(format!("/v1/chat/completions: {status} {body}"));
        }
        let (mut first, mut last, mut done) = (None, Value::Null, false);
        for line in BufReader::new(r.into_body().into_reader()).lines() {
            let line = line.map_err(|e| format!("reading the stream: {e}"))?;
            let Some(data) = line.strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                break;
            }
            let v: Value = serde_json::from_str(data).map_err(|e| format!("{e}: {data}"))?;
            if v.get("error").is_some() {
                return Err(format!("error in the stream: {data}"));
            }
            let text = v["choices"][0]["delta"]["content"].as_str().unwrap_or("");
            let end = !v["choices"][0]["finish_reason"].is_null();
            if first.is_none() && (!text.is_empty() || end) {
                first = Some(t0.elapsed().as_secs_f64() * 1e3);
            }
            last = v;
        }
        let engine = last["kvlink"]["ttft_ms"].as_f64();
        match (done, first, engine) {
            (true, Some(f), Some(e)) => Ok(Outcome::Answered(
                f,
                e,
                last["kvlink"]["cache_hits"].clone(),
            )),
            _ => Err(format!("the stream ended early; last chunk {last}")),
        }
    }
}

/// Run the load against the server at `base` (`http://127.0.0.1:PORT`).
pub fn run(base: &str, cfg: &LoadConfig) -> Result<LoadReport, String> {
    if !is_loopback(base) {
        return Err(format!(
            "{base}: the load generator only targets loopback addresses (http://127.0.0.1:PORT)"
        ));
    }
    if cfg.clients == 0 || cfg.requests == 0 || cfg.shared < 2 || cfg.documents < cfg.shared {
        return Err(
            "need at least 1 request and 1 client, 2 shared documents and documents >= shared"
                .into(),
        );
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(cfg.timeout))
        .build()
        .into();
    let client = Client {
        agent,
        base: base.trim_end_matches('/').to_string(),
    };
    let shared: Vec<String> = (0..cfg.shared)
        .map(|i| client.register(&document(i)))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("registering the shared documents: {e}"))?;
    let next = AtomicUsize::new(0);
    let out = Mutex::new((LoadReport::default(), Vec::new(), Vec::new(), Vec::new()));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..cfg.clients {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= cfg.requests {
                    break;
                }
                let t = Instant::now();
                let register = cfg.register_every > 0 && i.is_multiple_of(cfg.register_every);
                let r = if register {
                    let d = (i / cfg.register_every) % cfg.documents;
                    client.register(&document(d)).map(|_| Outcome::Registered)
                } else {
                    let (a, b) = (i % cfg.shared, (i + 1) % cfg.shared);
                    let q = format!("How many bridges does Brel{a} have?");
                    client.ask(&q, &[&shared[a], &shared[b]], cfg.max_tokens)
                };
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let mut o = out.lock().unwrap_or_else(|e| e.into_inner());
                let (rep, ttft, engine, lat) = &mut *o;
                lat.push(ms);
                match r {
                    Ok(Outcome::Registered) => rep.registrations += 1,
                    Ok(Outcome::Answered(f, e, hits)) => {
                        rep.questions += 1;
                        ttft.push(f);
                        engine.push(e);
                        if let Some(m) = hits.as_object() {
                            for (k, v) in m {
                                *rep.cache_hits.entry(k.clone()).or_default() +=
                                    v.as_u64().unwrap_or(u64::from(v.as_bool() == Some(true)));
                            }
                        }
                    }
                    Err(e) => {
                        rep.errors += 1;
                        if rep.error_samples.len() < 5 {
                            rep.error_samples.push(e);
                        }
                    }
                }
            });
        }
    });
    let (mut rep, mut ttft, mut engine, mut lat) =
        out.into_inner().unwrap_or_else(|e| e.into_inner());
    rep.requests = cfg.requests;
    rep.clients = cfg.clients;
    rep.wall_s = t0.elapsed().as_secs_f64();
    rep.requests_per_s = cfg.requests as f64 / rep.wall_s.max(1e-9);
    rep.ttft_p50_ms = percentile(&mut ttft, 0.5);
    rep.ttft_p99_ms = percentile(&mut ttft, 0.99);
    rep.engine_ttft_p50_ms = percentile(&mut engine, 0.5);
    rep.engine_ttft_p99_ms = percentile(&mut engine, 0.99);
    rep.latency_p50_ms = percentile(&mut lat, 0.5);
    rep.latency_p99_ms = percentile(&mut lat, 0.99);
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_targets() {
        for ok in [
            "http://127.0.0.1:8080",
            "http://localhost:1",
            "http://[::1]:80/",
        ] {
            assert!(is_loopback(ok), "{ok}");
        }
        for bad in [
            "http://10.0.0.1:8080",
            "http://example.com",
            "https://127.0.0.1:1",
            "",
        ] {
            assert!(!is_loopback(bad), "{bad}");
        }
        assert!(run("http://192.168.1.1:8080", &LoadConfig::default()).is_err());
    }

    #[test]
    fn percentiles() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 0.5), 51.0);
        assert_eq!(percentile(&mut v, 0.99), 99.0);
        assert_eq!(percentile(&mut [], 0.5), 0.0);
    }
}
