//! Phase splitting on embedded engines: a prefill engine sends the KV cache, layer by layer,
//! to a decode engine over a real loopback connection; the decode engine goes on from it.

mod common;
use common::*;
use std::time::{Duration, Instant};
use weir::{Engine, EngineOptions, Event, Model, Request, Role};
use weir_operators::kv_link::{KvMsg, KV_EDGE};
use weir_runtime::remote::{Hello, RemoteTx};

fn engines(name: &str) -> (Engine, Engine) {
    let model = Model::open(fixture(name)).unwrap();
    // Prompts of 6 to 20-odd tokens in chunks of 8: several passes each, so layers' rows go in pieces.
    let prefill = EngineOptions { role: Role::Prefill, threads: 1, max_pass_tokens: 8, ..Default::default() };
    let decode = EngineOptions { role: Role::Decode, threads: 1, ..Default::default() };
    (Engine::new(&model, prefill).unwrap(), Engine::new(&model, decode).unwrap())
}

/// Bytes of KV cache one position takes over every attention node (f32 cache).
fn kv_bytes_per_position(e: &Engine) -> u64 {
    let (nodes, _) = weir_graphs::place::kv_export::attention_nodes(e.graph());
    nodes.iter().map(|(_, d)| 2 * 4 * *d as u64).sum()
}

#[test]
fn split_workers_give_the_golden_tokens_for_dense_and_moe_models() {
    for name in ["tiny-llama", "tiny-mixtral"] {
        let (prefill, decode) = engines(name);
        assert!(prefill.exports_kv() && !decode.exports_kv());
        let listener = decode.kv_listen("127.0.0.1:0").unwrap();
        let golden = golden(name);
        let prompts = golden["prompts"].as_array().unwrap();
        let mut prompt_tokens = 0;
        // All prompts at once: both engines batch them.
        let mut gens = Vec::new();
        for p in prompts {
            let (prompt, want) = (ids(&p["input_ids"]), ids(&p["greedy"]["new_ids"]));
            prompt_tokens += prompt.len() as u64;
            let req = Request::greedy(prompt, want.len());
            let (handle, gen) = decode.expect_kv(req.clone()).unwrap();
            let first = prefill.prefill_to(req, listener.addr(), handle).unwrap();
            gens.push((first, gen, want));
        }
        for (first, gen, want) in gens {
            let first = first.wait().unwrap();
            assert_eq!(first.tokens, want[..1], "{name}: the prefill worker's first token");
            let out = gen.wait().unwrap();
            assert_eq!(out.tokens, want, "{name}: split decode equals transformers' greedy tokens");
        }
        // The KV bytes received are the bytes prefill stored: every position of every prompt.
        assert_eq!(decode.kv_bytes_received(), prompt_tokens * kv_bytes_per_position(&decode), "{name}");
        assert_eq!(decode.kv_imports_waiting(), 0);
        // The same over a Unix socket.
        let path = tmpdir("split-unix").join("kv.sock");
        let unix = decode.kv_listen(&format!("unix:{}", path.display())).unwrap();
        let p = &prompts[0];
        let req = Request::greedy(ids(&p["input_ids"]), 5);
        let (handle, gen) = decode.expect_kv(req.clone()).unwrap();
        prefill.prefill_to(req, unix.addr(), handle).unwrap().wait().unwrap();
        assert_eq!(gen.wait().unwrap().tokens, ids(&p["greedy"]["new_ids"])[..5]);
        prefill.shutdown().unwrap();
        decode.shutdown().unwrap();
    }
}

#[test]
fn one_bulk_transfer_after_prefill_gives_the_same_tokens_and_bytes() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let opts = EngineOptions {
        role: Role::Prefill,
        threads: 1,
        max_pass_tokens: 8,
        kv_bulk_below: usize::MAX,
        ..Default::default()
    };
    let prefill = Engine::new(&model, opts).unwrap();
    let decode = Engine::new(&model, EngineOptions { threads: 1, ..Default::default() }).unwrap();
    let listener = decode.kv_listen("127.0.0.1:0").unwrap();
    for p in golden("tiny-llama")["prompts"].as_array().unwrap() {
        let (prompt, want) = (ids(&p["input_ids"]), ids(&p["greedy"]["new_ids"]));
        let before = decode.kv_bytes_received();
        let n = prompt.len() as u64;
        let req = Request::greedy(prompt, want.len());
        let (handle, gen) = decode.expect_kv(req.clone()).unwrap();
        prefill.prefill_to(req, listener.addr(), handle).unwrap().wait().unwrap();
        assert_eq!(gen.wait().unwrap().tokens, want);
        assert_eq!(decode.kv_bytes_received() - before, n * kv_bytes_per_position(&decode));
    }
    // The whole transfer ran after the prefill: its time is counted, as a little more than none.
    let g = decode.gauges();
    assert_eq!(g.kv_imports.load(std::sync::atomic::Ordering::Relaxed), 3);
    assert!(g.kv_exposed_us.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

#[test]
fn seeded_sampling_split_equals_one_engine() {
    let (prefill, decode) = engines("tiny-llama");
    let listener = decode.kv_listen("127.0.0.1:0").unwrap();
    let mut req = Request { stop_at_eos: false, ..Request::greedy(vec![1, 54, 74, 71, 287, 290, 33, 12, 9, 100], 12) };
    req.sampling.temperature = 0.9;
    req.sampling.top_k = 40;
    req.sampling.seed = 1234;
    let alone = decode.generate(req.clone()).unwrap().tokens;
    let (handle, gen) = decode.expect_kv(req.clone()).unwrap();
    prefill.prefill_to(req, listener.addr(), handle).unwrap().wait().unwrap();
    assert_eq!(gen.wait().unwrap().tokens, alone);
}

/// A sender that speaks the KV edge as a prefill worker would, by hand.
fn raw_prefill(decode: &Engine, addr: &str) -> RemoteTx<KvMsg> {
    RemoteTx::connect(addr, &Hello::new(KV_EDGE, &decode.kv_fingerprint(), 1)).unwrap()
}

fn wait_failed(gen: weir::Generation, within: Duration) -> String {
    let t = Instant::now();
    let events: Vec<Event> = gen.collect();
    assert!(t.elapsed() < within, "took {:?}", t.elapsed());
    match events.last() {
        Some(Event::Failed(why)) => why.clone(),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn a_prefill_worker_lost_mid_transfer_fails_its_requests_and_frees_their_blocks() {
    let (prefill, decode) = engines("tiny-llama");
    let listener = decode.kv_listen("127.0.0.1:0").unwrap();
    let kv_in_use = || decode.pools().iter().find(|p| p.name() == "kv").unwrap().in_use();
    let (nodes, _) = weir_graphs::place::kv_export::attention_nodes(decode.graph());
    let row = |node: &str, start: u32, len: u32| {
        let bytes = len as usize * nodes.iter().find(|n| n.0 == node).unwrap().1 * 4;
        KvMsg::Rows { handle: 0, node: node.into(), start, len, keys: vec![0; bytes], values: vec![0; bytes] }
    };
    let req = Request::greedy(vec![1, 54, 74, 71, 287, 290], 4);

    // The connection ends after the first layer's rows.
    let (handle, gen) = decode.expect_kv(req.clone()).unwrap();
    let tx = raw_prefill(&decode, listener.addr());
    let KvMsg::Rows { node, start, len, keys, values, .. } = row(&nodes[0].0, 0, 6) else { unreachable!() };
    tx.send(&KvMsg::Rows { handle, node, start, len, keys, values }).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while kv_in_use() == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(kv_in_use() > 0, "rows went straight into KV blocks");
    drop(tx);
    let why = wait_failed(gen, Duration::from_secs(5));
    assert!(why.contains("connection ended"), "{why}");
    assert_eq!(kv_in_use(), 0, "its blocks are back in the pool");

    // The prefill worker says it failed.
    let (handle, gen) = decode.expect_kv(req.clone()).unwrap();
    let tx = raw_prefill(&decode, listener.addr());
    tx.send(&KvMsg::Abort { handle, reason: "out of memory".into() }).unwrap();
    let why = wait_failed(gen, Duration::from_secs(5));
    assert!(why.contains("out of memory"), "{why}");

    // A prompt of another length than the request's.
    let (handle, gen) = decode.expect_kv(req.clone()).unwrap();
    let other = Request::greedy(vec![1, 54, 74], 4);
    prefill.prefill_to(other, listener.addr(), handle).unwrap().wait().unwrap();
    let why = wait_failed(gen, Duration::from_secs(5));
    assert!(why.contains("prompt has 3 tokens, the request's 6"), "{why}");

    // Cancelled while waiting: its handle forgotten, what comes for it later dropped.
    let (handle, gen) = decode.expect_kv(req.clone()).unwrap();
    drop(gen);
    let deadline = Instant::now() + Duration::from_secs(5);
    while decode.kv_imports_waiting() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(decode.kv_imports_waiting(), 0);
    prefill.prefill_to(req.clone(), listener.addr(), handle).unwrap().wait().unwrap();
    assert_eq!(kv_in_use(), 0);

    // Still serving, split and whole.
    let want = decode.generate(req.clone()).unwrap().tokens;
    let (handle, gen) = decode.expect_kv(req.clone()).unwrap();
    prefill.prefill_to(req, listener.addr(), handle).unwrap().wait().unwrap();
    assert_eq!(gen.wait().unwrap().tokens, want);
}

#[test]
fn mismatched_and_missing_peers_are_refused_by_name() {
    let (prefill, decode) = engines("tiny-llama");
    // A decode worker whose cache is bf16: the fingerprints differ.
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let bf16 = Engine::new(&model, EngineOptions { kv_dtype: weir::KvType::Bf16, ..Default::default() }).unwrap();
    let listener = bf16.kv_listen("127.0.0.1:0").unwrap();
    let req = Request::greedy(vec![1, 54, 74], 2);
    let e = prefill.prefill_to(req.clone(), listener.addr(), 1).err().unwrap().to_string();
    assert!(e.contains("fingerprint") && e.contains("kv=bf16"), "{e}");
    // Nobody listening.
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let e = prefill.prefill_to(req.clone(), &free, 1).err().unwrap().to_string();
    assert!(e.contains(&free) && e.contains("cannot connect"), "{e}");
    // An engine that was not placed to export.
    let e = decode.prefill_to(req, listener.addr(), 1).err().unwrap().to_string();
    assert!(e.contains("--role prefill"), "{e}");
}

/// The example graph files of the split inside one box, their cores set to this machine's
/// first and last (the same one where there is only one).
fn split_graphs() -> (String, String) {
    let cpus = weir_runtime::lane::allowed_cpus();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs");
    let read = |name: &str, cores: &str, cpu: usize| {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(text.contains(cores), "{name} places its compute lane with {cores}");
        text.replace(cores, &format!("cores={cpu}"))
    };
    (read("split-prefill.weir", "cores=0", cpus[0]), read("split-decode.weir", "cores=1", *cpus.last().unwrap()))
}

#[test]
fn the_split_inside_one_box_from_graph_files_gives_the_golden_tokens() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let (p, d) = split_graphs();
    let graph = |text: String, name: &str| Some((text, name.to_string()));
    let prefill = Engine::new(
        &model,
        EngineOptions { graph: graph(p, "split-prefill.weir"), max_pass_tokens: 8, ..Default::default() },
    )
    .unwrap();
    let decode =
        Engine::new(&model, EngineOptions { graph: graph(d, "split-decode.weir"), ..Default::default() }).unwrap();
    assert!(prefill.exports_kv(), "the graph file writes its kv_send nodes");
    let mut tokens = 0;
    for p in golden("tiny-llama")["prompts"].as_array().unwrap() {
        let (prompt, want) = (ids(&p["input_ids"]), ids(&p["greedy"]["new_ids"]));
        tokens += prompt.len() as u64;
        let req = Request::greedy(prompt, want.len());
        let (handle, gen) = decode.expect_kv(req.clone()).unwrap();
        prefill.prefill_into(req, &decode, handle).unwrap().wait().unwrap();
        assert_eq!(gen.wait().unwrap().tokens, want);
    }
    assert_eq!(decode.kv_bytes_received(), tokens * kv_bytes_per_position(&decode));
    // A decode engine whose cache is another type is refused, naming both.
    let bf16 = Engine::new(&model, EngineOptions { kv_dtype: weir::KvType::Bf16, ..Default::default() }).unwrap();
    let (handle, _gen) = bf16.expect_kv(Request::greedy(vec![1, 2], 2)).unwrap();
    let e = prefill.prefill_into(Request::greedy(vec![1, 2], 2), &bf16, handle).err().unwrap().to_string();
    assert!(e.contains("kv=f32") && e.contains("kv=bf16"), "{e}");
}

#[test]
fn a_reservation_is_all_or_nothing_at_once() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let prefill = Engine::new(&model, EngineOptions { role: Role::Prefill, threads: 1, ..Default::default() }).unwrap();
    // A KV reserve of 64 positions: one request of 20 + 20 holds 48 of them (3 blocks of 16).
    let opts = EngineOptions { threads: 1, memory_budget: Some(64 << 20), kv_tokens: Some(64), ..Default::default() };
    let decode = Engine::new(&model, opts).unwrap();
    let listener = decode.kv_listen("127.0.0.1:0").unwrap();
    let prompt: Vec<u32> = (0..20).map(|i| 1 + i * 7 % 300).collect();
    let req = Request { stop_at_eos: false, ..Request::greedy(prompt, 20) };
    let (a, gen_a) = decode.expect_kv(req.clone()).unwrap();
    // No room for a second now: refused at once, nothing written anywhere.
    let e = decode.expect_kv(req.clone()).err().unwrap();
    assert!(matches!(e, weir::Error::NoRoom { tokens: 48 }), "{e}");
    assert_eq!(decode.kv_imports_waiting(), 1);
    prefill.prefill_to(req.clone(), listener.addr(), a).unwrap().wait().unwrap();
    assert_eq!(gen_a.wait().unwrap().tokens.len(), 20);
    // Its blocks back: room again.
    let (b, gen_b) = decode.expect_kv(req.clone()).unwrap();
    prefill.prefill_to(req, listener.addr(), b).unwrap().wait().unwrap();
    assert_eq!(gen_b.wait().unwrap().tokens.len(), 20);
}
