//! The operator registry: every kind, its parameters, its ports and their shape rules.
//!
//! Graph files name operators by kind and give their parameters as `key=value`; this table is
//! what turns those into an [`OpConfig`] (with an error per bad parameter), what prints one
//! back, and what the graph checker asks for port widths and weight shapes.

use crate::loader::{IoMode, TensorSource};
use crate::{
    add, attention, embedding, expert, expert_store, linear, lm_head, loader, rmsnorm, rope, router, sampler,
    sigmoid_gate, swiglu, Packet,
};
use std::collections::BTreeMap;
use weir_kernels::attention::KvType;
use weir_kernels::rope::{Rope, RopeScaling};
use weir_runtime::Operator;

/// Every operator kind with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum OpConfig {
    /// Token ids → rows of the embedding table.
    Embedding { vocab: usize, hidden: usize },
    /// RMSNorm over the last dimension.
    RmsNorm { dim: usize, eps: f32 },
    /// `y = x Wᵀ (+ b)`.
    Linear { in_dim: usize, out_dim: usize, bias: bool },
    /// Rotary embedding of `heads` heads of `head_dim`.
    Rope { heads: usize, head_dim: usize, theta: f32, scaling: RopeScaling },
    /// Causal grouped-query attention with a per-sequence KV cache.
    Attention {
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        max_positions: usize,
        window: Option<usize>,
        /// Element type of the KV cache.
        kv: KvType,
    },
    /// `down(silu(gate(x)) * up(x))`.
    SwiGlu { hidden: usize, intermediate: usize },
    /// Residual add.
    Add { dim: usize },
    /// Mixture-of-experts router: each token's `top_k` of `experts` experts and their weights.
    /// `hint`: a prediction of a later layer's choices for its expert store, not counted in the
    /// routing statistics.
    Router { hidden: usize, experts: usize, top_k: usize, normalize: bool, hint: bool },
    /// Expert `index` of `experts`: a SwiGLU MLP over the tokens routed to it, weighted.
    Expert { hidden: usize, intermediate: usize, experts: usize, index: usize, twin: bool },
    /// `sigmoid(g) · x`, one gate per token.
    SigmoidGate { dim: usize },
    /// The output projection, on the rows whose logits are needed.
    LmHead { hidden: usize, vocab: usize },
    /// Chooses the next token of every sequence.
    Sampler { vocab: usize },
    /// Reads weight tensors from files and sends each on its own output port (made from a
    /// graph's `weight` statements, not written as a node). `streamed[i]`: tensor `i` is read
    /// again for every pass instead of once.
    /// `held[i]` (streamed tensors only): read once, held in memory and sent every pass — the
    /// DRAM tier of weights a GPU computes with (see `loader`).
    Load { tensors: Vec<TensorSource>, streamed: Vec<bool>, held: Vec<bool>, mode: IoMode },
    /// Reads the experts `served` (of a router's `experts`) when the router chooses them, into
    /// a cache of `budget` bytes (made by the expert placement, not written as a node): see
    /// [`crate::expert_store`]. `tensors`: gate, up, down of each served expert; `prior[j]`:
    /// how often `served[j]` was chosen per token in calibration; `cache`: keep what it read
    /// (false: read every chosen expert every time, the baseline); `hinted`: a second input
    /// takes a prediction of the route, and the store reads ahead what it names.
    ExpertStore {
        served: Vec<usize>,
        experts: usize,
        tensors: Vec<TensorSource>,
        mode: IoMode,
        prior: Vec<f64>,
        budget: u64,
        cache: bool,
        hinted: bool,
        /// Each served expert has a twin on another lane, and the store chooses per pass which
        /// computes it, from these costs (see `expert_store`).
        twins: Option<crate::offload::Costs>,
    },
}

/// What operators are instantiated with besides their parameters: the pools they allocate from.
#[derive(Debug, Clone)]
pub struct OpEnv {
    /// The host tier's pool (streamed weights), when a budget is set.
    pub host_pool: Option<weir_runtime::Pool>,
    /// Where attention operators take their KV cache blocks from.
    pub kv_pool: weir_runtime::Pool,
    /// Where every operator takes its outputs and scratch from.
    pub activations: weir_runtime::Pool,
    /// Bytes the loaders have read from storage, all together.
    pub disk_bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Where routers count their experts' use.
    pub routing: std::sync::Arc<router::RoutingStats>,
    /// Where expert stores count hits, misses and bytes.
    pub expert_cache: std::sync::Arc<expert_store::ExpertCacheStats>,
    /// The host tier's meter, which expert stores' pools count into as well.
    pub host_meter: Option<weir_runtime::TierMeter>,
    /// Loaders hold resident bf16 matrices as f16 (`Loader::hold_bf16_as_f16`).
    pub bf16_as_f16: bool,
    /// Where loaders keep their held tensors (the DRAM tier), when the plan holds some.
    pub held_pool: Option<weir_runtime::Pool>,
}

impl Default for OpEnv {
    /// No budgets: unbounded KV and activation pools, no host pool.
    fn default() -> Self {
        OpEnv {
            host_pool: None,
            kv_pool: weir_runtime::Pool::new("kv", weir_runtime::Tier::Host, usize::MAX),
            activations: weir_runtime::Pool::transient("activations", weir_runtime::Tier::Host, usize::MAX, None),
            disk_bytes: Default::default(),
            routing: Default::default(),
            expert_cache: Default::default(),
            host_meter: None,
            bf16_as_f16: false,
            held_pool: None,
        }
    }
}

/// A parameter value as written in a graph file.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// `none` (an optional parameter left out on purpose).
    None,
}

impl std::fmt::Display for ParamValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParamValue::Int(i) => write!(f, "{i}"),
            // `{:?}` is the shortest text that reads back as the same number, and keeps a `.0`;
            // a value that is an f32 prints as one (1e-5, not 9.999999747378752e-6).
            ParamValue::Float(x) if (*x as f32) as f64 == *x => write!(f, "{:?}", *x as f32),
            ParamValue::Float(x) => write!(f, "{x:?}"),
            ParamValue::Bool(b) => write!(f, "{b}"),
            ParamValue::Str(s) => write!(f, "{s:?}"),
            ParamValue::None => write!(f, "none"),
        }
    }
}

/// The operator kinds a graph file may name.
pub const KINDS: &[&str] = &[
    "embedding",
    "rmsnorm",
    "linear",
    "rope",
    "attention",
    "swiglu",
    "add",
    "router",
    "expert",
    "sigmoid_gate",
    "lm_head",
    "sampler",
];

/// What a port carries (weights aside): edges connect ports that carry the same thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carries {
    /// Token ids: the graph's entry.
    Ids,
    /// f32 activations `[tokens, width]`.
    Act(usize),
    /// A router's choices among this many experts.
    Route { experts: usize },
    /// Sampled tokens: the graph's exit.
    Tokens,
}

impl std::fmt::Display for Carries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Carries::Ids => write!(f, "token ids"),
            Carries::Act(w) => write!(f, "[tokens, {w}]"),
            Carries::Route { experts } => write!(f, "routes over {experts} experts"),
            Carries::Tokens => write!(f, "sampled tokens"),
        }
    }
}

/// Parameters by name, with what each one must be.
type Params = BTreeMap<String, ParamValue>;

struct Get<'a> {
    p: &'a Params,
    errors: Vec<(Option<String>, String)>,
    used: Vec<&'static str>,
}

impl Get<'_> {
    fn raw(&mut self, k: &'static str) -> Option<&ParamValue> {
        self.used.push(k);
        self.p.get(k)
    }
    fn usize(&mut self, k: &'static str) -> usize {
        match self.raw(k).cloned() {
            Some(ParamValue::Int(i)) if i > 0 => i as usize,
            Some(v) => {
                self.errors.push((Some(k.into()), format!("`{k}` must be a positive integer, found {v}")));
                1
            }
            None => {
                self.errors.push((None, format!("missing parameter `{k}`")));
                1
            }
        }
    }
    fn opt_usize(&mut self, k: &'static str) -> Option<usize> {
        match self.raw(k).cloned() {
            None | Some(ParamValue::None) => None,
            Some(ParamValue::Int(i)) if i > 0 => Some(i as usize),
            Some(v) => {
                self.errors.push((Some(k.into()), format!("`{k}` must be a positive integer or none, found {v}")));
                None
            }
        }
    }
    fn f32(&mut self, k: &'static str, default: Option<f32>) -> f32 {
        match (self.raw(k).cloned(), default) {
            (Some(ParamValue::Float(x)), _) => x as f32,
            (Some(ParamValue::Int(i)), _) => i as f32,
            (None, Some(d)) => d,
            (None, None) => {
                self.errors.push((None, format!("missing parameter `{k}`")));
                0.0
            }
            (Some(v), _) => {
                self.errors.push((Some(k.into()), format!("`{k}` must be a number, found {v}")));
                0.0
            }
        }
    }
    fn bool(&mut self, k: &'static str, default: bool) -> bool {
        match self.raw(k).cloned() {
            None => default,
            Some(ParamValue::Bool(b)) => b,
            Some(v) => {
                self.errors.push((Some(k.into()), format!("`{k}` must be true or false, found {v}")));
                default
            }
        }
    }
    /// A KV cache element type, `f32` when left out.
    fn kv_type(&mut self, k: &'static str) -> KvType {
        let name = self.string(k, "f32");
        KvType::parse(&name).unwrap_or_else(|| {
            let known: Vec<&str> = KvType::ALL.iter().map(|t| t.name()).collect();
            self.errors.push((Some(k.into()), format!("`{k}` must be one of {}, found \"{name}\"", known.join(", "))));
            KvType::F32
        })
    }
    fn string(&mut self, k: &'static str, default: &str) -> String {
        match self.raw(k).cloned() {
            None => default.to_string(),
            Some(ParamValue::Str(s)) => s,
            Some(v) => {
                self.errors.push((Some(k.into()), format!("`{k}` must be a string, found {v}")));
                default.to_string()
            }
        }
    }
}

impl OpConfig {
    /// The operator's kind name (as in graph files, traces and dumps).
    pub fn kind(&self) -> &'static str {
        match self {
            OpConfig::Embedding { .. } => "embedding",
            OpConfig::RmsNorm { .. } => "rmsnorm",
            OpConfig::Linear { .. } => "linear",
            OpConfig::Rope { .. } => "rope",
            OpConfig::Attention { .. } => "attention",
            OpConfig::SwiGlu { .. } => "swiglu",
            OpConfig::Add { .. } => "add",
            OpConfig::Router { .. } => "router",
            OpConfig::Expert { .. } => "expert",
            OpConfig::SigmoidGate { .. } => "sigmoid_gate",
            OpConfig::LmHead { .. } => "lm_head",
            OpConfig::Sampler { .. } => "sampler",
            OpConfig::Load { .. } => "load",
            OpConfig::ExpertStore { .. } => "expert_store",
        }
    }

    /// Builds an operator of `kind` from its parameters. Every problem is reported, each with
    /// the parameter it concerns (`None` for a missing one or an unknown kind).
    pub fn from_params(kind: &str, p: &Params) -> Result<OpConfig, Vec<(Option<String>, String)>> {
        let mut g = Get { p, errors: Vec::new(), used: Vec::new() };
        let op = match kind {
            "embedding" => OpConfig::Embedding { vocab: g.usize("vocab"), hidden: g.usize("hidden") },
            "rmsnorm" => OpConfig::RmsNorm { dim: g.usize("dim"), eps: g.f32("eps", None) },
            "linear" => {
                OpConfig::Linear { in_dim: g.usize("in"), out_dim: g.usize("out"), bias: g.bool("bias", false) }
            }
            "rope" => {
                let (heads, head_dim, theta) = (g.usize("heads"), g.usize("head_dim"), g.f32("theta", None));
                let scaling = match g.string("scaling", "default").as_str() {
                    "default" => RopeScaling::Default,
                    "linear" => RopeScaling::Linear { factor: g.f32("factor", None) },
                    "llama3" => RopeScaling::Llama3 {
                        factor: g.f32("factor", None),
                        low_freq_factor: g.f32("low_freq_factor", None),
                        high_freq_factor: g.f32("high_freq_factor", None),
                        original_max_position_embeddings: g.f32("original_max", None),
                    },
                    other => {
                        g.errors.push((
                            Some("scaling".into()),
                            format!("unknown scaling \"{other}\" (known: default, linear, llama3)"),
                        ));
                        RopeScaling::Default
                    }
                };
                // Scaling parameters that the chosen scaling does not read are not errors.
                g.used.extend(["factor", "low_freq_factor", "high_freq_factor", "original_max"]);
                if head_dim % 2 != 0 {
                    g.errors.push((Some("head_dim".into()), format!("`head_dim` must be even, found {head_dim}")));
                }
                OpConfig::Rope { heads, head_dim, theta, scaling }
            }
            "attention" => {
                let (heads, kv_heads) = (g.usize("heads"), g.usize("kv_heads"));
                if heads % kv_heads != 0 {
                    g.errors.push((
                        Some("kv_heads".into()),
                        format!("`kv_heads` ({kv_heads}) must divide `heads` ({heads})"),
                    ));
                }
                OpConfig::Attention {
                    heads,
                    kv_heads,
                    head_dim: g.usize("head_dim"),
                    max_positions: g.usize("max_positions"),
                    window: g.opt_usize("window"),
                    kv: g.kv_type("kv"),
                }
            }
            "swiglu" => OpConfig::SwiGlu { hidden: g.usize("hidden"), intermediate: g.usize("intermediate") },
            "add" => OpConfig::Add { dim: g.usize("dim") },
            "router" => {
                let (hidden, experts, top_k) = (g.usize("hidden"), g.usize("experts"), g.usize("top_k"));
                if top_k > experts {
                    g.errors.push((Some("top_k".into()), format!("`top_k` ({top_k}) exceeds `experts` ({experts})")));
                }
                OpConfig::Router {
                    hidden,
                    experts,
                    top_k,
                    normalize: g.bool("normalize", true),
                    hint: g.bool("hint", false),
                }
            }
            "expert" => {
                let (hidden, intermediate, experts) = (g.usize("hidden"), g.usize("intermediate"), g.usize("experts"));
                let index = match g.raw("index").cloned() {
                    Some(ParamValue::Int(i)) if i >= 0 && (i as usize) < experts => i as usize,
                    Some(v) => {
                        g.errors.push((Some("index".into()), format!("`index` must be in 0..{experts}, found {v}")));
                        0
                    }
                    None => {
                        g.errors.push((None, "missing parameter `index`".into()));
                        0
                    }
                };
                OpConfig::Expert { hidden, intermediate, experts, index, twin: g.bool("twin", false) }
            }
            "sigmoid_gate" => OpConfig::SigmoidGate { dim: g.usize("dim") },
            "lm_head" => OpConfig::LmHead { hidden: g.usize("hidden"), vocab: g.usize("vocab") },
            "sampler" => OpConfig::Sampler { vocab: g.usize("vocab") },
            other => return Err(vec![(None, format!("unknown operator `{other}` (known: {})", KINDS.join(", ")))]),
        };
        for k in p.keys() {
            if !g.used.contains(&k.as_str()) {
                g.errors.push((Some(k.clone()), format!("operator `{kind}` has no parameter `{k}`")));
            }
        }
        if g.errors.is_empty() {
            Ok(op)
        } else {
            Err(g.errors)
        }
    }

    /// Every parameter, as a graph file spells it (the inverse of [`OpConfig::from_params`]).
    pub fn params(&self) -> Vec<(&'static str, ParamValue)> {
        use ParamValue::*;
        let u = |v: usize| Int(v as i64);
        let f = |v: f32| Float(v as f64);
        match self {
            OpConfig::Embedding { vocab, hidden } => vec![("vocab", u(*vocab)), ("hidden", u(*hidden))],
            OpConfig::RmsNorm { dim, eps } => vec![("dim", u(*dim)), ("eps", f(*eps))],
            OpConfig::Linear { in_dim, out_dim, bias } => {
                vec![("in", u(*in_dim)), ("out", u(*out_dim)), ("bias", Bool(*bias))]
            }
            OpConfig::Rope { heads, head_dim, theta, scaling } => {
                let mut v = vec![("heads", u(*heads)), ("head_dim", u(*head_dim)), ("theta", f(*theta))];
                match scaling {
                    RopeScaling::Default => v.push(("scaling", Str("default".into()))),
                    RopeScaling::Linear { factor } => {
                        v.extend([("scaling", Str("linear".into())), ("factor", f(*factor))])
                    }
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_position_embeddings,
                    } => v.extend([
                        ("scaling", Str("llama3".into())),
                        ("factor", f(*factor)),
                        ("low_freq_factor", f(*low_freq_factor)),
                        ("high_freq_factor", f(*high_freq_factor)),
                        ("original_max", f(*original_max_position_embeddings)),
                    ]),
                }
                v
            }
            OpConfig::Attention { heads, kv_heads, head_dim, max_positions, window, kv } => vec![
                ("heads", u(*heads)),
                ("kv_heads", u(*kv_heads)),
                ("head_dim", u(*head_dim)),
                ("max_positions", u(*max_positions)),
                ("window", window.map_or(None, u)),
                ("kv", Str(kv.name().into())),
            ],
            OpConfig::SwiGlu { hidden, intermediate } => {
                vec![("hidden", u(*hidden)), ("intermediate", u(*intermediate))]
            }
            OpConfig::Add { dim } | OpConfig::SigmoidGate { dim } => vec![("dim", u(*dim))],
            // Set by placement, not by graph files: printed only when set.
            OpConfig::Router { hidden, experts, top_k, normalize, hint } => [
                ("hidden", u(*hidden)),
                ("experts", u(*experts)),
                ("top_k", u(*top_k)),
                ("normalize", Bool(*normalize)),
            ]
            .into_iter()
            .chain(hint.then_some(("hint", Bool(true))))
            .collect(),
            OpConfig::Expert { hidden, intermediate, experts, index, twin } => [
                ("hidden", u(*hidden)),
                ("intermediate", u(*intermediate)),
                ("experts", u(*experts)),
                ("index", u(*index)),
            ]
            .into_iter()
            .chain(twin.then_some(("twin", Bool(true))))
            .collect(),
            OpConfig::LmHead { hidden, vocab } => vec![("hidden", u(*hidden)), ("vocab", u(*vocab))],
            OpConfig::Sampler { vocab } => vec![("vocab", u(*vocab))],
            OpConfig::Load { .. } | OpConfig::ExpertStore { .. } => vec![],
        }
    }

    /// Input port names, in port order; weight ports are named after the weight's role.
    pub fn inputs(&self) -> Vec<&'static str> {
        match self {
            OpConfig::Embedding { .. } => vec!["ids", "weight"],
            OpConfig::RmsNorm { .. } => vec!["x", "weight"],
            OpConfig::Linear { bias: false, .. } => vec!["x", "weight"],
            OpConfig::Linear { bias: true, .. } => vec!["x", "weight", "bias"],
            OpConfig::Rope { .. } => vec!["x"],
            OpConfig::Attention { .. } => vec!["q", "k", "v"],
            OpConfig::SwiGlu { .. } => vec!["x", "gate", "up", "down"],
            OpConfig::Add { .. } => vec!["a", "b"],
            OpConfig::Router { .. } => vec!["x", "weight"],
            OpConfig::Expert { .. } => vec!["x", "route", "gate", "up", "down"],
            OpConfig::SigmoidGate { .. } => vec!["x", "g"],
            OpConfig::LmHead { .. } => vec!["x", "weight"],
            OpConfig::Sampler { .. } => vec!["logits"],
            OpConfig::Load { .. } => vec![],
            OpConfig::ExpertStore { hinted: false, .. } => vec!["route"],
            OpConfig::ExpertStore { hinted: true, .. } => vec!["route", "hint"],
        }
    }

    /// Output port names, in port order.
    pub fn outputs(&self) -> Vec<String> {
        match self {
            OpConfig::Load { tensors, .. } | OpConfig::ExpertStore { tensors, twins: None, .. } => {
                tensors.iter().map(|t| t.name.clone()).collect()
            }
            // Per expert: its three weights, then its twin's.
            OpConfig::ExpertStore { tensors, twins: Some(_), .. } => tensors
                .chunks(3)
                .flat_map(|w| {
                    let own = w.iter().map(|t| t.name.clone());
                    own.clone().chain(own.map(|n| format!("{n} (twin)"))).collect::<Vec<_>>()
                })
                .collect(),
            OpConfig::Sampler { .. } => vec!["tokens".into()],
            OpConfig::Router { .. } => vec!["route".into()],
            _ => vec!["y".into()],
        }
    }

    /// The shape a weight on input `port` must have, or `None` if the port takes activations.
    pub fn weight_shape(&self, port: usize) -> Option<Vec<usize>> {
        let name = *self.inputs().get(port)?;
        match (self, name) {
            (OpConfig::Embedding { vocab, hidden }, "weight") | (OpConfig::LmHead { hidden, vocab }, "weight") => {
                Some(vec![*vocab, *hidden])
            }
            (OpConfig::RmsNorm { dim, .. }, "weight") => Some(vec![*dim]),
            (OpConfig::Linear { in_dim, out_dim, .. }, "weight") => Some(vec![*out_dim, *in_dim]),
            (OpConfig::Linear { out_dim, .. }, "bias") => Some(vec![*out_dim]),
            (OpConfig::SwiGlu { hidden, intermediate }, "gate" | "up") => Some(vec![*intermediate, *hidden]),
            (OpConfig::SwiGlu { hidden, intermediate }, "down") => Some(vec![*hidden, *intermediate]),
            (OpConfig::Router { hidden, experts, .. }, "weight") => Some(vec![*experts, *hidden]),
            (OpConfig::Expert { hidden, intermediate, .. }, "gate" | "up") => Some(vec![*intermediate, *hidden]),
            (OpConfig::Expert { hidden, intermediate, .. }, "down") => Some(vec![*hidden, *intermediate]),
            _ => None,
        }
    }

    /// What input `port` carries; `None` for a weight port.
    pub fn input_carries(&self, port: usize) -> Option<Carries> {
        if self.weight_shape(port).is_some() || port >= self.inputs().len() {
            return None;
        }
        Some(match (self, port) {
            (OpConfig::Embedding { .. }, 0) => Carries::Ids,
            (OpConfig::RmsNorm { dim, .. }, 0) | (OpConfig::Add { dim }, _) => Carries::Act(*dim),
            (OpConfig::SigmoidGate { dim }, 0) => Carries::Act(*dim),
            (OpConfig::SigmoidGate { .. }, _) => Carries::Act(1),
            (OpConfig::Linear { in_dim, .. }, _) => Carries::Act(*in_dim),
            (OpConfig::Rope { heads, head_dim, .. }, _) => Carries::Act(heads * head_dim),
            (OpConfig::Attention { heads, head_dim, .. }, 0) => Carries::Act(heads * head_dim),
            (OpConfig::Attention { kv_heads, head_dim, .. }, _) => Carries::Act(kv_heads * head_dim),
            (OpConfig::Expert { experts, .. }, 1) => Carries::Route { experts: *experts },
            (OpConfig::SwiGlu { hidden, .. } | OpConfig::LmHead { hidden, .. }, _)
            | (OpConfig::Router { hidden, .. } | OpConfig::Expert { hidden, .. }, _) => Carries::Act(*hidden),
            (OpConfig::Sampler { vocab }, _) => Carries::Act(*vocab),
            (OpConfig::ExpertStore { experts, .. }, 0 | 1) => Carries::Route { experts: *experts },
            (OpConfig::Embedding { .. } | OpConfig::RmsNorm { .. } | OpConfig::Load { .. }, _)
            | (OpConfig::ExpertStore { .. }, _) => return None,
        })
    }

    /// What output `port` carries.
    pub fn output_carries(&self, port: usize) -> Carries {
        let _ = port; // every operator but the loader has one output
        match self {
            OpConfig::Sampler { .. } => Carries::Tokens,
            OpConfig::Router { experts, .. } => Carries::Route { experts: *experts },
            _ => Carries::Act(self.output_width().unwrap_or(0)),
        }
    }

    /// The width of the output's activations (`None` for sampled tokens, routes and weights).
    pub fn output_width(&self) -> Option<usize> {
        match self {
            OpConfig::Embedding { hidden, .. } => Some(*hidden),
            OpConfig::RmsNorm { dim, .. } | OpConfig::Add { dim } | OpConfig::SigmoidGate { dim } => Some(*dim),
            OpConfig::Linear { out_dim, .. } => Some(*out_dim),
            OpConfig::Rope { heads, head_dim, .. } => Some(heads * head_dim),
            OpConfig::Attention { heads, head_dim, .. } => Some(heads * head_dim),
            OpConfig::SwiGlu { hidden, .. } | OpConfig::Expert { hidden, .. } => Some(*hidden),
            OpConfig::LmHead { vocab, .. } => Some(*vocab),
            OpConfig::Router { .. }
            | OpConfig::Sampler { .. }
            | OpConfig::Load { .. }
            | OpConfig::ExpertStore { .. } => None,
        }
    }

    /// Floats of activation memory one firing over a pass of `tokens` tokens allocates: its
    /// output and its scratch (logits: one row per token at most). In-place operators and
    /// loaders allocate none.
    pub fn activation_floats(&self, tokens: usize) -> usize {
        match self {
            OpConfig::SwiGlu { hidden, intermediate } => tokens * (2 * intermediate + hidden),
            // Its output, the gathered rows and the MLP's scratch for every token at most.
            OpConfig::Expert { hidden, intermediate, .. } => tokens * (3 * hidden + 2 * intermediate),
            OpConfig::Router { experts, .. } => tokens * experts,
            OpConfig::LmHead { hidden, vocab } => tokens * (hidden + vocab),
            OpConfig::Rope { .. } | OpConfig::Add { .. } | OpConfig::SigmoidGate { .. } => 0,
            _ => self.output_width().map_or(0, |w| tokens * w),
        }
    }

    /// Bytes of one KV cache block (attention operators only).
    pub fn kv_block_bytes(&self) -> Option<usize> {
        match self {
            OpConfig::Attention { kv_heads, head_dim, kv, .. } => {
                Some(attention::kv_block_bytes(kv_heads * head_dim, *kv))
            }
            _ => None,
        }
    }

    /// Whether input `port` takes token ids (the graph's entry).
    pub fn takes_ids(&self, port: usize) -> bool {
        matches!(self, OpConfig::Embedding { .. }) && port == 0
    }

    /// The operator for a node placed on a GPU lane (inputs and outputs in GPU memory; the
    /// compiler moves data across). Kinds without a GPU version are an error naming the kind.
    pub fn instantiate_gpu(&self, env: &OpEnv, layer: Option<u32>) -> Result<Box<dyn Operator<Packet>>, String> {
        Ok(match self.clone() {
            OpConfig::Embedding { vocab, hidden } => Box::new(embedding::GpuEmbedding { vocab, hidden }),
            OpConfig::RmsNorm { dim, eps } => Box::new(rmsnorm::GpuRmsNorm { dim, eps }),
            OpConfig::Linear { in_dim, out_dim, bias } => Box::new(linear::GpuLinear { in_dim, out_dim, bias }),
            OpConfig::Rope { heads, head_dim, theta, scaling } => {
                Box::new(rope::GpuRope::new(heads, Rope::new(head_dim, theta, &scaling)))
            }
            OpConfig::Attention { heads, kv_heads, head_dim, max_positions, window, kv } => {
                Box::new(attention::GpuAttention::new(heads, kv_heads, head_dim, max_positions, window, kv))
            }
            OpConfig::SwiGlu { hidden, intermediate } => Box::new(swiglu::GpuSwiGlu { hidden, intermediate }),
            OpConfig::Add { dim } => Box::new(add::GpuAdd { dim }),
            OpConfig::LmHead { hidden, vocab } => Box::new(lm_head::GpuLmHead { hidden, vocab }),
            OpConfig::Router { hidden, experts, top_k, normalize, hint } => {
                Box::new(router::GpuRouter(router::Router {
                    hidden,
                    experts,
                    top_k,
                    normalize,
                    hint,
                    layer: layer.unwrap_or(0),
                    stats: env.routing.clone(),
                }))
            }
            OpConfig::Expert { hidden, intermediate, experts, index, twin } => {
                Box::new(expert::GpuExpert(expert::Expert { hidden, intermediate, experts, index, twin }))
            }
            OpConfig::SigmoidGate { dim } => Box::new(sigmoid_gate::GpuSigmoidGate { dim }),
            other => {
                return Err(format!(
                    "operator kind `{}` has no GPU version yet: place it on a cpu lane (GPU: embedding, rmsnorm, \
                     linear, rope, attention, swiglu, add, lm_head, router, expert, sigmoid_gate)",
                    other.kind()
                ))
            }
        })
    }

    /// A fresh operator with this configuration, drawing memory from `env`'s pools; `layer` is
    /// the node's layer tag (routers count their experts' use per layer).
    pub fn instantiate(&self, env: &OpEnv, layer: Option<u32>) -> Box<dyn Operator<Packet>> {
        match self.clone() {
            OpConfig::Embedding { vocab, hidden } => Box::new(embedding::Embedding { vocab, hidden }),
            OpConfig::RmsNorm { dim, eps } => Box::new(rmsnorm::RmsNorm { dim, eps }),
            OpConfig::Linear { in_dim, out_dim, bias } => Box::new(linear::Linear { in_dim, out_dim, bias }),
            OpConfig::Rope { heads, head_dim, theta, scaling } => {
                Box::new(rope::RopeOp { heads, rope: Rope::new(head_dim, theta, &scaling) })
            }
            OpConfig::Attention { heads, kv_heads, head_dim, max_positions, window, kv } => Box::new(
                attention::Attention::new(heads, kv_heads, head_dim, max_positions, window, kv, env.kv_pool.clone()),
            ),
            OpConfig::SwiGlu { hidden, intermediate } => Box::new(swiglu::SwiGlu { hidden, intermediate }),
            OpConfig::Add { dim } => Box::new(add::Add { dim }),
            OpConfig::Router { hidden, experts, top_k, normalize, hint } => Box::new(router::Router {
                hidden,
                experts,
                top_k,
                normalize,
                hint,
                layer: layer.unwrap_or(0),
                stats: env.routing.clone(),
            }),
            OpConfig::Expert { hidden, intermediate, experts, index, twin } => {
                Box::new(expert::Expert { hidden, intermediate, experts, index, twin })
            }
            OpConfig::SigmoidGate { dim } => Box::new(sigmoid_gate::SigmoidGate { dim }),
            OpConfig::LmHead { hidden, vocab } => Box::new(lm_head::LmHead { hidden, vocab }),
            OpConfig::Sampler { vocab } => Box::new(sampler::Sampler::new(vocab)),
            OpConfig::Load { tensors, streamed, held, mode } => {
                let mut l = loader::Loader::new(tensors, streamed, mode, env.host_pool.clone());
                if held.iter().any(|h| *h) {
                    l.hold(held, env.held_pool.clone());
                }
                l.count_into(env.disk_bytes.clone());
                l.hold_bf16_as_f16(env.bf16_as_f16);
                Box::new(l)
            }
            OpConfig::ExpertStore { served, experts, tensors, mode, prior, budget, cache, twins, .. } => {
                let name = format!("experts l{}", layer.unwrap_or(0));
                let pool = weir_runtime::Pool::with(
                    &name,
                    weir_runtime::Tier::Host,
                    budget as usize,
                    true,
                    env.host_meter.as_ref(),
                );
                let mut s = expert_store::ExpertStore::new(
                    served,
                    experts,
                    tensors,
                    mode,
                    pool,
                    prior,
                    cache,
                    env.expert_cache.clone(),
                    twins,
                );
                s.count_into(env.disk_bytes.clone());
                Box::new(s)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_round_trip_through_from_params_for_every_kind() {
        let ops = [
            OpConfig::Embedding { vocab: 10, hidden: 4 },
            OpConfig::RmsNorm { dim: 4, eps: 1e-5 },
            OpConfig::Linear { in_dim: 4, out_dim: 8, bias: true },
            OpConfig::Rope { heads: 2, head_dim: 4, theta: 10000.0, scaling: RopeScaling::Default },
            OpConfig::Rope {
                heads: 2,
                head_dim: 4,
                theta: 5e5,
                scaling: RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 8192.0,
                },
            },
            OpConfig::Attention {
                heads: 4,
                kv_heads: 2,
                head_dim: 4,
                max_positions: 64,
                window: Some(16),
                kv: KvType::Bf16,
            },
            OpConfig::Attention {
                heads: 4,
                kv_heads: 2,
                head_dim: 4,
                max_positions: 64,
                window: None,
                kv: KvType::F32,
            },
            OpConfig::SwiGlu { hidden: 4, intermediate: 8 },
            OpConfig::Add { dim: 4 },
            OpConfig::Router { hidden: 4, experts: 8, top_k: 2, normalize: false, hint: false },
            OpConfig::Router { hidden: 4, experts: 8, top_k: 2, normalize: true, hint: true },
            OpConfig::Expert { hidden: 4, intermediate: 6, experts: 8, index: 7, twin: false },
            OpConfig::Expert { hidden: 4, intermediate: 6, experts: 8, index: 7, twin: true },
            OpConfig::SigmoidGate { dim: 4 },
            OpConfig::LmHead { hidden: 4, vocab: 10 },
            OpConfig::Sampler { vocab: 10 },
        ];
        for op in ops {
            let p: Params = op.params().into_iter().map(|(k, v)| (k.to_string(), v)).collect();
            assert_eq!(OpConfig::from_params(op.kind(), &p).unwrap(), op);
        }
    }

    #[test]
    fn bad_params_are_all_reported() {
        let mut p = Params::new();
        p.insert("in".into(), ParamValue::Int(0));
        p.insert("colour".into(), ParamValue::Str("red".into()));
        let errs = OpConfig::from_params("linear", &p).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.1.clone()).collect();
        assert!(text.iter().any(|t| t.contains("`in` must be a positive integer")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("missing parameter `out`")), "{text:?}");
        assert!(text.iter().any(|t| t.contains("no parameter `colour`")), "{text:?}");
        assert!(OpConfig::from_params("conv2d", &p).unwrap_err()[0].1.contains("unknown operator `conv2d`"));
        let mut a = Params::new();
        for k in ["heads", "kv_heads", "head_dim", "max_positions"] {
            a.insert(k.into(), ParamValue::Int(4));
        }
        a.insert("kv".into(), ParamValue::Str("fp8".into()));
        let errs = OpConfig::from_params("attention", &a).unwrap_err();
        assert_eq!(errs[0].0.as_deref(), Some("kv"));
        assert!(errs[0].1.contains("one of f32, bf16, f16, found \"fp8\""), "{errs:?}");
        let p =
            |kv: &[(&str, i64)]| -> Params { kv.iter().map(|(k, v)| (k.to_string(), ParamValue::Int(*v))).collect() };
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
    }
}
