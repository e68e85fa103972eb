//! Graph definition files: the built-in architecture through the user's parser, round trips
//! (property-tested), user placements that run, and the corpus of broken files.

mod common;
use common::*;
use weir::{Engine, EngineOptions, Model, Request};
use weir_graphs::format::{load_str, model_vars, print::print, CheckInput};
use weir_graphs::{builtin, ModelConfig};
use weir_operators::sampler::Rng;
use weir_runtime::LaneKind;

fn cpus() -> Vec<usize> {
    weir_runtime::lane::allowed_cpus()
}

#[test]
fn the_builtin_graph_round_trips_through_show() {
    for fx in ["tiny-llama", "tiny-llama-bf16"] {
        let model = Model::open(fixture(fx)).unwrap();
        let g = model.expand(None, 1, weir::KvType::F32).unwrap();
        let text = print(&g);
        let input = CheckInput { vars: vec![], weights: Some(&model.weights), cpus: cpus(), process: None };
        let g2 = load_str(&text, "shown.weir", &input).unwrap_or_else(|r| panic!("{r}\n{text}"));
        assert_eq!(g2, g, "{fx}: parse(show(g)) != g");
        assert_eq!(print(&g2), text);
    }
}

/// A random Llama-family config: every switch the built-in graph file branches on.
fn random_config(rng: &mut Rng) -> ModelConfig {
    let pick = |rng: &mut Rng, n: u64| (rng.next_u64() % n) as usize;
    let head_dim = [2, 4, 8][pick(rng, 3)];
    let heads = [1, 2, 4][pick(rng, 3)];
    let kv_heads = [1, heads][pick(rng, 2)];
    let arch = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"][pick(rng, 3)];
    let eps = [1e-5, 1e-6][pick(rng, 2)];
    let mut v = serde_json::json!({
        "architectures": [arch], "hidden_size": heads * head_dim, "head_dim": head_dim,
        "intermediate_size": 1 + pick(rng, 40), "num_hidden_layers": 1 + pick(rng, 3),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": 3 + pick(rng, 100),
        "max_position_embeddings": 16 + pick(rng, 100), "rms_norm_eps": eps,
        "tie_word_embeddings": pick(rng, 2) == 1, "attention_bias": pick(rng, 2) == 1,
    });
    if pick(rng, 2) == 1 {
        v["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
    }
    if arch == "MistralForCausalLM" && pick(rng, 2) == 1 {
        v["sliding_window"] = (1 + pick(rng, 8)).into();
    }
    ModelConfig::from_value(std::path::Path::new("config.json"), &v).unwrap()
}

#[test]
fn printing_and_parsing_random_placed_graphs_gives_the_same_graph() {
    let mut rng = Rng::new(2026);
    let cpus = cpus();
    for case in 0..150 {
        let cfg = random_config(&mut rng);
        let input = CheckInput {
            vars: model_vars(&cfg, 1, weir_operators::KvType::F32),
            weights: None,
            cpus: cpus.clone(),
            process: None,
        };
        let mut g = load_str(builtin::LLAMA, "llama.weir", &input).unwrap_or_else(|r| panic!("case {case}: {r}"));
        // Random placement: extra CPU lanes, operators moved between them, capacities changed.
        let extra = (rng.next_u64() % 3) as usize;
        for i in 0..extra {
            let core = cpus[(rng.next_u64() as usize) % cpus.len()];
            g.lanes.push(weir_runtime::LaneSpec::cpu(&format!("cpu{i}/x"), vec![core]));
        }
        let compute: Vec<usize> =
            (0..g.lanes.len()).filter(|&i| matches!(g.lanes[i].kind, LaneKind::Cpu { .. })).collect();
        for n in g.nodes.iter_mut().filter(|n| n.op.kind() != "load") {
            n.lane = compute[(rng.next_u64() as usize) % compute.len()];
        }
        for e in g.edges.iter_mut() {
            e.capacity = 1 + (rng.next_u64() % 4) as usize;
        }
        // Half the cases stream weights: nvme loader lanes, random tensors streamed (some shared
        // by micro-batches), a host budget.
        if rng.next_u64().is_multiple_of(2) {
            for i in 0..g.nodes.len() {
                let lane = g.nodes[i].lane;
                let weir_operators::OpConfig::Load(l) = &mut g.nodes[i].op else { continue };
                l.mode = weir_operators::loader::IoMode::Uring { depth: 8, chunk: 1 << 20, ahead: true };
                g.lanes[lane].kind = LaneKind::Nvme { core: None, depth: 8, chunk: 1 << 20 };
                for (port, st) in l.streamed.iter_mut().enumerate() {
                    *st = rng.next_u64().is_multiple_of(2);
                    let uses = 1 + (rng.next_u64() % 3) as u32;
                    for e in g.edges.iter_mut().filter(|e| e.from.node == i && e.from.port == port) {
                        e.sticky = !*st;
                        e.uses = if *st { uses } else { 1 };
                    }
                }
            }
            g.host_budget = Some(1 + rng.next_u64() % (1 << 30));
        }
        let text = print(&g);
        let plain = CheckInput { vars: vec![], weights: None, cpus: cpus.clone(), process: None };
        let g2 = load_str(&text, "printed.weir", &plain).unwrap_or_else(|r| panic!("case {case}: {r}\n{text}"));
        assert_eq!(g2, g, "case {case}: parse(print(g)) != g\n{text}");
        assert_eq!(print(&g2), text, "case {case}");
    }
}

#[test]
fn a_user_placement_across_two_lanes_gives_the_same_tokens() {
    let cpus = cpus();
    let text = format!(
        "{}\n# A user's change: layer 1 on a second CPU lane, deeper queues on every edge.\nlane second cpu cores={}\nplace layers=1..2 lane=second\ndefault capacity=4\n",
        builtin::LLAMA,
        cpus[cpus.len() - 1]
    );
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let g = model.expand(Some((&text, "user.weir")), 1, weir::KvType::F32).unwrap();
    let second = g.lanes.iter().position(|l| l.name == "second").unwrap();
    let on_second: Vec<&str> = g.nodes.iter().filter(|n| n.lane == second).map(|n| n.name.as_str()).collect();
    assert_eq!(on_second.len(), 12, "{on_second:?}");
    assert!(on_second.iter().all(|n| n.starts_with("l1/")));
    assert!(g.edges.iter().filter(|e| !e.sticky).all(|e| e.capacity == 4));
    let engine =
        Engine::new(&model, EngineOptions { graph: Some((text, "user.weir".into())), ..Default::default() }).unwrap();
    for p in golden("tiny-llama")["prompts"].as_array().unwrap() {
        let out = engine.generate(Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 24) }).unwrap();
        assert_eq!(out.tokens, ids(&p["greedy"]["new_ids"]));
    }
    engine.shutdown().unwrap();
}

#[test]
fn every_broken_file_in_the_corpus_reports_exactly_its_errors() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/graphs/bad");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 10, "corpus too small: {}", files.len());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let expect: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("# expect: ")).collect();
        assert!(!expect.is_empty(), "{}: no `# expect:` lines", f.display());
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let report = match model.expand(Some((&text, &name)), 1, weir::KvType::F32) {
            Err(weir::Error::Graph(r)) => r,
            other => panic!("{name}: expected a graph report, got {:?}", other.map(|_| "a graph")),
        };
        let got: Vec<String> =
            report.diagnostics.iter().map(|d| format!("{}:{}: {}", d.span.line, d.span.col, d.message)).collect();
        assert_eq!(got.len(), expect.len(), "{name}: expected {expect:#?}\ngot {got:#?}");
        for e in &expect {
            assert!(got.iter().any(|g| g.starts_with(e)), "{name}: missing `{e}` in {got:#?}");
        }
        // The printed report names the file on every line.
        assert!(report.to_string().lines().all(|l| l.starts_with(&format!("{name}:"))));
    }
}
