//! One expert of a mixture-of-experts layer: a SwiGLU MLP over the tokens routed to it.
//!
//! Ports: `x` `[tokens, hidden]` f32; `route` (from a router over `experts` experts); `gate`,
//! `up` `[intermediate, hidden]`; `down` `[hidden, intermediate]`. Output: `y`
//! `[tokens, hidden]` — for each token routed to expert `index`, `weight · down(silu(gate(x))
//! · up(x))`; zero for the others. The layer's output is the sum of its experts' outputs (a
//! chain of `add` nodes in the graph), so each expert is its own node: it can sit on its own
//! lane, with its weights in their own tier.
//!
//! An expert served by an expert store may have a *twin* (`twin = true`): the same expert on
//! another lane, which the store sends the weights to instead when the step finishes sooner
//! that way (see `expert_store`). Whichever of the two gets [`Packet::Absent`] weights computes
//! nothing: the expert itself then gives zeros, the twin `Absent` (which an `add` passes over).

use crate::spec::{int, Carries, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{check_act, swiglu, weight_view, Packet};
use weir_runtime::{DType, Emit, FireCx, Inputs, OpError, Operator, Step};

/// An expert node: `expert hidden=… intermediate=… experts=… index=… [twin=false]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub hidden: usize,
    pub intermediate: usize,
    /// The router's experts, and which of them this is.
    pub experts: usize,
    pub index: usize,
    /// The copy `--expert-twins` places on a second lane (printed only when set).
    pub twin: bool,
}

impl OpSpec for Spec {
    const KIND: &'static str = "expert";
    const GPU: bool = true;
    fn from_params(p: &mut Params) -> Spec {
        let (hidden, intermediate, experts) = (p.usize("hidden"), p.usize("intermediate"), p.usize("experts"));
        Spec { hidden, intermediate, experts, index: p.index("index", experts), twin: p.bool("twin", false) }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        let mut v = vec![
            ("hidden", int(self.hidden)),
            ("intermediate", int(self.intermediate)),
            ("experts", int(self.experts)),
            ("index", int(self.index)),
        ];
        v.extend(self.twin.then_some(("twin", ParamValue::Bool(true))));
        v
    }
    fn inputs(&self) -> Vec<Port> {
        let (h, m) = (self.hidden, self.intermediate);
        vec![
            Port::act("x", h),
            Port::of("route", Carries::Route { experts: self.experts }),
            Port::weight("gate", vec![m, h]),
            Port::weight("up", vec![m, h]),
            Port::weight("down", vec![h, m]),
        ]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::act("y", self.hidden)]
    }
    /// Its output, the gathered rows and the MLP's scratch, for every token at most.
    fn activation_floats(&self, tokens: usize) -> usize {
        tokens * (3 * self.hidden + 2 * self.intermediate)
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(self.expert())
    }
    fn instantiate_gpu(&self, _: &OpEnv, _: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(Box::new(GpuExpert(self.expert())))
    }
}

impl Spec {
    fn expert(&self) -> Expert {
        let s = self;
        Expert { hidden: s.hidden, intermediate: s.intermediate, experts: s.experts, index: s.index, twin: s.twin }
    }
}

/// See the module doc.
pub struct Expert {
    pub hidden: usize,
    pub intermediate: usize,
    pub experts: usize,
    pub index: usize,
    pub twin: bool,
}

impl Operator<Packet> for Expert {
    fn kind(&self) -> &str {
        "expert"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let (h, m) = (self.hidden, self.intermediate);
        let (batch, x) = ins.get(0).act("x")?;
        check_act("x", batch, x, h)?;
        let route = self.route(batch, ins.get(1))?;
        let t = batch.tokens();
        let mine = route.tokens_of(self.index);
        let computes = !mine.is_empty() && !matches!(ins.get(2), Packet::Absent);
        if self.twin && !computes {
            out.send(0, Packet::Absent);
            return Ok(Step::Continue);
        }
        let mut y = cx.zeros_f32(vec![t, h])?;
        if computes {
            let (gn, g) = ins.get(2).weight("gate")?;
            let (un, u) = ins.get(3).weight("up")?;
            let (dn, d) = ins.get(4).weight("down")?;
            let (g, u, d) = (weight_view(gn, g, &[m, h])?, weight_view(un, u, &[m, h])?, weight_view(dn, d, &[h, m])?);
            let mut rows = cx.zeros_f32(vec![mine.len(), h])?;
            for (r, &(tok, _)) in rows.f32_mut().chunks_exact_mut(h).zip(&mine) {
                r.copy_from_slice(&x.f32()[tok * h..(tok + 1) * h]);
            }
            let e = swiglu::forward(rows.f32(), mine.len(), g, u, d, h, m, cx)?;
            let yf = y.f32_mut();
            for (r, &(tok, w)) in e.f32().chunks_exact(h).zip(&mine) {
                for (o, v) in yf[tok * h..(tok + 1) * h].iter_mut().zip(r) {
                    *o = v * w;
                }
            }
        }
        out.send(0, Packet::Act { batch: batch.clone(), x: y });
        Ok(Step::Continue)
    }
}

impl Expert {
    /// The router's choices for `batch`'s pass, checked against it and this expert.
    fn route<'a>(&self, batch: &crate::Batch, p: &'a Packet) -> Result<&'a crate::router::Routing, OpError> {
        let Packet::Route { batch: rb, route } = p else {
            return Err(OpError::new("port `route` expected a router's choices"));
        };
        if rb.pass != batch.pass || route.tokens() != batch.tokens() || route.experts != self.experts {
            return Err(OpError::new(format!(
                "port `route` carries pass {} with {} tokens over {} experts; `x` carries pass {} with {} tokens \
                 and this expert is one of {}",
                rb.pass,
                route.tokens(),
                route.experts,
                batch.pass,
                batch.tokens(),
                self.experts
            )));
        }
        Ok(route)
    }
}

/// [`Expert`] on a GPU lane: its tokens' rows gathered, the SwiGLU MLP by cuBLAS, the weighted
/// outputs scattered back into zeros. Its weights are read only when a token comes to it.
pub struct GpuExpert(pub Expert);

impl Operator<Packet> for GpuExpert {
    fn kind(&self) -> &str {
        "expert"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let g = cx.gpu()?;
        let (h, m) = (self.0.hidden, self.0.intermediate);
        let (batch, x) = crate::gpu::act("x", ins.get(0), h)?;
        let route = self.0.route(batch, ins.get(1))?;
        let mine = route.tokens_of(self.0.index);
        let computes = !mine.is_empty() && !matches!(ins.get(2), Packet::Absent);
        if self.0.twin && !computes {
            out.send(0, Packet::Absent);
            return Ok(Step::Continue);
        }
        let mut y = g.alloc(DType::F32, vec![batch.tokens(), h])?;
        g.kernels.zero(&mut y.f32_mut()).map_err(crate::gpu::err)?;
        if computes {
            let gate = crate::gpu::weight("gate", ins.get(2), &[m, h])?;
            let up = crate::gpu::weight("up", ins.get(3), &[m, h])?;
            let down = crate::gpu::weight("down", ins.get(4), &[h, m])?;
            let n = mine.len();
            let idx = g.upload_values(&mine.iter().map(|p| p.0 as i32).collect::<Vec<i32>>())?;
            let w = g.upload_values(&mine.iter().map(|p| p.1).collect::<Vec<f32>>())?;
            let mut rows = g.alloc(DType::F32, vec![n, h])?;
            g.kernels.gather_rows(&x.f32()?, &idx.as_view(), h, &mut rows.f32_mut()).map_err(crate::gpu::err)?;
            let e = swiglu::gpu_forward(g, &rows.f32(), n, gate, up, down, h, m)?;
            g.kernels
                .scatter_rows(&e.f32(), &idx.as_view(), &w.as_view(), h, &mut y.f32_mut())
                .map_err(crate::gpu::err)?;
        }
        out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Routing;
    use crate::testing::*;
    use std::sync::Arc;

    #[test]
    fn only_routed_tokens_get_the_weighted_expert_output() {
        let b = batch(&[(0, 3)]);
        // Token 0 → experts (1, 0); token 1 → (0, 2); token 2 → (2, 1).
        let route =
            Routing { experts: 3, top_k: 2, ids: vec![1, 0, 0, 2, 2, 1], weights: vec![0.7, 0.3, 0.6, 0.4, 0.9, 0.1] };
        let mut op = Expert { hidden: 1, intermediate: 1, experts: 3, index: 1, twin: false };
        let x = [2.0f32, -1.0, 0.5];
        let out = fire(
            &mut op,
            vec![
                act(&b, 1, &x),
                Packet::Route { batch: b.clone(), route: Arc::new(route) },
                weight(vec![1, 1], &[1.5]),
                weight(vec![1, 1], &[-1.0]),
                weight(vec![1, 1], &[3.0]),
            ],
            1,
        )
        .unwrap();
        let y = out[0].as_ref().unwrap().act("y").unwrap().1.f32().to_vec();
        let mlp = |x: f32| 3.0 * (1.5 * x / (1.0 + (-1.5 * x).exp())) * -x;
        let want = [0.7 * mlp(2.0), 0.0, 0.1 * mlp(0.5)];
        for (g, w) in y.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{y:?} vs {want:?}");
        }
    }

    #[test]
    fn without_weights_an_expert_gives_zeros_and_its_twin_gives_absent() {
        let b = batch(&[(0, 2)]);
        let route = || Packet::Route {
            batch: b.clone(),
            route: Arc::new(Routing { experts: 2, top_k: 1, ids: vec![0, 1], weights: vec![1.0, 1.0] }),
        };
        let w = || weight(vec![1, 1], &[1.0]);
        for twin in [false, true] {
            let mut op = Expert { hidden: 1, intermediate: 1, experts: 2, index: 0, twin };
            // Its token routed, but the weights went to the other of the pair.
            let ins = vec![act(&b, 1, &[1.0, 2.0]), route(), Packet::Absent, Packet::Absent, Packet::Absent];
            let out = fire(&mut op, ins, 1).unwrap();
            match (twin, out[0].as_ref().unwrap()) {
                (false, p) => assert_eq!(p.act("y").unwrap().1.f32(), &[0.0, 0.0]),
                (true, p) => assert!(matches!(p, Packet::Absent), "{p:?}"),
            }
            // With its weights, the twin computes like the expert.
            let out = fire(&mut op, vec![act(&b, 1, &[1.0, 2.0]), route(), w(), w(), w()], 1).unwrap();
            let y = out[0].as_ref().unwrap().act("y").unwrap().1.f32().to_vec();
            assert!(y[0] != 0.0 && y[1] == 0.0, "{y:?}");
        }
    }

    #[test]
    fn a_route_from_another_pass_is_refused() {
        let b = batch(&[(0, 1)]);
        let other = Arc::new(crate::Batch { pass: 9, ..(*b).clone() });
        let route = Routing { experts: 2, top_k: 1, ids: vec![0], weights: vec![1.0] };
        let mut op = Expert { hidden: 1, intermediate: 1, experts: 2, index: 0, twin: false };
        let w = || weight(vec![1, 1], &[1.0]);
        let e = fire(
            &mut op,
            vec![act(&b, 1, &[1.0]), Packet::Route { batch: other, route: Arc::new(route) }, w(), w(), w()],
            1,
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("pass 9"), "{e}");
    }
}
