//! KV send: the keys and values an exporting attention node stored, sent to each sequence's
//! decode worker over its remote edge (`kv_link`). A sink: it has no outputs. It waits for
//! the edge's credits — the decode worker's bound — so it belongs on an I/O lane of its own
//! (the placement puts it on `kvnet`), where waiting stalls only the KV path, and attention
//! behind it once its edge is full: backpressure across the wire.
//!
//! A send that fails is recorded on the sequence's route, not raised: one decode worker lost
//! fails its own requests (the prefill side's scheduler reads the route), never the program.

use crate::kv_link::KvMsg;
use crate::spec::{Carries, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::Packet;
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, SpanKind, Step};

/// `kv_send`, fed by an attention node's `kv` output (`attention … export=true`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Spec;

impl OpSpec for Spec {
    const KIND: &'static str = "kv_send";
    fn from_params(_: &mut Params) -> Spec {
        Spec
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        Vec::new()
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port::of("kv", Carries::Kv)]
    }
    fn outputs(&self) -> Vec<Port> {
        Vec::new()
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(KvSend)
    }
}

/// See the module doc.
pub struct KvSend;

impl Operator<Packet> for KvSend {
    fn kind(&self) -> &str {
        "kv_send"
    }
    fn span_kind(&self) -> SpanKind {
        SpanKind::Transfer
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, _: &mut Emit<Packet>, _: &FireCx) -> Result<Step, OpError> {
        let Packet::Kv { node, rows, .. } = ins.take(0) else {
            return Err(OpError::new("port `kv` expected KV cache rows (from an attention node with export=true)"));
        };
        for r in rows {
            let msg = KvMsg::Rows {
                handle: r.route.handle,
                node: node.to_string(),
                start: r.start as u32,
                len: r.len as u32,
                keys: r.keys,
                values: r.values,
            };
            if let Err(e) = r.route.send(msg) {
                tracing::warn!("KV rows of `{node}` for handle {} not sent: {e}", r.route.handle);
            }
        }
        Ok(Step::Continue)
    }
}
