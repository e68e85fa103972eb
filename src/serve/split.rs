//! The routes a split deployment adds (`weir serve --role prefill|decode`, driven by
//! `weir route`; `crate::split` is the engine side):
//!
//! - `POST /weir/v1/reserve/completions` and `/weir/v1/reserve/chat/completions` (a decode
//!   worker's): the OpenAI body, read and checked as the public routes do; the request's whole
//!   length is reserved and it waits for its KV cache. Answers the handle, the address prefill
//!   workers send KV caches to, the prompt's token ids and the sampling to prefill them with.
//! - `POST /weir/v1/resume/{handle}` (a decode worker's): the reserved request's response, as
//!   the public route would give it — whole, or streamed — from the first token on. A request
//!   not resumed within [`PARK_SECONDS`] is dropped (its reservation freed).
//! - `POST /weir/v1/prefill` (a prefill worker's): `{"prompt": [ids], "kv_addr", "handle",
//!   "temperature", "top_p", "top_k", "seed"}`: prefills, sending the KV cache layer by layer
//!   to `kv_addr`; answers `{"first": id}` once the first token is sent.
//!
//! - `POST /weir/v1/abort/{handle}` (a decode worker's): `{"reason"}`: the prefill for a
//!   reserved request failed; the request ends with the reason.
//!
//! Handles and seeds travel as strings (JSON numbers lose 64-bit integers).

use super::{answer, api, error_response, read_body, submit_error, ApiError, Job, Server};
use crate::request::{Generation, LogitsMode, Request};
use crate::Engine;
use actix_web::{web, HttpResponse};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// Seconds a reserved request waits to be resumed.
pub const PARK_SECONDS: u64 = 60;

/// Reserved requests by handle.
#[derive(Default)]
pub(super) struct Parked(Mutex<HashMap<u64, (Generation, Job, bool)>>);

impl Parked {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (Generation, Job, bool)>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub(super) fn configure(cfg: &mut web::ServiceConfig) {
    cfg.route("/weir/v1/reserve/completions", web::post().to(reserve_completion))
        .route("/weir/v1/reserve/chat/completions", web::post().to(reserve_chat))
        .route("/weir/v1/resume/{handle}", web::post().to(resume))
        .route("/weir/v1/prefill", web::post().to(prefill))
        .route("/weir/v1/abort/{handle}", web::post().to(abort));
}

impl Server {
    /// Runs prompts on `prefill`, an engine of this process on other lanes (its graph exports
    /// the KV cache: `--split-prefill-graph`), their KV caches written layer by layer straight
    /// into this server's engine, which decodes: the split inside one box.
    pub fn split_in_process(&mut self, prefill: Engine) -> crate::Result<()> {
        let (mine, theirs) = (self.engine.kv_fingerprint(), prefill.kv_fingerprint());
        if mine != theirs || !prefill.exports_kv() {
            return Err(crate::Error::Request(format!(
                "the prefill graph must export the KV cache of the same attention nodes (its: {theirs}; the decode \
                 graph's: {mine})"
            )));
        }
        self.prefill = Some(std::sync::Arc::new(prefill));
        Ok(())
    }

    /// Submits a request split between the in-process prefill engine and this server's: the
    /// reservation retried until the decoding engine has room (a queue, as the plain server's;
    /// this runs on actix's blocking pool), then the prompt handed to the prefill engine.
    fn submit_split(&self, req: crate::Request) -> crate::Result<Generation> {
        let Some(prefill) = &self.prefill else { return self.engine.submit(req) };
        let deadline = Instant::now() + std::time::Duration::from_secs(600);
        let (handle, gen) = loop {
            match self.engine.expect_kv(req.clone()) {
                Err(crate::Error::NoRoom { .. }) if Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20))
                }
                other => break other?,
            }
        };
        match prefill.prefill_into(req, &self.engine, handle) {
            // Its events are not needed: the decode side hears of a failure through the import.
            Ok(first) => drop_after_prefill(first),
            Err(e) => {
                self.engine.kv_abort(handle, &e.to_string());
            }
        }
        Ok(gen)
    }

    /// Takes prefill workers' KV caches at `addr` (a decode worker's `--kv-listen`).
    pub fn listen_kv(&mut self, addr: &str) -> crate::Result<&str> {
        let l = self.engine.kv_listen(addr)?;
        Ok(self.kv.insert(l).addr())
    }
}

async fn reserve_completion(server: web::Data<Server>, payload: web::Payload) -> HttpResponse {
    reserve(server, payload, false).await
}

async fn reserve_chat(server: web::Data<Server>, payload: web::Payload) -> HttpResponse {
    reserve(server, payload, true).await
}

async fn reserve(server: web::Data<Server>, payload: web::Payload, chat: bool) -> HttpResponse {
    let Some(kv) = &server.kv else {
        return error_response(&ApiError::invalid("this server takes no KV caches: start it with --role decode"));
    };
    let arrived = Instant::now();
    let job =
        match read_body(payload).await.and_then(|b| api::parse(&b, chat)).and_then(|a| server.job(a, chat, arrived)) {
            Ok(j) => j,
            Err(e) => return error_response(&e),
        };
    // Reservations nobody resumed in time are given up.
    server.parked.lock().retain(|_, (_, j, _)| j.arrived.elapsed().as_secs() < PARK_SECONDS);
    // The scheduler answers between two passes: wait off the async workers.
    let (s, request) = (server.clone(), job.request.clone());
    let (handle, gen) = match web::block(move || s.engine.expect_kv(request)).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return error_response(&submit_error(e).1),
        Err(e) => {
            return error_response(&ApiError { status: 500, kind: "server_error", param: None, message: e.to_string() })
        }
    };
    let s = job.request.sampling;
    let body = json!({
        "handle": handle.to_string(),
        "kv_addr": kv.addr(),
        "prompt": job.request.prompt,
        "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "seed": s.seed.to_string(),
    });
    server.parked.lock().insert(handle, (gen, job, chat));
    HttpResponse::Ok().json(body)
}

async fn resume(server: web::Data<Server>, path: web::Path<String>) -> HttpResponse {
    let parked = path.parse::<u64>().ok().and_then(|h| server.parked.lock().remove(&h));
    let Some((gen, job, chat)) = parked else {
        let e = ApiError {
            status: 404,
            kind: "invalid_request_error",
            param: None,
            message: format!("no request reserved as {path}"),
        };
        return error_response(&e);
    };
    answer(server, gen, job, chat).await
}

/// What a prefill call asks, read from its body.
fn prefill_request(body: &[u8]) -> Result<(Request, String, u64), ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    let num =
        |k: &str| v.get(k).and_then(Value::as_f64).ok_or_else(|| ApiError::field(k, format!("`{k}` must be a number")));
    let int = |k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| ApiError::field(k, format!("`{k}` must be a decimal integer in a string")))
    };
    let prompt: Vec<u32> = v
        .get("prompt")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|x| x.as_u64().and_then(|x| u32::try_from(x).ok())).collect())
        .ok_or_else(|| ApiError::field("prompt", "`prompt` must be an array of token ids"))?;
    let kv_addr = v
        .get("kv_addr")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::field("kv_addr", "`kv_addr` must be a string"))?;
    let sampling = crate::Sampling {
        temperature: num("temperature")? as f32,
        top_p: num("top_p")? as f32,
        top_k: num("top_k")? as usize,
        seed: int("seed")?,
    };
    let req = Request { prompt, max_new_tokens: 1, sampling, stop_at_eos: false, logits: LogitsMode::None };
    Ok((req, kv_addr.to_string(), int("handle")?))
}

async fn prefill(server: web::Data<Server>, payload: web::Payload) -> HttpResponse {
    let (req, addr, handle) = match read_body(payload).await.and_then(|b| prefill_request(&b)) {
        Ok(x) => x,
        Err(e) => return error_response(&e),
    };
    let n = req.prompt.len();
    let gen = match server.engine.prefill_to(req, &addr, handle) {
        Ok(g) => g,
        Err(e) => return error_response(&submit_error(e).1),
    };
    match web::block(move || gen.wait()).await {
        Ok(Ok(out)) => {
            server.metrics.prompt_tokens.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            HttpResponse::Ok().json(json!({"first": out.tokens.first(), "prompt_tokens": n}))
        }
        Ok(Err(e)) => {
            error_response(&ApiError { status: 502, kind: "server_error", param: None, message: e.to_string() })
        }
        Err(e) => error_response(&ApiError { status: 500, kind: "server_error", param: None, message: e.to_string() }),
    }
}

async fn abort(server: web::Data<Server>, path: web::Path<String>, body: web::Bytes) -> HttpResponse {
    let reason = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v.get("reason").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| "the prefill failed".into());
    match path.parse::<u64>() {
        Ok(h) if server.engine.kv_abort(h, &reason) => HttpResponse::Ok().json(json!({"aborted": path.as_str()})),
        _ => error_response(&ApiError {
            status: 404,
            kind: "invalid_request_error",
            param: None,
            message: format!("no request waits for its KV cache as {path}"),
        }),
    }
}

/// Lets a prefill run to its end without a caller: a `Generation` dropped early would cancel
/// it, so it is waited for on actix's blocking pool.
fn drop_after_prefill(gen: Generation) {
    actix_web::rt::task::spawn_blocking(move || {
        let _ = gen.wait();
    });
}

/// Submits a job: to the engine, or split between the in-process prefill engine and it.
pub(super) async fn submit(server: &web::Data<Server>, job: &Job) -> crate::Result<Generation> {
    if server.prefill.is_none() {
        return server.engine.submit(job.request.clone());
    }
    let (s, req) = (server.clone(), job.request.clone());
    web::block(move || s.submit_split(req)).await.map_err(|e| crate::Error::Failed(e.to_string()))?
}
