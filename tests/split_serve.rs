//! A split deployment on loopback, as clients use it: `weir route` in front of `weir serve
//! --role prefill` and `--role decode` workers (separate processes, the KV cache streamed
//! between them over a remote edge), answering as one colocated `weir serve` does; and what
//! happens when a worker is killed.

mod common;
use common::http::Served;
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

fn text_of(v: &Value) -> String {
    let c = &v["choices"][0];
    c["text"].as_str().or(c["message"]["content"].as_str()).or(c["delta"]["content"].as_str()).unwrap_or("").into()
}

fn streamed_text(events: &[String]) -> String {
    events.iter().filter(|e| *e != "[DONE]").map(|e| text_of(&serde_json::from_str(e).unwrap())).collect()
}

fn prefill(model: &std::path::Path) -> Served {
    // Chunks of 8 tokens: the KV cache goes layer by layer, several pieces per layer.
    Served::start(model, &["--role", "prefill", "--max-pass-tokens", "8"])
}

fn decode(model: &std::path::Path) -> Served {
    Served::start(model, &["--role", "decode"])
}

#[test]
fn routed_split_answers_equal_a_colocated_server_for_dense_and_moe() {
    for name in ["tiny-llama", "tiny-mixtral"] {
        let model = fixture(name);
        let (colocated, p, d) = (Served::start(&model, &[]), prefill(&model), decode(&model));
        let router = Served::route(&[&p], &[&d]);
        let golden = golden(name);
        for prompt in golden["prompts"].as_array().unwrap() {
            let n = ids(&prompt["greedy"]["new_ids"]).len();
            let prompt = ids(&prompt["input_ids"]);
            let body = json!({"prompt": prompt, "max_tokens": n, "temperature": 0});
            let want = colocated.post("/v1/completions", &body.to_string()).json();
            let got = router.post("/v1/completions", &body.to_string());
            assert_eq!(got.status, 200, "{name}: {}", got.body);
            let got = got.json();
            assert_eq!(text_of(&got), text_of(&want), "{name}");
            assert_eq!(got["usage"], want["usage"], "{name}");
            assert_eq!(got["choices"][0]["finish_reason"], want["choices"][0]["finish_reason"]);
            // Streamed, with the usage.
            let body = json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": true,
                              "stream_options": {"include_usage": true}});
            let r = router.post("/v1/completions", &body.to_string());
            assert_eq!(r.header("content-type"), Some("text/event-stream"));
            let events = r.events();
            assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{name}: {}", r.body);
            assert_eq!(streamed_text(&events), text_of(&want), "{name}");
        }
        // The decode worker took every prompt's KV cache from the prefill worker; it prefilled nothing.
        let prompts: f64 =
            golden["prompts"].as_array().unwrap().iter().map(|p| ids(&p["input_ids"]).len() as f64).sum();
        assert_eq!(p.metric("weir_prompt_tokens_total"), 2.0 * prompts, "{name}");
        // A bad request is refused by the decode worker with OpenAI's error, through the router.
        let r = router.post("/v1/completions", r#"{"prompt": [1, 2], "max_tokens": -3}"#);
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.json()["error"]["param"], "max_tokens");
    }
}

#[test]
fn killed_workers_end_their_requests_clearly_and_the_router_serves_on() {
    let model = fixture("tiny-llama");
    let (p1, p2) = (prefill(&model), prefill(&model));
    let (mut d1, d2) = (decode(&model), decode(&model));
    let router = Served::route(&[&p1, &p2], &[&d1, &d2]);
    let long =
        json!({"prompt": [1, 54, 74, 71], "max_tokens": 240, "ignore_eos": true, "temperature": 0, "stream": true});
    // Requests go to the least loaded decode worker: two long ones in flight take one each.
    let port = router.port;
    let streams: Vec<_> = (0..2)
        .map(|_| {
            let body = long.to_string();
            std::thread::spawn(move || common::http::request(port, "POST", "/v1/completions", Some(body.as_bytes())))
        })
        .collect();
    // Killed while it decodes.
    let deadline = Instant::now() + Duration::from_secs(20);
    while d1.metric("weir_running_sequences") < 1.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let t = Instant::now();
    let mut c = d1.child.take().unwrap();
    c.kill().unwrap(); // SIGKILL
    c.wait().unwrap();
    let results: Vec<_> = streams.into_iter().map(|s| s.join().unwrap()).collect();
    assert!(t.elapsed() < Duration::from_secs(60), "the requests ended within a bounded time");
    let broken: Vec<_> = results.iter().filter(|r| r.events().last().map(String::as_str) != Some("[DONE]")).collect();
    assert_eq!(broken.len(), 1, "the request on the killed worker ends, the other finishes");
    // Killed before its response began: a 502 naming the worker; after: an error event.
    let (b, last) = (broken[0], broken[0].events().last().cloned().unwrap_or_default());
    let clear = (b.status == 502 && b.body.contains("decode worker")) || last.contains("stopped mid-response");
    assert!(clear, "a clear error: {} {}", b.status, b.body);
    // New requests go to the remaining decode worker.
    let short = json!({"prompt": [1, 54, 74], "max_tokens": 4, "temperature": 0});
    for _ in 0..3 {
        let r = router.post("/v1/completions", &short.to_string());
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // A prefill worker killed: the other takes the prompts.
    drop(p1);
    for _ in 0..3 {
        let r = router.post("/v1/completions", &short.to_string());
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let health = router.get("/health").json();
    assert_eq!(health["decode"].as_array().unwrap().iter().filter(|w| w["up"] == false).count(), 1, "{health}");
    // No prefill worker left: refused clearly, nothing hangs, the decode worker's reservation freed.
    drop(p2);
    let t = Instant::now();
    let r = router.post("/v1/completions", &short.to_string());
    assert!(t.elapsed() < Duration::from_secs(30));
    assert!(r.status >= 500 && r.body.contains("prefill"), "{} {}", r.status, r.body);
    let deadline = Instant::now() + Duration::from_secs(10);
    while d2.metric("weir_running_sequences") > 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(d2.metric("weir_running_sequences"), 0.0);
    drop(d2);
}

#[test]
fn the_mixed_pool_takes_requests_past_the_threshold_and_when_a_pool_is_down() {
    let model = fixture("tiny-llama");
    let (p, d, m) = (prefill(&model), decode(&model), Served::start(&model, &[]));
    let body = json!({"prompt": [1, 54, 74, 71, 287, 290], "max_tokens": 6, "temperature": 0}).to_string();
    let want = text_of(&m.post("/v1/completions", &body).json());
    let generated = |s: &Served| s.metric("weir_generated_tokens_total");
    // A high threshold: the split pools take it.
    let router = Served::route_with(&[&p], &[&d], &[&m], &["--mixed-threshold", "100000"]);
    let before = generated(&m);
    assert_eq!(text_of(&router.post("/v1/completions", &body).json()), want);
    assert_eq!(generated(&m), before, "the mixed worker ran nothing");
    assert!(generated(&d) > 0.0);
    // Threshold 0: every prefill queue has passed it, the mixed worker runs the request whole.
    let router = Served::route_with(&[&p], &[&d], &[&m], &["--mixed-threshold", "0"]);
    let (before, decoded) = (generated(&m), generated(&d));
    assert_eq!(text_of(&router.post("/v1/completions", &body).json()), want);
    assert_eq!(generated(&m), before + 6.0);
    assert_eq!(generated(&d), decoded);
    // The prefill pool down: the health checks take it out without a request failing first,
    // and the mixed pool serves.
    let router = Served::route_with(&[&p], &[&d], &[&m], &["--mixed-threshold", "100000"]);
    drop(p);
    let deadline = Instant::now() + Duration::from_secs(10);
    while router.get("/health").json()["prefill"][0]["up"] != false && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(router.get("/health").json()["prefill"][0]["up"], false, "taken out by the health check");
    let r = router.post(
        "/v1/completions",
        &json!({"prompt": [1, 54, 74, 71, 287, 290], "max_tokens": 6, "temperature": 0, "stream": true}).to_string(),
    );
    assert_eq!(streamed_text(&r.events()), want);
}

/// Stops a served process with SIGTERM and waits for it (it writes its trace on the way out).
fn stop(mut s: Served) {
    let mut child = s.child.take().unwrap();
    // SAFETY: a plain signal to a child process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_split_runs_trace_puts_prefill_kv_sends_and_decode_on_one_timeline() {
    let model = fixture("tiny-llama");
    let dir = tmpdir("split-trace");
    let (pt, dt, merged) = (dir.join("prefill.json"), dir.join("decode.json"), dir.join("split.json"));
    let p = Served::start(&model, &["--role", "prefill", "--max-pass-tokens", "8", "--trace", pt.to_str().unwrap()]);
    let d = Served::start(&model, &["--role", "decode", "--trace", dt.to_str().unwrap()]);
    let router = Served::route(&[&p], &[&d]);
    let body =
        json!({"prompt": [1, 54, 74, 71, 287, 290, 33, 12, 9, 100, 200, 300], "max_tokens": 8, "temperature": 0});
    assert_eq!(router.post("/v1/completions", &body.to_string()).status, 200);
    drop(router);
    stop(p);
    stop(d);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(["trace", "merge", pt.to_str().unwrap(), dt.to_str().unwrap(), "-o", merged.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let t = weir::Trace::from_chrome_json(&std::fs::read_to_string(&merged).unwrap()).unwrap();
    use weir_runtime::Event;
    let lanes: std::collections::HashMap<u32, String> = t
        .events
        .iter()
        .filter_map(|e| if let Event::LaneCreated { lane, name, .. } = e { Some((*lane, name.clone())) } else { None })
        .collect();
    let spans = |prefix: &str| -> Vec<(u64, u64)> {
        t.events
            .iter()
            .filter_map(|e| match e {
                Event::Span { lane, start_ns, dur_ns, .. } if lanes[lane].starts_with(prefix) => {
                    Some((*start_ns, start_ns + dur_ns))
                }
                _ => None,
            })
            .collect()
    };
    let (sends, prefill, decode) = (spans("prefill/kvnet"), spans("prefill/compute"), spans("decode/compute"));
    assert!(!sends.is_empty() && !prefill.is_empty() && !decode.is_empty(), "{lanes:?}");
    // One request: the KV sends start while prefill computes, and decode computes after the
    // first of them — on the wall clock both processes share.
    let first_send = sends.iter().map(|s| s.0).min().unwrap();
    let last_prefill = prefill.iter().map(|s| s.1).max().unwrap();
    let first_decode = decode.iter().map(|s| s.0).min().unwrap();
    assert!(first_send < last_prefill, "layer by layer: sends overlap prefill");
    assert!(first_decode > first_send, "decode ({first_decode}) after the first send ({first_send})");
}

#[test]
fn one_server_splits_prefill_and_decode_between_its_cores_from_graph_files() {
    let model = fixture("tiny-llama");
    let cpus = weir_runtime::lane::allowed_cpus();
    let dir = tmpdir("split-graphs");
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs");
    let write = |name: &str, cores: &str, cpu: usize| {
        let text = std::fs::read_to_string(examples.join(name)).unwrap().replace(cores, &format!("cores={cpu}"));
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let (p, d) =
        (write("split-prefill.weir", "cores=0", cpus[0]), write("split-decode.weir", "cores=1", *cpus.last().unwrap()));
    let split = Served::start(&model, &["--graph", &d, "--split-prefill-graph", &p]);
    let colocated = Served::start(&model, &[]);
    for prompt in golden("tiny-llama")["prompts"].as_array().unwrap() {
        let n = ids(&prompt["greedy"]["new_ids"]).len();
        let body = json!({"prompt": ids(&prompt["input_ids"]), "max_tokens": n, "temperature": 0}).to_string();
        let (want, got) =
            (colocated.post("/v1/completions", &body).json(), split.post("/v1/completions", &body).json());
        assert_eq!(text_of(&got), text_of(&want));
        assert_eq!(got["usage"], want["usage"]);
    }
    // Every prompt's KV cache went from the prefill engine into the decoding one.
    assert_eq!(split.metric("weir_kv_imports_total"), 3.0);
}

#[test]
fn a_mixed_worker_with_a_kv_edge_takes_either_phase_for_a_pool_with_nobody_up() {
    let model = fixture("tiny-llama");
    let (p, d) = (prefill(&model), decode(&model));
    let m = Served::start(&model, &["--kv-listen", "127.0.0.1:0"]);
    let phases = m.get("/health").json()["phases"].clone();
    assert_eq!(phases, json!({"prefill": true, "decode": true}), "it exports and takes KV caches");
    let router = Served::route_with(&[&p], &[&d], &[&m], &[]);
    let prompt = [1, 54, 74, 71, 287, 290];
    let body = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0}).to_string();
    let want = text_of(&Served::start(&model, &[]).post("/v1/completions", &body).json());
    let (tokens, generated) =
        (|s: &Served| s.metric("weir_prompt_tokens_total"), |s: &Served| s.metric("weir_generated_tokens_total"));
    let wait_out = |pool: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while router.get("/health").json()[pool][0]["up"] != false && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // No prefill worker up: the mixed worker prefills, the decode worker decodes.
    drop(p);
    wait_out("prefill");
    let (m0, d0) = (tokens(&m), generated(&d));
    assert_eq!(text_of(&router.post("/v1/completions", &body).json()), want);
    assert_eq!(tokens(&m), m0 + prompt.len() as f64, "the mixed worker prefilled");
    assert_eq!(generated(&d), d0 + 6.0, "the decode worker decoded");
    // No decode worker up either: the mixed worker does both halves, as prefill and decode worker of its own split.
    drop(d);
    wait_out("decode");
    let g0 = generated(&m);
    let r = router.post("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(text_of(&r.json()), want);
    assert_eq!(generated(&m), g0 + 6.0);
    assert!(m.metric("weir_kv_imports_total") >= 1.0, "it took the KV cache from itself over its KV edge");
}

/// Runs `weir ARGS…`: whether it succeeded, and its standard error. One that has not exited
/// after 60 s (a server that should have refused to start) is killed and counts as a success.
fn weir(args: &[&str]) -> (bool, String) {
    use std::io::Read;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ok = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.success();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (ok, err)
}

#[test]
fn bad_input_to_the_split_routes_and_flags_is_refused_by_name() {
    let model = fixture("tiny-llama");
    let (p, d, plain) = (prefill(&model), decode(&model), Served::start(&model, &[]));
    let ok = json!({"prompt": [1, 2, 3], "max_tokens": 2}).to_string();
    // The worker routes.
    let r = plain.post("/weir/v1/reserve/completions", &ok);
    assert!(r.status == 400 && r.body.contains("--role decode"), "{} {}", r.status, r.body);
    let r = d.post("/weir/v1/reserve/completions", r#"{"prompt": [1, 2], "temperature": "hot"}"#);
    assert_eq!((r.status, r.json()["error"]["param"].clone()), (400, json!("temperature")), "{}", r.body);
    let r = d.post("/weir/v1/resume/12345", "{}");
    assert!(r.status == 404 && r.body.contains("12345"), "{}", r.body);
    let r = d.post("/weir/v1/resume/not-a-number", "{}");
    assert_eq!(r.status, 404, "{}", r.body);
    let r = d.post("/weir/v1/abort/777", r#"{"reason": "x"}"#);
    assert!(r.status == 404 && r.body.contains("777"), "{}", r.body);
    let prefill_body = |v: Value| v.to_string();
    let good = json!({"prompt": [1, 2, 3], "kv_addr": "127.0.0.1:1", "handle": "5", "temperature": 0, "top_p": 1, "top_k": 0, "seed": "1"});
    for (field, bad) in [
        ("prompt", json!([1, -2])),
        ("kv_addr", json!(7)),
        ("handle", json!(5)),
        ("seed", json!("x")),
        ("top_p", json!("1")),
    ] {
        let mut v = good.clone();
        v[field] = bad;
        let r = p.post("/weir/v1/prefill", &prefill_body(v));
        assert_eq!((r.status, r.json()["error"]["param"].clone()), (400, json!(field)), "{field}: {}", r.body);
    }
    let r = p.post("/weir/v1/prefill", "not json");
    assert!(r.status == 400 && r.body.contains("not valid JSON"), "{}", r.body);
    // A decode address nobody listens on, and a server that does not export.
    let r = p.post("/weir/v1/prefill", &prefill_body(good.clone()));
    assert!(r.status == 400 && r.body.contains("127.0.0.1:1") && r.body.contains("cannot connect"), "{}", r.body);
    let r = plain.post("/weir/v1/prefill", &prefill_body(good));
    assert!(r.status == 400 && r.body.contains("--role prefill"), "{}", r.body);

    // The flags.
    let m = model.to_str().unwrap();
    let (ok, err) = weir(&["route", "--port", "0"]);
    assert!(!ok && err.contains("--prefill") && err.contains("--mixed"), "{err}");
    let (ok, err) = weir(&["route", "--prefill", "ftp://x:1", "--decode", "http://127.0.0.1:1"]);
    assert!(!ok && err.contains("ftp://x:1"), "{err}");
    let (ok, err) = weir(&["serve", "--model", m, "--role", "both"]);
    assert!(!ok && err.contains("--role") && err.contains("both"), "{err}");
    let (ok, err) = weir(&["serve", "--model", m, "--role", "decode", "--port", "0", "--kv-listen", "nowhere"]);
    assert!(!ok && err.contains("--kv-listen nowhere"), "{err}");
    let missing = tmpdir("split-bad").join("none.weir");
    let (ok, err) = weir(&["serve", "--model", m, "--port", "0", "--split-prefill-graph", missing.to_str().unwrap()]);
    assert!(!ok && err.contains("--split-prefill-graph") && err.contains("none.weir"), "{err}");
    // A prefill graph whose KV cache is not the decoding engine's is refused naming the flag.
    let prefill_graph = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs/split-prefill.weir");
    let text = std::fs::read_to_string(prefill_graph).unwrap().replace("cores=0", "threads=1");
    let g = tmpdir("split-bad").join("prefill-bf16.weir");
    std::fs::write(&g, text.replace("kv=kv_dtype", "kv=\"bf16\"")).unwrap();
    let (ok, err) = weir(&["serve", "--model", m, "--port", "0", "--split-prefill-graph", g.to_str().unwrap()]);
    assert!(!ok && err.contains("--split-prefill-graph") && err.contains("kv=bf16"), "{err}");
    // Trace merging: labels that do not match the files, a file that is not a trace.
    let t = tmpdir("split-bad").join("t.json");
    std::fs::write(&t, "{}").unwrap();
    let ts = t.to_str().unwrap();
    let (ok, err) = weir(&["trace", "merge", ts, ts, "--label", "a", "-o", "/dev/null"]);
    assert!(!ok && err.contains("--label gives 1 labels for 2 traces"), "{err}");
    let (ok, err) = weir(&["trace", "merge", ts, ts, "-o", "/dev/null"]);
    assert!(!ok && err.contains("t.json") && err.contains("not a weir trace"), "{err}");
}
