//! The OpenAI response bodies: whole answers and streamed chunks of
//! `/v1/chat/completions` and `/v1/completions`, each with dpllm's extension
//! `"dpllm"`: the operating point used, its effective bits, ms per token.

use serde_json::{json, Value};

use crate::scheduler::Summary;

/// Which endpoint answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completion,
}

/// What every body of one answer shares.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The endpoint.
    pub endpoint: Endpoint,
    /// `chatcmpl-N` or `cmpl-N`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The model name.
    pub model: String,
}

/// `usage` of a summary.
fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
    })
}

/// dpllm's extension of a summary.
fn dpllm(s: &Summary) -> Value {
    json!({
        "operating_point": s.point.label(),
        "point": s.point,
        "effective_bits": s.effective_bits,
        "ms_per_token": s.ms_per_token,
        "time_to_first_token_ms": s.time_to_first_token_ms,
        "latency_met": s.latency_met,
    })
}

impl Reply {
    /// A reply of `endpoint` numbered `n`.
    pub fn new(endpoint: Endpoint, n: u64, created: u64, model: &str) -> Self {
        let prefix = match endpoint {
            Endpoint::Chat => "chatcmpl",
            Endpoint::Completion => "cmpl",
        };
        Reply {
            endpoint,
            id: format!("{prefix}-{n}"),
            created,
            model: model.to_string(),
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn with_choices(&self, chunk: bool, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    /// One choice holding `text` (a chunk's delta, or the whole message).
    fn choice(&self, chunk: bool, text: Option<&str>, finish: Value) -> Value {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text.unwrap_or("")},
                "logprobs": null,
                "finish_reason": finish,
            }),
            (Endpoint::Chat, true) => json!({
                "index": 0,
                "delta": text.map_or(json!({}), |t| json!({"content": t})),
                "logprobs": null,
                "finish_reason": finish,
            }),
            (Endpoint::Completion, _) => json!({
                "index": 0,
                "text": text.unwrap_or(""),
                "logprobs": null,
                "finish_reason": finish,
            }),
        }
    }

    /// The whole answer.
    pub fn full(&self, text: &str, s: &Summary) -> Value {
        let mut v = self.with_choices(
            false,
            json!([self.choice(false, Some(text), json!(s.finish))]),
        );
        v["usage"] = usage(s);
        v["dpllm"] = dpllm(s);
        v
    }

    /// A stream's first chunk (chat: the assistant role), if the endpoint has one.
    pub fn chunk_start(&self) -> Option<Value> {
        (self.endpoint == Endpoint::Chat).then(|| {
            self.with_choices(
                true,
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}]),
            )
        })
    }

    /// A chunk of text.
    pub fn chunk_text(&self, text: &str) -> Value {
        self.with_choices(true, json!([self.choice(true, Some(text), Value::Null)]))
    }

    /// The last chunk of a choice: its finish reason and dpllm's extension.
    pub fn chunk_finish(&self, s: &Summary) -> Value {
        let text = (self.endpoint == Endpoint::Completion).then_some("");
        let mut v = self.with_choices(true, json!([self.choice(true, text, json!(s.finish))]));
        v["dpllm"] = dpllm(s);
        v
    }

    /// The usage chunk (`stream_options.include_usage`): no choices.
    pub fn chunk_usage(&self, s: &Summary) -> Value {
        let mut v = self.with_choices(true, json!([]));
        v["usage"] = usage(s);
        v
    }
}
