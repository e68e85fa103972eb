//! `weir serve` on loopback, as clients use it: whole and streamed completions and chats giving
//! the engine's own tokens, stop strings and EOS, OpenAI's errors naming the field, a full queue,
//! clients hanging up, an engine failure, SIGTERM, and real clients (curl, the `openai` Python
//! package).

mod common;
use common::http::{hang_up_after, Served};
use common::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use weir::{Engine, EngineOptions, Model, Request};

/// What the engine alone generates greedily after `prompt` (ids), and its text.
fn alone(model: &Model, prompt: &[u32], max: usize) -> (Vec<u32>, String) {
    let engine = Engine::new(model, EngineOptions { threads: 1, ..Default::default() }).unwrap();
    let ids = engine.generate(Request::greedy(prompt.to_vec(), max)).unwrap().tokens;
    engine.shutdown().unwrap();
    let text = model.decode(&ids).unwrap();
    (ids, text)
}

/// The text of a completion or chat response, whole or streamed.
fn text_of(v: &Value) -> String {
    let c = &v["choices"][0];
    c["text"].as_str().or(c["message"]["content"].as_str()).or(c["delta"]["content"].as_str()).unwrap_or("").into()
}

fn streamed_text(events: &[String]) -> String {
    events.iter().filter(|e| *e != "[DONE]").map(|e| text_of(&serde_json::from_str(e).unwrap())).collect()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn completions_whole_and_streamed_give_the_engines_tokens() {
    let dir = fixture("tiny-llama");
    let model = Model::open(&dir).unwrap();
    let prompt = model.encode("The man").unwrap();
    let (ids, want) = alone(&model, &prompt, 12);
    let s = Served::start(&dir, &[]);
    let r = s
        .post("/v1/completions", r#"{"model": "tiny-llama", "prompt": "The man", "max_tokens": 12, "temperature": 0}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!((text_of(&v), v["object"].as_str()), (want.clone(), Some("text_completion")));
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": prompt.len(), "completion_tokens": ids.len(), "total_tokens": prompt.len() + ids.len()})
    );
    let finish = if ids.len() < 12 { "stop" } else { "length" };
    assert_eq!(v["choices"][0]["finish_reason"], finish);
    // Streamed: the same text in pieces, the finish, the usage asked for, then [DONE].
    let body = json!({"prompt": "The man", "max_tokens": 12, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}});
    let r = s.post("/v1/completions", &body.to_string());
    assert_eq!((r.status, r.header("content-type")), (200, Some("text/event-stream")), "{}", r.body);
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
    assert_eq!(streamed_text(&events), want);
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(
        (usage["choices"].as_array().map(Vec::len), &usage["usage"]["completion_tokens"]),
        (Some(0), &json!(ids.len()))
    );
    let fin: Value = serde_json::from_str(&events[events.len() - 3]).unwrap();
    assert_eq!(fin["choices"][0]["finish_reason"], finish);
    // The prompt as token ids.
    let r = s.post("/v1/completions", &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0}).to_string());
    assert_eq!(text_of(&r.json()), want);
    // The model list and health.
    assert_eq!(s.get("/v1/models").json()["data"][0]["id"], "tiny-llama");
    assert_eq!(s.get("/health").json()["status"], "ok");
    assert_eq!(s.metric("weir_requests_total{outcome=\"ok\"}"), 3.0);
    assert!(s.metric("weir_generated_tokens_total") >= 3.0 * ids.len() as f64);
}

/// A copy of tiny-llama with a ChatML-style template using what real templates use.
fn with_template(tag: &str) -> std::path::PathBuf {
    let dir = copy_fixture("tiny-llama", tag);
    let template = "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}\
{{ raise_exception('unknown role ' + m['role']) }}{% endif %}{% if loop.first and m['role'] == 'system' %}\
{{ bos_token + '<sys>' + m['content'].strip() + '</sys>' }}{% else %}{{ '<' + m['role'] + '>' + m['content'] | trim + '</s>' }}\
{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}";
    edit_json(&dir.join("tokenizer_config.json"), |c| c["chat_template"] = template.into());
    dir
}

#[test]
fn chat_renders_the_models_template_and_answers_as_the_engine_would() {
    let dir = with_template("chat");
    let model = Model::open(&dir).unwrap();
    let messages = vec![
        weir::serve::chat::Message { role: "system".into(), content: " Be brief. ".into() },
        weir::serve::chat::Message { role: "user".into(), content: "The man".into() },
    ];
    let template = weir::serve::chat::ChatTemplate::from_dir(&dir).unwrap().unwrap();
    let text = template.render(&messages, true).unwrap();
    assert_eq!(text, "<s><sys>Be brief.</sys><user>The man</s><assistant>");
    let prompt = model.tokenizer.as_ref().unwrap().encode(text, false).unwrap().get_ids().to_vec();
    let (ids, want) = alone(&model, &prompt, 8);
    let s = Served::start(&dir, &[]);
    let body = json!({"messages": messages, "max_completion_tokens": 8, "temperature": 0});
    let v = s.post("/v1/chat/completions", &body.to_string()).json();
    assert_eq!(
        (text_of(&v), &v["object"], &v["choices"][0]["message"]["role"]),
        (want.clone(), &json!("chat.completion"), &json!("assistant"))
    );
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], ids.len());
    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    let events = s.post("/v1/chat/completions", &streamed.to_string()).events();
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(
        (&first["object"], &first["choices"][0]["delta"]["role"]),
        (&json!("chat.completion.chunk"), &json!("assistant"))
    );
    assert_eq!(streamed_text(&events), want);
    // The template's own refusal, as a 400 naming `messages`.
    let r = s.post("/v1/chat/completions", &json!({"messages": [{"role": "tool", "content": "x"}]}).to_string());
    assert_eq!((r.status, &r.json()["error"]["param"]), (400, &json!("messages")), "{}", r.body);
    assert!(r.body.contains("unknown role tool"), "{}", r.body);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn stop_strings_are_cut_and_eos_ends_a_completion() {
    let dir = copy_fixture("tiny-llama", "stops");
    // The 4th greedy token after "The man" becomes an EOS id.
    edit_json(&dir.join("generation_config.json"), |c| c["eos_token_id"] = json!([2, 146]));
    let model = Model::open(&dir).unwrap();
    let s = Served::start(&dir, &[]);
    let v = s.post("/v1/completions", r#"{"prompt": "The man", "max_tokens": 24, "temperature": 0}"#).json();
    assert_eq!((&v["choices"][0]["finish_reason"], &v["usage"]["completion_tokens"]), (&json!("stop"), &json!(4)));
    let whole = text_of(&v);
    // `ignore_eos` generates past it, to `max_tokens`, the same text first.
    let past = s
        .post("/v1/completions", r#"{"prompt": "The man", "max_tokens": 24, "temperature": 0, "ignore_eos": true}"#)
        .json();
    assert_eq!(
        (&past["choices"][0]["finish_reason"], &past["usage"]["completion_tokens"]),
        (&json!("length"), &json!(24))
    );
    assert!(text_of(&past).starts_with(&whole), "{past}");
    // A stop string across token boundaries (the text's chars 2..5): cut, with what follows.
    let chars: Vec<char> = whole.chars().collect();
    assert!(chars.len() >= 5, "{whole:?}");
    let stop: String = chars[2..5].iter().collect();
    let body = json!({"prompt": "The man", "max_tokens": 24, "temperature": 0, "stop": [stop, "never"]});
    let v = s.post("/v1/completions", &body.to_string()).json();
    let want: String = chars[..2].iter().collect();
    assert_eq!((text_of(&v), &v["choices"][0]["finish_reason"]), (want.clone(), &json!("stop")));
    let mut streamed = body.clone();
    streamed["stream"] = true.into();
    assert_eq!(streamed_text(&s.post("/v1/completions", &streamed.to_string()).events()), want);
    let _ = model;
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_gets_openais_error_naming_the_field() {
    let s = Served::start(&fixture("tiny-llama"), &[]);
    let long: Vec<u32> = vec![5; 300];
    for (path, body, status, param) in [
        ("/v1/completions", "{\"prompt\": ".to_string(), 400, None),
        ("/v1/completions", r#"{"prompt": "x", "temperature": "hot"}"#.to_string(), 400, Some("temperature")),
        ("/v1/completions", r#"{"prompt": "x", "top_p": 7}"#.to_string(), 400, Some("top_p")),
        ("/v1/completions", r#"{"prompt": "x", "model": "gpt-9"}"#.to_string(), 404, Some("model")),
        ("/v1/completions", r#"{"prompt": "x", "n": 3}"#.to_string(), 400, Some("n")),
        ("/v1/completions", json!({"prompt": long}).to_string(), 400, Some("prompt")),
        ("/v1/completions", r#"{"prompt": [1, 99999]}"#.to_string(), 400, Some("prompt")),
        ("/v1/completions", r#"{"prompt": "x", "max_tokens": 5000}"#.to_string(), 200, None),
        ("/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "hi"}]}"#.to_string(), 400, None),
    ] {
        let r = s.post(path, &body);
        assert_eq!(r.status, status, "{body}: {}", r.body);
        if status != 200 {
            assert_eq!(r.json()["error"]["param"], json!(param), "{body}: {}", r.body);
        }
    }
    let r = s.post("/v1/chat/completions", r#"{"messages": [{"role": "user", "content": "hi"}]}"#);
    assert!(r.body.contains("no chat template"), "{}", r.body);
    // Not UTF-8, and a body over the limit.
    let r = common::http::request(s.port, "POST", "/v1/completions", Some(b"{\"prompt\": \"\xff\xfe\"}"));
    assert!(r.status == 400 && r.body.contains("not UTF-8"), "{}", r.body);
    let big = format!("{{\"prompt\": \"{}\"}}", "a".repeat(5 << 20));
    let r = s.post("/v1/completions", &big);
    assert_eq!(r.status, 413, "{}", &r.body[..r.body.len().min(300)]);
    // Nothing refused was lost: the server still answers.
    assert_eq!(s.post("/v1/completions", r#"{"prompt": "x", "max_tokens": 2}"#).status, 200);
    assert!(s.metric("weir_requests_total{outcome=\"invalid\"}") >= 8.0);
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    // One sequence at a time and one waiting: of 40 clients arriving at once, most are turned
    // away, each told when to come back; the others are answered.
    let s = Served::start(&fixture("tiny-llama"), &["--max-queue", "1", "--max-batch", "1"]);
    let port = s.port;
    let body = r#"{"prompt": "The man", "max_tokens": 240, "temperature": 0.7}"#;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(40));
    let clients: Vec<_> = (0..40)
        .map(|_| {
            let b = barrier.clone();
            std::thread::spawn(move || {
                b.wait();
                common::http::request(port, "POST", "/v1/completions", Some(body.as_bytes()))
            })
        })
        .collect();
    let answers: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    let busy: Vec<_> = answers.iter().filter(|r| r.status == 429).collect();
    assert!(!busy.is_empty(), "none turned away");
    for r in &busy {
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.json()["error"]["type"], "rate_limit_error", "{}", r.body);
    }
    assert!(answers.iter().all(|r| r.status == 200 || r.status == 429));
    assert_eq!(s.metric("weir_requests_total{outcome=\"busy\"}"), busy.len() as f64);
    assert_eq!(s.metric("weir_requests_total{outcome=\"ok\"}"), (40 - busy.len()) as f64);
    wait_for("an empty queue", || s.metric("weir_queue_depth") == 0.0 && s.metric("weir_running_sequences") == 0.0);
    assert_eq!(s.post("/v1/completions", r#"{"prompt": "x", "max_tokens": 2}"#).status, 200);
}

#[test]
fn clients_that_hang_up_end_their_sequences_and_free_the_kv_cache() {
    let s = Served::start(&fixture("tiny-llama"), &["--memory-budget", "8MB"]);
    let port = s.port;
    let body = r#"{"prompt": "The man walked", "max_tokens": 200, "temperature": 0.9, "stream": true}"#;
    let clients: Vec<_> = (0..24)
        .map(|i| std::thread::spawn(move || hang_up_after(port, "/v1/completions", body, 200 + 50 * (i % 5))))
        .collect();
    clients.into_iter().for_each(|c| c.join().unwrap());
    wait_for("every sequence ended", || {
        s.metric("weir_running_sequences") == 0.0
            && s.metric("weir_queue_depth") == 0.0
            && s.metric("weir_kv_blocks_in_use") == 0.0
            && s.metric("weir_pool_bytes_in_use{pool=\"kv\"}") == 0.0
    });
    assert!(s.metric("weir_requests_total{outcome=\"cancelled\"}") >= 20.0);
    let r = s.post("/v1/completions", r#"{"prompt": "The man", "max_tokens": 4}"#);
    assert_eq!(r.status, 200, "{}", r.body);
}

/// 1,000 requests from 64 clients at once, prompts and lengths mixed: none lost, none hung,
/// each greedy answer the same as the request run alone, the host memory within the budget.
#[test]
fn a_thousand_requests_from_64_clients_are_each_answered_as_alone() {
    let dir = fixture("tiny-llama");
    let model = Model::open(&dir).unwrap();
    let mut rng = weir_operators::sampler::Rng::new(64);
    let jobs: Vec<(Vec<u32>, usize, bool)> = (0..1000)
        .map(|_| {
            let len = 1 + (rng.next_u64() % 40) as usize;
            let prompt = (0..len).map(|_| 3 + (rng.next_u64() % 380) as u32).collect();
            (prompt, 1 + (rng.next_u64() % 24) as usize, rng.next_u64().is_multiple_of(2))
        })
        .collect();
    let engine = Engine::new(&model, EngineOptions { threads: 1, ..Default::default() }).unwrap();
    let want: Vec<String> = jobs
        .iter()
        .map(|(p, n, _)| model.decode(&engine.generate(Request::greedy(p.clone(), *n)).unwrap().tokens).unwrap())
        .collect();
    engine.shutdown().unwrap();
    let s = Served::start(&dir, &["--memory-budget", "12MB", "--max-queue", "1000"]);
    let port = s.port;
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let jobs = std::sync::Arc::new(jobs);
    let t0 = Instant::now();
    let clients: Vec<_> = (0..64)
        .map(|_| {
            let (next, jobs) = (next.clone(), jobs.clone());
            std::thread::spawn(move || {
                let mut got = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some((prompt, n, stream)) = jobs.get(i) else { return got };
                    let body = json!({"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": stream});
                    let r = common::http::request(port, "POST", "/v1/completions", Some(body.to_string().as_bytes()));
                    assert_eq!(r.status, 200, "{}", r.body);
                    got.push((i, if *stream { streamed_text(&r.events()) } else { text_of(&r.json()) }));
                }
            })
        })
        .collect();
    let mut answers: Vec<(usize, String)> = clients.into_iter().flat_map(|c| c.join().unwrap()).collect();
    answers.sort();
    assert_eq!(answers.len(), 1000, "none lost");
    for (i, text) in &answers {
        assert_eq!(text, &want[*i], "request {i}");
    }
    assert!(t0.elapsed() < Duration::from_secs(300), "took {:?}", t0.elapsed());
    let (peak, budget) = (s.metric("weir_host_bytes_peak"), s.metric("weir_host_budget_bytes"));
    assert!(peak > 0.0 && peak <= budget, "peak {peak} over the budget {budget}");
    assert_eq!(s.metric("weir_requests_total{outcome=\"ok\"}"), 1000.0);
}

#[test]
fn an_engine_failure_ends_the_stream_with_an_error_and_the_server_serves_on() {
    let dir = copy_fixture("tiny-llama", "fault");
    let weights = dir.join("model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    // Streamed from disk every pass, so a broken file fails the next pass.
    let s = Served::start(&dir, &["--memory-budget", "2500KB"]);
    assert_eq!(s.post("/v1/completions", r#"{"prompt": "x", "max_tokens": 2}"#).status, 200);
    std::fs::write(&weights, &good[..good.len() / 2]).unwrap();
    let r = s.post("/v1/completions", r#"{"prompt": "The man", "max_tokens": 8, "stream": true}"#);
    let last_error = r
        .events()
        .iter()
        .rev()
        .find_map(|e| serde_json::from_str::<Value>(e).ok().filter(|v| v.get("error").is_some()));
    let e = last_error.unwrap_or_else(|| panic!("no error event in {}", r.body));
    assert_eq!(e["error"]["type"], "server_error");
    assert!(s.get("/health").json()["last_fault"].is_string());
    let r = s.post("/v1/completions", r#"{"prompt": "The man", "max_tokens": 8}"#);
    assert_eq!(r.status, 500, "{}", r.body);
    // Repaired, it runs again: the engine starts its program afresh.
    std::fs::write(&weights, &good).unwrap();
    let r = s.post("/v1/completions", r#"{"prompt": "The man", "max_tokens": 8}"#);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(s.metric("weir_requests_total{outcome=\"failed\"}") >= 2.0);
    drop(s);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn sigterm_lets_a_stream_finish_and_exits_cleanly() {
    let mut s = Served::start(&fixture("tiny-llama"), &["--shutdown-timeout", "20"]);
    let port = s.port;
    let body = r#"{"prompt": "The man", "max_tokens": 240, "temperature": 0.8, "seed": 1, "stream": true}"#;
    let stream =
        std::thread::spawn(move || common::http::request(port, "POST", "/v1/completions", Some(body.as_bytes())));
    wait_for("a running sequence", || s.metric("weir_running_sequences") >= 1.0 || stream.is_finished());
    let child = s.child.take().unwrap();
    // SAFETY: a signal to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit {:?}", out.status);
    let r = stream.join().unwrap();
    assert_eq!(r.events().last().map(String::as_str), Some("[DONE]"), "{}", r.body);
    // And it listens no more.
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
}

#[test]
fn curl_and_the_openai_python_client_get_answers() {
    let dir = with_template("clients");
    let model = Model::open(&dir).unwrap();
    let (_, want) = alone(&model, &model.encode("The man").unwrap(), 6);
    let s = Served::start(&dir, &["--served-model-name", "tiny"]);
    let url = format!("http://127.0.0.1:{}/v1/completions", s.port);
    let body = r#"{"model": "tiny", "prompt": "The man", "max_tokens": 6, "temperature": 0, "stream": true}"#;
    match std::process::Command::new("curl")
        .args(["-sN", &url, "-H", "content-type: application/json", "-d", body])
        .output()
    {
        Ok(o) => {
            let out = String::from_utf8_lossy(&o.stdout);
            let events: Vec<String> =
                out.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect();
            assert_eq!(streamed_text(&events), want, "{out}");
        }
        Err(e) => eprintln!("skipped: curl ({e})"),
    }
    let script = format!(
        r#"
import json, openai
c = openai.OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="none")
whole = c.completions.create(model="tiny", prompt="The man", max_tokens=6, temperature=0)
parts = "".join(ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="The man", max_tokens=6, temperature=0, stream=True) if ch.choices)
chat = c.chat.completions.create(model="tiny", messages=[{{"role": "user", "content": "hi"}}], max_tokens=4, temperature=0)
deltas = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(model="tiny", messages=[{{"role": "user", "content": "hi"}}], max_tokens=4, temperature=0, stream=True) if ch.choices)
try:
    c.completions.create(model="tiny", prompt="x", temperature=9)
    bad = None
except openai.BadRequestError as e:
    bad = e.body
models = [m.id for m in c.models.list()]
print(json.dumps({{"whole": whole.choices[0].text, "parts": parts, "usage": whole.usage.completion_tokens, "chat": chat.choices[0].message.content, "deltas": deltas, "bad": bad, "models": models}}))
"#,
        port = s.port
    );
    let o = std::process::Command::new("python3").args(["-c", &script]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    if err.contains("No module named 'openai'") {
        eprintln!("skipped: the openai Python package is not installed (.ci/run installs it)");
        return;
    }
    assert!(o.status.success(), "{err}");
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!((&v["whole"], &v["parts"]), (&json!(want), &json!(want)));
    assert_eq!(v["chat"], v["deltas"]);
    assert_eq!(v["models"], json!(["tiny"]));
    assert_eq!(v["bad"]["param"], "temperature", "{v}");
    std::fs::remove_dir_all(dir).unwrap();
}
