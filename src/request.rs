//! What a caller submits and gets back: requests, their events as they come, and what a
//! finished request produced.

use crate::error::{Error, Result};
use crossbeam_channel::Receiver;
use weir_operators::Sampling;

/// Which logits a request wants back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogitsMode {
    /// None.
    #[default]
    None,
    /// The logits behind every generated token (step 0: after the prompt).
    Steps,
    /// Those, plus the logits at every prompt position.
    AllPositions,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids (BOS included if the model wants one).
    pub prompt: Vec<u32>,
    /// Stop after this many new tokens.
    pub max_new_tokens: usize,
    /// How to choose tokens.
    pub sampling: Sampling,
    /// Stop at the model's EOS ids (off for benchmarks).
    pub stop_at_eos: bool,
    /// Which logits to return.
    pub logits: LogitsMode,
}

impl Request {
    /// Greedy generation of `max_new_tokens` after `prompt`, stopping at EOS.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Request {
        Request { prompt, max_new_tokens, sampling: Sampling::default(), stop_at_eos: true, logits: LogitsMode::None }
    }

    /// Checks the sampling settings; the message names the `weir run` flag.
    pub fn sampling_check(&self) -> std::result::Result<(), String> {
        let s = &self.sampling;
        if !(s.temperature >= 0.0 && s.temperature.is_finite()) {
            return Err(format!("--temperature {}: must be a finite number ≥ 0", s.temperature));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(format!("--top-p {}: must be in (0, 1]", s.top_p));
        }
        Ok(())
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token was produced (it is the last generated id).
    Eos,
    /// `max_new_tokens` were produced.
    MaxTokens,
    /// The sequence reached `max_position_embeddings`.
    ContextFull,
}

impl FinishReason {
    /// The name other tools use (OpenAI's `finish_reason`): `stop` for an EOS token, `length`
    /// for the token limit or the end of the context.
    pub fn name(self) -> &'static str {
        match self {
            FinishReason::Eos => "stop",
            FinishReason::MaxTokens | FinishReason::ContextFull => "length",
        }
    }
}

/// What a request produces, as it is produced.
#[derive(Debug, Clone)]
pub enum Event {
    /// One new token; `logits` when the request asked for them.
    Token { id: u32, logits: Option<Vec<f32>> },
    /// The prompt's logits at every position (`LogitsMode::AllPositions`), before the first token.
    PromptLogits(Vec<Vec<f32>>),
    /// The request is complete.
    Done(Stats),
    /// The engine failed while running the request.
    Failed(String),
}

/// Timing and outcome of a finished request.
#[derive(Debug, Clone)]
pub struct Stats {
    pub finish: FinishReason,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    /// Seconds from submission to the request's first pass (waiting for a batch slot or KV room).
    pub queued_s: f64,
    /// Seconds from the request's first pass to its first token.
    pub prefill_s: f64,
    /// Seconds from the first token to the last.
    pub decode_s: f64,
}

impl Stats {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_s.max(1e-9)
    }
    /// Generated tokens per second after the first.
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.generated_tokens <= 1 {
            return 0.0;
        }
        (self.generated_tokens - 1) as f64 / self.decode_s.max(1e-9)
    }
}

/// What [`Generation::try_next_event`] and [`Generation::next_event_timeout`] found.
#[derive(Debug, Clone)]
pub enum Next {
    Event(Event),
    /// No event yet.
    Empty,
    /// There will be no more (the request is done, or the engine stopped).
    Ended,
}

/// A submitted request: its events, as they come. Dropping it before the request is done
/// cancels the request: it leaves the queue, or its sequence ends at the next pass and its KV
/// cache is freed.
pub struct Generation {
    pub(crate) events: Receiver<Event>,
    /// The request's id and where to say it is cancelled (`None`: nothing to cancel).
    pub(crate) cancel: Option<(u64, crossbeam_channel::Sender<crate::scheduler::Cmd>)>,
    pub(crate) done: bool,
}

impl Drop for Generation {
    fn drop(&mut self) {
        if let (false, Some((id, cmds))) = (self.done, self.cancel.take()) {
            let _ = cmds.try_send(crate::scheduler::Cmd::Cancel(id));
        }
    }
}

/// Everything a finished request produced.
#[derive(Debug, Clone)]
pub struct Output {
    pub tokens: Vec<u32>,
    /// Per generated token, its logits (if asked).
    pub step_logits: Vec<Vec<f32>>,
    /// Per prompt position, its logits (if asked for all positions).
    pub prompt_logits: Vec<Vec<f32>>,
    pub stats: Stats,
}

impl Generation {
    /// The next event, waiting for it; `None` after `Done` or `Failed`.
    pub fn next_event(&mut self) -> Option<Event> {
        let e = self.events.recv().ok();
        self.saw(&e);
        e
    }

    /// The next event if one is there now.
    pub fn try_next_event(&mut self) -> Next {
        let got = match self.events.try_recv() {
            Ok(e) => Next::Event(e),
            Err(crossbeam_channel::TryRecvError::Empty) => Next::Empty,
            Err(crossbeam_channel::TryRecvError::Disconnected) => Next::Ended,
        };
        self.saw_next(&got);
        got
    }

    /// The next event, waiting at most `timeout`.
    pub fn next_event_timeout(&mut self, timeout: std::time::Duration) -> Next {
        let got = match self.events.recv_timeout(timeout) {
            Ok(e) => Next::Event(e),
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => Next::Empty,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Next::Ended,
        };
        self.saw_next(&got);
        got
    }

    fn saw_next(&mut self, n: &Next) {
        match n {
            Next::Event(e) => self.saw(&Some(e.clone())),
            Next::Ended => self.done = true,
            Next::Empty => {}
        }
    }

    /// The request's id in the engine's logs.
    pub fn id(&self) -> Option<u64> {
        self.cancel.as_ref().map(|c| c.0)
    }

    fn saw(&mut self, e: &Option<Event>) {
        if matches!(e, None | Some(Event::Done(_) | Event::Failed(_))) {
            self.done = true;
        }
    }

    /// Waits for the whole generation.
    pub fn wait(mut self) -> Result<Output> {
        let mut out = Output {
            tokens: Vec::new(),
            step_logits: Vec::new(),
            prompt_logits: Vec::new(),
            stats: Stats {
                finish: FinishReason::MaxTokens,
                prompt_tokens: 0,
                generated_tokens: 0,
                queued_s: 0.0,
                prefill_s: 0.0,
                decode_s: 0.0,
            },
        };
        while let Some(e) = self.next_event() {
            match e {
                Event::Token { id, logits } => {
                    out.tokens.push(id);
                    if let Some(l) = logits {
                        out.step_logits.push(l);
                    }
                }
                Event::PromptLogits(rows) => out.prompt_logits = rows,
                Event::Done(s) => {
                    out.stats = s;
                    return Ok(out);
                }
                Event::Failed(msg) => return Err(Error::Failed(msg)),
            }
        }
        Err(Error::Stopped(None))
    }
}

impl Iterator for Generation {
    type Item = Event;
    fn next(&mut self) -> Option<Event> {
        self.next_event()
    }
}
