//! `weir load` against two real `weir serve`s on loopback: the same Poisson workload sent to
//! each, every request answered with the tokens it asked for, the report's figures consistent
//! with what the servers counted, the plot drawn; a target that is not there named.

mod common;
use common::http::Served;
use common::*;
use serde_json::Value;
use std::process::Command;

fn weir_load(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_weir")).arg("load").args(args).output().expect("running weir load")
}

#[test]
fn two_servers_get_the_same_workload_and_every_request_is_answered() {
    let model = fixture("tiny-llama");
    let (a, b) = (Served::start(&model, &[]), Served::start(&model, &["--max-batch", "4"]));
    let dir = std::env::temp_dir().join(format!("weir-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (json, svg) = (dir.join("points.json"), dir.join("plot.svg"));
    let (ta, tb) = (format!("first=http://127.0.0.1:{}", a.port), format!("second=http://127.0.0.1:{}", b.port));
    let out = weir_load(&[
        "--target",
        &ta,
        "--target",
        &tb,
        "--rates",
        "20,50",
        "--requests",
        "12",
        "--prompt-len",
        "4..12",
        "--gen-len",
        "2..7",
        "--vocab",
        "384",
        "--json",
        json.to_str().unwrap(),
        "--svg",
        svg.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let points: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // Rate by rate, the targets taking turns (the order alternating).
    let order: Vec<(&str, f64)> =
        points.iter().map(|p| (p["target"].as_str().unwrap(), p["rate"].as_f64().unwrap())).collect();
    assert_eq!(order, [("first", 20.0), ("second", 20.0), ("second", 50.0), ("first", 50.0)]);
    for p in &points {
        let n = |k: &str| p[k].as_f64().unwrap();
        assert_eq!((n("completed"), n("failed")), (12.0, 0.0), "{p}");
        // `ignore_eos`: every request got the tokens it asked for, no more.
        assert_eq!(n("output_tokens"), n("output_tokens_asked"), "{p}");
        assert!((2.0 * 12.0..=7.0 * 12.0).contains(&n("output_tokens")), "{p}");
        for q in ["ttft_ms", "tbt_ms", "e2e_ms"] {
            let (p50, p90, p99) =
                (p[q]["p50"].as_f64().unwrap(), p[q]["p90"].as_f64().unwrap(), p[q]["p99"].as_f64().unwrap());
            assert!(0.0 < p50 && p50 <= p90 && p90 <= p99, "{q}: {p}");
        }
        assert!(p["ttft_ms"]["p99"].as_f64() <= p["e2e_ms"]["p99"].as_f64(), "{p}");
        assert!((n("requests_per_s") - 12.0 / n("seconds")).abs() < 1e-9, "{p}");
        assert!(
            stdout.lines().any(|l| l.starts_with(p["target"].as_str().unwrap()) && l.contains(" 12/12 ")),
            "{stdout}"
        );
    }
    // The same requests went to both: prompts and outputs alike at each rate.
    for (x, y) in [(&points[0], &points[1]), (&points[2], &points[3])] {
        assert_eq!((&x["prompt_tokens"], &x["output_tokens"]), (&y["prompt_tokens"], &y["output_tokens"]));
    }
    // What each server counted: the warm-up's 4 tokens and the workload's.
    let asked =
        |t: &str| points.iter().filter(|p| p["target"] == t).map(|p| p["output_tokens"].as_f64().unwrap()).sum::<f64>();
    assert_eq!(a.metric("weir_generated_tokens_total"), 4.0 + asked("first"));
    assert_eq!(b.metric("weir_generated_tokens_total"), 4.0 + asked("second"));
    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg") && plot.contains(">first<") && plot.contains(">second<"), "{plot}");
    assert_eq!(plot.matches("<polyline").count(), 6);
    // Drawn again from the JSON, without sending anything: the same plot.
    let again = dir.join("again.svg");
    let out = weir_load(&["--replot", json.to_str().unwrap(), "--svg", again.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&again).unwrap(), plot);
    let out = weir_load(&["--replot", svg.to_str().unwrap(), "--svg", again.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("plot.svg: not the points"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_target_that_is_not_there_is_named_and_bad_flags_are_refused() {
    // A port nothing listens on: bound, then let go.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = weir_load(&["--target", &format!("gone=http://127.0.0.1:{port}"), "--requests", "1"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&format!("target gone (http://127.0.0.1:{port})")), "{err}");
    for (args, words) in [
        (&["--target", "ftp://x"][..], "http://"),
        (&["--target", "http://127.0.0.1:1", "--prompt-len", "9..3"], "--prompt-len"),
        (&["--target", "http://127.0.0.1:1", "--rates", "1,0"], "--rates"),
        (&["--target", "http://127.0.0.1:1", "--gen-len", "x"], "--gen-len"),
    ] {
        let out = weir_load(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(words), "{args:?}: {err}");
    }
}
