//! Phase splitting (Splitwise) on embedded engines: one engine prefills, another decodes, the
//! KV cache streamed between them layer by layer over a remote edge while prefill runs
//! (`weir_operators::kv_link` has the messages and the import; `weir serve --role` and
//! `weir route` are built on this).
//!
//! A request's way: the decode engine reserves its whole length and hands out a handle
//! ([`Engine::expect_kv`]); the prefill engine — placed with [`crate::Role::Prefill`], its
//! attention exporting — runs the prompt and samples the first token, sending each layer's
//! keys and values to the decode engine's [`KvListener`] as soon as that layer has stored them
//! ([`Engine::prefill_to`]); when every layer's rows and the first token have come, the decode
//! engine's scheduler lands the sequence, streams the first token, and decodes on.

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::request::{Generation, Request};
use crate::scheduler::Phase;
use std::sync::Arc;
use weir_operators::kv_link::{kv_fingerprint, KvImport, KvLink, KvMsg, KvRoute, KV_EDGE};
use weir_operators::OpConfig;
use weir_runtime::remote::{Hello, RemoteListener, RemoteTx, Server};

/// The sending end of a KV edge.
pub type KvTx = RemoteTx<KvMsg>;

/// KV messages a decode engine takes unconsumed from one prefill worker (its edge's capacity).
pub const KV_EDGE_CAPACITY: usize = 16;

/// A decode engine's listener for prefill workers' KV caches: accepting until dropped.
pub struct KvListener {
    server: Server,
}

impl KvListener {
    /// The address prefill workers send to.
    pub fn addr(&self) -> &str {
        self.server.addr()
    }
}

impl Engine {
    /// What both ends of a KV edge must agree on: every attention node with its width, the
    /// cache's element type, the block size.
    pub fn kv_fingerprint(&self) -> String {
        kv_fingerprint(&self.kv_nodes.0, self.kv_nodes.1)
    }

    /// Whether this engine's attention exports its KV cache (placed as a prefill worker).
    pub fn exports_kv(&self) -> bool {
        self.placed.graph.nodes.iter().any(|n| matches!(n.op, OpConfig::KvSend(_)))
    }

    /// Bytes of keys and values received from prefill workers since the engine started.
    pub fn kv_bytes_received(&self) -> u64 {
        self.sched.imports.received_bytes()
    }

    /// Ends the request waiting for its KV cache as `handle` with `why` (its prefill failed);
    /// false if none waits so.
    pub fn kv_abort(&self, handle: u64, why: &str) -> bool {
        self.sched.imports.fail(handle, why)
    }

    /// Requests waiting for their KV cache from a prefill worker.
    pub fn kv_imports_waiting(&self) -> usize {
        self.sched.imports.len()
    }

    /// Listens for prefill workers on `addr` (`HOST:PORT`, port 0 for any; `unix:PATH`).
    pub fn kv_listen(&self, addr: &str) -> Result<KvListener> {
        let listener = RemoteListener::bind(addr).map_err(|e| Error::Request(e.to_string()))?;
        let hello = Hello::new(KV_EDGE, &self.kv_fingerprint(), KV_EDGE_CAPACITY);
        let imports = self.sched.imports.clone();
        let server = weir_runtime::remote::serve(listener, hello, move |peer, msg| imports.deliver(peer, msg))
            .map_err(|e| Error::Request(e.to_string()))?;
        tracing::info!("taking KV caches from prefill workers at {}", server.addr());
        Ok(KvListener { server })
    }

    /// Reserves `req`'s whole length here and waits for its KV cache and first token from a
    /// prefill worker: the handle to give that worker, and the request's events (the first
    /// token when the cache has come, then the rest as they are decoded here). All or nothing,
    /// at once: [`Error::NoRoom`] when a batch slot and the KV reserve cannot hold it now
    /// (rows written before the reservation would take blocks promised to running sequences).
    pub fn expect_kv(&self, req: Request) -> Result<(u64, Generation)> {
        let g = &self.placed.graph;
        if let Some(n) =
            g.nodes.iter().find(|n| matches!(n.op, OpConfig::Attention(_)) && g.lanes[n.lane].kind.is_gpu())
        {
            return Err(Error::Request(format!(
                "node `{}`: a KV cache from a prefill worker goes to attention on a CPU lane, and this one is on a GPU lane",
                n.name
            )));
        }
        let handle = fresh_handle();
        let import = Arc::new(KvImport::new(handle, &self.kv_nodes.0, self.kv_nodes.1, self.env.kv_pool.clone()));
        self.sched.imports.insert(import.clone());
        let tokens = crate::kv_tokens_needed(req.prompt.len(), req.max_new_tokens, self.sched.max_positions);
        let gen = match self.submit_phase(req, Phase::Decode(import.clone())) {
            Ok(gen) => gen,
            Err(e) => {
                self.sched.imports.remove(handle);
                return Err(e);
            }
        };
        // Reserved now or refused now: the scheduler decides between two passes.
        match import.decision(std::time::Duration::from_secs(60)) {
            Some(true) => Ok((handle, gen)),
            Some(false) => Err(Error::NoRoom { tokens }),
            None => Err(Error::Failed("the scheduler did not answer a reservation within 60 s".into())),
        }
    }

    /// The connection to the decode worker at `addr` (made once, made again after it failed).
    pub fn kv_connect(&self, addr: &str) -> Result<Arc<KvTx>> {
        let mut peers = self.peers.lock().map_err(|_| Error::Stopped(None))?;
        if let Some(tx) = peers.get(addr).filter(|tx| tx.failed().is_none()) {
            return Ok(tx.clone());
        }
        let hello = Hello::new(KV_EDGE, &self.kv_fingerprint(), KV_EDGE_CAPACITY);
        let tx = Arc::new(KvTx::connect(addr, &hello).map_err(|e| Error::Request(e.to_string()))?);
        peers.insert(addr.to_string(), tx.clone());
        Ok(tx)
    }

    /// Prefills `req` here and sends its KV cache, layer by layer, and its first token to the
    /// decode worker at `addr`, which knows the request as `handle`. Its events here: the first
    /// token, then `Done` (or why it failed).
    pub fn prefill_to(&self, req: Request, addr: &str, handle: u64) -> Result<Generation> {
        self.check_exports()?;
        let link = KvLink::Remote(self.kv_connect(addr)?);
        self.prefill_over(req, link, handle)
    }

    /// Prefills `req` here and writes its KV cache, layer by layer, straight into `decode`'s
    /// pool, where it waits as `handle` ([`Engine::expect_kv`]): the split inside one box,
    /// between two engines on different lanes (each from its graph file). Refused naming both
    /// when the engines' attention nodes or cache types differ.
    pub fn prefill_into(&self, req: Request, decode: &Engine, handle: u64) -> Result<Generation> {
        let (mine, theirs) = (self.kv_fingerprint(), decode.kv_fingerprint());
        if mine != theirs {
            return Err(Error::Request(format!(
                "the prefill engine's KV cache ({mine}) is not the decode engine's ({theirs})"
            )));
        }
        self.check_exports()?;
        self.prefill_over(req, KvLink::Local(decode.sched.imports.clone()), handle)
    }

    /// Refuses an engine whose attention does not export its KV cache.
    fn check_exports(&self) -> Result<()> {
        match self.exports_kv() {
            true => Ok(()),
            false => Err(Error::Request(
                "this engine does not export its KV cache: build it as a prefill worker (--role prefill)".into(),
            )),
        }
    }

    fn prefill_over(&self, mut req: Request, link: KvLink, handle: u64) -> Result<Generation> {
        let route = match req.prompt.len() < self.kv_bulk_below {
            true => KvRoute::bulk(link, handle, self.kv_nodes.0.len()),
            false => KvRoute::new(link, handle),
        };
        req.max_new_tokens = 1;
        self.submit_phase(req, Phase::Prefill(Arc::new(route)))
    }
}

/// A handle no other request of this process has, and hard to guess across processes.
fn fresh_handle() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}
