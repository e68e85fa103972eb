//! `config.json` and `generation_config.json` of a Hugging Face model folder.
//!
//! Both spellings are read: transformers 4 (`rope_theta`, `rope_scaling`, `torch_dtype` at the
//! top level) and transformers 5 (`rope_parameters` with `rope_theta` and `rope_type` inside,
//! `dtype`). Where both are present, `rope_parameters` wins.

use crate::error::{Error, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use weir_operators::RopeScaling;

/// The architectures weir runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
    Mixtral,
    Qwen2Moe,
}

impl Architecture {
    /// The Hugging Face class names weir accepts.
    pub const SUPPORTED: &'static [&'static str] =
        &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM"];

    fn from_class(s: &str) -> Option<Architecture> {
        match s {
            "LlamaForCausalLM" => Some(Architecture::Llama),
            "MistralForCausalLM" => Some(Architecture::Mistral),
            "Qwen2ForCausalLM" => Some(Architecture::Qwen2),
            "MixtralForCausalLM" => Some(Architecture::Mixtral),
            "Qwen2MoeForCausalLM" => Some(Architecture::Qwen2Moe),
            _ => None,
        }
    }
    /// The Hugging Face class name.
    pub fn class(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Mixtral => "MixtralForCausalLM",
            Architecture::Qwen2Moe => "Qwen2MoeForCausalLM",
        }
    }
}

/// The mixture-of-experts settings of Mixtral and Qwen2-MoE.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Routed experts per MoE layer (`num_local_experts`, `num_experts`).
    pub experts: usize,
    /// Experts per token (`num_experts_per_tok`).
    pub top_k: usize,
    /// Each routed expert's MLP size (Mixtral: `intermediate_size`; Qwen2-MoE:
    /// `moe_intermediate_size`).
    pub intermediate: usize,
    /// Whether the chosen experts' probabilities are rescaled to sum to 1 (Mixtral always;
    /// Qwen2-MoE: `norm_topk_prob`, default false).
    pub normalize: bool,
    /// The shared expert's MLP size (Qwen2-MoE's `shared_expert_intermediate_size`), if any.
    pub shared_intermediate: Option<usize>,
    /// Per layer: whether it is a MoE layer (Qwen2-MoE: `decoder_sparse_step`,
    /// `mlp_only_layers`), the others having a dense MLP of `intermediate_size`.
    pub sparse: Vec<bool>,
}

/// A model's shape and settings, from `config.json`.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    /// q/k/v projections have a bias (Qwen2, or `attention_bias: true`).
    pub qkv_bias: bool,
    /// o_proj has a bias (`attention_bias: true` on Llama/Mistral).
    pub o_bias: bool,
    /// Per layer: the sliding attention window, if the layer uses one.
    pub sliding_window: Vec<Option<usize>>,
    /// The dtype the weights were saved in, if the config says.
    pub dtype: Option<String>,
    /// Mixture-of-experts settings (Mixtral, Qwen2-MoE).
    pub moe: Option<MoeConfig>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `generation_config.json`'s sampling settings, for requests that give none.
    pub sampling: SamplingDefaults,
}

/// How `generation_config.json` says to sample: `do_sample`, `temperature`, `top_p`, `top_k`
/// (each `None` where it is not given).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingDefaults {
    pub do_sample: Option<bool>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
}

struct Reader<'a> {
    path: &'a Path,
    v: &'a Value,
}

impl Reader<'_> {
    fn err(&self, key: &str, problem: impl Into<String>) -> Error {
        Error::Config { path: self.path.to_path_buf(), key: key.to_string(), problem: problem.into() }
    }
    fn get(&self, key: &str) -> Option<&Value> {
        self.v.get(key).filter(|v| !v.is_null())
    }
    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key).ok_or_else(|| self.err(key, "missing"))?;
        self.as_usize(key, v)
    }
    fn as_usize(&self, key: &str, v: &Value) -> Result<usize> {
        v.as_u64()
            .map(|n| n as usize)
            .ok_or_else(|| self.err(key, format!("expected a non-negative integer, found {v}")))
    }
    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key).map(|v| self.as_usize(key, v)).transpose()
    }
    fn f32_or(&self, v: Option<&Value>, key: &str, default: f32) -> Result<f32> {
        match v.filter(|v| !v.is_null()) {
            None => Ok(default),
            Some(x) => {
                x.as_f64().map(|f| f as f32).ok_or_else(|| self.err(key, format!("expected a number, found {x}")))
            }
        }
    }
    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| self.err(key, format!("expected true or false, found {x}"))),
        }
    }
    fn ids(&self, key: &str) -> Result<Vec<u32>> {
        match self.get(key) {
            None => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_u64().map(|n| n as u32).ok_or_else(|| self.err(key, format!("expected token ids, found {x}")))
                })
                .collect(),
            Some(x) => x
                .as_u64()
                .map(|n| vec![n as u32])
                .ok_or_else(|| self.err(key, format!("expected a token id or a list of them, found {x}"))),
        }
    }

    /// `do_sample`, `temperature`, `top_p`, `top_k` of a generation config.
    fn sampling(&self) -> Result<SamplingDefaults> {
        let num = |k: &str| match self.get(k).filter(|v| !v.is_null()) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .map(|x| Some(x as f32))
                .ok_or_else(|| self.err(k, format!("expected a number ≥ 0, found {v}"))),
        };
        let do_sample = match self.get("do_sample") {
            None => None,
            Some(v) => {
                Some(v.as_bool().ok_or_else(|| self.err("do_sample", format!("expected true or false, found {v}")))?)
            }
        };
        let top_k = self.opt_usize("top_k")?;
        Ok(SamplingDefaults { do_sample, temperature: num("temperature")?, top_p: num("top_p")?, top_k })
    }

    /// `architectures`: the first class weir knows.
    fn architecture(&self) -> Result<Architecture> {
        let r = self;
        let classes: Vec<String> = match r.get("architectures") {
            Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(String::from)).collect(),
            Some(x) => return Err(r.err("architectures", format!("expected a list of class names, found {x}"))),
            None => return Err(r.err("architectures", "missing (which model class is this?)")),
        };
        classes.iter().find_map(|c| Architecture::from_class(c)).ok_or_else(|| Error::UnsupportedArchitecture {
            path: self.path.to_path_buf(),
            arch: classes.join(", "),
            supported: Architecture::SUPPORTED.join(", "),
        })
    }

    /// RoPE's theta and scaling: transformers 5 nests them in `rope_parameters`; transformers 4
    /// spells them at the top (`rope_theta`, `rope_scaling`).
    fn rope(&self) -> Result<(f32, RopeScaling)> {
        let r = self;
        let rp = r.get("rope_parameters").filter(|p| p.is_object());
        let theta_v = rp.and_then(|p| p.get("rope_theta")).or_else(|| r.get("rope_theta"));
        let rope_theta = r.f32_or(theta_v, "rope_theta", 10000.0)?;
        let scaling_obj = match rp {
            Some(p) => Some(p),
            None => r.get("rope_scaling"),
        };
        let rope_scaling = match scaling_obj {
            None => RopeScaling::Default,
            Some(s) => {
                let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
                let key = if rp.is_some() { "rope_parameters" } else { "rope_scaling" };
                let num = |k: &str, d: Option<f32>| -> Result<f32> {
                    match (s.get(k).filter(|x| !x.is_null()), d) {
                        (None, Some(d)) => Ok(d),
                        (None, None) => Err(r.err(&format!("{key}.{k}"), "missing")),
                        (Some(x), _) => x
                            .as_f64()
                            .map(|f| f as f32)
                            .ok_or_else(|| r.err(&format!("{key}.{k}"), format!("expected a number, found {x}"))),
                    }
                };
                match kind {
                    "default" => RopeScaling::Default,
                    "linear" => RopeScaling::Linear { factor: num("factor", None)? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: num("factor", None)?,
                        low_freq_factor: num("low_freq_factor", None)?,
                        high_freq_factor: num("high_freq_factor", None)?,
                        original_max_position_embeddings: num("original_max_position_embeddings", None)?,
                    },
                    other => {
                        return Err(r.err(
                            &format!("{key}.rope_type"),
                            format!("`{other}` is not supported (supported: default, linear, llama3)"),
                        ))
                    }
                }
            }
        };
        Ok((rope_theta, rope_scaling))
    }

    /// Each layer's sliding window. Mistral applies `sliding_window` to every layer; Qwen2 only
    /// with `use_sliding_window`, from layer `max_window_layers` on; `layer_types`
    /// (transformers 5) says it per layer.
    fn sliding_windows(&self, architecture: Architecture, num_hidden_layers: usize) -> Result<Vec<Option<usize>>> {
        let r = self;
        let window = r.opt_usize("sliding_window")?;
        Ok(match (r.get("layer_types"), architecture) {
            (Some(Value::Array(types)), _) if window.is_some() => {
                if types.len() != num_hidden_layers {
                    return Err(
                        r.err("layer_types", format!("has {} entries for {num_hidden_layers} layers", types.len()))
                    );
                }
                types.iter().map(|t| if t.as_str() == Some("sliding_attention") { window } else { None }).collect()
            }
            (_, Architecture::Qwen2 | Architecture::Qwen2Moe) => {
                let use_sw = r.bool_or("use_sliding_window", false)?;
                let from = r.opt_usize("max_window_layers")?.unwrap_or(num_hidden_layers);
                (0..num_hidden_layers).map(|l| if use_sw && l >= from { window } else { None }).collect()
            }
            _ => vec![window; num_hidden_layers],
        })
    }

    /// The mixture-of-experts settings of Mixtral and Qwen2-MoE, checked.
    fn moe(&self, architecture: Architecture, num_hidden_layers: usize) -> Result<Option<MoeConfig>> {
        let r = self;
        let moe = match architecture {
            Architecture::Mixtral => Some(MoeConfig {
                experts: r.usize("num_local_experts")?,
                top_k: r.usize("num_experts_per_tok")?,
                intermediate: r.usize("intermediate_size")?,
                normalize: true,
                shared_intermediate: None,
                sparse: vec![true; num_hidden_layers],
            }),
            Architecture::Qwen2Moe => {
                let step = r.opt_usize("decoder_sparse_step")?.unwrap_or(1);
                if step == 0 {
                    return Err(r.err("decoder_sparse_step", "must be positive"));
                }
                let dense: Vec<usize> = match r.get("mlp_only_layers") {
                    None => vec![],
                    Some(Value::Array(a)) => {
                        a.iter().map(|v| r.as_usize("mlp_only_layers", v)).collect::<Result<_>>()?
                    }
                    Some(x) => return Err(r.err("mlp_only_layers", format!("expected a list of layers, found {x}"))),
                };
                let experts = r.usize("num_experts")?;
                Some(MoeConfig {
                    experts,
                    top_k: r.usize("num_experts_per_tok")?,
                    intermediate: r.usize("moe_intermediate_size")?,
                    normalize: r.bool_or("norm_topk_prob", false)?,
                    shared_intermediate: r.opt_usize("shared_expert_intermediate_size")?.filter(|&s| s > 0),
                    sparse: (0..num_hidden_layers)
                        .map(|l| experts > 0 && !dense.contains(&l) && (l + 1) % step == 0)
                        .collect(),
                })
            }
            _ => None,
        };
        if let Some(m) = &moe {
            if m.experts == 0 || m.top_k == 0 || m.top_k > m.experts {
                return Err(r.err(
                    "num_experts_per_tok",
                    format!("{} experts per token out of {} experts", m.top_k, m.experts),
                ));
            }
            if m.intermediate == 0 {
                let key =
                    if architecture == Architecture::Mixtral { "intermediate_size" } else { "moe_intermediate_size" };
                return Err(r.err(key, "must be positive"));
            }
        }
        Ok(moe)
    }
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|error| Error::Io { path: path.to_path_buf(), error })?;
    serde_json::from_str(&text).map_err(|error| Error::Json { path: path.to_path_buf(), error })
}

impl ModelConfig {
    /// Reads `dir/config.json` and, if present, `dir/generation_config.json`.
    pub fn from_dir(dir: &Path) -> Result<ModelConfig> {
        let path = dir.join("config.json");
        let v = read_json(&path)?;
        let mut c = ModelConfig::from_value(&path, &v)?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let g = read_json(&gen_path)?;
            let r = Reader { path: &gen_path, v: &g };
            let eos = r.ids("eos_token_id")?;
            if !eos.is_empty() {
                c.eos_token_ids = eos;
            }
            if let Some(b) = r.ids("bos_token_id")?.first() {
                c.bos_token_id = Some(*b);
            }
            c.sampling = r.sampling()?;
        }
        Ok(c)
    }

    /// Parses a config; `path` is used in error messages.
    pub fn from_value(path: &Path, v: &Value) -> Result<ModelConfig> {
        let r = Reader { path, v };
        let architecture = r.architecture()?;
        if let Some(act) = r.get("hidden_act").and_then(|a| a.as_str()) {
            if act != "silu" {
                return Err(r.err("hidden_act", format!("`{act}` is not supported (only silu)")));
            }
        }
        let hidden_size = r.usize("hidden_size")?;
        let num_attention_heads = r.usize("num_attention_heads")?;
        let num_key_value_heads = r.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(r.err(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = match r.opt_usize("head_dim")? {
            Some(d) => d,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => return Err(r.err("head_dim", format!("missing, and hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"))),
        };
        if head_dim % 2 != 0 || head_dim > 512 {
            return Err(r.err("head_dim", format!("{head_dim} must be even and at most 512")));
        }
        let num_hidden_layers = r.usize("num_hidden_layers")?;

        let (rope_theta, rope_scaling) = r.rope()?;

        let attention_bias = r.bool_or("attention_bias", false)?;
        let qwen = matches!(architecture, Architecture::Qwen2 | Architecture::Qwen2Moe);
        let qkv_bias = qwen || attention_bias;
        let o_bias = !qwen && attention_bias;

        let sliding_window = r.sliding_windows(architecture, num_hidden_layers)?;

        let moe = r.moe(architecture, num_hidden_layers)?;
        let dtype = r.get("dtype").or_else(|| r.get("torch_dtype")).and_then(|d| d.as_str()).map(String::from);
        let bos_token_id = r.ids("bos_token_id")?.first().copied();
        let eos_token_ids = r.ids("eos_token_id")?;
        let c = ModelConfig {
            architecture,
            hidden_size,
            intermediate_size: r.usize("intermediate_size")?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: r.usize("vocab_size")?,
            max_position_embeddings: r.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            rms_norm_eps: r.f32_or(r.get("rms_norm_eps"), "rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: r.bool_or("tie_word_embeddings", false)?,
            qkv_bias,
            o_bias,
            sliding_window,
            dtype,
            moe,
            bos_token_id,
            eos_token_ids,
            sampling: SamplingDefaults::default(),
        };
        for (k, v) in [
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("vocab_size", c.vocab_size),
            ("num_hidden_layers", c.num_hidden_layers),
        ] {
            if v == 0 {
                return Err(r.err(k, "must be positive"));
            }
        }
        Ok(c)
    }

    /// Weights read per token at batch 1: every matrix once (of a MoE layer: the router, `top_k`
    /// experts and the shared expert).
    pub fn parameter_count(&self) -> usize {
        let (h, m, q, kv) = (
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads * self.head_dim,
            self.num_key_value_heads * self.head_dim,
        );
        let attn = h * q + 2 * h * kv + q * h + 2 * h;
        let mlp: usize = (0..self.num_hidden_layers)
            .map(|l| match &self.moe {
                // Active per token: the router, top_k experts and the shared expert with its gate.
                Some(e) if e.sparse[l] => {
                    e.experts * h
                        + e.top_k * 3 * h * e.intermediate
                        + e.shared_intermediate.map_or(0, |s| 3 * h * s + h)
                }
                _ => 3 * h * m,
            })
            .sum();
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.num_hidden_layers * attn + mlp + self.vocab_size * h + head + h
    }
}

/// The path of a model folder's file, for messages.
pub fn file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<ModelConfig> {
        ModelConfig::from_value(Path::new("config.json"), &v)
    }

    fn base() -> Value {
        json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384, "rms_norm_eps": 1e-5})
    }

    #[test]
    fn both_rope_spellings_and_llama3_scaling_are_read() {
        let mut v = base();
        v["rope_theta"] = json!(500000.0);
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = parse(v).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(c.head_dim, 16);
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 1000.0, "rope_type": "default"});
        v["head_dim"] = json!(32);
        let c = parse(v).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.clone(), c.head_dim), (1000.0, RopeScaling::Default, 32));
    }

    #[test]
    fn qwen2_has_qkv_bias_and_eos_lists_are_read() {
        let mut v = base();
        v["architectures"] = json!(["Qwen2ForCausalLM"]);
        v["eos_token_id"] = json!([2, 7]);
        v["tie_word_embeddings"] = json!(true);
        let c = parse(v).unwrap();
        assert!(c.qkv_bias && !c.o_bias && c.tie_word_embeddings);
        assert_eq!(c.eos_token_ids, vec![2, 7]);
    }

    #[test]
    fn bad_configs_name_the_key() {
        let mut v = base();
        v["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("unsupported architecture `GPT2LMHeadModel`") && e.contains("LlamaForCausalLM"), "{e}");
        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        assert!(parse(v).unwrap_err().to_string().contains("hidden_size: missing"));
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(parse(v).unwrap_err().to_string().contains("num_key_value_heads"));
        let mut v = base();
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        assert!(parse(v).unwrap_err().to_string().contains("`yarn` is not supported"));
    }

    #[test]
    fn moe_configs_are_read_and_bad_ones_name_the_key() {
        let qwen = || {
            let mut v = base();
            v["architectures"] = json!(["Qwen2MoeForCausalLM"]);
            v["num_experts"] = json!(8);
            v["num_experts_per_tok"] = json!(2);
            v["moe_intermediate_size"] = json!(32);
            v
        };
        let mut v = qwen();
        v["num_hidden_layers"] = json!(4);
        v["decoder_sparse_step"] = json!(2);
        v["mlp_only_layers"] = json!([3]);
        v["shared_expert_intermediate_size"] = json!(64);
        let m = parse(v).unwrap().moe.unwrap();
        assert_eq!(m.sparse, vec![false, true, false, false]);
        assert_eq!(
            (m.experts, m.top_k, m.intermediate, m.normalize, m.shared_intermediate),
            (8, 2, 32, false, Some(64))
        );
        let bad = |edit: &dyn Fn(&mut Value), key: &str| {
            let mut v = qwen();
            edit(&mut v);
            let e = parse(v).unwrap_err().to_string();
            assert!(e.contains(key), "{key}: {e}");
        };
        bad(&|v| v["num_experts_per_tok"] = json!(9), "num_experts_per_tok");
        bad(&|v| v["decoder_sparse_step"] = json!(0), "decoder_sparse_step");
        bad(&|v| v["mlp_only_layers"] = json!("all"), "mlp_only_layers");
        bad(&|v| v["mlp_only_layers"] = json!([-1]), "mlp_only_layers");
        bad(&|v| v["moe_intermediate_size"] = json!(0), "moe_intermediate_size");
        bad(&|v| drop(v.as_object_mut().unwrap().remove("num_experts")), "num_experts");
        let mut v = base();
        v["architectures"] = json!(["MixtralForCausalLM"]);
        v["num_experts_per_tok"] = json!(2);
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("num_local_experts: missing"), "{e}");
    }
}
