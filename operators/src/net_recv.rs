//! Net receive: the consuming end of an edge that comes from another process (see
//! [`crate::net`]). A source: it is ready when a message has arrived (the connection's reader
//! wakes its lane), emits it as the packet it was, its tensors in this process's activation
//! pool, and gives the sender its credit back as it takes it. A connection that ends fails the
//! program here with the cause: the other process stopped or broke.

use crate::net::Wire;
use crate::spec::{Carries, Mem, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::Packet;
use std::sync::Arc;
use weir_runtime::remote::{RemoteError, RemoteRx};
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, ReadyCx, SpanKind, Step};

/// `net_recv edge="…" peer="…" width=N`: what process `peer` sends on edge `edge`; `width`
/// the activations' width it carries (0 for anything else), which the memory plan counts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Spec {
    pub edge: String,
    pub peer: String,
    pub width: usize,
}

impl OpSpec for Spec {
    const KIND: &'static str = "net_recv";
    fn from_params(p: &mut Params) -> Spec {
        Spec { edge: p.string("edge", ""), peer: p.string("peer", ""), width: p.opt_usize("width").unwrap_or(0) }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        vec![
            ("edge", ParamValue::Str(self.edge.clone())),
            ("peer", ParamValue::Str(self.peer.clone())),
            ("width", ParamValue::Int(self.width as i64)),
        ]
    }
    fn inputs(&self) -> Vec<Port> {
        Vec::new()
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::of("y", Carries::Any)]
    }
    fn memories(&self) -> (Mem, Mem) {
        (Mem::Host, Mem::Host)
    }
    fn activation_floats(&self, tokens: usize) -> usize {
        tokens * self.width
    }
    fn instantiate(&self, env: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(NetRecv { spec: self.clone(), rx: crate::net::rx_of(env, &self.edge) })
    }
}

/// See the module doc.
pub struct NetRecv {
    spec: Spec,
    rx: Option<Arc<RemoteRx<Wire>>>,
}

impl Operator<Packet> for NetRecv {
    fn kind(&self) -> &str {
        "net_recv"
    }
    fn span_kind(&self) -> SpanKind {
        SpanKind::Transfer
    }
    fn ready(&mut self, cx: &ReadyCx) -> bool {
        let Some(rx) = &self.rx else { return true };
        if rx.has_message() {
            return true;
        }
        rx.notify_on_arrival(cx.lane);
        rx.has_message()
    }
    fn fire(&mut self, _: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let Spec { edge, peer, .. } = &self.spec;
        let Some(rx) = &self.rx else {
            return Err(OpError::new(format!("edge `{edge}` from process `{peer}` was not connected")));
        };
        match rx.try_recv() {
            None => {}
            Some(Ok(w)) => out.send(0, w.into_packet(cx).map_err(|e| OpError::new(format!("edge `{edge}`: {e}")))?),
            // `main` ended its run cleanly: this worker's run is over (it waits for the next).
            Some(Err(RemoteError::Closed { .. })) if peer == "main" => return Ok(Step::Finished),
            Some(Err(e)) => return Err(OpError::new(format!("edge `{edge}` from process `{peer}`: {e}"))),
        }
        Ok(Step::Continue)
    }
}
