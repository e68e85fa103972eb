//! Latency against load as an SVG: three panels — p90 time between tokens, p90 time to first
//! token, p90 end to end — each against the requests per second achieved, a line per target
//! through its rates, latency on a log scale (it climbs by orders of magnitude past a server's
//! capacity).

use super::Point;
use std::fmt::Write;

const COLOURS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
const W: f64 = 330.0;
const H: f64 = 250.0;
const LEFT: f64 = 62.0;
const TOP: f64 = 52.0;
const BOTTOM: f64 = 48.0;

/// What a panel draws of a point.
type Measure = fn(&Point) -> f64;

/// The SVG document for `points` (from [`super::run`]), titled `title`.
pub fn svg(points: &[Point], title: &str) -> String {
    let mut targets: Vec<&str> = Vec::new();
    for p in points {
        if !targets.contains(&p.target.as_str()) {
            targets.push(&p.target);
        }
    }
    let panels: [(&str, Measure); 3] = [
        ("p90 time between tokens, ms", |p| p.tbt_ms.p90),
        ("p90 time to first token, ms", |p| p.ttft_ms.p90),
        ("p90 end to end, ms", |p| p.e2e_ms.p90),
    ];
    let width = LEFT + panels.len() as f64 * (W + LEFT) + 10.0;
    let height = TOP + H + BOTTOM + 22.0 * targets.len() as f64 + 10.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{LEFT}" y="20" font-size="14">{}</text>"#, escape(title));
    let x_max = nice_up(points.iter().map(|p| p.requests_per_s).fold(0.0, f64::max) * 1.05);
    for (i, (label, value)) in panels.iter().enumerate() {
        let x0 = LEFT + i as f64 * (W + LEFT);
        panel(&mut s, x0, label, x_max, points, &targets, *value);
    }
    for (k, t) in targets.iter().enumerate() {
        let y = TOP + H + BOTTOM + 22.0 * k as f64;
        let c = COLOURS[k % COLOURS.len()];
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="{c}" stroke-width="2"/><circle cx="{}" cy="{y}" r="3" fill="{c}"/><text x="{}" y="{}">{}</text>"#,
            LEFT + 30.0,
            LEFT + 15.0,
            LEFT + 38.0,
            y + 4.0,
            escape(t)
        );
    }
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, x0: f64, label: &str, x_max: f64, points: &[Point], targets: &[&str], value: Measure) {
    let ys: Vec<f64> = points.iter().map(value).filter(|v| v.is_finite() && *v > 0.0).collect();
    let (lo, hi) = ys.iter().fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let (lo, hi) = if ys.is_empty() { (1.0, 10.0) } else { (nice_down(lo), nice_up(hi.max(lo * 1.01))) };
    let px = |x: f64| x0 + x / x_max * W;
    let py = |y: f64| TOP + H - (y.ln() - lo.ln()) / (hi.ln() - lo.ln()) * H;
    let _ = writeln!(s, r##"<rect x="{x0}" y="{TOP}" width="{W}" height="{H}" fill="none" stroke="#444"/>"##);
    let _ = writeln!(s, r#"<text x="{x0}" y="{}">{}</text>"#, TOP - 8.0, escape(label));
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">requests per second</text>"#,
        x0 + W / 2.0,
        TOP + H + 36.0
    );
    for k in 0..=5 {
        let x = x_max * k as f64 / 5.0;
        let _ = writeln!(
            s,
            r##"<line x1="{0}" y1="{TOP}" x2="{0}" y2="{1}" stroke="#ddd"/><text x="{0}" y="{2}" text-anchor="middle">{3}</text>"##,
            px(x),
            TOP + H,
            TOP + H + 16.0,
            short(x)
        );
    }
    let mut decade = decade_down(lo);
    while decade <= hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let y = decade * m;
            if y > hi * 1.0001 || y < lo * 0.9999 {
                continue;
            }
            let _ = writeln!(
                s,
                r##"<line x1="{x0}" y1="{0}" x2="{1}" y2="{0}" stroke="#ddd"/><text x="{2}" y="{3}" text-anchor="end">{4}</text>"##,
                py(y),
                x0 + W,
                x0 - 5.0,
                py(y) + 4.0,
                short(y)
            );
        }
        decade *= 10.0;
    }
    for (k, t) in targets.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        // Through the rates in order (the throughput achieved may stall or fall past capacity).
        let mut line: Vec<(f64, f64, f64)> = points
            .iter()
            .filter(|p| p.target == *t && value(p).is_finite() && value(p) > 0.0)
            .map(|p| (p.rate, px(p.requests_per_s), py(value(p))))
            .collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        let pts: Vec<String> = line.iter().map(|(_, x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"/>"#, pts.join(" "));
        for (_, x, y) in line {
            let _ = writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{c}"/>"#);
        }
    }
}

/// The power of ten at or below `v`.
fn decade_down(v: f64) -> f64 {
    10f64.powf(v.log10().floor())
}

/// 1, 2 or 5 times a power of ten, at or below `v`.
fn nice_down(v: f64) -> f64 {
    let d = decade_down(v);
    [5.0, 2.0, 1.0].into_iter().map(|m| m * d).find(|&x| x <= v * 1.0001).unwrap_or(d)
}

/// 1, 2 or 5 times a power of ten, at or above `v`.
fn nice_up(v: f64) -> f64 {
    if v <= 0.0 || !v.is_finite() {
        return 1.0;
    }
    let d = decade_down(v);
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * d).find(|&x| x >= v * 0.9999).unwrap_or(10.0 * d)
}

fn short(v: f64) -> String {
    if v >= 100.0 || v == v.round() {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::Quantiles;

    fn point(target: &str, rate: f64, rps: f64, tbt: f64) -> Point {
        let q = |v: f64| Quantiles { p50: v, p90: v, p99: v };
        Point {
            target: target.into(),
            url: String::new(),
            rate,
            requests: 1,
            completed: 1,
            failed: 0,
            errors: vec![],
            seconds: 1.0,
            requests_per_s: rps,
            prompt_tokens: 1,
            output_tokens: 1,
            output_tokens_asked: 1,
            output_tokens_per_s: 1.0,
            ttft_ms: q(tbt * 10.0),
            tbt_ms: q(tbt),
            e2e_ms: q(tbt * 50.0),
        }
    }

    #[test]
    fn each_target_is_a_line_through_its_rates_inside_the_axes() {
        let pts = [point("a<b", 1.0, 0.9, 40.0), point("c", 1.0, 0.8, 60.0), point("a<b", 2.0, 1.7, 90.0)];
        let s = svg(&pts, "t & u");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        assert!(s.contains("a&lt;b") && s.contains("t &amp; u") && !s.contains("a<b"));
        // Three panels, a polyline per target in each; the first target's has two points.
        assert_eq!(s.matches("<polyline").count(), 6);
        let first = s.lines().find(|l| l.starts_with("<polyline")).unwrap();
        assert_eq!(first.split('"').nth(1).unwrap().split(' ').count(), 2);
        // Every point lies in its panel's box: the y axis spans the decades around 40–90 ms.
        for l in s.lines().filter(|l| l.starts_with("<circle")) {
            let num = |k: &str| {
                l.split(&format!("{k}=\"")).nth(1).unwrap().split('"').next().unwrap().parse::<f64>().unwrap()
            };
            let y = num("cy");
            assert!((TOP..=TOP + H).contains(&y), "{l}");
        }
        // The y axis of the first panel spans 40–90 ms on the 1-2-5 ladder: 20 to 100.
        assert!(s.contains(">20</text>") && s.contains(">50</text>") && s.contains(">100</text>"));
        assert!(!s.contains(">10</text>"));
        assert_eq!((nice_up(1.7 * 1.05), nice_up(0.3), nice_up(7.0)), (2.0, 0.5, 10.0));
        assert_eq!((nice_down(40.0), nice_down(0.3), nice_down(1.0)), (20.0, 0.2, 1.0));
    }
}
