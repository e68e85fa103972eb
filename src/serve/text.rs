//! Text that streams right: token ids → text as they come, never a broken UTF-8 sequence or a
//! replacement character mid-stream, with stop strings found across token boundaries and cut
//! from the output.
//!
//! Decoding is incremental as Hugging Face's and vLLM's streamers do it: a window of the ids
//! (from `prefix` on) is decoded, and only what it adds past the text already read is new — a
//! token that ends inside a multi-byte character decodes to `�` and waits for the next. Text
//! that could be the start of a stop string is held back until it cannot.

use crate::model::Model;

/// Decodes one sequence's tokens as they come.
pub struct TextStream<'a> {
    model: &'a Model,
    ids: Vec<u32>,
    /// The window decoded is `ids[prefix..]`; `ids[prefix..read]` is already text.
    prefix: usize,
    read: usize,
    stops: Vec<String>,
    /// Text decoded but not given out yet (it may be the start of a stop string).
    held: String,
    stopped: bool,
}

/// What one token added.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Delta {
    /// Text to give out now (may be empty).
    pub text: String,
    /// A stop string was found: the text up to it has been given out, and nothing more will be.
    pub stopped: bool,
}

impl<'a> TextStream<'a> {
    /// A stream for `model`'s tokenizer that ends at the first of `stops` (empty strings are
    /// ignored).
    pub fn new(model: &'a Model, stops: &[String]) -> TextStream<'a> {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        TextStream { model, ids: Vec::new(), prefix: 0, read: 0, stops, held: String::new(), stopped: false }
    }

    /// Adds token `id`; the text it completes.
    pub fn push(&mut self, id: u32) -> crate::Result<Delta> {
        if self.stopped {
            return Ok(Delta { text: String::new(), stopped: true });
        }
        self.ids.push(id);
        let before = self.model.decode(&self.ids[self.prefix..self.read])?;
        let now = self.model.decode(&self.ids[self.prefix..])?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') || !now.starts_with(&before) {
            // Inside a character (or a token that decodes to nothing yet): wait for more.
            return Ok(Delta::default());
        }
        self.held.push_str(&now[before.len()..]);
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(self.release(false))
    }

    /// The end of the sequence: whatever was held back (it is not a stop string's start after
    /// all), and what undecodable bytes remain, as the tokenizer gives them.
    pub fn finish(&mut self) -> crate::Result<Delta> {
        if self.stopped {
            return Ok(Delta { text: String::new(), stopped: true });
        }
        if self.read < self.ids.len() {
            let before = self.model.decode(&self.ids[self.prefix..self.read])?;
            let now = self.model.decode(&self.ids[self.prefix..])?;
            if let Some(rest) = now.strip_prefix(before.as_str()) {
                self.held.push_str(rest);
            }
            self.read = self.ids.len();
        }
        Ok(self.release(true))
    }

    /// Whether a stop string ended the text.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Gives out the held text, up to a stop string if one is in it, keeping back (unless
    /// `all`) the end that could still grow into one.
    fn release(&mut self, all: bool) -> Delta {
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let text = self.held[..at].to_string();
            self.held.clear();
            self.stopped = true;
            return Delta { text, stopped: true };
        }
        let keep = if all { 0 } else { self.partial_stop_len() };
        let cut = self.held.len() - keep;
        let text = self.held[..cut].to_string();
        self.held.drain(..cut);
        Delta { text, stopped: false }
    }

    /// The longest end of the held text that is the start of a stop string (in bytes, on a
    /// character boundary).
    fn partial_stop_len(&self) -> usize {
        let h = &self.held;
        self.stops
            .iter()
            .flat_map(|s| (1..s.len().min(h.len() + 1)).filter(move |&n| s.is_char_boundary(n)).map(move |n| (s, n)))
            .filter(|(s, n)| h.is_char_boundary(h.len() - n) && h.ends_with(&s[..*n]))
            .map(|(_, n)| n)
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> Model {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-llama");
        Model::open(dir).unwrap()
    }

    /// Everything a stream gives out for `text` tokenized, token by token, and whether it
    /// stopped.
    fn stream(m: &Model, text: &str, stops: &[&str]) -> (Vec<String>, bool) {
        let ids = m.tokenizer.as_ref().unwrap().encode(text, false).unwrap().get_ids().to_vec();
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut s = TextStream::new(m, &stops);
        let mut out = Vec::new();
        for id in ids {
            let d = s.push(id).unwrap();
            out.push(d.text);
            if d.stopped {
                return (out, true);
            }
        }
        out.push(s.finish().unwrap().text);
        (out, s.stopped())
    }

    #[test]
    fn pieces_join_to_the_text_and_none_is_broken() {
        let m = model();
        for text in ["The man walked", "naïve café — déjà vu", "数字 and emoji 🦀🦀!", "a  b\n\tc"] {
            let (pieces, stopped) = stream(&m, text, &[]);
            assert!(!stopped);
            assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{text}: {pieces:?}");
            let whole = m.decode(m.tokenizer.as_ref().unwrap().encode(text, false).unwrap().get_ids()).unwrap();
            assert_eq!(pieces.concat(), whole, "{text}");
        }
    }

    #[test]
    fn a_stop_string_across_tokens_is_cut_and_nothing_after_it_comes() {
        let m = model();
        let (pieces, stopped) = stream(&m, "The man walked home. The end", &["ked ho"]);
        assert!(stopped);
        assert_eq!(pieces.concat(), "The man wal");
        // Text that only starts like a stop string comes out once it cannot be one.
        let (pieces, stopped) = stream(&m, "The man walked home", &["walkers"]);
        assert!(!stopped);
        assert_eq!(pieces.concat(), "The man walked home");
        // The earliest of several stops wins.
        let (pieces, _) = stream(&m, "one two three", &["three", "two"]);
        assert_eq!(pieces.concat(), "one ");
    }
}
