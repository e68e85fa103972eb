//! What weir says it is doing: `tracing` events a person can read, on standard error, filtered
//! by `WEIR_LOG` (`warn` by default; `info`: the model opened, the plan — what is resident,
//! held and streamed, each budget —, lanes started, requests admitted and finished; `debug`:
//! each placement pass).

/// Sends `tracing` events to standard error, filtered by `WEIR_LOG` (default `warn`). For
/// binaries; a library embedding weir sets up its own subscriber.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
