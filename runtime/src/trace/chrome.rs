//! Chrome trace-event JSON: what `--trace` writes. It opens in Perfetto and chrome://tracing
//! (one track per lane, one complete event per span, a counter track per channel), and carries
//! a `weir` section with the lanes, actors and edges so that weir's own tools can read the file
//! back into typed events.

use super::{Event, SpanKind, Trace};
use serde_json::{json, Value};
use std::collections::HashMap;

/// The `weir` section's format version.
pub const FORMAT: u64 = 1;

/// Edge labels: `producer[port] -> consumer[port]`, `in` / `out` for external ends.
pub fn edge_labels(t: &Trace) -> HashMap<u32, String> {
    let actors: HashMap<u32, &str> = t
        .events
        .iter()
        .filter_map(
            |e| if let Event::ActorCreated { actor, name, .. } = e { Some((*actor, name.as_str())) } else { None },
        )
        .collect();
    let end = |x: &Option<(u32, u32)>, ext: &str| match x {
        Some((a, p)) => format!("{}[{p}]", actors.get(a).copied().unwrap_or("?")),
        None => ext.to_string(),
    };
    t.events
        .iter()
        .filter_map(|e| match e {
            Event::EdgeCreated { edge, from, to, .. } => {
                Some((*edge, format!("{} -> {}", end(from, "in"), end(to, "out"))))
            }
            _ => None,
        })
        .collect()
}

impl Trace {
    /// The Chrome trace-event JSON of these events.
    pub fn to_chrome_json(&self) -> String {
        let mut out = Vec::new();
        let (mut lanes, mut actors, mut edges, mut pools) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut names: HashMap<u32, (String, String, Option<u32>)> = HashMap::new();
        let labels = edge_labels(self);
        let mut end_ns = 0u64;
        out.push(json!({"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "lanes"}}));
        out.push(json!({"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "channels"}}));
        for e in &self.events {
            match e {
                Event::LaneCreated { lane, name, kind } => {
                    lanes.push(json!({"id": lane, "name": name, "kind": kind}));
                    out.push(json!({"ph": "M", "name": "thread_name", "pid": 1, "tid": lane, "args": {"name": format!("{name} ({kind})")}}));
                    out.push(json!({"ph": "M", "name": "thread_sort_index", "pid": 1, "tid": lane, "args": {"sort_index": lane}}));
                }
                Event::ActorCreated { actor, name, kind, lane, layer } => {
                    actors.push(json!({"id": actor, "name": name, "kind": kind, "lane": lane, "layer": layer}));
                    names.insert(*actor, (name.clone(), kind.clone(), *layer));
                }
                Event::EdgeCreated { edge, from, to, capacity } => {
                    edges.push(json!({"id": edge, "from": from.map(|f| [f.0, f.1]), "to": to.map(|t| [t.0, t.1]), "capacity": capacity}));
                }
                Event::PoolPeak { pool, tier, budget, peak } => {
                    pools.push(json!({"name": pool, "tier": tier, "budget": budget, "peak": peak}));
                }
                _ => {}
            }
        }
        for e in &self.events {
            match e {
                Event::Span { lane, actor, kind, start_ns, dur_ns, bytes } => {
                    end_ns = end_ns.max(start_ns + dur_ns);
                    let (name, op, layer) =
                        names.get(actor).cloned().unwrap_or_else(|| (format!("actor{actor}"), String::new(), None));
                    out.push(json!({
                        "ph": "X", "pid": 1, "tid": lane, "name": name, "cat": kind.name(),
                        "ts": *start_ns as f64 / 1000.0, "dur": *dur_ns as f64 / 1000.0,
                        "args": {"op": op, "layer": layer, "bytes": bytes, "actor": actor},
                    }));
                }
                Event::ChannelLevel { edge, t_ns, level } => {
                    end_ns = end_ns.max(*t_ns);
                    let label = labels.get(edge).cloned().unwrap_or_default();
                    out.push(json!({
                        "ph": "C", "pid": 2, "name": format!("edge {edge}: {label}"), "ts": *t_ns as f64 / 1000.0,
                        "args": {"level": level}, "id": edge,
                    }));
                }
                _ => {}
            }
        }
        let weir = json!({"format": FORMAT, "lanes": lanes, "actors": actors, "edges": edges, "pools": pools, "end_ns": end_ns,
            "start_unix_ns": self.start_unix_ns});
        serde_json::to_string(&json!({"traceEvents": out, "displayTimeUnit": "ms", "weir": weir})).unwrap_or_default()
    }

    /// Reads a file written by [`Trace::to_chrome_json`] back into events.
    pub fn from_chrome_json(text: &str) -> Result<Trace, String> {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let w = v.get("weir").ok_or("not a weir trace: no `weir` section (was it written by `weir run --trace`?)")?;
        match w.get("format").and_then(Value::as_u64) {
            Some(FORMAT) => {}
            other => return Err(format!("weir trace format {other:?}; this weir reads format {FORMAT}")),
        }
        let arr =
            |k: &str| w.get(k).and_then(Value::as_array).ok_or_else(|| format!("`weir.{k}` is missing or not a list"));
        let u32_of = |x: &Value, what: &str| {
            x.as_u64().map(|n| n as u32).ok_or_else(|| format!("{what}: expected a number, found {x}"))
        };
        let str_of = |x: &Value, what: &str| {
            x.as_str().map(String::from).ok_or_else(|| format!("{what}: expected a string, found {x}"))
        };
        let pair = |x: &Value, what: &str| -> Result<Option<(u32, u32)>, String> {
            match x {
                Value::Null => Ok(None),
                Value::Array(a) if a.len() == 2 => Ok(Some((u32_of(&a[0], what)?, u32_of(&a[1], what)?))),
                other => Err(format!("{what}: expected [actor, port] or null, found {other}")),
            }
        };
        let mut events = Vec::new();
        for (i, l) in arr("lanes")?.iter().enumerate() {
            let what = format!("weir.lanes[{i}]");
            events.push(Event::LaneCreated {
                lane: u32_of(&l["id"], &what)?,
                name: str_of(&l["name"], &what)?,
                kind: str_of(&l["kind"], &what)?,
            });
        }
        for (i, a) in arr("actors")?.iter().enumerate() {
            let what = format!("weir.actors[{i}]");
            events.push(Event::ActorCreated {
                actor: u32_of(&a["id"], &what)?,
                name: str_of(&a["name"], &what)?,
                kind: str_of(&a["kind"], &what)?,
                lane: u32_of(&a["lane"], &what)?,
                layer: a["layer"].as_u64().map(|n| n as u32),
            });
        }
        for (i, e) in arr("edges")?.iter().enumerate() {
            let what = format!("weir.edges[{i}]");
            events.push(Event::EdgeCreated {
                edge: u32_of(&e["id"], &what)?,
                from: pair(&e["from"], &what)?,
                to: pair(&e["to"], &what)?,
                capacity: u32_of(&e["capacity"], &what)?,
            });
        }
        // Pools (absent in traces of runs without a memory budget).
        for (i, p) in w.get("pools").and_then(Value::as_array).into_iter().flatten().enumerate() {
            let what = format!("weir.pools[{i}]");
            events.push(Event::PoolPeak {
                pool: str_of(&p["name"], &what)?,
                tier: str_of(&p["tier"], &what)?,
                // `null`: unbudgeted (so are the largest numbers, as traces before it wrote them).
                budget: match &p["budget"] {
                    Value::Null => None,
                    b => Some(b.as_u64().ok_or_else(|| format!("{what}: budget is not a number or null"))?)
                        .filter(|&b| b < usize::MAX as u64),
                },
                peak: p["peak"].as_u64().ok_or_else(|| format!("{what}: peak is not a number"))?,
            });
        }
        let evs = v.get("traceEvents").and_then(Value::as_array).ok_or("`traceEvents` is missing or not a list")?;
        let ns = |x: &Value, what: &str| {
            x.as_f64()
                .filter(|f| *f >= 0.0)
                .map(|f| (f * 1000.0).round() as u64)
                .ok_or_else(|| format!("{what}: expected a time in µs, found {x}"))
        };
        for (i, e) in evs.iter().enumerate() {
            let what = format!("traceEvents[{i}]");
            match e.get("ph").and_then(Value::as_str) {
                Some("X") => {
                    let kind = match e["cat"].as_str() {
                        Some("compute") => SpanKind::Compute,
                        Some("load") => SpanKind::Load,
                        Some("transfer") => SpanKind::Transfer,
                        other => return Err(format!("{what}: unknown span category {other:?}")),
                    };
                    events.push(Event::Span {
                        lane: u32_of(&e["tid"], &what)?,
                        actor: u32_of(&e["args"]["actor"], &what)?,
                        kind,
                        start_ns: ns(&e["ts"], &what)?,
                        dur_ns: ns(&e["dur"], &what)?,
                        bytes: e["args"]["bytes"].as_u64().unwrap_or(0),
                    });
                }
                Some("C") => events.push(Event::ChannelLevel {
                    edge: u32_of(&e["id"], &what)?,
                    t_ns: ns(&e["ts"], &what)?,
                    level: u32_of(&e["args"]["level"], &what)?,
                }),
                Some("M") => {}
                other => return Err(format!("{what}: unknown event phase {other:?}")),
            }
        }
        let start_unix_ns = w.get("start_unix_ns").and_then(Value::as_u64).unwrap_or(0);
        Ok(Trace { events, start_unix_ns })
    }
}
