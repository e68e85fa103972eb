//! The Llama family's weights (and Mixtral's and Qwen2-MoE's experts): which tensors a config implies, and the check that a model
//! folder has them with the right shapes. The graph itself is `graphs/llama.weir`.

use crate::config::{Architecture, ModelConfig};

/// A SwiGLU MLP's weights as Hugging Face names them: gate, up, down.
const HF_MLP: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];
use crate::error::{Error, Result};
use crate::safetensors::WeightIndex;
use weir_operators::loader::TensorSource;

/// The weights a config implies, with their expected shapes, in layer order.
pub fn expected_tensors(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, m, q, kv) =
        (c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, h])];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), vec![h]));
        t.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        t.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        t.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        if c.qkv_bias {
            t.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
            t.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
            t.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
        }
        t.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if c.o_bias {
            t.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        let mlp = |t: &mut Vec<(String, Vec<usize>)>, at: &str, names: [&str; 3], m: usize| {
            t.push((format!("{at}.{}.weight", names[0]), vec![m, h]));
            t.push((format!("{at}.{}.weight", names[1]), vec![m, h]));
            t.push((format!("{at}.{}.weight", names[2]), vec![h, m]));
        };
        match &c.moe {
            Some(e) if e.sparse[l] && c.architecture == Architecture::Mixtral => {
                t.push((format!("{p}.block_sparse_moe.gate.weight"), vec![e.experts, h]));
                for x in 0..e.experts {
                    mlp(&mut t, &format!("{p}.block_sparse_moe.experts.{x}"), ["w1", "w3", "w2"], e.intermediate);
                }
            }
            Some(e) if e.sparse[l] => {
                t.push((format!("{p}.mlp.gate.weight"), vec![e.experts, h]));
                for x in 0..e.experts {
                    mlp(&mut t, &format!("{p}.mlp.experts.{x}"), HF_MLP, e.intermediate);
                }
                if let Some(s) = e.shared_intermediate {
                    mlp(&mut t, &format!("{p}.mlp.shared_expert"), HF_MLP, s);
                    t.push((format!("{p}.mlp.shared_expert_gate.weight"), vec![1, h]));
                }
            }
            _ => mlp(&mut t, &format!("{p}.mlp"), HF_MLP, m),
        }
    }
    t.push(("model.norm.weight".to_string(), vec![h]));
    if !c.tie_word_embeddings {
        t.push(("lm_head.weight".to_string(), vec![c.vocab_size, h]));
    }
    t
}

/// Checks the weights against the config: every tensor present with the right shape. Reports
/// every problem at once.
pub fn check_weights(c: &ModelConfig, w: &WeightIndex) -> Result<Vec<TensorSource>> {
    let mut problems = Vec::new();
    let mut out = Vec::new();
    for (name, shape) in expected_tensors(c) {
        match w.tensors.get(&name) {
            None => problems.push(format!("tensor `{name}` is missing (expected shape {shape:?})")),
            Some(t) if t.shape != shape => problems.push(format!(
                "tensor `{name}` in {} has shape {:?}, but config.json implies {shape:?}",
                t.path.display(),
                t.shape
            )),
            Some(t) => out.push(t.clone()),
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(Error::Weights { problems })
    }
}
