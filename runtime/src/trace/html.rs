//! One self-contained HTML file: the summary, then a timeline (one row per lane, spans
//! coloured by kind, channel levels as counter tracks) with zoom (wheel), pan (drag) and a
//! tooltip (op, layer, duration, bytes). No network access is needed to open it.

use super::summary::Summary;
use super::{Event, SpanKind, Trace};
use serde_json::json;
use std::collections::HashMap;

/// Channel tracks drawn: the busiest channels by mean occupancy.
pub const MAX_CHANNEL_TRACKS: usize = 24;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The HTML report of a trace.
pub fn render(t: &Trace, title: &str) -> String {
    let summary = Summary::of(t);
    let mut lanes = Vec::new();
    let mut actors: HashMap<u32, usize> = HashMap::new();
    let mut actor_list = Vec::new();
    for e in &t.events {
        match e {
            Event::LaneCreated { lane, name, kind } => lanes.push(json!({"id": lane, "name": name, "kind": kind})),
            Event::ActorCreated { actor, name, kind, layer, .. } => {
                actors.insert(*actor, actor_list.len());
                actor_list.push(json!([name, kind, layer]));
            }
            _ => {}
        }
    }
    let t0 = summary.start_ns;
    let us = |ns: u64| (ns.saturating_sub(t0)) as f64 / 1000.0;
    let spans: Vec<_> = t
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Span { lane, actor, kind, start_ns, dur_ns, bytes } => {
                let k = match kind {
                    SpanKind::Compute => 0,
                    SpanKind::Load => 1,
                    SpanKind::Transfer => 2,
                };
                Some(json!([
                    lane,
                    us(*start_ns),
                    *dur_ns as f64 / 1000.0,
                    k,
                    actors.get(actor).copied().unwrap_or(0),
                    bytes
                ]))
            }
            _ => None,
        })
        .collect();
    let mut busiest: Vec<_> = summary.channels.iter().filter(|c| c.max > 0).collect();
    busiest.sort_by(|a, b| b.mean.total_cmp(&a.mean).then(a.edge.cmp(&b.edge)));
    busiest.truncate(MAX_CHANNEL_TRACKS);
    let counters: Vec<_> = busiest
        .iter()
        .map(|c| {
            let pts: Vec<_> = t
                .events
                .iter()
                .filter_map(|e| match e {
                    Event::ChannelLevel { edge, t_ns, level } if *edge == c.edge => Some(json!([us(*t_ns), level])),
                    _ => None,
                })
                .collect();
            json!({"label": format!("{}: {}", c.edge, c.label), "cap": c.capacity, "points": pts})
        })
        .collect();
    let data = json!({"lanes": lanes, "actors": actor_list, "spans": spans, "counters": counters, "end_us": us(summary.end_ns)});
    // `</` must not appear inside the script element.
    let data = serde_json::to_string(&data).unwrap_or_default().replace("</", "<\\/");
    TEMPLATE
        .replace("{{TITLE}}", &escape(title))
        .replace("{{SUMMARY}}", &escape(&summary.to_text()))
        .replace("{{DATA}}", &data)
}

const TEMPLATE: &str = r##"<!doctype html>
<html><head><meta charset="utf-8"><title>weir trace — {{TITLE}}</title>
<style>
body { font: 13px system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 8px; }
pre { background: #f6f6f6; padding: 8px; overflow: auto; max-height: 38vh; font-size: 12px; }
#wrap { position: relative; border: 1px solid #ccc; }
canvas { display: block; cursor: grab; }
#tip { position: absolute; pointer-events: none; background: #fffbe6; border: 1px solid #999; padding: 4px 6px; font-size: 12px; display: none; white-space: pre; }
.legend span { display: inline-block; width: 12px; height: 12px; margin: 0 4px 0 12px; vertical-align: middle; }
</style></head>
<body>
<h1>weir trace — {{TITLE}}</h1>
<details open><summary>Summary</summary><pre id="summary">{{SUMMARY}}</pre></details>
<p class="legend">Timeline: wheel to zoom, drag to pan, hover for details, double-click to reset.
<span style="background:#4e79a7"></span>compute <span style="background:#f28e2b"></span>load <span style="background:#59a14f"></span>transfer <span style="background:#b07aa1"></span>channel level</p>
<div id="status"></div>
<div id="wrap"><canvas id="tl"></canvas><div id="tip"></div></div>
<script>
const DATA = {{DATA}};
(function () {
  const COLORS = ["#4e79a7", "#f28e2b", "#59a14f"], KINDS = ["compute", "load", "transfer"];
  const LANE_H = 26, CH_H = 18, HEAD = 22, LABEL_W = 260;
  const canvas = document.getElementById("tl"), ctx = canvas.getContext("2d"), tip = document.getElementById("tip");
  const lanes = DATA.lanes, rowOf = new Map(lanes.map((l, i) => [l.id, i]));
  const byLane = lanes.map(() => []);
  for (const s of DATA.spans) { const r = rowOf.get(s[0]); if (r !== undefined) byLane[r].push(s); }
  byLane.forEach(a => a.sort((x, y) => x[1] - y[1]));
  const end = Math.max(DATA.end_us, 1e-3);
  let t0 = 0, t1 = end, drawn = 0;
  const W = () => canvas.width - LABEL_W, H = HEAD + lanes.length * LANE_H + DATA.counters.length * CH_H + 4;
  function resize() { canvas.width = Math.max(600, document.getElementById("wrap").clientWidth); canvas.height = H; draw(); }
  const x = t => LABEL_W + (t - t0) / (t1 - t0) * W();
  function fmt(us) { return us >= 1000 ? (us / 1000).toFixed(3) + " ms" : us.toFixed(1) + " µs"; }
  function draw() {
    ctx.clearRect(0, 0, canvas.width, canvas.height); drawn = 0;
    ctx.fillStyle = "#666"; ctx.font = "11px sans-serif";
    for (let i = 0; i <= 8; i++) { const t = t0 + (t1 - t0) * i / 8, px = LABEL_W + W() * i / 8; ctx.fillText(fmt(t), px + 2, 14); ctx.fillStyle = "#eee"; ctx.fillRect(px, HEAD, 1, canvas.height); ctx.fillStyle = "#666"; }
    lanes.forEach((l, r) => {
      const y = HEAD + r * LANE_H;
      ctx.fillStyle = r % 2 ? "#fafafa" : "#fff"; ctx.fillRect(0, y, canvas.width, LANE_H);
      ctx.fillStyle = "#222"; ctx.font = "12px sans-serif"; ctx.fillText(l.name + " (" + l.kind + ")", 4, y + 17);
      for (const s of byLane[r]) {
        if (s[1] + s[2] < t0 || s[1] > t1) continue;
        const a = Math.max(x(s[1]), LABEL_W), b = Math.min(x(s[1] + s[2]), canvas.width);
        ctx.fillStyle = COLORS[s[3]]; ctx.fillRect(a, y + 3, Math.max(b - a, 1), LANE_H - 6); drawn++;
      }
    });
    DATA.counters.forEach((c, i) => {
      const y = HEAD + lanes.length * LANE_H + i * CH_H;
      ctx.fillStyle = "#222"; ctx.font = "10px sans-serif"; ctx.fillText(c.label.slice(0, 44), 4, y + 13);
      ctx.fillStyle = "#b07aa1"; let lvl = 0, prev = 0;
      const seg = (a, b, l) => { if (l > 0 && b > t0 && a < t1) { const xa = Math.max(x(a), LABEL_W), xb = Math.min(x(b), canvas.width), h = (CH_H - 4) * l / Math.max(c.cap, 1); ctx.fillRect(xa, y + CH_H - 2 - h, Math.max(xb - xa, 1), h); } };
      for (const p of c.points) { seg(prev, p[0], lvl); prev = p[0]; lvl = p[1]; }
      seg(prev, end, lvl);
    });
    const st = document.getElementById("status");
    st.dataset.lanes = lanes.length; st.dataset.spans = DATA.spans.length; st.dataset.drawnSpans = drawn; st.dataset.counters = DATA.counters.length;
    st.textContent = lanes.length + " lanes, " + DATA.spans.length + " spans (" + drawn + " in view), " + DATA.counters.length + " channel tracks; view " + fmt(t0) + " – " + fmt(t1);
  }
  function spanAt(px, py) {
    const r = Math.floor((py - HEAD) / LANE_H);
    if (r < 0 || r >= lanes.length || px < LABEL_W) return null;
    const t = t0 + (px - LABEL_W) / W() * (t1 - t0), slack = 2 * (t1 - t0) / W();
    let best = null;
    for (const s of byLane[r]) { if (s[1] - slack <= t && t <= s[1] + s[2] + slack) best = s; if (s[1] > t + slack) break; }
    return best;
  }
  canvas.addEventListener("wheel", e => {
    e.preventDefault();
    const px = e.offsetX, t = t0 + Math.max(0, px - LABEL_W) / W() * (t1 - t0), f = e.deltaY > 0 ? 1.25 : 0.8;
    t0 = Math.max(0, t - (t - t0) * f); t1 = Math.min(end, t + (t1 - t) * f); if (t1 - t0 < 1e-3) t1 = t0 + 1e-3; draw();
  }, { passive: false });
  let drag = null;
  canvas.addEventListener("mousedown", e => { drag = { x: e.offsetX, t0, t1 }; canvas.style.cursor = "grabbing"; });
  window.addEventListener("mouseup", () => { drag = null; canvas.style.cursor = "grab"; });
  canvas.addEventListener("dblclick", () => { t0 = 0; t1 = end; draw(); });
  canvas.addEventListener("mousemove", e => {
    if (drag) {
      const dt = (e.offsetX - drag.x) / W() * (drag.t1 - drag.t0), w = drag.t1 - drag.t0;
      t0 = Math.min(Math.max(0, drag.t0 - dt), end - w); t1 = t0 + w; draw(); return;
    }
    const s = spanAt(e.offsetX, e.offsetY);
    if (!s) { tip.style.display = "none"; return; }
    const a = DATA.actors[s[4]] || ["?", "?", null];
    tip.textContent = a[0] + "\nop: " + a[1] + (a[2] === null ? "" : "\nlayer: " + a[2]) + "\nkind: " + KINDS[s[3]] + "\nstart: " + fmt(s[1]) + "\nduration: " + fmt(s[2]) + "\nbytes: " + s[5].toLocaleString();
    tip.style.left = (e.offsetX + 12) + "px"; tip.style.top = (e.offsetY + 12) + "px"; tip.style.display = "block";
  });
  window.addEventListener("resize", resize);
  resize();
})();
</script>
</body></html>
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_is_self_contained_and_carries_every_span() {
        let t = Trace {
            events: vec![
                Event::LaneCreated { lane: 0, name: "compute<1>".into(), kind: "cpu[0]".into() },
                Event::ActorCreated {
                    actor: 0,
                    name: "a</script>".into(),
                    kind: "linear".into(),
                    lane: 0,
                    layer: Some(3),
                },
                Event::Span { lane: 0, actor: 0, kind: SpanKind::Compute, start_ns: 1000, dur_ns: 500, bytes: 64 },
            ],
            start_unix_ns: 0,
        };
        let html = render(&t, "test");
        assert!(
            !html.contains("http://") && !html.contains("https://") && !html.contains("src="),
            "no external resources"
        );
        assert_eq!(html.matches("</script>").count(), 1, "the data cannot close the script early");
        assert!(html.contains("compute&lt;1&gt;"), "the summary is escaped");
        assert!(
            html.contains(r#""spans":[[0,0.0,0.5,0,0,64]]"#),
            "{}",
            &html[html.find("const DATA").unwrap()..][..300]
        );
    }
}
