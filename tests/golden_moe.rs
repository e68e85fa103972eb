//! Mixture-of-experts models against Hugging Face transformers: `../shared/fixtures/tiny-mixtral`
//! (logits within atol 2e-4 + rtol 1e-4, greedy tokens and every router top-k choice exact),
//! and Qwen2-MoE's config, tensor names and graph on folders derived from it.

mod common;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use weir::{DType, EngineOptions, Request};
use weir_graphs::place::experts::{ExpertBudget, ExpertPlacement};

#[test]
fn tiny_mixtral_matches_transformers() {
    check_prompts(&fixture("tiny-mixtral"), &golden("tiny-mixtral")["prompts"], 1);
}

#[test]
fn tiny_mixtral_matches_transformers_on_two_threads_in_chunks() {
    let opts = EngineOptions { threads: 2, max_pass_tokens: 5, ..Default::default() };
    check_prompts_with(&fixture("tiny-mixtral"), &golden("tiny-mixtral")["prompts"], opts);
}

/// Every prompt token's top-k experts in every layer, as the engine logged them for the
/// sequence the prompt ran as: layer → rows of expert ids, in position order.
fn routes_of(prompt: &[u32], opts: EngineOptions) -> BTreeMap<u32, Vec<Vec<u32>>> {
    let (_, engine) = engine(&fixture("tiny-mixtral"), EngineOptions { log_routes: true, ..opts });
    engine.generate(Request { stop_at_eos: false, ..Request::greedy(prompt.to_vec(), 1) }).unwrap();
    let mut log = engine.routing().log();
    log.retain(|r| r.position < prompt.len());
    log.sort_by_key(|r| (r.layer, r.position));
    let mut by_layer: BTreeMap<u32, Vec<Vec<u32>>> = BTreeMap::new();
    for r in log {
        by_layer.entry(r.layer).or_default().push(r.experts);
    }
    // The counts agree with the log: every prompt token counted once per layer, top_k choices.
    let counts = engine.routing().counts();
    for (layer, (tokens, chosen)) in &counts {
        assert_eq!(*tokens as usize, prompt.len(), "layer {layer}: tokens routed");
        assert_eq!(chosen.iter().sum::<u64>() as usize, 2 * prompt.len(), "layer {layer}: choices");
    }
    engine.shutdown().unwrap();
    by_layer
}

#[test]
fn every_router_choice_matches_transformers() {
    let g = golden("tiny-mixtral");
    let prompts = g["prompts"].as_array().unwrap();
    for per in g["router"]["per_prompt"].as_array().unwrap() {
        let name = per["prompt"].as_str().unwrap();
        let p = prompts.iter().find(|p| p["name"] == name).unwrap();
        let prompt = ids(&p["input_ids"]);
        // Whole prompt in one pass, and in chunks of 5 on two threads: the same choices.
        for opts in [
            EngineOptions { threads: 1, ..Default::default() },
            EngineOptions { threads: 2, max_pass_tokens: 5, ..Default::default() },
        ] {
            let got = routes_of(&prompt, opts);
            let layers = per["layers"].as_array().unwrap();
            assert_eq!(got.len(), layers.len(), "{name}: layers routed");
            for want in layers {
                let l = want["layer"].as_u64().unwrap() as u32;
                let rows: Vec<Vec<u32>> = want["topk_ids"].as_array().unwrap().iter().map(ids).collect();
                assert_eq!(got[&l], rows, "{name}: layer {l} top-k experts");
            }
        }
    }
}

#[test]
fn three_prompts_in_one_batch_each_get_their_own_tokens() {
    let g = golden("tiny-mixtral");
    let (_, engine) = engine(&fixture("tiny-mixtral"), EngineOptions::default());
    let prompts: Vec<Vec<u32>> = g["prompts"].as_array().unwrap().iter().map(|p| ids(&p["input_ids"])).collect();
    for (i, got) in generate_together(&engine, &prompts, 24).into_iter().enumerate() {
        assert_eq!(got, ids(&g["batch"]["new_ids"][i]), "sequence {i}");
    }
    engine.shutdown().unwrap();
}

#[test]
fn experts_on_their_own_lane_give_the_same_tokens() {
    // The built-in graph with every expert node moved to a second CPU lane.
    let text = weir_graphs::builtin::MIXTRAL.replacen(
        "default capacity=2 lane=compute",
        "default capacity=2 lane=compute\nlane expert_lane cpu threads=1\nplace kind=expert lane=expert_lane",
        1,
    );
    assert_ne!(text, weir_graphs::builtin::MIXTRAL);
    let opts = EngineOptions { threads: 1, graph: Some((text, "experts-lane.weir".into())), ..Default::default() };
    let dump = engine(&fixture("tiny-mixtral"), opts.clone()).1.graph_dump().to_string();
    assert!(dump.contains("node l1/expert3 = expert") && dump.contains("lane=expert_lane"), "{dump}");
    check_prompts_with(&fixture("tiny-mixtral"), &golden("tiny-mixtral")["prompts"], opts);
}

/// tiny-mixtral's weights under Qwen2-MoE's names and config keys (zero q/k/v biases, which
/// Qwen2 always has), plus `extra` tensors; `edit` changes the config.
/// Tensors by name, with shape and f32 data.
type Tensors = Vec<(String, Vec<usize>, Vec<f32>)>;

fn as_qwen2_moe(tag: &str, edit: impl FnOnce(&mut Value)) -> (std::path::PathBuf, Tensors) {
    let dir = copy_fixture_meta("tiny-mixtral", tag);
    edit_json(&dir.join("config.json"), |c| {
        let o = c.as_object_mut().unwrap();
        o.remove("num_local_experts");
        c["architectures"] = json!(["Qwen2MoeForCausalLM"]);
        c["model_type"] = "qwen2_moe".into();
        c["num_experts"] = 4.into();
        c["moe_intermediate_size"] = 96.into();
        c["norm_topk_prob"] = true.into();
        c["shared_expert_intermediate_size"] = 0.into();
        edit(c);
    });
    let mut tensors: Vec<_> = fixture_tensors("tiny-mixtral")
        .into_iter()
        .map(|(n, s, d)| {
            let n = n
                .replace("block_sparse_moe.gate.", "mlp.gate.")
                .replace("block_sparse_moe.experts", "mlp.experts")
                .replace(".w1.", ".gate_proj.")
                .replace(".w3.", ".up_proj.")
                .replace(".w2.", ".down_proj.");
            (n, s, d)
        })
        .collect();
    for l in 0..2 {
        for (p, n) in [("q", 64), ("k", 32), ("v", 32)] {
            tensors.push((format!("model.layers.{l}.self_attn.{p}_proj.bias"), vec![n], vec![0.0; n]));
        }
    }
    write_tensors(&dir.join("model.safetensors"), &tensors, DType::F32);
    (dir, tensors)
}

fn greedy(dir: &std::path::Path, prompt: &Value) -> Vec<u32> {
    let (_, engine) = engine(dir, EngineOptions::default());
    let out =
        engine.generate(Request { stop_at_eos: false, ..Request::greedy(ids(&prompt["input_ids"]), 24) }).unwrap();
    engine.shutdown().unwrap();
    out.tokens
}

#[test]
fn qwen2_moe_spelling_of_the_same_model_gives_the_same_tokens() {
    let (dir, _) = as_qwen2_moe("qwen2moe-same", |_| {});
    check_prompts(&dir, &golden("tiny-mixtral")["prompts"], 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn qwen2_moe_without_renormalisation_a_shared_expert_and_a_dense_layer_each_change_the_result() {
    let g = golden("tiny-mixtral");
    let p = &g["prompts"][1];
    let want = ids(&p["greedy"]["new_ids"]);
    // norm_topk_prob false: the chosen probabilities are used as they are (they sum to < 1).
    let (dir, _) = as_qwen2_moe("qwen2moe-raw", |c| c["norm_topk_prob"] = false.into());
    assert_ne!(greedy(&dir, p), want, "norm_topk_prob=false must change the output");
    std::fs::remove_dir_all(dir).unwrap();

    // A shared expert (expert 0's weights again) behind a gate.
    let (dir, mut tensors) = as_qwen2_moe("qwen2moe-shared", |c| c["shared_expert_intermediate_size"] = 96.into());
    for l in 0..2 {
        let e0: Vec<_> = tensors
            .iter()
            .filter(|t| t.0.starts_with(&format!("model.layers.{l}.mlp.experts.0.")))
            .map(|(n, s, d)| (n.replace("experts.0", "shared_expert"), s.clone(), d.clone()))
            .collect();
        tensors.extend(e0);
        tensors.push((format!("model.layers.{l}.mlp.shared_expert_gate.weight"), vec![1, 64], vec![0.5; 64]));
    }
    write_tensors(&dir.join("model.safetensors"), &tensors, DType::F32);
    let shared = greedy(&dir, p);
    assert_ne!(shared, want, "a shared expert must change the output");
    // Its gate matters: a different gate weight gives different tokens.
    for t in tensors.iter_mut().filter(|t| t.0.ends_with("shared_expert_gate.weight")) {
        t.2.iter_mut().for_each(|x| *x = -0.5);
    }
    write_tensors(&dir.join("model.safetensors"), &tensors, DType::F32);
    assert_ne!(greedy(&dir, p), shared, "the shared expert's gate must be applied");
    std::fs::remove_dir_all(dir).unwrap();

    // Layer 1 dense (mlp_only_layers), with intermediate_size MLP weights of its own.
    let (dir, mut tensors) = as_qwen2_moe("qwen2moe-dense", |c| c["mlp_only_layers"] = json!([1]));
    tensors.retain(|t| !t.0.starts_with("model.layers.1.mlp."));
    let fx = fixture_tensors("tiny-mixtral");
    for (role, hf) in [("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")] {
        let (_, s, d) =
            fx.iter().find(|t| t.0 == format!("model.layers.1.block_sparse_moe.experts.2.{role}.weight")).unwrap();
        tensors.push((format!("model.layers.1.mlp.{hf}.weight"), s.clone(), d.clone()));
    }
    write_tensors(&dir.join("model.safetensors"), &tensors, DType::F32);
    edit_json(&dir.join("config.json"), |c| c["intermediate_size"] = 96.into());
    let dense = greedy(&dir, p);
    assert_ne!(dense, want, "a dense layer 1 must change the output");
    // An expert tensor for the dense layer is not asked for; a missing dense weight is named.
    tensors.retain(|t| t.0 != "model.layers.1.mlp.up_proj.weight");
    write_tensors(&dir.join("model.safetensors"), &tensors, DType::F32);
    let err = weir::Model::open(&dir).err().expect("a missing tensor must be refused").to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.weight"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// `bytes` for experts, no calibration, with the cache and prediction.
fn placement(bytes: u64) -> ExpertPlacement {
    ExpertPlacement {
        budget: ExpertBudget::Bytes(bytes),
        popularity: Default::default(),
        cache: true,
        predict: true,
        twins: None,
    }
}

/// All of tiny-mixtral's expert bytes, from an engine with every expert resident.
fn expert_bytes() -> u64 {
    let opts = EngineOptions { experts: Some(placement(u64::MAX)), ..Default::default() };
    let (_, e) = engine(&fixture("tiny-mixtral"), opts);
    e.expert_plan().unwrap().expert_bytes
}

/// Per pass, the distinct experts chosen in `layers`, summed: what a prediction for those
/// layers is scored against (one sequence per request; its prompt is one pass).
fn chosen_per_pass(log: &[weir_operators::router::RouteRecord], prompt: usize, layers: &[u32]) -> u64 {
    let mut passes: BTreeMap<(u32, usize), std::collections::BTreeSet<u32>> = BTreeMap::new();
    for r in log.iter().filter(|r| layers.contains(&r.layer)) {
        passes.entry((r.layer, r.position.max(prompt - 1))).or_default().extend(&r.experts);
    }
    passes.values().map(|s| s.len() as u64).sum()
}

#[test]
fn experts_read_when_chosen_give_the_golden_tokens_and_fewer_reads_with_a_cache() {
    let g = golden("tiny-mixtral");
    let total = expert_bytes();
    let mut misses = Vec::new();
    for (fraction, cache, predict) in [(0.25, true, false), (0.5, true, true), (0.25, false, false), (0.25, true, true)]
    {
        let budget = (total as f64 * fraction) as u64;
        let experts = Some(ExpertPlacement { cache, predict, ..placement(budget) });
        let opts = EngineOptions { threads: 1, experts, log_routes: true, ..Default::default() };
        let (_, engine) = engine(&fixture("tiny-mixtral"), opts);
        let plan = engine.expert_plan().unwrap().clone();
        let case = format!("budget {fraction} cache {cache} predict {predict}");
        assert!(!plan.stores.is_empty(), "{case}: some experts must be read on demand");
        assert!(plan.resident_bytes + plan.stores.iter().map(|s| s.2).sum::<u64>() <= budget, "{plan:?}");
        // The first MoE layer has nothing before it to predict from; layer 1 does.
        assert_eq!(plan.predicted, if cache && predict { vec![1] } else { vec![] }, "{case}");
        let mut chosen = 0;
        for p in g["prompts"].as_array().unwrap() {
            let want = ids(&p["greedy"]["new_ids"]);
            let prompt = ids(&p["input_ids"]);
            let req = Request {
                stop_at_eos: false,
                logits: weir::LogitsMode::Steps,
                ..Request::greedy(prompt.clone(), want.len())
            };
            let before = engine.routing().log().len();
            let out = engine.generate(req).unwrap();
            assert_eq!(out.tokens, want, "{case}");
            let (worst, ok) = compare(&out.step_logits[0], &floats(&p["last_logits"]), ATOL, RTOL);
            assert!(ok, "{case}: last-position logits off by up to {worst}");
            chosen += chosen_per_pass(&engine.routing().log()[before..], prompt.len(), &plan.predicted);
        }
        let c = engine.expert_cache().snapshot();
        assert!(c.misses > 0 && c.bytes_read > 0, "{case}: {c:?}");
        if !cache {
            assert_eq!(c.hits, 0, "nothing kept, nothing hit");
        }
        // Every pass of a predicted layer is scored: the hint came before its route.
        assert_eq!(c.hinted, chosen, "{case}: {c:?}");
        if cache && predict {
            assert!(c.predicted > 0 && c.predicted <= c.hinted, "{case}: {c:?}");
            assert!(c.prefetches > 0 && c.prefetch_hits <= c.prefetches, "{case}: {c:?}");
            eprintln!("{case}: prediction hit rate {:?}, {c:?}", c.prediction_hit_rate());
        } else {
            assert_eq!((c.predicted, c.prefetches), (0, 0), "{case}: no prediction, nothing read ahead");
        }
        misses.push(c.misses);
    }
    // Same budget: keeping what was read means reading less.
    assert!(misses[0] < misses[2], "misses with a cache {} vs without {}", misses[0], misses[2]);
}

#[test]
fn the_most_chosen_experts_of_a_calibration_run_stay_resident() {
    let g = golden("tiny-mixtral");
    let prompts = g["prompts"].as_array().unwrap();
    let run = |opts: EngineOptions| {
        let (_, engine) = engine(&fixture("tiny-mixtral"), opts);
        for p in prompts {
            let want = ids(&p["greedy"]["new_ids"]);
            let req = Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), want.len()) };
            assert_eq!(engine.generate(req).unwrap().tokens, want);
        }
        engine
    };
    let calibration = run(EngineOptions { threads: 1, ..Default::default() });
    let popularity = calibration.routing().popularity();
    // 75% (six of the eight experts): a store per layer with room for top_k = 2 experts, and
    // two experts resident — the two chosen most over both layers.
    let budget = expert_bytes() * 3 / 4;
    let experts = Some(ExpertPlacement { popularity: popularity.clone(), ..placement(budget) });
    let engine = run(EngineOptions { threads: 1, experts, ..Default::default() });
    let plan = engine.expert_plan().unwrap();
    assert_eq!(plan.resident.len(), 2, "{plan:?}");
    let mut ranked: Vec<(u32, usize)> =
        popularity.iter().flat_map(|(&l, v)| (0..v.len()).map(move |e| (l, e))).collect();
    ranked.sort_by(|a, b| popularity[&b.0][b.1].total_cmp(&popularity[&a.0][a.1]).then(a.cmp(b)));
    let mut resident = plan.resident.clone();
    resident.sort();
    let mut top: Vec<(u32, usize)> = ranked[..2].to_vec();
    top.sort();
    assert_eq!(resident, top);
    let served: usize = plan.stores.iter().map(|s| s.1.len()).sum();
    assert_eq!(served, 6, "the other six are read when chosen: {plan:?}");
}

#[test]
fn an_expert_budget_below_one_expert_per_layer_is_refused_saying_the_minimum() {
    let model = weir::Model::open(fixture("tiny-mixtral")).unwrap();
    let err = weir::Engine::new(&model, EngineOptions { experts: Some(placement(1000)), ..Default::default() })
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("expert budget of 1000 bytes") && err.contains("at least"), "{err}");
}

#[test]
fn expert_caches_and_streamed_weights_share_one_memory_budget() {
    let model = weir::Model::open(fixture("tiny-mixtral")).unwrap();
    let placement = placement(expert_bytes() / 4);
    let opts = EngineOptions {
        threads: 1,
        kv_tokens: Some(160),
        max_pass_tokens: 32,
        experts: Some(placement.clone()),
        ..Default::default()
    };
    // The least the rest of the model needs once the experts are placed, and the caches.
    let mut g = model.expand(None, 1, weir::KvType::F32).unwrap();
    let experts = weir_graphs::place::experts::place(&mut g, &placement).unwrap();
    let caches: u64 = experts.stores.iter().map(|s| s.2).sum();
    let reserve = opts.reserve(model.config.max_position_embeddings);
    let minimum = weir_graphs::place::memory::fit(&mut g, u64::MAX, None, &reserve).unwrap().minimum;
    let budget = caches + minimum;
    let engine = weir::Engine::new(&model, EngineOptions { memory_budget: Some(budget), ..opts.clone() }).unwrap();
    assert_eq!(engine.host_budget(), Some(budget), "the caches come out of the budget");
    assert!(engine.plan().unwrap().streamed_bytes > 0, "the rest is streamed");
    let g = golden("tiny-mixtral");
    for p in g["prompts"].as_array().unwrap() {
        let want = ids(&p["greedy"]["new_ids"]);
        let req = Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), want.len()) };
        assert_eq!(engine.generate(req).unwrap().tokens, want);
    }
    let c = engine.expert_cache().snapshot();
    assert!(c.misses > 0 && c.hinted > 0, "{c:?}");
    assert!(engine.peak_host_bytes() <= budget, "host peak {} over the budget {budget}", engine.peak_host_bytes());
    // A budget that cannot hold the caches and the rest is refused, saying so.
    let err = weir::Engine::new(&model, EngineOptions { memory_budget: Some(caches), ..opts })
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("does not hold the expert caches"), "{err}");
}

#[test]
fn a_token_reads_its_top_k_experts_not_all_of_them() {
    let model = weir::Model::open(fixture("tiny-mixtral")).unwrap();
    let moe = model.config.moe.clone().unwrap();
    let bytes = |pred: &dyn Fn(&str) -> bool| -> u64 {
        model.weights.tensors.iter().filter(|(n, _)| pred(n)).map(|(_, t)| t.nbytes()).sum()
    };
    let embed = bytes(&|n| n == "model.embed_tokens.weight");
    let one_expert = bytes(&|n| n.starts_with("model.layers.0.block_sparse_moe.experts.0."));
    let dense = bytes(&|n| !n.contains(".experts.") && n != "model.embed_tokens.weight");
    let layers = model.config.num_hidden_layers as u64;
    let row = embed / model.config.vocab_size as u64;
    assert!(one_expert > 0 && moe.top_k < moe.experts);
    assert_eq!(model.weight_bytes_per_token(), dense + row + layers * moe.top_k as u64 * one_expert);
}

/// tiny-mixtral's built-in graph with a second CPU lane, `twin`, for twin experts.
fn with_twin_lane() -> (String, String) {
    let text = weir_graphs::builtin::MIXTRAL.replacen("lane loader io", "lane twin cpu threads=1\nlane loader io", 1);
    (text, "mixtral-with-twin-lane.weir".into())
}

#[test]
fn twin_experts_give_the_golden_tokens_wherever_the_decision_puts_them() {
    use weir_graphs::place::experts::{LaneTiming, Twins};
    let g = golden("tiny-mixtral");
    let budget = expert_bytes() / 2;
    let timing = |fixed_s: f64| LaneTiming { fixed_s, per_token_s: 0.0, upload_s: None };
    // Costs given: equal lanes (the chosen cold experts split between them), a slow twin lane
    // (all on their own lane), a slow own lane (all on the twins'); then measured here.
    let cases: [Option<(f64, f64)>; 4] = [Some((1.0, 1.0)), Some((1.0, 100.0)), Some((100.0, 1.0)), None];
    for case in cases {
        let timings = match case {
            Some((own, twin)) => [("compute".to_string(), timing(own)), ("twin".to_string(), timing(twin))].into(),
            None => Default::default(),
        };
        let twins = Some(Twins { lane: "twin".into(), timings });
        let experts = Some(ExpertPlacement { twins, ..placement(budget) });
        let opts = EngineOptions { graph: Some(with_twin_lane()), threads: 1, experts, ..Default::default() };
        let (_, engine) = engine(&fixture("tiny-mixtral"), opts);
        assert!(!engine.expert_plan().unwrap().stores.is_empty());
        for p in g["prompts"].as_array().unwrap() {
            let want = ids(&p["greedy"]["new_ids"]);
            let req = Request {
                stop_at_eos: false,
                logits: weir::LogitsMode::Steps,
                ..Request::greedy(ids(&p["input_ids"]), want.len())
            };
            let out = engine.generate(req).unwrap();
            assert_eq!(out.tokens, want, "{case:?}");
            let (worst, ok) = compare(&out.step_logits[0], &floats(&p["last_logits"]), ATOL, RTOL);
            assert!(ok, "{case:?}: last-position logits off by up to {worst}");
        }
        let c = engine.expert_cache().snapshot();
        assert_eq!(c.on_own_lane + c.on_twin, c.hits + c.misses, "{case:?}: every chosen cold expert placed once");
        match case {
            Some((own, twin)) if own == twin => assert!(c.on_own_lane > 0 && c.on_twin > 0, "{c:?}"),
            Some((own, twin)) if own < twin => assert_eq!(c.on_twin, 0, "{c:?}"),
            Some(_) => assert_eq!(c.on_own_lane, 0, "{c:?}"),
            None => eprintln!("measured costs: {} on their own lane, {} on the twin lane", c.on_own_lane, c.on_twin),
        }
        engine.shutdown().unwrap();
    }
}
