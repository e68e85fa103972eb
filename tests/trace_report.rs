//! `weir trace summary` and `weir trace html`, end to end; the HTML checked in a real headless
//! browser (Chromium) when one is installed.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

fn weir(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weir")).args(args).output().expect("run weir")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A trace of a real run: 2 layers, 8 tokens, on two CPU lanes (layer 1 on the second).
fn make_trace(dir: &Path) -> PathBuf {
    let trace = dir.join("run.trace.json");
    let graph = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs/two-lanes.weir");
    let o = weir(&[
        "run",
        "--model",
        s(&fixture("tiny-llama")),
        "--graph",
        s(&graph),
        "--threads",
        "1",
        "--prompt",
        "The man",
        "--max-new-tokens",
        "8",
        "--trace",
        s(&trace),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    trace
}

#[test]
fn summary_reports_lanes_operators_overlap_links_and_channels() {
    let dir = tmpdir("trace-summary");
    let trace = make_trace(&dir);
    let o = weir(&["trace", "summary", s(&trace), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let lanes = v["lanes"].as_array().unwrap();
    assert_eq!(lanes.len(), 3, "compute, second, loader");
    for l in lanes {
        let u = l["utilisation"].as_f64().unwrap();
        assert!(u > 0.0 && u <= 1.0, "{l}");
    }
    let ops: Vec<&str> = v["ops"].as_array().unwrap().iter().map(|o| o["kind"].as_str().unwrap()).collect();
    for k in ["linear", "attention", "swiglu", "load", "sampler"] {
        assert!(ops.contains(&k), "{ops:?}");
    }
    assert_eq!(v["overlaps"].as_array().unwrap().len(), 3, "one per pair of lanes");
    let link = &v["links"][0];
    assert_eq!(
        link["bytes"].as_u64().unwrap(),
        std::fs::metadata(fixture("tiny-llama").join("model.safetensors")).unwrap().len() - header_len(),
        "every weight byte read once"
    );
    let chans = v["channels"].as_array().unwrap();
    assert!(chans
        .iter()
        .any(|c| c["max"].as_u64().unwrap() >= 1 && c["label"].as_str().unwrap().contains("l1/attn_norm")));
    for c in chans {
        let (full, empty) = (c["full"].as_f64().unwrap(), c["empty"].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&full) && (0.0..=1.0).contains(&empty) && full + empty <= 1.0 + 1e-9, "{c}");
    }
    let text = String::from_utf8(weir(&["trace", "summary", s(&trace)]).stdout).unwrap();
    assert!(text.contains("lane pairs") && text.contains("second (cpu["));
    // A broken trace file gets a clear error.
    let bad = dir.join("bad.json");
    std::fs::write(&bad, "{\"traceEvents\": []}").unwrap();
    let o = weir(&["trace", "summary", s(&bad)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("bad.json")
            && err.contains("not a weir trace")
            && !err.contains("panicked"),
        "{err}"
    );
    std::fs::write(&bad, "{\"traceEvents\": [{\"ph\": \"X\", \"cat\": \"compute\", \"tid\": 0, \"ts\": -1}], \"weir\": {\"format\": 1, \"lanes\": [], \"actors\": [], \"edges\": []}}").unwrap();
    let err = String::from_utf8_lossy(&weir(&["trace", "summary", s(&bad)]).stderr).to_string();
    assert!(err.contains("traceEvents[0]"), "{err}");
    let o = weir(&["trace", "html", "/nonexistent/t.json", "-o", s(&dir.join("x.html"))]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("/nonexistent/t.json"));
    std::fs::remove_dir_all(dir).unwrap();
}

fn header_len() -> u64 {
    let b = std::fs::read(fixture("tiny-llama").join("model.safetensors")).unwrap();
    8 + u64::from_le_bytes(b[..8].try_into().unwrap())
}

fn chromium() -> Option<PathBuf> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

fn browser(args: &[&str], profile: &Path) -> std::process::Output {
    let chrome = chromium().unwrap();
    Command::new(chrome)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("run chromium")
}

#[test]
fn the_html_timeline_renders_every_lane_and_span_in_a_real_browser() {
    if chromium().is_none() {
        eprintln!(
            "skipped: chromium is not installed (apt-get install chromium); the HTML was not checked in a browser"
        );
        return;
    }
    let dir = tmpdir("trace-html");
    let trace = make_trace(&dir);
    let html = dir.join("trace.html");
    let o = weir(&["trace", "html", s(&trace), "-o", s(&html)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let t = weir::Trace::from_chrome_json(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let lanes = t.events.iter().filter(|e| matches!(e, weir_runtime::Event::LaneCreated { .. })).count();
    let url = format!("file://{}", html.display());
    let o =
        browser(&["--virtual-time-budget=3000", "--window-size=1400,900", "--dump-dom", &url], &dir.join("profile"));
    let dom = String::from_utf8_lossy(&o.stdout);
    let attr = |name: &str| -> usize {
        let key = format!("data-{name}=\"");
        let i =
            dom.find(&key).unwrap_or_else(|| panic!("no {key} in the rendered page:\n{}", &dom[..dom.len().min(2000)]));
        dom[i + key.len()..].split('"').next().unwrap().parse().unwrap()
    };
    assert_eq!(attr("lanes"), lanes, "one timeline row per lane");
    assert_eq!(attr("spans"), t.spans());
    assert_eq!(attr("drawn-spans"), t.spans(), "the initial view draws every span");
    assert!(attr("counters") >= 1, "channel levels drawn as counter tracks");
    // A screenshot, kept for people to look at.
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("trace-timeline.png");
    let _ = std::fs::remove_file(&shot);
    browser(&["--window-size=1400,900", &format!("--screenshot={}", shot.display()), &url], &dir.join("profile2"));
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "screenshot of {} bytes", png.len());
    eprintln!("screenshot: {}", shot.display());
    std::fs::remove_dir_all(dir).unwrap();
}
