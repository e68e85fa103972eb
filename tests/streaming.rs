//! Weights streamed from disk every pass under a memory budget: the same tokens as resident
//! weights, and the budget — weights, KV cache and activations together — holds (asserted on
//! the pools' high-water marks and the tier's).

mod common;
use common::*;
use weir::{Engine, EngineOptions, Model, Request};

/// The golden prompts (6, 42, 126 tokens, 24 new each) all at once: 32 + 80 + 160 positions of
/// KV cache; passes of at most 32 tokens, so the longer prompts are prefilled in chunks.
fn opts(budget: Option<u64>) -> EngineOptions {
    EngineOptions { threads: 1, memory_budget: budget, kv_tokens: Some(272), max_pass_tokens: 32, ..Default::default() }
}

/// For `o`: the least budget, the weights' bytes, and what the budget sets aside for KV cache
/// and activations.
fn plan_limits(model: &Model, o: &EngineOptions) -> (u64, u64, u64) {
    let mut g = model.expand(None, 1, weir::KvType::F32).unwrap();
    let p = weir_graphs::place::memory::fit(&mut g, u64::MAX, None, &o.reserve(model.config.max_position_embeddings))
        .unwrap();
    (p.minimum, p.resident_bytes, p.split.kv + p.split.activations)
}

/// Asserts every pool and the tier stayed within `budget`, and each pool was used.
fn assert_within(engine: &Engine, budget: u64) {
    assert!(engine.peak_host_bytes() <= budget, "host peak {} over budget {budget}", engine.peak_host_bytes());
    for p in engine.pools() {
        assert!(p.high_water() <= p.budget() && p.high_water() > 0, "{p:?}");
    }
    let total: usize = engine.pools().iter().map(|p| p.budget()).sum();
    assert_eq!(total as u64, budget, "the pools split the budget");
}

fn run_all_prompts(model: &Model, budget: Option<u64>) -> Engine {
    let engine = Engine::new(model, opts(budget)).unwrap();
    // All three at once (one shared pass each step), then one alone (passes of one sequence).
    three_prompts(&engine);
    let g = golden("tiny-llama");
    let p = &g["prompts"][1];
    assert_eq!(
        engine.generate(Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 24) }).unwrap().tokens,
        ids(&p["greedy"]["new_ids"])
    );
    engine
}

#[test]
fn every_weight_streamed_under_the_smallest_budget_gives_the_golden_tokens() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let (minimum, total, reserve) = plan_limits(&model, &opts(None));
    assert!(minimum - reserve < total / 4, "the fixture's weights must be much larger than their window");
    let engine = run_all_prompts(&model, Some(minimum));
    let plan = engine.plan().unwrap().clone();
    assert_eq!(plan.resident_tensors, 0, "{plan:?}");
    assert_within(&engine, minimum);
    let weights = &engine.pools()[0];
    assert!(weights.high_water() >= weights.budget() / 2, "the window was used: {weights:?}");
    engine.shutdown().unwrap();
}

#[test]
fn half_resident_half_streamed_gives_the_golden_tokens() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let (_, total, reserve) = plan_limits(&model, &opts(None));
    let budget = reserve + total / 2;
    let engine = run_all_prompts(&model, Some(budget));
    let plan = engine.plan().unwrap().clone();
    assert!(plan.resident_tensors > 0 && plan.streamed_tensors > 0, "{plan:?}");
    assert_within(&engine, budget);
    // The placed graph says which weights stream.
    assert!(engine.graph_dump().contains("tier=nvme") && engine.graph_dump().contains("tier=host"));
    engine.shutdown().unwrap();
}

#[test]
fn a_budget_that_holds_everything_streams_nothing() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let (_, total, reserve) = plan_limits(&model, &opts(None));
    let engine = run_all_prompts(&model, Some(reserve + total + 4096));
    let plan = engine.plan().unwrap().clone();
    assert_eq!(plan.streamed_tensors, 0, "{plan:?}");
    assert_eq!(engine.pools()[0].high_water() as u64, total, "every weight read once, into the pool");
    assert_within(&engine, reserve + total + 4096);
    engine.shutdown().unwrap();
}

#[test]
fn a_budget_below_the_minimum_is_refused_saying_the_minimum() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let (minimum, _, _) = plan_limits(&model, &opts(None));
    let err = Engine::new(&model, opts(Some(minimum - 1))).err().unwrap().to_string();
    assert!(err.contains(&format!("at least {minimum} bytes")) && err.contains("KV cache of 272 tokens"), "{err}");
}

#[test]
fn a_streamed_file_that_changes_under_the_reader_is_an_error_naming_tensor_and_file() {
    let dir = copy_fixture("tiny-llama", "stream-changed");
    let model = Model::open(&dir).unwrap();
    let (minimum, _, _) = plan_limits(&model, &opts(None));
    let engine = Engine::new(&model, opts(Some(minimum))).unwrap();
    let p = &golden("tiny-llama")["prompts"][0];
    let out = engine.generate(Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 2) }).unwrap();
    assert_eq!(out.tokens.len(), 2);
    // Shrink the file while the engine keeps streaming from it.
    let f = std::fs::OpenOptions::new().write(true).open(dir.join("model.safetensors")).unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    let err = engine
        .generate(Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 24) })
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.safetensors")
            && err.contains("tensor `")
            && (err.contains("changed") || err.contains("truncated")),
        "{err}"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn after_a_loader_fault_the_engine_serves_the_next_request() {
    let dir = copy_fixture("tiny-llama", "stream-recover");
    let model = Model::open(&dir).unwrap();
    let (minimum, _, _) = plan_limits(&model, &opts(None));
    let engine = Engine::new(&model, opts(Some(minimum))).unwrap();
    let p = &golden("tiny-llama")["prompts"][0];
    let req = || Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 24) };
    let file = dir.join("model.safetensors");
    let good = std::fs::read(&file).unwrap();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(good.len() as u64 / 2).unwrap();
    let err = engine.generate(req()).unwrap_err().to_string();
    assert!(err.contains("tensor `"), "{err}");
    // The file is whole again: the next request runs on a fresh program, with the golden tokens.
    std::fs::write(&file, &good).unwrap();
    assert_eq!(engine.generate(req()).unwrap().tokens, ids(&p["greedy"]["new_ids"]));
    assert!(engine.fault().is_none());
    engine.shutdown().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn prefetch_zero_reads_on_the_compute_lane_and_gives_the_same_tokens() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let (minimum, _, reserve) = plan_limits(&model, &opts(None));
    let budget = 2 * minimum - reserve;
    let engine = Engine::new(&model, EngineOptions { prefetch: Some(0), ..opts(Some(budget)) }).unwrap();
    // No loader lane runs: every weight statement names the compute lane.
    let dump = engine.graph_dump().to_string();
    assert!(dump.lines().filter(|l| l.starts_with("weight")).all(|l| l.contains("lane=compute")), "{dump}");
    let p = &golden("tiny-llama")["prompts"][2];
    let out = engine.generate(Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 24) }).unwrap();
    assert_eq!(out.tokens, ids(&p["greedy"]["new_ids"]));
    assert_within(&engine, budget);
    engine.shutdown().unwrap();
}

fn three_prompts(engine: &Engine) {
    let g = golden("tiny-llama");
    let prompts: Vec<Vec<u32>> = g["prompts"].as_array().unwrap().iter().map(|p| ids(&p["input_ids"])).collect();
    for (i, got) in generate_together(engine, &prompts, 24).into_iter().enumerate() {
        assert_eq!(got, ids(&g["prompts"][i]["greedy"]["new_ids"]), "prompt {i}");
    }
}

#[test]
fn micro_batches_share_one_load_of_each_streamed_layer() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let mut read = Vec::new();
    let mut streamed = 0;
    for k in [1usize, 2, 3] {
        let o = EngineOptions { micro_batches: k, ..opts(None) };
        let (minimum, _, reserve) = plan_limits(&model, &o);
        let budget = 2 * minimum - reserve;
        let engine = Engine::new(&model, EngineOptions { memory_budget: Some(budget), ..o }).unwrap();
        streamed = engine.plan().unwrap().streamed_bytes;
        three_prompts(&engine);
        // A single sequence too: the other micro-batches of each step are empty passes.
        let p = &golden("tiny-llama")["prompts"][0];
        assert_eq!(
            engine
                .generate(Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 24) })
                .unwrap()
                .tokens,
            ids(&p["greedy"]["new_ids"]),
            "k={k}"
        );
        assert_within(&engine, budget);
        if k > 1 {
            assert!(engine.graph_dump().contains(&format!("uses={k}")));
        }
        read.push(engine.disk_bytes_read());
        engine.shutdown().unwrap();
    }
    // The same steps read the same bytes whatever the number of micro-batches (one load per
    // step serves them all), give or take the loader's read-ahead at the end.
    for (k, r) in read.iter().enumerate() {
        assert!(r.abs_diff(read[0]) <= 4 * streamed, "k={}: {r} bytes vs {} for k=1", k + 1, read[0]);
    }
}

#[test]
fn requests_wait_for_kv_room_and_one_that_never_fits_is_refused() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    // Room for the longest prompt's cache (160 positions) but not for all three at once: they
    // queue, and each still gets its golden tokens; the KV pool never passes its reserve.
    let o = EngineOptions { kv_tokens: Some(160), ..opts(None) };
    let (minimum, _, _) = plan_limits(&model, &o);
    let engine = Engine::new(&model, EngineOptions { memory_budget: Some(minimum), ..o }).unwrap();
    three_prompts(&engine);
    let kv = engine.pools().iter().find(|p| p.name() == "kv").unwrap();
    assert!(kv.high_water() <= kv.budget() && kv.high_water() > kv.budget() / 2, "{kv:?}");
    assert_within(&engine, minimum);
    // 126 prompt tokens + 40 new need 176 positions: more than the reserve ever holds.
    let p = &golden("tiny-llama")["prompts"][2];
    let err = engine.submit(Request::greedy(ids(&p["input_ids"]), 40)).err().unwrap().to_string();
    assert!(err.contains("176 positions") && err.contains("reserves 160"), "{err}");
    // What was accepted before still runs.
    let out = engine.generate(Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 24) }).unwrap();
    assert_eq!(out.tokens, ids(&p["greedy"]["new_ids"]));
    engine.shutdown().unwrap();
}

/// tiny-llama's built-in graph with every layer's weights at `tier` (`dram` or `nvme`), under
/// the graph's own budget.
fn layers_at(tier: &str) -> EngineOptions {
    let text = format!(
        "{}\nlane disk nvme\nplace layers=0..1000 tier={tier}\nbudget host=100000000\n",
        weir_graphs::builtin::LLAMA
    );
    EngineOptions { graph: Some((text, format!("tiny-llama-{tier}.weir"))), ..opts(None) }
}

#[test]
fn weights_held_in_dram_are_read_from_storage_once_and_give_the_golden_tokens() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let g = golden("tiny-llama");
    let p = &g["prompts"][1];
    let mut growth = Vec::new();
    for tier in ["dram", "nvme"] {
        let engine = Engine::new(&model, layers_at(tier)).unwrap();
        assert!(engine.graph_dump().contains(&format!("tier={tier}")), "{tier}");
        let mut read = Vec::new();
        for _ in 0..3 {
            let req = Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 24) };
            assert_eq!(engine.generate(req).unwrap().tokens, ids(&p["greedy"]["new_ids"]), "{tier}");
            read.push(engine.disk_bytes_read());
        }
        // The third generation reads nothing more if the layers are held, as much again if not.
        growth.push(read[2] - read[1]);
        engine.shutdown().unwrap();
    }
    assert_eq!(growth[0], 0, "held in DRAM: nothing read once every layer has its copy");
    assert!(growth[1] > 0, "from storage every pass");
}
