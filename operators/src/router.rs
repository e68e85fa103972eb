//! Mixture-of-experts router: which experts each token goes to, and with what weight.
//!
//! Ports: `x` `[tokens, hidden]` f32; `weight` `[experts, hidden]`. Output: `route` — for
//! every token its `top_k` experts (highest probability first, ties to the lower id) and their
//! weights. The router logits are `weight · x`; probabilities are their softmax over all
//! experts in f32; with `normalize` (Mixtral, Qwen2-MoE's `norm_topk_prob`) the chosen
//! probabilities are rescaled to sum to 1, otherwise they are used as they are.
//!
//! Every firing is counted in the engine's [`RoutingStats`] (per layer and expert), which
//! `--expert-stats` writes out for placement to read — except a router that is a *hint*: a
//! later layer's router applied to an earlier hidden state, predicting which experts that
//! layer will choose so its expert store can read them ahead (see `expert_store`).

use crate::spec::{int, Carries, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{check_act, weight_view, Packet};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, Step};

/// A router node: `router hidden=… experts=… top_k=… [normalize=true] [hint=false]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub hidden: usize,
    pub experts: usize,
    pub top_k: usize,
    pub normalize: bool,
    /// A prediction of a later layer's choices for its expert store, not counted in the routing
    /// statistics (the expert placement adds these; printed only when set).
    pub hint: bool,
}

impl OpSpec for Spec {
    const KIND: &'static str = "router";
    const GPU: bool = true;
    fn from_params(p: &mut Params) -> Spec {
        let (hidden, experts, top_k) = (p.usize("hidden"), p.usize("experts"), p.usize("top_k"));
        if top_k > experts {
            p.error(Some("top_k"), format!("`top_k` ({top_k}) exceeds `experts` ({experts})"));
        }
        Spec { hidden, experts, top_k, normalize: p.bool("normalize", true), hint: p.bool("hint", false) }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        let mut v = vec![
            ("hidden", int(self.hidden)),
            ("experts", int(self.experts)),
            ("top_k", int(self.top_k)),
            ("normalize", ParamValue::Bool(self.normalize)),
        ];
        v.extend(self.hint.then_some(("hint", ParamValue::Bool(true))));
        v
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port::act("x", self.hidden), Port::weight("weight", vec![self.experts, self.hidden])]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::of("route", Carries::Route { experts: self.experts })]
    }
    /// The logits.
    fn activation_floats(&self, tokens: usize) -> usize {
        tokens * self.experts
    }
    fn instantiate(&self, env: &OpEnv, layer: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(self.router(env, layer))
    }
    fn instantiate_gpu(&self, env: &OpEnv, layer: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(Box::new(GpuRouter(self.router(env, layer))))
    }
}

impl Spec {
    fn router(&self, env: &OpEnv, layer: Option<u32>) -> Router {
        let s = self;
        let (hidden, experts, top_k, normalize, hint) = (s.hidden, s.experts, s.top_k, s.normalize, s.hint);
        Router { hidden, experts, top_k, normalize, hint, layer: layer.unwrap_or(0), stats: env.routing.clone() }
    }
}

/// The experts chosen for every token of a pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Experts the router chose from.
    pub experts: usize,
    /// Experts per token.
    pub top_k: usize,
    /// `[tokens, top_k]` expert ids, highest probability first.
    pub ids: Vec<u32>,
    /// `[tokens, top_k]` the weight each chosen expert's output is scaled by.
    pub weights: Vec<f32>,
}

impl Routing {
    /// Tokens routed.
    pub fn tokens(&self) -> usize {
        self.ids.len().checked_div(self.top_k).unwrap_or(0)
    }
    /// The tokens sent to expert `e`, each with its weight, in token order.
    pub fn tokens_of(&self, e: usize) -> Vec<(usize, f32)> {
        let k = self.top_k;
        (0..self.tokens())
            .filter_map(|t| (0..k).find(|&j| self.ids[t * k + j] as usize == e).map(|j| (t, self.weights[t * k + j])))
            .collect()
    }
}

/// One token's choice, as recorded when the engine logs routes.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteRecord {
    /// The router's layer tag.
    pub layer: u32,
    /// The sequence.
    pub seq: u64,
    /// The token's position in its sequence.
    pub position: usize,
    /// Its experts, highest probability first.
    pub experts: Vec<u32>,
}

/// How often each expert of each layer was chosen; shared by every router of an engine.
#[derive(Debug, Default)]
pub struct RoutingStats {
    /// Layer → (tokens routed, times each expert was chosen).
    counts: Mutex<BTreeMap<u32, (u64, Vec<u64>)>>,
    /// Every token's choice, when asked for (tests, analysis).
    log: Mutex<Option<Vec<RouteRecord>>>,
}

impl RoutingStats {
    /// Statistics that also keep every token's choice.
    pub fn logging() -> RoutingStats {
        RoutingStats { log: Mutex::new(Some(Vec::new())), ..Default::default() }
    }
    /// Per layer: tokens routed and the times each expert was chosen.
    pub fn counts(&self) -> BTreeMap<u32, (u64, Vec<u64>)> {
        self.counts.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    /// Per layer: how often each expert was chosen per token routed (what expert placement
    /// ranks experts by).
    pub fn popularity(&self) -> std::collections::HashMap<u32, Vec<f64>> {
        self.counts()
            .into_iter()
            .map(|(layer, (tokens, chosen))| (layer, chosen.iter().map(|&c| c as f64 / tokens.max(1) as f64).collect()))
            .collect()
    }
    /// Every token's choice so far (empty unless made with [`RoutingStats::logging`]).
    pub fn log(&self) -> Vec<RouteRecord> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default()
    }
    /// Adds counts read from a file (or another run) to these.
    pub fn merge(&self, layer: u32, tokens: u64, chosen: &[u64]) {
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let entry = c.entry(layer).or_insert_with(|| (0, vec![0; chosen.len()]));
        if entry.1.len() < chosen.len() {
            entry.1.resize(chosen.len(), 0);
        }
        entry.0 += tokens;
        for (a, b) in entry.1.iter_mut().zip(chosen) {
            *a += b;
        }
    }
    fn record(&self, layer: u32, batch: &crate::Batch, r: &Routing) {
        let mut chosen = vec![0u64; r.experts];
        for &e in &r.ids {
            chosen[e as usize] += 1;
        }
        self.merge(layer, r.tokens() as u64, &chosen);
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(log) = log.as_mut() {
            let mut t = 0;
            for s in &batch.seqs {
                for position in s.start..s.start + s.len {
                    log.push(RouteRecord {
                        layer,
                        seq: s.id,
                        position,
                        experts: r.ids[t * r.top_k..(t + 1) * r.top_k].to_vec(),
                    });
                    t += 1;
                }
            }
        }
    }
}

/// Softmax over `logits` in f32, then the `k` largest probabilities (ties to the lower index),
/// rescaled to sum to 1 if `normalize`. Returns (ids, weights), highest first.
pub fn top_k(logits: &[f32], k: usize, normalize: bool) -> (Vec<u32>, Vec<f32>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Stable sort: equal probabilities keep the lower id first.
    order.sort_by(|&a, &b| exp[b].total_cmp(&exp[a]));
    let ids: Vec<u32> = order[..k].iter().map(|&e| e as u32).collect();
    let mut w: Vec<f32> = order[..k].iter().map(|&e| exp[e] / sum).collect();
    if normalize {
        let s: f32 = w.iter().sum();
        w.iter_mut().for_each(|v| *v /= s);
    }
    (ids, w)
}

/// See the module doc.
pub struct Router {
    pub hidden: usize,
    pub experts: usize,
    pub top_k: usize,
    pub normalize: bool,
    /// The layer tag of the node (statistics are kept per layer).
    pub layer: u32,
    /// A prediction, not a routing: not counted.
    pub hint: bool,
    pub stats: Arc<RoutingStats>,
}

impl Operator<Packet> for Router {
    fn kind(&self) -> &str {
        "router"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let (h, e) = (self.hidden, self.experts);
        let (wn, w) = ins.get(1).weight("weight")?;
        let w = weight_view(wn, w, &[e, h])?;
        let (batch, x) = ins.get(0).act("x")?;
        check_act("x", batch, x, h)?;
        let t = batch.tokens();
        let mut logits = cx.zeros_f32(vec![t, e])?;
        weir_kernels::matmul::matmul(x.f32(), t, w, e, None, logits.f32_mut(), cx.par);
        let route = self.route(batch, logits.f32());
        out.send(0, Packet::Route { batch: batch.clone(), route: Arc::new(route) });
        Ok(Step::Continue)
    }
}

impl Router {
    /// The route from the logits (`[tokens, experts]`), counted unless this is a hint.
    fn route(&self, batch: &crate::Batch, logits: &[f32]) -> Routing {
        let t = batch.tokens();
        let (mut ids, mut weights) = (Vec::with_capacity(t * self.top_k), Vec::with_capacity(t * self.top_k));
        for row in logits.chunks_exact(self.experts) {
            let (i, w) = top_k(row, self.top_k, self.normalize);
            ids.extend(i);
            weights.extend(w);
        }
        let route = Routing { experts: self.experts, top_k: self.top_k, ids, weights };
        if !self.hint {
            self.stats.record(self.layer, batch, &route);
        }
        route
    }
}

/// [`Router`] on a GPU lane: the logits by cuBLAS, brought to the host (`experts` floats a
/// token, waiting for the lane's stream), where the softmax and top-k run as on the CPU: the
/// route is a host value, read by the experts' lanes and the expert stores wherever they are.
pub struct GpuRouter(pub Router);

impl Operator<Packet> for GpuRouter {
    fn kind(&self) -> &str {
        "router"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let g = cx.gpu()?;
        let (h, e) = (self.0.hidden, self.0.experts);
        let (w, we) = crate::gpu::weight("weight", ins.get(1), &[e, h])?;
        let (batch, x) = crate::gpu::act("x", ins.get(0), h)?;
        let t = batch.tokens();
        let logits = crate::gpu::linear(g, &x.f32()?, t, w, we, e, None)?.freeze();
        let mut bytes = vec![0u8; t * e * 4];
        g.download(&logits, &mut bytes)?;
        let logits: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let route = self.0.route(batch, &logits);
        out.send(0, Packet::Route { batch: batch.clone(), route: Arc::new(route) });
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn top_k_takes_the_largest_probabilities_and_normalises_when_asked() {
        let logits = [0.5f32, 2.0, -1.0, 1.0];
        let (ids, w) = top_k(&logits, 2, false);
        assert_eq!(ids, vec![1, 3]);
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        assert!((w[0] as f64 - 2f64.exp() / z).abs() < 1e-6);
        assert!((w[1] as f64 - 1f64.exp() / z).abs() < 1e-6);
        let (ids, w) = top_k(&logits, 2, true);
        assert_eq!(ids, vec![1, 3]);
        assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
        assert!((w[0] as f64 - 2f64.exp() / (2f64.exp() + 1f64.exp())).abs() < 1e-6);
        // Ties go to the lower id; huge logits stay finite.
        let (ids, _) = top_k(&[3.0, 5.0, 5.0, 6.0], 3, true);
        assert_eq!(ids, vec![3, 1, 2]);
        let (ids, w) = top_k(&[3.0, 5.0, 5.0, 1e4], 2, true);
        assert_eq!(ids[0], 3);
        assert!(w.iter().all(|v| v.is_finite()) && (w[0] - 1.0).abs() < 1e-6, "{w:?}");
    }

    #[test]
    fn the_router_routes_every_token_and_counts_the_choices() {
        let b = batch(&[(0, 2), (5, 1)]);
        let stats = Arc::new(RoutingStats::logging());
        let mut op =
            Router { hidden: 2, experts: 3, top_k: 2, normalize: true, layer: 4, hint: false, stats: stats.clone() };
        // Expert e's logit is x · row e.
        let w = weight(vec![3, 2], &[1.0, 0.0, 0.0, 1.0, -1.0, -1.0]);
        let x = act(&b, 2, &[2.0, 1.0, 0.0, 3.0, -2.0, -2.0]);
        let out = fire(&mut op, vec![x, w], 1).unwrap();
        let Some(Packet::Route { route, .. }) = &out[0] else { panic!("no route") };
        assert_eq!(route.ids, vec![0, 1, 1, 0, 2, 0]);
        assert_eq!(route.tokens_of(0).iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(route.tokens_of(2).len(), 1);
        let counts = stats.counts();
        assert_eq!(counts[&4], (3, vec![3, 2, 1]));
        let log = stats.log();
        assert_eq!(log.len(), 3);
        assert_eq!((log[2].seq, log[2].position, log[2].experts.clone()), (1, 5, vec![2, 0]));
    }
}
