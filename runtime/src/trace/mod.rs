//! Typed trace events, and their exporters.
//!
//! The runtime records events; exporters only read them. A span is one operator execution (or
//! one weight load) on one lane, with the bytes it touched; a channel level is an edge's
//! occupancy after a send or a receive.
//!
//! * [`chrome`] — Chrome trace-event JSON (Perfetto, chrome://tracing), and reading it back.
//! * [`summary`] — per-lane utilisation, per-operator time, lane overlap, link bandwidth,
//!   channel occupancy.
//! * [`html`] — one self-contained HTML timeline with the summary.
//! * [`merge`] — traces of several processes (a prefill and a decode worker) on one timeline.

pub mod chrome;
pub mod html;
pub mod merge;
pub mod summary;

use std::sync::atomic::{AtomicBool, Ordering};
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
    /// An edge was connected: (actor, port) at each end, `None` for an external end.
    EdgeCreated { edge: u32, from: Option<(u32, u32)>, to: Option<(u32, u32)>, capacity: u32 },
    /// An actor ran once.
    Span { lane: u32, actor: u32, kind: SpanKind, start_ns: u64, dur_ns: u64, bytes: u64 },
    /// An edge holds `level` messages from `t_ns` on.
    ChannelLevel { edge: u32, t_ns: u64, level: u32 },
    /// A memory pool's budget (`None`: unbudgeted) and the most bytes it held at once.
    PoolPeak { pool: String, tier: String, budget: Option<u64>, peak: u64 },
}

/// Where a program's events collect. Recording is off unless the builder turned it on.
pub(crate) struct TraceSink {
    pub(crate) start: Instant,
    /// `start` on the wall clock, in nanoseconds since the UNIX epoch.
    pub(crate) start_unix_ns: u64,
    pub(crate) events: Mutex<Vec<Event>>,
    pub(crate) enabled: AtomicBool,
}

impl TraceSink {
    pub(crate) fn new() -> TraceSink {
        let start_unix_ns =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        TraceSink {
            start: Instant::now(),
            start_unix_ns,
            events: Mutex::new(Vec::new()),
            enabled: AtomicBool::new(false),
        }
    }
    pub(crate) fn on(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }
    pub(crate) fn push(&self, e: Event) {
        if self.on() {
            self.events.lock().unwrap_or_else(|p| p.into_inner()).push(e);
        }
    }
    pub(crate) fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }
}

/// A snapshot of a program's events.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub events: Vec<Event>,
    /// When the program started (its events' time 0) on the wall clock, in nanoseconds since
    /// the UNIX epoch; 0 where unknown. Lines up traces of several processes ([`merge`]).
    pub start_unix_ns: u64,
}

impl Trace {
    /// Number of spans.
    pub fn spans(&self) -> usize {
        self.events.iter().filter(|e| matches!(e, Event::Span { .. })).count()
    }
}
