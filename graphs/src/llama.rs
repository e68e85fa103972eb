//! The Llama family (Llama, Mistral, Qwen2) as a graph of operators.
//!
//! Per layer, with `x` the residual stream:
//!
//! ```text
//! x ─▶ attn_norm ─┬▶ q_proj ─▶ rope_q ─┐
//!                 ├▶ k_proj ─▶ rope_k ─┼▶ attn ─▶ o_proj ─▶ attn_add(x, ·) ─▶ mlp_norm ─▶ mlp ─▶ mlp_add
//!                 └▶ v_proj ───────────┘
//! ```
//!
//! then `final_norm ─▶ lm_head ─▶ sampler`. Every weight reaches its operator on a sticky edge
//! from a loader node on a loader lane.

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::graph::Graph;
use crate::placement::Placement;
use crate::safetensors::WeightIndex;
use weir_operators::loader::TensorSource;
use weir_operators::{OpConfig, Rope};
use weir_runtime::LaneSpec;

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

/// Builds the placed graph of a Llama-family model.
pub fn build(c: &ModelConfig, w: &WeightIndex, p: &Placement) -> Result<Graph> {
    let tensors = check_weights(c, w)?;
    if p.compute_cores.is_empty() || p.loader_lanes == 0 || p.activation_capacity == 0 {
        return Err(Error::Placement(
            "needs at least one compute core, one loader lane and activation capacity ≥ 1".into(),
        ));
    }
    let mut lanes = vec![LaneSpec::cpu("compute", p.compute_cores.clone())];
    for i in 0..p.loader_lanes {
        lanes.push(LaneSpec::io(&format!("loader{i}"), None));
    }
    let mut g = Graph::new(lanes);
    let cap = p.activation_capacity;
    let (h, q, kv) = (c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let rope = Rope::new(c.head_dim, c.rope_theta, &c.rope_scaling);
    // (consumer node, consumer port) for every weight, by name.
    let mut consumers: std::collections::HashMap<String, Vec<(usize, usize)>> = Default::default();
    let mut want = |g: &Graph, name: String, node: usize, port: &str| {
        let port = g.in_port(node, port);
        consumers.entry(name).or_default().push((node, port));
    };

    let embed = g.node("embed", OpConfig::Embedding { vocab: c.vocab_size, hidden: h }, 0, None);
    want(&g, "model.embed_tokens.weight".into(), embed, "weight");
    g.entry = crate::graph::Port { node: embed, port: 0 };
    let mut x = embed;
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let lay = Some(l as u32);
        let n = |s: &str| format!("L{l}.{s}");
        let attn_norm = g.node(n("attn_norm"), OpConfig::RmsNorm { dim: h, eps: c.rms_norm_eps }, 0, lay);
        want(&g, format!("{p}.input_layernorm.weight"), attn_norm, "weight");
        g.edge(x, 0, attn_norm, 0, cap, false);
        let mut proj = |g: &mut Graph, short: &str, out: usize| {
            let node = g.node(
                n(&format!("{short}_proj")),
                OpConfig::Linear { in_dim: h, out_dim: out, bias: c.qkv_bias },
                0,
                lay,
            );
            want(g, format!("{p}.self_attn.{short}_proj.weight"), node, "weight");
            if c.qkv_bias {
                want(g, format!("{p}.self_attn.{short}_proj.bias"), node, "bias");
            }
            g.edge(attn_norm, 0, node, 0, cap, false);
            node
        };
        let (qp, kp, vp) = (proj(&mut g, "q", q), proj(&mut g, "k", kv), proj(&mut g, "v", kv));
        let rq = g.node(n("rope_q"), OpConfig::Rope { heads: c.num_attention_heads, rope: rope.clone() }, 0, lay);
        let rk = g.node(n("rope_k"), OpConfig::Rope { heads: c.num_key_value_heads, rope: rope.clone() }, 0, lay);
        g.edge(qp, 0, rq, 0, cap, false);
        g.edge(kp, 0, rk, 0, cap, false);
        let attn = g.node(
            n("attn"),
            OpConfig::Attention {
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                max_positions: c.max_position_embeddings,
                window: c.sliding_window[l],
            },
            0,
            lay,
        );
        g.edge(rq, 0, attn, 0, cap, false);
        g.edge(rk, 0, attn, 1, cap, false);
        g.edge(vp, 0, attn, 2, cap, false);
        let op = g.node(n("o_proj"), OpConfig::Linear { in_dim: q, out_dim: h, bias: c.o_bias }, 0, lay);
        want(&g, format!("{p}.self_attn.o_proj.weight"), op, "weight");
        if c.o_bias {
            want(&g, format!("{p}.self_attn.o_proj.bias"), op, "bias");
        }
        g.edge(attn, 0, op, 0, cap, false);
        let add1 = g.node(n("attn_add"), OpConfig::Add { dim: h }, 0, lay);
        g.edge(x, 0, add1, 0, cap, false);
        g.edge(op, 0, add1, 1, cap, false);
        let mlp_norm = g.node(n("mlp_norm"), OpConfig::RmsNorm { dim: h, eps: c.rms_norm_eps }, 0, lay);
        want(&g, format!("{p}.post_attention_layernorm.weight"), mlp_norm, "weight");
        g.edge(add1, 0, mlp_norm, 0, cap, false);
        let mlp = g.node(n("mlp"), OpConfig::SwiGlu { hidden: h, intermediate: c.intermediate_size }, 0, lay);
        for (role, t) in [("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")] {
            want(&g, format!("{p}.mlp.{t}.weight"), mlp, role);
        }
        g.edge(mlp_norm, 0, mlp, 0, cap, false);
        let add2 = g.node(n("mlp_add"), OpConfig::Add { dim: h }, 0, lay);
        g.edge(add1, 0, add2, 0, cap, false);
        g.edge(mlp, 0, add2, 1, cap, false);
        x = add2;
    }
    let norm = g.node("final_norm", OpConfig::RmsNorm { dim: h, eps: c.rms_norm_eps }, 0, None);
    want(&g, "model.norm.weight".into(), norm, "weight");
    g.edge(x, 0, norm, 0, cap, false);
    let head = g.node("lm_head", OpConfig::LmHead { hidden: h, vocab: c.vocab_size }, 0, None);
    let head_w = if c.tie_word_embeddings { "model.embed_tokens.weight" } else { "lm_head.weight" };
    want(&g, head_w.into(), head, "weight");
    g.edge(norm, 0, head, 0, cap, false);
    let sampler = g.node("sampler", OpConfig::Sampler { vocab: c.vocab_size }, 0, None);
    g.edge(head, 0, sampler, 0, cap, false);
    g.exit = crate::graph::Port { node: sampler, port: 0 };

    // Loaders: tensors dealt round-robin over the loader lanes, in layer order, each sent on
    // its own port to every operator that uses it.
    let mut per_loader: Vec<Vec<TensorSource>> = vec![Vec::new(); p.loader_lanes];
    for (i, t) in tensors.into_iter().enumerate() {
        per_loader[i % p.loader_lanes].push(t);
    }
    for (li, ts) in per_loader.into_iter().enumerate() {
        if ts.is_empty() {
            continue;
        }
        let names: Vec<String> = ts.iter().map(|t| t.name.clone()).collect();
        let loader = g.node(format!("load{li}"), OpConfig::Load { tensors: ts }, 1 + li, None);
        for (port, name) in names.iter().enumerate() {
            for &(node, in_port) in consumers.get(name).into_iter().flatten() {
                g.edge(loader, port, node, in_port, 1, true);
            }
        }
    }
    Ok(g)
}
