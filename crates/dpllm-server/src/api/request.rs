//! The OpenAI request bodies dpllm accepts (`/v1/chat/completions`,
//! `/v1/completions`), with dpllm's extension `"dpllm"`: the request's
//! operating point. Each body is read twice: as the endpoint's own fields
//! and as [`CommonParams`], so an error names the field at fault. Fields
//! OpenAI clients send that do not change the answer
//! (`user`, `logit_bias` left empty, ...) are accepted and ignored; fields
//! that would change it and are not supported are refused with a 400.

use serde::Deserialize;

/// `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The model name (any value is accepted: one model is served).
    #[serde(default)]
    pub model: Option<String>,
    /// The conversation.
    pub messages: Vec<ChatMessageIn>,
}

/// One message of a chat request.
#[derive(Debug, Deserialize)]
pub struct ChatMessageIn {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// Its text: a string, or text parts.
    #[serde(default)]
    pub content: Content,
}

/// A message's content: a string or an array of parts (only text parts).
#[derive(Debug, Deserialize, Default)]
#[serde(untagged)]
pub enum Content {
    /// Absent or null.
    #[default]
    Empty,
    /// Plain text.
    Text(String),
    /// `[{"type": "text", "text": "..."}]`.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
pub struct ContentPart {
    /// Part type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    #[serde(default)]
    pub text: Option<String>,
}

/// `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// The model name (any value is accepted: one model is served).
    #[serde(default)]
    pub model: Option<String>,
    /// The prompt: a string (or an array holding one string).
    pub prompt: Prompt,
}

/// A completion prompt.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One string.
    One(String),
    /// Several strings (only one is supported: `n = 1`, no batch prompts).
    Many(Vec<String>),
}

/// `stop`: one string or up to four.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// `stream_options`.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send a last chunk with the token usage.
    #[serde(default)]
    pub include_usage: bool,
}

/// The request's operating point (dpllm's extension): exactly one field.
#[derive(Debug, Deserialize, Default, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DpllmOptions {
    /// A DP-LLM plan of the loaded budget, by its target average bits.
    #[serde(default)]
    pub target_bits: Option<f64>,
    /// Every quantized linear at this many bits.
    #[serde(default)]
    pub bits: Option<u32>,
    /// The best plan whose decode latency on this device meets this budget.
    #[serde(default)]
    pub max_ms_per_token: Option<f64>,
}

/// The fields both endpoints share (read from the same body as the
/// endpoint's own fields).
#[derive(Debug, Deserialize, Default)]
pub struct CommonParams {
    /// Maximum new tokens.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// The newer name of `max_tokens` (chat).
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    /// Sampling temperature (0..=2; 0 is greedy). OpenAI's default: 1.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling mass in (0, 1].
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Choices per request: only 1.
    #[serde(default)]
    pub n: Option<u64>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Stream options.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Up to 4 strings that end the answer (not included in it).
    #[serde(default)]
    pub stop: Option<Stop>,
    /// Seed of the sampler (the same seed and request give the same answer).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Not supported unless 0.
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// Not supported unless 0.
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// Not supported unless false / null.
    #[serde(default)]
    pub logprobs: Option<serde_json::Value>,
    /// Added to the logits of these token ids (-100..=100; -100 bans a token).
    #[serde(default)]
    pub logit_bias: Option<std::collections::HashMap<String, f64>>,
    /// The operating point.
    #[serde(default)]
    pub dpllm: Option<DpllmOptions>,
}
