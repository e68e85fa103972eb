//! Mounting weir's OpenAI server in an actix-web app of your own, beside your own routes.
//!
//! ```text
//! cargo run --release --example serve                      # a small random model, port 8080
//! cargo run --release --example serve -- MODEL_DIR 8080
//! curl -s localhost:8080/v1/completions -H 'content-type: application/json' \
//!      -d '{"prompt": "The quick brown fox", "max_tokens": 16}'
//! curl -s localhost:8080/hello
//! ```

use actix_web::{web, App, HttpResponse, HttpServer};
use std::path::PathBuf;
use weir::{Engine, EngineOptions, Model};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = match args.next() {
        Some(d) => PathBuf::from(d),
        // The default needs no download: a random-weight model of the `small` shape.
        None => weir::synth::demo_model()?,
    };
    let port: u16 = args.next().map_or(Ok(8080), |p| p.parse())?;
    let model = Model::open(&dir)?;
    // A bounded queue: past 256 waiting requests, clients get 429 and Retry-After.
    let engine = Engine::new(&model, EngineOptions { max_queue: Some(256), ..Default::default() })?;
    let server = web::Data::new(weir::serve::Server::new(model, engine, Some("small".into()))?);
    let routes = server.clone();
    actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            App::new()
                // The OpenAI routes: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.
                .configure(|c| weir::serve::Server::configure(c, routes.clone()))
                // And your own.
                .route("/hello", web::get().to(|| async { HttpResponse::Ok().body("hello from beside weir\n") }))
        })
        .bind(("127.0.0.1", port))?
        .run()
        .await
    })?;
    // The HTTP server has stopped (SIGINT or SIGTERM): stop the engine.
    drop(server);
    Ok(())
}
