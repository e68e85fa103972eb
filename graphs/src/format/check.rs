//! Stage two: statements → a checked, placed [`Graph`].
//!
//! Expands `for` and `if`, evaluates expressions against the model's variables, then checks:
//! operators known and their parameters valid, lanes declared and of the right kind, every
//! port connected exactly once, edge widths and weight shapes consistent with the operators'
//! parameters (and so with the model's config), tensors present in the weights, capacities
//! non-zero, names unique, no cycle. Every problem is reported, each at its place.

use super::syntax::{BinOp, Diagnostic, Endpoint, Expr, File, Name, Part, Span, Stmt};
use crate::config::ModelConfig;
use crate::graph::{Edge, Graph, Node, Port};
use crate::safetensors::WeightIndex;
use std::collections::{BTreeMap, HashMap};
use weir_operators::loader::{IoMode, TensorSource};
use weir_operators::{Carries, OpConfig, ParamValue};
use weir_runtime::{DType, LaneKind, LaneSpec};

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

#[derive(Debug, Clone)]
struct Ep {
    node: String,
    port: Option<(String, Span)>,
    span: Span,
}

struct LaneDecl {
    name: String,
    kind: (String, Span),
    attrs: Vec<(String, Value, Span)>,
    span: Span,
}

struct NodeDecl {
    name: String,
    /// An attribute failed to evaluate (already reported): skip the parameter check.
    poisoned: bool,
    kind: (String, Span),
    params: BTreeMap<String, (ParamValue, Span)>,
    lane: Option<(String, Span)>,
    layer: Option<usize>,
    span: Span,
}

struct EdgeDecl {
    from: Ep,
    to: Ep,
    capacity: Option<(usize, Span)>,
}

struct WeightDecl {
    to: Ep,
    tensor: String,
    tensor_span: Span,
    lane: Option<(String, Span)>,
    capacity: Option<(usize, Span)>,
    /// `tier=host` (resident), `dram` (held in memory, sent every pass: for a GPU) or `nvme`
    /// (read every pass); `None`: as placed.
    tier: Option<Kept>,
    /// `uses=K`: a streamed weight serves K firings (micro-batches).
    uses: Option<(usize, Span)>,
}

struct PlaceDecl {
    layers: Option<(i64, i64)>,
    kind: Option<String>,
    lane: Option<(String, Span)>,
    /// The tier of the weights of the operators placed.
    tier: Option<Kept>,
}

/// Where a weight is kept (`tier=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    /// Resident: read once, kept by its consumers.
    Host,
    /// Read once, held in memory and sent every pass (FlexGen's DRAM tier, for a GPU).
    Dram,
    /// Read from storage every pass.
    Nvme,
}

impl Kept {
    fn streamed(self) -> bool {
        self != Kept::Host
    }
}

#[derive(Default)]
struct Flat {
    lanes: Vec<LaneDecl>,
    nodes: Vec<NodeDecl>,
    edges: Vec<EdgeDecl>,
    weights: Vec<WeightDecl>,
    places: Vec<PlaceDecl>,
    inputs: Vec<Ep>,
    outputs: Vec<Ep>,
    default_capacity: Option<(usize, Span)>,
    default_lane: Option<(String, Span)>,
    default_loader: Option<(String, Span)>,
    host_budget: Option<u64>,
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
            // Lane and node names may be written bare: `lane=compute`.
            let v = match (&a.value, a.key.as_str()) {
                (Expr::Var(n, _), "lane" | "loader" | "kind" | "tier") if self.lookup(n).is_none() => {
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

    fn stmt(&mut self, s: &Stmt) {
        match s {
            Stmt::Lane { name, kind, attrs, span } => {
                let Some(name) = self.name(name) else { return };
                let attrs = self.attrs(attrs);
                self.out.lanes.push(LaneDecl { name, kind: kind.clone(), attrs, span: *span });
            }
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
            Stmt::Node { name, kind, attrs: raw, span } => {
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
                        _ => {
                            let pv = match v {
                                Value::Int(i) => ParamValue::Int(i),
                                Value::Float(f) => ParamValue::Float(f),
                                Value::Bool(b) => ParamValue::Bool(b),
                                Value::Str(s) => ParamValue::Str(s),
                                Value::None => ParamValue::None,
                                v => {
                                    self.err(sp, format!("parameter `{k}` must be a single value, found {v}"));
                                    continue;
                                }
                            };
                            params.insert(k, (pv, sp));
                        }
                    }
                }
                self.out.nodes.push(NodeDecl { name, poisoned, kind: kind.clone(), params, lane, layer, span: *span });
            }
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
                self.unknown_attrs(&attrs, &["lane", "capacity", "tier", "uses"], "`weight`");
                let uses = attrs.iter().find(|(k, _, _)| k == "uses").and_then(|(_, v, sp)| {
                    let sp = *sp;
                    self.usize_of(v, sp, "`uses`", 1).map(|u| (u, sp))
                });
                let tier = attrs.iter().find(|(k, _, _)| k == "tier").and_then(|(_, v, sp)| self.tier(v, *sp));
                let lane = self.lane_ref(&attrs, "lane");
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
                });
            }
            Stmt::Budget { attrs, .. } => {
                let attrs = self.attrs(attrs);
                self.unknown_attrs(&attrs, &["host"], "`budget`");
                if let Some((_, v, sp)) = attrs.iter().find(|(k, _, _)| k == "host") {
                    if let Some(b) = self.usize_of(v, *sp, "the host budget", 1) {
                        self.out.host_budget = Some(b as u64);
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

/// What the checker needs besides the file.
pub struct CheckInput<'a> {
    /// Variables (the model's, see [`model_vars`]); empty without a model.
    pub vars: Vec<(String, Value)>,
    /// The model's weights; without them, tensors are not looked up and shapes come from the
    /// operators.
    pub weights: Option<&'a WeightIndex>,
    /// CPUs this process may use (for `cores=` and `threads=`).
    pub cpus: Vec<usize>,
}

/// Expands and checks a parsed file into a graph, or returns every problem found.
pub fn check(file: &File, input: &CheckInput) -> Result<Graph, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let mut root: HashMap<String, Value> = input.vars.iter().cloned().collect();
    root.entry("all".into()).or_insert(Value::Str("all".into()));
    let mut el =
        Elab { scopes: vec![root], unknown: Default::default(), errors: &mut errors, out: Flat::default(), budget: 0 };
    el.stmts(&file.stmts);
    let flat = std::mem::take(&mut el.out);
    let graph = resolve(flat, input, &mut errors);
    if errors.is_empty() {
        Ok(graph)
    } else {
        errors.sort_by_key(|d| d.span);
        errors.dedup();
        Err(errors)
    }
}

fn resolve(f: Flat, input: &CheckInput, errors: &mut Vec<Diagnostic>) -> Graph {
    let mut err = |span: Span, m: String| errors.push(Diagnostic { span, message: m });

    // Lanes.
    let mut lanes: Vec<LaneSpec> = Vec::new();
    let mut lane_idx: HashMap<String, (usize, Span)> = HashMap::new();
    for l in &f.lanes {
        if let Some((_, first)) = lane_idx.get(&l.name) {
            err(l.span, format!("lane `{}` is declared twice (first at {first})", l.name));
            continue;
        }
        let get = |k: &str| l.attrs.iter().find(|(key, _, _)| key == k).map(|(_, v, s)| (v.clone(), *s));
        let known: &[&str] = match l.kind.0.as_str() {
            "cpu" => &["cores", "threads"],
            "io" => &["core"],
            "nvme" => &["core", "depth", "chunk"],
            "gpu" => &["device", "stream"],
            _ => &[],
        };
        for (k, _, sp) in &l.attrs {
            if !known.contains(&k.as_str()) && !known.is_empty() {
                err(*sp, format!("a `{}` lane has no attribute `{k}` (known: {})", l.kind.0, known.join(", ")));
            }
        }
        let int = |v: &Value| if let Value::Int(i) = v { (*i >= 0).then_some(*i as usize) } else { None };
        let kind = match l.kind.0.as_str() {
            "cpu" => {
                let cores: Option<Vec<usize>> = match (get("cores"), get("threads")) {
                    (Some(_), Some((_, sp))) => {
                        err(sp, "give `cores` or `threads`, not both".into());
                        None
                    }
                    (Some((Value::Str(s), _)), None) if s == "all" => Some(input.cpus.clone()),
                    (Some((Value::Int(c), _)), None) if c >= 0 => Some(vec![c as usize]),
                    (Some((Value::List(v), sp)), None) => {
                        let c: Option<Vec<usize>> = v.iter().map(int).collect();
                        if c.is_none() {
                            err(sp, "`cores` must list CPU numbers".into());
                        }
                        c
                    }
                    (Some((Value::Range(a, b), sp)), None) => {
                        if a < 0 || b <= a {
                            err(sp, format!("`cores` range {a}..{b} is empty"));
                            None
                        } else {
                            Some((a as usize..b as usize).collect())
                        }
                    }
                    (Some((v, sp)), None) => {
                        err(sp, format!("`cores` must be all, a CPU number, a list or a range, found {v}"));
                        None
                    }
                    (None, Some((Value::Int(n), sp))) => {
                        if n < 1 || n as usize > input.cpus.len() {
                            err(sp, format!("threads={n}, but this process may use {} CPUs", input.cpus.len()));
                            None
                        } else {
                            Some(input.cpus[..n as usize].to_vec())
                        }
                    }
                    (None, Some((v, sp))) => {
                        err(sp, format!("`threads` must be a positive integer, found {v}"));
                        None
                    }
                    (None, None) => Some(input.cpus.clone()),
                };
                let cores = cores.unwrap_or_default();
                if let Some((_, sp)) = get("cores") {
                    if let Some(c) = cores.iter().find(|c| !input.cpus.contains(c)) {
                        err(sp, format!("core {c} is not available to this process (available: {:?})", input.cpus));
                    }
                }
                LaneKind::Cpu { cores }
            }
            "io" | "nvme" => {
                let core = match get("core") {
                    None => None,
                    Some((v, sp)) => match int(&v) {
                        Some(c) if input.cpus.contains(&c) => Some(c),
                        _ => {
                            err(sp, format!("core {v} is not available to this process (available: {:?})", input.cpus));
                            None
                        }
                    },
                };
                let mut positive = |k: &str, default: usize| match get(k) {
                    None => default,
                    Some((v, sp)) => match int(&v) {
                        Some(n) if n > 0 => n,
                        _ => {
                            err(sp, format!("`{k}` must be a positive integer, found {v}"));
                            default
                        }
                    },
                };
                if l.kind.0 == "io" {
                    LaneKind::Io { core }
                } else {
                    let (depth, chunk) = (positive("depth", 8), positive("chunk", 1 << 20));
                    if chunk % 4096 != 0 {
                        if let Some((_, sp)) = get("chunk") {
                            err(
                                sp,
                                format!(
                                    "`chunk` must be a multiple of 4096 (direct I/O works in blocks), found {chunk}"
                                ),
                            );
                        }
                    }
                    LaneKind::Nvme { core, depth, chunk }
                }
            }
            "gpu" => LaneKind::GpuStream {
                device: get("device").and_then(|(v, _)| int(&v)).unwrap_or(0),
                stream: get("stream").and_then(|(v, _)| int(&v)).unwrap_or(0),
            },
            other => {
                err(l.kind.1, format!("unknown lane kind `{other}` (known: cpu, io, gpu, nvme)"));
                continue;
            }
        };
        lane_idx.insert(l.name.clone(), (lanes.len(), l.span));
        lanes.push(LaneSpec { name: l.name.clone(), kind });
    }
    let is_io = |i: usize, lanes: &[LaneSpec]| matches!(lanes[i].kind, LaneKind::Io { .. } | LaneKind::Nvme { .. });
    let lane_of = |name: &(String, Span), want_io: bool, err: &mut dyn FnMut(Span, String)| -> Option<usize> {
        match lane_idx.get(&name.0) {
            None => {
                let mut known: Vec<&String> = lane_idx.keys().collect();
                known.sort();
                err(
                    name.1,
                    format!(
                        "unknown lane `{}` (declared: {})",
                        name.0,
                        known.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                );
                None
            }
            // Weights load on io or nvme lanes — or on a cpu lane, taking turns with its
            // operators (no overlap: the baseline `--prefetch 0` places them so).
            Some((i, _))
                if if want_io { matches!(lanes[*i].kind, LaneKind::GpuStream { .. }) } else { is_io(*i, &lanes) } =>
            {
                let what = if want_io {
                    "weights are loaded on an io, nvme or cpu lane"
                } else {
                    "operators run on a cpu or gpu lane"
                };
                err(name.1, format!("lane `{}` is a {} lane, but {what}", name.0, lanes[*i].describe()));
                None
            }
            Some((i, _)) => Some(*i),
        }
    };

    // Nodes. A node that could not be built is `broken`: references to it are not reported
    // again as unknown.
    let mut broken: std::collections::HashSet<String> = Default::default();
    let mut nodes: Vec<Node> = Vec::new();
    let mut node_idx: HashMap<String, (usize, Span)> = HashMap::new();
    let first_compute = lanes.iter().position(|l| !matches!(l.kind, LaneKind::Io { .. }));
    for n in &f.nodes {
        if let Some((_, first)) = node_idx.get(&n.name) {
            err(n.span, format!("node `{}` is declared twice (first at {first})", n.name));
            continue;
        }
        let params: BTreeMap<String, ParamValue> = n.params.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect();
        let op = match OpConfig::from_params(&n.kind.0, &params) {
            Ok(op) => op,
            Err(_) if n.poisoned => {
                broken.insert(n.name.clone());
                continue;
            }
            Err(es) => {
                broken.insert(n.name.clone());
                for (param, m) in es {
                    let sp = param
                        .and_then(|p| n.params.get(&p).map(|x| x.1))
                        .unwrap_or(if m.contains("unknown operator") { n.kind.1 } else { n.span });
                    err(sp, format!("node `{}`: {m}", n.name));
                }
                continue;
            }
        };
        let placed = f
            .places
            .iter()
            .rev()
            .find(|p| {
                p.lane.is_some()
                    && p.layers.is_none_or(|(a, b)| n.layer.is_some_and(|l| (l as i64) >= a && (l as i64) < b))
                    && p.kind.as_ref().is_none_or(|k| *k == n.kind.0)
            })
            .and_then(|p| p.lane.clone());
        let lane_name = n.lane.clone().or(placed).or(f.default_lane.clone());
        let lane = match lane_name {
            Some(l) => lane_of(&l, false, &mut err),
            None => match first_compute {
                Some(i) => Some(i),
                None => {
                    err(n.span, format!("node `{}` has no lane: declare a cpu lane", n.name));
                    None
                }
            },
        };
        let Some(lane) = lane else {
            broken.insert(n.name.clone());
            continue;
        };
        node_idx.insert(n.name.clone(), (nodes.len(), n.span));
        nodes.push(Node { name: n.name.clone(), op, lane, layer: n.layer.map(|l| l as u32) });
    }

    let mut graph = Graph::new(lanes.clone());
    let default_cap = f.default_capacity.map_or(2, |c| c.0);
    // Which input ports are fed, and by what.
    let mut fed: HashMap<(usize, usize), Span> = HashMap::new();
    let mut feeds_out: HashMap<(usize, usize), usize> = HashMap::new();
    let resolve_ep =
        |e: &Ep, output: bool, nodes: &[Node], err: &mut dyn FnMut(Span, String)| -> Option<(usize, usize)> {
            let Some(&(n, _)) = node_idx.get(&e.node) else {
                if !broken.contains(&e.node) {
                    err(e.span, format!("unknown node `{}`", e.node));
                }
                return None;
            };
            let op = &nodes[n].op;
            let ports: Vec<String> =
                if output { op.outputs() } else { op.inputs().iter().map(|s| s.to_string()).collect() };
            match &e.port {
                None if output => Some((n, 0)),
                None => {
                    // The first input that takes activations (`x`, `q`, `a`, `logits`, `ids`).
                    Some((n, 0))
                }
                Some((p, sp)) => match ports.iter().position(|x| x == p) {
                    Some(i) => Some((n, i)),
                    None => {
                        let dir = if output { "output" } else { "input" };
                        err(
                            *sp,
                            format!(
                                "node `{}` ({}) has no {dir} port `{p}` ({dir}s: {})",
                                e.node,
                                op.kind(),
                                ports.join(", ")
                            ),
                        );
                        None
                    }
                },
            }
        };
    let mut connect_in = |to: (usize, usize), sp: Span, nodes: &[Node], err: &mut dyn FnMut(Span, String)| -> bool {
        if let Some(first) = fed.get(&to) {
            let n = &nodes[to.0];
            err(sp, format!("input `{}.{}` is fed twice (first at {first})", n.name, n.op.inputs()[to.1]));
            return false;
        }
        fed.insert(to, sp);
        true
    };

    // Ports named by a statement that failed: already reported, so not reported again as
    // unconnected.
    let mut tried_in: std::collections::HashSet<(usize, usize)> = Default::default();
    let mut tried_out: std::collections::HashSet<(usize, usize)> = Default::default();
    for e in &f.edges {
        let (from, to) = (resolve_ep(&e.from, true, &nodes, &mut err), resolve_ep(&e.to, false, &nodes, &mut err));
        tried_out.extend(from);
        tried_in.extend(to);
        let (Some(from), Some(to)) = (from, to) else {
            continue;
        };
        let (fnode, tnode) = (&nodes[from.0], &nodes[to.0]);
        let in_name = tnode.op.inputs()[to.1];
        let out_name = fnode.op.outputs()[from.1].clone();
        if tnode.op.weight_shape(to.1).is_some() {
            err(
                e.to.span,
                format!("input `{}.{in_name}` takes a weight: feed it with a `weight` statement", tnode.name),
            );
            continue;
        }
        if tnode.op.takes_ids(to.1) {
            err(
                e.to.span,
                format!("input `{}.{in_name}` takes token ids: feed it with the `input` statement", tnode.name),
            );
            continue;
        }
        match (fnode.op.output_carries(from.1), tnode.op.input_carries(to.1)) {
            (Carries::Tokens, _) => {
                err(
                    e.from.span,
                    format!(
                        "output `{}.{out_name}` carries sampled tokens: route it to the `output` statement",
                        fnode.name
                    ),
                );
                continue;
            }
            (a, Some(b)) if a != b => {
                err(
                    e.to.span,
                    format!("edge `{}.{out_name}` -> `{}.{in_name}`: expected {b}, found {a}", fnode.name, tnode.name),
                );
                continue;
            }
            _ => {}
        }
        if !connect_in(to, e.to.span, &nodes, &mut err) {
            continue;
        }
        *feeds_out.entry(from).or_default() += 1;
        graph.edges.push(Edge {
            from: Port { node: from.0, port: from.1 },
            to: Port { node: to.0, port: to.1 },
            capacity: e.capacity.map_or(default_cap, |c| c.0),
            sticky: false,
            uses: 1,
        });
    }

    // Weights: one loader node per io lane, tensors in order of first appearance.
    // Resident weights go to io lanes first, streamed ones to nvme lanes first.
    let pread_lanes: Vec<usize> =
        (0..graph.lanes.len()).filter(|&i| matches!(graph.lanes[i].kind, LaneKind::Io { .. })).collect();
    let uring_lanes: Vec<usize> =
        (0..graph.lanes.len()).filter(|&i| matches!(graph.lanes[i].kind, LaneKind::Nvme { .. })).collect();
    let mut per_lane: BTreeMap<usize, Vec<(TensorSource, Kept)>> = BTreeMap::new();
    let mut tensor_home: HashMap<String, (usize, usize, Kept)> = HashMap::new(); // name → (lane, port, tier)
    let mut weight_edges = Vec::new();
    let mut rr = 0;
    for w in &f.weights {
        let Some(to) = resolve_ep(&w.to, false, &nodes, &mut err) else { continue };
        tried_in.insert(to);
        let node = &nodes[to.0];
        let Some(want) = node.op.weight_shape(to.1) else {
            err(w.to.span, format!("input `{}.{}` does not take a weight", node.name, node.op.inputs()[to.1]));
            continue;
        };
        let source = match input.weights {
            Some(idx) => match idx.tensors.get(&w.tensor) {
                None => {
                    err(w.tensor_span, format!("tensor `{}` is not in the model's weights", w.tensor));
                    continue;
                }
                Some(t) if t.shape != want => {
                    err(
                        w.tensor_span,
                        format!(
                            "tensor `{}`: node `{}` port `{}` expects shape {want:?}, found {:?}",
                            w.tensor,
                            node.name,
                            node.op.inputs()[to.1],
                            t.shape
                        ),
                    );
                    continue;
                }
                Some(t) => t.clone(),
            },
            None => TensorSource {
                name: w.tensor.clone(),
                path: Default::default(),
                offset: 0,
                dtype: DType::F32,
                shape: want,
            },
        };
        if !connect_in(to, w.to.span, &nodes, &mut err) {
            continue;
        }
        let tier = w.tier.unwrap_or_else(|| {
            f.places
                .iter()
                .rev()
                .find(|p| {
                    p.tier.is_some()
                        && p.layers.is_none_or(|(a, b)| node.layer.is_some_and(|l| (l as i64) >= a && (l as i64) < b))
                        && p.kind.as_ref().is_none_or(|k| k == node.op.kind())
                })
                .and_then(|p| p.tier)
                .unwrap_or(Kept::Host)
        });
        let streamed = tier.streamed();
        let (lane, port) = match tensor_home.get(&w.tensor) {
            Some(&(_, _, t)) if t != tier => {
                let name = |t: Kept| format!("{t:?}").to_lowercase();
                err(
                    w.to.span,
                    format!("tensor `{}` is placed both tier={} and tier={}", w.tensor, name(t), name(tier)),
                );
                continue;
            }
            Some(&(lane, port, _)) => (lane, port),
            None => {
                let (first, second) =
                    if streamed { (&uring_lanes, &pread_lanes) } else { (&pread_lanes, &uring_lanes) };
                let lane = match w.lane.clone().or(f.default_loader.clone()) {
                    Some(l) => match lane_of(&l, true, &mut err) {
                        Some(i) => i,
                        None => continue,
                    },
                    None if first.is_empty() && second.is_empty() => {
                        err(w.to.span, "weights need a loader lane: declare `lane NAME io` (or `nvme`)".into());
                        continue;
                    }
                    None => {
                        let pick = if first.is_empty() { second } else { first };
                        rr += 1;
                        pick[(rr - 1) % pick.len()]
                    }
                };
                let list = per_lane.entry(lane).or_default();
                list.push((source, tier));
                tensor_home.insert(w.tensor.clone(), (lane, list.len() - 1, tier));
                (lane, list.len() - 1)
            }
        };
        weight_edges.push((lane, port, to, w.capacity.map_or(1, |c| c.0), !streamed, w.uses.map_or(1, |u| u.0 as u32)));
    }

    // Entry and exit.
    let mut end = |eps: &[Ep], output: bool, err: &mut dyn FnMut(Span, String)| -> Option<Port> {
        let what = if output { "output" } else { "input" };
        if eps.is_empty() {
            err(
                Span { line: 1, col: 1 },
                format!(
                    "no `{what}` statement: the graph needs one {}",
                    if output { "(which port gives the sampled tokens?)" } else { "(which port takes the token ids?)" }
                ),
            );
            return None;
        }
        for extra in &eps[1..] {
            err(extra.span, format!("a second `{what}` statement (the first is at {})", eps[0].span));
        }
        let e = &eps[0];
        let (n, p) = resolve_ep(e, output, &nodes, err)?;
        let op = &nodes[n].op;
        if output {
            if op.output_carries(p) != Carries::Tokens {
                err(
                    e.span,
                    format!(
                        "`output` must be a sampler's tokens, found `{}.{}` ({})",
                        nodes[n].name,
                        op.outputs()[p],
                        op.kind()
                    ),
                );
                return None;
            }
            *feeds_out.entry((n, p)).or_default() += 1;
        } else {
            if !op.takes_ids(p) {
                err(
                    e.span,
                    format!(
                        "`input` must be an embedding's ids, found `{}.{}` ({})",
                        nodes[n].name,
                        op.inputs()[p],
                        op.kind()
                    ),
                );
                return None;
            }
            if !connect_in((n, p), e.span, &nodes, err) {
                return None;
            }
        }
        Some(Port { node: n, port: p })
    };
    let entry = end(&f.inputs, false, &mut err);
    let exit = end(&f.outputs, true, &mut err);

    // Every port connected.
    for (i, n) in nodes.iter().enumerate() {
        let decl_span = node_idx[&n.name].1;
        for (p, name) in n.op.inputs().iter().enumerate() {
            if !fed.contains_key(&(i, p)) && !tried_in.contains(&(i, p)) {
                let how = if n.op.weight_shape(p).is_some() { "a `weight`" } else { "an `edge`" };
                err(decl_span, format!("input `{}.{name}` is not connected (add {how} statement)", n.name));
            }
        }
        for (p, name) in n.op.outputs().iter().enumerate() {
            if !feeds_out.contains_key(&(i, p)) && !tried_out.contains(&(i, p)) {
                err(decl_span, format!("output `{}.{name}` goes nowhere", n.name));
            }
        }
    }

    // No cycles (every edge here is unbuffered: a cycle would never fire).
    let mut succ: Vec<Vec<(usize, usize)>> = vec![Vec::new(); nodes.len()];
    for (ei, e) in graph.edges.iter().enumerate() {
        succ[e.from.node].push((e.to.node, ei));
    }
    let mut state = vec![0u8; nodes.len()];
    let mut stack_path: Vec<usize> = Vec::new();
    fn dfs(u: usize, succ: &[Vec<(usize, usize)>], state: &mut [u8], path: &mut Vec<usize>) -> Option<Vec<usize>> {
        state[u] = 1;
        path.push(u);
        for &(v, _) in &succ[u] {
            if state[v] == 1 {
                let start = path.iter().position(|&x| x == v).unwrap_or(0);
                let mut cyc = path[start..].to_vec();
                cyc.push(v);
                return Some(cyc);
            }
            if state[v] == 0 {
                if let Some(c) = dfs(v, succ, state, path) {
                    return Some(c);
                }
            }
        }
        path.pop();
        state[u] = 2;
        None
    }
    for s in 0..nodes.len() {
        if state[s] == 0 {
            if let Some(cyc) = dfs(s, &succ, &mut state, &mut stack_path) {
                let names: Vec<&str> = cyc.iter().map(|&i| nodes[i].name.as_str()).collect();
                err(
                    node_idx[&nodes[cyc[0]].name].1,
                    format!("cycle {} (no edge in it is buffered, so it can never fire)", names.join(" -> ")),
                );
                break;
            }
        }
    }

    graph.nodes = nodes;
    for (lane, list) in per_lane {
        let name = format!("load/{}", graph.lanes[lane].name);
        let mode = match graph.lanes[lane].kind {
            LaneKind::Nvme { depth, chunk, .. } => IoMode::Uring { depth, chunk, ahead: true },
            // Read on a compute lane: direct reads, one tensor per firing, taking turns with
            // compute — as the planner's no-overlap baseline does.
            LaneKind::Cpu { .. } => IoMode::Uring { depth: 8, chunk: 1 << 20, ahead: false },
            _ => IoMode::Pread,
        };
        let streamed = list.iter().map(|(_, t)| t.streamed()).collect();
        let held = list.iter().map(|(_, t)| *t == Kept::Dram).collect();
        let tensors = list.into_iter().map(|(s, _)| s).collect();
        graph.nodes.push(Node { name, op: OpConfig::Load { tensors, streamed, held, mode }, lane, layer: None });
    }
    graph.host_budget = f.host_budget;
    let loader_of: HashMap<usize, usize> = graph
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| matches!(n.op, OpConfig::Load { .. }))
        .map(|(i, n)| (n.lane, i))
        .collect();
    // Canonical order (by loader, tensor, consumer), so that printing and parsing again gives
    // the same graph whatever order the weight statements came in.
    weight_edges.sort_by_key(|&(lane, port, to, _, _, _)| (lane, port, to));
    for (lane, port, to, cap, sticky, uses) in weight_edges {
        graph.edges.push(Edge {
            from: Port { node: loader_of[&lane], port },
            to: Port { node: to.0, port: to.1 },
            capacity: cap,
            sticky,
            uses,
        });
    }
    if let (Some(e), Some(x)) = (entry, exit) {
        graph.entry = e;
        graph.exit = x;
    }
    graph
}
