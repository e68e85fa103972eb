//! A graph over several processes: pipeline parallelism across machines (or across sets of
//! cores, a process each).
//!
//! A graph file declares the processes (`process tail at="10.0.0.2:7100"`) and puts lanes in
//! them (`lane back cpu process=tail`); every process places the same file and runs its part
//! (`weir_graphs::place::processes`), the edges between parts being remote edges
//! (`weir_runtime::remote`: bounded by credits, so backpressure crosses the wire). `main` runs
//! the scheduler — an [`crate::Engine`] — and the others [`run_worker`] (`weir worker`).
//!
//! Connections: a process listens at its `at` address for the edges that come to it, and each
//! `net_send` connects to the address of the process its edge goes to, naming the edge in its
//! handshake (with a fingerprint of the model, so processes running different models refuse
//! each other). Each start of `main`'s program connects every edge afresh: a worker whose
//! connections end (`main` stopped, restarted after a failure, or a peer lost) stops its part
//! and waits for the next connections, so killing and restarting any process recovers.

use crate::error::{Error, Result};
use crate::model::Model;
use crate::options::EngineOptions;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use weir_graphs::graph::{Graph, MAIN};
use weir_operators::net::{NetLinks, Wire};
use weir_operators::OpConfig;
use weir_runtime::remote::{Hello, RemoteError, RemoteListener, RemoteRx, RemoteTx};

/// Where one process's part of a graph meets the others: its listener (bound once, kept across
/// restarts) and what both ends of an edge must agree on.
pub(crate) struct NetSite {
    me: String,
    listener: Option<RemoteListener>,
    fingerprint: String,
    /// How long connecting may take (`None`: as long as it takes — a worker waiting for `main`).
    patience: Option<Duration>,
}

/// What a process's edges carry, both ends must agree on: the model's shape.
fn fingerprint(model: &Model) -> String {
    let c = &model.config;
    format!(
        "weir-net {} hidden={} layers={} vocab={}",
        c.architecture.class(),
        c.hidden_size,
        c.num_hidden_layers,
        c.vocab_size
    )
}

impl NetSite {
    /// The site of `g` (a part after the cut), or `None` for a graph on one process.
    pub(crate) fn new(g: &Graph, model: &Model, patience: Option<Duration>) -> Result<Option<NetSite>> {
        let Some(me) = g.part.clone() else { return Ok(None) };
        let receives = g.nodes.iter().any(|n| matches!(n.op, OpConfig::NetRecv(_)));
        let listener = if receives {
            let at = g.processes.iter().find(|p| p.name == me).and_then(|p| p.at.clone()).ok_or_else(|| {
                Error::Placement(format!(
                    "process `{me}` takes edges from other processes but has no address: declare `process {me} at=\"HOST:PORT\"`"
                ))
            })?;
            Some(RemoteListener::bind(&at).map_err(|e| Error::Placement(format!("process `{me}`: {e}")))?)
        } else {
            None
        };
        Ok(Some(NetSite { me, listener, fingerprint: fingerprint(model), patience }))
    }

    /// Connects every edge of `g` to the other processes: this side's sends to their
    /// listeners, theirs to this one's, at the same time (each side may be waiting on the other).
    pub(crate) fn connect(&self, g: &Graph) -> Result<Arc<NetLinks>> {
        let deadline = self.patience.map(|p| Instant::now() + p);
        let links = Arc::new(NetLinks::default());
        std::thread::scope(|s| {
            let sends = s.spawn(|| self.connect_sends(g, &links, deadline));
            let accepted = self.accept_recvs(g, &links, deadline);
            sends.join().unwrap_or_else(|_| Err(Error::Placement("connecting a process's edges panicked".into())))?;
            accepted
        })?;
        let (n_tx, n_rx) = count(g);
        tracing::info!("process `{}`: {n_tx} edges to other processes and {n_rx} from them connected", self.me);
        Ok(links)
    }

    fn connect_sends(&self, g: &Graph, links: &NetLinks, deadline: Option<Instant>) -> Result<()> {
        for (i, n) in g.nodes.iter().enumerate() {
            let OpConfig::NetSend(spec) = &n.op else { continue };
            let peer = g.processes.iter().find(|p| p.name == spec.peer);
            let addr = peer.and_then(|p| p.at.clone()).ok_or_else(|| {
                Error::Placement(format!(
                    "edge `{}` goes to process `{}`, which has no address: declare `process {} at=\"HOST:PORT\"`",
                    spec.edge, spec.peer, spec.peer
                ))
            })?;
            let capacity = g.edge_into(i, 0).map_or(1, |e| e.capacity);
            let hello = Hello::new(&spec.edge, &self.fingerprint, capacity);
            let tx = loop {
                match RemoteTx::<Wire>::connect(&addr, &hello) {
                    Ok(tx) => break tx,
                    // Not listening yet: the other process may still be starting.
                    Err(RemoteError::Io { .. }) if deadline.is_none_or(|d| Instant::now() < d) => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(e) => {
                        return Err(Error::Placement(format!(
                            "edge `{}` to process `{}`: {e}{}",
                            spec.edge,
                            spec.peer,
                            waited(self.patience, &spec.peer)
                        )))
                    }
                }
            };
            links.add_tx(&spec.edge, tx);
        }
        Ok(())
    }

    fn accept_recvs(&self, g: &Graph, links: &NetLinks, deadline: Option<Instant>) -> Result<()> {
        let mut want: Vec<(String, String, Hello)> = Vec::new();
        for (i, n) in g.nodes.iter().enumerate() {
            let OpConfig::NetRecv(spec) = &n.op else { continue };
            let capacity = g.edges_from(i, 0).map(|e| e.capacity).max().unwrap_or(1);
            want.push((spec.edge.clone(), spec.peer.clone(), Hello::new(&spec.edge, &self.fingerprint, capacity)));
        }
        let Some(listener) = &self.listener else { return Ok(()) };
        let hellos: Vec<Hello> = want.iter().map(|w| w.2.clone()).collect();
        let mut got: Vec<Option<RemoteRx<Wire>>> = want.iter().map(|_| None).collect();
        while got.iter().any(Option::is_none) {
            let until = deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            match listener.accept_any_until::<Wire>(&hellos, until) {
                // A later connection of the same edge replaces one from a run that ended.
                Ok(Some((i, rx))) => got[i] = Some(rx),
                Ok(None) if deadline.is_none() => {}
                Ok(None) => {
                    let (edge, peer, _) = &want[got.iter().position(Option::is_none).unwrap_or(0)];
                    return Err(Error::Placement(format!(
                        "edge `{edge}` from process `{peer}` did not connect to {}{}",
                        listener.addr(),
                        waited(self.patience, peer)
                    )));
                }
                Err(e) => return Err(Error::Placement(format!("process `{}`: {e}", self.me))),
            }
        }
        for ((edge, _, _), rx) in want.iter().zip(got) {
            links.add_rx(edge, rx.expect("every edge accepted"));
        }
        Ok(())
    }
}

fn count(g: &Graph) -> (usize, usize) {
    let n = |f: fn(&OpConfig) -> bool| g.nodes.iter().filter(|n| f(&n.op)).count();
    (n(|o| matches!(o, OpConfig::NetSend(_))), n(|o| matches!(o, OpConfig::NetRecv(_))))
}

fn waited(patience: Option<Duration>, peer: &str) -> String {
    patience.map_or(String::new(), |p| {
        format!(
            " (waited {:.0} s: is `weir worker --process {peer}` running, with the same graph file and model?)",
            p.as_secs_f64()
        )
    })
}

/// Runs process `process`'s part of the graph file in `opts` (not `main`'s), for as long as
/// `stop` stays false: waits for the other processes, runs until its connections end, and
/// waits again — `main` restarting, or any process killed and started again, is a new run.
pub fn run_worker(model: &Model, mut opts: EngineOptions, process: &str, stop: &AtomicBool) -> Result<()> {
    if process == MAIN {
        return Err(Error::Request(
            "--process main: `main` runs the scheduler: start it with `weir serve` or `weir run`".into(),
        ));
    }
    opts.process = Some(process.to_string());
    opts.check()?;
    let file = opts.graph.as_ref().map(|(t, f)| (t.as_str(), f.as_str()));
    let file =
        file.ok_or_else(|| Error::Request("a worker needs --graph: the file that puts lanes in its process".into()))?;
    let placed = model.place(Some(file), &opts.placement(model.config.max_position_embeddings))?;
    opts.check_placed(&placed)?;
    let g = &placed.graph;
    if g.nodes.iter().all(|n| matches!(n.op, OpConfig::Load(_))) {
        return Err(Error::Request(format!("--process {process}: the graph puts no operator on this process's lanes")));
    }
    let site = NetSite::new(g, model, None)?
        .ok_or_else(|| Error::Request(format!("--process {process}: the graph declares no processes")))?;
    if let Some(l) = &site.listener {
        tracing::info!("process `{process}`: listening at {}", l.addr());
    }
    let gpu_memory = g.gpu_budget.map(|b| b as usize);
    while !stop.load(Ordering::SeqCst) {
        let links = site.connect(g)?;
        let (mut env, _) = crate::engine::host_env(placed.pools.as_ref(), &opts);
        env.net = Some(links.clone());
        let program = crate::compile::compile_part(g, opts.trace, &env, gpu_memory)?;
        let ended = loop {
            if let Some(f) = program.fault() {
                break Some(f.to_string());
            }
            if links.main_left() {
                break Some("main stopped its run".into());
            }
            if stop.load(Ordering::SeqCst) {
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if let Some(f) = ended {
            tracing::info!("process `{process}`: this run ended ({f}); waiting for the next");
        }
        let _ = program.shutdown();
    }
    Ok(())
}
