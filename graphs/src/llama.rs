//! The Llama family's weights: which tensors a config implies, and the check that a model
//! folder has them with the right shapes. The graph itself is `graphs/llama.weir`.

use crate::config::ModelConfig;
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
        t.push((format!("{p}.mlp.gate_proj.weight"), vec![m, h]));
        t.push((format!("{p}.mlp.up_proj.weight"), vec![m, h]));
        t.push((format!("{p}.mlp.down_proj.weight"), vec![h, m]));
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
