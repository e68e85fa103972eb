//! What a trace says, in numbers: per lane busy time and utilisation, per operator kind total
//! time, for each pair of lanes the fraction of time both were busy (overlap of transfer and
//! compute), bytes and GB/s per link, and channel occupancy (mean, max, time full, time empty:
//! a full channel means its consumer is the bottleneck, an empty one its producer).

use super::{chrome::edge_labels, Event, SpanKind, Trace};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

/// One lane's time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LaneStat {
    pub lane: u32,
    pub name: String,
    pub kind: String,
    pub spans: u64,
    pub busy_ns: u64,
    /// busy ÷ the trace's window.
    pub utilisation: f64,
}

/// One operator kind's time.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpStat {
    pub kind: String,
    pub count: u64,
    pub total_ns: u64,
}

/// Two lanes busy at once.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Overlap {
    pub a: String,
    pub b: String,
    /// Time both were busy ÷ the window.
    pub both_busy: f64,
}

/// Bytes moved over one link.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LinkStat {
    pub link: String,
    pub bytes: u64,
    pub busy_ns: u64,
    pub gb_per_s: f64,
}

/// One channel's occupancy over the window.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChannelStat {
    pub edge: u32,
    pub label: String,
    pub capacity: u32,
    pub mean: f64,
    pub max: u32,
    /// Fraction of the window the channel was full (consumer-bound).
    pub full: f64,
    /// Fraction of the window the channel was empty (producer-bound).
    pub empty: f64,
}

/// Everything `weir trace summary` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    /// The window: from the first event to the last, in ns.
    pub start_ns: u64,
    pub end_ns: u64,
    pub lanes: Vec<LaneStat>,
    pub ops: Vec<OpStat>,
    pub overlaps: Vec<Overlap>,
    pub links: Vec<LinkStat>,
    pub channels: Vec<ChannelStat>,
    /// Per memory pool: (name, tier, budget — `None` if unbudgeted —, peak bytes).
    pub pools: Vec<(String, String, Option<u64>, u64)>,
}

/// Sorted, merged intervals.
fn merge(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

fn measure(v: &[(u64, u64)]) -> u64 {
    v.iter().map(|(s, e)| e - s).sum()
}

fn intersect(a: &[(u64, u64)], b: &[(u64, u64)]) -> u64 {
    let (mut i, mut j, mut total) = (0, 0, 0);
    while i < a.len() && j < b.len() {
        let (s, e) = (a[i].0.max(b[j].0), a[i].1.min(b[j].1));
        if s < e {
            total += e - s;
        }
        if a[i].1 < b[j].1 {
            i += 1;
        } else {
            j += 1;
        }
    }
    total
}

/// Every pair of lanes: the share of the window both were busy.
fn overlaps(
    lanes: &BTreeMap<u32, (String, String)>,
    busy: &BTreeMap<u32, Vec<(u64, u64)>>,
    window: f64,
) -> Vec<Overlap> {
    let mut out = Vec::new();
    let ids: Vec<u32> = lanes.keys().copied().collect();
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            let both = match (busy.get(a), busy.get(b)) {
                (Some(x), Some(y)) => intersect(x, y),
                _ => 0,
            };
            out.push(Overlap { a: lanes[a].0.clone(), b: lanes[b].0.clone(), both_busy: both as f64 / window });
        }
    }
    out
}

/// An edge's occupancy over the window `(start, end)` from its level changes.
fn channel(edge: u32, label: String, cap: u32, mut evs: Vec<(u64, u32)>, (start, end): (u64, u64)) -> ChannelStat {
    let window = (end - start).max(1) as f64;
    evs.sort_by_key(|e| e.0);
    let (mut t_prev, mut lvl) = (start, 0u32);
    let (mut area, mut full, mut empty, mut max) = (0f64, 0u64, 0u64, 0u32);
    for (t, l) in evs.iter().copied().chain(std::iter::once((end, u32::MAX))) {
        let dt = t.saturating_sub(t_prev);
        area += lvl as f64 * dt as f64;
        if lvl >= cap {
            full += dt;
        }
        if lvl == 0 {
            empty += dt;
        }
        if l == u32::MAX {
            break;
        }
        t_prev = t_prev.max(t);
        lvl = l;
        max = max.max(l);
    }
    ChannelStat {
        edge,
        label,
        capacity: cap,
        mean: area / window,
        max,
        full: full as f64 / window,
        empty: empty as f64 / window,
    }
}

impl Summary {
    /// Computes the summary of a trace.
    pub fn of(t: &Trace) -> Summary {
        let mut lanes: BTreeMap<u32, (String, String)> = BTreeMap::new();
        let mut actor_kind: HashMap<u32, String> = HashMap::new();
        let mut caps: BTreeMap<u32, u32> = BTreeMap::new();
        let mut busy: BTreeMap<u32, Vec<(u64, u64)>> = BTreeMap::new();
        let mut spans: HashMap<u32, u64> = HashMap::new();
        let mut ops: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut links: BTreeMap<String, (u64, Vec<(u64, u64)>)> = BTreeMap::new();
        let mut levels: BTreeMap<u32, Vec<(u64, u32)>> = BTreeMap::new();
        let (mut start, mut end) = (u64::MAX, 0u64);
        for e in &t.events {
            match e {
                Event::LaneCreated { lane, name, kind } => {
                    lanes.insert(*lane, (name.clone(), kind.clone()));
                }
                Event::ActorCreated { actor, kind, .. } => {
                    actor_kind.insert(*actor, kind.clone());
                }
                Event::EdgeCreated { edge, capacity, .. } => {
                    caps.insert(*edge, *capacity);
                }
                _ => {}
            }
        }
        for e in &t.events {
            match e {
                Event::Span { lane, actor, kind, start_ns, dur_ns, bytes } => {
                    let iv = (*start_ns, start_ns + dur_ns);
                    start = start.min(iv.0);
                    end = end.max(iv.1);
                    busy.entry(*lane).or_default().push(iv);
                    *spans.entry(*lane).or_default() += 1;
                    let k = actor_kind.get(actor).cloned().unwrap_or_else(|| "?".into());
                    let o = ops.entry(k).or_default();
                    o.0 += 1;
                    o.1 += dur_ns;
                    if *kind != SpanKind::Compute {
                        let lane_name = lanes.get(lane).map_or("?", |l| l.0.as_str());
                        let link = match kind {
                            SpanKind::Load => format!("storage -> host (lane {lane_name})"),
                            _ => format!("transfer (lane {lane_name})"),
                        };
                        let l = links.entry(link).or_default();
                        l.0 += bytes;
                        l.1.push(iv);
                    }
                }
                Event::ChannelLevel { edge, t_ns, level } => {
                    start = start.min(*t_ns);
                    end = end.max(*t_ns);
                    levels.entry(*edge).or_default().push((*t_ns, *level));
                }
                _ => {}
            }
        }
        if start > end {
            start = 0;
            end = 0;
        }
        let window = (end - start).max(1) as f64;
        let merged: BTreeMap<u32, Vec<(u64, u64)>> = busy.into_iter().map(|(l, v)| (l, merge(v))).collect();
        let lane_stats: Vec<LaneStat> = lanes
            .iter()
            .map(|(id, (name, kind))| {
                let b = merged.get(id).map_or(0, |v| measure(v));
                LaneStat {
                    lane: *id,
                    name: name.clone(),
                    kind: kind.clone(),
                    spans: spans.get(id).copied().unwrap_or(0),
                    busy_ns: b,
                    utilisation: b as f64 / window,
                }
            })
            .collect();
        let overlaps = overlaps(&lanes, &merged, window);
        let mut op_stats: Vec<OpStat> =
            ops.into_iter().map(|(kind, (count, total_ns))| OpStat { kind, count, total_ns }).collect();
        op_stats.sort_by_key(|o| std::cmp::Reverse(o.total_ns));
        let link_stats = links
            .into_iter()
            .map(|(link, (bytes, ivs))| {
                let busy_ns = measure(&merge(ivs));
                LinkStat { link, bytes, busy_ns, gb_per_s: bytes as f64 / busy_ns.max(1) as f64 }
            })
            .collect();
        let labels = edge_labels(t);
        let channels = caps
            .iter()
            .map(|(edge, cap)| {
                let label = labels.get(edge).cloned().unwrap_or_default();
                channel(*edge, label, *cap, levels.remove(edge).unwrap_or_default(), (start, end))
            })
            .collect();
        let pools = t
            .events
            .iter()
            .filter_map(|e| match e {
                Event::PoolPeak { pool, tier, budget, peak } => Some((pool.clone(), tier.clone(), *budget, *peak)),
                _ => None,
            })
            .collect();
        Summary {
            start_ns: start,
            end_ns: end,
            lanes: lane_stats,
            ops: op_stats,
            overlaps,
            links: link_stats,
            channels,
            pools,
        }
    }

    /// The summary as text: a few tables.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let ms = |ns: u64| ns as f64 / 1e6;
        let _ = writeln!(s, "window {:.3} ms", ms(self.end_ns - self.start_ns));
        let _ = writeln!(s, "\nlanes                         spans      busy ms  utilisation");
        for l in &self.lanes {
            let _ = writeln!(
                s,
                "  {:<26} {:>7} {:>12.3} {:>11.1}%",
                format!("{} ({})", l.name, l.kind),
                l.spans,
                ms(l.busy_ns),
                100.0 * l.utilisation
            );
        }
        let _ = writeln!(s, "\noperators                     count     total ms");
        for o in &self.ops {
            let _ = writeln!(s, "  {:<26} {:>7} {:>12.3}", o.kind, o.count, ms(o.total_ns));
        }
        let _ = writeln!(s, "\nlane pairs: time both busy (overlap)");
        for o in &self.overlaps {
            let _ = writeln!(s, "  {:<26} {:>6.1}%", format!("{} + {}", o.a, o.b), 100.0 * o.both_busy);
        }
        let _ = writeln!(s, "\nlinks                                          bytes      GB/s");
        for l in &self.links {
            let _ = writeln!(s, "  {:<40} {:>12} {:>9.2}", l.link, l.bytes, l.gb_per_s);
        }
        if !self.pools.is_empty() {
            let _ = writeln!(s, "\nmemory pools                        peak bytes       budget");
            for (name, tier, budget, peak) in &self.pools {
                let budget = budget.map_or("unbudgeted".to_string(), |b| b.to_string());
                let _ = writeln!(s, "  {:<30} {:>14} {:>12}", format!("{name} ({tier})"), peak, budget);
            }
        }
        let _ = writeln!(s, "\nchannels (full: consumer is the bottleneck; empty: producer is)");
        let _ = writeln!(s, "  {:<52} {:>4} {:>6} {:>4} {:>7} {:>7}", "edge", "cap", "mean", "max", "full", "empty");
        let mut ch: Vec<&ChannelStat> = self.channels.iter().collect();
        ch.sort_by(|a, b| b.full.total_cmp(&a.full).then(a.edge.cmp(&b.edge)));
        const SHOWN: usize = 40;
        for c in ch.iter().take(SHOWN) {
            let _ = writeln!(
                s,
                "  {:<52} {:>4} {:>6.2} {:>4} {:>6.1}% {:>6.1}%",
                format!("{}: {}", c.edge, c.label),
                c.capacity,
                c.mean,
                c.max,
                100.0 * c.full,
                100.0 * c.empty
            );
        }
        if ch.len() > SHOWN {
            let _ = writeln!(s, "  … {} more (the HTML report lists all)", ch.len() - SHOWN);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace() -> Trace {
        let mut ev = vec![
            Event::LaneCreated { lane: 0, name: "compute".into(), kind: "cpu[0]".into() },
            Event::LaneCreated { lane: 1, name: "loader".into(), kind: "io".into() },
            Event::ActorCreated { actor: 0, name: "load".into(), kind: "load".into(), lane: 1, layer: None },
            Event::ActorCreated { actor: 1, name: "mm".into(), kind: "linear".into(), lane: 0, layer: Some(0) },
            Event::EdgeCreated { edge: 0, from: Some((0, 0)), to: Some((1, 1)), capacity: 2 },
        ];
        // Loader busy 0..40 and 60..100 (4000 bytes each); compute busy 20..80.
        ev.push(Event::Span { lane: 1, actor: 0, kind: SpanKind::Load, start_ns: 0, dur_ns: 40, bytes: 4000 });
        ev.push(Event::Span { lane: 1, actor: 0, kind: SpanKind::Load, start_ns: 60, dur_ns: 40, bytes: 4000 });
        ev.push(Event::Span { lane: 0, actor: 1, kind: SpanKind::Compute, start_ns: 20, dur_ns: 60, bytes: 0 });
        // The edge: empty 0..10, 1 message 10..50, full (2) 50..100.
        ev.push(Event::ChannelLevel { edge: 0, t_ns: 10, level: 1 });
        ev.push(Event::ChannelLevel { edge: 0, t_ns: 50, level: 2 });
        ev.push(Event::PoolPeak { pool: "host".into(), tier: "Host".into(), budget: Some(1000), peak: 900 });
        ev.push(Event::PoolPeak { pool: "kv".into(), tier: "Host".into(), budget: None, peak: 300 });
        Trace { events: ev, start_unix_ns: 0 }
    }

    #[test]
    fn busy_overlap_links_and_occupancy_are_computed_from_the_events() {
        let s = Summary::of(&trace());
        assert_eq!((s.start_ns, s.end_ns), (0, 100));
        assert_eq!(s.lanes[0].busy_ns, 60);
        assert_eq!(s.lanes[1].busy_ns, 80);
        assert!((s.overlaps[0].both_busy - 0.40).abs() < 1e-9, "{:?}", s.overlaps); // 20..40 and 60..80
        assert_eq!(s.links[0].bytes, 8000);
        assert!((s.links[0].gb_per_s - 100.0).abs() < 1e-9); // 8000 bytes in 80 ns
        let c = &s.channels[0];
        assert_eq!((c.max, c.capacity), (2, 2));
        assert!((c.empty - 0.10).abs() < 1e-9 && (c.full - 0.50).abs() < 1e-9, "{c:?}");
        assert!((c.mean - (40.0 + 100.0) / 100.0).abs() < 1e-9, "{c:?}");
        assert_eq!(s.ops[0].kind, "load");
        let text = s.to_text();
        assert!(text.contains("compute (cpu[0])") && text.contains("load[0] -> mm[1]"), "{text}");
        assert_eq!(s.pools[0], ("host".to_string(), "Host".to_string(), Some(1000), 900));
        assert!(text.contains("host (Host)") && text.contains("900"), "{text}");
        // An unbudgeted pool says so, not the largest number there is.
        let kv = text.lines().find(|l| l.contains("kv (Host)")).expect("the kv pool's line");
        assert!(kv.ends_with("unbudgeted") && !text.contains(&u64::MAX.to_string()), "{text}");
    }

    #[test]
    fn transfers_are_a_link_of_their_own() {
        let mut t = trace();
        t.events.push(Event::Span {
            lane: 1,
            actor: 0,
            kind: SpanKind::Transfer,
            start_ns: 40,
            dur_ns: 10,
            bytes: 5000,
        });
        let s = Summary::of(&t);
        let link = s.links.iter().find(|l| l.link == "transfer (lane loader)").expect("a transfer link");
        assert_eq!(link.bytes, 5000);
        assert!((link.gb_per_s - 500.0).abs() < 1e-9);
        // The loader lane is now busy 0..50 and 60..100.
        assert_eq!(s.lanes[1].busy_ns, 90);
    }

    #[test]
    fn chrome_json_reads_back_into_the_same_summary() {
        let t = trace();
        let back = Trace::from_chrome_json(&t.to_chrome_json()).unwrap();
        assert_eq!(Summary::of(&back).to_text(), Summary::of(&t).to_text());
        assert!(Trace::from_chrome_json("{}").unwrap_err().contains("not a weir trace"));
        // A trace written before `null` meant unbudgeted gave the largest number instead.
        let old = t.to_chrome_json().replace("\"budget\":null", &format!("\"budget\":{}", u64::MAX));
        assert_ne!(old, t.to_chrome_json());
        assert_eq!(Summary::of(&Trace::from_chrome_json(&old).unwrap()).to_text(), Summary::of(&t).to_text());
        assert!(Trace::from_chrome_json("[1,").unwrap_err().contains("not JSON"));
    }
}
