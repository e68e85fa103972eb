//! The registry: the list of operator kinds. Each kind's knowledge — parameters, ports, shape
//! rules, instantiation — is in its own file, behind [`OpSpec`]; this file only lists them and
//! forwards to them.

use crate::spec::{Carries, Mem, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{
    add, attention, embedding, expert, expert_store, kv_send, linear, lm_head, loader, net_recv, net_send, rmsnorm,
    rope, router, sampler, sigmoid_gate, swiglu, to_gpu, to_host, Packet,
};
use std::collections::BTreeMap;
use weir_runtime::Operator;

/// [`OpSpec`]'s methods that take `self`, as a trait object.
trait AnySpec {
    fn params(&self) -> Vec<(&'static str, ParamValue)>;
    fn inputs(&self) -> Vec<Port>;
    fn outputs(&self) -> Vec<Port>;
    fn memories(&self) -> (Mem, Mem);
    fn activation_floats(&self, tokens: usize) -> usize;
    fn kv_block_bytes(&self) -> Option<usize>;
    fn instantiate(&self, env: &OpEnv, layer: Option<u32>) -> Box<dyn Operator<Packet>>;
    fn instantiate_gpu(&self, env: &OpEnv, layer: Option<u32>) -> Option<Box<dyn Operator<Packet>>>;
}

impl<S: OpSpec> AnySpec for S {
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        OpSpec::params(self)
    }
    fn inputs(&self) -> Vec<Port> {
        OpSpec::inputs(self)
    }
    fn outputs(&self) -> Vec<Port> {
        OpSpec::outputs(self)
    }
    fn memories(&self) -> (Mem, Mem) {
        OpSpec::memories(self)
    }
    fn activation_floats(&self, tokens: usize) -> usize {
        OpSpec::activation_floats(self, tokens)
    }
    fn kv_block_bytes(&self) -> Option<usize> {
        OpSpec::kv_block_bytes(self)
    }
    fn instantiate(&self, env: &OpEnv, layer: Option<u32>) -> Box<dyn Operator<Packet>> {
        OpSpec::instantiate(self, env, layer)
    }
    fn instantiate_gpu(&self, env: &OpEnv, layer: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        OpSpec::instantiate_gpu(self, env, layer)
    }
}

/// Declares [`OpConfig`], one variant per operator file's `Spec`, and what dispatches on it.
macro_rules! registry {
    ($($(#[$doc:meta])* $variant:ident($module:ident),)*) => {
        /// A node's operator: one of the kinds below, with its parameters.
        #[derive(Debug, Clone, PartialEq)]
        pub enum OpConfig {
            $($(#[$doc])* $variant($module::Spec),)*
        }

        /// Every kind, as graph files name them, whether a `node` statement may, and whether it
        /// has a GPU version.
        const ALL_KINDS: &[(&str, bool, bool)] = &[$((
            <$module::Spec as OpSpec>::KIND,
            <$module::Spec as OpSpec>::WRITTEN,
            <$module::Spec as OpSpec>::GPU,
        ),)*];

        impl OpConfig {
            /// The operator's kind name (as in graph files, traces and dumps).
            pub fn kind(&self) -> &'static str {
                match self {
                    $(OpConfig::$variant(_) => <$module::Spec as OpSpec>::KIND,)*
                }
            }

            /// Builds an operator of `kind` from a node's parameters. Every problem is reported,
            /// each with the parameter it concerns (`None` for a missing one or an unknown kind).
            pub fn from_params(
                kind: &str,
                given: &BTreeMap<String, ParamValue>,
            ) -> Result<OpConfig, Vec<(Option<String>, String)>> {
                let mut p = Params::new(given);
                let op = match kind {
                    $(k if k == <$module::Spec as OpSpec>::KIND && <$module::Spec as OpSpec>::WRITTEN => {
                        OpConfig::$variant(<$module::Spec as OpSpec>::from_params(&mut p))
                    })*
                    other => {
                        let known = kinds().join(", ");
                        return Err(vec![(None, format!("unknown operator `{other}` (known: {known})"))]);
                    }
                };
                p.finish(kind).map(|()| op)
            }

            fn spec(&self) -> &dyn AnySpec {
                match self {
                    $(OpConfig::$variant(s) => s,)*
                }
            }
        }
    };
}

registry! {
    /// Token ids → rows of the embedding table.
    Embedding(embedding),
    /// RMSNorm over the last dimension.
    RmsNorm(rmsnorm),
    /// `y = x Wᵀ (+ b)`.
    Linear(linear),
    /// Rotary position embedding.
    Rope(rope),
    /// Causal grouped-query attention with a per-sequence KV cache.
    Attention(attention),
    /// `down(silu(gate(x)) * up(x))`.
    SwiGlu(swiglu),
    /// Residual add.
    Add(add),
    /// Mixture-of-experts router: each token's top-k experts and their weights.
    Router(router),
    /// One expert: a SwiGLU MLP over the tokens routed to it, weighted.
    Expert(expert),
    /// `sigmoid(g) · x`, one gate per token.
    SigmoidGate(sigmoid_gate),
    /// The output projection, on the rows whose logits are needed.
    LmHead(lm_head),
    /// Chooses the next token of every sequence.
    Sampler(sampler),
    /// Reads weight tensors and sends each on its own port (made from `weight` statements).
    Load(loader),
    /// Reads an MoE layer's cold experts when its router chooses them, into a cache.
    ExpertStore(expert_store),
    /// Host memory → a GPU's, on a copy lane.
    ToGpu(to_gpu),
    /// A GPU's memory → host memory, on a copy lane.
    ToHost(to_host),
    /// An exporting attention node's keys and values, to each sequence's decode worker.
    KvSend(kv_send),
    /// The producing end of an edge to another process (made by the cut into processes).
    NetSend(net_send),
    /// The consuming end of an edge from another process.
    NetRecv(net_recv),
}

/// The operator kinds a `node` statement may name.
pub fn kinds() -> Vec<&'static str> {
    ALL_KINDS.iter().filter(|(_, written, _)| *written).map(|(k, _, _)| *k).collect()
}

impl OpConfig {
    /// Every parameter, as a graph file spells it (the inverse of [`OpConfig::from_params`]).
    pub fn params(&self) -> Vec<(&'static str, ParamValue)> {
        self.spec().params()
    }

    /// Input ports, in port order.
    pub fn input_ports(&self) -> Vec<Port> {
        self.spec().inputs()
    }

    /// Output ports, in port order.
    pub fn output_ports(&self) -> Vec<Port> {
        self.spec().outputs()
    }

    /// Input port names, in port order; weight ports are named after the weight's role.
    pub fn inputs(&self) -> Vec<String> {
        self.input_ports().into_iter().map(|p| p.name).collect()
    }

    /// Output port names, in port order.
    pub fn outputs(&self) -> Vec<String> {
        self.output_ports().into_iter().map(|p| p.name).collect()
    }

    /// The shape a weight on input `port` must have, or `None` if the port takes no weight.
    pub fn weight_shape(&self, port: usize) -> Option<Vec<usize>> {
        match self.input_ports().into_iter().nth(port)?.carries {
            Carries::Weight(shape) => Some(shape),
            _ => None,
        }
    }

    /// What input `port` carries; `None` for a weight port or no such port.
    pub fn input_carries(&self, port: usize) -> Option<Carries> {
        self.input_ports().into_iter().nth(port).map(|p| p.carries).filter(|c| !matches!(c, Carries::Weight(_)))
    }

    /// What output `port` carries.
    pub fn output_carries(&self, port: usize) -> Carries {
        self.output_ports().into_iter().nth(port).map_or(Carries::Any, |p| p.carries)
    }

    /// Whether input `port` takes token ids (the graph's entry).
    pub fn takes_ids(&self, port: usize) -> bool {
        self.input_carries(port) == Some(Carries::Ids)
    }

    /// On a GPU lane: where its inputs and its outputs live.
    pub fn memories(&self) -> (Mem, Mem) {
        self.spec().memories()
    }

    /// Floats of activation memory one firing over a pass of `tokens` tokens allocates.
    pub fn activation_floats(&self, tokens: usize) -> usize {
        self.spec().activation_floats(tokens)
    }

    /// Bytes of one KV cache block (attention operators only).
    pub fn kv_block_bytes(&self) -> Option<usize> {
        self.spec().kv_block_bytes()
    }

    /// Whether the kind runs on a GPU lane: it has a GPU version, or it keeps all its data in
    /// host memory wherever it runs (a loader on a GPU lane reads there, taking turns with it).
    pub fn runs_on_gpu(&self) -> bool {
        self.memories() == (Mem::Host, Mem::Host) || ALL_KINDS.iter().any(|&(k, _, gpu)| gpu && k == self.kind())
    }

    /// A fresh operator with this configuration, drawing memory from `env`'s pools; `layer` is
    /// the node's layer tag (routers count their experts' use per layer).
    pub fn instantiate(&self, env: &OpEnv, layer: Option<u32>) -> Box<dyn Operator<Packet>> {
        self.spec().instantiate(env, layer)
    }

    /// The operator for a node placed on a GPU lane (its data where [`OpConfig::memories`]
    /// says). A kind without a GPU version is an error naming the kind and those that have one.
    pub fn instantiate_gpu(&self, env: &OpEnv, layer: Option<u32>) -> Result<Box<dyn Operator<Packet>>, String> {
        if self.memories() == (Mem::Host, Mem::Host) {
            return Ok(self.instantiate(env, layer));
        }
        self.spec().instantiate_gpu(env, layer).ok_or_else(|| {
            format!(
                "operator kind `{}` has no GPU version yet: place it on a cpu lane (GPU: {})",
                self.kind(),
                gpu_kinds().join(", ")
            )
        })
    }
}

/// The kinds with a GPU version.
fn gpu_kinds() -> Vec<&'static str> {
    ALL_KINDS.iter().filter(|(_, _, gpu)| *gpu).map(|(k, _, _)| *k).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::expert_store::{LaneTiming, TwinCosts};
    use weir_kernels::attention::KvType;
    use weir_kernels::rope::RopeScaling;

    /// One or more of every kind a node statement may name.
    fn every_kind() -> Vec<OpConfig> {
        let store = |twins| {
            OpConfig::ExpertStore(expert_store::Spec {
                served: vec![],
                experts: 4,
                tensors: vec![],
                mode: crate::loader::IoMode::Uring { depth: 8, chunk: 1 << 20, ahead: false },
                prior: vec![0.5, 0.0, 0.25, 0.125],
                budget: 4096,
                cache: true,
                hinted: true,
                twins,
            })
        };
        let timing = |fixed_s, upload_s| LaneTiming { fixed_s, per_token_s: 1e-4, upload_s };
        vec![
            OpConfig::Embedding(embedding::Spec { vocab: 10, hidden: 4 }),
            OpConfig::RmsNorm(rmsnorm::Spec { dim: 4, eps: 1e-5 }),
            OpConfig::Linear(linear::Spec { in_dim: 4, out_dim: 8, bias: true }),
            OpConfig::Rope(rope::Spec { heads: 2, head_dim: 4, theta: 10000.0, scaling: RopeScaling::Default }),
            OpConfig::Rope(rope::Spec {
                heads: 2,
                head_dim: 4,
                theta: 5e5,
                scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192.0,
                },
            }),
            OpConfig::Attention(attention::Spec {
                heads: 4,
                kv_heads: 2,
                head_dim: 4,
                max_positions: 64,
                window: Some(16),
                kv: KvType::Bf16,
                export: false,
            }),
            OpConfig::Attention(attention::Spec {
                heads: 4,
                kv_heads: 2,
                head_dim: 4,
                max_positions: 64,
                window: None,
                kv: KvType::F32,
                export: true,
            }),
            OpConfig::SwiGlu(swiglu::Spec { hidden: 4, intermediate: 8 }),
            OpConfig::Add(add::Spec { dim: 4 }),
            OpConfig::Router(router::Spec { hidden: 4, experts: 8, top_k: 2, normalize: false, hint: false }),
            OpConfig::Router(router::Spec { hidden: 4, experts: 8, top_k: 2, normalize: true, hint: true }),
            OpConfig::Expert(expert::Spec { hidden: 4, intermediate: 6, experts: 8, index: 7, twin: false }),
            OpConfig::Expert(expert::Spec { hidden: 4, intermediate: 6, experts: 8, index: 7, twin: true }),
            OpConfig::SigmoidGate(sigmoid_gate::Spec { dim: 4 }),
            OpConfig::LmHead(lm_head::Spec { hidden: 4, vocab: 10 }),
            OpConfig::Sampler(sampler::Spec { vocab: 10 }),
            store(None),
            store(Some(TwinCosts { own: timing(1e-3, None), twin: timing(2e-4, Some(5e-3)) })),
            OpConfig::ToGpu(to_gpu::Spec::default()),
            OpConfig::ToHost(to_host::Spec),
            OpConfig::KvSend(kv_send::Spec),
            OpConfig::NetSend(net_send::Spec { edge: "l0/attn_norm.y@tail".into(), peer: "tail".into() }),
            OpConfig::NetRecv(net_recv::Spec { edge: "l0/attn_norm.y@tail".into(), peer: "main".into(), width: 64 }),
        ]
    }

    #[test]
    fn params_round_trip_through_from_params_for_every_kind() {
        let ops = every_kind();
        let written: std::collections::BTreeSet<&str> = ops.iter().map(|o| o.kind()).collect();
        assert_eq!(written, kinds().into_iter().collect(), "a case for every kind");
        for op in ops {
            let p: BTreeMap<String, ParamValue> = op.params().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            assert_eq!(OpConfig::from_params(op.kind(), &p).unwrap(), op);
        }
    }

    #[test]
    fn a_kind_has_a_gpu_version_exactly_when_it_says_so() {
        for op in every_kind() {
            let gpu = op.spec().instantiate_gpu(&OpEnv::default(), None).is_some();
            assert_eq!(gpu, gpu_kinds().contains(&op.kind()), "{}", op.kind());
        }
        let err = OpConfig::Sampler(sampler::Spec { vocab: 4 }).instantiate_gpu(&OpEnv::default(), None).err();
        assert!(err.is_some_and(|e| e.contains("`sampler` has no GPU version") && e.contains("lm_head")));
    }

    #[test]
    fn ports_carry_what_the_shapes_say() {
        let l = OpConfig::Linear(linear::Spec { in_dim: 4, out_dim: 8, bias: true });
        assert_eq!(l.inputs(), ["x", "weight", "bias"]);
        assert_eq!((l.weight_shape(1), l.weight_shape(2), l.weight_shape(0)), (Some(vec![8, 4]), Some(vec![8]), None));
        assert_eq!((l.input_carries(0), l.input_carries(1)), (Some(Carries::Act(4)), None));
        assert_eq!(l.output_carries(0), Carries::Act(8));
        let e = OpConfig::Embedding(embedding::Spec { vocab: 10, hidden: 4 });
        assert!(e.takes_ids(0) && !e.takes_ids(1));
        assert_eq!(OpConfig::Sampler(sampler::Spec { vocab: 10 }).output_carries(0), Carries::Tokens);
    }

    #[test]
    fn bad_params_are_all_reported() {
        let mut p = BTreeMap::new();
        p.insert("in".to_string(), ParamValue::Int(0));
        p.insert("colour".to_string(), ParamValue::Str("red".into()));
        let errs = OpConfig::from_params("linear", &p).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.1.clone()).collect();
        assert!(text.iter().any(|t| t.contains("`in` must be a positive integer")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("missing parameter `out`")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("no parameter `colour`")), "{text:?}");
        assert!(OpConfig::from_params("conv2d", &p).unwrap_err()[0].1.contains("unknown operator `conv2d`"));
        // Made from weight statements, not nameable in a node statement.
        assert!(OpConfig::from_params("load", &BTreeMap::new()).unwrap_err()[0].1.contains("unknown operator `load`"));
        let mut a = BTreeMap::new();
        for k in ["heads", "kv_heads", "head_dim", "max_positions"] {
            a.insert(k.to_string(), ParamValue::Int(4));
        }
        a.insert("kv".into(), ParamValue::Str("fp8".into()));
        let errs = OpConfig::from_params("attention", &a).unwrap_err();
        assert_eq!(errs[0].0.as_deref(), Some("kv"));
        assert!(errs[0].1.contains("one of f32, bf16, f16, found \"fp8\""), "{errs:?}");
        let p = |kv: &[(&str, i64)]| -> BTreeMap<String, ParamValue> {
            kv.iter().map(|(k, v)| (k.to_string(), ParamValue::Int(*v))).collect()
        };
        let errs = OpConfig::from_params("router", &p(&[("hidden", 4), ("experts", 2), ("top_k", 3)])).unwrap_err();
        assert_eq!(errs[0].0.as_deref(), Some("top_k"));
        assert!(errs[0].1.contains("`top_k` (3) exceeds `experts` (2)"), "{errs:?}");
        let mut r = p(&[("hidden", 4), ("experts", 2), ("top_k", 1)]);
        r.insert("hint".into(), ParamValue::Int(1));
        let errs = OpConfig::from_params("router", &r).unwrap_err();
        assert_eq!(errs[0].0.as_deref(), Some("hint"));
        assert!(errs[0].1.contains("`hint` must be true or false, found 1"), "{errs:?}");
        let e = p(&[("hidden", 4), ("intermediate", 8), ("experts", 2), ("index", 2)]);
        let errs = OpConfig::from_params("expert", &e).unwrap_err();
        assert!(errs[0].1.contains("`index` must be in 0..2, found 2"), "{errs:?}");
        let mut s = p(&[("experts", 2), ("budget", 100)]);
        s.insert("prior".into(), ParamValue::List(vec![ParamValue::Float(0.5)]));
        s.insert("twins".into(), ParamValue::Bool(true));
        let errs = OpConfig::from_params("expert_store", &s).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.1.clone()).collect();
        assert!(text.iter().any(|t| t.contains("`prior` must list 2 numbers, found 1")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("missing parameter `own_fixed_s`")), "{text:?}");
    }
}
