//! `GET /metrics`: what the server has done and what the engine holds, in Prometheus' text
//! format — requests by outcome, prompt and generated tokens, time-to-first-token and
//! time-between-tokens histograms, queue depth, running sequences, KV blocks, pool bytes.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

/// How a request ended, as `/metrics` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered, to the end (`stop` or `length`).
    Ok,
    /// Refused as malformed or impossible (4xx but 429).
    Invalid,
    /// Refused because the wait queue was full (429).
    Busy,
    /// The engine failed while running it.
    Failed,
    /// The client went away before it was done.
    Cancelled,
}

const OUTCOMES: [(Outcome, &str); 5] = [
    (Outcome::Ok, "ok"),
    (Outcome::Invalid, "invalid"),
    (Outcome::Busy, "busy"),
    (Outcome::Failed, "failed"),
    (Outcome::Cancelled, "cancelled"),
];

/// A histogram of seconds, with fixed buckets.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (and +Inf last): observations ≤ its bound; then the sum and the count.
    inner: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, inner: Mutex::new((vec![0; bounds.len() + 1], 0.0, 0)) }
    }

    /// Counts one observation of `s` seconds.
    pub fn observe(&self, s: f64) {
        let Ok(mut h) = self.inner.lock() else { return };
        let i = self.bounds.iter().position(|&b| s <= b).unwrap_or(self.bounds.len());
        h.0[i] += 1;
        h.1 += s;
        h.2 += 1;
    }

    fn write(&self, out: &mut String, name: &str, help: &str) {
        let Ok(h) = self.inner.lock() else { return };
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cumulative += h.0[i];
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.2);
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", h.1, h.2);
    }
}

const TTFT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const TBT_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// The server's counters.
pub struct Metrics {
    outcomes: [AtomicU64; 5],
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub time_to_first_token: Histogram,
    pub time_between_tokens: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            outcomes: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            time_between_tokens: Histogram::new(TBT_BUCKETS),
        }
    }
}

impl Metrics {
    /// Counts a request that ended so.
    pub fn count(&self, o: Outcome) {
        if let Some(i) = OUTCOMES.iter().position(|(x, _)| *x == o) {
            self.outcomes[i].fetch_add(1, Relaxed);
        }
    }

    /// Requests that ended so, so far.
    pub fn outcome(&self, o: Outcome) -> u64 {
        OUTCOMES.iter().position(|(x, _)| *x == o).map_or(0, |i| self.outcomes[i].load(Relaxed))
    }

    /// The text of `/metrics`, with the engine's gauges and pools.
    pub fn render(&self, engine: &crate::Engine) -> String {
        let mut s = String::new();
        let _ =
            writeln!(s, "# HELP weir_requests_total Requests by how they ended.\n# TYPE weir_requests_total counter");
        for (i, (_, name)) in OUTCOMES.iter().enumerate() {
            let _ = writeln!(s, "weir_requests_total{{outcome=\"{name}\"}} {}", self.outcomes[i].load(Relaxed));
        }
        let counter = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            &mut s,
            "weir_prompt_tokens_total",
            "Prompt tokens of the requests run.",
            self.prompt_tokens.load(Relaxed),
        );
        let generated = self.generated_tokens.load(Relaxed);
        counter(&mut s, "weir_generated_tokens_total", "Tokens generated.", generated);
        self.time_to_first_token.write(
            &mut s,
            "weir_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first token.",
        );
        self.time_between_tokens.write(
            &mut s,
            "weir_time_between_tokens_seconds",
            "Seconds between a stream's tokens.",
        );
        let g = engine.gauges();
        counter(&mut s, "weir_kv_imports_total", "KV caches taken from prefill workers.", g.kv_imports.load(Relaxed));
        let _ = writeln!(
            s,
            "# HELP weir_kv_exposed_seconds_total Seconds the KV transfers ran past the end of their prefill, all \
             together.\n# TYPE weir_kv_exposed_seconds_total counter\nweir_kv_exposed_seconds_total {:.6}",
            g.kv_exposed_us.load(Relaxed) as f64 / 1e6
        );
        let gauge = |s: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(&mut s, "weir_queue_depth", "Requests waiting to be admitted.", g.waiting.load(Relaxed) as u64);
        gauge(&mut s, "weir_running_sequences", "Sequences being generated.", g.running.load(Relaxed) as u64);
        let kv = "KV cache blocks (16 positions) promised to running sequences.";
        gauge(&mut s, "weir_kv_blocks_in_use", kv, g.kv_blocks.load(Relaxed) as u64);
        if let Some(total) = engine.kv_blocks() {
            gauge(&mut s, "weir_kv_blocks_total", "KV cache blocks the reserve holds.", total as u64);
        }
        let _ = writeln!(
            s,
            "# HELP weir_pool_bytes_in_use Bytes of each host pool's buffers in use now.\n# TYPE weir_pool_bytes_in_use gauge"
        );
        for p in engine.pools() {
            let _ = writeln!(s, "weir_pool_bytes_in_use{{pool=\"{}\"}} {}", p.name(), p.in_use());
        }
        let _ = writeln!(
            s,
            "# HELP weir_pool_bytes Bytes each host pool holds now, its buffers kept for reuse too (`host`: all of \
             them).\n# TYPE weir_pool_bytes gauge"
        );
        for p in engine.pools() {
            let _ = writeln!(s, "weir_pool_bytes{{pool=\"{}\"}} {}", p.name(), p.used());
        }
        let _ = writeln!(s, "weir_pool_bytes{{pool=\"host\"}} {}", engine.host_bytes());
        gauge(&mut s, "weir_host_bytes_peak", "The most bytes the host pools held at once.", engine.peak_host_bytes());
        if let Some(b) = engine.host_budget() {
            gauge(&mut s, "weir_host_budget_bytes", "The host memory budget all pools share.", b);
        }
        s
    }
}
