//! Server counters and histograms, written in the Prometheus text format by hand (a few
//! counters do not need a metrics framework).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Upper bounds (seconds) of the TTFT histogram buckets.
const TTFT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds (seconds) of the per-token decode time buckets.
const DECODE_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

/// Where a document cache can come from.
pub const TIERS: [&str; 4] = ["gpu", "disk", "redis", "computed"];

#[derive(Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    n: u64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], v: f64) {
        if self.counts.is_empty() {
            self.counts = vec![0; bounds.len()];
        }
        for (c, b) in self.counts.iter_mut().zip(bounds) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.n += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str, bounds: &[f64]) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, b) in bounds.iter().enumerate() {
            let c = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.n);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.n);
    }
}

#[derive(Default)]
struct Inner {
    /// (route, HTTP status) -> count.
    requests: BTreeMap<(String, u16), u64>,
    ttft: Histogram,
    decode: Histogram,
    /// Document caches by where they came from: gpu, disk, redis, computed.
    cache: BTreeMap<&'static str, u64>,
    /// Documents registered (newly), by where their cache came from.
    registered: BTreeMap<&'static str, u64>,
    generated_tokens: u64,
    cancelled: u64,
    /// Batch decode steps, and the generations they fed in all.
    decode_steps: u64,
    decode_step_rows: u64,
}

#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

/// Gauges read at scrape time.
pub struct Gauges {
    pub queue_depth: usize,
    /// Generations in the batch decoder.
    pub decoding: usize,
    pub gpu_cache_bytes: u64,
    /// GPU memory the document-cache pool's slabs take, and how many there are.
    pub gpu_pool_bytes: u64,
    pub gpu_pool_slabs: usize,
    pub documents: usize,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn request(&self, route: &str, status: u16) {
        *self
            .lock()
            .requests
            .entry((route.to_string(), status))
            .or_default() += 1;
    }

    /// One answered generation: TTFT, decode time per token after the first, tokens.
    pub fn generation(&self, ttft_s: f64, decode_s_per_token: Option<f64>, tokens: usize) {
        let mut m = self.lock();
        m.ttft.observe(TTFT_BUCKETS, ttft_s);
        if let Some(d) = decode_s_per_token {
            m.decode.observe(DECODE_BUCKETS, d);
        }
        m.generated_tokens += tokens as u64;
    }

    /// One batch decode step over `rows` generations.
    pub fn decode_step(&self, rows: usize) {
        let mut m = self.lock();
        m.decode_steps += 1;
        m.decode_step_rows += rows as u64;
    }

    pub fn cache(&self, gpu: usize, disk: usize, redis: usize, computed: usize) {
        let mut m = self.lock();
        *m.cache.entry("gpu").or_default() += gpu as u64;
        *m.cache.entry("disk").or_default() += disk as u64;
        *m.cache.entry("redis").or_default() += redis as u64;
        *m.cache.entry("computed").or_default() += computed as u64;
    }

    /// A newly registered document whose cache came from `tier`.
    pub fn registered(&self, tier: &'static str) {
        *self.lock().registered.entry(tier).or_default() += 1;
    }

    pub fn cancelled(&self) {
        self.lock().cancelled += 1;
    }

    pub fn render(&self, g: &Gauges) -> String {
        let m = self.lock();
        let mut out = String::new();
        out.push_str("# HELP kvlink_requests_total HTTP requests by route and status.\n");
        out.push_str("# TYPE kvlink_requests_total counter\n");
        for ((route, status), n) in &m.requests {
            let _ = writeln!(
                out,
                "kvlink_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        m.ttft.write(
            &mut out,
            "kvlink_ttft_seconds",
            "Time to first token of answered generations.",
            TTFT_BUCKETS,
        );
        m.decode.write(
            &mut out,
            "kvlink_decode_seconds_per_token",
            "Decode time per generated token after the first.",
            DECODE_BUCKETS,
        );
        out.push_str(
            "# HELP kvlink_doc_cache_total Document caches used by generations, by tier \
             (gpu, disk and redis are hits, computed is a miss).\n# TYPE kvlink_doc_cache_total counter\n",
        );
        for tier in TIERS {
            let n = m.cache.get(tier).copied().unwrap_or(0);
            let _ = writeln!(out, "kvlink_doc_cache_total{{tier=\"{tier}\"}} {n}");
        }
        out.push_str(
            "# HELP kvlink_doc_registrations_total Documents newly registered, by where their \
             cache came from.\n# TYPE kvlink_doc_registrations_total counter\n",
        );
        for tier in TIERS {
            let n = m.registered.get(tier).copied().unwrap_or(0);
            let _ = writeln!(out, "kvlink_doc_registrations_total{{tier=\"{tier}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP kvlink_generated_tokens_total Tokens generated.\n# TYPE kvlink_generated_tokens_total counter\nkvlink_generated_tokens_total {}",
            m.generated_tokens
        );
        let _ = writeln!(
            out,
            "# HELP kvlink_cancelled_total Generations stopped because the client went away.\n# TYPE kvlink_cancelled_total counter\nkvlink_cancelled_total {}",
            m.cancelled
        );
        let _ = writeln!(
            out,
            "# HELP kvlink_decode_steps_total Batch decode steps (one forward pass for every generation decoding).\n# TYPE kvlink_decode_steps_total counter\nkvlink_decode_steps_total {}",
            m.decode_steps
        );
        let _ = writeln!(
            out,
            "# HELP kvlink_decode_step_rows_total Generations fed by batch decode steps, summed (divided by the steps: the mean batch).\n# TYPE kvlink_decode_step_rows_total counter\nkvlink_decode_step_rows_total {}",
            m.decode_step_rows
        );
        let _ = writeln!(
            out,
            "# HELP kvlink_queue_depth Engine jobs waiting or running.\n# TYPE kvlink_queue_depth gauge\nkvlink_queue_depth {}",
            g.queue_depth
        );
        let _ = writeln!(
            out,
            "# HELP kvlink_decoding Generations decoding together in the batch decoder.\n# TYPE kvlink_decoding gauge\nkvlink_decoding {}",
            g.decoding
        );
        let _ = writeln!(
            out,
            "# HELP kvlink_gpu_doc_cache_bytes Bytes of document caches resident on the GPU.\n# TYPE kvlink_gpu_doc_cache_bytes gauge\nkvlink_gpu_doc_cache_bytes {}",
            g.gpu_cache_bytes
        );
        let _ = writeln!(
            out,
            "# HELP kvlink_gpu_pool_bytes GPU memory of the document-cache pool (its slabs).\n# TYPE kvlink_gpu_pool_bytes gauge\nkvlink_gpu_pool_bytes {}",
            g.gpu_pool_bytes
        );
        let _ = writeln!(
            out,
            "# HELP kvlink_gpu_pool_slabs Slabs of the document-cache pool (gather dispatches per layer at most).\n# TYPE kvlink_gpu_pool_slabs gauge\nkvlink_gpu_pool_slabs {}",
            g.gpu_pool_slabs
        );
        let _ = writeln!(
            out,
            "# HELP kvlink_documents Registered documents.\n# TYPE kvlink_documents gauge\nkvlink_documents {}",
            g.documents
        );
        out
    }
}
