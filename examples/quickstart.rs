//! Embedding weir: open a model folder, build an engine, submit requests, receive tokens as
//! they are produced, shut down cleanly.
//!
//! ```text
//! cargo run --release --example quickstart                 # makes a small random model first
//! cargo run --release --example quickstart -- MODEL_DIR "Once upon a time"
//! ```
//!
//! Writes `quickstart.trace.json` (open it in https://ui.perfetto.dev or chrome://tracing).

use std::io::Write;
use std::path::PathBuf;
use weir::{Engine, EngineOptions, Event, Model, Request, Sampling};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = match args.next() {
        Some(d) => PathBuf::from(d),
        // The default needs no download: a random-weight model of the `small` shape.
        None => weir::synth::demo_model()?,
    };
    let prompt = args.next().unwrap_or_else(|| "The quick brown fox".to_string());

    let model = Model::open(&dir)?;
    let engine = Engine::new(&model, EngineOptions { trace: true, ..Default::default() })?;

    // Two requests at once: they share every forward pass.
    let greedy = engine.submit(Request { stop_at_eos: false, ..Request::greedy(model.encode(&prompt)?, 48) })?;
    let sampled = engine.submit(Request {
        prompt: model.encode("In a hole in the ground")?,
        max_new_tokens: 48,
        sampling: Sampling { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 1 },
        stop_at_eos: false,
        logits: Default::default(),
    })?;

    let mut ids = Vec::new();
    for event in greedy {
        match event {
            Event::Token { id, .. } => {
                ids.push(id);
                print!("{id} ");
                std::io::stdout().flush()?;
            }
            Event::Done(stats) => println!(
                "\n[greedy] {} tokens: prefill {:.0} tokens/s, decode {:.1} tokens/s",
                stats.generated_tokens,
                stats.prefill_tokens_per_s(),
                stats.decode_tokens_per_s()
            ),
            Event::Failed(e) => anyhow::bail!(e),
            Event::PromptLogits(_) => {}
        }
    }
    println!("[greedy] text: {:?}", model.decode(&ids)?);
    let out = sampled.wait()?;
    println!("[sampled] text: {:?}", model.decode(&out.tokens)?);

    std::fs::write("quickstart.trace.json", engine.trace().to_chrome_json())?;
    println!("trace: quickstart.trace.json ({} spans)", engine.trace().spans());
    engine.shutdown()?;
    Ok(())
}
