//! The engine side of the server: one thread owns the loaded model and runs
//! every request on it. Requests wait in a bounded queue; up to `max_batch`
//! of them decode together, one batched forward call a step (continuous
//! batching: a request joins after its prompt's prefill and leaves when it
//! ends, between steps), each token at its own request's precision. Events
//! (text, the end, an error) go back to the HTTP side over a channel; a
//! closed channel (the client left) cancels the request.

mod engine_loop;
mod operating;
mod profile;
mod stop;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;

use dpllm_engine::sampler::SamplingParams;
use dpllm_engine::tokenizer::TextTokenizer;
use dpllm_engine::{Backend, EngineError, ServedModel};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;

pub use operating::{Latency, LatencyProfile, ModelInfo, OperatingPoint, Point};
pub use stop::StopMatcher;

use crate::config::ServerConfig;
use crate::error::ApiError;
use crate::metrics::Metrics;

/// What a request asks the engine to do, checked.
#[derive(Debug, Clone)]
pub struct GenParams {
    /// Maximum new tokens.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampling: SamplingParams,
    /// Strings that end the answer.
    pub stop: Vec<String>,
    /// Added to the logits of these token ids before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// The operating point asked for.
    pub point: OperatingPoint,
}

/// One request as the engine receives it.
pub struct Job {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// What to generate.
    pub params: GenParams,
    /// Where its events go.
    pub events: UnboundedSender<Event>,
    /// When the server received it (time to first token counts from here).
    pub received: Instant,
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    /// An end-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context window.
    Length,
}

/// What a finished request reports.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Why it ended.
    pub finish: Finish,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Where it ran.
    pub point: Point,
    /// Average bits of the weights its decoded tokens read (quantized models).
    pub effective_bits: Option<f64>,
    /// Mean decode time per token, ms (None before a second token).
    pub ms_per_token: Option<f64>,
    /// From receipt to the first token, ms.
    pub time_to_first_token_ms: f64,
    /// Under a latency budget: whether the point chosen met it.
    pub latency_met: Option<bool>,
}

/// What the engine tells the HTTP side about a request.
#[derive(Debug)]
pub enum Event {
    /// The prompt ran; text follows.
    Started,
    /// Text of the answer, in order.
    Text(String),
    /// The end.
    Done(Summary),
    /// It failed (before or while generating).
    Failed(ApiError),
}

/// Counters and flags the engine thread and the HTTP side share.
struct Shared {
    queued: AtomicUsize,
    active: AtomicUsize,
    shutdown: AtomicBool,
    metrics: Arc<Metrics>,
    profile: Arc<LatencyProfile>,
    info: Arc<ModelInfo>,
}

/// The HTTP side's handle on the engine: submit requests, read its state,
/// ask it to stop.
pub struct Scheduler {
    jobs: Mutex<mpsc::Sender<Job>>,
    shared: Arc<Shared>,
    max_queue: usize,
    max_batch: usize,
}

/// The engine's loop, to run on a thread of the caller's choosing (the
/// CLI's main thread, which is the rayon pool's worker 0: parallel loops it
/// starts run on it at once).
pub struct Engine<B: Backend> {
    run: engine_loop::Loop<B>,
    jobs: mpsc::Receiver<Job>,
}

impl<B: Backend> Engine<B> {
    /// Serve requests until [`Scheduler::shutdown`] (and the requests in
    /// flight are finished or, after the grace period, cancelled).
    pub fn run(self) {
        self.run.run(self.jobs)
    }
}

impl Scheduler {
    /// Measure the latency profile of `served` (unless `cfg.profile_tokens`
    /// is 0) and make the engine that will serve it, with its handle.
    pub fn new<B: Backend>(
        served: ServedModel<B>,
        tok: Arc<TextTokenizer>,
        cfg: &ServerConfig,
        metrics: Arc<Metrics>,
    ) -> Result<(Scheduler, Engine<B>), EngineError> {
        let info = Arc::new(profile::model_info(&served, cfg)?);
        let profile = Arc::new(LatencyProfile::new(profile::measure(
            &served,
            &info,
            cfg.profile_tokens,
        )?));
        let shared = Arc::new(Shared {
            queued: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
            metrics,
            profile,
            info,
        });
        let (tx, rx) = mpsc::channel();
        let run = engine_loop::Loop {
            served,
            tok,
            shared: shared.clone(),
            max_batch: cfg.max_batch.max(1),
            grace: cfg.shutdown_grace,
            prefill_chunk: cfg.prefill_chunk,
        };
        let sched = Scheduler {
            jobs: Mutex::new(tx),
            shared,
            max_queue: cfg.max_queue,
            max_batch: cfg.max_batch.max(1),
        };
        Ok((sched, Engine { run, jobs: rx }))
    }

    /// What the model offers.
    pub fn info(&self) -> &ModelInfo {
        &self.shared.info
    }

    /// The latency profile.
    pub fn profile(&self) -> &LatencyProfile {
        &self.shared.profile
    }

    /// Queue `job`; 429 when the queue is full, 503 once shutting down.
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        if self.shared.shutdown.load(Ordering::SeqCst) {
            return Err(ApiError::shutting_down());
        }
        let q = &self.shared.queued;
        if q.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            (n < self.max_queue).then_some(n + 1)
        })
        .is_err()
        {
            return Err(ApiError::overloaded(self.retry_after()));
        }
        self.shared.metrics.queue_depth.inc();
        let sent = self.jobs.lock().map_err(|_| engine_gone())?.send(job);
        if sent.is_err() {
            q.fetch_sub(1, Ordering::SeqCst);
            self.shared.metrics.queue_depth.dec();
            return Err(engine_gone());
        }
        Ok(())
    }

    /// Seconds a refused client should wait: about one request's time per
    /// batch-full of waiting requests.
    fn retry_after(&self) -> u64 {
        let waits = self.shared.queued.load(Ordering::SeqCst) / self.max_batch + 1;
        let per = (self.shared.profile.snapshot().0.iter())
            .map(|l| l.ms_per_token)
            .fold(0.0, f64::max)
            * 256.0
            / 1000.0;
        (waits as f64 * per).ceil().clamp(1.0, 60.0) as u64
    }

    /// Requests waiting and running now.
    pub fn load(&self) -> (usize, usize) {
        (
            self.shared.queued.load(Ordering::SeqCst),
            self.shared.active.load(Ordering::SeqCst),
        )
    }

    /// Refuse new requests (503) and let the engine finish the running ones
    /// (cancelled after the grace period) and stop.
    pub fn shutdown(&self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
    }

    /// True once [`Scheduler::shutdown`] was asked.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.shutdown.load(Ordering::SeqCst)
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn engine_gone() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        "the engine thread has stopped",
    )
}
