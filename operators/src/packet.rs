//! The message that travels on weir's edges, and the batch description every pass carries.

use std::sync::Arc;
use weir_runtime::gpu::DeviceTensor;
use weir_runtime::{Message, Tensor};

/// Which logits a sequence wants back from a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// Only the sampled token.
    None,
    /// Nothing: a chunk of a prompt before its last (its KV cache is all it leaves).
    Skip,
    /// The logits at the sequence's last position in this pass.
    Last,
    /// The logits at every position of this pass.
    All,
}

/// How the next token of a sequence is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 (the default) is greedy.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Seed of the sequence's random stream.
    pub seed: u64,
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling { temperature: 0.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// One sequence's share of a pass: `len` new tokens at positions `start..start+len`.
#[derive(Debug, Clone)]
pub struct SeqSlice {
    /// The sequence's id (its KV cache is keyed by it).
    pub id: u64,
    /// Tokens already in the sequence's KV cache (0 starts a new sequence).
    pub start: usize,
    /// New tokens in this pass.
    pub len: usize,
    /// Which logits to return.
    pub logits: LogitsWanted,
    /// How to sample.
    pub sampling: Sampling,
}

/// What one forward pass computes: the sequences in it, in order, and the sequences whose KV
/// caches may be freed before it runs.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Pass number, increasing.
    pub pass: u64,
    /// The sequences; their tokens are concatenated in this order in every activation.
    pub seqs: Vec<SeqSlice>,
    /// Sequences that finished: drop their state.
    pub release: Vec<u64>,
    /// Sequences whose keys and values attention operators with `export=true` emit this pass
    /// (a prefill worker's), with where they go.
    pub export: Vec<(u64, Arc<crate::kv_link::KvRoute>)>,
    /// Sequences whose KV cache came from a prefill worker: each attention operator takes its
    /// blocks before the pass (a decode worker's first pass of each).
    pub imports: Vec<Arc<crate::kv_link::KvImport>>,
}

impl Batch {
    /// Total new tokens.
    pub fn tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.len).sum()
    }
    /// The position of every new token, in order.
    pub fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        self.seqs.iter().flat_map(|s| s.start..s.start + s.len)
    }
    /// Rows of logits a sequence gets back.
    pub fn logit_rows(s: &SeqSlice) -> usize {
        match s.logits {
            LogitsWanted::All => s.len,
            LogitsWanted::Skip => 0,
            _ => usize::from(s.len > 0),
        }
    }
}

/// A message on an edge.
#[derive(Debug, Clone)]
pub enum Packet {
    /// Token ids entering the graph: `[tokens]`.
    Tokens { batch: Arc<Batch>, ids: Arc<Vec<u32>> },
    /// Activations: `[tokens, width]` f32, rows in batch order.
    Act { batch: Arc<Batch>, x: Tensor },
    /// A weight tensor, as stored, from a loader.
    Weight { name: Arc<str>, w: Tensor },
    /// No weight this pass: an expert store's answer for an expert no token chose.
    Absent,
    /// A router's expert choices for every token of the pass.
    Route { batch: Arc<Batch>, route: Arc<crate::router::Routing> },
    /// The sampled token of every sequence, with the logits rows that were asked for.
    Sampled { batch: Arc<Batch>, tokens: Vec<u32>, logits: Option<Tensor> },
    /// Activations in GPU memory (as `Act`).
    DevAct { batch: Arc<Batch>, x: DeviceTensor },
    /// A weight in GPU memory (as `Weight`; vectors — norms, biases — as f32).
    DevWeight { name: Arc<str>, w: DeviceTensor },
    /// Keys and values an attention node (`node`) stored this pass, for the sequences the
    /// batch exports.
    Kv { batch: Arc<Batch>, node: Arc<str>, rows: Vec<crate::kv_link::KvRows> },
}

impl Message for Packet {
    fn bytes(&self) -> usize {
        match self {
            Packet::Tokens { ids, .. } => ids.len() * 4,
            Packet::Act { x, .. } => x.nbytes(),
            Packet::Weight { w, .. } => w.nbytes(),
            Packet::Route { route, .. } => route.ids.len() * 8,
            Packet::Absent => 0,
            Packet::Sampled { tokens, logits, .. } => tokens.len() * 4 + logits.as_ref().map_or(0, |l| l.nbytes()),
            Packet::DevAct { x, .. } => x.nbytes(),
            Packet::DevWeight { w, .. } => w.nbytes(),
            Packet::Kv { rows, .. } => rows.iter().map(|r| r.keys.len() + r.values.len()).sum(),
        }
    }
}

impl Packet {
    /// The activation and its batch, or an error naming what arrived instead.
    pub fn act(&self, port: &str) -> Result<(&Arc<Batch>, &Tensor), weir_runtime::OpError> {
        match self {
            Packet::Act { batch, x } => Ok((batch, x)),
            other => {
                Err(weir_runtime::OpError::new(format!("port `{port}` expected activations, got {}", other.what())))
            }
        }
    }
    /// The weight tensor, or an error naming what arrived instead.
    pub fn weight(&self, port: &str) -> Result<(&str, &Tensor), weir_runtime::OpError> {
        match self {
            Packet::Weight { name, w } => Ok((name, w)),
            other => Err(weir_runtime::OpError::new(format!("port `{port}` expected a weight, got {}", other.what()))),
        }
    }
    /// Activations in GPU memory, or an error naming what arrived instead.
    pub fn dev_act(&self, port: &str) -> Result<(&Arc<Batch>, &DeviceTensor), weir_runtime::OpError> {
        match self {
            Packet::DevAct { batch, x } => Ok((batch, x)),
            other => Err(weir_runtime::OpError::new(format!(
                "port `{port}` expected activations in GPU memory, got {}",
                other.what()
            ))),
        }
    }
    /// A weight in GPU memory, or an error naming what arrived instead.
    pub fn dev_weight(&self, port: &str) -> Result<(&str, &DeviceTensor), weir_runtime::OpError> {
        match self {
            Packet::DevWeight { name, w } => Ok((name, w)),
            other => Err(weir_runtime::OpError::new(format!(
                "port `{port}` expected a weight in GPU memory, got {}",
                other.what()
            ))),
        }
    }
    fn what(&self) -> &'static str {
        match self {
            Packet::Tokens { .. } => "token ids",
            Packet::Act { .. } => "activations",
            Packet::Weight { .. } => "a weight",
            Packet::Route { .. } => "expert choices",
            Packet::Absent => "no weight (an expert store's answer for an expert no token chose)",
            Packet::Sampled { .. } => "sampled tokens",
            Packet::DevAct { .. } => "activations in GPU memory",
            Packet::DevWeight { .. } => "a weight in GPU memory",
            Packet::Kv { .. } => "KV cache rows",
        }
    }
}
