//! `weir bench`: end-to-end throughput, side by side with the bounds measured in the same run —
//! the machine's memory-read bandwidth, the storage's read bandwidth, and the compute time per
//! step with every weight resident — so that a streamed run reports how close it comes to the
//! larger of its I/O and compute bounds (overlap efficiency).

use crate::error::{Error, Result};
use crate::model::Model;
use crate::{Engine, EngineOptions, Request};
use std::collections::BTreeMap;
use std::time::Instant;
use weir_operators::Sampling;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub seed: u64,
    /// Record a trace of the measured run.
    pub trace: bool,
    /// How to build the engine: threads, graph, `memory_budget` (weights, KV cache and
    /// activations), `prefetch`, `micro_batches`, `kv_tokens` (default here: batch × what one
    /// sequence needs), `max_pass_tokens`. The resident run drops the budget; `max_batch` is
    /// the batch.
    pub engine: EngineOptions,
}

/// What was measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub batch: usize,
    pub micro_batches: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub threads: usize,
    /// The CPU kernels' instruction set (`WEIR_CPU_ISA` or detected) and whether bf16
    /// matrices were held as f16 (`--bf16-as-f16`): what the speeds below were measured with.
    pub cpu_isa: &'static str,
    pub bf16_as_f16: bool,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    /// Memory-read bandwidth of this machine with `threads` threads: the higher of two probes,
    /// one before and one after the generation, in this run.
    pub memory_read_gb_per_s: f64,
    /// Weight bytes one decode step reads (every matrix once).
    pub weight_bytes_per_token: u64,
    /// Decode steps per second if weights streamed from memory at `memory_read_gb_per_s`.
    pub bandwidth_bound_steps_per_s: f64,
    /// Decode steps per second achieved ÷ that bound (1.0 = at the memory roofline).
    pub fraction_of_bandwidth_bound: f64,
    /// Achieved FLOP/s in prefill: every matrix (2 FLOPs per weight per token), attention
    /// (4 per query dimension per position seen) and the LM head on each prompt's last row.
    pub prefill_flops_per_s: f64,
    /// Achieved FLOP/s in decode, counted the same way (each step: every sequence's token).
    pub decode_flops_per_s: f64,
    /// Bytes the loaders read from storage during the measured generation.
    pub disk_bytes_read: u64,
    /// With `--expert-budget`: chosen experts found cached over all chosen cold experts, and
    /// the bytes expert stores read, in all and per generated token (measured generation).
    pub expert_cache_hit_rate: Option<f64>,
    pub expert_bytes_read: u64,
    pub expert_bytes_per_token: f64,
    /// Chosen experts a next-layer prediction named, over all chosen in predicted layers;
    /// experts read ahead on predictions, and how many of them were then chosen.
    pub expert_prediction_hit_rate: Option<f64>,
    pub expert_prefetches: u64,
    pub expert_prefetch_hits: u64,
    /// With `--expert-twins`: chosen cold experts computed on their own lane, and on the twins'.
    pub experts_on_own_lane: u64,
    pub experts_on_twin: u64,
    /// Those bytes ÷ the generation's time.
    pub disk_gb_per_s: f64,
    /// Storage read bandwidth (io_uring, O_DIRECT, depth 8 × 1 MiB): with streaming, the bytes
    /// that stream each step read alone right after the run (the better of two tries); without,
    /// the first GiB of the weights.
    pub disk_probe_gb_per_s: f64,
    /// Peak bytes per tier: the high-water mark of all its pools together (weights read from
    /// storage, KV cache, activations).
    pub peak_bytes: BTreeMap<String, u64>,
    /// Each pool's own high-water mark (`weights`, `kv`, `activations`).
    pub peak_bytes_by_pool: BTreeMap<String, u64>,
    /// The measured run's trace (`BenchOptions::trace`).
    #[serde(skip)]
    pub trace: Option<weir_runtime::Trace>,
    /// Weight bytes streamed per decode step.
    pub streamed_bytes_per_step: u64,
    /// Decode step time with every weight resident, measured in this run.
    pub compute_s_per_step: f64,
    /// The larger of streamed bytes ÷ disk bandwidth and `compute_s_per_step`.
    pub bound_s_per_step: f64,
    /// Decode step time achieved.
    pub actual_s_per_step: f64,
    /// `bound_s_per_step ÷ actual_s_per_step` (1.0 = transfer and compute fully overlapped).
    pub overlap_efficiency: f64,
    /// `"bypassed"`: streamed reads use O_DIRECT, the page cache cannot flatter them.
    pub page_cache: String,
}

impl BenchReport {
    /// The report as text, a line per measure, for the model at `model`.
    pub fn to_text(&self, model: &std::path::Path) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "model            {}", model.display());
        let _ = writeln!(
            s,
            "batch {} × prompt {} + gen {}, {} threads, {} kernels{}",
            self.batch,
            self.prompt_len,
            self.gen_len,
            self.threads,
            self.cpu_isa,
            if self.bf16_as_f16 { ", bf16 held as f16" } else { "" }
        );
        let _ = writeln!(
            s,
            "prefill          {:.1} tokens/s ({:.3} TFLOP/s)",
            self.prefill_tokens_per_s,
            self.prefill_flops_per_s / 1e12
        );
        let _ = writeln!(
            s,
            "decode           {:.2} tokens/s ({:.3} TFLOP/s)",
            self.decode_tokens_per_s,
            self.decode_flops_per_s / 1e12
        );
        let _ = writeln!(s, "total            {:.2} tokens/s", self.total_tokens_per_s);
        let _ = writeln!(
            s,
            "memory read      {:.1} GB/s (measured now, {} threads)",
            self.memory_read_gb_per_s, self.threads
        );
        let _ = writeln!(s, "weights / step   {:.3} GB", self.weight_bytes_per_token as f64 / 1e9);
        let _ = writeln!(
            s,
            "bandwidth bound  {:.2} steps/s; achieved {:.0}% of it",
            self.bandwidth_bound_steps_per_s,
            100.0 * self.fraction_of_bandwidth_bound
        );
        let _ = writeln!(
            s,
            "disk             {:.2} GB/s probed (O_DIRECT); {} bytes read, {:.2} GB/s during the run (page cache {})",
            self.disk_probe_gb_per_s, self.disk_bytes_read, self.disk_gb_per_s, self.page_cache
        );
        if let Some(hit) = self.expert_cache_hit_rate {
            let predicted = match self.expert_prediction_hit_rate {
                Some(p) => format!(
                    "prediction hit rate {p:.2} ({} read ahead, {} then chosen)",
                    self.expert_prefetches, self.expert_prefetch_hits
                ),
                None => "no prediction".into(),
            };
            let _ = writeln!(
                s,
                "experts          cache hit rate {hit:.2}; {predicted}; {:.3} GB read per token",
                self.expert_bytes_per_token / 1e9
            );
            if self.experts_on_own_lane + self.experts_on_twin > 0 {
                let _ = writeln!(
                    s,
                    "expert twins     {} chosen cold experts on their own lane, {} on the twins'",
                    self.experts_on_own_lane, self.experts_on_twin
                );
            }
        }
        let peaks: Vec<String> =
            self.peak_bytes.iter().map(|(k, v)| format!("{k} {:.3} GB", *v as f64 / 1e9)).collect();
        let pools: Vec<String> =
            self.peak_bytes_by_pool.iter().map(|(k, v)| format!("{k} {:.3}", *v as f64 / 1e9)).collect();
        let _ = writeln!(s, "peak memory      {} (pools: {})", peaks.join(", "), pools.join(", "));
        let _ = writeln!(
            s,
            "per decode step  streamed {:.3} GB; compute {:.4} s (resident); bound {:.4} s; actual {:.4} s; \
             overlap efficiency {:.2}",
            self.streamed_bytes_per_step as f64 / 1e9,
            self.compute_s_per_step,
            self.bound_s_per_step,
            self.actual_s_per_step,
            self.overlap_efficiency
        );
        s
    }
}

/// Reads a buffer of `bytes` with the cores of a lane of `threads` cores, in each of the
/// patterns of [`weir_kernels::probe`], and returns the best of a few rounds, in GB/s.
pub fn read_bandwidth(threads: usize, bytes: usize) -> Result<f64> {
    let cores = weir_runtime::lane::allowed_cpus();
    let threads = threads.clamp(1, cores.len());
    let pool = weir_runtime::WorkerPool::new("bw", &cores[1..threads])?;
    Ok(weir_kernels::probe::read_bandwidth(bytes, &pool))
}

struct Run {
    prefill_s: f64,
    decode_s: f64,
    total_s: f64,
    disk_bytes: u64,
    /// Expert stores during the measured generation.
    experts: weir_operators::expert_store::ExpertCounts,
    peak: BTreeMap<String, u64>,
    peak_by_pool: BTreeMap<String, u64>,
    streamed_bytes: u64,
    /// (bytes, seconds) the storage took to give the streamed ranges alone.
    streamed_read: Option<(u64, f64)>,
    trace: Option<weir_runtime::Trace>,
}

fn generate(model: &Model, o: &BenchOptions, budget: u64, prefetch: Option<usize>, trace: bool) -> Result<Run> {
    let max_positions = model.config.max_position_embeddings;
    let engine = Engine::new(
        model,
        EngineOptions {
            memory_budget: Some(budget),
            prefetch,
            max_batch: o.batch.max(1),
            kv_tokens_default: Some(o.batch * crate::kv_tokens_needed(o.prompt_len, o.gen_len, max_positions)),
            trace,
            ..o.engine.clone()
        },
    )?;
    // Warm up: wait for the loaders, touch every weight once.
    engine.generate(Request { stop_at_eos: false, ..Request::greedy(vec![1, 2, 3], 2) })?;
    let mut rng = weir_operators::sampler::Rng::new(o.seed);
    let vocab = model.config.vocab_size as u64;
    let disk0 = engine.disk_bytes_read();
    let experts0 = engine.expert_cache().snapshot();
    let t0 = Instant::now();
    let gens: Vec<_> = (0..o.batch)
        .map(|_| {
            let prompt: Vec<u32> = (0..o.prompt_len).map(|_| (rng.next_u64() % vocab) as u32).collect();
            engine.submit(Request {
                prompt,
                max_new_tokens: o.gen_len,
                sampling: Sampling::default(),
                stop_at_eos: false,
                logits: Default::default(),
            })
        })
        .collect::<Result<_>>()?;
    let outs: Vec<_> = gens.into_iter().map(|g| g.wait()).collect::<Result<_>>()?;
    let total_s = t0.elapsed().as_secs_f64();
    let disk_bytes = engine.disk_bytes_read() - disk0;
    let experts = engine.expert_cache().snapshot().since(&experts0);
    let mut peak = BTreeMap::from([("host".to_string(), engine.peak_host_bytes())]);
    // Each GPU's pool: its high-water mark against `--gpu-memory`.
    peak.extend(engine.gpu_peaks().into_iter().map(|(name, high, _)| (name, high)));
    let peak_by_pool = engine.pools().iter().map(|p| (p.name().to_string(), p.high_water() as u64)).collect();
    let streamed_bytes = engine.plan().map_or(0, |p| p.streamed_bytes);
    let trace = trace.then(|| engine.trace());
    let ranges = engine.streamed_ranges();
    engine.shutdown()?;
    // The I/O bound: the time to read what streams each step — the same bytes, the same way
    // (depth 8 × 1 MiB) — alone, right after the run; the better of two tries, as the speed of
    // a shared disk drifts.
    let streamed_read = if ranges.is_empty() {
        None
    } else {
        let mut best = (0, f64::INFINITY);
        for _ in 0..2 {
            let (bytes, secs, _) =
                weir_operators::loader::measure_read_ranges(&ranges, 8, 1 << 20).map_err(Error::Request)?;
            if secs < best.1 {
                best = (bytes, secs);
            }
        }
        Some(best)
    };
    // All sequences share passes: prefill ends with the last first token, decode with the last.
    Ok(Run {
        // Prefill ends when the last sequence has its first token, counted from submission:
        // in a batch, later prompts wait for the passes of earlier ones.
        prefill_s: outs.iter().map(|o| o.stats.queued_s + o.stats.prefill_s).fold(0.0, f64::max),
        decode_s: outs.iter().map(|o| o.stats.decode_s).fold(0.0, f64::max),
        total_s,
        disk_bytes,
        experts,
        peak,
        peak_by_pool,
        streamed_bytes,
        streamed_read,
        trace,
    })
}

/// Floating-point operations of `tokens` new tokens that see `seen` positions in all, with
/// `logit_rows` of them through the LM head. Multiply-adds count 2; norms, rotations and the
/// softmax are left out (a few per element, against thousands per weight row).
fn pass_flops(c: &weir_graphs::ModelConfig, tokens: usize, seen: usize, logit_rows: usize) -> f64 {
    let (h, m, q, kv) =
        (c.hidden_size, c.intermediate_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let matrices = (h * q + 2 * h * kv + q * h + 3 * h * m) as f64;
    let layers = c.num_hidden_layers as f64;
    layers * (2.0 * matrices * tokens as f64 + 4.0 * (q * seen) as f64) + 2.0 * (h * c.vocab_size * logit_rows) as f64
}

/// Runs the benchmark: `batch` random prompts of `prompt_len` tokens, `gen_len` tokens each —
/// once with every weight resident (the compute bound), and, with a budget, again streaming.
pub fn run(model: &Model, o: &BenchOptions) -> Result<BenchReport> {
    if o.batch == 0 || o.prompt_len == 0 || o.gen_len < 2 {
        return Err(Error::Request("--batch and --prompt-len must be positive and --gen-len at least 2".into()));
    }
    if o.prompt_len + o.gen_len > model.config.max_position_embeddings {
        return Err(Error::Request(format!(
            "--prompt-len {} + --gen-len {} exceeds max_position_embeddings {}",
            o.prompt_len, o.gen_len, model.config.max_position_embeddings
        )));
    }
    let bw_before = read_bandwidth(o.engine.threads, 1 << 30)?;
    let file = model
        .weights
        .tensors
        .values()
        .next()
        .map(|t| t.path.clone())
        .ok_or_else(|| Error::Request("the model has no tensors".into()))?;
    let (_, _, direct) = weir_operators::loader::measure_read(&file, 1 << 20, 8, 1 << 20).map_err(Error::Request)?;
    let steps = (o.gen_len - 1) as f64;
    // Every weight resident (read once, O_DIRECT): the compute-only time per step.
    let resident = generate(model, o, u64::MAX, None, o.trace && o.engine.memory_budget.is_none())?;
    let resident_step = resident.decode_s / steps;
    let run = match o.engine.memory_budget {
        Some(b) => {
            if !direct {
                // Buffered reads: drop the file from the page cache so it cannot flatter them.
                weir_operators::loader::evict_page_cache(&file).map_err(Error::Request)?;
            }
            generate(model, o, b, o.engine.prefetch, o.trace)?
        }
        None => resident,
    };
    let bw = bw_before.max(read_bandwidth(o.engine.threads, 1 << 30)?);
    let actual = run.decode_s / steps;
    let wb = model.weight_bytes_per_token();
    let io_s = run.streamed_read.map_or(0.0, |r| r.1);
    let disk_bw = match run.streamed_read {
        Some((bytes, secs)) => bytes as f64 / secs.max(1e-9),
        None => {
            let (bytes, secs, _) =
                weir_operators::loader::measure_read(&file, 1 << 30, 8, 1 << 20).map_err(Error::Request)?;
            bytes as f64 / secs.max(1e-9)
        }
    };
    let bound = io_s.max(resident_step);
    let c = &model.config;
    let (b, p) = (o.batch, o.prompt_len);
    // Prefill: b prompts of p tokens, token j seeing j + 1 positions, one logits row each.
    let prefill_flops = pass_flops(c, b * p, b * p * (p + 1) / 2, b);
    // Decode: gen_len - 1 steps; the step that feeds position p + k sees p + k + 1 positions.
    let decode_flops = pass_flops(
        c,
        b * (o.gen_len - 1),
        b * (0..o.gen_len - 1).map(|k| p + k + 1).sum::<usize>(),
        b * (o.gen_len - 1),
    );
    let steps_per_s = 1.0 / actual.max(1e-12);
    let mem_bound = bw * 1e9 / wb as f64;
    Ok(BenchReport {
        batch: o.batch,
        micro_batches: o.engine.micro_batches,
        prompt_len: o.prompt_len,
        gen_len: o.gen_len,
        threads: o.engine.threads,
        cpu_isa: weir_kernels::isa::detected().name(),
        bf16_as_f16: o.engine.bf16_as_f16,
        prefill_tokens_per_s: (o.batch * o.prompt_len) as f64 / run.prefill_s.max(1e-9),
        decode_tokens_per_s: o.batch as f64 * steps_per_s,
        total_tokens_per_s: (o.batch * o.gen_len) as f64 / run.total_s,
        memory_read_gb_per_s: bw,
        weight_bytes_per_token: wb,
        bandwidth_bound_steps_per_s: mem_bound,
        fraction_of_bandwidth_bound: steps_per_s / mem_bound,
        prefill_flops_per_s: prefill_flops / run.prefill_s.max(1e-9),
        decode_flops_per_s: decode_flops / run.decode_s.max(1e-9),
        disk_bytes_read: run.disk_bytes,
        expert_cache_hit_rate: run.experts.hit_rate(),
        expert_bytes_read: run.experts.bytes_read,
        expert_bytes_per_token: run.experts.bytes_read as f64 / (o.batch * o.gen_len).max(1) as f64,
        expert_prediction_hit_rate: run.experts.prediction_hit_rate(),
        expert_prefetches: run.experts.prefetches,
        expert_prefetch_hits: run.experts.prefetch_hits,
        experts_on_own_lane: run.experts.on_own_lane,
        experts_on_twin: run.experts.on_twin,
        disk_gb_per_s: run.disk_bytes as f64 / run.total_s / 1e9,
        disk_probe_gb_per_s: disk_bw / 1e9,
        peak_bytes: run.peak.clone(),
        peak_bytes_by_pool: run.peak_by_pool.clone(),
        streamed_bytes_per_step: run.streamed_bytes,
        compute_s_per_step: resident_step,
        bound_s_per_step: bound,
        actual_s_per_step: actual,
        overlap_efficiency: bound / actual.max(1e-12),
        page_cache: if direct { "bypassed".into() } else { "evicted".into() },
        trace: run.trace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_counts_every_matrix_weight_twice_per_token_and_attention_per_position() {
        let v = serde_json::json!({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": false});
        let c = weir_graphs::ModelConfig::from_value(std::path::Path::new("config.json"), &v).unwrap();
        // The layers' matrices: every parameter but the embedding table, the LM head and the
        // norms' weights (2 per layer and the final one).
        let matrices = c.parameter_count() - 2 * 384 * 64 - (2 * 2 + 1) * 64;
        let one = pass_flops(&c, 1, 0, 0);
        assert_eq!(one, 2.0 * matrices as f64);
        assert_eq!(pass_flops(&c, 3, 0, 0), 3.0 * one);
        // Each position seen: q·k and the weighted sum over 4 heads of 16, in 2 layers.
        assert_eq!(pass_flops(&c, 1, 10, 0) - one, 10.0 * 4.0 * 64.0 * 2.0);
        assert_eq!(pass_flops(&c, 1, 0, 2) - one, 2.0 * 2.0 * 64.0 * 384.0);
    }
}
