//! The server's settings: where it listens, who may call it, how much work it
//! takes on, and the default operating point.

use std::net::SocketAddr;
use std::time::Duration;

use crate::scheduler::OperatingPoint;

/// Limits on what one request may ask.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body, bytes.
    pub max_body_bytes: usize,
    /// Longest prompt, tokens (also bounded by the model's context).
    pub max_prompt_tokens: usize,
    /// Largest `max_tokens` a request may ask.
    pub max_tokens: usize,
    /// `max_tokens` of a request that names none.
    pub default_max_tokens: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_prompt_tokens: 8192,
            max_tokens: 4096,
            default_max_tokens: 256,
        }
    }
}

/// Everything `dpllm serve` is configured with, beside the model.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (default 127.0.0.1:8080: loopback only).
    pub addr: SocketAddr,
    /// When set, every route but `/health` and the web page needs
    /// `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Per-request limits.
    pub limits: Limits,
    /// Requests decoded together, at most (one batch).
    pub max_batch: usize,
    /// Requests waiting for a place in the batch, at most; beyond, 429.
    pub max_queue: usize,
    /// The operating point of requests that name none.
    pub default_point: OperatingPoint,
    /// On shutdown, how long requests in flight may run before they are cancelled.
    pub shutdown_grace: Duration,
    /// The model's name in responses and `/v1/models`.
    pub model_name: String,
    /// Tokens decoded per operating point for the start-up latency profile (0: none).
    pub profile_tokens: usize,
    /// Prompt tokens run per engine step while other requests decode
    /// (chunked prefill: a long prompt no longer holds up the batch); 0: every
    /// new prompt whole before the next step.
    pub prefill_chunk: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_key: None,
            limits: Limits::default(),
            max_batch: 8,
            max_queue: 32,
            default_point: OperatingPoint::Default,
            shutdown_grace: Duration::from_secs(10),
            model_name: "dpllm".into(),
            profile_tokens: 16,
            prefill_chunk: 256,
        }
    }
}
