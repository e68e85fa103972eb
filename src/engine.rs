//! The engine: a compiled model plus a scheduler that batches requests into passes.
//!
//! The scheduler thread is the graph's driver. Each pass it gathers every active sequence —
//! a new one contributes its whole prompt (prefill), a running one its last token (decode) —
//! sends the token ids into the graph's entry edge, waits for the sampled tokens at the exit
//! edge, and streams each sequence's token to its caller. Sequences of different lengths share
//! a pass; each keeps its own KV cache inside the attention actors. A finished sequence's id
//! rides on the next pass so that the actors free its state.

use crate::compile::{compile, Compiled};
use crate::error::{Error, Result};
use crate::model::Model;
use crossbeam_channel::{Receiver, Sender};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use weir_operators::{Batch, LogitsWanted, Packet, Sampling, SeqSlice};
use weir_operators::{KvType, RoutingStats};
use weir_runtime::{Program, Trace};

pub use weir_operators::Sampling as SamplingParams;

/// Which logits a request wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsMode {
    /// None.
    #[default]
    None,
    /// The logits behind every generated token (step 0: after the prompt).
    Steps,
    /// Those, plus the logits at every prompt position.
    AllPositions,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids (BOS included if the model wants one).
    pub prompt: Vec<u32>,
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// How to choose tokens.
    pub sampling: Sampling,
    /// Stop at the model's EOS ids (off for benchmarks).
    pub stop_at_eos: bool,
    /// Which logits to return.
    pub logits: LogitsMode,
}

impl Request {
    /// Greedy generation of `max_new_tokens` after `prompt`, stopping at EOS.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Request {
        Request { prompt, max_new_tokens, sampling: Sampling::default(), stop_at_eos: true, logits: LogitsMode::None }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token was produced (it is the last generated id).
    Eos,
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// The sequence reached `max_position_embeddings`.
    ContextFull,
}

impl FinishReason {
    /// The name other tools use (OpenAI's `finish_reason`): `stop` for an EOS token, `length`
    /// for the token limit or the end of the context.
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Eos => "stop",
            FinishReason::MaxTokens | FinishReason::ContextFull => "length",
        }
    }
}

/// What a request produces, as it is produced.
#[derive(Debug, Clone)]
pub enum Event {
    /// One new token; `logits` when the request asked for them.
    Token { id: u32, logits: Option<Vec<f32>> },
    /// The prompt's logits at every position (`LogitsMode::AllPositions`), before the first token.
    PromptLogits(Vec<Vec<f32>>),
    /// The request is complete.
    Done(Stats),
    /// The engine failed while running the request.
    Failed(String),
}

/// Timing and outcome of a finished request.
#[derive(Debug, Clone)]
pub struct Stats {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Seconds from submission to the request's first pass (waiting for a batch slot or KV room).
    pub queued_s: f64,
    /// Seconds from the request's first pass to its first token.
    pub prefill_s: f64,
    /// Seconds from the first token to the last.
    pub decode_s: f64,
}

impl Stats {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_s.max(1e-9)
    }
    /// Generated tokens per second after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.generated_tokens <= 1 {
            return 0.0;
        }
        (self.generated_tokens - 1) as f64 / self.decode_s.max(1e-9)
    }
}

/// A submitted request: its events, as they come.
pub struct Generation {
    events: Receiver<Event>,
}

/// Everything a finished request produced.
#[derive(Debug, Clone)]
pub struct Output {
    pub tokens: Vec<u32>,
    /// Per generated token, its logits (if asked).
    pub step_logits: Vec<Vec<f32>>,
    /// Per prompt position, its logits (if asked for all positions).
    pub prompt_logits: Vec<Vec<f32>>,
    pub stats: Stats,
}

impl Generation {
    /// The next event; `None` after `Done` or `Failed`.
    pub fn next_event(&self) -> Option<Event> {
        self.events.recv().ok()
    }

    /// Waits for the whole generation.
    pub fn wait(self) -> Result<Output> {
        let mut out = Output {
            tokens: Vec::new(),
            step_logits: Vec::new(),
            prompt_logits: Vec::new(),
            stats: Stats {
                finish: FinishReason::MaxTokens,
                prompt_tokens: 0,
                generated_tokens: 0,
                queued_s: 0.0,
                prefill_s: 0.0,
                decode_s: 0.0,
            },
        };
        while let Some(e) = self.next_event() {
            match e {
                Event::Token { id, logits } => {
                    out.tokens.push(id);
                    if let Some(l) = logits {
                        out.step_logits.push(l);
                    }
                }
                Event::PromptLogits(rows) => out.prompt_logits = rows,
                Event::Done(s) => {
                    out.stats = s;
                    return Ok(out);
                }
                Event::Failed(msg) => return Err(Error::Failed(msg)),
            }
        }
        Err(Error::Stopped(None))
    }
}

impl Iterator for Generation {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.next_event()
    }
}

/// How to build an engine.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Compute threads (cores of the compute lane); 0 = every CPU this process may use.
    pub threads: usize,
    /// Loader lanes.
    pub loader_lanes: usize,
    /// Record a trace.
    pub trace: bool,
    /// Most sequences in one pass.
    pub max_batch: usize,
    /// A graph file to run instead of the architecture's built-in one: (text, file name).
    pub graph: Option<(String, String)>,
    /// Host memory in bytes for weights, KV cache and activations together: the KV cache and
    /// activations are reserved first, and weights that do not fit the rest stay on disk and
    /// stream every pass (see `weir_graphs::plan`).
    pub memory_budget: Option<u64>,
    /// Layers of weights reading may run ahead of compute under a budget; 0 turns overlap off.
    pub prefetch: Option<usize>,
    /// Throughput mode: each step runs the active sequences as this many micro-batches, and one
    /// load of a streamed layer serves all of them.
    pub micro_batches: usize,
    /// Under a budget: positions of KV cache to reserve over all sequences in flight (each
    /// sequence holds whole blocks of 16; see [`kv_tokens_needed`]). Requests wait until their
    /// whole length fits; one that could never fit is refused. Default: 2048 (or the context,
    /// if shorter).
    pub kv_tokens: Option<usize>,
    /// The most tokens in one pass: longer prompts are prefilled in chunks of this many (it
    /// bounds activation memory, which the budget reserves for it).
    pub max_pass_tokens: usize,
    /// Element type of the KV cache (the graph's `kv_dtype` variable): bf16 or f16 halve its
    /// memory and the bytes attention reads, at the cost of rounding keys and values.
    pub kv_dtype: KvType,
    /// Keep every token's expert choices (mixture-of-experts models), for [`Engine::routing`].
    /// Counts per layer and expert are always kept.
    pub log_routes: bool,
    /// Mixture-of-experts models: fast-tier bytes for expert weights; the most used experts
    /// stay resident, the rest are read from storage when chosen into a bounded cache (see
    /// `weir_graphs::experts`). `None`: every expert resident.
    pub experts: Option<weir_graphs::experts::ExpertPlacement>,
    /// Hold resident bf16 weight matrices as f16, rewritten in place as they are read: on a
    /// CPU without bf16 instructions f16 is cheaper to widen (on the AVX2 machine of
    /// BENCHMARKS.md batch-32 decode went from 43.9 to 58.7 tokens/s; at batch 1 no change). Exact for magnitudes from 2⁻¹⁴ to 65504; smaller ones are off by at most
    /// 2⁻²⁵; a matrix with a larger value stays bf16 (see `weir_kernels::convert`).
    pub bf16_as_f16: bool,
    /// The budget of each GPU's memory pool, shared by its lanes' weights, KV cache and
    /// activations (`None`: the device's memory less 1 GiB, which the weights and the KV cache
    /// are then planned into as under an explicit budget: `default_gpu_memory`). Only graphs
    /// with GPU lanes use it.
    pub gpu_memory: Option<u64>,
}

impl EngineOptions {
    /// What a memory budget sets aside before weights with these options, for a model whose
    /// context is `max_positions`.
    pub fn reserve(&self, max_positions: usize) -> weir_graphs::plan::Reserve {
        weir_graphs::plan::Reserve {
            kv_tokens: self.kv_tokens.unwrap_or(2048.min(max_positions)),
            pass_tokens: self.max_pass_tokens,
            passes: self.micro_batches.max(1),
        }
    }
}

/// Positions of KV cache a request of `prompt_len` tokens generating up to `max_new_tokens`
/// holds at most, in whole blocks.
pub fn kv_tokens_needed(prompt_len: usize, max_new_tokens: usize, max_positions: usize) -> usize {
    let bt = weir_operators::attention::KV_BLOCK_TOKENS;
    (prompt_len + max_new_tokens).min(max_positions).div_ceil(bt) * bt
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: 0,
            loader_lanes: 1,
            trace: false,
            max_batch: 256,
            graph: None,
            memory_budget: None,
            prefetch: None,
            micro_batches: 1,
            kv_tokens: None,
            max_pass_tokens: 256,
            kv_dtype: KvType::F32,
            log_routes: false,
            experts: None,
            bf16_as_f16: false,
            gpu_memory: None,
        }
    }
}

enum Cmd {
    Submit(Request, Sender<Event>),
}

/// A started program and the scheduler driving it.
struct Running {
    cmds: Option<Sender<Cmd>>,
    scheduler: Option<JoinHandle<()>>,
    program: Arc<Mutex<Option<Program>>>,
}

impl Running {
    fn fault(&self) -> Option<weir_runtime::Error> {
        self.program.lock().ok().and_then(|p| p.as_ref().and_then(|p| p.fault()))
    }
    fn stop(&mut self) -> Result<()> {
        drop(self.cmds.take());
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

/// The budget the weights are planned into: the host's (`--memory-budget`), or, for a graph
/// with GPU lanes, the GPU's (`--gpu-memory`, else the host's): the weights that fit stay in
/// GPU memory (uploaded once), the rest are read and uploaded every pass through a host window
/// whose budget bounds their GPU copies in flight too (`weir_operators::to_gpu`); with both,
/// the host's budget holds some of those in DRAM ([`hold_in_dram`]).
pub fn planned_budget(g: &weir_graphs::Graph, memory: Option<u64>, gpu: Option<u64>) -> Option<u64> {
    if on_gpu(g) {
        gpu.or(memory)
    } else {
        memory
    }
}

/// `--prefetch` without a budget to plan ([`planned_budget`]) is an error: nothing would stream.
pub fn prefetch_needs_budget(prefetch: Option<usize>, planned: Option<u64>) -> Result<()> {
    if prefetch.is_some() && planned.is_none() {
        return Err(Error::Request(
            "--prefetch needs --memory-budget or --gpu-memory, or a graph with GPU lanes on a machine with the GPU \
             (without a budget every weight is resident and nothing streams)"
                .into(),
        ));
    }
    Ok(())
}

/// `weir_graphs::plan::fit` into the budget [`planned_budget`] chose (`budget`), with an error
/// that names it: `--gpu-memory` if it was given (`gpu_given`), the GPU's default if that was
/// used (`gpu`: the GPU budget in effect), or `--memory-budget`.
pub fn fit(
    g: &mut weir_graphs::Graph,
    budget: u64,
    prefetch: Option<usize>,
    reserve: &weir_graphs::plan::Reserve,
    gpu_given: Option<u64>,
    gpu: Option<u64>,
) -> Result<weir_graphs::plan::Plan> {
    let which = match (on_gpu(g), gpu_given, gpu) {
        (true, Some(_), _) => "the GPU memory budget, --gpu-memory",
        (true, None, Some(_)) => "the GPU's default budget, its memory less 1 GiB (--gpu-memory sets another)",
        _ => "--memory-budget",
    };
    weir_graphs::plan::fit(g, budget, prefetch, reserve).map_err(|e| match e {
        weir_graphs::Error::Placement(m) => {
            Error::Model(weir_graphs::Error::Placement(format!("{m} (the budget is {which})")))
        }
        e => Error::Model(e),
    })
}

/// The host's side of a plan: the host pools' split ([`host_split`]), and for a GPU graph given
/// both budgets the weights held in DRAM beyond those pools and `extra` bytes of others (expert
/// caches) ([`hold_in_dram`]). Returns the host split.
pub fn place_host(
    g: &mut weir_graphs::Graph,
    plan: &mut weir_graphs::plan::Plan,
    memory: Option<u64>,
    gpu: Option<u64>,
    extra: u64,
) -> weir_graphs::plan::Split {
    let host = host_split(g, plan);
    hold_in_dram(g, plan, memory, gpu, host.weights + host.kv + host.activations + extra);
    host
}

/// The host pools' split for a plan. On a CPU graph it is the plan's. On a GPU graph the plan
/// fitted GPU memory, and the weights it keeps there are uploaded once and leave the host:
/// the host's weights pool is what the plan streams through (at least one operator's weights
/// at once), so that the streamed copies a GPU holds — each keeps its host buffer — stay
/// within the room the plan left them in GPU memory.
pub fn host_split(g: &weir_graphs::Graph, plan: &weir_graphs::plan::Plan) -> weir_graphs::plan::Split {
    let mut split = plan.split;
    if on_gpu(g) {
        let one_op = plan.minimum - split.kv - split.activations;
        let kept_on_gpu: u64 = weir_graphs::plan::kept_tensors(g)
            .filter(|&(node, port, _)| {
                g.edges
                    .iter()
                    .filter(|e| e.from.node == node && e.from.port == port)
                    .all(|e| crate::compile::node_gpu(g, e.to.node).is_some())
            })
            .map(|(_, _, bytes)| bytes)
            .sum();
        split.weights = split.weights.saturating_sub(kept_on_gpu).max(one_op);
    }
    split
}

fn on_gpu(g: &weir_graphs::Graph) -> bool {
    (0..g.nodes.len()).any(|n| crate::compile::node_gpu(g, n).is_some())
}

/// FlexGen's three tiers for a graph with GPU lanes given both budgets: `plan` (fitted into the
/// GPU memory) keeps what fits on the GPU; of the rest, the memory budget beyond the host pools
/// the plan sized (`pools` bytes: the streaming window, KV cache, activations) holds weights in
/// DRAM, sent every pass from there (`weir_graphs::plan::hold`); what is left is read from
/// storage every pass. Returns the bytes held.
pub fn hold_in_dram(
    g: &mut weir_graphs::Graph,
    plan: &mut weir_graphs::plan::Plan,
    memory: Option<u64>,
    gpu: Option<u64>,
    pools: u64,
) -> u64 {
    if let (true, Some(_), Some(m)) = (on_gpu(g), gpu, memory) {
        weir_graphs::plan::hold(g, plan, m.saturating_sub(pools));
    }
    plan.held_bytes
}

/// The GPU memory a graph's plan fits into when `--gpu-memory` is not given: each device's
/// default pool (its memory less `weir_runtime::gpu::HEADROOM`), the smallest if several. So
/// weights that do not fit stream, and the KV cache is admitted within it, as under an explicit
/// budget. `None` without GPU lanes, or where a device cannot be opened (the program's start
/// then says why).
pub fn default_gpu_memory(g: &weir_graphs::Graph) -> Option<u64> {
    let mut devices: Vec<usize> = (0..g.nodes.len()).filter_map(|n| crate::compile::node_gpu(g, n)).collect();
    devices.sort_unstable();
    devices.dedup();
    devices.iter().map(|&d| weir_runtime::gpu::default_budget(d).ok().map(|b| b as u64)).min().flatten()
}

/// What the scheduler needs to know of the model.
#[derive(Clone)]
struct SchedParams {
    eos: Vec<u32>,
    max_positions: usize,
    vocab: usize,
    max_batch: usize,
    micro_batches: usize,
    pass_tokens: usize,
    /// KV blocks per layer the reserve holds (`None`: no budget, no limit).
    kv_blocks: Option<usize>,
    /// Each GPU's memory budget, for the compiler.
    gpu_memory: Option<usize>,
}

/// A running model. Dropping it shuts it down. If an actor fails (an I/O error, a file changed
/// under a loader), the requests in flight fail with the cause, and the next request starts the
/// program afresh: the engine stays usable.
pub struct Engine {
    run: Mutex<Running>,
    graph: weir_graphs::Graph,
    trace: bool,
    env: weir_operators::OpEnv,
    sched: SchedParams,
    graph_dump: String,
    pools: Vec<weir_runtime::Pool>,
    meter: weir_runtime::TierMeter,
    budget: Option<u64>,
    plan: Option<weir_graphs::plan::Plan>,
    disk_bytes: Arc<std::sync::atomic::AtomicU64>,
    expert_plan: Option<weir_graphs::experts::ExpertPlan>,
}

fn start(graph: &weir_graphs::Graph, trace: bool, env: &weir_operators::OpEnv, p: &SchedParams) -> Result<Running> {
    let Compiled { program, entry, exit } = compile(graph, trace, env, p.micro_batches, p.gpu_memory)?;
    let program = Arc::new(Mutex::new(Some(program)));
    let (cmds, cmd_rx) = crossbeam_channel::bounded::<Cmd>(1024);
    let sched = Scheduler { cmds: cmd_rx, entry, exit, program: program.clone(), p: p.clone(), kv_free: p.kv_blocks };
    let scheduler = std::thread::Builder::new()
        .name("weir-scheduler".into())
        .spawn(move || sched.run())
        .map_err(|e| Error::Runtime(weir_runtime::Error::Spawn { lane: "scheduler".into(), reason: e.to_string() }))?;
    Ok(Running { cmds: Some(cmds), scheduler: Some(scheduler), program })
}

impl Engine {
    /// Compiles `model` onto this machine and starts it. Weights load in the background;
    /// the first pass waits for them.
    pub fn new(model: &Model, opts: EngineOptions) -> Result<Engine> {
        let mut graph = model.graph(
            opts.graph.as_ref().map(|(t, f)| (t.as_str(), f.as_str())),
            opts.threads,
            opts.kv_dtype,
            opts.loader_lanes,
        )?;
        let max_positions = model.config.max_position_embeddings;
        if opts.max_pass_tokens == 0 {
            return Err(Error::Request("max_pass_tokens 0: a pass needs at least one token".into()));
        }
        let micro_batches = opts.micro_batches.max(1);
        // Every sequence of a decode step fits one pass.
        let max_batch = opts.max_batch.clamp(1, opts.max_pass_tokens * micro_batches);
        let reserve = opts.reserve(max_positions);
        // Experts first: their stores' caches come out of a host budget, the resident experts
        // are weights like any other for the plan that fits the rest.
        let mut experts = opts.experts.clone();
        if let Some(t) = experts.as_mut().and_then(|p| p.twins.as_mut()) {
            crate::costs::fill(&graph, t)?;
        }
        let expert_plan = match &experts {
            Some(p) => Some(weir_graphs::experts::place(&mut graph, p)?),
            None => None,
        };
        let caches: u64 = expert_plan.as_ref().map_or(0, |p| p.stores.iter().map(|s| s.2).sum());
        let rest = |b: u64| {
            b.checked_sub(caches).filter(|&r| r > 0).ok_or_else(|| {
                Error::Request(format!(
                    "the memory budget of {b} bytes does not hold the expert caches' {caches} bytes (from the expert \
                     budget) and the rest of the model: give more memory or a smaller expert budget"
                ))
            })
        };
        let gpu_memory = opts.gpu_memory.or_else(|| default_gpu_memory(&graph));
        let planned = planned_budget(&graph, opts.memory_budget, gpu_memory);
        prefetch_needs_budget(opts.prefetch, planned)?;
        let (plan, split) = match (planned, graph.host_budget) {
            (Some(b), _) => {
                // The expert caches are host memory: on a GPU graph they come out of the memory
                // budget (with the DRAM tier, `place_host`), not out of the GPU's.
                let b = if on_gpu(&graph) {
                    if let Some(m) = opts.memory_budget {
                        rest(m)?;
                    }
                    b
                } else {
                    rest(b)?
                };
                let mut plan = fit(&mut graph, b, opts.prefetch, &reserve, opts.gpu_memory, gpu_memory)?;
                let host = place_host(&mut graph, &mut plan, opts.memory_budget, gpu_memory, caches);
                (Some(plan.clone()), Some(host))
            }
            // A graph file's own budget: its placement stands, the reserve comes off the top.
            (None, Some(b)) => (None, Some(weir_graphs::plan::split(&graph, rest(b)?, &reserve, 0)?)),
            (None, None) => (None, None),
        };
        if micro_batches > 1 {
            weir_graphs::plan::share_streamed(&mut graph, micro_batches as u32);
        }
        let graph_dump = weir_graphs::format::print::print(&graph);
        if let Ok(dir) = std::env::var("WEIR_DUMP_GRAPH") {
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(std::path::Path::new(&dir).join("graph.weir"), &graph_dump);
            let _ = std::fs::write(std::path::Path::new(&dir).join("graph.dot"), graph.dot());
        }
        // One meter over the host tier's pools: weights, KV cache, activations, expert caches.
        let meter = weir_runtime::TierMeter::new();
        let pool = |name: &str, part: fn(&weir_graphs::plan::Split) -> u64, reuse: bool| {
            let budget = split.as_ref().map_or(usize::MAX, |s| part(s) as usize);
            weir_runtime::Pool::with(name, weir_runtime::Tier::Host, budget, reuse, Some(&meter))
        };
        let env = weir_operators::OpEnv {
            host_pool: Some(pool("weights", |s| s.weights, true)),
            kv_pool: pool("kv", |s| s.kv, true),
            // Activation sizes change with every pass: freed at once, not kept.
            activations: pool("activations", |s| s.activations, false),
            disk_bytes: Default::default(),
            routing: Arc::new(if opts.log_routes { RoutingStats::logging() } else { RoutingStats::default() }),
            expert_cache: Default::default(),
            host_meter: Some(meter.clone()),
            bf16_as_f16: opts.bf16_as_f16,
            held_pool: plan.as_ref().filter(|p| p.held_bytes > 0).map(|p| {
                weir_runtime::Pool::with("held", weir_runtime::Tier::Host, p.held_bytes as usize, false, Some(&meter))
            }),
        };
        let disk_bytes = env.disk_bytes.clone();
        let pools: Vec<weir_runtime::Pool> =
            env.host_pool.iter().cloned().chain([env.kv_pool.clone(), env.activations.clone()]).collect();
        let per_block = weir_graphs::plan::kv_bytes_per_block(&graph);
        let sched = SchedParams {
            eos: model.config.eos_token_ids.clone(),
            max_positions,
            vocab: model.config.vocab_size,
            max_batch,
            micro_batches,
            pass_tokens: opts.max_pass_tokens,
            kv_blocks: split.map(|s| s.kv.checked_div(per_block).map_or(usize::MAX, |b| b as usize)),
            gpu_memory: gpu_memory.map(|b| b as usize),
        };
        let run = start(&graph, opts.trace, &env, &sched)?;
        let held = plan.as_ref().map_or(0, |p| p.held_bytes);
        let budget = split.map(|s| s.weights + s.kv + s.activations + caches + held);
        Ok(Engine {
            run: Mutex::new(run),
            graph,
            trace: opts.trace,
            env,
            sched,
            graph_dump,
            pools,
            meter,
            budget,
            plan,
            disk_bytes,
            expert_plan,
        })
    }

    pub fn submit(&self, req: Request) -> Result<Generation> {
        if req.prompt.is_empty() {
            return Err(Error::Request("the prompt is empty".into()));
        }
        if let Some((i, id)) = req.prompt.iter().enumerate().find(|(_, &id)| id as usize >= self.sched.vocab) {
            return Err(Error::Request(format!(
                "prompt token {i} is id {id}, outside the vocabulary (size {})",
                self.sched.vocab
            )));
        }
        if req.prompt.len() > self.sched.max_positions {
            return Err(Error::Request(format!(
                "the prompt has {} tokens, more than max_position_embeddings ({})",
                req.prompt.len(),
                self.sched.max_positions
            )));
        }
        if let Some(blocks) = self.sched.kv_blocks {
            let need = kv_tokens_needed(req.prompt.len(), req.max_new_tokens, self.sched.max_positions);
            let bt = weir_operators::attention::KV_BLOCK_TOKENS;
            if need / bt > blocks {
                return Err(Error::Request(format!(
                    "the request needs KV cache for {need} positions (prompt {} + up to {} new tokens, in blocks of {bt}) \
                     but the memory budget reserves {} (raise --kv-tokens, or --memory-budget)",
                    req.prompt.len(),
                    req.max_new_tokens,
                    blocks.saturating_mul(bt)
                )));
            }
        }
        let s = &req.sampling;
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return Err(Error::Request(format!("temperature {} must be a finite number ≥ 0", s.temperature)));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(Error::Request(format!("top_p {} must be in (0, 1]", s.top_p)));
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
            return Ok(Generation { events: rx });
        }
        let mut run = self.run.lock().map_err(|_| Error::Stopped(None))?;
        if run.fault().is_some() {
            // The last program failed (its requests were told why): start afresh.
            let _ = run.stop();
            *run = start(&self.graph, self.trace, &self.env, &self.sched)?;
        }
        let cmds = run.cmds.as_ref().ok_or(Error::Stopped(None))?;
        cmds.send(Cmd::Submit(req, tx)).map_err(|_| Error::Stopped(run.fault()))?;
        Ok(Generation { events: rx })
    }

    /// Submits and waits.
    pub fn generate(&self, req: Request) -> Result<Output> {
        self.submit(req)?.wait()
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
                    tier: format!("{:?}", p.tier()),
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
                budget: self.budget,
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

    /// The host budget all pools share, if any.
    pub fn host_budget(&self) -> Option<u64> {
        self.budget
    }

    /// How often the routers of a mixture-of-experts model chose each expert, per layer (and
    /// every token's choice, with [`EngineOptions::log_routes`]).
    pub fn routing(&self) -> &RoutingStats {
        &self.env.routing
    }

    /// Bytes read from storage by the loaders since the engine started.
    pub fn disk_bytes_read(&self) -> u64 {
        self.disk_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Where the weights streamed every pass are: (file, offset, bytes), in reading order.
    pub fn streamed_ranges(&self) -> Vec<(std::path::PathBuf, u64, u64)> {
        let mut out = Vec::new();
        for n in &self.graph.nodes {
            if let weir_operators::OpConfig::Load { tensors, streamed, .. } = &n.op {
                for (t, s) in tensors.iter().zip(streamed) {
                    if *s {
                        out.push((t.path.clone(), t.offset, t.nbytes()));
                    }
                }
            }
        }
        out
    }

    /// Where the expert placement put each expert, when an expert budget was given.
    pub fn expert_plan(&self) -> Option<&weir_graphs::experts::ExpertPlan> {
        self.expert_plan.as_ref()
    }

    /// Expert stores' hits, misses, evictions and bytes read since the engine started.
    pub fn expert_cache(&self) -> &weir_operators::expert_store::ExpertCacheStats {
        &self.env.expert_cache
    }

    /// What the memory planner decided, when a budget was given.
    pub fn plan(&self) -> Option<&weir_graphs::plan::Plan> {
        self.plan.as_ref()
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

/// Requests not yet admitted, with the time each was submitted.
type Waiting = VecDeque<(Request, Sender<Event>, Instant)>;

struct Active {
    id: u64,
    req: Request,
    events: Sender<Event>,
    /// Positions in the KV cache (prompt chunks done, then one per decode step).
    pos: usize,
    last: u32,
    generated: usize,
    submitted: Instant,
    started: Option<Instant>,
    first_token: Option<Instant>,
    /// KV blocks set aside for the sequence's whole length.
    kv_blocks: usize,
    /// Prompt logits gathered over prefill chunks (`LogitsMode::AllPositions`).
    prompt_logits: Vec<Vec<f32>>,
}

impl Active {
    fn prefilled(&self) -> bool {
        self.pos >= self.req.prompt.len()
    }
}

struct Scheduler {
    cmds: Receiver<Cmd>,
    entry: weir_runtime::ExternalTx<Packet>,
    exit: weir_runtime::ExternalRx<Packet>,
    program: Arc<Mutex<Option<Program>>>,
    p: SchedParams,
    /// KV blocks not promised to an admitted sequence (`None`: no limit).
    kv_free: Option<usize>,
}

impl Scheduler {
    fn run(mut self) {
        let mut active: Vec<Active> = Vec::new();
        let mut waiting: Waiting = VecDeque::new();
        let mut release: Vec<u64> = Vec::new();
        let mut next_id = 0u64;
        let mut pass = 0u64;
        let mut open = true;
        loop {
            // Take in new requests; block for one only when there is nothing else to do.
            while open {
                let idle = active.is_empty() && release.is_empty() && waiting.is_empty();
                let cmd = if idle {
                    self.cmds.recv().map_err(|_| crossbeam_channel::TryRecvError::Disconnected)
                } else {
                    self.cmds.try_recv()
                };
                match cmd {
                    Ok(Cmd::Submit(req, events)) => waiting.push_back((req, events, Instant::now())),
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => open = false,
                }
            }
            // Admit in arrival order while there is a slot and the KV reserve holds the whole
            // sequence (so attention never runs out of blocks mid-generation).
            while active.len() < self.p.max_batch {
                let Some((req, _, _)) = waiting.front() else { break };
                let blocks = kv_tokens_needed(req.prompt.len(), req.max_new_tokens, self.p.max_positions)
                    / weir_operators::attention::KV_BLOCK_TOKENS;
                if let Some(free) = &mut self.kv_free {
                    if blocks > *free {
                        break;
                    }
                    *free -= blocks;
                }
                let Some((req, events, submitted)) = waiting.pop_front() else { break };
                active.push(Active {
                    id: next_id,
                    req,
                    events,
                    pos: 0,
                    last: 0,
                    generated: 0,
                    submitted,
                    started: None,
                    first_token: None,
                    kv_blocks: blocks,
                    prompt_logits: Vec::new(),
                });
                next_id += 1;
            }
            if active.is_empty() && release.is_empty() {
                // With nothing running the whole reserve is free, and `submit` refuses what
                // could never fit: the queue is empty here.
                for (_, events, _) in waiting.drain(..) {
                    let _ = events.send(Event::Failed("the request does not fit the KV cache reserve".into()));
                }
                if open {
                    continue;
                }
                return;
            }

            // One pass per micro-batch: sequence i rides in micro-batch i mod K. Decoding
            // sequences go first (one token each); prompts fill what is left of the pass's
            // tokens, in chunks, their KV cache growing chunk by chunk.
            let k = self.p.micro_batches;
            let now = Instant::now();
            let mut sent: Vec<(Arc<Batch>, Vec<usize>)> = Vec::with_capacity(k);
            for g in 0..k {
                let group: Vec<usize> = (g..active.len()).step_by(k).collect();
                let decoding = group.iter().filter(|&&i| active[i].prefilled());
                let prefilling = group.iter().filter(|&&i| !active[i].prefilled());
                let order: Vec<usize> = decoding.chain(prefilling).copied().collect();
                let (mut ids, mut seqs, mut members) = (Vec::new(), Vec::new(), Vec::new());
                let mut room = self.p.pass_tokens;
                for i in order {
                    if room == 0 {
                        break;
                    }
                    let a = &mut active[i];
                    let plen = a.req.prompt.len();
                    let (toks, logits) = if a.pos < plen {
                        let end = plen.min(a.pos + room);
                        let logits = match (a.req.logits, end == plen) {
                            (LogitsMode::AllPositions, _) => LogitsWanted::All,
                            (_, false) => LogitsWanted::Skip,
                            (LogitsMode::None, true) => LogitsWanted::None,
                            (LogitsMode::Steps, true) => LogitsWanted::Last,
                        };
                        (a.req.prompt[a.pos..end].to_vec(), logits)
                    } else {
                        let logits =
                            if a.req.logits == LogitsMode::None { LogitsWanted::None } else { LogitsWanted::Last };
                        (vec![a.last], logits)
                    };
                    room -= toks.len();
                    a.started.get_or_insert(now);
                    seqs.push(SeqSlice { id: a.id, start: a.pos, len: toks.len(), logits, sampling: a.req.sampling });
                    ids.extend(toks);
                    members.push(i);
                }
                let release = if g == 0 { std::mem::take(&mut release) } else { Vec::new() };
                let batch = Arc::new(Batch { pass, seqs, release });
                pass += 1;
                if self.entry.send(Packet::Tokens { batch: batch.clone(), ids: Arc::new(ids) }).is_err() {
                    self.fail_all(&mut active, &mut waiting);
                    return;
                }
                sent.push((batch, members));
            }
            let mut finished = Vec::new();
            for (batch, members) in &sent {
                let Some(Packet::Sampled { tokens, logits, .. }) = self.exit.recv() else {
                    self.fail_all(&mut active, &mut waiting);
                    return;
                };
                let done_at = Instant::now();
                let mut row = 0;
                for ((&i, s), tok) in members.iter().zip(&batch.seqs).zip(tokens) {
                    let a = &mut active[i];
                    let rows = Batch::logit_rows(s);
                    let mut mine: Vec<Vec<f32>> = match &logits {
                        Some(l) if s.logits != LogitsWanted::None => (row..row + rows)
                            .map(|r| l.f32()[r * self.p.vocab..(r + 1) * self.p.vocab].to_vec())
                            .collect(),
                        _ => Vec::new(),
                    };
                    row += rows;
                    a.pos += s.len;
                    if !a.prefilled() {
                        // A prompt chunk before the last: its cache is all it leaves.
                        a.prompt_logits.extend(mine);
                        continue;
                    }
                    if s.logits == LogitsWanted::All {
                        a.prompt_logits.extend(mine.iter().cloned());
                        let _ = a.events.send(Event::PromptLogits(std::mem::take(&mut a.prompt_logits)));
                    }
                    a.last = tok;
                    a.generated += 1;
                    if a.first_token.is_none() {
                        a.first_token = Some(done_at);
                    }
                    let _ = a.events.send(Event::Token { id: tok, logits: mine.pop() });
                    let finish = if a.req.stop_at_eos && self.p.eos.contains(&tok) {
                        Some(FinishReason::Eos)
                    } else if a.generated >= a.req.max_new_tokens {
                        Some(FinishReason::MaxTokens)
                    } else if a.pos >= self.p.max_positions {
                        Some(FinishReason::ContextFull)
                    } else {
                        None
                    };
                    if let Some(f) = finish {
                        let (st, ft) = (a.started.unwrap_or(done_at), a.first_token.unwrap_or(done_at));
                        let stats = Stats {
                            finish: f,
                            prompt_tokens: a.req.prompt.len(),
                            generated_tokens: a.generated,
                            queued_s: secs(st - a.submitted),
                            prefill_s: secs(ft - st),
                            decode_s: secs(done_at - ft),
                        };
                        let _ = a.events.send(Event::Done(stats));
                        finished.push(i);
                    }
                }
            }
            finished.sort_unstable();
            for i in finished.into_iter().rev() {
                let a = active.remove(i);
                // Its blocks return to the pool when the next pass's release reaches each
                // attention operator — before any sequence admitted now adds to the cache.
                if let Some(free) = &mut self.kv_free {
                    *free += a.kv_blocks;
                }
                release.push(a.id);
            }
        }
    }

    fn fail_all(&self, active: &mut Vec<Active>, waiting: &mut Waiting) {
        let fault = self.program.lock().ok().and_then(|p| p.as_ref().and_then(|p| p.fault()));
        let msg = fault.map_or_else(|| "the engine stopped".to_string(), |e| e.to_string());
        for a in active.drain(..) {
            let _ = a.events.send(Event::Failed(msg.clone()));
        }
        for (_, events, _) in waiting.drain(..) {
            let _ = events.send(Event::Failed(msg.clone()));
        }
        while let Ok(Cmd::Submit(_, events)) = self.cmds.try_recv() {
            let _ = events.send(Event::Failed(msg.clone()));
        }
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}
