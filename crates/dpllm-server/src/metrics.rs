//! `/metrics` in the Prometheus text format (`prometheus-client`): requests
//! by route and status, tokens in and out, queue depth and batch size, time
//! to first token and per-token latency, and the effective bits of each
//! operating point.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, linear_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::scheduler::Summary;

/// Labels of a finished HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route (`/v1/chat/completions`, ...; `other` for unknown paths).
    pub route: String,
    /// The HTTP status code.
    pub status: u16,
}

/// Labels of an operating point.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PointLabels {
    /// `highest`, `target 3.5`, `4 bits`.
    pub point: String,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    /// HTTP requests by route and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Prompt tokens run.
    pub prompt_tokens: Counter,
    /// Tokens generated.
    pub generated_tokens: Counter,
    /// Requests waiting for a place in the batch.
    pub queue_depth: Gauge,
    /// Requests decoding now.
    pub running: Gauge,
    /// Requests in each decode step.
    pub batch_size: Histogram,
    /// Seconds from receipt to the first token.
    pub time_to_first_token: Histogram,
    /// Mean seconds per decoded token of each finished request.
    pub time_per_token: Histogram,
    /// Effective bits of each finished request, by operating point.
    pub effective_bits: Family<PointLabels, Histogram>,
    /// Requests whose client went away.
    pub cancelled: Counter,
    /// Requests that failed in the engine.
    pub engine_errors: Counter,
}

fn bits_histogram() -> Histogram {
    Histogram::new(linear_buckets(3.0, 0.25, 21))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("dpllm");
        let m = Metrics {
            requests: Family::default(),
            prompt_tokens: Counter::default(),
            generated_tokens: Counter::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            batch_size: Histogram::new(linear_buckets(1.0, 1.0, 16)),
            time_to_first_token: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            time_per_token: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            effective_bits: Family::new_with_constructor(bits_histogram),
            cancelled: Counter::default(),
            engine_errors: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            m.requests.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens run",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "generated_tokens",
            "Tokens generated",
            m.generated_tokens.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting for a place in the batch",
            m.queue_depth.clone(),
        );
        registry.register(
            "running_requests",
            "Requests decoding now",
            m.running.clone(),
        );
        registry.register(
            "batch_size",
            "Requests in each decode step",
            m.batch_size.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Seconds from receipt to the first token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "time_per_output_token_seconds",
            "Mean seconds per decoded token of each finished request",
            m.time_per_token.clone(),
        );
        registry.register(
            "effective_bits",
            "Effective bits of each finished request, by operating point",
            m.effective_bits.clone(),
        );
        registry.register(
            "cancelled_requests",
            "Requests whose client went away",
            m.cancelled.clone(),
        );
        registry.register(
            "engine_errors",
            "Requests that failed in the engine",
            m.engine_errors.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// A request finished: its tokens, speed and bits.
    pub fn finished(&self, s: &Summary) {
        self.generated_tokens.inc_by(s.completion_tokens as u64);
        if let Some(ms) = s.ms_per_token {
            self.time_per_token.observe(ms / 1000.0);
        }
        if let Some(b) = s.effective_bits {
            self.effective_bits
                .get_or_create(&PointLabels {
                    point: s.point.label(),
                })
                .observe(b);
        }
    }

    /// A request failed in the engine.
    pub fn failed(&self) {
        self.engine_errors.inc();
    }

    /// An HTTP request was answered.
    pub fn request(&self, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                route: route.to_string(),
                status,
            })
            .inc();
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
