//! Traces of several processes on one timeline: a split deployment's prefill and decode
//! workers, say, so that the prefill lanes, the KV edge's sends and the decode lanes read as
//! one run. Each trace's events are moved by the difference of its program's wall-clock start
//! from the earliest one's (meaningful where the processes share a clock: one box, or
//! synchronised machines), its lanes, actors and edges renumbered after the previous traces',
//! and its lanes and pools named `LABEL/name`.

use super::{Event, Trace};

/// The traces `parts` (each with its label) as one. Refused naming the label when a trace
/// does not say when it started (written before weir recorded it).
pub fn merge(parts: &[(String, Trace)]) -> Result<Trace, String> {
    if let Some((label, _)) = parts.iter().find(|(_, t)| t.start_unix_ns == 0) {
        return Err(format!(
            "trace `{label}` does not say when it started (written by an older weir): cannot line it up"
        ));
    }
    let t0 = parts.iter().map(|(_, t)| t.start_unix_ns).min().unwrap_or(0);
    let mut events = Vec::new();
    let (mut lanes, mut actors, mut edges) = (0u32, 0u32, 0u32);
    for (label, t) in parts {
        let shift = t.start_unix_ns - t0;
        let (mut max_lane, mut max_actor, mut max_edge) = (0u32, 0u32, 0u32);
        let actor = |a: u32| a + actors;
        for e in &t.events {
            events.push(match e.clone() {
                Event::LaneCreated { lane, name, kind } => {
                    max_lane = max_lane.max(lane + 1);
                    Event::LaneCreated { lane: lane + lanes, name: format!("{label}/{name}"), kind }
                }
                Event::ActorCreated { actor: a, name, kind, lane, layer } => {
                    max_actor = max_actor.max(a + 1);
                    Event::ActorCreated { actor: actor(a), name, kind, lane: lane + lanes, layer }
                }
                Event::EdgeCreated { edge, from, to, capacity } => {
                    max_edge = max_edge.max(edge + 1);
                    let end = |x: Option<(u32, u32)>| x.map(|(a, p)| (actor(a), p));
                    Event::EdgeCreated { edge: edge + edges, from: end(from), to: end(to), capacity }
                }
                Event::Span { lane, actor: a, kind, start_ns, dur_ns, bytes } => {
                    Event::Span { lane: lane + lanes, actor: actor(a), kind, start_ns: start_ns + shift, dur_ns, bytes }
                }
                Event::ChannelLevel { edge, t_ns, level } => {
                    Event::ChannelLevel { edge: edge + edges, t_ns: t_ns + shift, level }
                }
                Event::PoolPeak { pool, tier, budget, peak } => {
                    Event::PoolPeak { pool: format!("{label}/{pool}"), tier, budget, peak }
                }
            });
        }
        (lanes, actors, edges) = (lanes + max_lane, actors + max_actor, edges + max_edge);
    }
    Ok(Trace { events, start_unix_ns: t0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::SpanKind;

    fn one(lane: &str, start_unix_ns: u64, span_at: u64) -> Trace {
        Trace {
            events: vec![
                Event::LaneCreated { lane: 0, name: lane.into(), kind: "cpu".into() },
                Event::ActorCreated { actor: 0, name: "a".into(), kind: "linear".into(), lane: 0, layer: None },
                Event::EdgeCreated { edge: 0, from: None, to: Some((0, 0)), capacity: 2 },
                Event::Span { lane: 0, actor: 0, kind: SpanKind::Compute, start_ns: span_at, dur_ns: 5, bytes: 1 },
                Event::ChannelLevel { edge: 0, t_ns: span_at, level: 1 },
            ],
            start_unix_ns,
        }
    }

    #[test]
    fn traces_are_lined_up_on_the_wall_clock_and_renumbered() {
        // The decode worker started 1 µs after the prefill worker.
        let parts =
            [("prefill".to_string(), one("compute", 5_000, 100)), ("decode".to_string(), one("compute", 6_000, 50))];
        let m = merge(&parts).unwrap();
        assert_eq!(m.start_unix_ns, 5_000);
        let spans: Vec<(u32, u32, u64)> = m
            .events
            .iter()
            .filter_map(|e| {
                if let Event::Span { lane, actor, start_ns, .. } = e {
                    Some((*lane, *actor, *start_ns))
                } else {
                    None
                }
            })
            .collect();
        assert_eq!(spans, [(0, 0, 100), (1, 1, 1_050)]);
        let names: Vec<&str> = m
            .events
            .iter()
            .filter_map(|e| if let Event::LaneCreated { name, .. } = e { Some(name.as_str()) } else { None })
            .collect();
        assert_eq!(names, ["prefill/compute", "decode/compute"]);
        assert!(m.events.iter().any(|e| matches!(e, Event::EdgeCreated { edge: 1, to: Some((1, 0)), .. })));
        // Through the Chrome JSON and back, the same.
        let back = Trace::from_chrome_json(&m.to_chrome_json()).unwrap();
        assert_eq!(back.start_unix_ns, 5_000);
        assert_eq!(back.spans(), 2);
        let e = merge(&[("old".to_string(), one("x", 0, 0))]).unwrap_err();
        assert!(e.contains("`old`"), "{e}");
    }
}
