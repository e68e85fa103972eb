//! What `weir graph show` prints is what runs: the placed graph — loaders, expert stores,
//! transfers and copy lanes included — printed, then run with `--graph`, places the same
//! actors (printing it again gives the same text) and gives the same tokens. Over the built-in
//! dense graph streaming under a budget, a mixture of experts under an expert budget (with
//! twins), and GPU placements (placed on any machine; run on a GPU, or the emulated one).

mod common;
use common::*;
use std::path::Path;
use weir::{Engine, EngineOptions, Model};
use weir_graphs::format::print::print;

fn example(name: &str) -> (String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs").join(name);
    (std::fs::read_to_string(&path).unwrap(), path.display().to_string())
}

fn gpu_present() -> bool {
    weir_runtime::gpu::driver_present() && weir_runtime::gpu::device_count().unwrap_or(0) > 0
}

/// Places `model` with `opts` and again from the printed result with only what the file
/// cannot say (threads, the KV reserve, micro-batches): the same graph, printed the same.
/// Returns the options that run the printed file.
fn printed_places_the_same(model: &Model, opts: &EngineOptions) -> EngineOptions {
    let max = model.config.max_position_embeddings;
    let file = opts.graph.as_ref().map(|(t, n)| (t.as_str(), n.as_str()));
    let first = model.place(file, &opts.placement(max)).unwrap();
    let shown = print(&first.graph);
    let again = EngineOptions {
        graph: Some((shown.clone(), "shown.weir".into())),
        memory_budget: None,
        gpu_memory: None,
        prefetch: None,
        experts: None,
        ..opts.clone()
    };
    let second = model.place(Some((&shown, "shown.weir")), &again.placement(max)).unwrap();
    assert_eq!(print(&second.graph), shown, "the printed graph places differently");
    assert_eq!(second.graph.nodes.len(), first.graph.nodes.len());
    assert_eq!(second.graph.edges.len(), first.graph.edges.len());
    assert_eq!(second.pools, first.pools, "the same pools");
    again
}

/// The golden prompts together, through an engine built with `opts`.
fn tokens(model: &Model, opts: EngineOptions, fixture_name: &str) -> Vec<Vec<u32>> {
    let engine = Engine::new(model, opts).unwrap();
    let prompts: Vec<Vec<u32>> =
        golden(fixture_name)["prompts"].as_array().unwrap().iter().map(|p| ids(&p["input_ids"])).collect();
    let out = generate_together(&engine, &prompts, 6);
    engine.shutdown().unwrap();
    out
}

#[test]
fn the_dense_graph_streaming_under_a_budget_runs_the_same_when_shown() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    for (budget, prefetch, micro_batches) in [(2_500_000, None, 1), (2_500_000, Some(0), 1), (3_000_000, None, 2)] {
        let opts = EngineOptions {
            threads: 1,
            memory_budget: Some(budget),
            prefetch,
            micro_batches,
            kv_tokens: Some(272),
            max_pass_tokens: 32,
            loader_lanes: 2,
            ..Default::default()
        };
        let again = printed_places_the_same(&model, &opts);
        let (a, b) = (tokens(&model, opts, "tiny-llama"), tokens(&model, again, "tiny-llama"));
        assert_eq!(a, b, "{budget} {prefetch:?} {micro_batches}");
    }
}

#[test]
fn a_mixture_under_an_expert_budget_runs_the_same_when_shown() {
    use weir_graphs::place::experts::{ExpertBudget, ExpertPlacement, LaneTiming, Twins};
    let model = Model::open(fixture("tiny-mixtral")).unwrap();
    let t = LaneTiming { fixed_s: 1e-3, per_token_s: 1e-4, upload_s: None };
    let twins = Twins { lane: "compute".into(), timings: [("compute".into(), t)].into() };
    for twins in [None, Some(twins)] {
        let experts = ExpertPlacement {
            budget: ExpertBudget::Fraction(0.5),
            popularity: [(1, vec![0.5, 0.25, 0.0, 0.125])].into(),
            cache: true,
            predict: true,
            twins,
        };
        let opts = EngineOptions {
            threads: 1,
            memory_budget: Some(64 << 20),
            experts: Some(experts),
            kv_tokens: Some(272),
            ..Default::default()
        };
        let again = printed_places_the_same(&model, &opts);
        let shown = &again.graph.as_ref().unwrap().0;
        assert!(shown.contains("= expert_store ") && shown.contains(" store=l1/expert_store"), "{shown}");
        assert_eq!(tokens(&model, opts, "tiny-mixtral"), tokens(&model, again, "tiny-mixtral"));
    }
}

/// A GPU example graph with these budgets.
fn gpu_options(file: &str, gpu: Option<u64>, memory: Option<u64>) -> EngineOptions {
    EngineOptions {
        graph: Some(example(file)),
        threads: 1,
        gpu_memory: gpu,
        memory_budget: memory,
        ..Default::default()
    }
}

#[test]
fn gpu_placements_place_the_same_when_shown() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    for (file, gpu, memory) in [
        ("llama-gpu.weir", None, None),
        ("llama-gpu.weir", Some(2_700_000), Some(2_400_000)),
        ("llama-gpu-cpu-attention.weir", Some(2_700_000), None),
    ] {
        let again = printed_places_the_same(&model, &gpu_options(file, gpu, memory));
        let shown = &again.graph.as_ref().unwrap().0;
        assert!(shown.contains("lane gpu0/h2d gpu device=0 stream=1") && shown.contains("= to_gpu "), "{shown}");
        assert!(shown.contains("node lm_head/to_host = to_host lane=gpu0/d2h"), "{shown}");
    }
}

/// tiny-mixtral on one GPU, half its expert bytes read when chosen, each cold expert with a
/// twin on the CPU (`host`) — the store's weights go up through transfers of their own.
fn mixtral_gpu_options() -> EngineOptions {
    use weir_graphs::place::experts::{ExpertBudget, ExpertPlacement, LaneTiming, Twins};
    let t = LaneTiming { fixed_s: 1e-3, per_token_s: 0.0, upload_s: Some(1e-3) };
    let experts = ExpertPlacement {
        budget: ExpertBudget::Fraction(0.5),
        popularity: Default::default(),
        cache: true,
        predict: true,
        twins: Some(Twins { lane: "host".into(), timings: [("compute".into(), t), ("host".into(), t)].into() }),
    };
    EngineOptions {
        graph: Some(example("mixtral-gpu.weir")),
        threads: 1,
        gpu_memory: Some(64 << 20),
        memory_budget: Some(64 << 20),
        experts: Some(experts),
        ..Default::default()
    }
}

#[test]
fn a_mixture_on_a_gpu_with_twins_places_the_same_when_shown() {
    let model = Model::open(fixture("tiny-mixtral")).unwrap();
    let again = printed_places_the_same(&model, &mixtral_gpu_options());
    let shown = &again.graph.as_ref().unwrap().0;
    assert!(shown.contains("/to_gpu.x = \"model.layers.0.block_sparse_moe.experts."), "{shown}");
    assert!(shown.contains("twins=true") && shown.contains("twin_upload_s=none"), "{shown}");
}

#[test]
fn gpu_placements_run_the_same_when_shown() {
    if !gpu_present() {
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), "skipped: no GPU");
        return;
    }
    let model = Model::open(fixture("tiny-llama")).unwrap();
    for (file, gpu, memory) in
        [("llama-gpu.weir", Some(2_700_000), Some(2_400_000)), ("llama-gpu-cpu-attention.weir", None, None)]
    {
        let opts = gpu_options(file, gpu, memory);
        let again = printed_places_the_same(&model, &opts);
        assert_eq!(tokens(&model, opts, "tiny-llama"), tokens(&model, again, "tiny-llama"), "{file}");
    }
    let model = Model::open(fixture("tiny-mixtral")).unwrap();
    let opts = mixtral_gpu_options();
    let again = printed_places_the_same(&model, &opts);
    assert_eq!(tokens(&model, opts, "tiny-mixtral"), tokens(&model, again, "tiny-mixtral"));
}

/// The GPU test above again, in a child process on the emulated CUDA device (`weir_gpu_emu`).
#[test]
fn the_gpu_tests_pass_on_the_emulated_device() {
    weir_gpu_emu::assert_tests_pass(&["gpu_placements_run", "--skip", "emulated"], 1);
}

#[test]
fn a_file_that_places_its_own_experts_refuses_an_expert_budget() {
    use weir_graphs::place::experts::{ExpertBudget, ExpertPlacement};
    let model = Model::open(fixture("tiny-mixtral")).unwrap();
    let experts = ExpertPlacement {
        budget: ExpertBudget::Fraction(0.5),
        popularity: Default::default(),
        cache: true,
        predict: false,
        twins: None,
    };
    let opts = EngineOptions { threads: 1, experts: Some(experts), ..Default::default() };
    let placed = model.place(None, &opts.placement(model.config.max_position_embeddings)).unwrap();
    let shown = print(&placed.graph);
    let again = EngineOptions { graph: Some((shown, "shown.weir".into())), ..opts };
    let e = Engine::new(&model, again).err().expect("refused").to_string();
    assert!(e.contains("places its experts already (expert store `l0/expert_store`)"), "{e}");
}
