//! A model generator for benchmarks and demos: writes a Hugging Face folder (config,
//! generation config, safetensors, byte-level BPE tokenizer) with random weights for a named
//! shape, deterministic from a seed.

use crate::error::{Error, Result};
use serde_json::json;
use std::path::Path;
use weir_graphs::config::ModelConfig;
use weir_graphs::llama::expected_tensors;
use weir_runtime::DType;

/// A model shape.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub name: &'static str,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
    pub rope_theta: f32,
    /// Llama 3's RoPE scaling (factor 8, original context 8192).
    pub llama3_rope: bool,
    /// Mixtral-style mixture of experts in every layer: routed experts of `intermediate`
    /// each, `top_k` per token (0 experts: a dense Llama).
    pub experts: usize,
    pub top_k: usize,
}

/// The named shapes.
pub const SHAPES: &[Shape] = &[
    Shape {
        name: "tiny",
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        intermediate: 160,
        vocab: 384,
        max_positions: 256,
        rope_theta: 10000.0,
        llama3_rope: false,
        experts: 0,
        top_k: 0,
    },
    Shape {
        name: "small",
        hidden: 512,
        layers: 8,
        heads: 8,
        kv_heads: 4,
        intermediate: 1408,
        vocab: 4096,
        max_positions: 2048,
        rope_theta: 10000.0,
        llama3_rope: false,
        experts: 0,
        top_k: 0,
    },
    Shape {
        name: "tinyllama-1.1b",
        hidden: 2048,
        layers: 22,
        heads: 32,
        kv_heads: 4,
        intermediate: 5632,
        vocab: 32000,
        max_positions: 2048,
        rope_theta: 10000.0,
        llama3_rope: false,
        experts: 0,
        top_k: 0,
    },
    Shape {
        name: "llama3-8b",
        hidden: 4096,
        layers: 32,
        heads: 32,
        kv_heads: 8,
        intermediate: 14336,
        vocab: 128256,
        max_positions: 8192,
        rope_theta: 500000.0,
        llama3_rope: true,
        experts: 0,
        top_k: 0,
    },
    Shape {
        name: "tiny-moe",
        hidden: 64,
        layers: 3,
        heads: 4,
        kv_heads: 2,
        intermediate: 96,
        vocab: 384,
        max_positions: 256,
        rope_theta: 1e6,
        llama3_rope: false,
        experts: 8,
        top_k: 2,
    },
    // Mixtral 8x7B's layer (hidden 4096, 8 experts of 14336, top 2) with 4 layers instead of
    // 32 and a 32000 vocabulary: 12.1 GB in bf16, 11.3 GB of it experts.
    Shape {
        name: "mixtral-4l",
        hidden: 4096,
        layers: 4,
        heads: 32,
        kv_heads: 8,
        intermediate: 14336,
        vocab: 32000,
        max_positions: 4096,
        rope_theta: 1e6,
        llama3_rope: false,
        experts: 8,
        top_k: 2,
    },
];

/// Looks a shape up by name.
pub fn shape(name: &str) -> Result<Shape> {
    SHAPES.iter().copied().find(|s| s.name == name).ok_or_else(|| {
        Error::Request(format!(
            "unknown shape `{name}` (known: {})",
            SHAPES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
        ))
    })
}

/// Parses `f32`, `bf16` or `f16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        _ => Err(Error::Request(format!("unknown dtype `{s}` (known: f32, bf16, f16)"))),
    }
}

fn hf_dtype(d: DType) -> &'static str {
    match d {
        DType::F32 => "float32",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::U32 => "uint32",
    }
}

/// The `config.json` of a shape, with both transformers spellings of the RoPE settings.
pub fn config_json(shape: &Shape, dtype: DType, seed: u64) -> serde_json::Value {
    let head_dim = shape.hidden / shape.heads;
    let rope_scaling = if shape.llama3_rope {
        json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    } else {
        serde_json::Value::Null
    };
    let mut rope_parameters = json!({"rope_theta": shape.rope_theta, "rope_type": "default"});
    if shape.llama3_rope {
        rope_parameters = rope_scaling.clone();
        rope_parameters["rope_theta"] = json!(shape.rope_theta);
    }
    let mut config = json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.intermediate, "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads, "num_key_value_heads": shape.kv_heads, "head_dim": head_dim,
        "vocab_size": shape.vocab, "max_position_embeddings": shape.max_positions, "rms_norm_eps": 1e-5,
        "rope_theta": shape.rope_theta, "rope_scaling": rope_scaling, "rope_parameters": rope_parameters,
        "hidden_act": "silu", "attention_bias": false, "mlp_bias": false, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": hf_dtype(dtype), "dtype": hf_dtype(dtype),
        "weir_synth": {"shape": shape.name, "seed": seed},
    });
    if shape.experts > 0 {
        config["architectures"] = json!(["MixtralForCausalLM"]);
        config["model_type"] = json!("mixtral");
        config["num_local_experts"] = json!(shape.experts);
        config["num_experts_per_tok"] = json!(shape.top_k);
        config["sliding_window"] = serde_json::Value::Null;
        config["router_aux_loss_coef"] = json!(0.02);
    }
    config
}

/// Writes a model of `shape` in `dtype` into `dir` (created if needed).
pub fn write_model(dir: &Path, shape: &Shape, dtype: DType, seed: u64) -> Result<()> {
    write_model_with(dir, shape, dtype, seed, &mut |_, _| {})
}

/// The examples' default, which needs no download: a random-weight model of the `small`
/// shape (bf16, seed 0) in the temporary folder's `weir-quickstart-small`, written the first
/// time it is asked for.
pub fn demo_model() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join("weir-quickstart-small");
    if !dir.join("model.safetensors").exists() {
        eprintln!("writing a random-weight `small` model to {}", dir.display());
        write_model(&dir, &shape("small")?, DType::BF16, 0)?;
    }
    Ok(dir)
}

/// [`write_model`], telling `progress` the weight bytes written so far and their total as it
/// goes (for a progress bar).
pub fn write_model_with(
    dir: &Path,
    shape: &Shape,
    dtype: DType,
    seed: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<()> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |error| Error::Io { path, error }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let config = config_json(shape, dtype, seed);
    let cpath = dir.join("config.json");
    std::fs::write(&cpath, serde_json::to_string_pretty(&config).unwrap_or_default()).map_err(io(&cpath))?;
    let gpath = dir.join("generation_config.json");
    std::fs::write(&gpath, r#"{"bos_token_id": 1, "eos_token_id": 2}"#).map_err(io(&gpath))?;
    let tpath = dir.join("tokenizer.json");
    std::fs::write(&tpath, tokenizer_json(shape.vocab)?).map_err(io(&tpath))?;

    let cfg = ModelConfig::from_value(&cpath, &config)?;
    let tensors: Vec<(String, DType, Vec<usize>)> =
        expected_tensors(&cfg).into_iter().map(|(n, s)| (n, dtype, s)).collect();
    let wpath = dir.join("model.safetensors");
    let mut rng = weir_operators::sampler::Rng::new(seed);
    let total: u64 = tensors.iter().map(|(_, d, s)| (s.iter().product::<usize>() * d.size()) as u64).sum();
    let mut written = 0u64;
    weir_graphs::safetensors::write_file(&wpath, &tensors, |i, w| {
        let (name, dtype, shape) = &tensors[i];
        let n: usize = shape.iter().product();
        let is_norm = name.ends_with("norm.weight");
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        let mut left = n;
        while left > 0 {
            let chunk = left.min(1 << 18);
            buf.clear();
            for _ in 0..chunk {
                let v = if is_norm { 1.0 + 0.1 * normal(&mut rng) } else { 0.02 * normal(&mut rng) };
                match dtype {
                    DType::F32 => buf.extend_from_slice(&v.to_le_bytes()),
                    DType::BF16 => buf.extend_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes()),
                    _ => buf.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes()),
                }
            }
            w.write_all(&buf)?;
            left -= chunk;
            written += buf.len() as u64;
            progress(written, total);
        }
        Ok(())
    })
    .map_err(io(&wpath))?;
    Ok(())
}

/// An approximately standard normal number (Irwin–Hall of four uniforms), cheap enough to fill
/// gigabytes in seconds.
fn normal(rng: &mut weir_operators::sampler::Rng) -> f32 {
    let r = rng.next_u64();
    let s = (r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48);
    (s as f32 / 65536.0 - 2.0) * (3.0f32).sqrt()
}

/// GPT-2's map from bytes to printable characters.
fn byte_chars() -> Vec<char> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut map = vec!['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        if printable.contains(&b) {
            map[b as usize] = char::from_u32(b).unwrap_or('?');
        } else {
            map[b as usize] = char::from_u32(256 + extra).unwrap_or('?');
            extra += 1;
        }
    }
    printable.clear();
    map
}

/// A byte-level BPE tokenizer with exactly `vocab` ids: `<unk>`, `<s>`, `</s>`, the 256 bytes,
/// then merges that grow English-letter prefixes (so ordinary text takes fewer tokens than bytes).
pub fn tokenizer_json(vocab: usize) -> Result<String> {
    if vocab < 259 {
        return Err(Error::Request(format!("a byte-level tokenizer needs a vocabulary of at least 259, not {vocab}")));
    }
    let chars = byte_chars();
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    tokens.extend(chars.iter().map(|c| c.to_string()));
    let mut seen: std::collections::HashSet<String> = tokens.iter().cloned().collect();
    let letters: Vec<String> = "etaoinshrdlcumwfgypbvkjxqz".chars().map(|c| c.to_string()).collect();
    let space = chars[b' ' as usize].to_string();
    let mut prefixes: std::collections::VecDeque<String> =
        std::iter::once(space).chain(letters.iter().cloned()).collect();
    let mut merges: Vec<(String, String)> = Vec::new();
    'grow: while tokens.len() < vocab {
        let Some(p) = prefixes.pop_front() else { break };
        for l in &letters {
            if tokens.len() >= vocab {
                break 'grow;
            }
            let t = format!("{p}{l}");
            if seen.insert(t.clone()) {
                merges.push((p.clone(), l.clone()));
                tokens.push(t.clone());
                prefixes.push_back(t);
            }
        }
    }
    let vocab_map: serde_json::Map<String, serde_json::Value> =
        tokens.iter().enumerate().map(|(i, t)| (t.clone(), json!(i))).collect();
    let special = |id: usize, s: &str| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let t = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab_map, "merges": merges.iter().map(|(a, b)| json!([a, b])).collect::<Vec<_>>()},
    });
    Ok(serde_json::to_string(&t).unwrap_or_default())
}
