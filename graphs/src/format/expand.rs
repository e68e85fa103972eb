//! Stage two, first half: statements → flat declarations. Expands `for` and `if`, evaluates
//! expressions against the model's variables, and reads each statement's attributes; every
//! problem found here is reported at its place. `check` resolves the declarations into a graph.

use super::syntax::{BinOp, Diagnostic, Endpoint, Expr, Name, Part, Span, Stmt};
use crate::config::ModelConfig;
use std::collections::{BTreeMap, HashMap};
use weir_operators::ParamValue;

/// A value during elaboration.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    Str(String),
    None,
    List(Vec<Value>),
    Range(i64, i64),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x:?}"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Str(s) => write!(f, "{s:?}"),
            Value::None => write!(f, "none"),
            Value::List(v) => write!(f, "{}", v.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")),
            Value::Range(a, b) => write!(f, "{a}..{b}"),
        }
    }
}

/// The names of the variables [`model_vars`] gives, and `all`: a bare word in an attribute
/// (`lane=compute`) is read as a name only when it is none of these.
pub const VARIABLES: &[&str] = &[
    "architecture",
    "hidden",
    "intermediate",
    "layers",
    "heads",
    "kv_heads",
    "head_dim",
    "vocab",
    "max_positions",
    "rms_norm_eps",
    "rope_theta",
    "rope_type",
    "rope_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max",
    "qkv_bias",
    "o_bias",
    "tie_word_embeddings",
    "sliding_window",
    "experts",
    "top_k",
    "expert_intermediate",
    "norm_topk_prob",
    "shared_intermediate",
    "shared_expert",
    "moe_layer",
    "threads",
    "kv_dtype",
    "all",
];

/// The variables a graph file can read: the model's config, and the run's `threads` and
/// `kv_dtype` (the KV cache's element type).
pub fn model_vars(c: &ModelConfig, threads: usize, kv_dtype: weir_operators::KvType) -> Vec<(String, Value)> {
    use weir_operators::RopeScaling;
    let u = |v: usize| Value::Int(v as i64);
    let f = |v: f32| Value::Float(v as f64);
    let moe = c.moe.as_ref();
    let (rope_type, factor, low, high, orig) = match c.rope_scaling {
        RopeScaling::Default => ("default", 1.0, 1.0, 4.0, 8192.0),
        RopeScaling::Linear { factor } => ("linear", factor, 1.0, 4.0, 8192.0),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            ("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
        }
    };
    vec![
        ("architecture".into(), Value::Str(c.architecture.class().into())),
        ("hidden".into(), u(c.hidden_size)),
        ("intermediate".into(), u(c.intermediate_size)),
        ("layers".into(), u(c.num_hidden_layers)),
        ("heads".into(), u(c.num_attention_heads)),
        ("kv_heads".into(), u(c.num_key_value_heads)),
        ("head_dim".into(), u(c.head_dim)),
        ("vocab".into(), u(c.vocab_size)),
        ("max_positions".into(), u(c.max_position_embeddings)),
        ("rms_norm_eps".into(), f(c.rms_norm_eps)),
        ("rope_theta".into(), f(c.rope_theta)),
        ("rope_type".into(), Value::Str(rope_type.into())),
        ("rope_factor".into(), f(factor)),
        ("rope_low_freq_factor".into(), f(low)),
        ("rope_high_freq_factor".into(), f(high)),
        ("rope_original_max".into(), f(orig)),
        ("qkv_bias".into(), Value::Bool(c.qkv_bias)),
        ("o_bias".into(), Value::Bool(c.o_bias)),
        ("tie_word_embeddings".into(), Value::Bool(c.tie_word_embeddings)),
        (
            "sliding_window".into(),
            Value::List(c.sliding_window.iter().map(|w| w.map_or(Value::None, |w| Value::Int(w as i64))).collect()),
        ),
        ("experts".into(), u(moe.map_or(0, |m| m.experts))),
        ("top_k".into(), u(moe.map_or(0, |m| m.top_k))),
        ("expert_intermediate".into(), u(moe.map_or(0, |m| m.intermediate))),
        ("norm_topk_prob".into(), Value::Bool(moe.is_some_and(|m| m.normalize))),
        ("shared_intermediate".into(), u(moe.and_then(|m| m.shared_intermediate).unwrap_or(0))),
        ("shared_expert".into(), Value::Bool(moe.is_some_and(|m| m.shared_intermediate.is_some()))),
        (
            "moe_layer".into(),
            Value::List((0..c.num_hidden_layers).map(|l| Value::Bool(moe.is_some_and(|m| m.sparse[l]))).collect()),
        ),
        ("threads".into(), u(threads)),
        ("kv_dtype".into(), Value::Str(kv_dtype.name().into())),
    ]
}

/// An endpoint: a node and, if given, its port.
#[derive(Debug, Clone)]
pub(super) struct Ep {
    pub node: String,
    pub port: Option<(String, Span)>,
    pub span: Span,
}

pub(super) struct LaneDecl {
    pub name: String,
    pub kind: (String, Span),
    pub attrs: Vec<(String, Value, Span)>,
    pub span: Span,
}

/// `process NAME [at="ADDR"]`.
pub(super) struct ProcessDecl {
    pub name: String,
    pub at: Option<String>,
    pub span: Span,
}

pub(super) struct NodeDecl {
    pub name: String,
    /// An attribute failed to evaluate (already reported): skip the parameter check.
    pub poisoned: bool,
    pub kind: (String, Span),
    pub params: BTreeMap<String, (ParamValue, Span)>,
    pub lane: Option<(String, Span)>,
    pub layer: Option<usize>,
    pub span: Span,
}

pub(super) struct EdgeDecl {
    pub from: Ep,
    pub to: Ep,
    pub capacity: Option<(usize, Span)>,
}

pub(super) struct WeightDecl {
    pub to: Ep,
    pub tensor: String,
    pub tensor_span: Span,
    pub lane: Option<(String, Span)>,
    pub capacity: Option<(usize, Span)>,
    /// `tier=host` (resident), `dram` (held in memory, sent every pass: for a GPU) or `nvme`
    /// (read every pass); `None`: as placed.
    pub tier: Option<Kept>,
    /// `uses=K`: a streamed weight serves K firings (micro-batches).
    pub uses: Option<(usize, Span)>,
    /// `store=NAME`: the expert store that reads it when its router chooses the expert.
    pub store: Option<(String, Span)>,
}

pub(super) struct PlaceDecl {
    pub layers: Option<(i64, i64)>,
    pub kind: Option<String>,
    pub lane: Option<(String, Span)>,
    /// The tier of the weights of the operators placed.
    pub tier: Option<Kept>,
}

/// Where a weight is kept (`tier=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kept {
    /// Resident: read once, kept by its consumers.
    Host,
    /// Read once, held in memory and sent every pass (FlexGen's DRAM tier, for a GPU).
    Dram,
    /// Read from storage every pass.
    Nvme,
}

impl Kept {
    pub fn streamed(self) -> bool {
        self != Kept::Host
    }
}

/// A file's statements, expanded and evaluated: what `check` resolves into a graph.
#[derive(Default)]
pub(super) struct Flat {
    pub lanes: Vec<LaneDecl>,
    pub processes: Vec<ProcessDecl>,
    pub nodes: Vec<NodeDecl>,
    pub edges: Vec<EdgeDecl>,
    pub weights: Vec<WeightDecl>,
    pub places: Vec<PlaceDecl>,
    pub inputs: Vec<Ep>,
    pub outputs: Vec<Ep>,
    pub default_capacity: Option<(usize, Span)>,
    pub default_lane: Option<(String, Span)>,
    pub default_loader: Option<(String, Span)>,
    pub host_budget: Option<u64>,
    pub gpu_budget: Option<u64>,
}

/// A value as an operator parameter: one value, or a list of them (not a range, nor a list of
/// lists).
fn param_value(v: &Value) -> Option<ParamValue> {
    Some(match v {
        Value::Int(i) => ParamValue::Int(*i),
        Value::Float(f) => ParamValue::Float(*f),
        Value::Bool(b) => ParamValue::Bool(*b),
        Value::Str(s) => ParamValue::Str(s.clone()),
        Value::None => ParamValue::None,
        Value::List(items) => ParamValue::List(
            items
                .iter()
                .map(|x| if matches!(x, Value::List(_)) { None } else { param_value(x) })
                .collect::<Option<_>>()?,
        ),
        Value::Range(..) => return None,
    })
}

/// Expands `stmts` (the model's variables in `vars`) into flat declarations; problems go to
/// `errors`.
pub(super) fn expand(stmts: &[Stmt], vars: &[(String, Value)], errors: &mut Vec<Diagnostic>) -> Flat {
    let mut root: HashMap<String, Value> = vars.iter().cloned().collect();
    root.entry("all".into()).or_insert(Value::Str("all".into()));
    let mut el = Elab { scopes: vec![root], unknown: Default::default(), errors, out: Flat::default(), budget: 0 };
    el.stmts(stmts);
    el.out
}

struct Elab<'a> {
    scopes: Vec<HashMap<String, Value>>,
    /// Unknown variables already reported (each is reported once, at its first use).
    unknown: std::collections::HashSet<String>,
    errors: &'a mut Vec<Diagnostic>,
    out: Flat,
    /// Statements expanded so far; a bound against runaway loops.
    budget: usize,
}

/// Expanded statements (and loop iterations) a file may produce: a bound against runaway loops.
const MAX_STATEMENTS: usize = 200_000;

impl Elab<'_> {
    fn err(&mut self, span: Span, message: impl Into<String>) {
        self.errors.push(Diagnostic { span, message: message.into() });
    }
    fn lookup(&self, name: &str) -> Option<&Value> {
        self.scopes.iter().rev().find_map(|s| s.get(name))
    }
    fn eval(&mut self, e: &Expr) -> Option<Value> {
        Some(match e {
            Expr::Int(i, _) => Value::Int(*i),
            Expr::Float(f, _) => Value::Float(*f),
            Expr::Bool(b, _) => Value::Bool(*b),
            Expr::None(_) => Value::None,
            Expr::Str(parts, _) => Value::Str(self.interp(parts)?),
            Expr::Var(name, sp) => match self.lookup(name) {
                Some(v) => v.clone(),
                None => {
                    if self.unknown.insert(name.clone()) {
                        let hint = if self.lookup("layers").is_none() { " (model variables need --model)" } else { "" };
                        self.err(*sp, format!("unknown variable `{name}`{hint}"));
                    }
                    return None;
                }
            },
            Expr::Index(base, idx, sp) => {
                let (b, i) = (self.eval(base)?, self.eval(idx)?);
                match (b, i) {
                    (Value::List(items), Value::Int(i)) => match items.get(i as usize).filter(|_| i >= 0) {
                        Some(v) => v.clone(),
                        None => {
                            self.err(*sp, format!("index {i} is outside the list (length {})", items.len()));
                            return None;
                        }
                    },
                    (b, i) => {
                        self.err(*sp, format!("cannot index {b} with {i}"));
                        return None;
                    }
                }
            }
            Expr::Neg(x, sp) => match self.eval(x)? {
                Value::Int(i) => Value::Int(-i),
                Value::Float(f) => Value::Float(-f),
                v => {
                    self.err(*sp, format!("cannot negate {v}"));
                    return None;
                }
            },
            Expr::Not(x, sp) => match self.eval(x)? {
                Value::Bool(b) => Value::Bool(!b),
                v => {
                    self.err(*sp, format!("`!` needs true or false, found {v}"));
                    return None;
                }
            },
            Expr::Bin(op, a, b, sp) => {
                let (a, b) = (self.eval(a)?, self.eval(b)?);
                match (a, b) {
                    (Value::Int(a), Value::Int(b)) => Value::Int(
                        match op {
                            BinOp::Add => a.checked_add(b),
                            BinOp::Sub => a.checked_sub(b),
                            BinOp::Mul => a.checked_mul(b),
                            BinOp::Div if b == 0 => {
                                self.err(*sp, "division by zero");
                                return None;
                            }
                            BinOp::Div => a.checked_div(b),
                        }
                        .or_else(|| {
                            self.err(*sp, "integer overflow");
                            None
                        })?,
                    ),
                    (a @ (Value::Int(_) | Value::Float(_)), b @ (Value::Int(_) | Value::Float(_))) => {
                        let f = |v: Value| {
                            if let Value::Int(i) = v {
                                i as f64
                            } else if let Value::Float(x) = v {
                                x
                            } else {
                                0.0
                            }
                        };
                        let (a, b) = (f(a), f(b));
                        Value::Float(match op {
                            BinOp::Add => a + b,
                            BinOp::Sub => a - b,
                            BinOp::Mul => a * b,
                            BinOp::Div => a / b,
                        })
                    }
                    (a, b) => {
                        self.err(*sp, format!("arithmetic needs numbers, found {a} and {b}"));
                        return None;
                    }
                }
            }
            Expr::Range(a, b, sp) => match (self.eval(a)?, self.eval(b)?) {
                (Value::Int(a), Value::Int(b)) => Value::Range(a, b),
                (a, b) => {
                    self.err(*sp, format!("a range needs integers, found {a}..{b}"));
                    return None;
                }
            },
            Expr::List(items, _) => Value::List(items.iter().map(|i| self.eval(i)).collect::<Option<_>>()?),
        })
    }
    fn interp(&mut self, parts: &[Part]) -> Option<String> {
        let mut s = String::new();
        for p in parts {
            match p {
                Part::Lit(l) => s.push_str(l),
                Part::Interp(e) => match self.eval(e)? {
                    Value::Str(x) => s.push_str(&x),
                    v => s.push_str(&v.to_string()),
                },
            }
        }
        Some(s)
    }
    fn name(&mut self, n: &Name) -> Option<String> {
        let s = self.interp(&n.parts)?;
        let ok = s.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '/');
        if !ok {
            self.err(
                n.span,
                format!("`{s}` is not a valid name (letters, digits, `_` and `/`, starting with a letter)"),
            );
            return None;
        }
        Some(s)
    }
    fn ep(&mut self, e: &Endpoint) -> Option<Ep> {
        Some(Ep { node: self.name(&e.node)?, port: e.port.clone(), span: e.span })
    }
    fn usize_of(&mut self, v: &Value, sp: Span, what: &str, min: i64) -> Option<usize> {
        match v {
            Value::Int(i) if *i >= min => Some(*i as usize),
            v => {
                self.err(sp, format!("{what} must be an integer ≥ {min}, found {v}"));
                None
            }
        }
    }
    fn string_of(&mut self, v: &Value, sp: Span, what: &str) -> Option<String> {
        match v {
            Value::Str(s) => Some(s.clone()),
            v => {
                self.err(sp, format!("{what} must be a name in quotes, found {v}"));
                None
            }
        }
    }
    /// Attributes as (key, value, span); values that fail to evaluate are dropped (reported).
    fn attrs(&mut self, attrs: &[super::syntax::Attr]) -> Vec<(String, Value, Span)> {
        let mut out: Vec<(String, Value, Span)> = Vec::new();
        for a in attrs {
            if out.iter().any(|(k, _, _)| *k == a.key) {
                self.err(a.span, format!("`{}` is given twice", a.key));
                continue;
            }
            // Lane, node and process names may be written bare: `lane=compute`, `process=tail`.
            let v = match (&a.value, a.key.as_str()) {
                (Expr::Var(n, _), "lane" | "loader" | "kind" | "tier" | "store" | "process")
                    if self.lookup(n).is_none() =>
                {
                    Some(Value::Str(n.clone()))
                }
                (Expr::Var(n, _), "cores") if n == "all" => Some(Value::Str("all".into())),
                (e, _) => self.eval(e),
            };
            if let Some(v) = v {
                out.push((a.key.clone(), v, a.span));
            }
        }
        out
    }
    /// `host` (resident) → false, `nvme` (streamed every pass) → true.
    fn tier(&mut self, v: &Value, sp: Span) -> Option<Kept> {
        match v {
            Value::Str(s) if s == "host" => Some(Kept::Host),
            Value::Str(s) if s == "dram" => Some(Kept::Dram),
            Value::Str(s) if s == "nvme" => Some(Kept::Nvme),
            v => {
                self.err(
                    sp,
                    format!(
                        "unknown tier {v} (known: host — resident in memory; dram — held in memory and sent every \
                         pass, for a GPU; nvme — read from storage every pass)"
                    ),
                );
                None
            }
        }
    }
    fn unknown_attrs(&mut self, attrs: &[(String, Value, Span)], known: &[&str], what: &str) {
        for (k, _, sp) in attrs {
            if !known.contains(&k.as_str()) {
                self.err(*sp, format!("{what} has no attribute `{k}` (known: {})", known.join(", ")));
            }
        }
    }
    fn capacity(&mut self, attrs: &[(String, Value, Span)]) -> Option<(usize, Span)> {
        let (_, v, sp) = attrs.iter().find(|(k, _, _)| k == "capacity")?.clone();
        match v {
            Value::Int(0) => {
                self.err(sp, "capacity 0: an edge must hold at least one message");
                None
            }
            v => self.usize_of(&v, sp, "`capacity`", 1).map(|c| (c, sp)),
        }
    }
    fn lane_ref(&mut self, attrs: &[(String, Value, Span)], key: &str) -> Option<(String, Span)> {
        let (_, v, sp) = attrs.iter().find(|(k, _, _)| k == key)?.clone();
        self.string_of(&v, sp, &format!("`{key}`")).map(|s| (s, sp))
    }

    /// A `node` statement: its lane, layer and parameters.
    fn node(&mut self, name: &Name, kind: &(String, Span), raw: &[super::syntax::Attr], span: Span) {
        let Some(name) = self.name(name) else { return };
        let attrs = self.attrs(raw);
        let poisoned = attrs.len() < raw.len();
        let lane = self.lane_ref(&attrs, "lane");
        let mut layer = None;
        let mut params = BTreeMap::new();
        for (k, v, sp) in attrs {
            match k.as_str() {
                "lane" => {}
                "layer" => layer = self.usize_of(&v, sp, "`layer`", 0),
                _ => match param_value(&v) {
                    Some(pv) => {
                        params.insert(k, (pv, sp));
                    }
                    None => self.err(sp, format!("parameter `{k}` must be a value or a list of values, found {v}")),
                },
            }
        }
        self.out.nodes.push(NodeDecl { name, poisoned, kind: kind.clone(), params, lane, layer, span });
    }

    fn stmts(&mut self, stmts: &[Stmt]) {
        for s in stmts {
            self.budget += 1;
            if self.budget > MAX_STATEMENTS {
                let sp = match s {
                    Stmt::For { span, .. } | Stmt::Node { span, .. } => *span,
                    _ => Span::default(),
                };
                self.err(sp, format!("the file expands to more than {MAX_STATEMENTS} statements"));
                return;
            }
            self.stmt(s);
        }
    }

    /// `process NAME [at="ADDR"]`.
    fn process(&mut self, name: &super::syntax::Name, attrs: &[super::syntax::Attr], span: Span) {
        let Some(name) = self.name(name) else { return };
        let attrs = self.attrs(attrs);
        self.unknown_attrs(&attrs, &["at"], "`process`");
        let mut at = None;
        for (_, v, sp) in &attrs {
            match v {
                Value::Str(a) if !a.is_empty() => at = Some(a.clone()),
                v => self
                    .err(*sp, format!("`at` must be an address in quotes (\"HOST:PORT\" or \"unix:PATH\"), found {v}")),
            }
        }
        self.out.processes.push(ProcessDecl { name, at, span });
    }

    fn stmt(&mut self, s: &Stmt) {
        match s {
            Stmt::Lane { name, kind, attrs, span } => {
                let Some(name) = self.name(name) else { return };
                let attrs = self.attrs(attrs);
                self.out.lanes.push(LaneDecl { name, kind: kind.clone(), attrs, span: *span });
            }
            Stmt::Process { name, attrs, span } => self.process(name, attrs, *span),
            Stmt::Default { attrs, .. } => {
                let attrs = self.attrs(attrs);
                self.unknown_attrs(&attrs, &["capacity", "lane", "loader"], "`default`");
                if let Some(c) = self.capacity(&attrs) {
                    self.out.default_capacity = Some(c);
                }
                if let Some(l) = self.lane_ref(&attrs, "lane") {
                    self.out.default_lane = Some(l);
                }
                if let Some(l) = self.lane_ref(&attrs, "loader") {
                    self.out.default_loader = Some(l);
                }
            }
            Stmt::Set { name, value, .. } => {
                // `set` updates the variable where it lives (so a loop can carry a value from one
                // iteration to the next), or defines it in the innermost scope.
                if let Some(v) = self.eval(value) {
                    let at =
                        self.scopes.iter().rposition(|sc| sc.contains_key(&name.0)).unwrap_or(self.scopes.len() - 1);
                    self.scopes[at].insert(name.0.clone(), v);
                }
            }
            Stmt::Node { name, kind, attrs, span } => self.node(name, kind, attrs, *span),
            Stmt::Edge { chain, attrs, .. } => {
                let attrs = self.attrs(attrs);
                self.unknown_attrs(&attrs, &["capacity"], "`edge`");
                let capacity = self.capacity(&attrs);
                let eps: Vec<Option<Ep>> = chain.iter().map(|e| self.ep(e)).collect();
                for w in eps.windows(2) {
                    if let (Some(a), Some(b)) = (&w[0], &w[1]) {
                        self.out.edges.push(EdgeDecl { from: a.clone(), to: b.clone(), capacity });
                    }
                }
            }
            Stmt::Weight { to, tensor, attrs, .. } => {
                let attrs = self.attrs(attrs);
                self.unknown_attrs(&attrs, &["lane", "capacity", "tier", "uses", "store"], "`weight`");
                let uses = attrs.iter().find(|(k, _, _)| k == "uses").and_then(|(_, v, sp)| {
                    let sp = *sp;
                    self.usize_of(v, sp, "`uses`", 1).map(|u| (u, sp))
                });
                let tier = attrs.iter().find(|(k, _, _)| k == "tier").and_then(|(_, v, sp)| self.tier(v, *sp));
                let lane = self.lane_ref(&attrs, "lane");
                let store = self.lane_ref(&attrs, "store");
                let capacity = self.capacity(&attrs);
                let (Some(to), Some(t)) = (self.ep(to), self.eval(tensor)) else { return };
                let Some(tensor_name) = self.string_of(&t, tensor.span(), "a weight's tensor") else { return };
                self.out.weights.push(WeightDecl {
                    to,
                    tensor: tensor_name,
                    tensor_span: tensor.span(),
                    lane,
                    capacity,
                    tier,
                    uses,
                    store,
                });
            }
            Stmt::Budget { attrs, .. } => {
                let attrs = self.attrs(attrs);
                self.unknown_attrs(&attrs, &["host", "gpu"], "`budget`");
                for (k, v, sp) in &attrs {
                    let what = if k == "host" { "the host budget" } else { "the GPU budget" };
                    let b = self.usize_of(v, *sp, what, 1).map(|b| b as u64);
                    match k.as_str() {
                        "host" => self.out.host_budget = b,
                        "gpu" => self.out.gpu_budget = b,
                        _ => {}
                    }
                }
            }
            Stmt::Input { to, .. } => {
                if let Some(e) = self.ep(to) {
                    self.out.inputs.push(e);
                }
            }
            Stmt::Output { from, .. } => {
                if let Some(e) = self.ep(from) {
                    self.out.outputs.push(e);
                }
            }
            Stmt::Place { attrs, .. } => {
                let attrs = self.attrs(attrs);
                self.unknown_attrs(&attrs, &["layers", "kind", "lane", "tier"], "`place`");
                let mut p = PlaceDecl { layers: None, kind: None, lane: None, tier: None };
                for (k, v, sp) in &attrs {
                    match (k.as_str(), v) {
                        ("layers", Value::Range(a, b)) => p.layers = Some((*a, *b)),
                        ("layers", Value::Int(a)) => p.layers = Some((*a, a + 1)),
                        ("layers", v) => self.err(*sp, format!("`layers` must be a range like 0..8, found {v}")),
                        ("kind", Value::Str(s)) => p.kind = Some(s.clone()),
                        ("lane", Value::Str(s)) => p.lane = Some((s.clone(), *sp)),
                        // A bare word that is also a variable (`lane=experts`) evaluates to its
                        // value: say so rather than drop the rule.
                        ("kind" | "lane", v) => {
                            self.err(*sp, format!("`{k}` must be a name, found {v} (a variable of that name?)"))
                        }
                        ("tier", v) => p.tier = self.tier(v, *sp),
                        _ => {}
                    }
                }
                self.out.places.push(p);
            }
            Stmt::For { var, range, body, .. } => {
                let Some(r) = self.eval(range) else { return };
                let Value::Range(a, b) = r else {
                    self.err(range.span(), format!("`for` needs a range, found {r}"));
                    return;
                };
                for i in a..b {
                    self.budget += 1;
                    if self.budget > MAX_STATEMENTS {
                        self.err(range.span(), format!("the file expands to more than {MAX_STATEMENTS} statements"));
                        return;
                    }
                    self.scopes.push(HashMap::from([(var.0.clone(), Value::Int(i))]));
                    self.stmts(body);
                    self.scopes.pop();
                    if self.budget > MAX_STATEMENTS {
                        return;
                    }
                }
            }
            Stmt::If { cond, then, otherwise, .. } => match self.eval(cond) {
                Some(Value::Bool(true)) => self.stmts(then),
                Some(Value::Bool(false)) => self.stmts(otherwise),
                Some(v) => self.err(cond.span(), format!("`if` needs true or false, found {v}")),
                None => {}
            },
        }
    }
}
