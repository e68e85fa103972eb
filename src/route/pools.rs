//! The router's pools of workers and how it chooses among them (Splitwise's cluster-level
//! scheduler): join-shortest-queue within a pool, and the mixed pool's rebalancing — once the
//! least loaded prefill (decode) worker has `threshold` tokens waiting (promised), a mixed
//! worker that can take that phase joins the choice; one that cannot (no KV edge) takes the
//! request whole, as it does when a split pool has nobody up.

use crate::load::http::Url;
use serde_json::Value;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Seconds a worker that could not be reached stays out.
pub const DOWN_SECONDS: u64 = 5;

/// Which pool a worker is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolId {
    Prefill,
    Decode,
    Mixed,
}

/// A phase of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Prefill,
    Decode,
}

/// One worker and what the router has sent it.
pub struct Worker {
    pub url: Url,
    /// Tokens it holds for requests in flight: prompt tokens pending (prefill), or the KV
    /// positions promised (decode); both for a mixed worker.
    pub load: usize,
    pub down_until: Option<Instant>,
    /// Which phases it takes alone (a mixed worker's, from its `/health`; a split pool's are
    /// its pool's).
    pub prefills: bool,
    pub decodes: bool,
}

impl Worker {
    fn up(&self, now: Instant) -> bool {
        self.down_until.is_none_or(|t| t <= now)
    }
    fn takes(&self, phase: Phase) -> bool {
        match phase {
            Phase::Prefill => self.prefills,
            Phase::Decode => self.decodes,
        }
    }
}

/// The three pools and the thresholds.
pub struct Pools {
    pools: [Mutex<Vec<Worker>>; 3],
    /// Prompt tokens pending at the least loaded prefill worker past which the mixed pool helps.
    pub prefill_threshold: usize,
    /// KV positions promised at the least loaded decode worker past which the mixed pool helps.
    pub decode_threshold: usize,
}

fn pool(urls: &[Url], prefills: bool, decodes: bool) -> Mutex<Vec<Worker>> {
    Mutex::new(urls.iter().map(|u| Worker { url: u.clone(), load: 0, down_until: None, prefills, decodes }).collect())
}

impl Pools {
    pub fn new(prefill: &[Url], decode: &[Url], mixed: &[Url], thresholds: (usize, usize)) -> Pools {
        Pools {
            pools: [pool(prefill, true, false), pool(decode, false, true), pool(mixed, false, false)],
            prefill_threshold: thresholds.0,
            decode_threshold: thresholds.1,
        }
    }

    pub fn get(&self, id: PoolId) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        self.pools[id as usize].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn home(phase: Phase) -> PoolId {
        match phase {
            Phase::Prefill => PoolId::Prefill,
            Phase::Decode => PoolId::Decode,
        }
    }

    fn threshold(&self, phase: Phase) -> usize {
        match phase {
            Phase::Prefill => self.prefill_threshold,
            Phase::Decode => self.decode_threshold,
        }
    }

    /// Whether the mixed pool helps with `phase` now: its home pool has nobody up, or the least
    /// loaded there has passed the threshold.
    fn spills(&self, phase: Phase) -> bool {
        let now = Instant::now();
        self.get(Self::home(phase))
            .iter()
            .filter(|w| w.up(now))
            .map(|w| w.load)
            .min()
            .is_none_or(|m| m >= self.threshold(phase))
    }

    /// Whether a request goes whole to a mixed worker: one is up, and a phase spills over to
    /// the mixed pool where no worker up can take that phase alone.
    pub fn whole(&self) -> bool {
        let now = Instant::now();
        let mixed = self.get(PoolId::Mixed);
        if !mixed.iter().any(|w| w.up(now)) {
            return false;
        }
        [Phase::Prefill, Phase::Decode].into_iter().any(|p| {
            let helper = mixed.iter().any(|w| w.up(now) && w.takes(p));
            let home_up = self.get(Self::home(p)).iter().any(|w| w.up(now));
            (!home_up || self.spills(p)) && !helper
        })
    }

    /// The least loaded worker up for `phase` (its pool, or a mixed one that takes the phase
    /// when the pool spills), not among `tried`, with `load` added to it.
    pub fn pick(&self, phase: Phase, load: usize, tried: &[(PoolId, usize)]) -> Option<(PoolId, usize, Url)> {
        let now = Instant::now();
        let mut ids = vec![Self::home(phase)];
        if self.spills(phase) {
            ids.push(PoolId::Mixed);
        }
        let mut best: Option<(usize, PoolId, usize)> = None;
        for id in ids {
            for (i, w) in self.get(id).iter().enumerate() {
                let fits = w.up(now) && (id != PoolId::Mixed || w.takes(phase)) && !tried.contains(&(id, i));
                if fits && best.is_none_or(|b| w.load < b.0) {
                    best = Some((w.load, id, i));
                }
            }
        }
        let (_, id, i) = best?;
        let mut p = self.get(id);
        p[i].load += load;
        Some((id, i, p[i].url.clone()))
    }

    /// The least loaded mixed worker up, for a whole request.
    pub fn pick_whole(&self, load: usize, tried: &[(PoolId, usize)]) -> Option<(PoolId, usize, Url)> {
        let now = Instant::now();
        let mut p = self.get(PoolId::Mixed);
        let i = (0..p.len())
            .filter(|&i| p[i].up(now) && !tried.contains(&(PoolId::Mixed, i)))
            .min_by_key(|&i| p[i].load)?;
        p[i].load += load;
        Some((PoolId::Mixed, i, p[i].url.clone()))
    }

    /// Adds `load` to a worker (what it holds, once known).
    pub fn add(&self, id: PoolId, i: usize, load: usize) {
        self.get(id)[i].load += load;
    }

    /// A request's `load` at worker `i` of `id` is done; `reached: false` takes the worker out.
    pub fn done(&self, id: PoolId, i: usize, load: usize, reached: bool) {
        let mut p = self.get(id);
        p[i].load = p[i].load.saturating_sub(load);
        if !reached {
            tracing::warn!("worker {} cannot be reached: out for {DOWN_SECONDS} s", p[i].url);
            p[i].down_until = Some(Instant::now() + Duration::from_secs(DOWN_SECONDS));
        }
    }

    /// Asks every worker's `/health`: one that answers is up (a mixed one says which phases it
    /// takes alone), one that does not is out.
    pub fn check_health(&self) {
        for id in [PoolId::Prefill, PoolId::Decode, PoolId::Mixed] {
            let urls: Vec<Url> = self.get(id).iter().map(|w| w.url.clone()).collect();
            for (i, url) in urls.iter().enumerate() {
                let answer = crate::load::http::get(url, "/health", Duration::from_secs(2))
                    .ok()
                    .filter(|r| r.status == 200)
                    .map(|r| serde_json::from_str::<Value>(&r.text(1 << 16)).unwrap_or(Value::Null));
                let mut p = self.get(id);
                let was_up = p[i].up(Instant::now());
                p[i].down_until = match answer.is_some() {
                    true => None,
                    false => Some(Instant::now() + Duration::from_secs(DOWN_SECONDS)),
                };
                if let (PoolId::Mixed, Some(a)) = (id, &answer) {
                    p[i].prefills = a["phases"]["prefill"] == true;
                    p[i].decodes = a["phases"]["decode"] == true;
                }
                if was_up != answer.is_some() {
                    tracing::warn!(
                        "worker {url} is {}",
                        if answer.is_some() { "back" } else { "not answering: taken out" }
                    );
                }
            }
        }
    }

    /// Each pool's workers, for `/health`.
    pub fn health(&self) -> Value {
        let now = Instant::now();
        let list = |id| -> Vec<Value> {
            self.get(id)
                .iter()
                .map(|w| {
                    serde_json::json!({"url": w.url.to_string(), "load": w.load, "up": w.up(now),
                    "prefill": w.prefills, "decode": w.decodes})
                })
                .collect()
        };
        serde_json::json!({"status": "ok", "prefill": list(PoolId::Prefill), "decode": list(PoolId::Decode),
            "mixed": list(PoolId::Mixed)})
    }
}
