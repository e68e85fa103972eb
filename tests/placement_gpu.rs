//! GPU placements: where the compiler moves data between host and GPU memory (checked on any
//! machine), and the golden tests run with those placements (on a GPU; "skipped: no GPU"
//! elsewhere).

mod common;
use common::*;
use std::path::Path;
use weir::{EngineOptions, Model};
use weir_graphs::place::transfers::{crossings as transfers, Crossing};

fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

fn gpu_present() -> bool {
    weir_runtime::gpu::driver_present() && weir_runtime::gpu::device_count().unwrap_or(0) > 0
}

fn example(name: &str) -> (String, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs").join(name);
    (std::fs::read_to_string(&path).unwrap(), path.display().to_string())
}

fn graph(model: &Model, file: &str) -> weir_graphs::Graph {
    let (text, name) = example(file);
    model.expand(Some((&text, &name)), 1, weir::KvType::F32).unwrap()
}

fn options(file: &str) -> EngineOptions {
    EngineOptions { graph: Some(example(file)), threads: 1, ..Default::default() }
}

#[test]
fn all_on_gpu_uploads_each_weight_once_and_brings_back_only_the_logits() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let g = graph(&model, "llama-gpu.weir");
    let t = transfers(&g).unwrap();
    let (up, down): (Vec<_>, Vec<_>) = t.iter().partition(|c| c.up);
    // Every weight edge crosses (the loader is on an I/O lane), one transfer per tensor.
    let weight_edges = g.edges.iter().filter(|e| e.sticky).count();
    assert_eq!(up.iter().map(|c| c.edges.len()).sum::<usize>(), weight_edges);
    let loader_ports: std::collections::HashSet<_> = up.iter().map(|c| (c.from.node, c.from.port)).collect();
    assert_eq!(loader_ports.len(), up.len(), "one transfer per loader output");
    // Activations stay on the GPU but for the logits, which go to the sampler on the CPU.
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(g.nodes[down[0].from.node].name, "lm_head");
    // The pass names it after its source and puts it on the device's copy lane back.
    let mut placed = g.clone();
    weir_graphs::place::transfers::insert(&mut placed).unwrap();
    let x = placed.node_named("lm_head/to_host").expect("lm_head/to_host");
    assert_eq!(placed.lanes[placed.nodes[x].lane].name, "gpu0/d2h");
    assert!(t.iter().all(|c| c.device == 0));
}

#[test]
fn attention_on_the_cpu_moves_q_k_v_down_and_its_output_up_in_every_layer() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let g = graph(&model, "llama-gpu-cpu-attention.weir");
    let layers = model.config.num_hidden_layers;
    let t = transfers(&g).unwrap();
    let name = |c: &Crossing| g.nodes[c.from.node].name.clone();
    let down: Vec<String> = t.iter().filter(|c| !c.up).map(name).collect();
    let acts_up: Vec<String> =
        t.iter().filter(|c| c.up && !g.lanes[g.nodes[c.from.node].lane].name.starts_with("loader")).map(name).collect();
    assert_eq!(down.len(), 3 * layers + 1, "{down:?}");
    for l in 0..layers {
        for n in ["rope_q", "rope_k", "v_proj"] {
            assert!(down.contains(&format!("l{l}/{n}")), "l{l}/{n} not brought down: {down:?}");
        }
        assert!(acts_up.contains(&format!("l{l}/attn")), "{acts_up:?}");
    }
    assert_eq!(acts_up.len(), layers);
}

#[test]
fn a_graph_without_gpu_lanes_moves_nothing() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let g = model.expand(None, 1, weir::KvType::F32).unwrap();
    assert!(transfers(&g).unwrap().is_empty());
}

#[test]
fn an_edge_between_two_gpus_is_refused_by_name() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let (text, name) = example("llama-gpu.weir");
    let text =
        text.replacen("lane host cpu threads=1", "lane host cpu threads=1\nlane other gpu device=1", 1).replacen(
            "node final_norm = rmsnorm dim=hidden eps=rms_norm_eps",
            "node final_norm = rmsnorm dim=hidden eps=rms_norm_eps lane=other",
            1,
        );
    let g = model.expand(Some((&text, &name)), 1, weir::KvType::F32).unwrap();
    let e = transfers(&g).unwrap_err().to_string();
    assert!(e.contains("joins two GPUs") && e.contains("final_norm"), "{e}");
}

#[test]
fn an_operator_without_a_gpu_version_on_a_gpu_lane_is_refused_by_name() {
    // The sampler has no GPU version: put it on the GPU lane.
    let (text, name) = example("llama-gpu.weir");
    let text = text.replacen("node sampler = sampler vocab=vocab lane=host", "node sampler = sampler vocab=vocab", 1);
    let opts = EngineOptions { graph: Some((text, name)), threads: 1, ..Default::default() };
    let e = weir::Engine::new(&Model::open(fixture("tiny-llama")).unwrap(), opts).err().expect("refused").to_string();
    assert!(e.contains("node `sampler`") && e.contains("no GPU version"), "{e}");
}

#[test]
fn without_a_gpu_a_gpu_placement_is_refused_naming_the_device() {
    if gpu_present() {
        skipped("a GPU is present (this test is for machines without one)");
        return;
    }
    let e = weir::Engine::new(&Model::open(fixture("tiny-llama")).unwrap(), options("llama-gpu.weir"))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("device gpu0 unavailable") && e.contains("no CUDA"), "{e}");
}

#[test]
fn tiny_llama_all_on_gpu_matches_transformers() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    check_prompts_with(&fixture("tiny-llama"), &golden("tiny-llama")["prompts"], options("llama-gpu.weir"));
}

#[test]
fn tiny_llama_with_attention_on_the_cpu_matches_transformers() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    check_prompts_with(
        &fixture("tiny-llama"),
        &golden("tiny-llama")["prompts"],
        options("llama-gpu-cpu-attention.weir"),
    );
}

#[test]
fn tiny_llama_on_gpu_batches_sequences_like_the_cpu() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    check_batch(&fixture("tiny-llama"), options("llama-gpu.weir"));
}

#[test]
fn a_gpu_memory_budget_too_small_for_the_model_is_refused_naming_the_flag() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    let opts = EngineOptions { gpu_memory: Some(1 << 16), ..options("llama-gpu.weir") };
    let e = weir::Engine::new(&Model::open(fixture("tiny-llama")).unwrap(), opts).err().expect("refused").to_string();
    assert!(e.contains("65536 bytes is too small") && e.contains("--gpu-memory"), "{e}");
}

#[test]
fn gpu_memory_plans_which_weights_stay_on_the_gpu_and_memory_budget_which_are_held_in_dram() {
    // tiny-llama's weights are 0.5 MB; its reserve (KV cache, activations) about 2.3 MB.
    let model = fixture("tiny-llama");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs/llama-gpu.weir");
    let show = |budgets: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["graph", "show", "--model", model.to_str().unwrap(), "--graph", file.to_str().unwrap()])
            .args(budgets)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let text = String::from_utf8(o.stdout).unwrap();
        (text.matches("tier=host").count(), text.matches("tier=nvme").count(), text.matches("tier=dram").count())
    };
    let (resident, streamed, held) = show(&["--gpu-memory", "2.7MB"]);
    assert!(resident > 0 && streamed > 0 && held == 0, "a tight budget splits the weights: {resident} / {streamed}");
    assert_eq!(
        show(&["--gpu-memory", "64MB"]),
        (resident + streamed, 0, 0),
        "a roomy one keeps every weight on the GPU"
    );
    // With a memory budget too, FlexGen's three tiers: what streams is held in DRAM as far as
    // the memory beyond the host pools allows (here 2.7 MB of pools), read from disk past that.
    let (r, nvme, dram) = show(&["--gpu-memory", "2.7MB", "--memory-budget", "2.9MB"]);
    assert_eq!(r, resident, "the GPU's share is the GPU budget's");
    assert!(dram > 0 && nvme > 0 && dram + nvme == streamed, "a tight memory budget splits the rest: {dram} / {nvme}");
    assert_eq!(
        show(&["--gpu-memory", "2.7MB", "--memory-budget", "64MB"]),
        (resident, 0, streamed),
        "a roomy one holds it all"
    );
}

#[test]
fn prefetch_0_reads_and_uploads_on_the_compute_lane_in_turn() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let mut g = graph(&model, "llama-gpu.weir");
    let reserve = EngineOptions::default().reserve(model.config.max_position_embeddings);
    weir_graphs::place::memory::fit(&mut g, 2_700_000, Some(0), &reserve).unwrap();
    weir_graphs::place::loaders::assign(&mut g, 1, false, true, Some(0));
    let compute = g.lanes.iter().position(|l| l.name == "compute").unwrap();
    let loaders: Vec<usize> = g.loaders().map(|(i, _)| i).collect();
    assert!(!loaders.is_empty() && loaders.iter().all(|&i| g.nodes[i].lane == compute));
    // The loader's outputs are host memory wherever it runs; their uploads run on its lane.
    assert!(loaders.iter().all(|&i| g.memory(i, true).is_none()));
    weir_graphs::place::transfers::insert(&mut g).unwrap();
    let ups: Vec<usize> =
        (0..g.nodes.len()).filter(|&i| matches!(g.nodes[i].op, weir_operators::OpConfig::ToGpu(_))).collect();
    assert!(!ups.is_empty() && ups.iter().all(|&i| g.nodes[i].lane == compute));
    // With overlap (the default), uploads go on the copy lane.
    let mut g = graph(&model, "llama-gpu.weir");
    weir_graphs::place::memory::fit(&mut g, 2_700_000, None, &reserve).unwrap();
    weir_graphs::place::loaders::assign(&mut g, 1, false, true, None);
    weir_graphs::place::transfers::insert(&mut g).unwrap();
    let lanes: std::collections::BTreeSet<&str> = g
        .nodes
        .iter()
        .filter(|n| matches!(n.op, weir_operators::OpConfig::ToGpu(_)))
        .map(|n| g.lanes[n.lane].name.as_str())
        .collect();
    assert_eq!(lanes, ["gpu0/h2d"].into());
}

#[test]
fn a_gpu_graphs_host_window_holds_only_what_the_gpu_has_room_for() {
    // Each streamed GPU copy keeps its host buffer, so the host's weights pool bounds the
    // copies in flight: with the weights kept on the GPU it must fit the GPU's weights part.
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let reserve = EngineOptions::default().reserve(model.config.max_position_embeddings);
    let mut split_cases = 0;
    for budget in [2_500_000u64, 2_700_000, 2_850_000] {
        for prefetch in [Some(0), None, Some(4)] {
            let mut g = graph(&model, "llama-gpu.weir");
            let plan = weir_graphs::place::memory::fit(&mut g, budget, prefetch, &reserve).unwrap();
            g.gpu_budget = Some(budget);
            let host = weir_graphs::place::memory::host_pools(&g, &reserve).unwrap().unwrap().split;
            let one_op = plan.minimum - plan.split.kv - plan.split.activations;
            let on_gpu = plan.resident_bytes; // every weight of llama-gpu.weir is used on the GPU
            split_cases += usize::from(on_gpu > 0 && plan.streamed_bytes > 0);
            assert!(host.weights + on_gpu <= plan.split.weights, "{budget} {prefetch:?}: {host:?} {plan:?}");
            assert!(host.weights >= one_op && (host.kv, host.activations) == (plan.split.kv, plan.split.activations));
        }
    }
    assert!(split_cases >= 4, "budgets that both keep and stream weights: {split_cases}");
    // On a CPU graph the host holds the kept weights too: the plan's split as it is.
    let mut g = model.expand(None, 1, weir::KvType::F32).unwrap();
    let plan = weir_graphs::place::memory::fit(&mut g, 2_700_000, None, &reserve).unwrap();
    g.host_budget = Some(2_700_000);
    assert_eq!(weir_graphs::place::memory::host_pools(&g, &reserve).unwrap().unwrap().split, plan.split);
}

#[test]
fn tiny_llama_on_gpu_with_prefetch_0_matches_transformers() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    let opts = EngineOptions { gpu_memory: Some(2_700_000), prefetch: Some(0), ..options("llama-gpu.weir") };
    check_prompts_with(&fixture("tiny-llama"), &golden("tiny-llama")["prompts"], opts);
}

#[test]
fn tiny_llama_on_gpu_with_weights_streamed_under_gpu_memory_matches_transformers() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    let opts = EngineOptions { gpu_memory: Some(2_700_000), ..options("llama-gpu.weir") };
    check_prompts_with(&fixture("tiny-llama"), &golden("tiny-llama")["prompts"], opts);
}

#[test]
fn streaming_under_gpu_memory_stays_within_it() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    let budget = 2_700_000u64;
    let (_, engine) =
        engine(&fixture("tiny-llama"), EngineOptions { gpu_memory: Some(budget), ..options("llama-gpu.weir") });
    engine.generate(weir::Request::greedy(vec![1, 2, 3, 4, 5], 8)).unwrap();
    let peaks = engine.gpu_peaks();
    assert_eq!(peaks.len(), 1, "{peaks:?}");
    let (name, high, b) = &peaks[0];
    assert_eq!((name.as_str(), *b), ("gpu0", budget));
    assert!(*high > 0 && *high <= budget, "{peaks:?}");
    engine.shutdown().unwrap();
}

#[test]
fn streaming_to_a_gpu_never_waits_for_the_whole_device_and_uploads_from_pinned_memory() {
    // How the host drives the device while it generates, counted by the emulated one: order
    // across streams comes from events, never from a device-wide synchronise (cudarc makes one
    // when a context's first stream is made, at start-up); streamed weights go up by DMA.
    if weir_gpu_emu::counts().is_none() {
        skipped("only on the emulated CUDA device, which counts the driver calls");
        return;
    }
    let opts = EngineOptions { gpu_memory: Some(2_700_000), ..options("llama-gpu.weir") };
    let (_, engine) = engine(&fixture("tiny-llama"), opts);
    let before = weir_gpu_emu::counts().unwrap();
    engine.generate(weir::Request::greedy(vec![1, 2, 3, 4, 5], 8)).unwrap();
    let after = weir_gpu_emu::counts().unwrap();
    engine.shutdown().unwrap();
    assert_eq!(after.ctx_synchronize, before.ctx_synchronize, "{after:?}");
    assert_eq!(after.mem_free_sync, before.mem_free_sync, "{after:?}");
    assert!(after.h2d_pinned > before.h2d_pinned && after.launches > before.launches, "{before:?} {after:?}");
}

#[test]
fn mixtral_all_on_gpu_routes_there_and_brings_back_only_the_logits() {
    let model = Model::open(fixture("tiny-mixtral")).unwrap();
    let g = graph(&model, "mixtral-gpu.weir");
    let t = transfers(&g).unwrap();
    let down: Vec<_> = t.iter().filter(|c| !c.up).collect();
    assert_eq!(down.len(), 1, "{down:?}");
    assert_eq!(g.nodes[down[0].from.node].name, "lm_head");
    // Only weights go up: the routes stay with the experts on the GPU.
    for c in t.iter().filter(|c| c.up) {
        assert_eq!(g.nodes[c.from.node].op.kind(), "load", "{} goes up", g.nodes[c.from.node].name);
    }
}

#[test]
fn mixtral_with_experts_on_the_cpu_moves_activations_not_expert_weights() {
    let model = Model::open(fixture("tiny-mixtral")).unwrap();
    let g = graph(&model, "mixtral-gpu-cpu-experts.weir");
    let (layers, experts) = (model.config.num_hidden_layers, model.config.moe.as_ref().unwrap().experts);
    let t = transfers(&g).unwrap();
    let name = |c: &&Crossing| g.nodes[c.from.node].name.clone();
    // Per layer, down: the hidden state the experts read, and the route; up: their sum.
    let down: Vec<String> = t.iter().filter(|c| !c.up).map(|c| name(&c)).collect();
    let acts_up: Vec<String> =
        t.iter().filter(|c| c.up && g.nodes[c.from.node].op.kind() != "load").map(|c| name(&c)).collect();
    assert_eq!(down.len(), 2 * layers + 1, "{down:?}");
    for l in 0..layers {
        assert!(down.contains(&format!("l{l}/mlp_norm")) && down.contains(&format!("l{l}/router")), "{down:?}");
        assert!(acts_up.contains(&format!("l{l}/experts_sum{}", experts - 1)), "{acts_up:?}");
    }
    assert_eq!(acts_up.len(), layers, "{acts_up:?}");
    // No expert weight crosses: the experts read theirs in DRAM.
    for c in &t {
        for &e in &c.edges {
            let to = &g.nodes[g.edges[e].to.node];
            let weight = g.edges[e].sticky;
            assert!(!(weight && to.op.kind() == "expert"), "{} moves {}'s weights", g.nodes[c.from.node].name, to.name);
        }
    }
}

#[test]
fn tiny_mixtral_all_on_gpu_matches_transformers() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    check_prompts_with(&fixture("tiny-mixtral"), &golden("tiny-mixtral")["prompts"], options("mixtral-gpu.weir"));
}

#[test]
fn tiny_mixtral_with_experts_on_the_cpu_matches_transformers() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    let opts = options("mixtral-gpu-cpu-experts.weir");
    check_prompts_with(&fixture("tiny-mixtral"), &golden("tiny-mixtral")["prompts"], opts);
}

#[test]
fn tiny_mixtral_on_gpu_with_experts_read_when_chosen_matches_transformers() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    // Half the expert bytes resident on the GPU; the rest read from disk by the host's expert
    // stores and uploaded when chosen (an unchosen expert's `Absent` passes the upload).
    let experts = Some(weir_graphs::place::experts::ExpertPlacement {
        budget: weir_graphs::place::experts::ExpertBudget::Fraction(0.5),
        popularity: Default::default(),
        cache: true,
        predict: true,
        twins: None,
    });
    let opts = EngineOptions { experts: experts.clone(), ..options("mixtral-gpu.weir") };
    check_prompts_with(&fixture("tiny-mixtral"), &golden("tiny-mixtral")["prompts"], opts);
    // The host's expert caches do not come out of the GPU's budget, and must fit the memory
    // budget.
    let gpu_memory = Some(64 << 20);
    let opts = EngineOptions { experts: experts.clone(), gpu_memory, ..options("mixtral-gpu.weir") };
    let (_, engine) = engine(&fixture("tiny-mixtral"), opts);
    assert_eq!(engine.plan().unwrap().budget, 64 << 20);
    engine.shutdown().unwrap();
    let opts = EngineOptions { experts, gpu_memory, memory_budget: Some(1000), ..options("mixtral-gpu.weir") };
    let e = weir::Engine::new(&Model::open(fixture("tiny-mixtral")).unwrap(), opts).err().unwrap().to_string();
    assert!(e.contains("memory budget of 1000 bytes does not hold the expert caches"), "{e}");
}

#[test]
fn without_gpu_memory_the_plan_fits_the_devices_default_budget() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let g = graph(&model, "llama-gpu.weir");
    if !gpu_present() {
        // No device to ask: no default, and the program's start refuses the placement.
        assert_eq!(weir_graphs::Machine::gpu_memory(&weir::machine::ThisMachine, 0), None);
        assert!(g.on_gpu());
        skipped("no GPU");
        return;
    }
    let want = weir_runtime::gpu::default_budget(0).unwrap() as u64;
    assert_eq!(weir_graphs::Machine::gpu_memory(&weir::machine::ThisMachine, 0), Some(want));
    let (_, engine) = engine(&fixture("tiny-llama"), options("llama-gpu.weir"));
    let plan = engine.plan().expect("a plan under the default budget");
    assert!(plan.split.weights + plan.split.kv + plan.split.activations <= want, "{plan:?}");
    assert_eq!(plan.streamed_bytes, 0, "tiny-llama fits: {plan:?}");
    // A budget to plan in, so --prefetch means something without --gpu-memory.
    let opts = EngineOptions { prefetch: Some(0), ..options("llama-gpu.weir") };
    assert!(weir::Engine::new(&model, opts).is_ok());
    // On the CPU it needs a budget given.
    let e = weir::Engine::new(&model, EngineOptions { prefetch: Some(0), ..Default::default() }).err().unwrap();
    assert!(e.to_string().contains("--prefetch needs --memory-budget"), "{e}");
}

/// tiny-mixtral on mixtral-gpu.weir with half its expert bytes resident and twins on `host`,
/// the lanes' costs given (equal: the chosen cold experts split between GPU and CPU).
fn mixtral_gpu_twins() -> weir_graphs::place::experts::ExpertPlacement {
    use weir_graphs::place::experts::{ExpertBudget, ExpertPlacement, LaneTiming, Twins};
    let t = LaneTiming { fixed_s: 1e-3, per_token_s: 0.0, upload_s: Some(1e-3) };
    ExpertPlacement {
        budget: ExpertBudget::Fraction(0.5),
        popularity: Default::default(),
        cache: true,
        predict: true,
        twins: Some(Twins { lane: "host".into(), timings: [("compute".into(), t), ("host".into(), t)].into() }),
    }
}

#[test]
fn twin_experts_on_the_cpu_get_their_weights_in_place_and_send_their_sums_up() {
    let model = Model::open(fixture("tiny-mixtral")).unwrap();
    let mut g = graph(&model, "mixtral-gpu.weir");
    let plan = weir_graphs::place::experts::place(&mut g, &mixtral_gpu_twins()).unwrap();
    let cold: usize = plan.stores.iter().map(|s| s.1.len()).sum();
    let twins: Vec<usize> = (0..g.nodes.len())
        .filter(|&n| matches!(&g.nodes[n].op, weir_operators::OpConfig::Expert(e) if e.twin))
        .collect();
    assert_eq!(twins.len(), cold, "a twin per cold expert");
    let t = transfers(&g).unwrap();
    for &n in &twins {
        assert_eq!(g.lanes[g.nodes[n].lane].name, "host");
        // Its weights come from the store on the host: no transfer (its tokens and route come
        // down from the GPU); its output goes up to the sum on the GPU.
        for c in &t {
            for &e in c.edges.iter().filter(|&&e| g.edges[e].to.node == n) {
                assert!(g.edges[e].to.port < 2, "{} moves weights to a twin on the host", g.nodes[c.from.node].name);
            }
        }
        assert!(t.iter().any(|c| c.up && c.from.node == n), "{}'s output goes up", g.nodes[n].name);
    }
    // The cold experts' own copies on the GPU get their weights uploaded from the store.
    let store_ups = t.iter().filter(|c| c.up && g.nodes[c.from.node].op.kind() == "expert_store").count();
    assert_eq!(store_ups, 3 * cold, "{store_ups}");
}

#[test]
fn tiny_mixtral_on_gpu_with_twin_experts_on_the_cpu_matches_transformers() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    let opts = EngineOptions { experts: Some(mixtral_gpu_twins()), ..options("mixtral-gpu.weir") };
    check_prompts_with(&fixture("tiny-mixtral"), &golden("tiny-mixtral")["prompts"], opts);
}

#[test]
fn tiny_llama_on_gpu_with_weights_over_gpu_dram_and_nvme_matches_transformers() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    let opts =
        EngineOptions { gpu_memory: Some(2_700_000), memory_budget: Some(2_900_000), ..options("llama-gpu.weir") };
    let (_, engine) = engine(&fixture("tiny-llama"), opts.clone());
    let plan = engine.plan().unwrap().clone();
    assert!(plan.held_tensors > 0 && plan.held_tensors < plan.streamed_tensors, "three tiers: {plan:?}");
    engine.shutdown().unwrap();
    check_prompts_with(&fixture("tiny-llama"), &golden("tiny-llama")["prompts"], opts);
}

#[test]
fn a_trace_of_attention_on_the_cpu_shows_the_gpu_its_copy_lanes_and_the_cpu_at_work() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    // Benchmark (b)'s placement, weights streamed: what `weir trace summary` reports of it.
    let dir = std::env::temp_dir().join(format!("weir-gpu-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join("b.trace.json");
    let weir = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_weir")).args(args).output().unwrap();
    let (graph, model) = (example("llama-gpu-cpu-attention.weir").1, fixture("tiny-llama"));
    let o = weir(&[
        "run",
        "--model",
        model.to_str().unwrap(),
        "--graph",
        &graph,
        "--gpu-memory",
        "2.7MB",
        "--prompt-ids",
        "1,2,3,4",
        "--max-new-tokens",
        "6",
        "--trace",
        trace.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = weir(&["trace", "summary", trace.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let busy = |name: &str| {
        let l =
            v["lanes"].as_array().unwrap().iter().find(|l| l["name"] == name).unwrap_or_else(|| panic!("{name}: {v}"));
        (l["kind"].as_str().unwrap().to_string(), l["utilisation"].as_f64().unwrap())
    };
    for (lane, kind) in [("compute", "gpu0:s0"), ("gpu0/h2d", "gpu0:s"), ("gpu0/d2h", "gpu0:s"), ("cpu", "cpu")] {
        let (k, u) = busy(lane);
        assert!(k.starts_with(kind) && u > 0.0 && u <= 1.0, "{lane}: {k} {u}");
    }
    let ops: Vec<&str> = v["ops"].as_array().unwrap().iter().map(|o| o["kind"].as_str().unwrap()).collect();
    for k in ["to_gpu", "to_host", "attention", "linear", "load"] {
        assert!(ops.contains(&k), "{ops:?}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_gpu_prefill_workers_kv_cache_comes_back_to_the_host_for_its_kv_send() {
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let (text, name) = example("llama-gpu.weir");
    let opts = weir_graphs::PlaceOptions { export_kv: true, threads: 1, ..Default::default() };
    let g = model.place(Some((&text, &name)), &opts).unwrap().graph;
    let layers = model.config.num_hidden_layers;
    let sends: Vec<usize> = (0..g.nodes.len()).filter(|&i| g.nodes[i].op.kind() == "kv_send").collect();
    assert_eq!(sends.len(), layers);
    for s in sends {
        assert_eq!(g.lanes[g.nodes[s].lane].name, "kvnet");
        // Fed by a to_host on the device's copy lane back, fed by an attention node's `kv`.
        let into = |n: usize| g.edges.iter().find(|e| e.to.node == n).unwrap().from;
        let t = into(s);
        assert_eq!(g.nodes[t.node].op.kind(), "to_host");
        assert_eq!(g.lanes[g.nodes[t.node].lane].name, "gpu0/d2h");
        let a = into(t.node);
        assert_eq!((g.nodes[a.node].op.kind(), a.port), ("attention", 1));
    }
}

#[test]
fn tiny_llama_prefilled_on_the_gpu_decodes_on_the_cpu_as_transformers() {
    if !gpu_present() {
        skipped("no GPU");
        return;
    }
    let model = Model::open(fixture("tiny-llama")).unwrap();
    let prefill = weir::Engine::new(
        &model,
        EngineOptions { role: weir::Role::Prefill, max_pass_tokens: 8, ..options("llama-gpu.weir") },
    )
    .unwrap();
    let decode = weir::Engine::new(&model, EngineOptions { threads: 1, ..Default::default() }).unwrap();
    for p in golden("tiny-llama")["prompts"].as_array().unwrap() {
        let (prompt, want) = (ids(&p["input_ids"]), ids(&p["greedy"]["new_ids"]));
        let req = weir::Request::greedy(prompt, want.len());
        let (handle, gen) = decode.expect_kv(req.clone()).unwrap();
        let first = prefill.prefill_into(req, &decode, handle).unwrap().wait().unwrap();
        assert_eq!(first.tokens, want[..1], "the first token, sampled after the GPU's prefill");
        assert_eq!(gen.wait().unwrap().tokens, want, "decoded on the CPU from the GPU's KV cache");
    }
}

/// Every test above again, in a child process on the emulated CUDA device
/// (`weir_gpu_emu`): the GPU placements' golden tests run where there is no GPU.
#[test]
fn the_gpu_tests_pass_on_the_emulated_device() {
    weir_gpu_emu::assert_tests_pass(&["--skip", "emulated"], 20);
}
