//! `weir load`: the load generator's flags, its table and its files.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;
use weir::load::{self, LoadOptions, Point, Target};

#[derive(Args)]
pub struct LoadArgs {
    /// A server to load, `NAME=http://host:port` (or just the address); give several to
    /// measure them side by side, taking turns at each rate.
    #[arg(long = "target", required_unless_present = "replot")]
    targets: Vec<Target>,
    /// Arrival rates, requests per second, comma-separated (Poisson arrivals).
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,2")]
    rates: Vec<f64>,
    /// Requests at each rate.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Prompt lengths in tokens, `LO..HI` (drawn uniformly; random ids).
    #[arg(long, default_value = "16..128", value_parser = parse_range)]
    prompt_len: (usize, usize),
    /// Output lengths in tokens, `LO..HI` (each request asks for exactly that many:
    /// `ignore_eos`, greedy).
    #[arg(long, default_value = "16..64", value_parser = parse_range)]
    gen_len: (usize, usize),
    /// Prompt ids are drawn below this (the model's vocabulary size, or less).
    #[arg(long, default_value_t = 32000)]
    vocab: u32,
    /// Seed of the workload (arrivals, lengths, prompts).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The `model` field to send.
    #[arg(long)]
    model: Option<String>,
    /// Seconds a request may take before it counts as failed.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
    /// Write every point (target × rate) as a JSON array here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write latency against throughput for every target as an SVG here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// The plot's title.
    #[arg(long, default_value = "latency against load")]
    title: String,
    /// Send nothing: draw `--svg` from the points of an earlier run's `--json`.
    #[arg(long, requires = "svg")]
    replot: Option<PathBuf>,
}

fn parse_range(s: &str) -> std::result::Result<(usize, usize), String> {
    let (lo, hi) = s.split_once("..").unwrap_or((s, s));
    let n = |x: &str| x.trim().parse::<usize>().map_err(|_| format!("{s:?}: give LO..HI, whole numbers ≥ 1"));
    let (lo, hi) = (n(lo)?, n(hi.trim_start_matches('='))?);
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: LO must be ≥ 1 and at most HI"));
    }
    Ok((lo, hi))
}

pub fn load(a: LoadArgs) -> Result<()> {
    if let (Some(from), Some(svg)) = (&a.replot, &a.svg) {
        let text = std::fs::read_to_string(from).with_context(|| format!("reading {}", from.display()))?;
        let points: Vec<Point> = serde_json::from_str(&text)
            .with_context(|| format!("{}: not the points `weir load --json` writes", from.display()))?;
        return std::fs::write(svg, load::plot::svg(&points, &a.title))
            .with_context(|| format!("writing {}", svg.display()));
    }
    if let Some(r) = a.rates.iter().find(|r| !(r.is_finite() && **r > 0.0)) {
        bail!("--rates: {r} is not a rate above 0 (requests per second)");
    }
    if a.requests == 0 {
        bail!("--requests: give at least 1");
    }
    let o = LoadOptions {
        targets: a.targets,
        rates: a.rates,
        requests: a.requests,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        vocab: a.vocab,
        seed: a.seed,
        model: a.model,
        timeout: Duration::from_secs(a.timeout),
    };
    println!(
        "{:<12} {:>6} {:>9} {:>7} {:>7}  {:>23}  {:>20}  {:>23}",
        "target", "rate", "done", "req/s", "tok/s", "TTFT p50/p90/p99 ms", "TBT p50/p90/p99 ms", "e2e p50/p90/p99 ms"
    );
    let points = load::run(&o, |p| println!("{}", row(p)))?;
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&points)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.svg {
        std::fs::write(path, load::plot::svg(&points, &a.title))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(p) = points.iter().find(|p| p.failed > 0) {
        eprintln!(
            "weir load: {} failed {} of {} at rate {}: {}",
            p.target,
            p.failed,
            p.requests,
            p.rate,
            p.errors.join("; ")
        );
    }
    Ok(())
}

fn row(p: &Point) -> String {
    let q = |q: &load::Quantiles| format!("{:.0}/{:.0}/{:.0}", q.p50, q.p90, q.p99);
    format!(
        "{:<12} {:>6} {:>9} {:>7.3} {:>7.1}  {:>23}  {:>20}  {:>23}",
        p.target,
        p.rate,
        format!("{}/{}", p.completed, p.requests),
        p.requests_per_s,
        p.output_tokens_per_s,
        q(&p.ttft_ms),
        q(&p.tbt_ms),
        q(&p.e2e_ms)
    )
}
