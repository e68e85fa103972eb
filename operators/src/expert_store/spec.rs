//! An expert store's node: its parameters, ports and the costs its twin decision is made from.

use super::ExpertStore;
use crate::loader::{IoMode, TensorSource};
use crate::offload::{Costs, LaneCost, LinkCost};
use crate::spec::{Carries, Mem, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::Packet;
use weir_runtime::Operator;

/// An expert store node: `expert_store experts=… budget=… [cache=true] [hint=false]
/// [prior=p0,p1,…] [twins=false own_fixed_s=… own_per_token_s=… own_upload_s=…
/// twin_fixed_s=… twin_per_token_s=… twin_upload_s=…]`, on an nvme lane. The expert placement
/// (`--expert-budget`) makes one per MoE layer; a graph file may write it (`weir graph show`
/// does). Which experts it serves, and their tensors, come from the `weight … store=NAME`
/// statements that name it (`served`, `tensors`: set by the checker, ascending by expert); its
/// reads follow its lane (`mode`).
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub served: Vec<usize>,
    /// The router's experts.
    pub experts: usize,
    /// Gate, up, down of each served expert, in `served` order.
    pub tensors: Vec<TensorSource>,
    pub mode: IoMode,
    /// How often each of the router's experts was chosen per token in calibration (0 if
    /// unknown): the cache's starting popularity.
    pub prior: Vec<f64>,
    /// The pool's bytes: the cache, and the room its reads need.
    pub budget: u64,
    /// Keep what it reads (false: read every chosen expert every time, the baseline).
    pub cache: bool,
    /// A second input, `hint`, takes a prediction of the route; the store reads ahead what it
    /// names.
    pub hinted: bool,
    /// Each served expert has a twin on another lane, and the store chooses per pass which of
    /// the two computes it, from these costs.
    pub twins: Option<TwinCosts>,
}

/// One lane's cost of one expert, measured at start-up (`weir::costs`).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LaneTiming {
    /// Seconds to compute an expert over `t` tokens: `fixed_s + per_token_s × t`.
    pub fixed_s: f64,
    pub per_token_s: f64,
    /// For a lane that takes the weights moved to it (a GPU): seconds to move one expert's
    /// weights there from host memory. `None`: the lane reads the store's memory in place.
    pub upload_s: Option<f64>,
}

/// What the twin decision is made from: the experts' own lane and the twins' lane.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct TwinCosts {
    pub own: LaneTiming,
    pub twin: LaneTiming,
}

impl TwinCosts {
    /// The decision's costs: lane 0 the experts' own, lane 1 the twins'; tier 0 the store's
    /// memory, which a lane without an upload cost reads in place and one with it has moved.
    pub fn costs(&self) -> Costs {
        let mut c = Costs::default();
        for (i, (name, t)) in
            [("the experts' own lane", self.own), ("the twins' lane", self.twin)].into_iter().enumerate()
        {
            c.lanes.push(LaneCost {
                name: name.into(),
                fixed_s: t.fixed_s,
                per_token_s: t.per_token_s,
                busy_s: 0.0,
                reads: if t.upload_s.is_some() { vec![] } else { vec![0] },
            });
            if let Some(s) = t.upload_s {
                c.links.push(LinkCost { from: 0, to: i, per_expert_s: s });
            }
        }
        c
    }
}

impl OpSpec for Spec {
    const KIND: &'static str = "expert_store";
    fn from_params(p: &mut Params) -> Spec {
        let experts = p.usize("experts");
        let budget = p.usize("budget") as u64;
        let (cache, hinted, prior) = (p.bool("cache", true), p.bool("hint", false), p.f64_list("prior", experts));
        let twins = p.bool("twins", false).then(|| {
            let mut lane = |fixed: &'static str, per_token: &'static str, upload: &'static str| LaneTiming {
                fixed_s: p.f64(fixed, None),
                per_token_s: p.f64(per_token, None),
                upload_s: p.opt_seconds(upload),
            };
            let own = lane("own_fixed_s", "own_per_token_s", "own_upload_s");
            TwinCosts { own, twin: lane("twin_fixed_s", "twin_per_token_s", "twin_upload_s") }
        });
        let mode = IoMode::Uring { depth: 8, chunk: 1 << 20, ahead: false };
        Spec { served: Vec::new(), experts, tensors: Vec::new(), mode, prior, budget, cache, hinted, twins }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        use ParamValue::{Bool, Float, Int};
        let mut v = vec![("experts", Int(self.experts as i64)), ("budget", Int(self.budget as i64))];
        v.push(("cache", Bool(self.cache)));
        v.extend(self.hinted.then_some(("hint", Bool(true))));
        if self.prior.iter().any(|&p| p != 0.0) {
            v.push(("prior", ParamValue::List(self.prior.iter().map(|&p| Float(p)).collect())));
        }
        if let Some(t) = &self.twins {
            let up = |s: Option<f64>| s.map_or(ParamValue::None, Float);
            v.extend([
                ("twins", Bool(true)),
                ("own_fixed_s", Float(t.own.fixed_s)),
                ("own_per_token_s", Float(t.own.per_token_s)),
                ("own_upload_s", up(t.own.upload_s)),
                ("twin_fixed_s", Float(t.twin.fixed_s)),
                ("twin_per_token_s", Float(t.twin.per_token_s)),
                ("twin_upload_s", up(t.twin.upload_s)),
            ]);
        }
        v
    }
    fn inputs(&self) -> Vec<Port> {
        let route = Carries::Route { experts: self.experts };
        let mut v = vec![Port::of("route", route.clone())];
        if self.hinted {
            v.push(Port::of("hint", route));
        }
        v
    }
    /// Per served expert: its gate, up and down, then (with twins) its twin's.
    fn outputs(&self) -> Vec<Port> {
        let weight = |t: &TensorSource, twin: bool| {
            let name = if twin { format!("{} (twin)", t.name) } else { t.name.clone() };
            Port::weight(&name, t.shape.clone())
        };
        let sides: &[bool] = if self.twins.is_some() { &[false, true] } else { &[false] };
        self.tensors
            .chunks(3)
            .flat_map(|w| sides.iter().flat_map(move |&twin| w.iter().map(move |t| weight(t, twin))))
            .collect()
    }
    /// It reads into host memory wherever it runs.
    fn memories(&self) -> (Mem, Mem) {
        (Mem::Host, Mem::Host)
    }
    fn instantiate(&self, env: &OpEnv, layer: Option<u32>) -> Box<dyn Operator<Packet>> {
        let name = format!("experts l{}", layer.unwrap_or(0));
        let pool = weir_runtime::Pool::with(&name, self.budget as usize, true, env.host_meter.as_ref());
        let prior = self.served.iter().map(|&e| self.prior.get(e).copied().unwrap_or(0.0)).collect();
        let mut s = ExpertStore::new(
            self.served.clone(),
            self.experts,
            self.tensors.clone(),
            self.mode,
            pool,
            prior,
            self.cache,
            env.expert_cache.clone(),
            self.twins.map(|t| t.costs()),
        );
        s.count_into(env.disk_bytes.clone());
        Box::new(s)
    }
}
