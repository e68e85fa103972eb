//! The memory planner: which weights stay resident and which stream from storage every pass,
//! so that a model fits a memory budget.
//!
//! Every weight streamed is read once per pass, whichever it is, so which bytes stay resident
//! matters for when reading stalls, not for how much is read. The planner keeps the weights
//! outside the layers resident first (embedding, LM head: streamed, one of them would fill a
//! window sized for layers and stall reading at every step's end), then the most reused (tied
//! embeddings), then small tensors (norms, biases), and streams the large matrices in layer
//! order. What is not resident gets a streaming window: at
//! least what the hungriest operator needs at once (all its streamed weights), and, room
//! permitting, two layers' worth so that reading runs ahead of compute. A budget below the
//! minimum is refused, saying the minimum.
//!
//! Before any weight, the budget sets aside what the running model needs besides weights
//! ([`Reserve`]): the KV cache, for the tokens the scheduler will let in at once (attention
//! takes it in blocks of 16 positions from a pool of exactly that size, and the scheduler
//! admits a sequence only while its whole length fits), and activations, for the passes in
//! flight at the largest pass the scheduler builds (each operator's output and scratch; in the
//! layered graphs the runtime builds, at most two adjacent layers of one pass hold
//! activations at once, so the bound is twice the hungriest layer plus the operators outside
//! layers). The three pools share one meter, whose high-water mark is the tier's peak.

use crate::error::{Error, Result};
use crate::graph::Graph;
use weir_operators::loader::IoMode;
use weir_operators::OpConfig;
use weir_runtime::LaneKind;

/// Bytes a direct read of a tensor holds: whole 4 KiB blocks around it.
pub fn held_bytes(offset: u64, len: u64) -> u64 {
    let a = offset / 4096 * 4096;
    (offset + len).div_ceil(4096) * 4096 - a
}

/// What the running model needs besides weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reserve {
    /// Positions of KV cache over all sequences in flight (whole blocks per sequence).
    pub kv_tokens: usize,
    /// The most tokens one pass carries (prefill is cut into chunks of at most this).
    pub pass_tokens: usize,
    /// Passes in flight at once (the micro-batches of a step).
    pub passes: usize,
}

impl Reserve {
    /// Bytes of KV cache for `self.kv_tokens` positions in `g`.
    pub fn kv_bytes(&self, g: &Graph) -> u64 {
        kv_bytes_per_block(g) * self.kv_tokens.div_ceil(weir_operators::attention::KV_BLOCK_TOKENS) as u64
    }

    /// Tokens in flight at once: the passes of a step, each at most `pass_tokens` — and never
    /// more than the KV cache holds, since every token of a pass takes a place in it.
    pub fn tokens_in_flight(&self) -> usize {
        self.passes.saturating_mul(self.pass_tokens).min(self.kv_tokens)
    }

    /// Bytes of activations for the tokens in flight in `g` (what operators allocate grows
    /// linearly with the tokens of a pass, so passes add up as their tokens do).
    pub fn activation_bytes(&self, g: &Graph) -> u64 {
        let mut per_layer: std::collections::BTreeMap<u32, u64> = Default::default();
        let mut outside = 0u64;
        let tokens = self.tokens_in_flight();
        for n in &g.nodes {
            let b = 4 * n.op.activation_floats(tokens) as u64;
            match n.layer {
                Some(l) => *per_layer.entry(l).or_default() += b,
                None => outside += b,
            }
        }
        let layer = per_layer.values().copied().max().unwrap_or(0);
        2 * layer + outside
    }
}

/// Bytes of one KV block (16 positions) over every attention operator of `g`.
pub fn kv_bytes_per_block(g: &Graph) -> u64 {
    g.nodes.iter().filter_map(|n| n.op.kv_block_bytes()).map(|b| b as u64).sum()
}

/// How a host budget is split between the pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub weights: u64,
    pub kv: u64,
    pub activations: u64,
}

/// Splits `budget` for `reserve`; an error, saying what each part needs, if the reserve
/// leaves less than `weights_min` for weights.
pub fn split(g: &Graph, budget: u64, reserve: &Reserve, weights_min: u64) -> Result<Split> {
    let kv = reserve.kv_bytes(g);
    let activations = reserve.activation_bytes(g);
    let need = weights_min.saturating_add(kv).saturating_add(activations);
    if budget < need {
        return Err(Error::Placement(format!(
            "a memory budget of {budget} bytes is too small: this model needs at least {need} bytes \
             ({weights_min} for the largest operator's weights read at once, {kv} for the KV cache of {} tokens, \
             {activations} for activations of {} tokens in flight)",
            reserve.kv_tokens,
            reserve.tokens_in_flight()
        )));
    }
    Ok(Split { weights: budget - kv - activations, kv, activations })
}

/// What the planner decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub budget: u64,
    pub resident_bytes: u64,
    pub streamed_bytes: u64,
    pub resident_tensors: usize,
    pub streamed_tensors: usize,
    /// Of the streamed ones, those held in host memory and sent every pass from there (the DRAM
    /// tier of a GPU's weights, [`hold`]); the rest are read from storage every pass.
    pub held_bytes: u64,
    pub held_tensors: usize,
    /// The least budget this graph can run in (everything streamed) with this reserve.
    pub minimum: u64,
    /// How the budget is split between weights, KV cache and activations.
    pub split: Split,
}

/// Fits `g` into `budget` bytes of host memory: sets `reserve` aside, then decides which
/// weights stream, turns the loader lanes that stream into io_uring readers, and sets the host
/// budget.
///
/// `prefetch`: how many layers' weights reading may run ahead of compute (`None`: two, up to
/// half the budget). `Some(0)` turns overlap off: the loaders run on the compute lane, so
/// reading and computing take turns — the baseline that overlap is measured against.
pub fn fit(g: &mut Graph, budget: u64, prefetch: Option<usize>, reserve: &Reserve) -> Result<Plan> {
    // (loader node, port) → (bytes held, consumers)
    let mut tensors: Vec<(usize, usize, u64, usize, usize)> = Vec::new(); // node, port, bytes, consumers, layer order
    for (ni, n) in g.nodes.iter().enumerate() {
        if let OpConfig::Load { tensors: ts, .. } = &n.op {
            for (p, t) in ts.iter().enumerate() {
                let consumers = g.edges.iter().filter(|e| e.from.node == ni && e.from.port == p).count();
                tensors.push((ni, p, held_bytes(t.offset, t.nbytes()), consumers, tensors.len()));
            }
        }
    }
    // The hungriest operator: the sum of the weights it holds at once.
    let mut per_op: std::collections::HashMap<usize, u64> = Default::default();
    for e in &g.edges {
        if let Some(t) = tensors.iter().find(|t| t.0 == e.from.node && t.1 == e.from.port) {
            *per_op.entry(e.to.node).or_default() += t.2;
        }
    }
    let window_min = per_op.values().copied().max().unwrap_or(0);
    // Two layers' worth of weights, for reading to run ahead of compute.
    let mut per_layer: std::collections::HashMap<u32, u64> = Default::default();
    for e in &g.edges {
        if let (Some(t), Some(l)) =
            (tensors.iter().find(|t| t.0 == e.from.node && t.1 == e.from.port), g.nodes[e.to.node].layer)
        {
            *per_layer.entry(l).or_default() += t.2;
        }
    }
    let layer_max = per_layer.values().copied().max().unwrap_or(0);
    let window_good = prefetch.unwrap_or(2) as u64 * layer_max;
    let whole = budget;
    let split = split(g, budget, reserve, window_min)?;
    let budget = split.weights;
    let total: u64 = tensors.iter().map(|t| t.2).sum();
    // The window takes what overlap wants, but not more than half a tight budget: resident
    // weights cut the bytes read every pass, the window beyond its minimum only deepens prefetch.
    let window = match prefetch {
        _ if total <= budget => 0,
        Some(_) => window_good.clamp(window_min, budget),
        None => window_good.clamp(window_min, window_min.max(budget / 2)),
    };
    let mut room = budget - window;
    // Weights outside the layers first (the embedding, the LM head): the window is sized for
    // layers, and one of these streamed fills it, so reading the next layers stalls until the
    // step's end has used it. Then the most reused, then small first; ties in layer order.
    let outside = |i: usize| {
        let (node, port) = (tensors[i].0, tensors[i].1);
        g.edges
            .iter()
            .filter(|e| e.from.node == node && e.from.port == port)
            .all(|e| g.nodes[e.to.node].layer.is_none())
    };
    let mut order: Vec<usize> = (0..tensors.len()).collect();
    order.sort_by_key(|&i| (!outside(i), std::cmp::Reverse(tensors[i].3), tensors[i].2, tensors[i].4));
    let mut resident = vec![false; tensors.len()];
    for i in order {
        if tensors[i].2 <= room {
            room -= tensors[i].2;
            resident[i] = true;
        }
    }
    let mut plan = Plan {
        budget: whole,
        split,
        resident_bytes: 0,
        streamed_bytes: 0,
        resident_tensors: 0,
        streamed_tensors: 0,
        held_bytes: 0,
        held_tensors: 0,
        minimum: window_min + split.kv + split.activations,
    };
    for (i, &(node, port, bytes, _, _)) in tensors.iter().enumerate() {
        let streamed = !resident[i];
        if let OpConfig::Load { streamed: s, .. } = &mut g.nodes[node].op {
            s[port] = streamed;
        }
        for e in g.edges.iter_mut().filter(|e| e.from.node == node && e.from.port == port) {
            e.sticky = !streamed;
        }
        if streamed {
            plan.streamed_bytes += bytes;
            plan.streamed_tensors += 1;
        } else {
            plan.resident_bytes += bytes;
            plan.resident_tensors += 1;
        }
    }
    // Loaders that stream read with io_uring and O_DIRECT (so buffers are whole blocks).
    for n in g.nodes.iter_mut() {
        if let OpConfig::Load { mode, .. } = &mut n.op {
            if let LaneKind::Io { core } = g.lanes[n.lane].kind {
                g.lanes[n.lane].kind = LaneKind::Nvme { core, depth: 8, chunk: 1 << 20 };
            }
            *mode = IoMode::Uring { depth: 8, chunk: 1 << 20, ahead: true };
        }
    }
    if prefetch == Some(0) {
        let compute = g.nodes.iter().find(|n| !matches!(n.op, OpConfig::Load { .. })).map(|n| n.lane);
        if let Some(lane) = compute {
            for n in g.nodes.iter_mut() {
                if let OpConfig::Load { mode, .. } = &mut n.op {
                    n.lane = lane;
                    // Nothing read between firings: reading and computing take turns.
                    *mode = IoMode::Uring { depth: 8, chunk: 1 << 20, ahead: false };
                }
            }
        }
    }
    g.host_budget = Some(whole);
    Ok(plan)
}

/// The weights a plan keeps (does not stream): loader node, port, and bytes held.
pub fn kept_tensors(g: &Graph) -> impl Iterator<Item = (usize, usize, u64)> + '_ {
    g.nodes.iter().enumerate().flat_map(|(ni, n)| {
        let kept: Vec<(usize, usize, u64)> = match &n.op {
            OpConfig::Load { tensors, streamed, .. } => tensors
                .iter()
                .enumerate()
                .filter(|&(p, _)| !streamed[p])
                .map(|(p, t)| (ni, p, held_bytes(t.offset, t.nbytes())))
                .collect(),
            _ => Vec::new(),
        };
        kept
    })
}

/// FlexGen's DRAM tier, for a graph whose weights a GPU computes with: of the weights `fit`
/// streams (those not kept in GPU memory), holds in host memory as many as `bytes` allow, in the
/// loaders' order (layer order) — read from storage once, then sent every pass from memory.
/// What is left is read from storage every pass. Records them in `plan`.
pub fn hold(g: &mut Graph, plan: &mut Plan, bytes: u64) {
    let mut left = bytes;
    for n in g.nodes.iter_mut() {
        let OpConfig::Load { tensors, streamed, held, .. } = &mut n.op else { continue };
        for (i, t) in tensors.iter().enumerate() {
            let b = held_bytes(t.offset, t.nbytes());
            if streamed[i] && !held[i] && b <= left {
                held[i] = true;
                left -= b;
                plan.held_bytes += b;
                plan.held_tensors += 1;
            }
        }
    }
}

/// Throughput mode (FlexGen's zig-zag block): every streamed weight serves `micro_batches`
/// passes — one per micro-batch of a step — before the next copy is taken, so one load of a
/// layer's weights is used by the whole block.
pub fn share_streamed(g: &mut Graph, micro_batches: u32) {
    let loaders: Vec<usize> = (0..g.nodes.len()).filter(|&i| matches!(g.nodes[i].op, OpConfig::Load { .. })).collect();
    for e in g.edges.iter_mut().filter(|e| loaders.contains(&e.from.node) && !e.sticky) {
        e.uses = micro_batches.max(1);
    }
}
