//! KV caches moving between workers (Splitwise's phase split): what a prefill worker sends,
//! where it sends it, and how a decode worker takes it into its paged cache.
//!
//! A prefill worker's attention operators, with `export=true`, emit the keys and values they
//! have just stored for the sequences the pass marks for export (`Batch::export`) — a layer's
//! rows as soon as that layer's attention has run, while the next layers compute. A `kv_send`
//! node takes them to the sequence's [`KvRoute`]: a remote edge ([`weir_runtime::remote`]) to
//! the decode worker, tagged with the handle the decode worker gave the request. When the
//! prompt is done, the prefill worker's scheduler sends the first token ([`KvMsg::First`]).
//!
//! The decode worker reserved the sequence's whole length when the request was routed; its
//! [`KvImport`] writes the rows that arrive straight into KV blocks from its KV pool, in the
//! layout its attention operators keep (blocks of [`KV_BLOCK_TOKENS`] positions, keys then
//! values, in the cache's element type). Once every attention node has every prompt position
//! and the first token has come, the scheduler puts the sequence into a pass with the import
//! (`Batch::imports`); each attention operator takes its blocks as the sequence's cache, and
//! decoding goes on from the first token.

use crate::attention::{kv_block_bytes, KV_BLOCK_TOKENS};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use weir_kernels::attention::KvType;
use weir_runtime::remote::{RemoteError, RemoteTx};
use weir_runtime::{DType, Pool, Tensor};

/// What travels on the KV edge from a prefill worker to a decode worker.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub enum KvMsg {
    /// Positions `start..start + len` of one attention node's cache of one request: its keys,
    /// then its values, each `[len, kv_heads·head_dim]` in the cache's element type
    /// (little-endian bytes).
    Rows { handle: u64, node: String, start: u32, len: u32, keys: Vec<u8>, values: Vec<u8> },
    /// The prompt is done: its length, and the first token, sampled by the prefill worker at
    /// `sampled_unix_ns` (its wall clock: the decode worker measures the transfer's time past
    /// the prefill against it, which means something where both share a clock — one box, or
    /// synchronised ones).
    First { handle: u64, prompt_len: u32, token: u32, sampled_unix_ns: u64 },
    /// The prefill failed: the decode worker ends the request with this reason.
    Abort { handle: u64, reason: String },
}

impl KvMsg {
    /// The request the message belongs to.
    pub fn handle(&self) -> u64 {
        match self {
            KvMsg::Rows { handle, .. } | KvMsg::First { handle, .. } | KvMsg::Abort { handle, .. } => *handle,
        }
    }
}

/// Now, in nanoseconds since the UNIX epoch.
pub fn unix_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The name of the KV edge in the handshake.
pub const KV_EDGE: &str = "kv";

/// What both ends of a KV edge must agree on: every attention node (name, `kv_heads·head_dim`)
/// in graph order, the cache's element type and block size.
pub fn kv_fingerprint(nodes: &[(String, usize)], ty: KvType) -> String {
    let nodes: Vec<String> = nodes.iter().map(|(n, d)| format!("{n}:{d}")).collect();
    format!("kv={} block={KV_BLOCK_TOKENS} attention={}", ty.name(), nodes.join(","))
}

/// Where one sequence's KV cache goes: the connection to its decode worker, and the handle
/// the decode worker knows the request by. Travels in the batch, so the rows of a pass find
/// their way however late their `kv_send` fires.
///
/// Layer by layer (the default), each message goes as it comes. In bulk ([`KvRoute::bulk`]),
/// the rows are held until every attention node has the whole prompt and the first token has
/// come, then sent together: one transfer after prefill, which can be cheaper for short prompts.
pub struct KvRoute {
    pub tx: KvLink,
    pub handle: u64,
    failed: Mutex<Option<RemoteError>>,
    bulk: Option<Mutex<Bulk>>,
}

/// Messages held for a bulk transfer.
struct Bulk {
    nodes: usize,
    held: Vec<KvMsg>,
    rows: HashMap<String, usize>,
    prompt_len: Option<usize>,
}

impl Bulk {
    fn complete(&self) -> bool {
        self.prompt_len.is_some_and(|n| self.rows.len() == self.nodes && self.rows.values().all(|r| *r >= n))
    }
}

/// Where a route's messages go: over a remote edge to another process, or straight to a decode
/// engine's imports in this one (two engines on different lanes of one box).
#[derive(Clone)]
pub enum KvLink {
    Remote(Arc<RemoteTx<KvMsg>>),
    /// In-process: each message is written into the import as it is sent, so nothing queues
    /// (the edge's bound is the sender's own message).
    Local(Arc<KvImports>),
}

impl KvLink {
    fn send(&self, msg: &KvMsg) -> Result<(), RemoteError> {
        match self {
            KvLink::Remote(tx) => tx.send(msg),
            KvLink::Local(imports) => {
                imports.deliver(LOCAL_PEER, Ok(msg.clone()));
                Ok(())
            }
        }
    }
    fn peer(&self) -> &str {
        match self {
            KvLink::Remote(tx) => tx.peer(),
            KvLink::Local(_) => LOCAL_PEER,
        }
    }
}

/// The peer name of an in-process KV link.
pub const LOCAL_PEER: &str = "in-process";

impl std::fmt::Debug for KvRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvRoute(to {}, handle {})", self.tx.peer(), self.handle)
    }
}

impl KvRoute {
    /// A route that sends each message as it comes.
    pub fn new(tx: KvLink, handle: u64) -> KvRoute {
        KvRoute { tx, handle, failed: Mutex::new(None), bulk: None }
    }
    /// A route that holds the rows of `nodes` attention nodes and sends them all once the
    /// prompt is done.
    pub fn bulk(tx: KvLink, handle: u64, nodes: usize) -> KvRoute {
        let b = Bulk { nodes, held: Vec::new(), rows: HashMap::new(), prompt_len: None };
        KvRoute { bulk: Some(Mutex::new(b)), ..KvRoute::new(tx, handle) }
    }
    /// Sends `msg` (or holds it, in bulk) unless an earlier send failed; records the failure
    /// (the request then fails on the prefill side, and the decode side sees the connection
    /// end).
    pub fn send(&self, msg: KvMsg) -> Result<(), RemoteError> {
        if let Some(e) = self.failure() {
            return Err(e);
        }
        let Some(bulk) = &self.bulk else { return self.put(&msg) };
        let mut b = bulk.lock().unwrap_or_else(|p| p.into_inner());
        match &msg {
            KvMsg::Rows { node, start, len, .. } => {
                let r = b.rows.entry(node.clone()).or_default();
                *r = (*r).max((start + len) as usize);
            }
            KvMsg::First { prompt_len, .. } => b.prompt_len = Some(*prompt_len as usize),
            KvMsg::Abort { .. } => {
                b.held.clear();
                return self.put(&msg);
            }
        }
        b.held.push(msg);
        if !b.complete() {
            return Ok(());
        }
        // The first token last, after every row.
        let held = std::mem::take(&mut b.held);
        let (first, rows): (Vec<KvMsg>, Vec<KvMsg>) = held.into_iter().partition(|m| matches!(m, KvMsg::First { .. }));
        rows.iter().chain(&first).try_for_each(|m| self.put(m))
    }
    fn put(&self, msg: &KvMsg) -> Result<(), RemoteError> {
        self.tx.send(msg).inspect_err(|e| {
            if let Ok(mut f) = self.failed.lock() {
                f.get_or_insert(e.clone());
            }
        })
    }
    /// The first send that failed, if one has.
    pub fn failure(&self) -> Option<RemoteError> {
        self.failed.lock().ok().and_then(|f| f.clone())
    }
}

/// One sequence's rows of one attention node, as attention emits them for `kv_send`.
#[derive(Debug, Clone)]
pub struct KvRows {
    pub route: Arc<KvRoute>,
    pub start: usize,
    pub len: usize,
    pub keys: Vec<u8>,
    pub values: Vec<u8>,
}

/// Where an import stands.
#[derive(Debug, Clone, PartialEq)]
pub enum ImportState {
    /// Rows still to come.
    Pending,
    /// Every node has the prompt's positions: the prompt's length and the first token.
    Ready { prompt_len: usize, first: u32 },
    /// The prefill worker or the connection failed.
    Failed(String),
}

#[derive(Default)]
struct Node {
    blocks: Vec<Tensor>,
    rows: usize,
    taken: bool,
}

struct Inner {
    nodes: HashMap<String, Node>,
    first: Option<(usize, u32)>,
    /// When the prefill worker sampled the first token, and when the import became ready
    /// (UNIX ns, wall clock).
    sampled_at: Option<u64>,
    ready_at: Option<u64>,
    failed: Option<String>,
    bytes: u64,
    peer: Option<String>,
    taken: bool,
}

/// A sequence's KV cache arriving from a prefill worker, written into blocks of the decode
/// worker's KV pool as it comes (see the module doc). Dropping it before the attention
/// operators take the blocks gives them back to the pool.
pub struct KvImport {
    /// The handle the prefill worker tags the rows with.
    pub handle: u64,
    /// The decode engine's id of the sequence, and what to call when the import becomes ready
    /// or fails (to wake the scheduler): set when the request is submitted.
    bound: std::sync::OnceLock<(u64, Box<dyn Fn() + Send + Sync>)>,
    dims: HashMap<String, usize>,
    ty: KvType,
    pool: Pool,
    inner: Mutex<Inner>,
    /// Whether the scheduler reserved the request's whole length (`None`: not decided yet).
    decision: Mutex<Option<bool>>,
    decided: std::sync::Condvar,
}

impl std::fmt::Debug for KvImport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KvImport(seq {}, handle {}, {:?})", self.seq(), self.handle, self.state())
    }
}

fn dtype(ty: KvType) -> DType {
    match ty {
        KvType::F32 => DType::F32,
        KvType::Bf16 => DType::BF16,
        KvType::F16 => DType::F16,
    }
}

impl KvImport {
    /// An import known to the prefill worker as `handle`, of the attention `nodes` (name,
    /// `kv_heads·head_dim`) with caches of `ty`, taking blocks from `pool`.
    pub fn new(handle: u64, nodes: &[(String, usize)], ty: KvType, pool: Pool) -> KvImport {
        let inner = Inner {
            nodes: nodes.iter().map(|(n, _)| (n.clone(), Node::default())).collect(),
            first: None,
            sampled_at: None,
            ready_at: None,
            failed: None,
            bytes: 0,
            peer: None,
            taken: false,
        };
        let dims = nodes.iter().cloned().collect();
        KvImport {
            handle,
            bound: Default::default(),
            dims,
            ty,
            pool,
            inner: Mutex::new(inner),
            decision: Mutex::new(None),
            decided: Default::default(),
        }
    }

    /// Binds the import to sequence `seq`; `on_change` is called each time it becomes ready
    /// or fails. Once: later calls change nothing.
    pub fn bind(&self, seq: u64, on_change: Box<dyn Fn() + Send + Sync>) {
        let _ = self.bound.set((seq, on_change));
    }

    /// The scheduler's answer: the request's whole length reserved (`true`), or no room now.
    pub fn decide(&self, reserved: bool) {
        *self.decision.lock().unwrap_or_else(|p| p.into_inner()) = Some(reserved);
        self.decided.notify_all();
    }

    /// Waits up to `timeout` for [`KvImport::decide`]; `None` if it did not come.
    pub fn decision(&self, timeout: std::time::Duration) -> Option<bool> {
        let g = self.decision.lock().unwrap_or_else(|p| p.into_inner());
        let (g, _) = self.decided.wait_timeout_while(g, timeout, |d| d.is_none()).unwrap_or_else(|p| p.into_inner());
        *g
    }

    /// The sequence it is bound to (`u64::MAX` before [`KvImport::bind`]).
    pub fn seq(&self) -> u64 {
        self.bound.get().map_or(u64::MAX, |b| b.0)
    }

    fn changed(&self) {
        if let Some((_, f)) = self.bound.get() {
            f();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the import stands.
    pub fn state(&self) -> ImportState {
        let g = self.lock();
        if let Some(f) = &g.failed {
            return ImportState::Failed(f.clone());
        }
        match g.first {
            Some((prompt_len, first)) if g.nodes.values().all(|n| n.rows >= prompt_len) => {
                ImportState::Ready { prompt_len, first }
            }
            _ => ImportState::Pending,
        }
    }

    /// Payload bytes of keys and values written so far.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// From the prefill worker's first token to the import's being ready here: the KV
    /// transfer's time past the end of prefill (and the first token's trip); `None` before it
    /// is ready.
    pub fn exposed(&self) -> Option<std::time::Duration> {
        let g = self.lock();
        Some(std::time::Duration::from_nanos(g.ready_at?.saturating_sub(g.sampled_at?)))
    }

    /// The peer the rows come from (after the first message).
    pub fn peer(&self) -> Option<String> {
        self.lock().peer.clone()
    }

    /// Takes one message from `peer`. An error (naming what was wrong) fails the import.
    pub fn take_msg(&self, peer: &str, msg: KvMsg) {
        let before = self.state();
        let result = match msg {
            KvMsg::Rows { node, start, len, keys, values, .. } => {
                self.write(peer, &node, start as usize, len as usize, &keys, &values)
            }
            KvMsg::First { prompt_len, token, sampled_unix_ns, .. } => {
                let mut g = self.lock();
                g.first = Some((prompt_len as usize, token));
                g.sampled_at = Some(sampled_unix_ns);
                Ok(())
            }
            KvMsg::Abort { reason, .. } => Err(format!("the prefill worker {peer} failed: {reason}")),
        };
        if let Err(e) = result {
            self.fail_quietly(e);
        }
        let after = self.state();
        if after != before {
            if let ImportState::Ready { .. } = after {
                self.lock().ready_at = Some(unix_ns());
            }
            self.changed();
        }
    }

    /// Fails the import (its blocks go back to the pool now).
    pub fn fail(&self, why: String) {
        if self.fail_quietly(why) {
            self.changed();
        }
    }

    /// Fails the import without calling `on_change`; false if it had already failed.
    fn fail_quietly(&self, why: String) -> bool {
        let mut g = self.lock();
        if g.failed.is_some() {
            return false;
        }
        g.failed = Some(why);
        g.nodes.values_mut().for_each(|n| n.blocks.clear());
        true
    }

    fn write(
        &self,
        peer: &str,
        node: &str,
        start: usize,
        len: usize,
        keys: &[u8],
        values: &[u8],
    ) -> Result<(), String> {
        let mut g = self.lock();
        g.peer.get_or_insert_with(|| peer.to_string());
        if g.failed.is_some() || g.taken {
            return Ok(());
        }
        let Some(&dim) = self.dims.get(node) else {
            return Err(format!("KV rows for attention node `{node}`, which this model does not have"));
        };
        let row = dim * self.ty.size();
        if keys.len() != len * row || values.len() != len * row {
            return Err(format!(
                "KV rows of `{node}` at {start}..{}: {} key and {} value bytes, expected {} each",
                start + len,
                keys.len(),
                values.len(),
                len * row
            ));
        }
        let n = g.nodes.get_mut(node).expect("every node has an entry");
        if start != n.rows {
            return Err(format!("KV rows of `{node}` start at {start}, but {} positions have come", n.rows));
        }
        let bt = KV_BLOCK_TOKENS;
        while n.blocks.len() * bt < start + len {
            let Some(buf) = self.pool.try_alloc(kv_block_bytes(dim, self.ty)) else {
                return Err(format!(
                    "the KV cache pool `{}` has no room for position {} of `{node}` ({} of its {} bytes in use)",
                    self.pool.name(),
                    n.blocks.len() * bt,
                    self.pool.in_use(),
                    self.pool.budget()
                ));
            };
            n.blocks.push(Tensor::from_buffer(dtype(self.ty), vec![2, bt, dim], buf));
        }
        for i in 0..len {
            let p = start + i;
            let blk = n.blocks[p / bt].bytes_mut();
            blk[(p % bt) * row..][..row].copy_from_slice(&keys[i * row..][..row]);
            blk[(bt + p % bt) * row..][..row].copy_from_slice(&values[i * row..][..row]);
        }
        n.rows += len;
        g.bytes += (keys.len() + values.len()) as u64;
        Ok(())
    }

    /// Attention node `node`'s blocks and how many positions they hold, taken once (by the
    /// attention operator, when the sequence's first decode pass reaches it).
    pub fn take_blocks(&self, node: &str) -> Option<(Vec<Tensor>, usize)> {
        let mut g = self.lock();
        g.taken = true;
        let n = g.nodes.get_mut(node).filter(|n| !n.taken)?;
        n.taken = true;
        Some((std::mem::take(&mut n.blocks), n.rows))
    }
}

/// The decode side's imports by handle, for the messages that arrive.
#[derive(Default)]
pub struct KvImports {
    map: Mutex<HashMap<u64, Arc<KvImport>>>,
    received: std::sync::atomic::AtomicU64,
}

impl KvImports {
    /// Registers `import` under its handle.
    pub fn insert(&self, import: Arc<KvImport>) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).insert(import.handle, import);
    }
    /// Forgets `handle` (its sequence ended or took its blocks).
    pub fn remove(&self, handle: u64) {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).remove(&handle);
    }
    /// Fails the import waiting as `handle` with `why`; false if none waits so.
    pub fn fail(&self, handle: u64, why: &str) -> bool {
        let import = self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&handle).cloned();
        import.map(|i| i.fail(format!("the prefill failed: {why}"))).is_some()
    }
    /// Bytes of keys and values received so far, for any import.
    pub fn received_bytes(&self) -> u64 {
        self.received.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Imports waiting.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Hands a message from `peer` to its import, or the end of `peer`'s connection to every
    /// import still waiting on it. Rows for a handle nobody waits for (a request cancelled
    /// meanwhile) are dropped.
    pub fn deliver(&self, peer: &str, msg: Result<KvMsg, RemoteError>) {
        match msg {
            Ok(m) => {
                if let KvMsg::Rows { keys, values, .. } = &m {
                    let n = (keys.len() + values.len()) as u64;
                    self.received.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
                let import = self.map.lock().unwrap_or_else(|p| p.into_inner()).get(&m.handle()).cloned();
                match import {
                    Some(i) => i.take_msg(peer, m),
                    None => tracing::debug!("KV for handle {} from {peer}, which nobody waits for", m.handle()),
                }
            }
            Err(e) => {
                let waiting: Vec<Arc<KvImport>> =
                    self.map.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
                for i in waiting {
                    if i.peer().as_deref() == Some(peer) && i.state() == ImportState::Pending {
                        i.fail(format!("the KV cache was coming from {peer}, and the connection ended: {e}"));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attention::Attention;
    use crate::testing::*;
    use crate::{Batch, LogitsWanted, Packet, Sampling, SeqSlice};
    use weir_runtime::remote::{Hello, RemoteListener};

    /// A route over a real loopback connection (nothing is sent on it here).
    fn route() -> (Arc<KvRoute>, weir_runtime::remote::RemoteRx<KvMsg>) {
        let l = RemoteListener::bind("127.0.0.1:0").unwrap();
        let addr = l.addr().to_string();
        let hello = Hello::new(KV_EDGE, "test", 4);
        let rx = std::thread::spawn(move || l.accept::<KvMsg>(&Hello::new(KV_EDGE, "test", 4)).unwrap());
        let tx = Arc::new(RemoteTx::connect(&addr, &hello).unwrap());
        (Arc::new(KvRoute::new(KvLink::Remote(tx), 42)), rx.join().unwrap())
    }

    fn pass(start: usize, len: usize) -> Batch {
        let seq = SeqSlice { id: 5, start, len, logits: LogitsWanted::None, sampling: Sampling::default() };
        Batch { seqs: vec![seq], ..Default::default() }
    }

    fn values(n: usize, salt: f32) -> Vec<f32> {
        (0..n).map(|i| (i as f32 * 0.37 + salt).sin()).collect()
    }

    #[test]
    fn a_prefilled_cache_exported_and_imported_decodes_as_the_original() {
        for ty in [KvType::F32, KvType::Bf16, KvType::F16] {
            let (heads, kv_heads, hd) = (4, 2, 8);
            let (qd, kvd) = (heads * hd, kv_heads * hd);
            let pool = Pool::new("kv", usize::MAX);
            let mut prefill = Attention::new(heads, kv_heads, hd, 128, None, ty, pool.clone());
            prefill.export = true;
            // A 37-token prompt in two chunks (20 + 17), exported as it is stored.
            let (r, _rx) = route();
            let mut rows = Vec::new();
            for (start, len) in [(0, 20), (20, 17)] {
                let b = Arc::new(Batch { export: vec![(5, r.clone())], ..pass(start, len) });
                let ins = vec![
                    act(&b, qd, &values(len * qd, 1.0)),
                    act(&b, kvd, &values(len * kvd, 2.0 + start as f32)),
                    act(&b, kvd, &values(len * kvd, 3.0 + start as f32)),
                ];
                let out = fire(&mut prefill, ins, 2).unwrap();
                let Some(Packet::Kv { rows: got, node, .. }) = &out[1] else { panic!("no KV rows emitted") };
                assert_eq!(&**node, "test");
                rows.extend(got.iter().cloned());
            }
            let dims = [("test".to_string(), kvd)];
            let import = Arc::new(KvImport::new(42, &dims, ty, pool.clone()));
            import.bind(9, Box::new(|| {}));
            let mut sent = 0;
            for row in rows {
                sent += row.keys.len() + row.values.len();
                let msg = KvMsg::Rows {
                    handle: 42,
                    node: "test".into(),
                    start: row.start as u32,
                    len: row.len as u32,
                    keys: row.keys,
                    values: row.values,
                };
                import.take_msg("peer", msg);
                assert_eq!(import.state(), ImportState::Pending, "no first token yet");
            }
            import.take_msg("peer", KvMsg::First { handle: 42, prompt_len: 37, token: 3, sampled_unix_ns: unix_ns() });
            assert_eq!(import.state(), ImportState::Ready { prompt_len: 37, first: 3 });
            assert_eq!(import.bytes() as usize, sent);
            assert_eq!(sent, 2 * 37 * kvd * ty.size());

            // The next token on the original and on a fresh operator given the import.
            let mut decode = Attention::new(heads, kv_heads, hd, 128, None, ty, pool.clone());
            let b = Arc::new(pass(37, 1));
            let ins = || {
                vec![act(&b, qd, &values(qd, 4.0)), act(&b, kvd, &values(kvd, 5.0)), act(&b, kvd, &values(kvd, 6.0))]
            };
            let want = fire(&mut prefill, ins(), 2).unwrap();
            let bi = Arc::new(Batch { imports: vec![import.clone()], ..pass(37, 1) });
            let ins_i = vec![
                act(&bi, qd, &values(qd, 4.0)),
                act(&bi, kvd, &values(kvd, 5.0)),
                act(&bi, kvd, &values(kvd, 6.0)),
            ];
            // The sequence is 5 on the prefill side and 9 (the import's) on the decode side.
            let got = fire(&mut decode, ins_i, 1);
            assert!(got.is_err(), "sequence 5 has no cache on the decode side");
            let bi = Arc::new(Batch {
                imports: vec![import.clone()],
                seqs: vec![SeqSlice { id: 9, ..pass(37, 1).seqs[0].clone() }],
                ..Default::default()
            });
            let ins_i = vec![
                act(&bi, qd, &values(qd, 4.0)),
                act(&bi, kvd, &values(kvd, 5.0)),
                act(&bi, kvd, &values(kvd, 6.0)),
            ];
            let got = fire(&mut decode, ins_i, 1).unwrap();
            let (Some(Packet::Act { x: a, .. }), Some(Packet::Act { x: b, .. })) = (&want[0], &got[0]) else {
                panic!()
            };
            assert_eq!(a.f32(), b.f32(), "{ty:?}");
        }
    }

    #[test]
    fn bad_rows_fail_the_import_by_name_and_free_its_blocks() {
        let pool = Pool::new("kv", 4 * crate::attention::kv_block_bytes(8, KvType::F32));
        let dims = [("l0/attn".to_string(), 8), ("l1/attn".to_string(), 8)];
        let woken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let new = |w: &Arc<std::sync::atomic::AtomicUsize>| {
            let w = w.clone();
            let i = KvImport::new(7, &dims, KvType::F32, pool.clone());
            i.bind(
                1,
                Box::new(move || {
                    w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }),
            );
            i
        };
        let rows = |node: &str, start: u32, len: u32, bytes: usize| KvMsg::Rows {
            handle: 7,
            node: node.into(),
            start,
            len,
            keys: vec![0; bytes],
            values: vec![0; bytes],
        };
        let cases = [
            (rows("l9/attn", 0, 1, 32), "`l9/attn`, which this model does not have"),
            (rows("l0/attn", 0, 2, 32), "expected 64 each"),
            (rows("l0/attn", 3, 1, 32), "start at 3, but 1 positions have come"),
            (KvMsg::Abort { handle: 7, reason: "out of memory".into() }, "failed: out of memory"),
        ];
        for (msg, want) in cases {
            let i = new(&woken);
            i.take_msg("p", rows("l0/attn", 0, 1, 32));
            assert!(pool.in_use() > 0);
            i.take_msg("p", msg);
            match i.state() {
                ImportState::Failed(e) => assert!(e.contains(want), "{e}"),
                s => panic!("{s:?}"),
            }
            assert_eq!(pool.in_use(), 0, "a failed import's blocks are back in the pool");
        }
        assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 4, "each failure woke the scheduler once");
        // More rows than the pool holds: refused naming the pool.
        let i = new(&woken);
        i.take_msg("p", rows("l0/attn", 0, 16 * 5, 16 * 5 * 32));
        assert!(matches!(i.state(), ImportState::Failed(e) if e.contains("pool `kv` has no room")));
        // A connection that ends fails the imports still waiting on it.
        let imports = KvImports::default();
        let i = Arc::new(new(&woken));
        imports.insert(i.clone());
        imports.deliver("p", Ok(rows("l0/attn", 0, 1, 32)));
        imports.deliver("q", Err(RemoteError::Closed { peer: "q".into() }));
        assert_eq!(i.state(), ImportState::Pending, "another peer's end does not matter");
        imports.deliver("p", Err(RemoteError::Closed { peer: "p".into() }));
        assert!(matches!(i.state(), ImportState::Failed(e) if e.contains("connection ended")));
    }
}
