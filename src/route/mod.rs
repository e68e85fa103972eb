//! `weir route`: Splitwise's cluster-level scheduler as the OpenAI front door, in front of
//! prefill workers and decode workers (`weir serve --role prefill|decode`).
//!
//! A completion or chat request: the router picks the decode worker with the least KV cache
//! promised (its own count of the prompt and output tokens of the requests it sent there and
//! that have not ended — chosen at arrival, so the decode worker reserves at once) and asks it
//! to reserve the request (`/weir/v1/reserve/…`: the body checked and tokenized there, the
//! whole length reserved); then the prefill worker with the fewest prompt tokens pending
//! (join-shortest-queue), which prefills and streams the KV cache, layer by layer, straight to
//! the decode worker (`/weir/v1/prefill`); meanwhile it takes the decode worker's response
//! (`/weir/v1/resume/{handle}`) and hands it to the client as it comes — whole or streamed.
//!
//! Faults: a worker that cannot be reached is taken out for [`DOWN_SECONDS`] (and the next
//! one tried: a prefill worker before it has sent anything, a decode worker before it has
//! reserved); a prefill that fails ends the client's response with an error event (or a 502),
//! and closing the decode worker's response ends the sequence there. `/health` lists the
//! workers and which are out.

mod pools;

use crate::load::http::{post_json, Response, Url};
use actix_web::{web, HttpResponse};
pub use pools::DOWN_SECONDS;
use pools::{Phase, PoolId, Pools};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

/// How long the router waits on a worker's answer (a reservation, a prefill, each piece of
/// a response).
const PATIENCE: Duration = Duration::from_secs(600);

/// The router's state: its pools of workers.
pub struct Router {
    pools: Pools,
}

/// Seconds between health checks of every worker.
pub const HEALTH_EVERY: Duration = Duration::from_secs(2);

/// An answer for the client: its status and JSON body.
struct Answer(u16, String);

impl Answer {
    /// An error body as OpenAI's.
    fn error(status: u16, message: String) -> Answer {
        let body = json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
        Answer(status, body.to_string())
    }
    fn respond(self) -> HttpResponse {
        let status = actix_web::http::StatusCode::from_u16(self.0).unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
        HttpResponse::build(status).content_type("application/json").body(self.1)
    }
}

fn error(status: u16, message: String) -> HttpResponse {
    Answer::error(status, message).respond()
}

impl Router {
    /// A router over these workers: prefill and decode workers (at least one of each), or
    /// mixed ones, or both. `thresholds`: the prompt tokens pending at the least loaded prefill
    /// worker, and the KV positions promised at the least loaded decode worker, past which the
    /// mixed pool helps (see `pools`).
    pub fn new(
        prefill: &[Url],
        decode: &[Url],
        mixed: &[Url],
        thresholds: (usize, usize),
    ) -> std::result::Result<Router, String> {
        if (prefill.is_empty() || decode.is_empty()) && mixed.is_empty() {
            return Err("a router needs a --prefill and a --decode worker, or a --mixed one".into());
        }
        Ok(Router { pools: Pools::new(prefill, decode, mixed, thresholds) })
    }

    /// Mounts the OpenAI routes on an actix app.
    pub fn configure(cfg: &mut web::ServiceConfig, router: web::Data<Router>) {
        cfg.app_data(router)
            .app_data(web::PayloadConfig::new(crate::serve::MAX_BODY))
            .route("/v1/completions", web::post().to(completions))
            .route("/v1/chat/completions", web::post().to(chat_completions))
            .route("/health", web::get().to(health));
    }
}

async fn completions(router: web::Data<Router>, body: web::Bytes) -> HttpResponse {
    route(router, body, "completions").await
}

async fn chat_completions(router: web::Data<Router>, body: web::Bytes) -> HttpResponse {
    route(router, body, "chat/completions").await
}

async fn health(router: web::Data<Router>) -> HttpResponse {
    HttpResponse::Ok().json(router.pools.health())
}

/// A reservation at a decode worker: its index, the handle, the reservation's answer.
struct Reserved {
    decode: (PoolId, usize),
    kv: usize,
    handle: String,
    answer: Value,
    url: Url,
}

/// Reserves `body` at the least loaded decode worker that answers.
fn reserve(r: &Router, body: &str, path: &str) -> std::result::Result<Reserved, Answer> {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let kv = max_tokens(&v);
    let mut tried = Vec::new();
    loop {
        let Some((id, i, url)) = r.pools.pick(Phase::Decode, kv, &tried) else {
            return Err(Answer::error(503, "no decode worker can be reached".into()));
        };
        tried.push((id, i));
        match post_json(&url, &format!("/weir/v1/reserve/{path}"), body, PATIENCE) {
            Err(e) => {
                r.pools.done(id, i, kv, false);
                tracing::warn!("decode worker {url}: {e}");
            }
            Ok(resp) if resp.status != 200 => {
                r.pools.done(id, i, kv, true);
                let answer = Answer(resp.status, resp.text(1 << 20));
                // No room there now: another decode worker may have it.
                if answer.0 == 429 && r.pools.pick(Phase::Decode, 0, &tried).is_some() {
                    continue;
                }
                return Err(answer);
            }
            Ok(resp) => {
                let answer: Value = serde_json::from_str(&resp.text(64 << 20)).unwrap_or(Value::Null);
                let Some(handle) = answer.get("handle").and_then(Value::as_str).map(str::to_string) else {
                    r.pools.done(id, i, kv, true);
                    return Err(Answer::error(
                        502,
                        format!("decode worker {url} answered a reservation without a handle"),
                    ));
                };
                let prompt = answer.get("prompt").and_then(Value::as_array).map_or(0, Vec::len);
                // The promise counts the prompt too, now that it is known.
                r.pools.add(id, i, prompt);
                return Ok(Reserved { decode: (id, i), kv: kv + prompt, handle, answer, url });
            }
        }
    }
}

/// Prefills a reservation at the prefill worker with the fewest prompt tokens pending; an
/// error (for the client) when none could do it.
fn prefill(r: &Router, res: &Reserved) -> std::result::Result<(), String> {
    let a = &res.answer;
    let n = a.get("prompt").and_then(Value::as_array).map_or(0, Vec::len);
    let body = json!({
        "prompt": a["prompt"], "kv_addr": a["kv_addr"], "handle": res.handle,
        "temperature": a["temperature"], "top_p": a["top_p"], "top_k": a["top_k"], "seed": a["seed"],
    })
    .to_string();
    let mut tried = Vec::new();
    loop {
        let Some((id, i, url)) = r.pools.pick(Phase::Prefill, n, &tried) else {
            return Err("no prefill worker can be reached".into());
        };
        tried.push((id, i));
        match post_json(&url, "/weir/v1/prefill", &body, PATIENCE) {
            // Not reached: nothing was sent for this request, so another may take it.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused || e.kind() == std::io::ErrorKind::NotFound => {
                r.pools.done(id, i, n, false);
            }
            Err(e) => {
                r.pools.done(id, i, n, false);
                return Err(format!("prefill worker {url}: {e}"));
            }
            Ok(resp) => {
                r.pools.done(id, i, n, true);
                return match resp.status {
                    200 => Ok(()),
                    s => Err(format!("prefill worker {url} answered {s}: {}", resp.text(4096))),
                };
            }
        }
    }
}

/// One request through the router, start to end.
async fn route(router: web::Data<Router>, body: web::Bytes, path: &'static str) -> HttpResponse {
    let body = match String::from_utf8(body.to_vec()) {
        Ok(b) => b,
        Err(e) => return error(400, format!("the body is not UTF-8: {e}")),
    };
    let stream = serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v.get("stream").and_then(Value::as_bool))
        .unwrap_or(false);
    if router.pools.whole() {
        return whole_on_mixed(router, body, path, stream).await;
    }
    let r = router.clone();
    let reserved = match web::block(move || reserve(&r, &body, path)).await {
        Ok(Ok(x)) => Arc::new(x),
        Ok(Err(answer)) => return answer.respond(),
        Err(e) => return error(500, e.to_string()),
    };
    // Prefill runs beside the decode worker's response, which waits for the KV cache; a
    // prefill that fails ends the decode worker's request with its cause.
    let (r, res) = (router.clone(), reserved.clone());
    actix_web::rt::task::spawn_blocking(move || {
        if let Err(e) = prefill(&r, &res) {
            tracing::warn!("request {}: {e}", res.handle);
            let body = json!({ "reason": e }).to_string();
            let _ = post_json(&res.url, &format!("/weir/v1/abort/{}", res.handle), &body, Duration::from_secs(10));
        }
    });
    let res = reserved.clone();
    let resumed =
        web::block(move || post_json(&res.url, &format!("/weir/v1/resume/{}", res.handle), "{}", PATIENCE)).await;
    let resp = match resumed {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => {
            router.pools.done(reserved.decode.0, reserved.decode.1, reserved.kv, false);
            return error(502, format!("decode worker {}: {e}", reserved.url));
        }
        Err(e) => return error(500, e.to_string()),
    };
    let url = reserved.url.clone();
    let finish = move |whole: bool| router.pools.done(reserved.decode.0, reserved.decode.1, reserved.kv, whole);
    relay(resp, stream, url, finish).await
}

/// Tokens a request will hold, roughly, before it is tokenized: its prompt's ids, or a token
/// per four bytes of text, and its output.
fn estimate(body: &str) -> usize {
    let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    let prompt = match v.get("prompt") {
        Some(Value::Array(ids)) => ids.len(),
        _ => body.len() / 4,
    };
    prompt + max_tokens(&v)
}

/// The output tokens a request asks for (OpenAI's default 16 where it gives none).
fn max_tokens(v: &Value) -> usize {
    v.get("max_tokens").or(v.get("max_completion_tokens")).and_then(Value::as_u64).unwrap_or(16) as usize
}

/// A request run whole by the least loaded mixed worker that answers.
async fn whole_on_mixed(router: web::Data<Router>, body: String, path: &'static str, stream: bool) -> HttpResponse {
    let load = estimate(&body);
    let mut tried = Vec::new();
    loop {
        let Some((id, i, url)) = router.pools.pick_whole(load, &tried) else {
            return error(503, "no worker can be reached".into());
        };
        tried.push((id, i));
        let (u, b) = (url.clone(), body.clone());
        match web::block(move || post_json(&u, &format!("/v1/{path}"), &b, PATIENCE)).await {
            Ok(Ok(resp)) => {
                let r = router.clone();
                return relay(resp, stream, url, move |whole| r.pools.done(id, i, load, whole)).await;
            }
            Ok(Err(e)) => {
                tracing::warn!("mixed worker {url}: {e}");
                router.pools.done(id, i, load, false);
            }
            Err(e) => return error(500, e.to_string()),
        }
    }
}

/// Hands the decode worker's response to the client: a whole one when it is whole (a 502 if
/// the decode worker stopped before), a stream as it comes (ending with an error event if the
/// decode worker stopped mid-stream). A client that goes away closes the decode worker's
/// response, which ends the sequence there.
async fn relay(mut resp: Response, stream: bool, url: Url, finish: impl FnOnce(bool) + Send + 'static) -> HttpResponse {
    use std::io::{BufRead, Read};
    if !stream {
        let status = resp.status;
        let read = web::block(move || {
            let mut body = Vec::new();
            let got = resp.body.read_to_end(&mut body).map(|_| body);
            finish(got.is_ok());
            got
        })
        .await;
        return match read {
            Ok(Ok(body)) => Answer(status, String::from_utf8_lossy(&body).into_owned()).respond(),
            Ok(Err(e)) => error(502, format!("worker {url} stopped mid-response: {e}")),
            Err(e) => error(500, e.to_string()),
        };
    }
    let status = actix_web::http::StatusCode::from_u16(resp.status).unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
    let (tx, rx) = tokio::sync::mpsc::channel::<web::Bytes>(64);
    actix_web::rt::task::spawn_blocking(move || {
        // The stream's last bytes: whether it ended as a stream ends.
        let mut tail = Vec::new();
        let end = loop {
            let chunk = match resp.body.fill_buf() {
                Ok([]) => break None,
                Err(e) => break Some(e.to_string()),
                Ok(b) => web::Bytes::copy_from_slice(b),
            };
            resp.body.consume(chunk.len());
            tail.extend_from_slice(&chunk);
            tail.drain(..tail.len().saturating_sub(4096));
            if tx.blocking_send(chunk).is_err() {
                break None;
            }
        };
        let text = String::from_utf8_lossy(&tail);
        let whole =
            text.contains("data: [DONE]") || text.rsplit("data: ").next().is_some_and(|e| e.contains("\"error\""));
        if !whole && !tx.is_closed() {
            let why = end.unwrap_or_else(|| "the connection closed".into());
            let msg = format!("worker {url} stopped mid-response: {why}");
            let body = json!({"error": {"message": msg, "type": "server_error", "param": null, "code": null}});
            let _ = tx.blocking_send(web::Bytes::from(format!("data: {body}\n\n")));
        }
        finish(whole);
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, actix_web::Error>(b), rx))
    });
    HttpResponse::build(status)
        .content_type("text/event-stream")
        .insert_header(("Cache-Control", "no-cache"))
        .streaming(body)
}

/// Serves the router on `addr` until SIGINT or SIGTERM.
pub fn run(router: Router, addr: (&str, u16)) -> std::io::Result<()> {
    let data = web::Data::new(router);
    let (host, port) = (addr.0.to_string(), addr.1);
    actix_web::rt::System::new().block_on(async move {
        // Which mixed workers take a phase alone is known before the first request.
        let first = data.clone();
        let _ = web::block(move || first.pools.check_health()).await;
        let checked = data.clone();
        actix_web::rt::spawn(async move {
            loop {
                actix_web::rt::time::sleep(HEALTH_EVERY).await;
                let r = checked.clone();
                let _ = web::block(move || r.pools.check_health()).await;
            }
        });
        let http =
            actix_web::HttpServer::new(move || actix_web::App::new().configure(|c| Router::configure(c, data.clone())))
                .bind((host.as_str(), port))?;
        for a in http.addrs() {
            tracing::info!("routing on http://{a}");
            eprintln!("weir route: listening on http://{a}");
        }
        http.run().await
    })
}
