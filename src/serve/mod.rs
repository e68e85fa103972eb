//! `weir serve`: the OpenAI API on actix-web, in front of an [`Engine`].
//!
//! Routes: `POST /v1/completions` and `POST /v1/chat/completions` (whole, or streamed as
//! server-sent events ending in `data: [DONE]`), `GET /v1/models`, `GET /health`, `GET /metrics`
//! (Prometheus text). The engine batches whatever the clients send — requests join and leave
//! between passes, long prompts are prefilled in chunks behind the running decodes — and the
//! server only turns HTTP into requests and events into text ([`text`]).
//!
//! Each request runs on a blocking thread of actix's pool that waits on its [`Generation`]'s
//! events; a client that goes away (a closed stream, a dropped connection) is noticed at its
//! next event, or within a tenth of a second while it waits, and its generation dropped: the
//! engine ends the sequence and frees its KV cache at the next pass.
//!
//! Faults: the engine restarts its program for the next request after an actor fails, so the
//! server keeps serving; the requests in flight then end — a stream with an error event, a whole
//! response with a 500 — and `/health` says what failed last. A full wait queue
//! (`--max-queue`) answers 429 with `Retry-After`; a request that could never fit, 400 naming
//! the limit.
//!
//! The server is a library module: [`Server::configure`] mounts its routes in any actix app.
//!
//! ```no_run
//! use actix_web::{web, App, HttpServer};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let model = weir::Model::open("/path/to/hf-folder")?;
//! let engine = weir::Engine::new(&model, weir::EngineOptions::default())?;
//! let server = web::Data::new(weir::serve::Server::new(model, engine, None)?);
//! actix_web::rt::System::new().block_on(async move {
//!     HttpServer::new(move || App::new().configure(|c| weir::serve::Server::configure(c, server.clone())))
//!         .bind(("127.0.0.1", 8080))?
//!         .run()
//!         .await
//! })?;
//! # Ok(())
//! # }
//! ```

pub mod api;
pub mod chat;
pub mod metrics;
pub mod split;
pub mod text;

use crate::error::{Error, Result};
use crate::request::{Event, Generation, LogitsMode, Next, Request};
use crate::{Engine, Model};
use actix_web::{http::StatusCode, web, HttpRequest, HttpResponse};
use api::{ApiError, Ask, Prompt};
use metrics::{Metrics, Outcome};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Largest request body read, in bytes.
pub const MAX_BODY: usize = 4 << 20;

/// A model served: the engine running it, its tokenizer and chat template, and the counters.
pub struct Server {
    engine: Engine,
    model: Model,
    name: String,
    chat: Option<chat::ChatTemplate>,
    metrics: Metrics,
    /// The last engine failure, for `/health`.
    last_fault: Mutex<Option<String>>,
    started: u64,
    /// A decode worker's: requests reserved for a router, waiting for it to resume them.
    parked: split::Parked,
    /// A decode worker's listener for prefill workers' KV caches.
    kv: Option<crate::split::KvListener>,
    /// A prefill engine in this process (`--split-prefill-graph`): prompts run there, their
    /// KV caches written straight into `engine`'s pool.
    prefill: Option<Arc<Engine>>,
}

impl Server {
    /// Serves `model` on `engine` under the id `name` (default: the model folder's name).
    /// Reads the folder's chat template, if it has one.
    pub fn new(model: Model, engine: Engine, name: Option<String>) -> Result<Server> {
        let chat = chat::ChatTemplate::from_dir(&model.dir)?;
        let name =
            name.unwrap_or_else(|| model.dir.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned()));
        Ok(Server {
            engine,
            model,
            name,
            chat,
            metrics: Metrics::default(),
            last_fault: Mutex::new(None),
            started: now(),
            parked: Default::default(),
            kv: None,
            prefill: None,
        })
    }

    /// Mounts the routes on an actix app (or scope).
    pub fn configure(cfg: &mut web::ServiceConfig, server: web::Data<Server>) {
        cfg.app_data(server)
            .app_data(web::PayloadConfig::new(MAX_BODY))
            .route("/v1/completions", web::post().to(completions))
            .route("/v1/chat/completions", web::post().to(chat_completions))
            .route("/v1/models", web::get().to(models))
            .route("/health", web::get().to(health))
            .route("/metrics", web::get().to(metrics_text));
        split::configure(cfg);
    }

    /// The engine behind the server.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The counters `/metrics` reports.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops the engines (after the HTTP server has stopped).
    pub fn shutdown(self) -> Result<()> {
        if let Some(p) = self.prefill.and_then(|p| Arc::try_unwrap(p).ok()) {
            p.shutdown()?;
        }
        self.engine.shutdown()
    }
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn error_response(e: &ApiError) -> HttpResponse {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_REQUEST);
    let mut r = HttpResponse::build(status);
    if e.status == 429 {
        r.insert_header(("Retry-After", "1"));
    }
    r.json(e.body())
}

/// A request turned into what the engine runs.
struct Job {
    request: Request,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
    chat: bool,
    arrived: Instant,
}

impl Server {
    /// The prompt's token ids: text and chats through the tokenizer (a chat through the
    /// template first), ids as given.
    fn prompt_ids(&self, p: &Prompt) -> std::result::Result<Vec<u32>, ApiError> {
        let tok = self.model.tokenizer.as_ref();
        let encode = |text: &str, special: bool| -> std::result::Result<Vec<u32>, ApiError> {
            let t = tok.ok_or_else(|| ApiError::invalid("the model has no tokenizer: give `prompt` as token ids"))?;
            let e = t.encode(text, special).map_err(|e| ApiError::invalid(format!("tokenizing the prompt: {e}")))?;
            Ok(e.get_ids().to_vec())
        };
        match p {
            Prompt::Ids(ids) => Ok(ids.clone()),
            Prompt::Text(t) => encode(t, true),
            Prompt::Chat(messages) => {
                let Some(template) = &self.chat else {
                    return Err(ApiError::invalid(format!(
                        "the model `{}` has no chat template (tokenizer_config.json has no `chat_template`): use \
                         /v1/completions",
                        self.name
                    )));
                };
                let text = template.render(messages, true).map_err(|e| ApiError::field("messages", e.to_string()))?;
                // The template writes the special tokens itself.
                encode(&text, false)
            }
        }
    }

    /// The request the engine runs for `ask`: its prompt, its limits and its sampling, with the
    /// model's `generation_config.json` defaults where the request gives none.
    fn job(&self, ask: Ask, chat: bool, arrived: Instant) -> std::result::Result<Job, ApiError> {
        if let Some(m) = &ask.model {
            if *m != self.name {
                return Err(ApiError {
                    status: 404,
                    kind: "invalid_request_error",
                    param: Some("model".into()),
                    message: format!("the model `{m}` does not exist: this server serves `{}`", self.name),
                });
            }
        }
        let prompt = self.prompt_ids(&ask.prompt)?;
        let (vocab, context) = self.engine.limits();
        if prompt.len() > context {
            let n = prompt.len();
            return Err(ApiError::field(
                "prompt",
                format!("the prompt has {n} tokens; the model's context is {context}"),
            ));
        }
        if let Some(id) = prompt.iter().find(|&&i| i as usize >= vocab) {
            return Err(ApiError::field("prompt", format!("token id {id} is outside the vocabulary (size {vocab})")));
        }
        // OpenAI's defaults: 16 tokens for a completion, the rest of the context for a chat.
        let max_new_tokens = ask.max_tokens.unwrap_or(if chat { context - prompt.len() } else { 16 });
        let d = self.model.config.sampling;
        let greedy_default = d.do_sample == Some(false);
        let sampling = crate::Sampling {
            temperature: ask.temperature.unwrap_or(if greedy_default { 0.0 } else { d.temperature.unwrap_or(1.0) }),
            top_p: ask.top_p.unwrap_or(d.top_p.unwrap_or(1.0)),
            top_k: ask.top_k.unwrap_or(d.top_k.unwrap_or(0)),
            seed: ask.seed.unwrap_or_else(|| rand_seed(arrived)),
        };
        let request =
            Request { prompt, max_new_tokens, sampling, stop_at_eos: !ask.ignore_eos, logits: LogitsMode::None };
        Ok(Job { request, stops: ask.stop, stream: ask.stream, include_usage: ask.include_usage, chat, arrived })
    }
}

/// A seed for a request that gives none.
fn rand_seed(t: Instant) -> u64 {
    let n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    n ^ (t.elapsed().as_nanos() as u64).rotate_left(32)
}

/// What a running request hands out.
enum Piece {
    Text(String),
    /// The end: finish reason and the token counts.
    End {
        finish: &'static str,
        prompt: usize,
        completion: usize,
    },
    Failed(String),
}

/// Runs a submitted request on this (blocking) thread to its end, handing its pieces to `out`
/// (`false`: the client is gone) and checking `gone` while it waits. How it ended.
fn drive(
    server: &Server,
    mut gen: Generation,
    job: &Job,
    gone: &dyn Fn() -> bool,
    out: &mut dyn FnMut(Piece) -> bool,
) -> Outcome {
    let prompt = job.request.prompt.len();
    let mut text = text::TextStream::new(&server.model, &job.stops);
    let (mut completion, mut last) = (0usize, None::<Instant>);
    let m = &server.metrics;
    loop {
        let event = match gen.next_event_timeout(Duration::from_millis(100)) {
            Next::Event(e) => e,
            Next::Empty if gone() => return Outcome::Cancelled,
            Next::Empty => continue,
            Next::Ended => {
                out(Piece::Failed("the engine stopped".into()));
                return Outcome::Failed;
            }
        };
        match event {
            Event::Token { id, .. } => {
                completion += 1;
                m.generated_tokens.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                match last {
                    None => m.time_to_first_token.observe((t - job.arrived).as_secs_f64()),
                    Some(l) => m.time_between_tokens.observe((t - l).as_secs_f64()),
                }
                last = Some(t);
                let d = match text.push(id) {
                    Ok(d) => d,
                    Err(e) => {
                        out(Piece::Failed(e.to_string()));
                        return Outcome::Failed;
                    }
                };
                if !d.text.is_empty() && !out(Piece::Text(d.text)) {
                    return Outcome::Cancelled;
                }
                if d.stopped {
                    // Dropping the generation ends the sequence.
                    out(Piece::End { finish: "stop", prompt, completion });
                    return Outcome::Ok;
                }
            }
            Event::Done(stats) => {
                if let Ok(d) = text.finish() {
                    if !d.text.is_empty() && !out(Piece::Text(d.text)) {
                        return Outcome::Cancelled;
                    }
                }
                out(Piece::End { finish: stats.finish.name(), prompt, completion });
                return Outcome::Ok;
            }
            Event::Failed(msg) => {
                if let Ok(mut f) = server.last_fault.lock() {
                    *f = Some(msg.clone());
                }
                out(Piece::Failed(msg));
                return Outcome::Failed;
            }
            Event::PromptLogits(_) => {}
        }
    }
}

/// Reads the body as it comes, refusing one over [`MAX_BODY`] bytes.
async fn read_body(mut payload: web::Payload) -> std::result::Result<web::Bytes, ApiError> {
    use futures_util::StreamExt;
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid(format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > MAX_BODY {
            return Err(ApiError {
                status: 413,
                kind: "invalid_request_error",
                param: None,
                message: format!("the body is over {MAX_BODY} bytes"),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}

async fn completions(server: web::Data<Server>, payload: web::Payload) -> HttpResponse {
    respond(server, payload, false).await
}

async fn chat_completions(server: web::Data<Server>, payload: web::Payload) -> HttpResponse {
    respond(server, payload, true).await
}

/// Sets a flag when dropped: the handler's future is dropped when its client goes away.
struct Gone(Arc<AtomicBool>);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A completion or chat request, start to end.
async fn respond(server: web::Data<Server>, payload: web::Payload, chat: bool) -> HttpResponse {
    let arrived = Instant::now();
    let job =
        match read_body(payload).await.and_then(|b| api::parse(&b, chat)).and_then(|a| server.job(a, chat, arrived)) {
            Ok(j) => j,
            Err(e) => {
                server.metrics.count(Outcome::Invalid);
                return error_response(&e);
            }
        };
    let gen = match split::submit(&server, &job).await {
        Ok(g) => g,
        Err(e) => {
            let (outcome, api) = submit_error(e);
            server.metrics.count(outcome);
            return error_response(&api);
        }
    };
    answer(server, gen, job, chat).await
}

/// A submitted request's response, whole or streamed.
async fn answer(server: web::Data<Server>, gen: Generation, job: Job, chat: bool) -> HttpResponse {
    server.metrics.prompt_tokens.fetch_add(job.request.prompt.len() as u64, Ordering::Relaxed);
    let id = format!("{}-{}", if chat { "chatcmpl" } else { "cmpl" }, gen.id().unwrap_or(0));
    if job.stream {
        stream(server, gen, job, id)
    } else {
        whole(server, gen, job, id).await
    }
}

/// An engine's refusal as the API says it.
fn submit_error(e: Error) -> (Outcome, ApiError) {
    match e {
        Error::Busy { .. } | Error::NoRoom { .. } => {
            (Outcome::Busy, ApiError { status: 429, kind: "rate_limit_error", param: None, message: e.to_string() })
        }
        Error::Request(m) if m.contains("KV cache") => (Outcome::Invalid, ApiError::field("max_tokens", m)),
        Error::Request(m) => (Outcome::Invalid, ApiError::invalid(m)),
        e => (
            Outcome::Failed,
            ApiError {
                status: 503,
                kind: "server_error",
                param: None,
                message: format!("the engine cannot run it: {e}"),
            },
        ),
    }
}

/// A whole response, when the generation is done.
async fn whole(server: web::Data<Server>, gen: Generation, job: Job, id: String) -> HttpResponse {
    let flag = Arc::new(AtomicBool::new(false));
    let _gone = Gone(flag.clone());
    let s = server.clone();
    let run = web::block(move || {
        let (mut text, mut end) = (String::new(), None);
        let outcome = drive(&s, gen, &job, &|| flag.load(Ordering::Relaxed), &mut |p| {
            match p {
                Piece::Text(t) => text.push_str(&t),
                Piece::End { finish, prompt, completion } => end = Some(Ok((finish, prompt, completion))),
                Piece::Failed(m) => end = Some(Err(m)),
            }
            true
        });
        (outcome, job.chat, text, end)
    })
    .await;
    let Ok((outcome, chat, text, end)) = run else {
        server.metrics.count(Outcome::Failed);
        return error_response(&ApiError {
            status: 500,
            kind: "server_error",
            param: None,
            message: "the request's thread failed".into(),
        });
    };
    server.metrics.count(outcome);
    match end {
        Some(Ok((finish, prompt, completion))) => {
            let body = api::response(chat, &id, &server.name, now(), &text, finish, api::usage(prompt, completion));
            HttpResponse::Ok().json(body)
        }
        Some(Err(m)) => error_response(&ApiError { status: 500, kind: "server_error", param: None, message: m }),
        None => {
            error_response(&ApiError { status: 499, kind: "server_error", param: None, message: "cancelled".into() })
        }
    }
}

/// A streamed response: server-sent events, a chunk per piece of text, the finish, the usage
/// if asked, `[DONE]`.
fn stream(server: web::Data<Server>, gen: Generation, job: Job, id: String) -> HttpResponse {
    let (tx, rx) = tokio::sync::mpsc::channel::<web::Bytes>(64);
    let s = server.clone();
    actix_web::rt::task::spawn_blocking(move || {
        let (chat, name, created) = (job.chat, s.name.clone(), now());
        let event = |v: serde_json::Value| web::Bytes::from(format!("data: {v}\n\n"));
        let mut first = true;
        let closed = tx.clone();
        let outcome = drive(&s, gen, &job, &|| closed.is_closed(), &mut |p| match p {
            Piece::Text(t) => {
                let ok = tx.blocking_send(event(api::chunk(chat, &id, &name, created, &t, first, None))).is_ok();
                first = false;
                ok
            }
            Piece::End { finish, prompt, completion } => {
                let mut ok =
                    tx.blocking_send(event(api::chunk(chat, &id, &name, created, "", first, Some(finish)))).is_ok();
                if job.include_usage {
                    let u = api::usage_chunk(chat, &id, &name, created, api::usage(prompt, completion));
                    ok &= tx.blocking_send(event(u)).is_ok();
                }
                ok && tx.blocking_send(web::Bytes::from_static(b"data: [DONE]\n\n")).is_ok()
            }
            Piece::Failed(m) => {
                let e = ApiError { status: 500, kind: "server_error", param: None, message: m };
                tx.blocking_send(event(e.body())).is_ok()
            }
        });
        s.metrics.count(outcome);
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, actix_web::Error>(b), rx))
    });
    HttpResponse::Ok().content_type("text/event-stream").insert_header(("Cache-Control", "no-cache")).streaming(body)
}

async fn models(server: web::Data<Server>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"object": "list", "data": [
        {"id": server.name, "object": "model", "created": server.started, "owned_by": "weir"}
    ]}))
}

async fn health(server: web::Data<Server>) -> HttpResponse {
    let last = server.last_fault.lock().ok().and_then(|f| f.clone());
    // Which phases it takes alone, for a router: prefill (it exports KV caches), decode (it
    // takes them).
    let phases = serde_json::json!({"prefill": server.engine.exports_kv(), "decode": server.kv.is_some()});
    HttpResponse::Ok()
        .json(serde_json::json!({"status": "ok", "model": server.name, "last_fault": last, "phases": phases}))
}

async fn metrics_text(server: web::Data<Server>, _: HttpRequest) -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; version=0.0.4").body(server.metrics.render(&server.engine))
}

/// Serves `server` on `addr` until SIGINT or SIGTERM: then stops accepting connections, lets
/// the requests in flight finish within `shutdown_timeout`, and returns.
pub fn run(server: Server, addr: (&str, u16), shutdown_timeout: Duration) -> std::io::Result<Server> {
    let data = web::Data::new(server);
    let d = data.clone();
    let (host, port) = (addr.0.to_string(), addr.1);
    actix_web::rt::System::new().block_on(async move {
        let http =
            actix_web::HttpServer::new(move || actix_web::App::new().configure(|c| Server::configure(c, d.clone())))
                .shutdown_timeout(shutdown_timeout.as_secs().max(1))
                .bind((host.as_str(), port))?;
        for a in http.addrs() {
            tracing::info!("serving on http://{a}");
            eprintln!("weir serve: listening on http://{a}");
        }
        http.run().await
    })?;
    Arc::try_unwrap(data.into_inner()).map_err(|_| std::io::Error::other("the server is still in use"))
}
