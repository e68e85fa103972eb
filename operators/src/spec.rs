//! What a node of a graph declares: the contract every operator file fulfils with its `Spec`.
//!
//! An operator's `Spec` is its parameters as a graph file gives them. Implementing [`OpSpec`]
//! says everything the graph checker and the placement need without running anything: the
//! kind's name, how its parameters are parsed and printed, its ports (what each carries, the
//! shape each weight must have), where its data lives on a GPU lane, how much activation
//! memory one firing takes, and how to make the operator that runs it, on a CPU lane and,
//! where it has one, on a GPU lane. The registry (`registry.rs`) is only the list of specs.
//!
//! Adding an operator: write `operators/src/<kind>.rs` with its `Spec`, its [`Operator`]s and
//! their tests (copy `rmsnorm.rs`), add one line to the list in `registry.rs`, and the kernels
//! it calls in `weir-kernels`.

use crate::{expert_store, router, Packet};
use std::collections::BTreeMap;
use weir_kernels::attention::KvType;
use weir_runtime::Operator;

/// A parameter value as written in a graph file.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    /// `none` (an optional parameter left out on purpose).
    None,
    /// `a,b,c`.
    List(Vec<ParamValue>),
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
            ParamValue::List(v) => {
                write!(f, "{}", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","))
            }
        }
    }
}

/// What a port carries: edges connect ports that carry the same thing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Carries {
    /// Token ids: the graph's entry.
    Ids,
    /// f32 activations `[tokens, width]`.
    Act(usize),
    /// A router's choices among this many experts.
    Route { experts: usize },
    /// Sampled tokens: the graph's exit.
    Tokens,
    /// A weight of this shape (fed by a `weight` statement).
    Weight(Vec<usize>),
    /// Keys and values an attention node stored, on their way to another worker.
    Kv,
    /// Whatever comes in goes out (a transfer between host and GPU memory).
    Any,
}

impl std::fmt::Display for Carries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Carries::Ids => write!(f, "token ids"),
            Carries::Act(w) => write!(f, "[tokens, {w}]"),
            Carries::Route { experts } => write!(f, "routes over {experts} experts"),
            Carries::Tokens => write!(f, "sampled tokens"),
            Carries::Weight(shape) => write!(f, "a weight of shape {shape:?}"),
            Carries::Kv => write!(f, "KV cache rows"),
            Carries::Any => write!(f, "anything"),
        }
    }
}

/// A named port and what it carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub carries: Carries,
}

impl Port {
    /// Activations `[tokens, width]`.
    pub fn act(name: &str, width: usize) -> Port {
        Port { name: name.into(), carries: Carries::Act(width) }
    }
    /// A weight of `shape`.
    pub fn weight(name: &str, shape: Vec<usize>) -> Port {
        Port { name: name.into(), carries: Carries::Weight(shape) }
    }
    /// Any other kind of port.
    pub fn of(name: &str, carries: Carries) -> Port {
        Port { name: name.into(), carries }
    }
}

/// Where an operator placed on a GPU lane keeps its inputs or its outputs: in the lane's
/// memory (the GPU's), or in host memory wherever it runs (a loader reads into host memory).
/// The placement puts a transfer wherever an edge joins two memories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mem {
    Lane,
    Host,
}

/// What operators are instantiated with besides their parameters: the pools they allocate
/// from and the counters they report into.
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
    /// The connected remote edges of a graph over several processes (`net_send`, `net_recv`).
    pub net: Option<std::sync::Arc<crate::net::NetLinks>>,
}

impl Default for OpEnv {
    /// No budgets: unbounded KV and activation pools, no host pool.
    fn default() -> Self {
        OpEnv {
            host_pool: None,
            kv_pool: weir_runtime::Pool::new("kv", usize::MAX),
            activations: weir_runtime::Pool::transient("activations", usize::MAX, None),
            disk_bytes: Default::default(),
            routing: Default::default(),
            expert_cache: Default::default(),
            host_meter: None,
            bf16_as_f16: false,
            held_pool: None,
            net: None,
        }
    }
}

/// An operator's declaration: see the module doc.
pub trait OpSpec: Sized + Clone + std::fmt::Debug + PartialEq + Send + Sync + 'static {
    /// The kind, as graph files, traces and dumps name it.
    const KIND: &'static str;
    /// Whether a `node` statement may name the kind (`load` is made from `weight` statements).
    const WRITTEN: bool = true;
    /// Whether it has a GPU version ([`OpSpec::instantiate_gpu`] gives one).
    const GPU: bool = false;
    /// Builds one from a node's parameters; every problem goes into `p`, and the value
    /// returned then does not matter.
    fn from_params(p: &mut Params) -> Self;
    /// Every parameter, as a graph file spells it: the inverse of [`OpSpec::from_params`].
    fn params(&self) -> Vec<(&'static str, ParamValue)>;
    /// Input ports, in port order.
    fn inputs(&self) -> Vec<Port>;
    /// Output ports, in port order.
    fn outputs(&self) -> Vec<Port>;
    /// On a GPU lane: where its inputs and its outputs live.
    fn memories(&self) -> (Mem, Mem) {
        (Mem::Lane, Mem::Lane)
    }
    /// Floats of activation memory one firing over a pass of `tokens` tokens allocates: its
    /// outputs and its scratch. By default its outputs' widths, once per token.
    fn activation_floats(&self, tokens: usize) -> usize {
        let width: usize = self.outputs().iter().map(|p| if let Carries::Act(w) = p.carries { w } else { 0 }).sum();
        tokens * width
    }
    /// Bytes of one KV cache block (attention only).
    fn kv_block_bytes(&self) -> Option<usize> {
        None
    }
    /// The operator that runs a node of this spec on a CPU or I/O lane, drawing memory from
    /// `env`'s pools; `layer` is the node's layer tag.
    fn instantiate(&self, env: &OpEnv, layer: Option<u32>) -> Box<dyn Operator<Packet>>;
    /// The operator for a node on a GPU lane (inputs and outputs in GPU memory, as
    /// [`OpSpec::memories`] says); `None` where the kind has no GPU version.
    fn instantiate_gpu(&self, _env: &OpEnv, _layer: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        None
    }
}

/// A node's parameters while its spec is built from them: typed getters that record what is
/// wrong, and which parameters were read (any other is reported as unknown).
pub struct Params<'a> {
    given: &'a BTreeMap<String, ParamValue>,
    errors: Vec<(Option<String>, String)>,
    used: Vec<&'static str>,
}

impl<'a> Params<'a> {
    /// The parameters a node gives.
    pub fn new(given: &'a BTreeMap<String, ParamValue>) -> Params<'a> {
        Params { given, errors: Vec::new(), used: Vec::new() }
    }

    /// Every problem, each with the parameter it concerns (`None` for a missing one), and
    /// parameters `kind` does not have.
    pub fn finish(mut self, kind: &str) -> Result<(), Vec<(Option<String>, String)>> {
        for k in self.given.keys() {
            if !self.used.contains(&k.as_str()) {
                self.errors.push((Some(k.clone()), format!("operator `{kind}` has no parameter `{k}`")));
            }
        }
        if self.errors.is_empty() {
            Ok(())
        } else {
            Err(self.errors)
        }
    }

    /// Reports a problem with parameter `k` (or with the node, for `None`).
    pub fn error(&mut self, k: Option<&str>, message: String) {
        self.errors.push((k.map(str::to_string), message));
    }

    /// Marks `keys` as known even when not read (parameters another one makes irrelevant).
    pub fn allow(&mut self, keys: &[&'static str]) {
        self.used.extend(keys);
    }

    /// The value given for `k`, if any.
    pub fn raw(&mut self, k: &'static str) -> Option<ParamValue> {
        self.used.push(k);
        self.given.get(k).cloned()
    }

    /// A required positive integer.
    pub fn usize(&mut self, k: &'static str) -> usize {
        match self.raw(k) {
            Some(ParamValue::Int(i)) if i > 0 => i as usize,
            Some(v) => {
                self.error(Some(k), format!("`{k}` must be a positive integer, found {v}"));
                1
            }
            None => {
                self.error(None, format!("missing parameter `{k}`"));
                1
            }
        }
    }

    /// A required integer in `0..end`.
    pub fn index(&mut self, k: &'static str, end: usize) -> usize {
        match self.raw(k) {
            Some(ParamValue::Int(i)) if i >= 0 && (i as usize) < end => i as usize,
            Some(v) => {
                self.error(Some(k), format!("`{k}` must be in 0..{end}, found {v}"));
                0
            }
            None => {
                self.error(None, format!("missing parameter `{k}`"));
                0
            }
        }
    }

    /// A positive integer or `none` (the default).
    pub fn opt_usize(&mut self, k: &'static str) -> Option<usize> {
        match self.raw(k) {
            None | Some(ParamValue::None) => None,
            Some(ParamValue::Int(i)) if i > 0 => Some(i as usize),
            Some(v) => {
                self.error(Some(k), format!("`{k}` must be a positive integer or none, found {v}"));
                None
            }
        }
    }

    /// A number; `default` when left out (required if `None`).
    pub fn f64(&mut self, k: &'static str, default: Option<f64>) -> f64 {
        match (self.raw(k), default) {
            (Some(ParamValue::Float(x)), _) => x,
            (Some(ParamValue::Int(i)), _) => i as f64,
            (None, Some(d)) => d,
            (None, None) => {
                self.error(None, format!("missing parameter `{k}`"));
                0.0
            }
            (Some(v), _) => {
                self.error(Some(k), format!("`{k}` must be a number, found {v}"));
                0.0
            }
        }
    }

    /// [`Params::f64`] as an f32.
    pub fn f32(&mut self, k: &'static str, default: Option<f32>) -> f32 {
        self.f64(k, default.map(f64::from)) as f32
    }

    /// A number ≥ 0, or `none` (the default).
    pub fn opt_seconds(&mut self, k: &'static str) -> Option<f64> {
        match self.raw(k) {
            None | Some(ParamValue::None) => None,
            Some(ParamValue::Float(x)) if x >= 0.0 => Some(x),
            Some(ParamValue::Int(i)) if i >= 0 => Some(i as f64),
            Some(v) => {
                self.error(Some(k), format!("`{k}` must be a number of seconds ≥ 0 or none, found {v}"));
                None
            }
        }
    }

    /// A list of `len` numbers ≥ 0 (a single number is a list of one); all zeros when left out.
    pub fn f64_list(&mut self, k: &'static str, len: usize) -> Vec<f64> {
        let items = match self.raw(k) {
            None => return vec![0.0; len],
            Some(ParamValue::List(v)) => v,
            Some(v) => vec![v],
        };
        let nums: Option<Vec<f64>> = items
            .iter()
            .map(|v| match v {
                ParamValue::Float(x) if *x >= 0.0 => Some(*x),
                ParamValue::Int(i) if *i >= 0 => Some(*i as f64),
                _ => None,
            })
            .collect();
        match nums {
            Some(n) if n.len() == len => n,
            Some(n) => {
                self.error(Some(k), format!("`{k}` must list {len} numbers, found {}", n.len()));
                vec![0.0; len]
            }
            None => {
                let shown = ParamValue::List(items);
                self.error(Some(k), format!("`{k}` must list numbers ≥ 0, found {shown}"));
                vec![0.0; len]
            }
        }
    }

    /// `true` or `false`; `default` when left out.
    pub fn bool(&mut self, k: &'static str, default: bool) -> bool {
        match self.raw(k) {
            None => default,
            Some(ParamValue::Bool(b)) => b,
            Some(v) => {
                self.error(Some(k), format!("`{k}` must be true or false, found {v}"));
                default
            }
        }
    }

    /// A string; `default` when left out.
    pub fn string(&mut self, k: &'static str, default: &str) -> String {
        match self.raw(k) {
            None => default.to_string(),
            Some(ParamValue::Str(s)) => s,
            Some(v) => {
                self.error(Some(k), format!("`{k}` must be a string, found {v}"));
                default.to_string()
            }
        }
    }

    /// A KV cache element type, `f32` when left out.
    pub fn kv_type(&mut self, k: &'static str) -> KvType {
        let name = self.string(k, "f32");
        KvType::parse(&name).unwrap_or_else(|| {
            let known: Vec<&str> = KvType::ALL.iter().map(|t| t.name()).collect();
            self.error(Some(k), format!("`{k}` must be one of {}, found \"{name}\"", known.join(", ")));
            KvType::F32
        })
    }
}

/// Shorthands for [`OpSpec::params`].
pub(crate) fn int(v: usize) -> ParamValue {
    ParamValue::Int(v as i64)
}

pub(crate) fn float(v: f32) -> ParamValue {
    ParamValue::Float(v as f64)
}
