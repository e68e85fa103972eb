//! `weir load`: a load generator for OpenAI-compatible servers — `weir serve`, llama.cpp's
//! `llama-server`, vLLM — so that they can be measured side by side in one run.
//!
//! Requests arrive as a Poisson process (exponential gaps, open loop: a slow server does not
//! slow the arrivals; held to the rate given, see [`workload`]) at each of several rates; each is a streamed `/v1/completions` of random
//! prompt token ids and a fixed number of output tokens (`ignore_eos`, greedy), lengths drawn
//! uniformly from the ranges given. Every target gets the same requests at the same offsets;
//! at each rate the targets take turns (the order alternating from rate to rate). Measured per
//! request, from the client's side: time to first token (TTFT: sending → first text), time
//! between tokens (TBT: the gaps between streamed text events) and end to end; per target and
//! rate: throughput and those times' p50, p90 and p99. [`plot`] draws latency against
//! throughput as an SVG.

pub mod http;
pub mod plot;

use http::Url;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::BufRead;
use std::time::{Duration, Instant};
use weir_operators::sampler::Rng;

/// A server to load: a name for the report and where it is.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub url: Url,
}

impl std::str::FromStr for Target {
    type Err = String;
    /// `NAME=http://host:port` or just the address (named by it).
    fn from_str(s: &str) -> Result<Target, String> {
        match s.split_once('=') {
            Some((name, url)) if !name.is_empty() => Ok(Target { name: name.into(), url: url.parse()? }),
            _ => Ok(Target { name: s.into(), url: s.parse()? }),
        }
    }
}

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub targets: Vec<Target>,
    /// Arrival rates, requests per second, in the order run.
    pub rates: Vec<f64>,
    /// Requests at each rate.
    pub requests: usize,
    /// Prompt and output lengths in tokens, inclusive ranges drawn from uniformly.
    pub prompt_len: (usize, usize),
    pub gen_len: (usize, usize),
    /// Prompt ids are drawn from `3..vocab` (below 3: the usual special tokens).
    pub vocab: u32,
    pub seed: u64,
    /// The `model` field sent (some servers require theirs).
    pub model: Option<String>,
    /// The longest a request may take before it counts as failed.
    pub timeout: Duration,
}

/// One request of a workload: when it is sent (after the start), what it asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    pub at: Duration,
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
}

/// The requests of the `index`-th rate: the same for every target.
pub fn workload(o: &LoadOptions, rate: f64, index: usize) -> Vec<Ask> {
    let mut rng = Rng::new(o.seed ^ (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut uniform = |(lo, hi): (usize, usize)| lo + (rng.next_u64() % (hi - lo + 1) as u64) as usize;
    let lengths: Vec<(usize, usize)> = (0..o.requests).map(|_| (uniform(o.prompt_len), uniform(o.gen_len))).collect();
    // Exponential gaps (−ln(1 − u)), n + 1 of them scaled together so that they span
    // (n + 1) / rate: a Poisson process given its count, so the rate run is the one asked for
    // (the sum of 24 plain draws strays ±20%).
    let gaps: Vec<f64> = (0..=o.requests).map(|_| -(1.0 - rng.next_f64()).ln()).collect();
    let scale = (o.requests + 1) as f64 / rate / gaps.iter().sum::<f64>();
    let span = o.vocab.saturating_sub(3).max(1) as u64;
    let mut t = 0.0;
    lengths
        .into_iter()
        .zip(gaps)
        .map(|((p, g), gap)| {
            t += gap * scale;
            let prompt = (0..p).map(|_| 3 + (rng.next_u64() % span) as u32).collect();
            Ask { at: Duration::from_secs_f64(t), prompt, max_tokens: g }
        })
        .collect()
}

/// What one request saw, times in seconds from its sending.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// When each streamed piece of text arrived.
    pub pieces: Vec<f64>,
    pub end: f64,
    /// Output tokens: the usage the server reported, or else the pieces counted.
    pub tokens: usize,
    pub error: Option<String>,
}

/// Send one streamed completion and time what comes back.
pub fn send(target: &Target, ask: &Ask, o: &LoadOptions) -> Seen {
    let mut body = json!({
        "prompt": ask.prompt, "max_tokens": ask.max_tokens, "temperature": 0, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true},
    });
    if let Some(m) = &o.model {
        body["model"] = m.clone().into();
    }
    let t0 = Instant::now();
    let mut seen = Seen::default();
    if let Err(e) = read_stream(target, &body.to_string(), o.timeout, t0, &mut seen) {
        seen.error = Some(e);
    }
    seen.end = t0.elapsed().as_secs_f64();
    if seen.tokens == 0 {
        seen.tokens = seen.pieces.len();
    }
    seen
}

fn read_stream(target: &Target, body: &str, timeout: Duration, t0: Instant, seen: &mut Seen) -> Result<(), String> {
    let r = http::post_json(&target.url, "/v1/completions", body, timeout).map_err(|e| e.to_string())?;
    if r.status != 200 {
        let status = r.status;
        return Err(format!("HTTP {status}: {}", r.text(300)));
    }
    let mut body = r.body;
    let mut line = String::new();
    loop {
        line.clear();
        if body.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err("the stream ended without `data: [DONE]`".into());
        }
        let Some(data) = line.trim().strip_prefix("data:").map(str::trim) else { continue };
        if data == "[DONE]" {
            return Ok(());
        }
        let v: Value = serde_json::from_str(data).map_err(|e| format!("an event that is not JSON ({e}): {data}"))?;
        if let Some(e) = v.get("error") {
            return Err(format!("an error event: {e}"));
        }
        let text = v["choices"][0]["text"].as_str().unwrap_or("");
        if !text.is_empty() {
            seen.pieces.push(t0.elapsed().as_secs_f64());
        }
        if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
            seen.tokens = n as usize;
        }
    }
}

/// p50, p90 and p99 (nearest rank), in the unit of the samples (NaN, written `null`, when
/// there are none).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Quantiles {
    #[serde(deserialize_with = "nan_if_null")]
    pub p50: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p90: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub p99: f64,
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Quantiles {
    pub fn of(mut v: Vec<f64>) -> Quantiles {
        if v.is_empty() {
            return Quantiles { p50: f64::NAN, p90: f64::NAN, p99: f64::NAN };
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Quantiles { p50: at(0.5), p90: at(0.9), p99: at(0.99) }
    }
}

/// One target at one rate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    pub target: String,
    pub url: String,
    /// The arrival rate asked for, requests per second.
    pub rate: f64,
    pub requests: usize,
    pub completed: usize,
    pub failed: usize,
    /// Up to three of the failures' messages.
    pub errors: Vec<String>,
    /// From the first sending to the last answer, seconds.
    pub seconds: f64,
    /// Completed requests per second over `seconds`.
    pub requests_per_s: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// What the completed requests asked for (`max_tokens`): a server that stopped early
    /// shows here.
    pub output_tokens_asked: usize,
    pub output_tokens_per_s: f64,
    pub ttft_ms: Quantiles,
    pub tbt_ms: Quantiles,
    pub e2e_ms: Quantiles,
}

/// Run `asks` against `target`, each sent at its time from a thread of its own.
pub fn run_one(target: &Target, asks: &[Ask], rate: f64, o: &LoadOptions) -> Point {
    let start = Instant::now();
    let seen: Vec<(Duration, Seen)> = std::thread::scope(|s| {
        let handles: Vec<_> = asks
            .iter()
            .map(|a| {
                if let Some(wait) = a.at.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
                let sent = start.elapsed();
                s.spawn(move || (sent, send(target, a, o)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("a request's thread panicked")).collect()
    });
    let first = seen.iter().map(|(t, _)| *t).min().unwrap_or_default();
    let last = seen.iter().map(|(t, s)| *t + Duration::from_secs_f64(s.end)).max().unwrap_or_default();
    let seconds = (last - first).as_secs_f64().max(1e-9);
    let ok: Vec<(&Ask, &Seen)> =
        asks.iter().zip(&seen).filter(|(_, (_, s))| s.error.is_none()).map(|(a, (_, s))| (a, s)).collect();
    let mut errors: Vec<String> = seen.iter().filter_map(|(_, s)| s.error.clone()).collect();
    let failed = errors.len();
    errors.sort();
    errors.dedup();
    errors.truncate(3);
    let output_tokens: usize = ok.iter().map(|(_, s)| s.tokens).sum();
    let ms = 1e3;
    Point {
        target: target.name.clone(),
        url: target.url.to_string(),
        rate,
        requests: asks.len(),
        completed: ok.len(),
        failed,
        errors,
        seconds,
        requests_per_s: ok.len() as f64 / seconds,
        prompt_tokens: ok.iter().map(|(a, _)| a.prompt.len()).sum(),
        output_tokens,
        output_tokens_asked: ok.iter().map(|(a, _)| a.max_tokens).sum(),
        output_tokens_per_s: output_tokens as f64 / seconds,
        ttft_ms: Quantiles::of(ok.iter().filter_map(|(_, s)| s.pieces.first().map(|t| t * ms)).collect()),
        tbt_ms: Quantiles::of(ok.iter().flat_map(|(_, s)| s.pieces.windows(2).map(|w| (w[1] - w[0]) * ms)).collect()),
        e2e_ms: Quantiles::of(ok.iter().map(|(_, s)| s.end * ms).collect()),
    }
}

/// A target that cannot answer one small request.
#[derive(Debug, thiserror::Error)]
#[error("target {name} ({url}): {message}")]
pub struct Unreachable {
    pub name: String,
    pub url: String,
    pub message: String,
}

/// One short request to each target, before anything is timed: a target that is not there,
/// or does not speak the API, is reported by name; the first request's costs stay out of the
/// figures.
pub fn warm_up(o: &LoadOptions) -> Result<(), Unreachable> {
    let span = o.vocab.saturating_sub(3).max(1);
    let ask = Ask { at: Duration::ZERO, prompt: (0..8).map(|i| 3 + i % span).collect(), max_tokens: 4 };
    for t in &o.targets {
        let seen = send(t, &ask, o);
        let message = match (seen.error, seen.tokens) {
            (Some(e), _) => e,
            (None, 0) => "the warm-up request streamed no text".into(),
            _ => continue,
        };
        return Err(Unreachable { name: t.name.clone(), url: t.url.to_string(), message });
    }
    Ok(())
}

/// Every rate, every target: the points in the order run, each handed to `each` as it is done.
pub fn run(o: &LoadOptions, mut each: impl FnMut(&Point)) -> Result<Vec<Point>, Unreachable> {
    warm_up(o)?;
    let mut points = Vec::new();
    for (i, &rate) in o.rates.iter().enumerate() {
        let asks = workload(o, rate, i);
        let mut order: Vec<&Target> = o.targets.iter().collect();
        if i % 2 == 1 {
            order.reverse();
        }
        for t in order {
            let p = run_one(t, &asks, rate, o);
            each(&p);
            points.push(p);
        }
    }
    Ok(points)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> LoadOptions {
        LoadOptions {
            targets: vec![],
            rates: vec![2.0],
            requests: 4000,
            prompt_len: (5, 9),
            gen_len: (1, 3),
            vocab: 100,
            seed: 7,
            model: None,
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn arrivals_are_poisson_at_the_rate_and_the_same_for_every_run() {
        let o = options();
        let w = workload(&o, 2.0, 0);
        assert_eq!(w, workload(&o, 2.0, 0));
        assert_ne!(w, workload(&o, 2.0, 1));
        let gaps: Vec<f64> = w.windows(2).map(|p| (p[1].at - p[0].at).as_secs_f64()).collect();
        let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
        let var = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
        // Exponential: mean 1/rate, standard deviation equal to the mean.
        assert!((mean - 0.5).abs() < 0.03, "{mean}");
        // Held to the rate: n requests and one more span (n + 1) / rate.
        let last = w.last().unwrap().at.as_secs_f64();
        assert!(last < 4001.0 / 2.0 && last > 4001.0 / 2.0 - 5.0, "{last}");
        let few = LoadOptions { requests: 24, ..o.clone() };
        for i in 0..20 {
            let last = workload(&few, 0.15, i).last().unwrap().at.as_secs_f64();
            assert!(last < 25.0 / 0.15, "{last}");
        }
        assert!((var.sqrt() / mean - 1.0).abs() < 0.08, "{}", var.sqrt() / mean);
        assert!(w.iter().all(|a| (5..=9).contains(&a.prompt.len()) && (1..=3).contains(&a.max_tokens)));
        assert!(w.iter().flat_map(|a| &a.prompt).all(|&id| (3..100).contains(&id)));
        for n in 5..=9 {
            assert!(w.iter().any(|a| a.prompt.len() == n), "no prompt of {n}");
        }
    }

    #[test]
    fn quantiles_are_nearest_rank() {
        let q = Quantiles::of((1..=100).rev().map(f64::from).collect());
        assert_eq!((q.p50, q.p90, q.p99), (50.0, 90.0, 99.0));
        let q = Quantiles::of(vec![3.0]);
        assert_eq!((q.p50, q.p99), (3.0, 3.0));
        assert!(Quantiles::of(vec![]).p50.is_nan());
    }

    #[test]
    fn targets_are_named_or_named_by_their_address() {
        let t: Target = "llama.cpp=http://127.0.0.1:8081".parse().unwrap();
        assert_eq!((t.name.as_str(), t.url.port), ("llama.cpp", 8081));
        let t: Target = "http://h:1".parse().unwrap();
        assert_eq!(t.name, "http://h:1");
        assert!("x=ftp://h".parse::<Target>().unwrap_err().contains("http://"));
    }
}
