//! The `weir run` contract, end to end through the binary, and its answers to bad input.

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Output};

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir")).args(args).output().expect("run weir")
}

fn ok_json(args: &[&str]) -> Value {
    let o = weir(args);
    assert!(o.status.success(), "weir {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    assert_eq!(stdout.trim().lines().count(), 1, "--json must print exactly one line: {stdout}");
    serde_json::from_str(stdout.trim()).expect("stdout is one JSON object")
}

/// Runs weir expecting failure; returns stderr after checking it is a clean error.
fn fails(args: &[&str], want: &[&str]) -> String {
    let o = weir(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "weir {args:?} should fail");
    assert!(!err.contains("panicked"), "weir {args:?} panicked: {err}");
    for w in want {
        assert!(err.contains(w), "weir {args:?}: stderr lacks `{w}`:\n{err}");
    }
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn run_json_gives_the_golden_tokens_text_and_speeds() {
    let g = golden("tiny-llama");
    let p = &g["prompts"][0];
    let model = fixture("tiny-llama");
    let v = ok_json(&[
        "run",
        "--model",
        s(&model),
        "--prompt",
        p["text"].as_str().unwrap(),
        "--max-new-tokens",
        "24",
        "--json",
    ]);
    assert_eq!(v["prompt_ids"], p["input_ids"]);
    assert_eq!(v["generated_ids"], p["greedy"]["new_ids"]);
    assert_eq!(v["text"], p["greedy"]["new_text"]);
    assert!(v["prefill_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
    // All 24 tokens, no EOS: stopped by the limit, named as other tools name it.
    assert_eq!((v["generated_ids"].as_array().unwrap().len(), &v["finish_reason"]), (24, &serde_json::json!("length")));
    // The same through --prompt-ids.
    let ids_arg = ids(&p["input_ids"]).iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let v2 = ok_json(&[
        "run",
        "--model",
        s(&model),
        "--prompt-ids",
        &ids_arg,
        "--max-new-tokens",
        "24",
        "--json",
        "--threads",
        "1",
    ]);
    assert_eq!(v2["generated_ids"], p["greedy"]["new_ids"]);
}

#[test]
fn logits_out_and_trace_files_are_written() {
    let g = golden("tiny-llama");
    let p = &g["prompts"][1];
    let dir = tmpdir("cli-files");
    let (lo, tr) = (dir.join("logits.json"), dir.join("trace.json"));
    let ids_arg = ids(&p["input_ids"]).iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    ok_json(&[
        "run",
        "--model",
        s(&fixture("tiny-llama")),
        "--prompt-ids",
        &ids_arg,
        "--max-new-tokens",
        "5",
        "--json",
        "--logits-out",
        s(&lo),
        "--trace",
        s(&tr),
    ]);
    let l: Value = serde_json::from_str(&std::fs::read_to_string(&lo).unwrap()).unwrap();
    let (worst, ok) = compare(&floats(&l["last_prompt_logits"]), &floats(&p["last_logits"]), 2e-4, 1e-4);
    assert!(ok, "last_prompt_logits off by {worst}");
    let steps = l["step_logits"].as_array().unwrap();
    assert_eq!(steps.len(), 5);
    for (i, st) in steps.iter().enumerate() {
        let row = floats(st);
        let top = ids(&p["greedy"]["steps"][i]["top_ids"]);
        let best = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b]).then(b.cmp(&a))).unwrap();
        assert_eq!(best as u32, top[0], "step {i}");
    }
    let t: Value = serde_json::from_str(&std::fs::read_to_string(&tr).unwrap()).unwrap();
    let ev = t["traceEvents"].as_array().unwrap();
    let lanes: Vec<&Value> = ev.iter().filter(|e| e["name"] == "thread_name").collect();
    assert!(lanes.len() >= 2, "a track per lane (compute, loader)");
    let spans: Vec<&Value> = ev.iter().filter(|e| e["ph"] == "X").collect();
    assert!(
        spans.iter().any(|e| e["cat"] == "load" && e["args"]["bytes"].as_u64().unwrap() > 0),
        "weight loads are spans with bytes"
    );
    let attn: Vec<&&Value> = spans.iter().filter(|e| e["args"]["op"] == "attention").collect();
    // 2 layers × (prefill + 4 decode passes) at least.
    assert!(attn.len() >= 10, "attention spans: {}", attn.len());
    assert!(attn.iter().any(|e| e["args"]["layer"] == 1));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn seeded_sampling_is_reproducible_and_the_seed_matters() {
    let m = fixture("tiny-llama");
    let run = |seed: &str| {
        ok_json(&[
            "run",
            "--model",
            s(&m),
            "--prompt",
            "The man",
            "--max-new-tokens",
            "16",
            "--temperature",
            "1.5",
            "--top-k",
            "50",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--json",
        ])["generated_ids"]
            .clone()
    };
    assert_eq!(run("11"), run("11"));
    assert_ne!(run("11"), run("12"));
}

#[test]
fn stops_at_eos() {
    // Make the 4th greedy token the EOS id: generation stops there, EOS included.
    let dir = copy_fixture("tiny-llama", "eos");
    edit_json(&dir.join("generation_config.json"), |c| c["eos_token_id"] = serde_json::json!([2, 146]));
    let v = ok_json(&["run", "--model", s(&dir), "--prompt", "The man", "--max-new-tokens", "24", "--json"]);
    assert_eq!(v["generated_ids"], serde_json::json!([81, 319, 51, 146]));
    assert_eq!(v["finish_reason"], "stop");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bad_input_gets_a_clear_error_and_no_panic() {
    let good = fixture("tiny-llama");
    // Missing config.json: the OS's reason said once.
    let d = tmpdir("noconfig");
    let err = fails(&["run", "--model", s(&d), "--prompt", "x"], &["config.json", "No such file or directory"]);
    assert_eq!(err.matches("No such file or directory").count(), 1, "each cause once:\n{err}");
    // A folder that does not exist.
    fails(
        &["run", "--model", "/nonexistent/weir-model", "--prompt", "x"],
        &["/nonexistent/weir-model", "not a model folder"],
    );
    // Unknown architecture.
    let d = copy_fixture("tiny-llama", "arch");
    edit_json(&d.join("config.json"), |c| c["architectures"] = serde_json::json!(["GPTNeoXForCausalLM"]));
    fails(
        &["run", "--model", s(&d), "--prompt", "x"],
        &["unsupported architecture `GPTNeoXForCausalLM`", "LlamaForCausalLM"],
    );
    // Truncated weights.
    let d = copy_fixture("tiny-llama", "trunc");
    let f = std::fs::OpenOptions::new().write(true).open(d.join("model.safetensors")).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - 1000).unwrap();
    fails(&["run", "--model", s(&d), "--prompt", "x"], &["model.safetensors", "truncated", "tensor `"]);
    // A tensor whose shape disagrees with the config.
    let d = copy_fixture("tiny-llama", "shape");
    edit_json(&d.join("config.json"), |c| c["intermediate_size"] = 161.into());
    fails(
        &["run", "--model", s(&d), "--prompt", "x"],
        &["model.layers.0.mlp.gate_proj.weight", "[160, 64]", "[161, 64]"],
    );
    // A prompt longer than max_position_embeddings.
    let d = copy_fixture("tiny-llama", "maxpos");
    edit_json(&d.join("config.json"), |c| c["max_position_embeddings"] = 4.into());
    fails(&["run", "--model", s(&d), "--prompt", "The man", "--json"], &["6 tokens", "max_position_embeddings (4)"]);
    // Token ids outside the vocabulary.
    fails(&["run", "--model", s(&good), "--prompt-ids", "1,384"], &["id 384", "vocabulary (size 384)"]);
    // Malformed flags.
    fails(&["run", "--model", s(&good), "--prompt-ids", "1,x,3"], &["--prompt-ids", "`x`"]);
    fails(&["run", "--model", s(&good), "--prompt", "x", "--top-p", "0"], &["--top-p"]);
    fails(&["run", "--model", s(&good), "--prompt", "x", "--temperature", "-1"], &["--temperature"]);
    fails(&["run", "--model", s(&good), "--prompt", "x", "--threads", "4096"], &["4096 threads"]);
    fails(&["run", "--model", s(&good)], &["--prompt"]);
    // A broken config.json.
    let d = copy_fixture("tiny-llama", "json");
    std::fs::write(d.join("config.json"), "{\"hidden_size\": ").unwrap();
    fails(&["run", "--model", s(&d), "--prompt", "x"], &["config.json", "invalid JSON"]);
}

#[test]
fn synth_writes_a_mixture_of_experts_that_runs_with_its_experts_on_disk() {
    let d = tmpdir("synth-moe");
    let out = weir(&["synth", "--shape", "tiny-moe", "--dtype", "bf16", "--out", s(&d)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "MixtralForCausalLM");
    assert_eq!((config["num_local_experts"].as_u64(), config["num_experts_per_tok"].as_u64()), (Some(8), Some(2)));
    let run = ["run", "--model", s(&d), "--prompt", "hello there", "--max-new-tokens", "8", "--json"];
    let all = ok_json(&run);
    // A quarter of the experts in memory, the rest read from disk when chosen or predicted:
    // the same tokens.
    let quarter = ok_json(&[&run[..], &["--expert-budget", "25%"]].concat());
    assert_eq!(all["generated_ids"], quarter["generated_ids"]);
    let bench = ["bench", "--model", s(&d), "--prompt-len", "4", "--gen-len", "8", "--json", "--expert-budget", "25%"];
    let b = ok_json(&bench);
    let rate = |k: &str| b[k].as_f64().unwrap_or_else(|| panic!("{k} missing: {b}"));
    assert!((0.0..=1.0).contains(&rate("expert_cache_hit_rate")));
    assert!((0.0..=1.0).contains(&rate("expert_prediction_hit_rate")));
    assert!(b["expert_bytes_per_token"].as_f64().unwrap() > 0.0, "{b}");
    let b = ok_json(&[&bench[..], &["--no-expert-cache"]].concat());
    assert!(b["expert_prediction_hit_rate"].is_null() && b["expert_prefetches"] == 0, "{b}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn synth_writes_a_model_that_runs() {
    let d = tmpdir("synth");
    let out = weir(&["synth", "--shape", "tiny", "--dtype", "bf16", "--seed", "3", "--out", s(&d)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = ok_json(&["run", "--model", s(&d), "--prompt", "hello there", "--max-new-tokens", "4", "--json"]);
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 4);
    // Same seed, same bytes; another seed, other bytes.
    let d2 = tmpdir("synth2");
    let d3 = tmpdir("synth3");
    weir(&["synth", "--shape", "tiny", "--dtype", "bf16", "--seed", "3", "--out", s(&d2)]);
    weir(&["synth", "--shape", "tiny", "--dtype", "bf16", "--seed", "4", "--out", s(&d3)]);
    let w = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(w(&d), w(&d2));
    assert_ne!(w(&d), w(&d3));
    fails(&["synth", "--shape", "gpt5", "--out", s(&d)], &["unknown shape `gpt5`", "tinyllama-1.1b"]);
    fails(&["synth", "--shape", "tiny", "--dtype", "int3", "--out", s(&d)], &["unknown dtype `int3`"]);
    for x in [d, d2, d3] {
        std::fs::remove_dir_all(x).unwrap();
    }
}

#[test]
fn graph_subcommands_check_show_dot_and_run_a_user_file() {
    let model = fixture("tiny-llama");
    let o = weir(&["graph", "show", "--model", s(&model), "--threads", "1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let shown = String::from_utf8(o.stdout).unwrap();
    assert!(shown.starts_with("weir 1\n") && shown.contains("node l1/mlp = swiglu"));
    let dir = tmpdir("graphcli");
    let f = dir.join("shown.weir");
    std::fs::write(&f, &shown).unwrap();
    let o = weir(&["graph", "check", s(&f), "--model", s(&model)]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ok (2 lanes, 28 operators"), "{o:?}");
    // The shown file needs no model variables, so it checks without --model too.
    assert!(weir(&["graph", "check", s(&f)]).status.success());
    let dot = weir(&["graph", "dot", "--model", s(&model)]);
    assert!(String::from_utf8_lossy(&dot.stdout).starts_with("digraph weir"));
    // Running the shown file gives the golden tokens.
    let g = golden("tiny-llama");
    let v = ok_json(&[
        "run",
        "--model",
        s(&model),
        "--graph",
        s(&f),
        "--prompt",
        "The man",
        "--max-new-tokens",
        "24",
        "--json",
    ]);
    assert_eq!(v["generated_ids"], g["prompts"][0]["greedy"]["new_ids"]);
    // A user file with no decoder layers runs too (and predicts differently).
    let nl = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs/no-layers.weir");
    let v = ok_json(&[
        "run",
        "--model",
        s(&model),
        "--graph",
        s(&nl),
        "--prompt",
        "The man",
        "--max-new-tokens",
        "4",
        "--json",
    ]);
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 4);
    let golden4: Vec<serde_json::Value> = g["prompts"][0]["greedy"]["new_ids"].as_array().unwrap()[..4].to_vec();
    assert_ne!(v["generated_ids"].as_array().unwrap(), &golden4);
    // Placement as run does it: a budget with no overlap puts every weight on the compute
    // lane; the shown file checks again and runs with the golden tokens.
    let o = weir(&[
        "graph",
        "show",
        "--model",
        s(&model),
        "--threads",
        "1",
        "--memory-budget",
        "2500KB",
        "--prefetch",
        "0",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let placed = String::from_utf8(o.stdout).unwrap();
    let weights: Vec<&str> = placed.lines().filter(|l| l.starts_with("weight")).collect();
    assert!(!weights.is_empty() && weights.iter().all(|l| l.contains("lane=compute")), "{placed}");
    assert!(placed.contains("tier=nvme") && placed.contains("budget host=2500000"), "{placed}");
    let pf = dir.join("prefetch0.weir");
    std::fs::write(&pf, &placed).unwrap();
    assert!(weir(&["graph", "check", s(&pf), "--model", s(&model)]).status.success());
    let v = ok_json(&[
        "run",
        "--model",
        s(&model),
        "--graph",
        s(&pf),
        "--prompt",
        "The man",
        "--max-new-tokens",
        "24",
        "--json",
    ]);
    assert_eq!(v["generated_ids"], g["prompts"][0]["greedy"]["new_ids"]);
    // Errors: file:line:col, all of them, non-zero exit.
    let bad = dir.join("bad.weir");
    std::fs::write(&bad, "weir 1\nlane c cpu\nnode a = frob\nnode b = add dim=0\n").unwrap();
    let err = fails(
        &["graph", "check", s(&bad)],
        &[
            "bad.weir:3:10: node `a`: unknown operator `frob`",
            "bad.weir:4:14: node `b`: `dim` must be a positive integer",
        ],
    );
    assert!(err.contains("no `input` statement"), "{err}");
    fails(&["run", "--model", s(&model), "--graph", s(&bad), "--prompt", "x"], &["bad.weir:3:10"]);
    fails(&["graph", "check", "/nonexistent.weir"], &["/nonexistent.weir"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bench_json_has_the_keys_other_tools_read_and_budgets_are_checked() {
    let model = fixture("tiny-llama");
    let v = ok_json(&[
        "bench",
        "--model",
        s(&model),
        "--threads",
        "1",
        "--prompt-len",
        "4",
        "--gen-len",
        "3",
        "--memory-budget",
        "400KB",
        "--json",
    ]);
    for k in [
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "total_tokens_per_s",
        "prefill_flops_per_s",
        "decode_flops_per_s",
        "disk_gb_per_s",
        "bound_s_per_step",
        "actual_s_per_step",
        "overlap_efficiency",
    ] {
        assert!(v[k].as_f64().is_some_and(|x| x.is_finite() && x >= 0.0), "{k}: {}", v[k]);
    }
    assert!(v["disk_bytes_read"].as_u64().unwrap() > 0, "streamed weights were read during the run");
    let peak = v["peak_bytes"]["host"].as_u64().unwrap();
    assert!(peak > 0 && peak <= 400_000, "peak {peak} within the budget");
    // Every pool was used, and the tier's peak is at most their peaks together.
    let pools = &v["peak_bytes_by_pool"];
    let sum: u64 = ["weights", "kv", "activations"].iter().map(|p| pools[p].as_u64().unwrap()).sum();
    assert!(["weights", "kv", "activations"].iter().all(|p| pools[p].as_u64().unwrap() > 0), "{pools}");
    assert!(peak <= sum, "{peak} vs {pools}");
    assert_eq!(v["page_cache"], "bypassed");
    // What the speeds were measured with.
    assert_eq!(v["cpu_isa"], weir_kernels::isa::detected().name());
    assert_eq!(v["bf16_as_f16"], false);
    fails(
        &["run", "--model", s(&model), "--prompt", "x", "--memory-budget", "7XB"],
        &["--memory-budget 7XB", "unknown unit"],
    );
    fails(&["run", "--model", s(&model), "--prompt", "x", "--memory-budget", "1KB"], &["too small", "at least"]);
    fails(&["bench", "--model", s(&model), "--gen-len", "1"], &["--gen-len"]);
    fails(&["run", "--model", s(&model), "--prompt", "x", "--micro-batches", "0"], &["--micro-batches 0"]);
    fails(&["run", "--model", s(&model), "--prompt", "x", "--prefetch", "2"], &["--prefetch needs --memory-budget"]);
    fails(&["run", "--model", s(&model), "--prompt", "x", "--kv-tokens", "64"], &["--kv-tokens needs --memory-budget"]);
    fails(&["run", "--model", s(&model), "--prompt", "x", "--max-pass-tokens", "0"], &["--max-pass-tokens 0"]);
    fails(&["run", "--model", s(&model), "--prompt", "x", "--kv-dtype", "fp8"], &["--kv-dtype fp8", "bf16"]);
    fails(&["graph", "show", "--model", s(&model), "--memory-budget", "1KB"], &["too small", "at least"]);
    fails(&["graph", "show", "--model", s(&model), "--kv-tokens", "64"], &["--kv-tokens needs --memory-budget"]);
    // A graph file with its own budget gives --kv-tokens one to reserve in: the same reserve
    // as the flag that placed it, and a request longer than it is refused by that reserve.
    let o = weir(&["graph", "show", "--model", s(&model), "--memory-budget", "3MB", "--kv-tokens", "64"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = tmpdir("kvtokens");
    let budgeted = dir.join("budgeted.weir");
    std::fs::write(&budgeted, &o.stdout).unwrap();
    let run = |n: &'static str| {
        let (m, g) = (s(&model).to_string(), s(&budgeted).to_string());
        [&["run", "--model"][..], &[&m], &["--graph"], &[&g], &["--prompt-ids", "1,2,3", "--kv-tokens", "64"]]
            .concat()
            .into_iter()
            .map(str::to_string)
            .chain(["--max-new-tokens".to_string(), n.to_string()])
            .collect::<Vec<String>>()
    };
    let args = run("4");
    let o = weir(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let args = run("80");
    fails(&args.iter().map(String::as_str).collect::<Vec<_>>(), &["needs KV cache for 96 positions", "reserves 64"]);
    std::fs::remove_dir_all(dir).unwrap();
    fails(
        &["run", "--model", s(&model), "--prompt", "x", "--gpu-memory", "lots"],
        &["--gpu-memory lots", "not a size"],
    );
    fails(&["run", "--model", s(&model), "--prompt", "x", "--gpu-memory", "0"], &["--gpu-memory 0", "positive"]);
    let gpu_graph = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs/llama-gpu.weir");
    fails(
        &["graph", "show", "--model", s(&model), "--graph", s(&gpu_graph), "--gpu-memory", "1KB"],
        &["too small", "at least", "the budget is the GPU memory budget, --gpu-memory"],
    );
    // A GPU graph planned into --memory-budget (no --gpu-memory, and no device here to give a
    // default): the error names that flag.
    if !weir_runtime::gpu::driver_present() {
        fails(
            &["graph", "show", "--model", s(&model), "--graph", s(&gpu_graph), "--memory-budget", "1KB"],
            &["too small", "the budget is --memory-budget"],
        );
    }
    fails(&["gpu", "copy", "--rounds", "0"], &["--rounds 0"]);
    fails(
        &["bench", "--model", s(&model), "--prompt-len", "2", "--gen-len", "2", "--trace", "/nonexistent/dir/t.json"],
        &["--trace /nonexistent/dir/t.json"],
    );
    // A request longer than the KV reserve is refused before it runs, saying what it needs.
    fails(
        &[
            "run",
            "--model",
            s(&model),
            "--prompt",
            "The man",
            "--max-new-tokens",
            "40",
            "--memory-budget",
            "4MB",
            "--kv-tokens",
            "32",
        ],
        &["KV cache for 48 positions", "reserves 32", "--kv-tokens"],
    );
}

#[test]
fn injected_read_errors_and_short_reads_name_the_tensor_and_file() {
    let model = fixture("tiny-llama");
    for (var, want) in [("WEIR_INJECT_READ_ERROR", "Input/output error"), ("WEIR_INJECT_SHORT_READ", "short read")] {
        for budget in [None, Some("400KB")] {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_weir"));
            cmd.args(["run", "--model", s(&model), "--prompt", "The man", "--max-new-tokens", "4"]);
            if let Some(b) = budget {
                cmd.args(["--memory-budget", b]);
            }
            let o = cmd.env(var, "model.layers.1.mlp.down_proj.weight").output().unwrap();
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success(), "{var} {budget:?}");
            assert!(
                err.contains(want)
                    && err.contains("model.layers.1.mlp.down_proj.weight")
                    && err.contains("model.safetensors"),
                "{var} {budget:?}: {err}"
            );
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}

#[test]
fn every_instruction_set_path_gives_the_golden_tokens() {
    use weir_kernels::isa::Isa;
    let have = weir_kernels::isa::available();
    // f32 weights, and bf16 weights (golden: the bf16 values upcast to f32), also held as f16;
    // the longest prompt (126 tokens) prefills through the packed GEMM on the AVX2 path (f16:
    // through the 4 × 3 tile).
    for (fx, prompts, extra) in [
        ("tiny-llama", "/prompts", None),
        ("tiny-llama-bf16", "/f32_upcast/prompts", None),
        ("tiny-llama-bf16", "/f32_upcast/prompts", Some("--bf16-as-f16")),
    ] {
        let g = golden(fx);
        let model = fixture(fx);
        // `amx` is in `available()` only where asked for (`WEIR_CPU_ISA=amx cargo test`) and present.
        for isa in [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Amx] {
            if !have.contains(&isa) {
                println!("skipped: the {} path — not on this CPU", isa.name());
                continue;
            }
            for p in g.pointer(prompts).unwrap().as_array().unwrap() {
                let ids_arg = ids(&p["input_ids"]).iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
                let mut args = vec!["run", "--model", s(&model), "--prompt-ids", &ids_arg, "--max-new-tokens", "24"];
                args.extend(extra);
                args.push("--json");
                let o = Command::new(env!("CARGO_BIN_EXE_weir"))
                    .env("WEIR_CPU_ISA", isa.name())
                    .args(&args)
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{fx} {extra:?} {}: {}", isa.name(), String::from_utf8_lossy(&o.stderr));
                let v: Value = serde_json::from_slice(&o.stdout).unwrap();
                assert_eq!(
                    v["generated_ids"],
                    p["greedy"]["new_ids"],
                    "{fx} {extra:?}, {} path, prompt of {} tokens",
                    isa.name(),
                    ids(&p["input_ids"]).len()
                );
            }
        }
    }
}

#[test]
fn expert_stats_accumulate_in_their_file_across_runs() {
    let dir = tmpdir("expert-stats");
    let path = dir.join("stats.json");
    let model = fixture("tiny-mixtral");
    let args = ["run", "--model", s(&model), "--prompt-ids", "1,54,74,71,287,290", "--max-new-tokens", "4"];
    fn with<'a>(args: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
        [args, extra].concat()
    }
    let read = || -> Value { serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap() };
    ok_json(&with(&args, &["--json", "--expert-stats", s(&path)]));
    let first = read();
    // 6 prompt tokens and 3 fed-back generated tokens routed in each of the 2 layers, 2 experts each.
    let layers = first["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for l in layers {
        assert_eq!(l["tokens"], 9, "{first}");
        assert_eq!(l["chosen"].as_array().unwrap().iter().map(|c| c.as_u64().unwrap()).sum::<u64>(), 18);
    }
    ok_json(&with(&args, &["--json", "--expert-stats", s(&path)]));
    assert_eq!(read()["layers"][1]["tokens"], 18, "a second run adds to the file");
    assert_eq!(read()["layers"][1]["chosen"][0], first["layers"][1]["chosen"][0].as_u64().unwrap() * 2);
    std::fs::write(&path, "not json").unwrap();
    fails(&with(&args, &["--expert-stats", s(&path)]), &["--expert-stats", "stats.json", "not JSON"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn expert_budget_flags_are_checked_and_a_small_budget_names_the_minimum() {
    let dir = fixture("tiny-mixtral");
    let d = dir.to_str().unwrap();
    for (flags, want) in [
        (vec!["--expert-budget", "120%"], "--expert-budget 120%: a percentage must be a number from 0 to 100"),
        (vec!["--no-expert-cache"], "--no-expert-cache needs --expert-budget"),
        (vec!["--no-expert-prefetch"], "--no-expert-prefetch needs --expert-budget"),
        (vec!["--expert-budget", "1KB"], "holds less than one expert per MoE layer"),
        (vec!["--expert-budget", "lots"], "--expert-budget lots"),
        (vec!["--expert-twins", "compute"], "--expert-twins needs --expert-budget"),
        (
            vec!["--expert-budget", "25%", "--expert-twins", "gpu9"],
            "twin lane `gpu9`: the graph has no such lane (lanes: compute, loader",
        ),
        (vec!["--expert-budget", "25%", "--expert-twins", "loader"], "twin lane `loader` is an I/O lane"),
    ] {
        let mut args = vec!["run", "--model", d, "--prompt-ids", "1,2,3", "--max-new-tokens", "2"];
        args.extend(flags.iter().copied());
        let o = weir(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{flags:?}: {err}");
    }
    let run = ["run", "--model", d, "--prompt-ids", "1,2,3", "--max-new-tokens", "2", "--expert-budget", "25%"];
    let o = weir(&run);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = weir(&[&run[..], &["--no-expert-prefetch"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // Twins on the graph's own compute lane: a choice between equals, measured at start-up.
    let o = weir(&[&run[..], &["--expert-twins", "compute"]].concat());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // `bench` reads a stats file and never writes one: a missing file, or one with nothing to
    // rank, is refused naming the flag.
    let bench = ["bench", "--model", d, "--prompt-len", "2", "--gen-len", "2", "--expert-stats", "/nonexistent/s.json"];
    fails(&[&bench[..], &["--expert-budget", "25%"]].concat(), &["--expert-stats /nonexistent/s.json", "no such file"]);
    fails(&bench, &["--expert-stats needs --expert-budget"]);
}

#[test]
fn a_node_on_a_gpu_lane_runs_there_or_is_refused_saying_why() {
    let model = fixture("tiny-llama");
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("graphs/llama.weir")).unwrap();
    let text = text.replacen("lane loader io", "lane loader io\nlane card gpu device=0", 1).replacen(
        "node lm_head = lm_head hidden=hidden vocab=vocab",
        "node lm_head = lm_head hidden=hidden vocab=vocab lane=card",
        1,
    );
    assert!(text.contains("lane=card"));
    let dir = tmpdir("gpulane");
    let f = dir.join("gpu.weir");
    std::fs::write(&f, text).unwrap();
    assert!(weir(&["graph", "check", s(&f), "--model", s(&model)]).status.success());
    let o = weir(&["run", "--model", s(&model), "--graph", s(&f), "--prompt", "x", "--max-new-tokens", "4"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if weir_runtime::gpu::driver_present() && weir_runtime::gpu::device_count().unwrap_or(0) > 0 {
        // The LM head on the GPU, the rest on the CPU: the same tokens as all on the CPU.
        let cpu = weir(&["run", "--model", s(&model), "--prompt", "x", "--max-new-tokens", "4"]);
        assert!(o.status.success(), "{err}");
        assert_eq!(String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&cpu.stdout));
    } else {
        assert!(!o.status.success() && err.contains("device gpu0 unavailable"), "{err}");
        assert!(err.contains("no CUDA driver") || err.contains("no CUDA device 0"), "{err}");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn bf16_as_f16_keeps_a_matrix_past_f16s_range_as_bf16_and_says_which() {
    // tiny-llama-bf16 with one weight of an MLP matrix set to 99840 (no f16 holds it).
    let dir = tmpdir("bf16-big");
    for f in std::fs::read_dir(fixture("tiny-llama-bf16")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let st = dir.join("model.safetensors");
    let mut bytes = std::fs::read(&st).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let at = 8 + n + header[name]["data_offsets"][0].as_u64().unwrap() as usize;
    bytes[at..at + 2].copy_from_slice(&half::bf16::from_f32(99840.0).to_bits().to_le_bytes());
    std::fs::write(&st, bytes).unwrap();
    let run = ["run", "--model", s(&dir), "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json"];
    let o = weir(&[&run[..], &["--bf16-as-f16"]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains(&format!("--bf16-as-f16: tensor `{name}` kept as bf16")) && err.contains("99840"), "{err}");
    // The other matrices are held as f16; the tokens are those of the model as stored.
    let held: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(held["generated_ids"], ok_json(&run)["generated_ids"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn gpu_copy_measures_three_sources_or_says_there_is_no_gpu() {
    let o = weir(&["gpu", "copy", "--bytes", "8MiB", "--rounds", "2", "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    if weir_runtime::gpu::driver_present() && weir_runtime::gpu::device_count().unwrap_or(0) > 0 {
        assert!(o.status.success(), "{err}");
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        for k in ["pool_gbps", "plain_pinned_gbps", "pageable_gbps", "pool_ratio"] {
            assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v}");
        }
        assert_eq!(v["bytes"], 8 << 20);
    } else {
        assert!(!o.status.success() && err.contains("device gpu0") && err.contains("no CUDA"), "{err}");
    }
    let o = weir(&["gpu", "copy", "--bytes", "lots"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--bytes lots"));
}

#[test]
fn graph_check_says_what_runs_on_the_gpu_and_refuses_what_cannot() {
    let model = fixture("tiny-llama");
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs/llama-gpu-cpu-attention.weir");
    let o = weir(&["graph", "check", s(&file), "--model", s(&model)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // tiny-llama has 2 layers: attention and the sampler on the CPU, 25 operators on the GPU;
    // 3 activations down and 1 up per layer, the logits down, every weight of a GPU node up.
    assert!(out.contains("25 operators on GPU lanes") && out.contains("and 7 back"), "{out}");
    let text = std::fs::read_to_string(&file).unwrap().replacen("vocab=vocab lane=cpu", "vocab=vocab", 1);
    let dir = tmpdir("gpucheck");
    let bad = dir.join("bad.weir");
    std::fs::write(&bad, text).unwrap();
    let o = weir(&["graph", "check", s(&bad), "--model", s(&model)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("node `sampler`") && err.contains("no GPU version"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The tests above that run on a GPU where there is one, again in a child process on the
/// emulated CUDA device (`weir_gpu_emu`): the CLI's GPU commands end to end.
#[test]
fn the_gpu_tests_pass_on_the_emulated_device() {
    weir_gpu_emu::assert_tests_pass(&["gpu", "--skip", "emulated"], 3);
}
