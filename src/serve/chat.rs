//! Chat templates: `tokenizer_config.json`'s `chat_template` (Jinja) rendered with minijinja,
//! with the Python string and dict methods Hugging Face templates call (`.strip()`,
//! `.startswith()`, `.items()`, …), `raise_exception`, the model's special tokens and
//! `add_generation_prompt`, as transformers' `apply_chat_template` renders it.

use crate::error::{Error, Result};
use std::path::Path;

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A model's chat template, ready to render.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate(bos {:?}, eos {:?})", self.bos_token, self.eos_token)
    }
}

/// A special token as `tokenizer_config.json` writes it: a string, or `{"content": …}`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the model folder `dir` (`tokenizer_config.json`'s `chat_template`: a
    /// string, or a list of `{name, template}` of which `default` is taken; or a
    /// `chat_template.jinja` file beside it); `None` if it has none. A template that does not
    /// parse is an error naming the file.
    pub fn from_dir(dir: &Path) -> Result<Option<ChatTemplate>> {
        let path = dir.join("tokenizer_config.json");
        let config: serde_json::Value = match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| Error::Tokenizer { path: path.clone(), message: format!("invalid JSON: {e}") })?,
            Err(_) => serde_json::Value::Null,
        };
        let from_config = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or(list.first())
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        let source = match from_config {
            Some(s) => s,
            None => match std::fs::read_to_string(&jinja) {
                Ok(s) => s,
                Err(_) => return Ok(None),
            },
        };
        let (bos, eos) = (token_text(config.get("bos_token")), token_text(config.get("eos_token")));
        ChatTemplate::new(&source, bos, eos)
            .map(Some)
            .map_err(|m| Error::Tokenizer { path, message: format!("chat_template: {m}") })
    }

    /// A template from its Jinja source and the model's BOS and EOS token texts.
    pub fn new(source: &str, bos_token: String, eos_token: String) -> std::result::Result<ChatTemplate, String> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, message))
        });
        // Jinja as transformers sets it up: blocks trimmed.
        let syntax = minijinja::syntax::SyntaxConfig::builder().trim_blocks(true).lstrip_blocks(true).build();
        env.set_syntax(syntax.map_err(|e| e.to_string())?);
        env.add_template_owned("chat", source.to_string()).map_err(|e| e.to_string())?;
        Ok(ChatTemplate { env, bos_token, eos_token })
    }

    /// The prompt text for `messages`, ending with the assistant's turn begun when
    /// `add_generation_prompt`. An error the template raises (a role it refuses, say) is a
    /// request error with the template's message.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let t = self.env.get_template("chat").map_err(|e| Error::Request(e.to_string()))?;
        let ctx = minijinja::context! {
            messages => minijinja::Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        t.render(ctx).map_err(|e| {
            let detail = match e.kind() {
                minijinja::ErrorKind::InvalidOperation => e.detail().unwrap_or_default().to_string(),
                _ => e.to_string(),
            };
            Error::Request(format!("the chat template refused the messages: {detail}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    /// A Llama-2-style template: a system prompt folded into the first user turn, roles
    /// checked to alternate, `raise_exception`, `.strip()`.
    const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}\
{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}\
{% set system_message = false %}{% endif %}{% for message in loop_messages %}\
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if loop.index0 == 0 and system_message != false %}\
{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}\
{% else %}{% set content = message['content'] %}{% endif %}\
{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}\
{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

    /// A ChatML template with a generation prompt and string methods.
    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + \
message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}\
{{ '<|im_start|>assistant\n' }}{% endif %}{% if messages[0].content.startswith('!') %}{{ 'bang' }}{% endif %}";

    #[test]
    fn a_llama2_template_folds_the_system_prompt_and_checks_roles() {
        let t = ChatTemplate::new(LLAMA2, "<s>".into(), "</s>".into()).unwrap();
        let out =
            t.render(&[msg("system", "Be brief."), msg("user", " Hi "), msg("assistant", "Hello")], true).unwrap();
        // As Python would: `.strip()` trims the whole content, not the user turn inside it.
        assert_eq!(out, "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi [/INST] Hello </s>");
        let e = t.render(&[msg("user", "a"), msg("user", "b")], true).unwrap_err().to_string();
        assert!(e.contains("Conversation roles must alternate"), "{e}");
    }

    #[test]
    fn a_chatml_template_adds_the_generation_prompt_and_python_methods_work() {
        let t = ChatTemplate::new(CHATML, String::new(), String::new()).unwrap();
        let out = t.render(&[msg("user", "!hi ")], true).unwrap();
        assert_eq!(out, "<|im_start|>user\n!hi<|im_end|>\n<|im_start|>assistant\nbang");
        let out = t.render(&[msg("user", "x")], false).unwrap();
        assert_eq!(out, "<|im_start|>user\nx<|im_end|>\n");
    }

    #[test]
    fn a_folder_without_a_template_has_none_and_a_broken_one_is_named() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/tiny-llama");
        assert!(ChatTemplate::from_dir(&fixtures).unwrap().is_none());
        let dir = std::env::temp_dir().join(format!("weir-chat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("tokenizer_config.json"),
            r#"{"chat_template": "{% for m in messages %}", "bos_token": {"content": "<s>"}}"#,
        )
        .unwrap();
        let e = ChatTemplate::from_dir(&dir).unwrap_err().to_string();
        assert!(e.contains("tokenizer_config.json") && e.contains("chat_template"), "{e}");
        std::fs::write(dir.join("tokenizer_config.json"), r#"{"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "{{ bos_token }}{{ messages[0].content }}"}], "bos_token": {"content": "<s>"}}"#).unwrap();
        let t = ChatTemplate::from_dir(&dir).unwrap().unwrap();
        assert_eq!(t.render(&[msg("user", "hey")], false).unwrap(), "<s>hey");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
