//! Golden tests against Hugging Face transformers' outputs for the fixtures in
//! `../shared/fixtures` (tolerances from their README: atol 2e-4, rtol 1e-4, tokens exact).

mod common;
use common::*;
use serde_json::Value;
use weir::{DType, EngineOptions, LogitsMode, Request};

#[test]
fn tiny_llama_f32_matches_transformers() {
    check_prompts(&fixture("tiny-llama"), &golden("tiny-llama")["prompts"], 1);
}

#[test]
fn tiny_llama_f32_matches_transformers_on_two_threads() {
    check_prompts(&fixture("tiny-llama"), &golden("tiny-llama")["prompts"], 2);
}

#[test]
fn prompts_prefilled_in_chunks_match_transformers() {
    // Passes of at most 5 tokens: the 6-token prompt's all-position logits come from two
    // chunks, the 126-token prompt is prefilled in 26.
    let opts = EngineOptions { threads: 1, max_pass_tokens: 5, ..Default::default() };
    check_prompts_with(&fixture("tiny-llama"), &golden("tiny-llama")["prompts"], opts);
}

#[test]
fn tiny_llama_bf16_computed_in_f32_matches_the_f32_upcast() {
    check_prompts(&fixture("tiny-llama-bf16"), &golden("tiny-llama-bf16")["f32_upcast"]["prompts"], 0);
}

#[test]
fn three_prompts_in_one_batch_each_get_their_own_tokens() {
    check_batch(&fixture("tiny-llama"), EngineOptions::default());
}

#[test]
fn a_sequence_joining_a_running_batch_gets_its_own_tokens() {
    let g = golden("tiny-llama");
    let (_, engine) = engine(&fixture("tiny-llama"), EngineOptions::default());
    let long = &g["prompts"][2];
    let short = &g["prompts"][0];
    let mut first =
        engine.submit(Request { stop_at_eos: false, ..Request::greedy(ids(&long["input_ids"]), 24) }).unwrap();
    // Wait for a few of the long prompt's tokens, then add the short one mid-decode.
    let mut got_long = Vec::new();
    while got_long.len() < 3 {
        if let Some(weir::Event::Token { id, .. }) = first.next_event() {
            got_long.push(id);
        }
    }
    let second =
        engine.submit(Request { stop_at_eos: false, ..Request::greedy(ids(&short["input_ids"]), 24) }).unwrap();
    got_long.extend(first.wait().unwrap().tokens);
    assert_eq!(got_long, ids(&long["greedy"]["new_ids"]));
    assert_eq!(second.wait().unwrap().tokens, ids(&short["greedy"]["new_ids"]));
    engine.shutdown().unwrap();
}

#[test]
fn sharded_weights_give_the_same_tokens() {
    let dir = copy_fixture_meta("tiny-llama", "sharded");
    let tensors = fixture_tensors("tiny-llama");
    let (a, b) = tensors.split_at(tensors.len() / 2);
    write_tensors(&dir.join("model-00001-of-00002.safetensors"), a, DType::F32);
    write_tensors(&dir.join("model-00002-of-00002.safetensors"), b, DType::F32);
    let map: serde_json::Map<String, Value> = a
        .iter()
        .map(|t| (t.0.clone(), Value::from("model-00001-of-00002.safetensors")))
        .chain(b.iter().map(|t| (t.0.clone(), Value::from("model-00002-of-00002.safetensors"))))
        .collect();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    check_prompts(&dir, &golden("tiny-llama")["prompts"], 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn mistral_spelling_of_the_same_model_gives_the_same_tokens() {
    let dir = copy_fixture("tiny-llama", "mistral");
    edit_json(&dir.join("config.json"), |c| {
        c["architectures"] = serde_json::json!(["MistralForCausalLM"]);
        c["model_type"] = "mistral".into();
        c["sliding_window"] = Value::Null;
    });
    check_prompts(&dir, &golden("tiny-llama")["prompts"], 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn qwen2_with_zero_qkv_bias_gives_the_same_tokens_and_a_bias_changes_them() {
    let dir = copy_fixture_meta("tiny-llama", "qwen2");
    edit_json(&dir.join("config.json"), |c| {
        c["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
        c["model_type"] = "qwen2".into();
    });
    let mut tensors = fixture_tensors("tiny-llama");
    for l in 0..2 {
        for (p, n) in [("q", 64), ("k", 32), ("v", 32)] {
            tensors.push((format!("model.layers.{l}.self_attn.{p}_proj.bias"), vec![n], vec![0.0; n]));
        }
    }
    write_tensors(&dir.join("model.safetensors"), &tensors, DType::F32);
    check_prompts(&dir, &golden("tiny-llama")["prompts"], 0);
    // A large v bias must change the result: the bias is really applied.
    for t in tensors.iter_mut().filter(|t| t.0.ends_with("v_proj.bias")) {
        t.2.iter_mut().for_each(|x| *x = 3.0);
    }
    write_tensors(&dir.join("model.safetensors"), &tensors, DType::F32);
    let (_, engine) = engine(&dir, EngineOptions::default());
    let p = &golden("tiny-llama")["prompts"][1];
    let out = engine.generate(Request { stop_at_eos: false, ..Request::greedy(ids(&p["input_ids"]), 24) }).unwrap();
    assert_ne!(out.tokens, ids(&p["greedy"]["new_ids"]));
    engine.shutdown().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn f16_weights_load_and_stay_close_to_f32() {
    let dir = copy_fixture_meta("tiny-llama", "f16");
    write_tensors(&dir.join("model.safetensors"), &fixture_tensors("tiny-llama"), DType::F16);
    let (_, engine) = engine(&dir, EngineOptions::default());
    let p = &golden("tiny-llama")["prompts"][0];
    let out =
        engine.generate(Request { logits: LogitsMode::Steps, ..Request::greedy(ids(&p["input_ids"]), 1) }).unwrap();
    // f16 keeps 11 significant bits of weights ~0.2: logits of size ~7 move by a few 1e-3.
    let (worst, ok) = compare(&out.step_logits[0], &floats(&p["last_logits"]), 0.05, 0.0);
    assert!(ok && worst > 0.0, "f16 logits off by {worst}");
    engine.shutdown().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_bf16_or_f16_kv_cache_stays_close_to_transformers() {
    // Keys and values rounded to 8 (bf16) or 11 (f16) significant bits as they are stored; the
    // arithmetic stays f32. Every prompt's step logits stay within a bound the rounding
    // explains, and the greedy tokens are the golden ones.
    let g = golden("tiny-llama");
    for (kv, tol) in [(weir::KvType::Bf16, 0.08), (weir::KvType::F16, 0.02)] {
        let (_, engine) = engine(&fixture("tiny-llama"), EngineOptions { kv_dtype: kv, ..Default::default() });
        let mut worst_all = 0f32;
        for p in g["prompts"].as_array().unwrap() {
            let name = p["name"].as_str().unwrap();
            let want_new = ids(&p["greedy"]["new_ids"]);
            let out = engine
                .generate(Request {
                    logits: LogitsMode::Steps,
                    stop_at_eos: false,
                    ..Request::greedy(ids(&p["input_ids"]), want_new.len())
                })
                .unwrap();
            assert_eq!(out.tokens, want_new, "{name}, {} KV cache: greedy tokens", kv.name());
            let (worst, ok) = compare(&out.step_logits[0], &floats(&p["last_logits"]), tol, 0.0);
            assert!(ok, "{name}, {} KV cache: last logits off by {worst}", kv.name());
            for (s, step) in p["greedy"]["steps"].as_array().unwrap().iter().enumerate() {
                let got: Vec<f32> = ids(&step["top_ids"]).iter().map(|&i| out.step_logits[s][i as usize]).collect();
                let (w, ok) = compare(&got, &floats(&step["top_logits"]), tol, 0.0);
                assert!(ok, "{name}, {} KV cache: step {s} logits off by {w}", kv.name());
                worst_all = worst_all.max(w);
            }
            worst_all = worst_all.max(worst);
        }
        eprintln!("{} KV cache: logits within {worst_all} of transformers", kv.name());
        assert!(worst_all > 0.0, "the {} cache rounds: the logits cannot be exactly f32's", kv.name());
        engine.shutdown().unwrap();
    }
}

#[test]
fn tiny_llama_bf16_held_as_f16_matches_the_f32_upcast() {
    // f16 holds every bf16 weight of this model exactly but those under 2^-14, which move by at
    // most 2^-25: the f32 tolerances and exact tokens still hold.
    let opts = EngineOptions { threads: 2, bf16_as_f16: true, ..Default::default() };
    check_prompts_with(&fixture("tiny-llama-bf16"), &golden("tiny-llama-bf16")["f32_upcast"]["prompts"], opts);
}
