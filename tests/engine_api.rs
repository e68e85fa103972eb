//! The embedded library API: streaming, request validation, failures reaching the caller.

mod common;
use common::*;
use weir::{Engine, EngineOptions, Error, Event, FinishReason, Model, Request};

#[test]
fn tokens_stream_before_the_generation_is_done() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let engine = Engine::new(&model, EngineOptions::default()).unwrap();
    let gen = engine.submit(Request { stop_at_eos: false, ..Request::greedy(vec![1, 54, 74], 6) }).unwrap();
    let events: Vec<Event> = gen.collect::<Vec<_>>();
    let tokens = events.iter().filter(|e| matches!(e, Event::Token { .. })).count();
    assert_eq!(tokens, 6);
    assert!(
        matches!(events.last(), Some(Event::Done(s)) if s.finish == FinishReason::MaxTokens && s.generated_tokens == 6)
    );
    engine.shutdown().unwrap();
}

#[test]
fn invalid_requests_are_refused_and_the_engine_keeps_working() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let engine = Engine::new(&model, EngineOptions::default()).unwrap();
    assert!(matches!(engine.submit(Request::greedy(vec![], 3)), Err(Error::Request(m)) if m.contains("empty")));
    assert!(matches!(engine.submit(Request::greedy(vec![1, 9999], 3)), Err(Error::Request(m)) if m.contains("9999")));
    assert!(
        matches!(engine.submit(Request::greedy(vec![1; 300], 3)), Err(Error::Request(m)) if m.contains("max_position_embeddings"))
    );
    let mut r = Request::greedy(vec![1], 3);
    r.sampling.top_p = 1.5;
    assert!(engine.submit(r).is_err());
    // Nothing accepted was lost: a good request still runs.
    let out = engine.generate(Request::greedy(vec![1, 54, 74, 71, 287, 290], 24)).unwrap();
    assert_eq!(out.tokens, ids(&golden("tiny-llama")["prompts"][0]["greedy"]["new_ids"]));
    engine.shutdown().unwrap();
}

#[test]
fn generation_stops_at_the_context_limit() {
    let dir = copy_fixture("tiny-llama", "ctx");
    edit_json(&dir.join("config.json"), |c| c["max_position_embeddings"] = 10.into());
    let model = Model::open(&dir).unwrap();
    let engine = Engine::new(&model, EngineOptions::default()).unwrap();
    let out =
        engine.generate(Request { stop_at_eos: false, ..Request::greedy(vec![1, 54, 74, 71, 287, 290], 24) }).unwrap();
    // Positions 0..=9 exist: 6 prompt tokens leave room for 4 cached tokens, plus the last
    // sampled token which needs no position of its own.
    assert_eq!(out.stats.finish, FinishReason::ContextFull);
    assert_eq!(out.tokens.len(), 5);
    engine.shutdown().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_io_failure_in_a_loader_reaches_the_caller_and_stops_every_lane() {
    let dir = copy_fixture("tiny-llama", "ioerr");
    let model = Model::open(&dir).unwrap();
    // The file shrinks after the headers were checked: the loader's read fails at run time.
    let f = std::fs::OpenOptions::new().write(true).open(dir.join("model.safetensors")).unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    let engine = Engine::new(&model, EngineOptions::default()).unwrap();
    let err = engine.generate(Request::greedy(vec![1, 54], 4)).unwrap_err().to_string();
    assert!(err.contains("truncated") && err.contains("model.safetensors") && err.contains("load/loader"), "{err}");
    // Later requests are refused, not hung.
    let later = engine.submit(Request::greedy(vec![1], 2)).and_then(|g| g.wait());
    assert!(later.is_err());
    let shut = engine.shutdown().unwrap_err().to_string();
    assert!(shut.contains("truncated"), "{shut}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn several_loader_lanes_share_the_weights_and_give_the_same_tokens() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let engine = Engine::new(&model, EngineOptions { loader_lanes: 3, threads: 1, ..Default::default() }).unwrap();
    assert_eq!(engine.graph_dump().lines().filter(|l| l.starts_with("lane") && l.contains("loader")).count(), 3);
    let p = &golden("tiny-llama")["prompts"][2];
    let out = engine.generate(Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 24) }).unwrap();
    assert_eq!(out.tokens, ids(&p["greedy"]["new_ids"]));
    engine.shutdown().unwrap();
}

#[test]
fn the_llama3_8b_shape_has_a_valid_config() {
    // Written without its 16 GB of weights: the config alone must parse with llama3 RoPE.
    let s = weir::synth::shape("llama3-8b").unwrap();
    let v = weir::synth::config_json(&s, weir::DType::BF16, 0);
    let c = weir_graphs::ModelConfig::from_value(std::path::Path::new("config.json"), &v).unwrap();
    assert_eq!((c.hidden_size, c.num_hidden_layers, c.num_key_value_heads, c.vocab_size), (4096, 32, 8, 128256));
    assert!(matches!(c.rope_scaling, weir_operators::RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    assert!((c.parameter_count() as f64 / 1e9 - 8.03).abs() < 0.05, "{}", c.parameter_count());
}

/// A bad option gets the same message from the library as from the CLI: one check gives both.
#[test]
fn bad_options_get_the_messages_the_cli_prints() {
    let dir = fixture("tiny-llama");
    let model = Model::open(&dir).unwrap();
    let cases: [(EngineOptions, &str); 5] = [
        (EngineOptions { micro_batches: 0, ..Default::default() }, "--micro-batches 0"),
        (EngineOptions { max_pass_tokens: 0, ..Default::default() }, "--max-pass-tokens 0"),
        (EngineOptions { kv_tokens: Some(64), ..Default::default() }, "--kv-tokens needs --memory-budget"),
        (EngineOptions { prefetch: Some(2), ..Default::default() }, "--prefetch needs --memory-budget"),
        (EngineOptions { memory_budget: Some(1000), ..Default::default() }, "too small"),
    ];
    for (opts, want) in cases {
        let api = Engine::new(&model, opts).err().expect("refused").to_string();
        assert!(api.contains(want), "{api}");
    }
    let engine = Engine::new(&model, EngineOptions::default()).unwrap();
    let mut r = Request::greedy(vec![1], 3);
    r.sampling.temperature = -1.0;
    let api = engine.submit(r).err().expect("refused").to_string();
    assert!(api.contains("--temperature -1: must be a finite number ≥ 0"), "{api}");
    engine.shutdown().unwrap();
    // The CLI prints the same.
    let exe = env!("CARGO_BIN_EXE_weir");
    for (flags, want) in [
        (vec!["--micro-batches", "0"], "--micro-batches 0: a step needs at least one micro-batch"),
        (vec!["--temperature", "-1"], "--temperature -1: must be a finite number ≥ 0"),
    ] {
        let o = std::process::Command::new(exe)
            .args(["run", "--model", dir.to_str().unwrap(), "--prompt-ids", "1"])
            .args(&flags)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{flags:?}: {err}");
    }
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_beside_running_decodes() {
    // Passes of 16 tokens: a 200-token prompt takes at least 14 of them (15 prompt tokens each
    // beside a running sequence's one). Decode tokens go first in each pass, so a sequence
    // already decoding gets a token in every one of those passes: one that needs 9 more is
    // done before the long prompt's first token — it would still be waiting were it stalled.
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let engine = Engine::new(&model, EngineOptions { threads: 1, max_pass_tokens: 16, ..Default::default() }).unwrap();
    let first = |g: &mut weir::Generation| loop {
        match g.next_event() {
            Some(Event::Token { id, .. }) => break id,
            Some(Event::PromptLogits(_)) => {}
            e => panic!("{e:?}"),
        }
    };
    let mut running = engine.submit(Request { stop_at_eos: false, ..Request::greedy(vec![1, 54, 74], 10) }).unwrap();
    first(&mut running);
    let long: Vec<u32> = (0..200).map(|i| 3 + (i * 7) % 300).collect();
    let mut prefilling = engine.submit(Request { stop_at_eos: false, ..Request::greedy(long.clone(), 1) }).unwrap();
    let chunked = first(&mut prefilling);
    let mut tokens = 1;
    let done = loop {
        match running.try_next_event() {
            weir::Next::Event(Event::Token { .. }) => tokens += 1,
            weir::Next::Event(Event::Done(s)) => break s,
            e => panic!("after {tokens} tokens, the running sequence still waits ({e:?})"),
        }
    };
    assert_eq!((tokens, done.generated_tokens), (10, 10));
    // The prompt prefilled in chunks beside it gives the token it gives alone.
    assert_eq!(chunked, first(&mut engine.submit(Request::greedy(long, 1)).unwrap()));
    assert!(matches!(prefilling.next_event(), Some(Event::Done(_))));
    // Shutting down while the caller still holds its generations returns.
    engine.shutdown().unwrap();
    drop((running, prefilling));
}
