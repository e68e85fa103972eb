//! Shared helpers for the integration tests: the fixtures, and model folders derived from them.
#![allow(dead_code)]

pub mod http;

use serde_json::Value;
use std::path::{Path, PathBuf};
use weir::{DType, Engine, EngineOptions, LogitsMode, Model, Request};

/// `../shared/fixtures` beside the repository (or `$WEIR_FIXTURES`). Missing fixtures fail
/// the test loudly: a golden test that cannot find its goldens must not pass.
pub fn fixtures() -> PathBuf {
    let p = std::env::var_os("WEIR_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    assert!(p.join("tiny-llama/golden.json").exists(), "fixtures not found at {} (set WEIR_FIXTURES)", p.display());
    p
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn golden(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden.json")).unwrap()).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

/// A fresh, empty temporary folder.
pub fn tmpdir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("weir-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Copies a fixture folder (without its weights) into a temp folder.
pub fn copy_fixture_meta(name: &str, tag: &str) -> PathBuf {
    let d = tmpdir(tag);
    for f in
        ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    {
        std::fs::copy(fixture(name).join(f), d.join(f)).unwrap();
    }
    d
}

/// Copies a whole fixture folder into a temp folder.
pub fn copy_fixture(name: &str, tag: &str) -> PathBuf {
    let d = copy_fixture_meta(name, tag);
    std::fs::copy(fixture(name).join("model.safetensors"), d.join("model.safetensors")).unwrap();
    d
}

/// Every tensor of a fixture as f32, by name.
pub fn fixture_tensors(name: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let idx = weir_graphs::WeightIndex::from_dir(&fixture(name)).unwrap();
    let bytes = std::fs::read(fixture(name).join("model.safetensors")).unwrap();
    idx.tensors
        .values()
        .map(|t| {
            let raw = &bytes[t.offset as usize..(t.offset + t.nbytes()) as usize];
            let v: Vec<f32> = match t.dtype {
                DType::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
                DType::BF16 => raw
                    .chunks_exact(2)
                    .map(|c| half::bf16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f32())
                    .collect(),
                DType::F16 => raw
                    .chunks_exact(2)
                    .map(|c| half::f16::from_bits(u16::from_le_bytes(c.try_into().unwrap())).to_f32())
                    .collect(),
                DType::U32 => unreachable!(),
            };
            (t.name.clone(), t.shape.clone(), v)
        })
        .collect()
}

/// Writes tensors in `dtype` into `path`.
pub fn write_tensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)], dtype: DType) {
    let spec: Vec<(String, DType, Vec<usize>)> =
        tensors.iter().map(|(n, s, _)| (n.clone(), dtype, s.clone())).collect();
    weir_graphs::safetensors::write_file(path, &spec, |i, w| {
        let v = &tensors[i].2;
        let bytes: Vec<u8> = match dtype {
            DType::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            DType::BF16 => v.iter().flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes()).collect(),
            DType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect(),
            DType::U32 => unreachable!(),
        };
        w.write_all(&bytes)
    })
    .unwrap();
}

/// Edits a JSON file in place.
pub fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// Largest |a - b| and whether every element is within atol + rtol·|golden|.
pub fn compare(got: &[f32], golden: &[f32], atol: f32, rtol: f32) -> (f32, bool) {
    assert_eq!(got.len(), golden.len(), "logit vector lengths differ");
    let mut worst = 0f32;
    let mut ok = true;
    for (g, w) in got.iter().zip(golden) {
        let d = (g - w).abs();
        worst = worst.max(d);
        if d > atol + rtol * w.abs() {
            ok = false;
        }
    }
    (worst, ok)
}

pub const ATOL: f32 = 2e-4;
pub const RTOL: f32 = 1e-4;

/// Greedy tokens for every prompt, all submitted before any is waited for (so the scheduler
/// runs them in shared passes).
pub fn generate_together(engine: &Engine, prompts: &[Vec<u32>], new_tokens: usize) -> Vec<Vec<u32>> {
    let gens: Vec<_> = prompts
        .iter()
        .map(|p| engine.submit(Request { stop_at_eos: false, ..Request::greedy(p.clone(), new_tokens) }).unwrap())
        .collect();
    gens.into_iter().map(|g| g.wait().unwrap().tokens).collect()
}

pub fn engine(dir: &Path, opts: EngineOptions) -> (Model, Engine) {
    let model = Model::open(dir).unwrap();
    let engine = Engine::new(&model, opts).unwrap();
    (model, engine)
}

/// Checks every prompt of `prompts` (a golden `prompts` list) against `dir`'s model: the
/// tokenizer's ids, last-position logits, all-position logits where recorded, and all 24 greedy
/// tokens with their step logits.
pub fn check_prompts(dir: &Path, prompts: &Value, threads: usize) {
    check_prompts_with(dir, prompts, EngineOptions { threads, ..Default::default() });
}

pub fn check_prompts_with(dir: &Path, prompts: &Value, opts: EngineOptions) {
    let (model, engine) = engine(dir, opts);
    for p in prompts.as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let want_ids = ids(&p["input_ids"]);
        assert_eq!(model.encode(p["text"].as_str().unwrap()).unwrap(), want_ids, "{name}: tokenizer ids");
        let want_new = ids(&p["greedy"]["new_ids"]);
        let mode = if p.get("all_logits").is_some() { LogitsMode::AllPositions } else { LogitsMode::Steps };
        let out = engine
            .generate(Request { logits: mode, stop_at_eos: false, ..Request::greedy(want_ids.clone(), want_new.len()) })
            .unwrap();
        assert_eq!(out.tokens, want_new, "{name}: greedy tokens");
        let (worst, ok) = compare(&out.step_logits[0], &floats(&p["last_logits"]), ATOL, RTOL);
        assert!(ok, "{name}: last-position logits off by up to {worst}");
        if let Some(all) = p.get("all_logits") {
            let rows = all.as_array().unwrap();
            assert_eq!(out.prompt_logits.len(), rows.len(), "{name}: rows of all-position logits");
            for (i, (got, want)) in out.prompt_logits.iter().zip(rows).enumerate() {
                let (worst, ok) = compare(got, &floats(want), ATOL, RTOL);
                assert!(ok, "{name}: logits at position {i} off by up to {worst}");
            }
        }
        for (s, step) in p["greedy"]["steps"].as_array().unwrap().iter().enumerate() {
            let top_ids = ids(&step["top_ids"]);
            let top = floats(&step["top_logits"]);
            let got: Vec<f32> = top_ids.iter().map(|&i| out.step_logits[s][i as usize]).collect();
            let (worst, ok) = compare(&got, &top, ATOL, RTOL);
            assert!(ok, "{name}: step {s} top-5 logits off by up to {worst}");
        }
        assert_eq!(
            model.decode(&out.tokens).unwrap(),
            p["greedy"]["new_text"].as_str().unwrap(),
            "{name}: decoded text"
        );
    }
    engine.shutdown().unwrap();
}

/// The golden `batch` case: its prompts generated together in one batch, each sequence's 24
/// tokens exact.
pub fn check_batch(dir: &Path, opts: EngineOptions) {
    let g = golden("tiny-llama");
    let (_, engine) = engine(dir, opts);
    let by_name = |n: &str| g["prompts"].as_array().unwrap().iter().find(|p| p["name"] == n).unwrap().clone();
    let names: Vec<String> =
        g["batch"]["prompts"].as_array().unwrap().iter().map(|n| n.as_str().unwrap().to_string()).collect();
    let prompts: Vec<Vec<u32>> = names.iter().map(|n| ids(&by_name(n)["input_ids"])).collect();
    for (i, got) in generate_together(&engine, &prompts, 24).into_iter().enumerate() {
        assert_eq!(got, ids(&g["batch"]["new_ids"][i]), "sequence {} ({})", i, names[i]);
    }
    engine.shutdown().unwrap();
}
