//! `weir trace`: read the trace files `--trace` writes.

use anyhow::{anyhow, bail, Context, Result};
use clap::Subcommand;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum TraceCmd {
    /// Per-lane utilisation, per-operator time, lane overlap, link bandwidth, channel occupancy.
    Summary {
        /// A trace file written by `weir run --trace`.
        trace: PathBuf,
        /// Print one JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Write one self-contained HTML timeline with the summary.
    Html {
        /// A trace file written by `weir run --trace`.
        trace: PathBuf,
        /// The HTML file to write.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
    },
    /// Put the traces of several processes (a split deployment's prefill and decode workers,
    /// `weir serve --trace`) on one timeline, lined up by their wall-clock starts.
    Merge {
        /// Trace files.
        #[arg(required = true, num_args = 2..)]
        traces: Vec<PathBuf>,
        /// Each trace's label, comma-separated (default: the file names without `.json`);
        /// its lanes are shown as `LABEL/lane`.
        #[arg(long, value_delimiter = ',')]
        label: Vec<String>,
        /// The merged trace file to write.
        #[arg(short = 'o', long = "out")]
        out: PathBuf,
    },
}

fn read_trace(path: &Path) -> Result<weir::Trace> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    weir::Trace::from_chrome_json(&text).map_err(|e| anyhow!("{}: {e}", path.display()))
}

pub fn trace(cmd: TraceCmd) -> Result<()> {
    match cmd {
        TraceCmd::Summary { trace, json } => {
            let s = weir_runtime::Summary::of(&read_trace(&trace)?);
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                print!("{}", s.to_text());
            }
        }
        TraceCmd::Html { trace, out } => {
            let t = read_trace(&trace)?;
            let html = weir_runtime::trace::html::render(&t, &trace.display().to_string());
            std::fs::write(&out, html).with_context(|| format!("-o {}", out.display()))?;
            eprintln!("wrote {} ({} spans)", out.display(), t.spans());
        }
        TraceCmd::Merge { traces, label, out } => {
            if !label.is_empty() && label.len() != traces.len() {
                bail!("--label gives {} labels for {} traces", label.len(), traces.len());
            }
            let mut parts = Vec::new();
            for (i, path) in traces.iter().enumerate() {
                let name = label.get(i).cloned().unwrap_or_else(|| {
                    path.file_stem().map_or_else(|| format!("trace{i}"), |s| s.to_string_lossy().into_owned())
                });
                parts.push((name, read_trace(path)?));
            }
            let merged = weir_runtime::trace::merge::merge(&parts).map_err(anyhow::Error::msg)?;
            std::fs::write(&out, merged.to_chrome_json()).with_context(|| format!("-o {}", out.display()))?;
            eprintln!("wrote {} ({} spans from {} traces)", out.display(), merged.spans(), parts.len());
        }
    }
    Ok(())
}
