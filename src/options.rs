//! How to build an engine: every option, checked in one place, so a bad value gets the same
//! message from the CLI and from the embedded API.

use crate::error::{Error, Result};
use weir_graphs::place::experts::ExpertPlacement;
use weir_graphs::place::memory::Reserve;
use weir_graphs::PlaceOptions;
use weir_operators::KvType;

/// Prompts shorter than this go from a prefill worker to its decode worker as one transfer
/// after prefill (`EngineOptions::kv_bulk_below`).
pub const KV_BULK_BELOW: usize = 0;

/// Which phases of requests an engine runs (Splitwise's split: `crate::split`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Role {
    /// Both, and it takes KV caches from prefill workers too.
    #[default]
    Mixed,
    /// Prompts only: its attention exports the KV cache to decode workers.
    Prefill,
    /// Decoding from KV caches prefill workers send (and whole requests, as `Mixed`).
    Decode,
}

impl Role {
    /// As `--role` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Mixed => "mixed",
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
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
    /// Most requests waiting to be admitted; a request past it is refused with
    /// [`crate::Error::Busy`] (`None`: no bound).
    pub max_queue: Option<usize>,
    /// A graph file to run instead of the architecture's built-in one: (text, file name).
    pub graph: Option<(String, String)>,
    /// Host memory in bytes for weights, KV cache and activations together: the KV cache and
    /// activations are reserved first, and weights that do not fit the rest stay on disk and
    /// stream every pass (see `weir_graphs::place::memory`).
    pub memory_budget: Option<u64>,
    /// Layers of weights reading may run ahead of compute under a budget; 0 turns overlap off.
    pub prefetch: Option<usize>,
    /// Throughput mode: each step runs the active sequences as this many micro-batches, and one
    /// load of a streamed layer serves all of them.
    pub micro_batches: usize,
    /// Under a budget: positions of KV cache to reserve over all sequences in flight (each
    /// sequence holds whole blocks of 16; see [`crate::kv_tokens_needed`]). Requests wait until their
    /// whole length fits; one that could never fit is refused. Giving it where nothing budgets
    /// the KV cache (no budget option, none in the graph file, no GPU) is an error.
    pub kv_tokens: Option<usize>,
    /// The KV reserve when `kv_tokens` is not given: default 2048, or the context if shorter.
    /// (`weir run` sets it to what its one request needs.)
    pub kv_tokens_default: Option<usize>,
    /// The most tokens in one pass: longer prompts are prefilled in chunks of this many (it
    /// bounds activation memory, which the budget reserves for it).
    pub max_pass_tokens: usize,
    /// Element type of the KV cache (the graph's `kv_dtype` variable): bf16 or f16 halve its
    /// memory and the bytes attention reads, at the cost of rounding keys and values.
    pub kv_dtype: KvType,
    /// Keep every token's expert choices (mixture-of-experts models), for
    /// [`crate::Engine::routing`].
    /// Counts per layer and expert are always kept.
    pub log_routes: bool,
    /// Mixture-of-experts models: fast-tier bytes for expert weights; the most used experts
    /// stay resident, the rest are read from storage when chosen into a bounded cache (see
    /// `weir_graphs::place::experts`). `None`: every expert resident.
    pub experts: Option<ExpertPlacement>,
    /// Hold resident bf16 weight matrices as f16, rewritten in place as they are read: on a
    /// CPU without bf16 instructions f16 is cheaper to widen (on the AVX2 machine of
    /// BENCHMARKS.md batch-32 decode went from 43.9 to 58.7 tokens/s; at batch 1 no change).
    /// Exact for magnitudes from 2⁻¹⁴ to 65504; smaller ones are off by at most 2⁻²⁵; a matrix
    /// with a larger value stays bf16 (see `weir_kernels::convert`).
    pub bf16_as_f16: bool,
    /// The budget of each GPU's memory pool, shared by its lanes' weights, KV cache and
    /// activations (`None`: the device's memory less 1 GiB, which the weights and the KV cache
    /// are then planned into as under an explicit budget). Only graphs with GPU lanes use it.
    pub gpu_memory: Option<u64>,
    /// Which phases it runs: a prefill worker's attention exports its KV cache.
    pub role: Role,
    /// Export the KV cache whatever the role (a mixed worker that prefills for decode workers).
    pub export_kv: bool,
    /// A graph over several processes (`process` statements): which process's part to place
    /// (`None`: `main`, the one an `Engine` runs; the others run `weir::pipeline::run_worker`).
    pub process: Option<String>,
    /// How long `main` waits for the other processes of its graph to connect each edge.
    pub connect_timeout: std::time::Duration,
    /// A prefill worker sends the KV cache of a prompt shorter than this as one transfer
    /// after prefill, and a longer one layer by layer while it runs (see BENCHMARKS.md,
    /// phase splitting, for how the default was measured).
    pub kv_bulk_below: usize,
}

impl EngineOptions {
    /// Checks the options that need no model: what each needs, their ranges. The message names
    /// the option by its `weir` flag.
    pub fn check(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Request(m.to_string()));
        if self.micro_batches == 0 {
            return bad("--micro-batches 0: a step needs at least one micro-batch");
        }
        if self.max_pass_tokens == 0 {
            return bad("--max-pass-tokens 0: a pass needs at least one token");
        }
        if self.max_batch == 0 {
            return bad("max_batch 0: a pass needs at least one sequence");
        }
        for (b, flag) in [(self.memory_budget, "--memory-budget"), (self.gpu_memory, "--gpu-memory")] {
            if b == Some(0) {
                return Err(Error::Request(format!("{flag} 0: a budget must be positive")));
            }
        }
        if self.kv_tokens == Some(0) {
            return bad("--kv-tokens 0: the KV cache must hold at least one position");
        }
        Ok(())
    }

    /// Checks the options against what the placement made of them: `kv_tokens` needs a budget
    /// (a flag, the graph file's own, or a GPU's).
    pub fn check_placed(&self, placed: &weir_graphs::Placed) -> Result<()> {
        if placed.graph.part.is_some() && (self.role != Role::Mixed || self.export_kv) {
            return Err(Error::Request(
                "--role prefill|decode with a graph over several processes: phase splitting moves KV caches between \
                 whole engines, a pipeline's processes share one (not built together)"
                    .into(),
            ));
        }
        if self.kv_tokens.is_some() && placed.pools.is_none() {
            return Err(Error::Request(
                "--kv-tokens needs --memory-budget or --gpu-memory, a graph file with its own `budget`, or a graph \
                 with GPU lanes on a machine with the GPU (without a budget the KV cache grows as it needs)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// What a memory budget sets aside before weights with these options, for a model whose
    /// context is `max_positions`.
    pub fn reserve(&self, max_positions: usize) -> Reserve {
        Reserve {
            kv_tokens: self.kv_tokens.or(self.kv_tokens_default).unwrap_or(2048.min(max_positions)),
            pass_tokens: self.max_pass_tokens,
            passes: self.micro_batches.max(1),
        }
    }

    /// The placement these options ask for, for a model whose context is `max_positions`.
    pub fn placement(&self, max_positions: usize) -> PlaceOptions {
        PlaceOptions {
            threads: self.threads,
            kv_dtype: self.kv_dtype,
            loader_lanes: self.loader_lanes,
            memory_budget: self.memory_budget,
            gpu_memory: self.gpu_memory,
            prefetch: self.prefetch,
            micro_batches: self.micro_batches.max(1),
            reserve: self.reserve(max_positions),
            experts: self.experts.clone(),
            export_kv: self.role == Role::Prefill || self.export_kv,
            process: self.process.clone(),
        }
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: 0,
            loader_lanes: 1,
            trace: false,
            max_batch: 256,
            max_queue: None,
            graph: None,
            memory_budget: None,
            prefetch: None,
            micro_batches: 1,
            kv_tokens: None,
            kv_tokens_default: None,
            max_pass_tokens: 256,
            kv_dtype: KvType::F32,
            log_routes: false,
            experts: None,
            bf16_as_f16: false,
            gpu_memory: None,
            role: Role::Mixed,
            export_kv: false,
            process: None,
            connect_timeout: std::time::Duration::from_secs(60),
            kv_bulk_below: KV_BULK_BELOW,
        }
    }
}
