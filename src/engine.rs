//! The engine: a placed model running on this machine, and the scheduler thread that batches
//! requests into its passes (`scheduler`).
//!
//! `Engine::new` places the model (`weir_graphs::place`: the same pipeline `weir graph show`
//! prints), sizes the host pools the placement says, compiles the placed graph into a program
//! (`compile`) and starts the scheduler. `submit` checks a request and hands it over.

use crate::compile::{compile, Compiled};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::options::EngineOptions;
use crate::request::{Event, FinishReason, Generation, Output, Request, Stats};
use crate::scheduler::{kv_tokens_needed, Cmd, Gauges, Phase, SchedParams, Scheduler};
use crossbeam_channel::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use weir_graphs::place::memory::HostPools;
use weir_operators::attention::KV_BLOCK_TOKENS;
use weir_operators::RoutingStats;
use weir_runtime::{Program, Trace};

/// A started program and the scheduler driving it.
pub(crate) struct Running {
    pub(crate) cmds: Option<Sender<Cmd>>,
    scheduler: Option<JoinHandle<()>>,
    program: Arc<Mutex<Option<Program>>>,
}

impl Running {
    fn fault(&self) -> Option<weir_runtime::Error> {
        self.program.lock().ok().and_then(|p| p.as_ref().and_then(|p| p.fault()))
    }
    fn stop(&mut self) -> Result<()> {
        if let Some(c) = self.cmds.take() {
            let _ = c.send(Cmd::Stop);
        }
        if let Some(h) = self.scheduler.take() {
            let _ = h.join();
        }
        let program = self.program.lock().ok().and_then(|mut p| p.take());
        match program {
            Some(p) => p.shutdown().map_err(Error::Runtime),
            None => Ok(()),
        }
    }
}

/// A running model. Dropping it shuts it down. If an actor fails (an I/O error, a file changed
/// under a loader), the requests in flight fail with the cause, and the next request starts the
/// program afresh: the engine stays usable.
pub struct Engine {
    pub(crate) run: Mutex<Running>,
    pub(crate) placed: weir_graphs::Placed,
    trace: bool,
    pub(crate) env: weir_operators::OpEnv,
    pub(crate) sched: SchedParams,
    graph_dump: String,
    pools: Vec<weir_runtime::Pool>,
    meter: weir_runtime::TierMeter,
    gauges: Arc<Gauges>,
    next_id: std::sync::atomic::AtomicU64,
    max_queue: Option<usize>,
    /// Prompts shorter than this go to decode workers in one transfer.
    pub(crate) kv_bulk_below: usize,
    /// Every attention node (name, `kv_heads·head_dim`) and the KV cache's type: what a KV
    /// edge carries (`split`).
    pub(crate) kv_nodes: (Vec<(String, usize)>, weir_operators::KvType),
    /// Connections to decode workers (a prefill worker's), by address.
    pub(crate) peers: Mutex<std::collections::HashMap<String, Arc<crate::split::KvTx>>>,
    /// A graph over several processes: where this part meets the others.
    net: Option<crate::pipeline::NetSite>,
}

fn start(
    graph: &weir_graphs::Graph,
    trace: bool,
    env: &weir_operators::OpEnv,
    p: &SchedParams,
    gauges: &Arc<Gauges>,
    net: Option<&crate::pipeline::NetSite>,
) -> Result<Running> {
    // A graph over several processes: every start connects its edges afresh.
    let mut env = env.clone();
    if let Some(site) = net {
        env.net = Some(site.connect(graph)?);
    }
    let Compiled { program, entry, exit } = compile(graph, trace, &env, p.micro_batches, p.gpu_memory)?;
    let program = Arc::new(Mutex::new(Some(program)));
    // Room for every request the queue may hold, its cancellation, and more.
    let (cmds, cmd_rx) = crossbeam_channel::bounded::<Cmd>(1 << 16);
    let (program2, gauges) = (program.clone(), gauges.clone());
    let sched = Scheduler { cmds: cmd_rx, entry, exit, program: program2, p: p.clone(), kv_free: p.kv_blocks, gauges };
    let scheduler = std::thread::Builder::new()
        .name("weir-scheduler".into())
        .spawn(move || sched.run())
        .map_err(|e| Error::Runtime(weir_runtime::Error::Spawn { lane: "scheduler".into(), reason: e.to_string() }))?;
    Ok(Running { cmds: Some(cmds), scheduler: Some(scheduler), program })
}

/// The host tier's pools, per the placement: weights read from storage, KV cache,
/// activations, and the DRAM tier's held weights; one meter over them all (and the expert
/// stores' caches, which the stores make).
pub(crate) fn host_env(
    pools: Option<&HostPools>,
    opts: &EngineOptions,
) -> (weir_operators::OpEnv, weir_runtime::TierMeter) {
    let meter = weir_runtime::TierMeter::new();
    let pool = |name: &str, bytes: Option<u64>, reuse: bool| {
        let budget = bytes.map_or(usize::MAX, |b| b as usize);
        weir_runtime::Pool::with(name, budget, reuse, Some(&meter))
    };
    let env = weir_operators::OpEnv {
        host_pool: Some(pool("weights", pools.map(|p| p.split.weights), true)),
        kv_pool: pool("kv", pools.map(|p| p.split.kv), true),
        // Activation sizes change with every pass: freed at once, not kept.
        activations: pool("activations", pools.map(|p| p.split.activations), false),
        disk_bytes: Default::default(),
        routing: Arc::new(if opts.log_routes { RoutingStats::logging() } else { RoutingStats::default() }),
        expert_cache: Default::default(),
        host_meter: Some(meter.clone()),
        bf16_as_f16: opts.bf16_as_f16,
        held_pool: pools.filter(|p| p.held > 0).map(|p| pool("held", Some(p.held), false)),
        net: None,
    };
    (env, meter)
}

/// Says what the placement decided (`WEIR_LOG=info`): where the weights are, each budget, the
/// pools, the experts.
fn log_placement(placed: &weir_graphs::Placed) {
    let gb = weir_graphs::format_size;
    let (mut resident, mut held, mut streamed) = (0u64, 0u64, 0u64);
    for (_, l) in placed.graph.loaders() {
        for (i, t) in l.tensors.iter().enumerate() {
            match (l.streamed[i], l.held[i]) {
                (false, _) => resident += t.nbytes(),
                (true, true) => held += t.nbytes(),
                (true, false) => streamed += t.nbytes(),
            }
        }
    }
    let budget = |b: Option<u64>| b.map_or("none".to_string(), gb);
    tracing::info!(
        "weights: {} resident, {} held in DRAM, {} read from storage every pass; budgets: host {}, GPU {}",
        gb(resident),
        gb(held),
        gb(streamed),
        budget(placed.graph.host_budget),
        budget(placed.graph.gpu_budget)
    );
    if let Some(p) = &placed.pools {
        let s = &p.split;
        tracing::info!(
            "host pools: weights {}, KV cache {}, activations {}, held {}, expert caches {}",
            gb(s.weights),
            gb(s.kv),
            gb(s.activations),
            gb(p.held),
            gb(p.caches)
        );
    }
    if let Some(e) = &placed.experts {
        let cold: usize = e.stores.iter().map(|s| s.1.len()).sum();
        tracing::info!(
            "experts: {} resident ({}), {cold} read when chosen, by {} stores",
            e.resident.len(),
            gb(e.resident_bytes),
            e.stores.len()
        );
    }
}

impl Engine {
    /// Places `model` on this machine and starts it. Weights load in the background; the first
    /// pass waits for them.
    pub fn new(model: &Model, opts: EngineOptions) -> Result<Engine> {
        opts.check()?;
        if let Some(p) = opts.process.as_deref().filter(|p| *p != weir_graphs::graph::MAIN) {
            return Err(Error::Request(format!(
                "--process {p}: an engine runs `main`'s part (the scheduler's); start `{p}` with `weir worker --process {p}`"
            )));
        }
        let max_positions = model.config.max_position_embeddings;
        let file = opts.graph.as_ref().map(|(t, f)| (t.as_str(), f.as_str()));
        let placed = model.place(file, &opts.placement(max_positions))?;
        opts.check_placed(&placed)?;
        let graph_dump = weir_graphs::format::print::print(&placed.graph);
        if let Ok(dir) = std::env::var("WEIR_DUMP_GRAPH") {
            let dir = std::path::Path::new(&dir);
            let _ = std::fs::create_dir_all(dir);
            let _ = std::fs::write(dir.join("graph.weir"), &graph_dump);
            let _ = std::fs::write(dir.join("graph.dot"), placed.graph.dot());
        }
        let (env, meter) = host_env(placed.pools.as_ref(), &opts);
        let pools: Vec<weir_runtime::Pool> =
            env.host_pool.iter().cloned().chain([env.kv_pool.clone(), env.activations.clone()]).collect();
        let per_block = weir_graphs::place::memory::kv_bytes_per_block(&placed.graph);
        let micro_batches = opts.micro_batches;
        let sched = SchedParams {
            eos: model.config.eos_token_ids.clone(),
            max_positions,
            vocab: model.config.vocab_size,
            // Every sequence of a decode step fits one pass.
            max_batch: opts.max_batch.clamp(1, opts.max_pass_tokens * micro_batches),
            micro_batches,
            pass_tokens: opts.max_pass_tokens,
            kv_blocks: placed.pools.map(|p| p.split.kv.checked_div(per_block).map_or(usize::MAX, |b| b as usize)),
            gpu_memory: placed.graph.gpu_budget.map(|b| b as usize),
            imports: Default::default(),
        };
        log_placement(&placed);
        let gauges = Arc::new(Gauges::default());
        let net = crate::pipeline::NetSite::new(&placed.graph, model, Some(opts.connect_timeout))?;
        let run = start(&placed.graph, opts.trace, &env, &sched, &gauges, net.as_ref())?;
        Ok(Engine {
            run: Mutex::new(run),
            trace: opts.trace,
            env,
            sched,
            graph_dump,
            pools,
            meter,
            gauges,
            next_id: Default::default(),
            max_queue: opts.max_queue,
            peers: Default::default(),
            kv_bulk_below: opts.kv_bulk_below,
            kv_nodes: weir_graphs::place::kv_export::attention_nodes(&placed.graph),
            placed,
            net,
        })
    }

    /// Checks `req` (ids in the vocabulary, prompt within the context, the KV reserve holds it,
    /// sampling settings) and hands it to the scheduler: its events, as they come.
    pub fn submit(&self, req: Request) -> Result<Generation> {
        self.submit_phase(req, Phase::Both)
    }

    /// [`Engine::submit`], running `phase` of the request here.
    pub(crate) fn submit_phase(&self, req: Request, phase: Phase) -> Result<Generation> {
        self.check(&req)?;
        if let Some(max) = self.max_queue {
            let waiting = self.gauges.waiting.load(std::sync::atomic::Ordering::Relaxed);
            if waiting >= max {
                return Err(Error::Busy { waiting });
            }
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        if req.max_new_tokens == 0 {
            let _ = tx.send(Event::Done(Stats {
                finish: FinishReason::MaxTokens,
                prompt_tokens: req.prompt.len(),
                generated_tokens: 0,
                queued_s: 0.0,
                prefill_s: 0.0,
                decode_s: 0.0,
            }));
            return Ok(Generation { events: rx, cancel: None, done: false });
        }
        let mut run = self.run.lock().map_err(|_| Error::Stopped(None))?;
        if run.fault().is_some() {
            // The last program failed (its requests were told why): start afresh.
            let _ = run.stop();
            *run = start(&self.placed.graph, self.trace, &self.env, &self.sched, &self.gauges, self.net.as_ref())?;
        }
        let cmds = run.cmds.as_ref().ok_or(Error::Stopped(None))?;
        let id = self.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Counted waiting at once, so that requests submitted together meet the queue's bound.
        self.gauges.waiting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Phase::Decode(import) = &phase {
            let wake = cmds.clone();
            import.bind(
                id,
                Box::new(move || {
                    let _ = wake.send(Cmd::Wake);
                }),
            );
        }
        if cmds.send(Cmd::Submit(id, req, tx, phase)).is_err() {
            self.gauges.waiting.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            return Err(Error::Stopped(run.fault()));
        }
        Ok(Generation { events: rx, cancel: Some((id, cmds.clone())), done: false })
    }

    fn check(&self, req: &Request) -> Result<()> {
        let bad = |m: String| Err(Error::Request(m));
        let (vocab, max_positions) = (self.sched.vocab, self.sched.max_positions);
        if req.prompt.is_empty() {
            return bad("the prompt is empty".into());
        }
        if let Some((i, id)) = req.prompt.iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
            return bad(format!("prompt token {i} is id {id}, outside the vocabulary (size {vocab})"));
        }
        if req.prompt.len() > max_positions {
            let n = req.prompt.len();
            return bad(format!("the prompt has {n} tokens, more than max_position_embeddings ({max_positions})"));
        }
        if let Some(blocks) = self.sched.kv_blocks {
            let need = kv_tokens_needed(req.prompt.len(), req.max_new_tokens, max_positions);
            if need / KV_BLOCK_TOKENS > blocks {
                return bad(format!(
                    "the request needs KV cache for {need} positions (prompt {} + up to {} new tokens, in blocks of \
                     {KV_BLOCK_TOKENS}) but the memory budget reserves {} (raise --kv-tokens, or --memory-budget)",
                    req.prompt.len(),
                    req.max_new_tokens,
                    blocks.saturating_mul(KV_BLOCK_TOKENS)
                ));
            }
        }
        req.sampling_check().map_err(Error::Request)
    }

    /// Submits and waits.
    pub fn generate(&self, req: Request) -> Result<Output> {
        self.submit(req)?.wait()
    }

    /// What the scheduler is doing now: requests waiting, sequences running, KV blocks promised,
    /// requests cancelled (for metrics).
    pub fn gauges(&self) -> &Gauges {
        &self.gauges
    }

    /// KV blocks the reserve holds over all sequences (`None`: no budget, no limit).
    pub fn kv_blocks(&self) -> Option<usize> {
        self.sched.kv_blocks
    }

    /// The model's vocabulary size and context length, as requests are checked against them.
    pub fn limits(&self) -> (usize, usize) {
        (self.sched.vocab, self.sched.max_positions)
    }

    /// The runtime's fault, if an actor failed.
    pub fn fault(&self) -> Option<weir_runtime::Error> {
        self.run.lock().ok().and_then(|r| r.fault())
    }

    /// The trace recorded so far (empty unless built with `trace: true`), with each memory
    /// pool's peak.
    pub fn trace(&self) -> Trace {
        let gpu = self.gpu_peaks(); // before taking the lock it takes too
        let run = match self.run.lock() {
            Ok(r) => r,
            Err(_) => return Trace::default(),
        };
        let mut t = run.program.lock().ok().and_then(|p| p.as_ref().map(|p| p.trace())).unwrap_or_default();
        if !t.events.is_empty() {
            for p in &self.pools {
                t.events.push(weir_runtime::Event::PoolPeak {
                    pool: p.name().to_string(),
                    tier: "Host".into(),
                    budget: (p.budget() != usize::MAX).then_some(p.budget() as u64),
                    peak: p.high_water() as u64,
                });
            }
            for p in gpu {
                t.events.push(weir_runtime::Event::PoolPeak {
                    pool: p.0,
                    tier: "Gpu".into(),
                    budget: Some(p.2),
                    peak: p.1,
                });
            }
            t.events.push(weir_runtime::Event::PoolPeak {
                pool: "all".into(),
                tier: "Host".into(),
                budget: self.host_budget(),
                peak: self.meter.high_water() as u64,
            });
        }
        t
    }

    /// The memory pools (weights, KV cache, activations): used bytes, high-water mark, budget
    /// (unbounded without a memory budget).
    pub fn pools(&self) -> &[weir_runtime::Pool] {
        &self.pools
    }

    /// Each GPU memory pool of the running program: its name (`gpu0`, …), the most bytes it
    /// held at once, its budget (`--gpu-memory`). Empty without GPU lanes.
    pub fn gpu_peaks(&self) -> Vec<(String, u64, u64)> {
        let Ok(run) = self.run.lock() else { return Vec::new() };
        let Ok(program) = run.program.lock() else { return Vec::new() };
        program.as_ref().map_or(Vec::new(), |p| {
            p.gpu_pools().iter().map(|g| (g.name().to_string(), g.high_water() as u64, g.budget() as u64)).collect()
        })
    }

    /// The most bytes the host tier's pools held at once: weights read from storage, KV cache
    /// and activations together.
    pub fn peak_host_bytes(&self) -> u64 {
        self.meter.high_water() as u64
    }

    /// The bytes the host tier's pools hold now.
    pub fn host_bytes(&self) -> u64 {
        self.meter.used() as u64
    }

    /// The host budget all pools share, if any: the pools the placement sized, the DRAM tier's
    /// held weights and the expert caches together.
    pub fn host_budget(&self) -> Option<u64> {
        self.placed.pools.map(|p| p.total())
    }

    /// How often the routers of a mixture-of-experts model chose each expert, per layer (and
    /// every token's choice, with [`EngineOptions::log_routes`]).
    pub fn routing(&self) -> &RoutingStats {
        &self.env.routing
    }

    /// Bytes read from storage by the loaders since the engine started.
    pub fn disk_bytes_read(&self) -> u64 {
        self.env.disk_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How far loading the weights read once has got: (bytes read from storage, bytes of the
    /// weights read once — resident, and held in DRAM). Loading is done when the first is at
    /// least the second (reads are whole blocks, so they may pass it).
    pub fn load_progress(&self) -> (u64, u64) {
        let once: u64 = self
            .placed
            .graph
            .loaders()
            .flat_map(|(_, l)| {
                (0..l.tensors.len()).filter(|&i| !l.streamed[i] || l.held[i]).map(|i| l.tensors[i].nbytes())
            })
            .sum();
        (self.disk_bytes_read(), once)
    }

    /// Where the weights streamed every pass are: (file, offset, bytes), in reading order.
    pub fn streamed_ranges(&self) -> Vec<(std::path::PathBuf, u64, u64)> {
        let mut out = Vec::new();
        for (_, l) in self.placed.graph.loaders() {
            for (t, s) in l.tensors.iter().zip(&l.streamed) {
                if *s {
                    out.push((t.path.clone(), t.offset, t.nbytes()));
                }
            }
        }
        out
    }

    /// Where the expert placement put each expert, when an expert budget was given.
    pub fn expert_plan(&self) -> Option<&weir_graphs::place::experts::ExpertPlan> {
        self.placed.experts.as_ref()
    }

    /// Expert stores' hits, misses, evictions and bytes read since the engine started.
    pub fn expert_cache(&self) -> &weir_operators::expert_store::ExpertCacheStats {
        &self.env.expert_cache
    }

    /// What the memory planner decided, when a budget was given.
    pub fn plan(&self) -> Option<&weir_graphs::place::memory::Plan> {
        self.placed.plan.as_ref()
    }

    /// The placed graph that runs.
    pub fn graph(&self) -> &weir_graphs::Graph {
        &self.placed.graph
    }

    /// The placed graph, as a graph file (what `weir graph show` prints).
    pub fn graph_dump(&self) -> &str {
        &self.graph_dump
    }

    /// Finishes the requests in flight, stops every lane and returns the fault if one occurred.
    pub fn shutdown(mut self) -> Result<()> {
        self.stop()
    }

    fn stop(&mut self) -> Result<()> {
        match self.run.get_mut() {
            Ok(r) => r.stop(),
            Err(p) => p.into_inner().stop(),
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
