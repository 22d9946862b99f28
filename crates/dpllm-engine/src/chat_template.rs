//! Jinja chat templates (as shipped in Hugging Face `tokenizer_config.json`),
//! rendered with minijinja configured like transformers: `trim_blocks`,
//! `lstrip_blocks`, Python string methods and a `raise_exception` function.

use crate::error::{EngineError, Result};
use minijinja::{context, Environment, Error, ErrorKind, Value};

const TEMPLATE_NAME: &str = "chat_template";

/// One chat message: a role (`system`, `user`, `assistant`, ...) and its text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// The speaker role, e.g. `"user"`.
    pub role: String,
    /// The message text.
    pub content: String,
}

impl ChatMessage {
    /// Convenience constructor.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template together with the BOS/EOS strings it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

/// Extract a special token's text from a `tokenizer_config.json` value, which may
/// be a plain string or an object `{"content": "..."}`.
pub(crate) fn token_content(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(m) => m
            .get("content")
            .and_then(|c| c.as_str())
            .map(str::to_string),
        _ => None,
    }
}

impl ChatTemplate {
    /// Compile the template text `source`; `bos_token`/`eos_token` are exposed to
    /// the template under those names. Fails with the template syntax error.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, Error> {
                Err(Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|e| {
                EngineError::ModelFiles(format!("invalid chat template: {}", describe(&e)))
            })?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Build the template from a parsed `tokenizer_config.json`. Its `chat_template`
    /// may be a string or a list of `{"name", "template"}` (the one named
    /// `"default"` is taken, else the first). Returns `Ok(None)` when there is no
    /// template. `bos_token`/`eos_token` are read from the same config.
    pub fn from_tokenizer_config(v: &serde_json::Value) -> Result<Option<ChatTemplate>> {
        let source = match v.get("chat_template") {
            None | Some(serde_json::Value::Null) => return Ok(None),
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => {
                if list.is_empty() {
                    return Ok(None);
                }
                let chosen = list
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .unwrap_or(&list[0]);
                chosen
                    .get("template")
                    .and_then(|t| t.as_str())
                    .ok_or_else(|| {
                        EngineError::ModelFiles(
                            "chat_template list entry has no string \"template\" field".into(),
                        )
                    })?
                    .to_string()
            }
            Some(other) => {
                return Err(EngineError::ModelFiles(format!(
                    "chat_template must be a string or a list, got {other}"
                )))
            }
        };
        let bos = token_content(v.get("bos_token")).unwrap_or_default();
        let eos = token_content(v.get("eos_token")).unwrap_or_default();
        ChatTemplate::new(&source, &bos, &eos).map(Some)
    }

    /// The BOS string passed to the template as `bos_token`.
    pub fn bos_token(&self) -> &str {
        &self.bos_token
    }

    /// The EOS string passed to the template as `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Render `messages`; with `add_generation_prompt` the template appends the
    /// assistant header. Errors raised by `raise_exception` carry their message.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| EngineError::ModelFiles(format!("chat template: {}", describe(&e))))?;
        let msgs: Vec<Value> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        tmpl.render(context! {
            messages => msgs,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| EngineError::Template(format!("rendering failed: {}", describe(&e))))
    }
}

/// Format a minijinja error including its chain of causes.
fn describe(e: &Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        src = cause.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA3: &str = r#"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"#;

    const CHATML: &str = r#"{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful assistant.<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>' + '
'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}"#;

    const MISTRAL: &str = r#"{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"#;

    fn m(role: &str, content: &str) -> ChatMessage {
        ChatMessage::new(role, content)
    }

    #[test]
    fn llama3_instruct() {
        let t = ChatTemplate::new(LLAMA3, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        let out = t
            .render(
                &[m("system", "You are helpful."), m("user", "  Hi there \n")],
                true,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let out = t.render(&[m("user", "Hi")], false).unwrap();
        assert_eq!(
            out,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        );
    }

    #[test]
    fn chatml_qwen2() {
        let t = ChatTemplate::new(CHATML, "", "<|im_end|>").unwrap();
        let out = t.render(&[m("user", "Hello")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[
                    m("system", "Be brief."),
                    m("user", "Hi"),
                    m("assistant", "Hey"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHey<|im_end|>\n"
        );
    }

    #[test]
    fn mistral_inst_and_alternation_error() {
        let t = ChatTemplate::new(MISTRAL, "<s>", "</s>").unwrap();
        let out = t
            .render(
                &[m("user", "Hi"), m("assistant", "Hello"), m("user", "How?")],
                true,
            )
            .unwrap();
        assert_eq!(out, "<s>[INST] Hi [/INST]Hello</s>[INST] How? [/INST]");
        let err = t
            .render(&[m("user", "a"), m("user", "b")], true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Conversation roles must alternate user/assistant/user/assistant/..."),
            "{err}"
        );
        let err = t.render(&[m("system", "x")], true).unwrap_err().to_string();
        assert!(err.contains("Conversation roles must alternate"), "{err}");
    }

    #[test]
    fn trim_lstrip_blocks_and_python_methods() {
        let src = "{% for message in messages %}\n    {% if message.content.startswith('!') %}\n[{{ message.role.upper() }}]{{ message.content.strip('!').strip() }}\n    {% endif %}\n{% endfor %}";
        let t = ChatTemplate::new(src, "", "").unwrap();
        let out = t
            .render(
                &[
                    m("user", "!  hi  "),
                    m("assistant", "skip"),
                    m("user", "!x!"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(out, "[USER]hi\n[USER]x\n");
    }

    #[test]
    fn from_tokenizer_config_variants() {
        let v = serde_json::json!({"chat_template": "{{ bos_token }}|{{ eos_token }}", "bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"});
        let t = ChatTemplate::from_tokenizer_config(&v).unwrap().unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "<s>|</s>");
        let v = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "default"}]});
        let t = ChatTemplate::from_tokenizer_config(&v).unwrap().unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "default");
        let v = serde_json::json!({"chat_template": [{"name": "rag", "template": "first"}]});
        let t = ChatTemplate::from_tokenizer_config(&v).unwrap().unwrap();
        assert_eq!(t.render(&[], false).unwrap(), "first");
        assert!(ChatTemplate::from_tokenizer_config(&serde_json::json!({}))
            .unwrap()
            .is_none());
        assert!(
            ChatTemplate::from_tokenizer_config(&serde_json::json!({"chat_template": 5})).is_err()
        );
    }

    #[test]
    fn syntax_error_is_reported() {
        let err = ChatTemplate::new("{% for x in %}", "", "")
            .unwrap_err()
            .to_string();
        assert!(err.contains("invalid chat template"), "{err}");
    }
}
