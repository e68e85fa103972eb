//! `weir bench`: end-to-end throughput, side by side with the machine's memory-read bandwidth
//! measured in the same run.

use crate::engine::{Engine, EngineOptions, Request};
use crate::error::{Error, Result};
use crate::model::Model;
use std::time::Instant;
use weir_kernels::Parallel;
use weir_operators::Sampling;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub threads: usize,
    pub seed: u64,
    /// A graph file to run instead of the built-in one: (text, file name).
    pub graph: Option<(String, String)>,
}

/// What was measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchReport {
    pub batch: usize,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub threads: usize,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub total_tokens_per_s: f64,
    /// Memory-read bandwidth of this machine with `threads` threads: the higher of two probes,
    /// one before and one after the generation, in this run.
    pub memory_read_gb_per_s: f64,
    /// Weight bytes one decode step reads (every matrix once).
    pub weight_bytes_per_token: u64,
    /// Decode steps per second if weights streamed at `memory_read_gb_per_s`.
    pub bandwidth_bound_steps_per_s: f64,
    /// Decode steps per second achieved ÷ the bound (1.0 = at the roofline).
    pub fraction_of_bandwidth_bound: f64,
    /// Achieved FLOP/s in prefill (2 × parameters × tokens).
    pub prefill_flops_per_s: f64,
}

/// Reads a buffer of `bytes` with the cores of a lane of `threads` cores and returns the best
/// of a few rounds, in GB/s.
pub fn read_bandwidth(threads: usize, bytes: usize) -> Result<f64> {
    let cores = weir_runtime::lane::allowed_cpus();
    let threads = threads.clamp(1, cores.len());
    let pool = weir_runtime::WorkerPool::new("bw", &cores[1..threads])?;
    // f32 data summed into 32 independent lanes: the compiler turns this into wide vector
    // loads and adds, so the loop is bound by memory, not by the adds.
    let words = bytes / 4;
    let mut buf = vec![0f32; words];
    for (i, w) in buf.iter_mut().enumerate().step_by(1024) {
        *w = i as f32;
    }
    let tasks = pool.threads() * 4;
    let sums: Vec<std::sync::Mutex<f32>> = (0..tasks).map(|_| Default::default()).collect();
    let mut best = 0f64;
    for _ in 0..8 {
        let t0 = Instant::now();
        pool.run(tasks, &|i| {
            let r = weir_kernels::par::split_range(words, tasks, 64, i);
            let mut acc = [0f32; 32];
            for c in buf[r].chunks_exact(32) {
                for j in 0..32 {
                    acc[j] += c[j];
                }
            }
            if let Ok(mut s) = sums[i].lock() {
                *s = acc.iter().sum();
            }
        });
        best = best.max((words * 4) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    std::hint::black_box(&sums);
    Ok(best)
}

/// Runs the benchmark: `batch` random prompts of `prompt_len` tokens, `gen_len` tokens each.
pub fn run(model: &Model, o: &BenchOptions) -> Result<BenchReport> {
    if o.batch == 0 || o.prompt_len == 0 || o.gen_len == 0 {
        return Err(Error::Request("--batch, --prompt-len and --gen-len must be positive".into()));
    }
    if o.prompt_len + o.gen_len > model.config.max_position_embeddings {
        return Err(Error::Request(format!(
            "--prompt-len {} + --gen-len {} exceeds max_position_embeddings {}",
            o.prompt_len, o.gen_len, model.config.max_position_embeddings
        )));
    }
    let bw_before = read_bandwidth(o.threads, 1 << 30)?;
    let engine =
        Engine::new(model, EngineOptions { threads: o.threads, graph: o.graph.clone(), ..Default::default() })?;
    // Warm up: wait for the loaders, touch every weight once.
    engine.generate(Request { stop_at_eos: false, ..Request::greedy(vec![1, 2, 3], 2) })?;
    let mut rng = weir_operators::sampler::Rng::new(o.seed);
    let vocab = model.config.vocab_size as u64;
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
    engine.shutdown()?;
    // The machine is shared and its bandwidth drifts: probe again after the run and keep the
    // higher figure, so the reported fraction of the bound is the conservative one.
    let bw = bw_before.max(read_bandwidth(o.threads, 1 << 30)?);
    // All sequences share passes: prefill ends with the last first token, decode with the last.
    let prefill_s = outs.iter().map(|o| o.stats.prefill_s).fold(0.0, f64::max);
    let decode_s = outs.iter().map(|o| o.stats.decode_s).fold(0.0, f64::max);
    let wb = model.weight_bytes_per_token();
    let steps_per_s = (o.gen_len.saturating_sub(1)) as f64 / decode_s.max(1e-9);
    let bound = bw * 1e9 / wb as f64;
    let params = model.config.parameter_count() as f64;
    Ok(BenchReport {
        batch: o.batch,
        prompt_len: o.prompt_len,
        gen_len: o.gen_len,
        threads: o.threads,
        prefill_tokens_per_s: (o.batch * o.prompt_len) as f64 / prefill_s.max(1e-9),
        decode_tokens_per_s: o.batch as f64 * steps_per_s,
        total_tokens_per_s: (o.batch * o.gen_len) as f64 / total_s,
        memory_read_gb_per_s: bw,
        weight_bytes_per_token: wb,
        bandwidth_bound_steps_per_s: bound,
        fraction_of_bandwidth_bound: steps_per_s / bound,
        prefill_flops_per_s: 2.0 * params * (o.batch * o.prompt_len) as f64 / prefill_s.max(1e-9),
    })
}
