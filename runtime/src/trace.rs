//! Typed trace events, and the Chrome trace-event exporter.
//!
//! The runtime records events; exporters only read them. A span is one operator execution (or
//! one weight load) on one lane, with the bytes it touched.

use std::sync::Mutex;
use std::time::Instant;

/// What a span was doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Arithmetic.
    Compute,
    /// Reading weights from storage.
    Load,
    /// Moving data between tiers.
    Transfer,
}

impl SpanKind {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            SpanKind::Compute => "compute",
            SpanKind::Load => "load",
            SpanKind::Transfer => "transfer",
        }
    }
}

/// One thing that happened in a program.
#[derive(Debug, Clone)]
pub enum Event {
    /// A lane was started.
    LaneCreated { lane: u32, name: String, kind: String },
    /// An actor was placed on a lane.
    ActorCreated { actor: u32, name: String, kind: String, lane: u32, layer: Option<u32> },
    /// An edge was connected (`None` for an external end).
    EdgeCreated { from: Option<u32>, to: Option<u32>, capacity: u32 },
    /// An actor ran once.
    Span { lane: u32, actor: u32, kind: SpanKind, start_ns: u64, dur_ns: u64, bytes: u64 },
}

/// Where a program's events collect.
pub(crate) struct TraceSink {
    pub(crate) start: Instant,
    pub(crate) events: Mutex<Vec<Event>>,
}

impl TraceSink {
    pub(crate) fn new() -> TraceSink {
        TraceSink { start: Instant::now(), events: Mutex::new(Vec::new()) }
    }
    pub(crate) fn push(&self, e: Event) {
        self.events.lock().unwrap_or_else(|p| p.into_inner()).push(e);
    }
    pub(crate) fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// A snapshot of a program's events.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub events: Vec<Event>,
}

impl Trace {
    /// Number of spans.
    pub fn spans(&self) -> usize {
        self.events.iter().filter(|e| matches!(e, Event::Span { .. })).count()
    }

    /// The Chrome trace-event JSON (opens in Perfetto and chrome://tracing): one track per lane,
    /// one complete event per span, with op, layer and bytes in its args.
    pub fn to_chrome_json(&self) -> String {
        use serde_json::json;
        let mut actors = std::collections::HashMap::new();
        let mut out = Vec::new();
        for e in &self.events {
            match e {
                Event::LaneCreated { lane, name, kind } => {
                    out.push(json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": lane, "args": {"name": format!("{name} ({kind})")}}));
                    out.push(json!({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": lane, "args": {"sort_index": lane}}));
                }
                Event::ActorCreated { actor, name, kind, layer, .. } => {
                    actors.insert(*actor, (name.clone(), kind.clone(), *layer));
                }
                _ => {}
            }
        }
        out.push(json!({"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "weir"}}));
        for e in &self.events {
            if let Event::Span { lane, actor, kind, start_ns, dur_ns, bytes } = e {
                let (name, op, layer) =
                    actors.get(actor).cloned().unwrap_or_else(|| (format!("actor{actor}"), String::new(), None));
                out.push(json!({
                    "ph": "X", "pid": 1, "tid": lane, "name": name, "cat": kind.name(),
                    "ts": *start_ns as f64 / 1000.0, "dur": *dur_ns as f64 / 1000.0,
                    "args": {"op": op, "layer": layer, "bytes": bytes},
                }));
            }
        }
        serde_json::to_string(&json!({"traceEvents": out, "displayTimeUnit": "ms"})).unwrap_or_default()
    }
}
