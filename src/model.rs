//! A Hugging Face model folder, opened and checked.

use crate::error::{Error, Result};
use crate::machine::ThisMachine;
use std::path::{Path, PathBuf};
use weir_graphs::{llama, Graph, ModelConfig, PlaceOptions, Placed, WeightIndex};
use weir_operators::KvType;

/// A model folder: config, weight index (headers only) and tokenizer. Opening reads and checks
/// the headers; no weight data is read until an engine's loaders run.
pub struct Model {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub weights: WeightIndex,
    pub tokenizer: Option<tokenizers::Tokenizer>,
}

impl Model {
    /// Opens `dir`: reads `config.json`, `generation_config.json`, the safetensors headers and
    /// `tokenizer.json`, and checks every tensor the architecture needs against the config.
    pub fn open(dir: impl AsRef<Path>) -> Result<Model> {
        let dir = dir.as_ref().to_path_buf();
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(Error::NotAFolder { path: dir, reason: "it is a file".into() }),
            Err(e) => return Err(Error::NotAFolder { path: dir, reason: e.to_string() }),
        }
        let config = ModelConfig::from_dir(&dir)?;
        let weights = WeightIndex::from_dir(&dir)?;
        llama::check_weights(&config, &weights)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() {
            Some(
                tokenizers::Tokenizer::from_file(&tok_path)
                    .map_err(|e| Error::Tokenizer { path: tok_path.clone(), message: e.to_string() })?,
            )
        } else {
            None
        };
        tracing::info!(
            "model {}: {:?}, {} layers, hidden {}, {} tensors, {} of weights{}",
            dir.display(),
            config.architecture,
            config.num_hidden_layers,
            config.hidden_size,
            weights.tensors.len(),
            weir_graphs::format_size(weights.total_bytes()),
            if tokenizer.is_some() { "" } else { ", no tokenizer" }
        );
        Ok(Model { dir, config, weights, tokenizer })
    }

    /// Token ids of a text, with the tokenizer's special tokens (BOS) added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| Error::NoTokenizer { dir: self.dir.clone() })?;
        let enc = tok
            .encode(text, true)
            .map_err(|e| Error::Tokenizer { path: self.dir.join("tokenizer.json"), message: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of some token ids, special tokens skipped. Without a tokenizer, the ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.tokenizer {
            Some(t) => t
                .decode(ids, true)
                .map_err(|e| Error::Tokenizer { path: self.dir.join("tokenizer.json"), message: e.to_string() }),
            None => Ok(ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" ")),
        }
    }

    /// Bytes of weights read per token at batch 1: every matrix once, one embedding row, and of
    /// a mixture-of-experts layer's routed experts the `top_k` a token goes to.
    pub fn weight_bytes_per_token(&self) -> u64 {
        let c = &self.config;
        let embed = self.weights.tensors.get("model.embed_tokens.weight").map_or(0, |t| t.nbytes());
        let row = embed / c.vocab_size.max(1) as u64;
        let mut total = self.weights.total_bytes() - embed + row;
        if c.tie_word_embeddings {
            total += embed;
        }
        if let Some(m) = &c.moe {
            let experts: u64 =
                self.weights.tensors.iter().filter(|(n, _)| n.contains(".experts.")).map(|(_, t)| t.nbytes()).sum();
            total -= experts - experts * m.top_k as u64 / m.experts.max(1) as u64;
        }
        total
    }

    /// Places this model on this machine: `graph` is a graph file's text and name, `None` for
    /// the architecture's built-in one. What `weir graph show` prints and the engine runs.
    pub fn place(&self, graph: Option<(&str, &str)>, o: &PlaceOptions) -> Result<Placed> {
        Ok(weir_graphs::place(&self.config, &self.weights, graph, o, &ThisMachine)?)
    }

    /// The checked graph of this model before any placement pass: `graph` (a graph file's text
    /// and name) or the architecture's built-in one, with `threads` compute threads (0 = all).
    pub fn expand(&self, graph: Option<(&str, &str)>, threads: usize, kv_dtype: KvType) -> Result<Graph> {
        Ok(weir_graphs::place::expand(&self.config, &self.weights, graph, threads, kv_dtype, None, &ThisMachine)?)
    }
}
