//! The `weir` command line: a thin layer over the `weir` library.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use weir::{Engine, EngineOptions, Event, KvType, LogitsMode, Model, Request, Sampling};
use weir_graphs::place::experts::{ExpertBudget, ExpertPlacement, Twins};

mod load;
mod route;
mod trace;
mod worker;

#[derive(Parser)]
#[command(name = "weir", version, about = "Run large language models on every device of one machine")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text from a prompt.
    Run(RunArgs),
    /// Write a random-weight model of a named shape (for benchmarks and demos).
    Synth(SynthArgs),
    /// Measure prefill and decode throughput against the machine's memory bandwidth.
    Bench(BenchArgs),
    /// Serve the OpenAI API (completions, chat completions, models, health, metrics) over HTTP.
    Serve(ServeArgs),
    /// Route OpenAI requests over prefill and decode workers (`weir serve --role …`): the KV
    /// cache streams from prefill to decode layer by layer.
    Route(route::RouteArgs),
    /// Run one process's part of a graph over several processes (`process` statements in the
    /// graph file): the layers on its lanes, the edges to the others over the network.
    Worker(worker::WorkerArgs),
    /// Load OpenAI-compatible servers with Poisson arrivals at several rates, side by side:
    /// throughput and TTFT / TBT / end-to-end percentiles, an SVG of latency against load.
    Load(load::LoadArgs),
    /// Check, show and draw graph definition files.
    #[command(subcommand)]
    Graph(GraphCmd),
    /// Read a trace written by `--trace`.
    #[command(subcommand)]
    Trace(trace::TraceCmd),
    /// Measure a GPU.
    #[command(subcommand)]
    Gpu(GpuCmd),
}

#[derive(Subcommand)]
enum GpuCmd {
    /// Host → device copy bandwidth: from a host pool's buffer pinned as the copy lanes pin
    /// theirs, from plain pinned memory (the plain cudaMemcpy) and from pageable memory, in one
    /// run.
    Copy {
        /// Bytes per copy.
        #[arg(long, default_value = "256MiB")]
        bytes: String,
        /// The GPU.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Copies from each source (they take turns); the best of each is reported.
        #[arg(long, default_value_t = 10)]
        rounds: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum GraphCmd {
    /// Parse and check a graph file; all problems are reported as file:line:col: message.
    Check {
        /// The graph file.
        file: PathBuf,
        /// Check against this model (variables, tensor names and shapes).
        #[arg(long)]
        model: Option<PathBuf>,
        /// The `threads` variable.
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
    /// Print the compiled, placed graph in the graph-file format.
    Show(GraphArgs),
    /// Print the compiled, placed graph as Graphviz DOT.
    Dot(GraphArgs),
}

#[derive(Args)]
struct GraphArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// The `threads` variable (0 = all CPUs).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Placement as `weir run` would do it (`--graph`, `--memory-budget`, `--prefetch`, …).
    #[command(flatten)]
    place: PlaceArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// Prompt text (encoded with the model's tokenizer).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt token ids, comma-separated (e.g. 1,2,3).
    #[arg(long)]
    prompt_ids: Option<String>,
    /// New tokens to generate at most.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep only the K most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Keep the smallest set of likely tokens whose probability reaches P.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute threads (0 = all available cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
    /// Write the logits (last prompt position and every generated step) as JSON.
    #[arg(long)]
    logits_out: Option<PathBuf>,
    /// Write a Chrome trace-event file (open in Perfetto or chrome://tracing).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Mixture-of-experts models: add this run's counts of each expert's use, per layer, to
    /// this JSON file (created if missing), e.g. to calibrate placement.
    #[arg(long)]
    expert_stats: Option<PathBuf>,
    #[command(flatten)]
    place: PlaceArgs,
}

/// `--kv-dtype`: a KV cache element type by name.
fn parse_kv_dtype(s: &str) -> std::result::Result<KvType, String> {
    KvType::parse(s).ok_or_else(|| {
        let known: Vec<&str> = KvType::ALL.iter().map(|t| t.name()).collect();
        format!("--kv-dtype {s}: expected one of {}", known.join(", "))
    })
}

/// How a model is placed and streamed (shared by `run` and `bench`).
#[derive(Args)]
struct PlaceArgs {
    /// Run this graph file instead of the architecture's built-in one.
    #[arg(long)]
    graph: Option<PathBuf>,
    /// A graph over several processes: this process's part (default main; the others run
    /// `weir worker`).
    #[arg(long)]
    process: Option<String>,
    /// Host memory for everything (e.g. 700MB, 4GB, 2GiB): weights, KV cache, activations;
    /// weights that do not fit stream from disk.
    #[arg(long)]
    memory_budget: Option<String>,
    /// Layers of weights reading may run ahead of compute under a budget (0: no overlap).
    #[arg(long)]
    prefetch: Option<usize>,
    /// Throughput mode: run each step as K micro-batches sharing one load of every streamed layer.
    #[arg(long, default_value_t = 1)]
    micro_batches: usize,
    /// Positions of KV cache the budget reserves, over all sequences at once (default: what
    /// the prompts and --max-new-tokens / --gen-len need).
    #[arg(long)]
    kv_tokens: Option<usize>,
    /// The most tokens in one pass: longer prompts are prefilled in chunks of this many.
    #[arg(long, default_value_t = 256)]
    max_pass_tokens: usize,
    /// Element type of the KV cache: f32, bf16 or f16 (half the memory; keys and values rounded).
    #[arg(long, default_value = "f32", value_parser = parse_kv_dtype)]
    kv_dtype: KvType,
    /// Mixture-of-experts models: memory for expert weights (e.g. 2GB, or 25% of all experts'
    /// bytes). The most chosen experts (by --expert-stats, when the file exists) stay resident;
    /// the rest are read from disk when chosen, into a cache.
    #[arg(long)]
    expert_budget: Option<String>,
    /// With --expert-budget: keep nothing read and read nothing ahead (every chosen cold expert
    /// is read every time; the baseline the cache is measured against).
    #[arg(long)]
    no_expert_cache: bool,
    /// With --expert-budget: do not read ahead the experts a layer's router, applied to the
    /// previous layer's hidden state, predicts.
    #[arg(long)]
    no_expert_prefetch: bool,
    /// With --expert-budget: the experts read from disk may also run on this lane of the graph
    /// (a cpu or gpu lane): each pass, each chosen one runs on its own lane or here, whichever
    /// finishes the step soonest, from costs measured at start-up (Fiddler's decision).
    #[arg(long, value_name = "LANE")]
    expert_twins: Option<String>,
    /// Hold bf16 weight matrices as f16 (rewritten once, as read): faster on CPUs without bf16
    /// instructions; exact for magnitudes from 2^-14 to 65504, smaller ones off by at most
    /// 2^-25, a matrix with a larger value kept as bf16. Weights streamed from disk stay bf16.
    #[arg(long)]
    bf16_as_f16: bool,
    /// Budget of each GPU's memory pool, shared by the weights, KV cache and activations of
    /// the graph's GPU lanes (e.g. `8GB`: a 24 GB card imitated on a larger one). Default:
    /// the device's memory less 1 GiB.
    #[arg(long)]
    gpu_memory: Option<String>,
}

#[derive(Args)]
struct ServeArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model's id in the API (default: the model folder's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Compute threads (0 = all available cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Most sequences in one pass.
    #[arg(long, default_value_t = 256)]
    max_batch: usize,
    /// Most requests waiting to be admitted; more get 429 with Retry-After.
    #[arg(long, default_value_t = 1024)]
    max_queue: usize,
    /// On SIGTERM or SIGINT, seconds the requests in flight get to finish.
    #[arg(long, default_value_t = 30)]
    shutdown_timeout: u64,
    /// Which phases it runs: mixed (both), prefill (prompts, sending the KV cache layer by
    /// layer to decode workers), decode (from KV caches prefill workers send); `weir route`
    /// drives prefill and decode workers.
    #[arg(long, default_value = "mixed", value_parser = ["mixed", "prefill", "decode"])]
    role: String,
    /// Where prefill workers send KV caches (HOST:PORT, port 0 for any; unix:PATH): a decode
    /// worker's (default 127.0.0.1:0); given to a mixed one, it also prefills and decodes for
    /// split pools (`weir route --mixed`).
    #[arg(long)]
    kv_listen: Option<String>,
    /// Split inside this process: prompts run on a second engine placed by this graph file
    /// (its attention exporting the KV cache, its lanes on other cores), whose KV caches go
    /// straight into the decoding engine (`examples/graphs/split-prefill.weir`).
    #[arg(long)]
    split_prefill_graph: Option<PathBuf>,
    /// Write a Chrome trace-event file of the run when the server stops (`weir trace merge`
    /// puts a split deployment's workers on one timeline).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// A prefill worker sends the KV cache of prompts shorter than this in one transfer after
    /// prefill, longer ones layer by layer while it runs.
    #[arg(long, default_value_t = weir::options::KV_BULK_BELOW)]
    kv_bulk_below: usize,
    #[command(flatten)]
    place: PlaceArgs,
}

#[derive(Args)]
struct SynthArgs {
    /// Shape: tiny, small, tinyllama-1.1b, llama3-8b, tiny-moe, mixtral-4l.
    #[arg(long, default_value = "small")]
    shape: String,
    /// Weight dtype: f32, bf16, f16.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct BenchArgs {
    /// Hugging Face model folder.
    #[arg(long)]
    model: PathBuf,
    /// Sequences per batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 16)]
    prompt_len: usize,
    /// Generated tokens per sequence.
    #[arg(long, default_value_t = 32)]
    gen_len: usize,
    /// Compute threads (0 = all available cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Write a Chrome trace-event file of the measured run (the streaming one under a budget).
    #[arg(long)]
    trace: Option<PathBuf>,
    /// Mixture-of-experts models: with --expert-budget, keep resident the experts this file
    /// (written by `weir run --expert-stats`) counts as most chosen.
    #[arg(long)]
    expert_stats: Option<PathBuf>,
    #[command(flatten)]
    place: PlaceArgs,
}

impl PlaceArgs {
    /// The engine options these flags set: sizes parsed and the graph file read, each error
    /// naming its flag; `Engine::new` checks the rest (`EngineOptions::check`).
    fn engine_options(&self, threads: usize, expert_stats: Option<&Path>) -> Result<EngineOptions> {
        let size = |flag: &str, v: &Option<String>| {
            v.as_deref().map(|s| weir::parse_size(s).map_err(|e| anyhow!("{flag} {s}: {e}"))).transpose()
        };
        let graph = match &self.graph {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("--graph {}", p.display()))?;
                Some((text, p.display().to_string()))
            }
        };
        Ok(EngineOptions {
            threads,
            graph,
            memory_budget: size("--memory-budget", &self.memory_budget)?,
            gpu_memory: size("--gpu-memory", &self.gpu_memory)?,
            prefetch: self.prefetch,
            micro_batches: self.micro_batches,
            kv_tokens: self.kv_tokens,
            max_pass_tokens: self.max_pass_tokens,
            kv_dtype: self.kv_dtype,
            bf16_as_f16: self.bf16_as_f16,
            experts: self.experts(expert_stats)?,
            process: self.process.clone(),
            ..Default::default()
        })
    }

    /// The expert placement `--expert-budget` asks for, ranked by the counts in `stats` (if
    /// the file exists).
    fn experts(&self, stats: Option<&Path>) -> Result<Option<ExpertPlacement>> {
        let Some(s) = &self.expert_budget else {
            for (set, flag) in [
                (self.no_expert_cache, "--no-expert-cache"),
                (self.no_expert_prefetch, "--no-expert-prefetch"),
                (self.expert_twins.is_some(), "--expert-twins"),
            ] {
                if set {
                    bail!("{flag} needs --expert-budget (without one every expert is resident)");
                }
            }
            return Ok(None);
        };
        let budget = ExpertBudget::parse(s).map_err(|e| anyhow!("--expert-budget {e}"))?;
        let popularity = match stats.filter(|p| p.exists()) {
            Some(path) => weir::expert_stats::popularity(path)?,
            None => Default::default(),
        };
        Ok(Some(ExpertPlacement {
            budget,
            popularity,
            cache: !self.no_expert_cache,
            predict: !self.no_expert_prefetch,
            twins: self.expert_twins.as_ref().map(|lane| Twins { lane: lane.clone(), ..Default::default() }),
        }))
    }
}

fn main() {
    weir::log::init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Run(a) => run(a),
        Cmd::Synth(a) => synth(a),
        Cmd::Bench(a) => bench(a),
        Cmd::Serve(a) => serve(a),
        Cmd::Load(a) => load::load(a),
        Cmd::Route(a) => route::route(a),
        Cmd::Worker(a) => worker::worker(a),
        Cmd::Graph(g) => graph(g),
        Cmd::Trace(t) => trace::trace(t),
        Cmd::Gpu(g) => gpu(g),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn open(model: &Path) -> Result<Model> {
    Model::open(model).with_context(|| format!("--model {}", model.display()))
}

fn parse_ids(s: &str) -> Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .enumerate()
        .map(|(i, t)| t.parse::<u32>().map_err(|_| anyhow!("--prompt-ids: item {} (`{t}`) is not a token id", i + 1)))
        .collect::<Result<Vec<_>>>()
        .and_then(|v| if v.is_empty() { bail!("--prompt-ids: no ids given") } else { Ok(v) })
}

fn run(a: RunArgs) -> Result<()> {
    let opts = a.place.engine_options(a.threads, a.expert_stats.as_deref())?;
    opts.check()?;
    let model = open(&a.model)?;
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(text), _) => model.encode(text)?,
        (None, Some(ids)) => parse_ids(ids)?,
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let max_positions = model.config.max_position_embeddings;
    let kv_tokens_default = Some(weir::kv_tokens_needed(prompt.len(), a.max_new_tokens, max_positions));
    let engine = Engine::new(&model, EngineOptions { trace: a.trace.is_some(), kv_tokens_default, ..opts })?;
    if let Some(path) = a.expert_stats.as_ref().filter(|p| p.exists()) {
        weir::expert_stats::load(engine.routing(), path)?;
    }
    show_loading(&engine);
    let logits = if a.logits_out.is_some() { LogitsMode::Steps } else { LogitsMode::None };
    let sampling = Sampling { temperature: a.temperature, top_k: a.top_k, top_p: a.top_p, seed: a.seed };
    let req = Request { prompt: prompt.clone(), max_new_tokens: a.max_new_tokens, sampling, stop_at_eos: true, logits };
    let (mut ids, mut step_logits, mut stats, mut shown) = (Vec::new(), Vec::new(), None, String::new());
    let mut stdout = std::io::stdout().lock();
    for ev in engine.submit(req)? {
        match ev {
            Event::Token { id, logits } => {
                ids.push(id);
                step_logits.extend(logits);
                if !a.json {
                    // Stream text: print what the decoding of all ids so far adds.
                    let text = model.decode(&ids)?;
                    if let Some(new) = text.strip_prefix(shown.as_str()) {
                        let _ = write!(stdout, "{new}");
                        let _ = stdout.flush();
                    }
                    shown = text;
                }
            }
            Event::PromptLogits(_) => {}
            Event::Done(s) => stats = Some(s),
            Event::Failed(e) => bail!("generation failed: {e}"),
        }
    }
    let stats = stats.ok_or_else(|| anyhow!("the engine stopped before the generation finished"))?;
    let text = model.decode(&ids)?;
    if let Some(path) = &a.trace {
        std::fs::write(path, engine.trace().to_chrome_json()).with_context(|| format!("--trace {}", path.display()))?;
    }
    if let Some(path) = &a.expert_stats {
        weir::expert_stats::save(engine.routing(), path)?;
    }
    engine.shutdown()?;
    if let Some(path) = &a.logits_out {
        let first = step_logits.first().cloned().unwrap_or_default();
        let v = serde_json::json!({"last_prompt_logits": first, "step_logits": step_logits});
        std::fs::write(path, serde_json::to_string(&v)?).with_context(|| format!("--logits-out {}", path.display()))?;
    }
    if a.json {
        let v = serde_json::json!({
            "prompt_ids": prompt, "generated_ids": ids, "text": text,
            "prefill_tokens_per_s": stats.prefill_tokens_per_s(), "decode_tokens_per_s": stats.decode_tokens_per_s(),
            "finish_reason": stats.finish.name(),
        });
        writeln!(stdout, "{v}")?;
    } else {
        writeln!(stdout)?;
        eprintln!(
            "{} prompt tokens, {} generated (finish: {}); prefill {:.1} tokens/s, decode {:.2} tokens/s",
            prompt.len(),
            ids.len(),
            stats.finish.name(),
            stats.prefill_tokens_per_s(),
            stats.decode_tokens_per_s()
        );
        if let Some(p) = &a.trace {
            eprintln!("trace written to {}", p.display());
        }
    }
    Ok(())
}

/// A progress bar of bytes on standard error, when it is a terminal (never in a pipe or a log).
fn progress_bar(what: &str) -> Option<indicatif::ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let style = indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    bar.set_style(style.progress_chars("=> "));
    bar.set_message(what.to_string());
    Some(bar)
}

/// Shows the weights read once being loaded, until they are (or the engine fails), on a
/// terminal; elsewhere it returns at once and the first pass waits for them.
fn show_loading(engine: &Engine) {
    let Some(bar) = progress_bar("loading weights") else { return };
    loop {
        let (read, total) = engine.load_progress();
        bar.set_length(total);
        bar.set_position(read.min(total));
        if read >= total || engine.fault().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bar.finish_and_clear();
}

fn synth(a: SynthArgs) -> Result<()> {
    let shape = weir::synth::shape(&a.shape).context("--shape")?;
    let dtype = weir::synth::parse_dtype(&a.dtype).context("--dtype")?;
    let t0 = std::time::Instant::now();
    let bar = progress_bar("writing weights");
    weir::synth::write_model_with(&a.out, &shape, dtype, a.seed, &mut |done, total| {
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let bytes = std::fs::metadata(a.out.join("model.safetensors")).map(|m| m.len()).unwrap_or(0);
    let (out, secs) = (a.out.display(), t0.elapsed().as_secs_f64());
    eprintln!("wrote {out} ({}, {}, {:.2} GB) in {secs:.1} s", shape.name, a.dtype, bytes as f64 / 1e9);
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    // `bench` only reads the counts (to rank the experts it keeps resident); `run` writes them.
    if let Some(path) = &a.expert_stats {
        if a.place.expert_budget.is_none() {
            bail!("--expert-stats needs --expert-budget in `bench` (the counts rank which experts stay resident)");
        }
        if !path.exists() {
            bail!("--expert-stats {}: no such file (`weir run --expert-stats` writes one)", path.display());
        }
    }
    let threads = if a.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { a.threads };
    let engine = a.place.engine_options(threads, a.expert_stats.as_deref())?;
    engine.check()?;
    let model = open(&a.model)?;
    let o = weir::bench::BenchOptions {
        batch: a.batch,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        seed: a.seed,
        trace: a.trace.is_some(),
        engine,
    };
    let r = weir::bench::run(&model, &o)?;
    if let (Some(path), Some(t)) = (&a.trace, &r.trace) {
        std::fs::write(path, t.to_chrome_json()).with_context(|| format!("--trace {}", path.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print!("{}", r.to_text(&a.model));
    }
    Ok(())
}

fn serve(a: ServeArgs) -> Result<()> {
    let role = match a.role.as_str() {
        "prefill" => weir::Role::Prefill,
        "decode" => weir::Role::Decode,
        _ => weir::Role::Mixed,
    };
    let opts = EngineOptions {
        max_queue: Some(a.max_queue),
        max_batch: a.max_batch,
        role,
        export_kv: role == weir::Role::Mixed && a.kv_listen.is_some(),
        kv_bulk_below: a.kv_bulk_below,
        trace: a.trace.is_some(),
        ..a.place.engine_options(a.threads, None)?
    };
    opts.check()?;
    let model = open(&a.model)?;
    let engine = Engine::new(&model, opts.clone())?;
    show_loading(&engine);
    let prefill = match &a.split_prefill_graph {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("--split-prefill-graph {}", path.display()))?;
            let graph = Some((text, path.display().to_string()));
            Some(Engine::new(&model, EngineOptions { graph, role: weir::Role::Prefill, trace: false, ..opts })?)
        }
        None => None,
    };
    let mut server = weir::serve::Server::new(model, engine, a.served_model_name)?;
    if let Some(p) = prefill {
        server.split_in_process(p).context("--split-prefill-graph")?;
    }
    let kv_listen = a.kv_listen.clone().or_else(|| (role == weir::Role::Decode).then(|| "127.0.0.1:0".into()));
    if let Some(at) = kv_listen.filter(|_| role != weir::Role::Prefill) {
        let addr = server.listen_kv(&at).with_context(|| format!("--kv-listen {at}"))?;
        eprintln!("weir serve: taking KV caches from prefill workers at {addr}");
    }
    let timeout = std::time::Duration::from_secs(a.shutdown_timeout);
    let server = weir::serve::run(server, (&a.host, a.port), timeout)
        .with_context(|| format!("--host {} --port {}", a.host, a.port))?;
    eprintln!("weir serve: stopped");
    if let Some(path) = &a.trace {
        let t = server.engine().trace();
        std::fs::write(path, t.to_chrome_json()).with_context(|| format!("--trace {}", path.display()))?;
        eprintln!("weir serve: trace written to {} ({} spans)", path.display(), t.spans());
    }
    server.shutdown()?;
    Ok(())
}

fn graph(cmd: GraphCmd) -> Result<()> {
    match cmd {
        GraphCmd::Check { file, model, threads } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("{}", file.display()))?;
            let name = file.display().to_string();
            let model = model.as_deref().map(open).transpose()?;
            let report = weir::check_graph(&text, &name, model.as_ref(), threads)?;
            println!("{report}");
            Ok(())
        }
        GraphCmd::Show(a) => {
            print!("{}", weir_graphs::format::print::print(&placed_graph(&a)?));
            Ok(())
        }
        GraphCmd::Dot(a) => {
            print!("{}", placed_graph(&a)?.dot());
            Ok(())
        }
    }
}

/// The graph `weir run` with these flags would run: the same placement.
fn placed_graph(a: &GraphArgs) -> Result<weir_graphs::Graph> {
    let opts = a.place.engine_options(a.threads, None)?;
    opts.check()?;
    let model = open(&a.model)?;
    let file = opts.graph.as_ref().map(|(t, n)| (t.as_str(), n.as_str()));
    let placed = model.place(file, &opts.placement(model.config.max_position_embeddings))?;
    opts.check_placed(&placed)?;
    Ok(placed.graph)
}

fn gpu(c: GpuCmd) -> Result<()> {
    let GpuCmd::Copy { bytes, device, rounds, json } = c;
    let n = weir::parse_size(&bytes).map_err(|e| anyhow!("--bytes {bytes}: {e}"))?;
    if rounds == 0 {
        bail!("--rounds 0: nothing would be measured");
    }
    let c = weir_runtime::gpu::copy::h2d_bandwidth(device, n as usize, rounds)
        .map_err(|e| anyhow!("device gpu{device}: {e}"))?;
    if json {
        let v = serde_json::json!({
            "device": c.device, "bytes": c.bytes, "pool_gbps": c.pool_gbps,
            "plain_pinned_gbps": c.plain_pinned_gbps, "pageable_gbps": c.pageable_gbps,
            "pool_ratio": c.pool_ratio(),
        });
        println!("{v}");
    } else {
        println!("{} — host → device, {} bytes, best of {rounds}", c.device, c.bytes);
        println!("  pinned pool buffer   {:7.2} GB/s ({:.2} of the plain copy)", c.pool_gbps, c.pool_ratio());
        println!("  plain pinned memcpy  {:7.2} GB/s", c.plain_pinned_gbps);
        println!("  pageable memcpy      {:7.2} GB/s", c.pageable_gbps);
    }
    Ok(())
}
