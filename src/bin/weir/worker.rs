//! `weir worker`: one process's part of a graph over several processes
//! (`weir::pipeline::run_worker`).

use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct WorkerArgs {
    /// Hugging Face model folder (the same model as every other process of the graph).
    #[arg(long)]
    model: PathBuf,
    /// Compute threads: the graph file's `threads` variable (0 = all available cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// `--graph` (the file every process runs) and `--process` (which of its processes this is)
    /// are required; the rest places this process's part as `weir run` would.
    #[command(flatten)]
    place: super::PlaceArgs,
}

pub fn worker(a: WorkerArgs) -> Result<()> {
    let Some(process) = a.place.process.clone() else {
        bail!("--process: which of the graph's processes this worker runs (its `process` statements name them)");
    };
    if a.place.graph.is_none() {
        bail!("--graph: the graph file that puts lanes in process `{process}`");
    }
    let opts = a.place.engine_options(a.threads, None)?;
    let model = super::open(&a.model)?;
    let stop = std::sync::atomic::AtomicBool::new(false);
    eprintln!(
        "weir worker: process `{process}` of {}",
        a.place.graph.as_ref().map_or(String::new(), |g| g.display().to_string())
    );
    weir::pipeline::run_worker(&model, opts, &process, &stop)?;
    Ok(())
}
