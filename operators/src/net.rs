//! Edges between processes: what a `net_send` node puts on the wire and a `net_recv` node takes
//! off it, and the connections both are given when the program starts.
//!
//! A graph file may put lanes in other processes (`process` statements, `lane … process=NAME`);
//! the placement cuts the graph into one part per process (`weir_graphs::place::processes`),
//! and every edge that crossed becomes a `net_send` node in the producing part and a `net_recv`
//! node in the consuming one, joined by a remote edge ([`weir_runtime::remote`]): a bounded
//! channel whose capacity is counted in credits, so backpressure crosses the wire as it does
//! between two lanes. The packets travel as [`Wire`] messages (bincode 2): activations, token
//! ids, expert choices and sampled tokens with the pass they belong to. Weights never cross
//! (each process reads its own), nor does GPU memory (the placement brings it to the host
//! first), nor a pass that moves KV caches between prefill and decode workers.

use crate::packet::{Batch, LogitsWanted, Packet, Sampling, SeqSlice};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use weir_runtime::remote::{RemoteError, RemoteRx, RemoteTx};
use weir_runtime::{FireCx, OpError, Tensor};

/// One sequence's share of a pass, on the wire.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct WireSeq {
    pub id: u64,
    pub start: u64,
    pub len: u64,
    /// 0 none, 1 skip, 2 last, 3 all ([`LogitsWanted`]).
    pub logits: u8,
    pub temperature: f32,
    pub top_k: u64,
    pub top_p: f32,
    pub seed: u64,
}

/// A pass's description on the wire: what [`Batch`] says but the KV moves of a phase split.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct WireBatch {
    pub pass: u64,
    pub seqs: Vec<WireSeq>,
    pub release: Vec<u64>,
}

/// An f32 tensor on the wire: its shape and its values' little-endian bytes.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct WireTensor {
    pub shape: Vec<u64>,
    pub data: Vec<u8>,
}

/// What travels on an edge between processes.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub enum Wire {
    Tokens { batch: WireBatch, ids: Vec<u32> },
    Act { batch: WireBatch, x: WireTensor },
    Route { batch: WireBatch, experts: u64, top_k: u64, ids: Vec<u32>, weights: Vec<f32> },
    Sampled { batch: WireBatch, tokens: Vec<u32>, logits: Option<WireTensor> },
    Absent,
}

fn logits_code(l: LogitsWanted) -> u8 {
    match l {
        LogitsWanted::None => 0,
        LogitsWanted::Skip => 1,
        LogitsWanted::Last => 2,
        LogitsWanted::All => 3,
    }
}

fn batch_to_wire(b: &Batch) -> Result<WireBatch, OpError> {
    if !b.export.is_empty() || !b.imports.is_empty() {
        return Err(OpError::new(
            "a pass that moves KV caches between prefill and decode workers cannot cross to another process",
        ));
    }
    let seqs = b
        .seqs
        .iter()
        .map(|s| WireSeq {
            id: s.id,
            start: s.start as u64,
            len: s.len as u64,
            logits: logits_code(s.logits),
            temperature: s.sampling.temperature,
            top_k: s.sampling.top_k as u64,
            top_p: s.sampling.top_p,
            seed: s.sampling.seed,
        })
        .collect();
    Ok(WireBatch { pass: b.pass, seqs, release: b.release.clone() })
}

fn batch_from_wire(w: WireBatch) -> Result<Arc<Batch>, OpError> {
    let mut seqs = Vec::with_capacity(w.seqs.len());
    for s in w.seqs {
        let logits = match s.logits {
            0 => LogitsWanted::None,
            1 => LogitsWanted::Skip,
            2 => LogitsWanted::Last,
            3 => LogitsWanted::All,
            n => return Err(OpError::new(format!("sequence {}: logits code {n} is not 0–3", s.id))),
        };
        let sampling = Sampling { temperature: s.temperature, top_k: s.top_k as usize, top_p: s.top_p, seed: s.seed };
        seqs.push(SeqSlice { id: s.id, start: s.start as usize, len: s.len as usize, logits, sampling });
    }
    Ok(Arc::new(Batch { pass: w.pass, seqs, release: w.release, ..Default::default() }))
}

fn tensor_to_wire(t: &Tensor) -> WireTensor {
    let data = t.f32().iter().flat_map(|v| v.to_le_bytes()).collect();
    WireTensor { shape: t.shape.iter().map(|&d| d as u64).collect(), data }
}

fn tensor_from_wire(w: WireTensor, cx: &FireCx) -> Result<Tensor, OpError> {
    let shape: Vec<usize> = w.shape.iter().map(|&d| d as usize).collect();
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n.and_then(|n| n.checked_mul(4)) != Some(w.data.len()) {
        return Err(OpError::new(format!("a tensor of shape {shape:?} came with {} bytes", w.data.len())));
    }
    let mut t = cx.zeros_f32(shape)?;
    for (v, b) in t.f32_mut().iter_mut().zip(w.data.chunks_exact(4)) {
        *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
    Ok(t)
}

impl Wire {
    /// `p` on the wire; an error naming what cannot cross (a weight, GPU memory, KV rows).
    pub fn from_packet(p: &Packet) -> Result<Wire, OpError> {
        Ok(match p {
            Packet::Tokens { batch, ids } => Wire::Tokens { batch: batch_to_wire(batch)?, ids: ids.to_vec() },
            Packet::Act { batch, x } => Wire::Act { batch: batch_to_wire(batch)?, x: tensor_to_wire(x) },
            Packet::Route { batch, route } => Wire::Route {
                batch: batch_to_wire(batch)?,
                experts: route.experts as u64,
                top_k: route.top_k as u64,
                ids: route.ids.clone(),
                weights: route.weights.clone(),
            },
            Packet::Sampled { batch, tokens, logits } => Wire::Sampled {
                batch: batch_to_wire(batch)?,
                tokens: tokens.clone(),
                logits: logits.as_ref().map(tensor_to_wire),
            },
            Packet::Absent => Wire::Absent,
            Packet::Weight { name, .. } | Packet::DevWeight { name, .. } => {
                return Err(OpError::new(format!(
                    "weight `{name}` cannot cross to another process (each reads its own)"
                )))
            }
            Packet::DevAct { .. } => {
                return Err(OpError::new(
                    "activations in GPU memory cannot cross to another process (bring them to the host first)",
                ))
            }
            Packet::Kv { node, .. } => {
                return Err(OpError::new(format!(
                    "KV rows of `{node}` go to a decode worker by `kv_send`, not between a graph's processes"
                )))
            }
        })
    }

    /// The packet again, its tensors in the activation pool of the lane it arrives on.
    pub fn into_packet(self, cx: &FireCx) -> Result<Packet, OpError> {
        Ok(match self {
            Wire::Tokens { batch, ids } => Packet::Tokens { batch: batch_from_wire(batch)?, ids: Arc::new(ids) },
            Wire::Act { batch, x } => Packet::Act { batch: batch_from_wire(batch)?, x: tensor_from_wire(x, cx)? },
            Wire::Route { batch, experts, top_k, ids, weights } => {
                if top_k == 0 || ids.len() != weights.len() || !(ids.len() as u64).is_multiple_of(top_k) {
                    return Err(OpError::new(format!(
                        "expert choices of {} ids and {} weights at top_k {top_k} do not fit together",
                        ids.len(),
                        weights.len()
                    )));
                }
                let route = crate::router::Routing { experts: experts as usize, top_k: top_k as usize, ids, weights };
                Packet::Route { batch: batch_from_wire(batch)?, route: Arc::new(route) }
            }
            Wire::Sampled { batch, tokens, logits } => Packet::Sampled {
                batch: batch_from_wire(batch)?,
                tokens,
                logits: logits.map(|l| tensor_from_wire(l, cx)).transpose()?,
            },
            Wire::Absent => Packet::Absent,
        })
    }
}

/// The connected ends of a process's remote edges, by edge name, for its `net_send` and
/// `net_recv` nodes to take as they are made (the engine connects them before it compiles).
#[derive(Default)]
pub struct NetLinks {
    tx: Mutex<HashMap<String, Arc<RemoteTx<Wire>>>>,
    rx: Mutex<HashMap<String, Arc<RemoteRx<Wire>>>>,
}

impl std::fmt::Debug for NetLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tx: Vec<String> = self.tx.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        let rx: Vec<String> = self.rx.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect();
        f.debug_struct("NetLinks").field("tx", &tx).field("rx", &rx).finish()
    }
}

impl NetLinks {
    /// Adds the sending end of `edge`.
    pub fn add_tx(&self, edge: &str, tx: RemoteTx<Wire>) {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).insert(edge.into(), Arc::new(tx));
    }
    /// Adds the receiving end of `edge`.
    pub fn add_rx(&self, edge: &str, rx: RemoteRx<Wire>) {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).insert(edge.into(), Arc::new(rx));
    }
    fn tx(&self, edge: &str) -> Option<Arc<RemoteTx<Wire>>> {
        self.tx.lock().unwrap_or_else(|p| p.into_inner()).get(edge).cloned()
    }
    fn rx(&self, edge: &str) -> Option<Arc<RemoteRx<Wire>>> {
        self.rx.lock().unwrap_or_else(|p| p.into_inner()).get(edge).cloned()
    }
    /// Whether an edge from `main` has ended cleanly (`main` stopped its run): a worker's run is
    /// over.
    pub fn main_left(&self) -> bool {
        self.rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|r| matches!(r.ended(), Some(RemoteError::Closed { .. })))
    }

    /// Payload bytes sent and received over every edge so far.
    pub fn bytes(&self) -> (u64, u64) {
        let sent = self.tx.lock().unwrap_or_else(|p| p.into_inner()).values().map(|t| t.sent_bytes()).sum();
        let got = self.rx.lock().unwrap_or_else(|p| p.into_inner()).values().map(|r| r.received_bytes()).sum();
        (sent, got)
    }
}

/// The sending end of `edge` in `env`, if the engine connected it.
pub(crate) fn tx_of(env: &crate::OpEnv, edge: &str) -> Option<Arc<RemoteTx<Wire>>> {
    env.net.as_ref().and_then(|n| n.tx(edge))
}

/// The receiving end of `edge` in `env`, if the engine connected it.
pub(crate) fn rx_of(env: &crate::OpEnv, edge: &str) -> Option<Arc<RemoteRx<Wire>>> {
    env.net.as_ref().and_then(|n| n.rx(edge))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_crosses_and_comes_back_the_same() {
        let seq = |id, logits| SeqSlice {
            id,
            start: 3,
            len: 2,
            logits,
            sampling: Sampling { temperature: 0.7, top_k: 5, top_p: 0.9, seed: 11 },
        };
        let batch = Arc::new(Batch {
            pass: 9,
            seqs: vec![seq(1, LogitsWanted::All), seq(2, LogitsWanted::Skip)],
            release: vec![4],
            ..Default::default()
        });
        let w = batch_to_wire(&batch).unwrap();
        let back = batch_from_wire(w.clone()).unwrap();
        assert_eq!(batch_to_wire(&back).unwrap(), w);
        assert_eq!(back.tokens(), 4);
        let bytes =
            bincode::encode_to_vec(&Wire::Tokens { batch: w, ids: vec![1, 2, 3, 4] }, bincode::config::standard())
                .unwrap();
        let (again, _): (Wire, usize) = bincode::decode_from_slice(&bytes, bincode::config::standard()).unwrap();
        assert!(matches!(again, Wire::Tokens { ref ids, .. } if ids == &[1, 2, 3, 4]));
    }

    #[test]
    fn what_cannot_cross_is_refused_by_name() {
        let w = Tensor::from_f32(vec![1], &[0.0]);
        let e = Wire::from_packet(&Packet::Weight { name: "model.norm.weight".into(), w }).unwrap_err();
        assert!(e.to_string().contains("model.norm.weight"), "{e}");
        let bad = WireBatch {
            pass: 1,
            seqs: vec![WireSeq { id: 7, start: 0, len: 1, logits: 9, temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }],
            release: vec![],
        };
        let e = batch_from_wire(bad).unwrap_err();
        assert!(e.to_string().contains("sequence 7"), "{e}");
    }
}
