//! Pass: plan memory. Which weights stay resident and which stream from storage every pass, so
//! that a model fits a memory budget — the host's (`--memory-budget`) or, for a graph with GPU
//! lanes, the GPU's (`--gpu-memory`, else the device's default) — and, given both, FlexGen's
//! three tiers: what does not fit the GPU is held in DRAM as far as the host budget allows, the
//! rest read from NVMe every pass.
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

use super::{Machine, PlaceOptions};
use crate::error::{Error, Result};
use crate::graph::Graph;
use weir_operators::OpConfig;

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

/// The pass: plans `g`'s memory for `o` (see the module doc), or leaves a graph file's own
/// placement as it stands. Returns what the planner decided, when it planned.
///
/// Budgets, in order: `--memory-budget` / `--gpu-memory` if given (they override a file's
/// tiers); else a file's own `budget` statements (its placement stands); else, for a graph
/// with GPU lanes, each device's default budget (`machine`); else none — every weight
/// resident, nothing streams.
pub fn plan(g: &mut Graph, o: &PlaceOptions, machine: &dyn Machine) -> Result<Option<Plan>> {
    let given = o.memory_budget.is_some() || o.gpu_memory.is_some();
    let own = g.host_budget.is_some() || g.gpu_budget.is_some();
    let gpu_default = if given || own { None } else { gpu_default(g, machine) };
    let gpu = if g.on_gpu() { o.gpu_memory.or(gpu_default) } else { None };
    let planned = if g.on_gpu() { gpu.or(o.memory_budget) } else { o.memory_budget };
    let Some(budget) = planned else {
        if o.prefetch.is_some() {
            return Err(Error::Options(
                "--prefetch needs --memory-budget or --gpu-memory, or a graph with GPU lanes on a machine with the GPU \
                 (without a budget every weight is resident and nothing streams)"
                    .into(),
            ));
        }
        share_streamed(g, o.micro_batches as u32);
        return Ok(None);
    };
    // The expert caches are host memory: they come out of the host budget first. On a GPU graph
    // the plan fits the GPU's budget, and the caches only have to fit the host's.
    let caches = cache_bytes(g);
    let rest = |b: u64| {
        b.checked_sub(caches).filter(|&r| r > 0).ok_or_else(|| {
            Error::Options(format!(
                "the memory budget of {b} bytes does not hold the expert caches' {caches} bytes (from the expert \
                 budget) and the rest of the model: give more memory (--memory-budget) or a smaller expert budget"
            ))
        })
    };
    let budget = match (g.on_gpu(), o.memory_budget) {
        (true, Some(m)) => rest(m).map(|_| budget)?,
        (true, None) => budget,
        (false, _) => rest(budget)?,
    };
    let which = match (g.on_gpu(), o.gpu_memory, gpu) {
        (true, Some(_), _) => "the GPU memory budget, --gpu-memory",
        (true, None, Some(_)) => "the GPU's default budget, its memory less 1 GiB (--gpu-memory sets another)",
        _ => "--memory-budget",
    };
    let mut plan = fit(g, budget, o.prefetch, &o.reserve).map_err(|e| match e {
        Error::Placement(m) => Error::Placement(format!("{m} (the budget is {which})")),
        e => e,
    })?;
    let host = host_split(g, &plan.split, plan.minimum);
    if let (true, Some(_), Some(m)) = (g.on_gpu(), gpu, o.memory_budget) {
        hold(g, &mut plan, m.saturating_sub(host.weights + host.kv + host.activations + caches));
    }
    g.host_budget = o.memory_budget;
    g.gpu_budget = gpu;
    share_streamed(g, o.micro_batches as u32);
    Ok(Some(plan))
}

/// The memory a graph's plan fits when `--gpu-memory` is not given: each device's default pool
/// (the smallest if several). `None` without GPU lanes, or where a device cannot be opened (the
/// program's start then says why).
fn gpu_default(g: &Graph, machine: &dyn Machine) -> Option<u64> {
    g.devices().into_iter().map(|d| machine.gpu_memory(d)).min().flatten()
}

/// Bytes of the expert stores' caches (host memory, outside the planned pools).
pub fn cache_bytes(g: &Graph) -> u64 {
    g.nodes.iter().filter_map(|n| if let OpConfig::ExpertStore(s) = &n.op { Some(s.budget) } else { None }).sum()
}

/// The host pools a placed graph runs in, from its budgets and tiers alone (so a printed graph
/// run again gets the same pools).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPools {
    /// The weights pool (the streaming window), the KV cache, activations.
    pub split: Split,
    /// Weights held in DRAM beyond those (FlexGen's middle tier).
    pub held: u64,
    /// The expert stores' caches.
    pub caches: u64,
}

impl HostPools {
    /// Everything together: what the host tier may hold.
    pub fn total(&self) -> u64 {
        self.split.weights + self.split.kv + self.split.activations + self.held + self.caches
    }
}

/// The host pools of placed graph `g` with `reserve` set aside (see [`HostPools`]); `None`
/// without a budget.
pub fn host_pools(g: &Graph, reserve: &Reserve) -> Result<Option<HostPools>> {
    let caches = cache_bytes(g);
    let split = if g.on_gpu() {
        let Some(b) = g.gpu_budget.or(g.host_budget) else { return Ok(None) };
        let s = split(g, b, reserve, 0)?;
        host_split(g, &s, window_min(g) + s.kv + s.activations)
    } else {
        let Some(b) = g.host_budget else { return Ok(None) };
        let rest = b.checked_sub(caches).filter(|&r| r > 0).ok_or_else(|| {
            Error::Options(format!(
                "the host budget of {b} bytes does not hold the expert caches' {caches} bytes and the rest of the model"
            ))
        })?;
        split(g, rest, reserve, 0)?
    };
    let held =
        g.loaders().flat_map(|(_, l)| (0..l.tensors.len()).filter(|&i| l.held[i]).map(|i| tensor_bytes(l, i))).sum();
    Ok(Some(HostPools { split, held, caches }))
}

/// The host pools' split for a plan's (`split`, `minimum`). On a CPU graph it is the plan's. On
/// a GPU graph the plan fitted GPU memory, and the weights it keeps there are uploaded once and
/// leave the host: the host's weights pool is what the plan streams through (at least one
/// operator's weights at once), so that the streamed copies a GPU holds — each keeps its host
/// buffer — stay within the room the plan left them in GPU memory.
fn host_split(g: &Graph, split: &Split, minimum: u64) -> Split {
    let mut split = *split;
    if g.on_gpu() {
        let one_op = minimum - split.kv - split.activations;
        let kept_on_gpu: u64 = kept_tensors(g)
            .filter(|&(node, port, _)| g.edges_from(node, port).all(|e| reaches_gpu(g, e.to.node)))
            .map(|(_, _, bytes)| bytes)
            .sum();
        split.weights = split.weights.saturating_sub(kept_on_gpu).max(one_op);
    }
    split
}

/// Whether data sent to `node` ends up in a GPU's memory (through a transfer, or there).
fn reaches_gpu(g: &Graph, node: usize) -> bool {
    match g.nodes[node].op {
        OpConfig::ToGpu(_) => true,
        _ => g.memory(node, false).is_some(),
    }
}

fn tensor_bytes(l: &weir_operators::loader::Spec, i: usize) -> u64 {
    held_bytes(l.tensors[i].offset, l.tensors[i].nbytes())
}

/// Every loader tensor: (loader node, port, bytes held, consumers, order).
fn loader_tensors(g: &Graph) -> Vec<(usize, usize, u64, usize, usize)> {
    let mut tensors = Vec::new();
    for (ni, l) in g.loaders() {
        for p in 0..l.tensors.len() {
            tensors.push((ni, p, tensor_bytes(l, p), g.edges_from(ni, p).count(), tensors.len()));
        }
    }
    tensors
}

/// What the hungriest operator holds at once: the sum of the weights it takes.
fn window_min(g: &Graph) -> u64 {
    let tensors = loader_tensors(g);
    let mut per_op: std::collections::HashMap<usize, u64> = Default::default();
    for e in &g.edges {
        if let Some(t) = tensors.iter().find(|t| t.0 == e.from.node && t.1 == e.from.port) {
            *per_op.entry(e.to.node).or_default() += t.2;
        }
    }
    per_op.values().copied().max().unwrap_or(0)
}

/// Fits `g`'s weights into `budget` bytes: sets `reserve` aside, then decides which weights
/// stream (`tier=nvme`) and which stay resident, and records it in the loaders' specs and the
/// weight edges' stickiness. How the loaders then read is the next pass's (`loaders`).
///
/// `prefetch`: how many layers' weights reading may run ahead of compute (`None`: two, up to
/// half the budget).
pub fn fit(g: &mut Graph, budget: u64, prefetch: Option<usize>, reserve: &Reserve) -> Result<Plan> {
    let tensors = loader_tensors(g);
    let window_min = window_min(g);
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
    let outside = |i: usize| g.edges_from(tensors[i].0, tensors[i].1).all(|e| g.nodes[e.to.node].layer.is_none());
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
        if let OpConfig::Load(l) = &mut g.nodes[node].op {
            l.streamed[port] = streamed;
            l.held[port] = false;
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
    Ok(plan)
}

/// The weights a plan keeps (does not stream): loader node, port, and bytes held.
pub fn kept_tensors(g: &Graph) -> impl Iterator<Item = (usize, usize, u64)> + '_ {
    g.loaders().flat_map(|(ni, l)| {
        (0..l.tensors.len()).filter(|&p| !l.streamed[p]).map(move |p| (ni, p, tensor_bytes(l, p))).collect::<Vec<_>>()
    })
}

/// FlexGen's DRAM tier, for a graph whose weights a GPU computes with: of the weights `fit`
/// streams (those not kept in GPU memory), holds in host memory as many as `bytes` allow, in the
/// loaders' order (layer order) — read from storage once, then sent every pass from memory.
/// What is left is read from storage every pass. Records them in `plan`.
pub fn hold(g: &mut Graph, plan: &mut Plan, bytes: u64) {
    let mut left = bytes;
    for n in g.nodes.iter_mut() {
        let OpConfig::Load(l) = &mut n.op else { continue };
        for i in 0..l.tensors.len() {
            let b = held_bytes(l.tensors[i].offset, l.tensors[i].nbytes());
            if l.streamed[i] && !l.held[i] && b <= left {
                l.held[i] = true;
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
    if micro_batches <= 1 {
        return;
    }
    let loaders: Vec<usize> = g.loaders().map(|(i, _)| i).collect();
    for e in g.edges.iter_mut().filter(|e| loaders.contains(&e.from.node) && !e.sticky) {
        e.uses = micro_batches;
    }
}
