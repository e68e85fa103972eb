//! The scheduler: the one thread that drives a running program, batching requests into passes.
//!
//! Each step it takes in new requests, admits waiting ones in arrival order while a batch slot
//! and the KV reserve hold their whole length (prompt + most new tokens: attention then never
//! runs out of blocks mid-generation), and sends one pass per micro-batch into the graph's
//! entry edge: every active sequence's share — a decoding one its last token, a prefilling one
//! the next chunk of its prompt, in what is left of the pass's `pass_tokens` — plus the ids of
//! finished sequences, so that the actors free their state. It then waits for the sampled
//! tokens at the exit edge, streams each sequence's token to its caller, and ends sequences at
//! EOS, the token limit or the end of the context. Sequences of different lengths share a
//! pass; each keeps its own KV cache inside the attention actors.

use crate::request::{Event, FinishReason, LogitsMode, Request, Stats};
use crossbeam_channel::{Receiver, Sender, TryRecvError};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use weir_operators::attention::KV_BLOCK_TOKENS;
use weir_operators::kv_link::{ImportState, KvImport, KvImports, KvMsg, KvRoute};
use weir_operators::{Batch, LogitsWanted, Packet, SeqSlice};
use weir_runtime::Program;

/// What the engine asks of the scheduler.
pub(crate) enum Cmd {
    /// A request, by its id, where its events go, and which phases it runs here.
    Submit(u64, Request, Sender<Event>, Phase),
    /// An import became ready or failed: look again.
    Wake,
    /// The caller gave the request up (dropped its `Generation`): end it.
    Cancel(u64),
    /// The engine is stopping: take nothing more, finish what runs. (Not the channel's
    /// disconnection: each `Generation` holds a sender, for its cancellation.)
    Stop,
}

/// Which phases of a request this engine runs (Splitwise's split; `kv_link`).
#[derive(Clone)]
pub(crate) enum Phase {
    /// Prefill and decode, here.
    Both,
    /// The prompt and the first token only, the KV cache sent along `route` as it is stored.
    Prefill(Arc<KvRoute>),
    /// Decode only: the KV cache and the first token arrive into the import.
    Decode(Arc<KvImport>),
}

/// What the scheduler is doing, for metrics (observation only: nothing decides by it).
#[derive(Debug, Default)]
pub struct Gauges {
    /// Requests submitted and not yet admitted (the engine counts them in at `submit`, the
    /// scheduler out as it admits, cancels or refuses them).
    pub waiting: std::sync::atomic::AtomicUsize,
    /// Sequences admitted and not yet finished.
    pub running: std::sync::atomic::AtomicUsize,
    /// KV blocks promised to running sequences (their whole length, in blocks of 16).
    pub kv_blocks: std::sync::atomic::AtomicUsize,
    /// Requests ended because their caller gave them up.
    pub cancelled: std::sync::atomic::AtomicU64,
    /// KV caches taken from prefill workers (a decode worker's).
    pub kv_imports: std::sync::atomic::AtomicU64,
    /// Their transfers' time beyond the end of prefill, in microseconds, all together.
    pub kv_exposed_us: std::sync::atomic::AtomicU64,
}

/// What the scheduler needs to know of the model and the options.
#[derive(Clone)]
pub(crate) struct SchedParams {
    pub eos: Vec<u32>,
    pub max_positions: usize,
    pub vocab: usize,
    pub max_batch: usize,
    pub micro_batches: usize,
    pub pass_tokens: usize,
    /// KV blocks per layer the reserve holds (`None`: no budget, no limit).
    pub kv_blocks: Option<usize>,
    /// Each GPU's memory budget, for the program (`None`: the device's default).
    pub gpu_memory: Option<usize>,
    /// Imports waiting for their KV cache, by handle (a decode worker's).
    pub imports: Arc<KvImports>,
}

/// Positions of KV cache a request of `prompt_len` tokens generating up to `max_new_tokens`
/// holds at most, in whole blocks.
pub fn kv_tokens_needed(prompt_len: usize, max_new_tokens: usize, max_positions: usize) -> usize {
    (prompt_len + max_new_tokens).min(max_positions).div_ceil(KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS
}

/// An admitted sequence.
struct Active {
    id: u64,
    req: Request,
    events: Sender<Event>,
    /// Positions in the KV cache (prompt chunks done, then one per decode step).
    pos: usize,
    last: u32,
    generated: usize,
    submitted: Instant,
    started: Option<Instant>,
    first_token: Option<Instant>,
    /// KV blocks set aside for the sequence's whole length.
    kv_blocks: usize,
    /// Prompt logits gathered over prefill chunks (`LogitsMode::AllPositions`).
    prompt_logits: Vec<Vec<f32>>,
    phase: Phase,
    /// An import that landed: its blocks ride in the sequence's next pass.
    landing: Option<Arc<KvImport>>,
}

impl Active {
    fn prefilled(&self) -> bool {
        self.pos >= self.req.prompt.len()
    }
    /// Waiting for its KV cache from a prefill worker.
    fn awaiting(&self) -> bool {
        matches!(self.phase, Phase::Decode(_)) && self.pos == 0
    }
}

/// The sequences the scheduler knows of.
#[derive(Default)]
struct Sequences {
    active: Vec<Active>,
    /// Requests not yet admitted, with their ids and the time each was submitted.
    waiting: VecDeque<(u64, Request, Sender<Event>, Instant, Phase)>,
    /// Finished sequences whose state the next pass frees.
    release: Vec<u64>,
    pass: u64,
}

/// The scheduler thread's state.
pub(crate) struct Scheduler {
    pub cmds: Receiver<Cmd>,
    pub entry: weir_runtime::ExternalTx<Packet>,
    pub exit: weir_runtime::ExternalRx<Packet>,
    pub program: Arc<Mutex<Option<Program>>>,
    pub p: SchedParams,
    /// KV blocks not promised to an admitted sequence (`None`: no limit).
    pub kv_free: Option<usize>,
    pub gauges: Arc<Gauges>,
}

impl Scheduler {
    /// Runs until the engine says stop (or drops its command channel) and every request is done, or the
    /// program fails (every request then gets `Event::Failed` with the cause).
    pub(crate) fn run(mut self) {
        let mut s = Sequences::default();
        let mut open = true;
        loop {
            open = open && self.take_requests(&mut s, false);
            self.admit(&mut s);
            let landed = self.land(&mut s, open);
            self.retire(&mut s, landed);
            self.publish(&s);
            let runnable = s.active.iter().any(|a| !a.awaiting()) || !s.release.is_empty();
            if !runnable && !s.active.is_empty() {
                // Every sequence waits for its KV cache: sleep until a command (or a wake).
                open = open && self.take_requests(&mut s, true);
                continue;
            }
            if s.active.is_empty() && s.release.is_empty() {
                // With nothing running the whole reserve is free, and `submit` refuses what
                // could never fit: the queue is empty here.
                for (_, _, events, _, _) in s.waiting.drain(..) {
                    self.unqueue();
                    let _ = events.send(Event::Failed("the request does not fit the KV cache reserve".into()));
                }
                if open {
                    continue;
                }
                return;
            }
            let Some(sent) = self.send_passes(&mut s) else { return self.fail_all(&mut s) };
            let Some(finished) = self.receive(&mut s, &sent) else { return self.fail_all(&mut s) };
            self.retire(&mut s, finished);
        }
    }

    /// A request leaves the wait queue.
    fn unqueue(&self) {
        self.gauges.waiting.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Updates the gauges.
    fn publish(&self, s: &Sequences) {
        use std::sync::atomic::Ordering::Relaxed;
        self.gauges.running.store(s.active.len(), Relaxed);
        let promised: usize = s.active.iter().map(|a| a.kv_blocks).sum();
        self.gauges.kv_blocks.store(promised, Relaxed);
    }

    /// Ends request `id` for a caller that gave it up: out of the queue, or retired (its KV
    /// cache freed by the next pass).
    fn cancel(&mut self, s: &mut Sequences, id: u64) {
        if let Some(i) = s.waiting.iter().position(|w| w.0 == id) {
            if let Some((.., phase)) = s.waiting.remove(i) {
                abort(&phase, "the request was cancelled");
                if let Phase::Decode(import) = phase {
                    self.p.imports.remove(import.handle);
                }
            }
            self.unqueue();
        } else if let Some(i) = s.active.iter().position(|a| a.id == id) {
            abort(&s.active[i].phase, "the request was cancelled");
            self.retire(s, vec![i]);
        } else {
            return;
        }
        self.gauges.cancelled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("request {id} cancelled by its caller");
    }

    /// Takes in new requests and cancellations; blocks for one only when there is nothing
    /// else to do (or `block`: until one command). False once the engine has dropped its end.
    fn take_requests(&mut self, s: &mut Sequences, mut block: bool) -> bool {
        loop {
            let idle = s.active.is_empty() && s.release.is_empty() && s.waiting.is_empty();
            let cmd = if idle || block {
                self.cmds.recv().map_err(|_| TryRecvError::Disconnected)
            } else {
                self.cmds.try_recv()
            };
            block = false;
            match cmd {
                Ok(Cmd::Submit(id, req, events, phase)) => {
                    s.waiting.push_back((id, req, events, Instant::now(), phase))
                }
                Ok(Cmd::Wake) => {}
                Ok(Cmd::Cancel(id)) => self.cancel(s, id),
                Err(TryRecvError::Empty) => return true,
                Ok(Cmd::Stop) | Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// Admits in arrival order while there is a slot and the KV reserve holds the whole
    /// sequence (so attention never runs out of blocks mid-generation).
    fn admit(&mut self, s: &mut Sequences) {
        self.reserve_imports(s);
        while s.active.len() < self.p.max_batch {
            let Some((_, req, _, _, _)) = s.waiting.front() else { break };
            let blocks = self.blocks(req);
            if let Some(free) = &mut self.kv_free {
                if blocks > *free {
                    break;
                }
                *free -= blocks;
            }
            let Some(w) = s.waiting.pop_front() else { break };
            self.activate(s, w, blocks);
        }
    }

    /// KV blocks a request holds at most.
    fn blocks(&self, req: &Request) -> usize {
        kv_tokens_needed(req.prompt.len(), req.max_new_tokens, self.p.max_positions) / KV_BLOCK_TOKENS
    }

    /// A decode worker's reservations are all or nothing, now: each waiting one is admitted
    /// ahead of the queue if a slot and the KV reserve hold it, or refused (its import told,
    /// so `Engine::expect_kv` answers no room and the router tries another worker).
    fn reserve_imports(&mut self, s: &mut Sequences) {
        let mut i = 0;
        while i < s.waiting.len() {
            let Phase::Decode(import) = &s.waiting[i].4 else {
                i += 1;
                continue;
            };
            let import = import.clone();
            let blocks = self.blocks(&s.waiting[i].1);
            let fits = s.active.len() < self.p.max_batch && self.kv_free.is_none_or(|f| blocks <= f);
            let Some(w) = s.waiting.remove(i) else { break };
            if fits {
                if let Some(free) = &mut self.kv_free {
                    *free -= blocks;
                }
                self.activate(s, w, blocks);
            } else {
                self.unqueue();
                self.p.imports.remove(import.handle);
                let _ = w.2.send(Event::Failed("no room for its KV cache".into()));
            }
            import.decide(fits);
        }
    }

    /// Makes a waiting request active, holding `blocks` of the KV reserve.
    fn activate(&mut self, s: &mut Sequences, w: (u64, Request, Sender<Event>, Instant, Phase), blocks: usize) {
        let (id, req, events, submitted, phase) = w;
        self.unqueue();
        tracing::info!(
            "request {id} admitted: {} prompt tokens, up to {} new, after {:.3} s waiting",
            req.prompt.len(),
            req.max_new_tokens,
            submitted.elapsed().as_secs_f64()
        );
        s.active.push(Active {
            id,
            req,
            events,
            pos: 0,
            last: 0,
            generated: 0,
            submitted,
            started: None,
            first_token: None,
            kv_blocks: blocks,
            prompt_logits: Vec::new(),
            phase,
            landing: None,
        });
    }

    /// Lands the imports whose KV cache has all come: the prefill worker's first token goes to
    /// the caller, and the sequence decodes from it (its blocks ride in its next pass). An
    /// import that failed ends its request with the cause; so does every one still waiting
    /// when the engine stops (`open` false). The sequences that finished (indices).
    fn land(&mut self, s: &mut Sequences, open: bool) -> Vec<usize> {
        let mut finished = Vec::new();
        let now = Instant::now();
        for (i, a) in s.active.iter_mut().enumerate() {
            let Phase::Decode(import) = &a.phase else { continue };
            if !a.awaiting() {
                continue;
            }
            let import = import.clone();
            let state = match import.state() {
                ImportState::Pending if !open => {
                    ImportState::Failed("the engine stopped before the KV cache came".into())
                }
                st => st,
            };
            match state {
                ImportState::Pending => continue,
                ImportState::Failed(why) => {
                    tracing::warn!("request {}: {why}", a.id);
                    let _ = a.events.send(Event::Failed(why));
                    finished.push(i);
                }
                ImportState::Ready { prompt_len, .. } if prompt_len != a.req.prompt.len() => {
                    let why = format!(
                        "the prefill worker's prompt has {prompt_len} tokens, the request's {}",
                        a.req.prompt.len()
                    );
                    let _ = a.events.send(Event::Failed(why));
                    finished.push(i);
                }
                ImportState::Ready { prompt_len, first } => {
                    let exposed = import.exposed().unwrap_or_default();
                    tracing::info!(
                        "request {}: its KV cache came ({} bytes) after {:.3} s, {:.1} ms after the prefill's end",
                        a.id,
                        import.bytes(),
                        a.submitted.elapsed().as_secs_f64(),
                        exposed.as_secs_f64() * 1e3
                    );
                    use std::sync::atomic::Ordering::Relaxed;
                    self.gauges.kv_imports.fetch_add(1, Relaxed);
                    self.gauges.kv_exposed_us.fetch_add(exposed.as_micros() as u64, Relaxed);
                    a.started = Some(a.submitted);
                    let seq = SeqSlice {
                        id: a.id,
                        start: 0,
                        len: prompt_len,
                        logits: LogitsWanted::None,
                        sampling: a.req.sampling,
                    };
                    a.landing = Some(import.clone());
                    if self.advance(a, &seq, first, Vec::new(), now) {
                        finished.push(i);
                    }
                }
            }
            self.p.imports.remove(import.handle);
        }
        finished
    }

    /// Sends one pass per micro-batch: sequence i rides in micro-batch i mod K. Decoding
    /// sequences go first (one token each); prompts fill what is left of the pass's tokens, in
    /// chunks, their KV cache growing chunk by chunk. Each pass with its members; `None` if the
    /// program has stopped.
    fn send_passes(&mut self, s: &mut Sequences) -> Option<Vec<(Arc<Batch>, Vec<usize>)>> {
        let k = self.p.micro_batches;
        let now = Instant::now();
        let mut sent = Vec::with_capacity(k);
        for g in 0..k {
            let group: Vec<usize> = (g..s.active.len()).step_by(k).filter(|&i| !s.active[i].awaiting()).collect();
            let decoding = group.iter().filter(|&&i| s.active[i].prefilled());
            let prefilling = group.iter().filter(|&&i| !s.active[i].prefilled());
            let order: Vec<usize> = decoding.chain(prefilling).copied().collect();
            let (mut ids, mut seqs, mut members) = (Vec::new(), Vec::new(), Vec::new());
            let (mut export, mut imports) = (Vec::new(), Vec::new());
            let mut room = self.p.pass_tokens;
            for i in order {
                if room == 0 {
                    break;
                }
                let a = &mut s.active[i];
                let (toks, logits) = next_tokens(a, room);
                room -= toks.len();
                a.started.get_or_insert(now);
                seqs.push(SeqSlice { id: a.id, start: a.pos, len: toks.len(), logits, sampling: a.req.sampling });
                ids.extend(toks);
                members.push(i);
                imports.extend(a.landing.take());
                if let Phase::Prefill(route) = &a.phase {
                    export.push((a.id, route.clone()));
                }
            }
            let release = if g == 0 { std::mem::take(&mut s.release) } else { Vec::new() };
            let batch = Arc::new(Batch { pass: s.pass, seqs, release, export, imports });
            s.pass += 1;
            self.entry.send(Packet::Tokens { batch: batch.clone(), ids: Arc::new(ids) }).ok()?;
            sent.push((batch, members));
        }
        Some(sent)
    }

    /// Receives each pass's sampled tokens and hands them to their sequences. The sequences
    /// that finished (indices into `active`); `None` if the program has stopped.
    fn receive(&mut self, s: &mut Sequences, sent: &[(Arc<Batch>, Vec<usize>)]) -> Option<Vec<usize>> {
        let mut finished = Vec::new();
        for (batch, members) in sent {
            let Some(Packet::Sampled { tokens, logits, .. }) = self.exit.recv() else { return None };
            let done_at = Instant::now();
            let mut row = 0;
            for ((&i, seq), tok) in members.iter().zip(&batch.seqs).zip(tokens) {
                let rows = Batch::logit_rows(seq);
                let mine: Vec<Vec<f32>> = match &logits {
                    Some(l) if seq.logits != LogitsWanted::None => {
                        (row..row + rows).map(|r| l.f32()[r * self.p.vocab..(r + 1) * self.p.vocab].to_vec()).collect()
                    }
                    _ => Vec::new(),
                };
                row += rows;
                if self.advance(&mut s.active[i], seq, tok, mine, done_at) {
                    finished.push(i);
                }
            }
        }
        Some(finished)
    }

    /// Moves sequence `a` past its share `seq` of a pass, which sampled `tok` and gave `mine`
    /// logits; true if it finished — or its caller is gone (an event it could not take).
    fn advance(&self, a: &mut Active, seq: &SeqSlice, tok: u32, mut mine: Vec<Vec<f32>>, done_at: Instant) -> bool {
        a.pos += seq.len;
        if !a.prefilled() {
            // A prompt chunk before the last: its cache is all it leaves.
            a.prompt_logits.extend(mine);
            return false;
        }
        if seq.logits == LogitsWanted::All {
            a.prompt_logits.extend(mine.iter().cloned());
            if a.events.send(Event::PromptLogits(std::mem::take(&mut a.prompt_logits))).is_err() {
                return true;
            }
        }
        a.last = tok;
        a.generated += 1;
        a.first_token.get_or_insert(done_at);
        if let Phase::Prefill(route) = &a.phase {
            let sampled_unix_ns = weir_operators::kv_link::unix_ns();
            let first = KvMsg::First { handle: route.handle, prompt_len: a.pos as u32, token: tok, sampled_unix_ns };
            if let Err(e) = route.send(first) {
                let _ = a.events.send(Event::Failed(format!("the KV cache could not be sent: {e}")));
                return true;
            }
        }
        if a.events.send(Event::Token { id: tok, logits: mine.pop() }).is_err() {
            tracing::info!("request {} ended: its caller is gone", a.id);
            return true;
        }
        let finish = if a.req.stop_at_eos && self.p.eos.contains(&tok) {
            FinishReason::Eos
        } else if a.generated >= a.req.max_new_tokens {
            FinishReason::MaxTokens
        } else if a.pos >= self.p.max_positions {
            FinishReason::ContextFull
        } else {
            return false;
        };
        let (st, ft) = (a.started.unwrap_or(done_at), a.first_token.unwrap_or(done_at));
        let stats = Stats {
            finish,
            prompt_tokens: a.req.prompt.len(),
            generated_tokens: a.generated,
            queued_s: (st - a.submitted).as_secs_f64(),
            prefill_s: (ft - st).as_secs_f64(),
            decode_s: (done_at - ft).as_secs_f64(),
        };
        tracing::info!(
            "request {} finished ({}): {} tokens; prefill {:.1} tokens/s, decode {:.2} tokens/s",
            a.id,
            finish.name(),
            a.generated,
            stats.prefill_tokens_per_s(),
            stats.decode_tokens_per_s()
        );
        let _ = a.events.send(Event::Done(stats));
        true
    }

    /// Removes finished sequences. Their blocks return to the pool when the next pass's release
    /// reaches each attention operator — before any sequence admitted now adds to the cache.
    fn retire(&mut self, s: &mut Sequences, mut finished: Vec<usize>) {
        finished.sort_unstable();
        for i in finished.into_iter().rev() {
            let a = s.active.remove(i);
            if let Phase::Decode(import) = &a.phase {
                self.p.imports.remove(import.handle);
            }
            if let Some(free) = &mut self.kv_free {
                *free += a.kv_blocks;
            }
            s.release.push(a.id);
        }
    }

    /// Tells every request, running, waiting or still to come, why the engine stopped.
    fn fail_all(&self, s: &mut Sequences) {
        let fault = self.program.lock().ok().and_then(|p| p.as_ref().and_then(|p| p.fault()));
        let msg = fault.map_or_else(|| "the engine stopped".to_string(), |e| e.to_string());
        for a in s.active.drain(..) {
            abort(&a.phase, &msg);
            if let Phase::Decode(import) = &a.phase {
                self.p.imports.remove(import.handle);
            }
            let _ = a.events.send(Event::Failed(msg.clone()));
        }
        for (_, _, events, _, phase) in s.waiting.drain(..) {
            self.unqueue();
            abort(&phase, &msg);
            let _ = events.send(Event::Failed(msg.clone()));
        }
        while let Ok(cmd) = self.cmds.try_recv() {
            if let Cmd::Submit(_, _, events, phase) = cmd {
                abort(&phase, &msg);
                self.unqueue();
                let _ = events.send(Event::Failed(msg.clone()));
            }
        }
        self.publish(s);
    }
}

/// Tells a prefill's decode worker that its KV cache will not come (best effort: the
/// connection may be what failed).
fn abort(phase: &Phase, why: &str) {
    if let Phase::Prefill(route) = phase {
        let _ = route.send(KvMsg::Abort { handle: route.handle, reason: why.to_string() });
    }
}

/// Sequence `a`'s tokens in the next pass, with `room` tokens left in it, and which logits it
/// wants back: its last token when decoding; the next chunk of its prompt when prefilling.
fn next_tokens(a: &Active, room: usize) -> (Vec<u32>, LogitsWanted) {
    let plen = a.req.prompt.len();
    if a.pos >= plen {
        let logits = if a.req.logits == LogitsMode::None { LogitsWanted::None } else { LogitsWanted::Last };
        return (vec![a.last], logits);
    }
    let end = plen.min(a.pos + room);
    let logits = match (a.req.logits, end == plen) {
        (LogitsMode::AllPositions, _) => LogitsWanted::All,
        (_, false) => LogitsWanted::Skip,
        (LogitsMode::None, true) => LogitsWanted::None,
        (LogitsMode::Steps, true) => LogitsWanted::Last,
    };
    (a.req.prompt[a.pos..end].to_vec(), logits)
}
