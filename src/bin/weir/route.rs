//! `weir route`: the OpenAI front door of a split deployment (`weir::route`).

use anyhow::{Context, Result};
use clap::Args;
use weir::load::http::Url;

#[derive(Args)]
pub struct RouteArgs {
    /// Prefill workers (`weir serve --role prefill`), comma-separated: http://HOST:PORT,…
    #[arg(long, value_delimiter = ',')]
    prefill: Vec<Url>,
    /// Decode workers (`weir serve --role decode`), comma-separated: http://HOST:PORT,…
    #[arg(long, value_delimiter = ',')]
    decode: Vec<Url>,
    /// Mixed workers (`weir serve`), comma-separated: past a threshold they prefill (decode) for
    /// the split pools — those started with `--kv-listen` — or run whole requests; and they
    /// take the requests of a split pool with nobody up.
    #[arg(long, value_delimiter = ',')]
    mixed: Vec<Url>,
    /// Prompt tokens pending at the least loaded prefill worker past which the mixed pool helps.
    #[arg(long, default_value_t = 4096)]
    mixed_threshold: usize,
    /// KV positions promised at the least loaded decode worker past which the mixed pool helps.
    #[arg(long, default_value_t = 16384)]
    mixed_decode_threshold: usize,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8080)]
    port: u16,
}

pub fn route(a: RouteArgs) -> Result<()> {
    let router =
        weir::route::Router::new(&a.prefill, &a.decode, &a.mixed, (a.mixed_threshold, a.mixed_decode_threshold))
            .map_err(anyhow::Error::msg)?;
    weir::route::run(router, (&a.host, a.port)).with_context(|| format!("--host {} --port {}", a.host, a.port))?;
    eprintln!("weir route: stopped");
    Ok(())
}
