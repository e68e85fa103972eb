//! Net send: the producing end of an edge that crosses to another process (see [`crate::net`]).
//! A sink: each packet goes on the wire once the receiving process has given a credit, so a
//! slow consumer over there stalls the producer here within the edge's capacity. It waits for
//! credits without blocking its lane (it is not ready until one comes back), and writing the
//! bytes takes the lane for as long as the socket does: the cut puts it on an I/O lane, `net`.

use crate::net::Wire;
use crate::spec::{Carries, Mem, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::Packet;
use std::sync::Arc;
use weir_runtime::remote::RemoteTx;
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, ReadyCx, SpanKind, Step};

/// `net_send edge="…" peer="…"`: sends what comes in on edge `edge` to process `peer`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Spec {
    /// The edge's name, which both processes' handshakes carry.
    pub edge: String,
    /// The process it goes to.
    pub peer: String,
}

impl OpSpec for Spec {
    const KIND: &'static str = "net_send";
    fn from_params(p: &mut Params) -> Spec {
        Spec { edge: p.string("edge", ""), peer: p.string("peer", "") }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        vec![("edge", ParamValue::Str(self.edge.clone())), ("peer", ParamValue::Str(self.peer.clone()))]
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port::of("x", Carries::Any)]
    }
    fn outputs(&self) -> Vec<Port> {
        Vec::new()
    }
    fn memories(&self) -> (Mem, Mem) {
        (Mem::Host, Mem::Host)
    }
    fn instantiate(&self, env: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(NetSend { spec: self.clone(), tx: crate::net::tx_of(env, &self.edge) })
    }
}

/// See the module doc.
pub struct NetSend {
    spec: Spec,
    tx: Option<Arc<RemoteTx<Wire>>>,
}

impl Operator<Packet> for NetSend {
    fn kind(&self) -> &str {
        "net_send"
    }
    fn span_kind(&self) -> SpanKind {
        SpanKind::Transfer
    }
    fn ready(&mut self, cx: &ReadyCx) -> bool {
        let Some(tx) = &self.tx else { return true };
        let go = |tx: &RemoteTx<Wire>| tx.has_room() || tx.failed().is_some();
        if go(tx) {
            return true;
        }
        tx.notify_on_credit(cx.lane);
        go(tx)
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, _: &mut Emit<Packet>, _: &FireCx) -> Result<Step, OpError> {
        let Spec { edge, peer } = &self.spec;
        let Some(tx) = &self.tx else {
            return Err(OpError::new(format!("edge `{edge}` to process `{peer}` was not connected")));
        };
        let wire = Wire::from_packet(&ins.take(0)).map_err(|e| OpError::new(format!("edge `{edge}`: {e}")))?;
        tx.send(&wire).map_err(|e| OpError::new(format!("edge `{edge}` to process `{peer}`: {e}")))?;
        Ok(Step::Continue)
    }
}
