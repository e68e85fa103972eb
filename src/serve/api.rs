//! The OpenAI API's requests, read field by field so that every error names its field, and its
//! responses and errors.

use super::chat::Message;
use serde_json::{json, Value};

/// A request refused: the HTTP status, OpenAI's error type, the field at fault, the message.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub param: Option<String>,
    pub message: String,
}

impl ApiError {
    /// A 400 naming `param`.
    pub fn field(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { status: 400, kind: "invalid_request_error", param: Some(param.into()), message: message.into() }
    }
    /// A 400 about the request as a whole.
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError { status: 400, kind: "invalid_request_error", param: None, message: message.into() }
    }
    /// OpenAI's error object.
    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}})
    }
}

/// What a completion or chat request asks for, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Ask {
    pub model: Option<String>,
    /// The prompt: text, or token ids; for chat, the messages.
    pub prompt: Prompt,
    pub max_tokens: Option<usize>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<usize>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    /// `ignore_eos` (vLLM's and llama.cpp's extension): generate to `max_tokens` past EOS.
    pub ignore_eos: bool,
}

/// What the model is asked to continue.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
    Chat(Vec<Message>),
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The fields of a request object, read with their names.
struct Fields<'a>(&'a serde_json::Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn number(&self, k: &str, lo: f64, hi: f64) -> Result<Option<f32>, ApiError> {
        let Some(v) = self.get(k) else { return Ok(None) };
        match v.as_f64() {
            Some(x) if x.is_finite() && (lo..=hi).contains(&x) => Ok(Some(x as f32)),
            Some(x) => Err(ApiError::field(k, format!("`{k}` must be between {lo} and {hi}, found {x}"))),
            None => Err(ApiError::field(k, format!("`{k}` must be a number, found {}", kind(v)))),
        }
    }
    fn uint(&self, k: &str, min: u64) -> Result<Option<u64>, ApiError> {
        let Some(v) = self.get(k) else { return Ok(None) };
        match v.as_u64() {
            Some(x) if x >= min => Ok(Some(x)),
            _ => Err(ApiError::field(k, format!("`{k}` must be an integer ≥ {min}, found {v}"))),
        }
    }
    fn bool(&self, k: &str) -> Result<bool, ApiError> {
        match self.get(k) {
            None => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(ApiError::field(k, format!("`{k}` must be true or false, found {}", kind(v)))),
        }
    }
}

/// Reads a completion (`chat`: false) or chat request's JSON body.
pub fn parse(body: &[u8], chat: bool) -> Result<Ask, ApiError> {
    let text = std::str::from_utf8(body).map_err(|e| ApiError::invalid(format!("the body is not UTF-8: {e}")))?;
    let v: Value =
        serde_json::from_str(text).map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(o) = &v else {
        return Err(ApiError::invalid(format!("the body must be an object, found {}", kind(&v))));
    };
    let f = Fields(o);
    let model = match f.get("model") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => return Err(ApiError::field("model", format!("`model` must be a string, found {}", kind(v)))),
    };
    let prompt = if chat { Prompt::Chat(messages(&f)?) } else { prompt(&f)? };
    if let Some(n) = f.uint("n", 0)? {
        if n != 1 {
            return Err(ApiError::field("n", format!("`n` must be 1 (one choice per request), found {n}")));
        }
    }
    for k in ["presence_penalty", "frequency_penalty"] {
        if f.number(k, -2.0, 2.0)?.is_some_and(|x| x != 0.0) {
            return Err(ApiError::field(k, format!("`{k}` is not supported (give 0 or leave it out)")));
        }
    }
    for k in ["logprobs", "top_logprobs", "logit_bias", "best_of", "tools", "response_format"] {
        let given = match f.get(k) {
            None | Some(Value::Bool(false)) => false,
            // `best_of: 1` is the default; any other number asks for what is not done.
            Some(Value::Number(n)) => k != "best_of" || n.as_u64() != Some(1),
            Some(_) => true,
        };
        if given {
            return Err(ApiError::field(k, format!("`{k}` is not supported")));
        }
    }
    let max_tokens = match f.uint("max_completion_tokens", 1)? {
        Some(m) => Some(m),
        None => f.uint("max_tokens", 1)?,
    };
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(so)) => Fields(so)
            .bool("include_usage")
            .map_err(|e| ApiError { param: Some("stream_options.include_usage".into()), ..e })?,
        Some(v) => {
            return Err(ApiError::field(
                "stream_options",
                format!("`stream_options` must be an object, found {}", kind(v)),
            ))
        }
    };
    Ok(Ask {
        model,
        prompt,
        max_tokens: max_tokens.map(|m| m as usize),
        temperature: f.number("temperature", 0.0, 2.0)?,
        top_p: match f.number("top_p", 0.0, 1.0)? {
            Some(p) if p <= 0.0 => return Err(ApiError::field("top_p", "`top_p` must be above 0")),
            p => p,
        },
        top_k: f.uint("top_k", 0)?.map(|k| k as usize),
        seed: match f.get("seed") {
            None => None,
            Some(v) => Some(
                v.as_i64()
                    .map(|s| s as u64)
                    .ok_or_else(|| ApiError::field("seed", format!("`seed` must be an integer, found {}", kind(v))))?,
            ),
        },
        stop: stop(&f)?,
        stream: f.bool("stream")?,
        include_usage,
        ignore_eos: f.bool("ignore_eos")?,
    })
}

/// `prompt`: a string, token ids, or a list of one of either.
fn prompt(f: &Fields) -> Result<Prompt, ApiError> {
    let Some(v) = f.get("prompt") else { return Err(ApiError::field("prompt", "`prompt` is missing")) };
    let one = |v: &Value| -> Result<Prompt, ApiError> {
        match v {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_number) => a
                .iter()
                .map(|x| x.as_u64().filter(|&i| i <= u32::MAX as u64).map(|i| i as u32))
                .collect::<Option<Vec<u32>>>()
                .map(Prompt::Ids)
                .ok_or_else(|| ApiError::field("prompt", "`prompt` token ids must be integers ≥ 0")),
            v => Err(ApiError::field("prompt", format!("`prompt` must be a string or token ids, found {}", kind(v)))),
        }
    };
    match v {
        Value::Array(a) if a.len() == 1 && (a[0].is_string() || a[0].is_array()) => one(&a[0]),
        Value::Array(a) if a.iter().any(|x| x.is_string() || x.is_array()) => {
            Err(ApiError::field("prompt", format!("`prompt` gives {} prompts: send one per request", a.len())))
        }
        v => one(v),
    }
}

/// `messages`: `{role, content}` objects; a content may be a list of `{"type": "text"}` parts.
fn messages(f: &Fields) -> Result<Vec<Message>, ApiError> {
    let Some(Value::Array(list)) = f.get("messages") else {
        return Err(ApiError::field("messages", "`messages` must be a list of messages"));
    };
    if list.is_empty() {
        return Err(ApiError::field("messages", "`messages` is empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let at = |k: &str| format!("messages[{i}].{k}");
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .ok_or_else(|| ApiError::field(&at("role"), "a message needs a `role` string"))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => Ok(t),
                        _ => Err(ApiError::field(
                            &at("content"),
                            "only text parts (`{\"type\": \"text\", \"text\": …}`) are supported",
                        )),
                    })
                    .collect::<Result<Vec<&str>, _>>()?
                    .concat(),
                None | Some(Value::Null) => String::new(),
                Some(v) => {
                    return Err(ApiError::field(
                        &at("content"),
                        format!("a message's `content` must be a string, found {}", kind(v)),
                    ))
                }
            };
            Ok(Message { role: role.to_string(), content })
        })
        .collect()
}

/// `stop`: a string or up to four.
fn stop(f: &Fields) -> Result<Vec<String>, ApiError> {
    match f.get("stop") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => {
            Ok(a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        }
        Some(v) => Err(ApiError::field("stop", format!("`stop` must be a string or up to 4 strings, found {v}"))),
    }
}

/// Token counts, as `usage` reports them.
pub fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// A whole (not streamed) response.
pub fn response(chat: bool, id: &str, model: &str, created: u64, text: &str, finish: &str, use_: Value) -> Value {
    if chat {
        json!({"id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish}],
            "usage": use_})
    } else {
        json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}],
            "usage": use_})
    }
}

/// One streamed chunk: `text` (for chat, a `delta`; `first` adds the role), `finish` on the last.
pub fn chunk(chat: bool, id: &str, model: &str, created: u64, text: &str, first: bool, finish: Option<&str>) -> Value {
    if chat {
        let delta = match (first, finish) {
            (true, _) => json!({"role": "assistant", "content": text}),
            (false, Some(_)) if text.is_empty() => json!({}),
            _ => json!({"content": text}),
        };
        json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]})
    } else {
        json!({"id": id, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": null, "finish_reason": finish}]})
    }
}

/// The last chunk of a stream that asked for usage: no choices, the counts.
pub fn usage_chunk(chat: bool, id: &str, model: &str, created: u64, use_: Value) -> Value {
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    json!({"id": id, "object": object, "created": created, "model": model, "choices": [], "usage": use_})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str, chat: bool) -> ApiError {
        parse(body.as_bytes(), chat).unwrap_err()
    }

    #[test]
    fn fields_are_read_as_openai_defines_them() {
        let a = parse(br#"{"model": "m", "prompt": "hi", "max_tokens": 5, "temperature": 0.5, "top_p": 0.9,
            "top_k": 7, "seed": 3, "stop": ["a", "b"], "stream": true, "stream_options": {"include_usage": true}, "n": 1, "ignore_eos": true}"#, false)
        .unwrap();
        assert_eq!(a.prompt, Prompt::Text("hi".into()));
        assert_eq!(
            (a.max_tokens, a.temperature, a.top_p, a.top_k, a.seed),
            (Some(5), Some(0.5), Some(0.9), Some(7), Some(3))
        );
        assert_eq!((a.stop.len(), a.stream, a.include_usage, a.ignore_eos), (2, true, true, true));
        assert!(!parse(br#"{"prompt": "x"}"#, false).unwrap().ignore_eos);
        assert_eq!(parse(br#"{"prompt": [1, 2, 3]}"#, false).unwrap().prompt, Prompt::Ids(vec![1, 2, 3]));
        assert_eq!(parse(br#"{"prompt": ["one"]}"#, false).unwrap().prompt, Prompt::Text("one".into()));
        let c = parse(br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}], "max_completion_tokens": 4}"#, true).unwrap();
        assert_eq!(c.prompt, Prompt::Chat(vec![Message { role: "user".into(), content: "ab".into() }]));
        assert_eq!(c.max_tokens, Some(4));
    }

    #[test]
    fn every_bad_field_is_named() {
        for (body, chat, param, words) in [
            (r#"{"prompt": "x", "temperature": "hot"}"#, false, Some("temperature"), "must be a number"),
            (r#"{"prompt": "x", "temperature": 3}"#, false, Some("temperature"), "between 0 and 2"),
            (r#"{"prompt": "x", "top_p": 0}"#, false, Some("top_p"), "above 0"),
            (r#"{"prompt": "x", "n": 2}"#, false, Some("n"), "must be 1"),
            (r#"{"prompt": "x", "max_tokens": 0}"#, false, Some("max_tokens"), "≥ 1"),
            (r#"{"prompt": "x", "stop": 5}"#, false, Some("stop"), "up to 4 strings"),
            (r#"{"prompt": ["a", "b"]}"#, false, Some("prompt"), "one per request"),
            (r#"{"prompt": [1, -2]}"#, false, Some("prompt"), "integers ≥ 0"),
            (r#"{}"#, false, Some("prompt"), "missing"),
            (r#"{"prompt": "x", "stream": "yes"}"#, false, Some("stream"), "true or false"),
            (r#"{"prompt": "x", "frequency_penalty": 0.5}"#, false, Some("frequency_penalty"), "not supported"),
            (r#"{"messages": [{"content": "x"}]}"#, true, Some("messages[0].role"), "needs a `role`"),
            (r#"{"messages": []}"#, true, Some("messages"), "empty"),
            (
                r#"{"prompt": "x", "stream_options": {"include_usage": 1}}"#,
                false,
                Some("stream_options.include_usage"),
                "true or false",
            ),
            ("[1]", false, None, "must be an object"),
            ("{", false, None, "not valid JSON"),
        ] {
            let e = err(body, chat);
            assert_eq!((e.status, e.param.as_deref()), (400, param), "{body}: {e:?}");
            assert!(e.message.contains(words), "{body}: {}", e.message);
        }
        let e = parse(b"{\"prompt\": \"\xff\"}", false).unwrap_err();
        assert!(e.message.contains("not UTF-8"), "{e:?}");
    }
}
