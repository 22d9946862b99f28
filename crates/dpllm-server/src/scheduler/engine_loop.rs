//! The engine thread's loop: take requests from the queue into the batch, run
//! their prompts a chunk at a time (up to `prefill_chunk` prompt tokens a
//! step, oldest first; the last chunk gives the first token), decode every
//! request past its prompt one step in one batched forward call, send each
//! its text, retire the finished, the failed and the abandoned.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use dpllm_engine::model::{Next, Readout};
use dpllm_engine::sampler::Sampler;
use dpllm_engine::tokenizer::{TextTokenizer, TokenStream};
use dpllm_engine::{Backend, EngineError, ServedModel, Session};

use super::{profile, Event, Finish, Job, OperatingPoint, Point, Shared, StopMatcher, Summary};
use crate::error::ApiError;

/// How long an idle engine waits for a request before it looks at the shutdown flag.
const IDLE_POLL: Duration = Duration::from_millis(50);

/// Decode steps a request needs before its speed updates the latency profile.
const PROFILE_MIN_STEPS: usize = 4;

/// The engine thread's state.
pub(super) struct Loop<B: Backend> {
    pub(super) served: ServedModel<B>,
    pub(super) tok: Arc<TextTokenizer>,
    pub(super) shared: Arc<Shared>,
    pub(super) max_batch: usize,
    pub(super) grace: Duration,
    /// Prompt tokens run per step (0: whole prompts).
    pub(super) prefill_chunk: usize,
}

/// A request in the batch.
struct Active<'t, B: Backend> {
    session: Session<B>,
    sampler: Sampler,
    text: TokenStream<'t>,
    stop: StopMatcher,
    /// Prompt and generated ids (the sampler's context).
    history: Vec<u32>,
    /// Prompt tokens run so far (the prompt is `history[..prompt_tokens]`).
    prefilled: usize,
    /// The token the next step runs.
    next: u32,
    logit_bias: Vec<(u32, f32)>,
    generated: usize,
    max_tokens: usize,
    prompt_tokens: usize,
    point: Point,
    latency_met: Option<bool>,
    events: tokio::sync::mpsc::UnboundedSender<Event>,
    received: Instant,
    first_token_ms: f64,
    decode_secs: f64,
    decode_steps: usize,
}

impl<B: Backend> Active<'_, B> {
    /// What the next forward call hands back: the token, chosen on the
    /// backend, unless a logit bias or a repetition penalty needs the logits
    /// here. Takes the sampler's random number for a draw on the backend:
    /// call it once a step, just before the call.
    fn readout(&mut self) -> Readout {
        match self.logit_bias.is_empty() {
            true => Readout::for_sampler(&mut self.sampler),
            false => Readout::Logits,
        }
    }

    /// Take the next token (or sample it from the logits); Some when the
    /// answer ends with it.
    fn advance(&mut self, next: Next, eos: &[u32]) -> Result<Option<Finish>, EngineError> {
        let t = match next {
            Next::Token(t) => t,
            Next::Logits(mut logits) => {
                for &(id, b) in &self.logit_bias {
                    if let Some(l) = logits.get_mut(id as usize) {
                        *l += b;
                    }
                }
                self.sampler.sample(&mut logits, &self.history)
            }
        };
        if eos.contains(&t) {
            return Ok(Some(Finish::Stop));
        }
        self.history.push(t);
        self.generated += 1;
        if let Some(piece) = self.text.push(t)? {
            self.send_text(&piece);
            if self.stop.stopped() {
                return Ok(Some(Finish::Stop));
            }
        }
        if self.generated >= self.max_tokens || self.session.len() + 1 > self.session.capacity() {
            return Ok(Some(Finish::Length));
        }
        self.next = t;
        Ok(None)
    }

    /// Run the next at most `budget` prompt tokens (all when 0); returns the
    /// tokens run and, after the prompt's last chunk, its first token's
    /// outcome as [`Active::advance`] gives it.
    fn run_prompt(
        &mut self,
        budget: usize,
        eos: &[u32],
    ) -> (usize, Option<Result<Option<Finish>, EngineError>>) {
        let left = self.prompt_tokens - self.prefilled;
        let n = if budget == 0 { left } else { left.min(budget) };
        // Only the prompt's last chunk chooses a token; an earlier one's
        // greedy id comes back instead of its logits, and is dropped.
        let readout = match self.prefilled + n < self.prompt_tokens {
            true => Readout::Argmax,
            false => self.readout(),
        };
        let chunk = &self.history[self.prefilled..self.prefilled + n];
        match self.session.prefill_next(chunk, readout) {
            Err(e) => (n, Some(Err(e))),
            Ok(next) => {
                self.prefilled += n;
                if self.prefilled < self.prompt_tokens {
                    return (n, None);
                }
                let r = self.advance(next, eos);
                self.first_token_ms = self.received.elapsed().as_secs_f64() * 1000.0;
                (n, Some(r))
            }
        }
    }

    /// Send what `piece` releases past the stop strings.
    fn send_text(&mut self, piece: &str) {
        let out = self.stop.push(piece);
        if !out.is_empty() {
            let _ = self.events.send(Event::Text(out));
        }
    }

    /// The answer's remaining text, then its summary.
    fn finish(mut self, finish: Finish, shared: &Shared) {
        if let Ok(Some(piece)) = self.text.finish() {
            self.send_text(&piece);
        }
        let rest = self.stop.finish();
        if !rest.is_empty() {
            let _ = self.events.send(Event::Text(rest));
        }
        let ms_per_token =
            (self.decode_steps > 0).then(|| self.decode_secs * 1000.0 / self.decode_steps as f64);
        if let Some(ms) = ms_per_token.filter(|_| self.decode_steps >= PROFILE_MIN_STEPS) {
            shared.profile.record(self.point, ms);
        }
        let s = Summary {
            finish,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.generated,
            point: self.point,
            effective_bits: self.session.stats().effective_bits(),
            ms_per_token,
            time_to_first_token_ms: self.first_token_ms,
            latency_met: self.latency_met,
        };
        shared.metrics.finished(&s);
        let _ = self.events.send(Event::Done(s));
    }

    /// Fail the request with `e`.
    fn fail(self, e: ApiError, shared: &Shared) {
        shared.metrics.failed();
        let _ = self.events.send(Event::Failed(e));
    }
}

impl<B: Backend> Loop<B> {
    /// Serve requests from `jobs` until shutdown (or until every sender is gone).
    pub(super) fn run(self, jobs: mpsc::Receiver<Job>) {
        let tok = self.tok.clone();
        let eos = tok.eos_ids().to_vec();
        let mut waiting: VecDeque<Job> = VecDeque::new();
        // Requests in the batch whose prompt has not all run, oldest first,
        // and those decoding.
        let mut prefilling: VecDeque<Active<'_, B>> = VecDeque::new();
        let mut active: Vec<Active<'_, B>> = Vec::new();
        let mut shutdown_at: Option<Instant> = None;
        loop {
            if active.is_empty() && prefilling.is_empty() && waiting.is_empty() {
                if self.shared.shutdown.load(Ordering::SeqCst) {
                    break;
                }
                match jobs.recv_timeout(IDLE_POLL) {
                    Ok(j) => waiting.push_back(j),
                    Err(mpsc::RecvTimeoutError::Timeout) => continue,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            waiting.extend(jobs.try_iter());
            if self.shared.shutdown.load(Ordering::SeqCst) {
                let at = *shutdown_at.get_or_insert_with(Instant::now);
                for j in waiting.drain(..) {
                    self.dequeued();
                    let _ = j.events.send(Event::Failed(ApiError::shutting_down()));
                }
                if at.elapsed() >= self.grace {
                    for a in active.drain(..).chain(prefilling.drain(..)) {
                        a.fail(ApiError::shutting_down(), &self.shared);
                    }
                }
            }
            // A closed channel: the client is gone.
            let here = |a: &Active<'_, B>| {
                let gone = a.events.is_closed();
                if gone {
                    self.shared.metrics.cancelled.inc();
                }
                !gone
            };
            active.retain(here);
            prefilling.retain(here);
            while active.len() + prefilling.len() < self.max_batch {
                let Some(j) = waiting.pop_front() else { break };
                self.dequeued();
                if j.events.is_closed() {
                    self.shared.metrics.cancelled.inc();
                    continue;
                }
                if let Some(a) = self.start(j, &tok) {
                    prefilling.push_back(a);
                }
            }
            self.set_running(active.len() + prefilling.len());
            self.prefill(&mut prefilling, &mut active, &eos);
            if active.is_empty() {
                continue;
            }
            let t = Instant::now();
            let results = step(&mut active);
            let dt = t.elapsed().as_secs_f64();
            self.shared.metrics.batch_size.observe(active.len() as f64);
            let mut keep = Vec::with_capacity(active.len());
            for (mut a, r) in active.drain(..).zip(results) {
                a.decode_secs += dt;
                a.decode_steps += 1;
                match r.and_then(|next| a.advance(next, &eos)) {
                    Ok(None) => keep.push(a),
                    Ok(Some(f)) => a.finish(f, &self.shared),
                    Err(e) => a.fail(e.into(), &self.shared),
                }
            }
            active = keep;
            self.set_running(active.len() + prefilling.len());
        }
        self.set_running(0);
    }

    /// Requests in the batch now, decoding or running their prompt.
    fn set_running(&self, n: usize) {
        self.shared.active.store(n, Ordering::SeqCst);
        self.shared.metrics.running.set(n as i64);
    }

    /// Run prompt chunks, oldest request first, up to `prefill_chunk` tokens
    /// in all (every waiting prompt whole when 0); a request whose prompt is
    /// done gets its first token and joins `active` (or ends there).
    fn prefill<'t>(
        &self,
        prefilling: &mut VecDeque<Active<'t, B>>,
        active: &mut Vec<Active<'t, B>>,
        eos: &[u32],
    ) {
        let mut budget = self.prefill_chunk;
        while let Some(mut a) = prefilling.pop_front() {
            let (ran, done) = a.run_prompt(budget, eos);
            if !matches!(done, Some(Err(_))) {
                self.shared.metrics.prompt_tokens.inc_by(ran as u64);
            }
            let Some(r) = done else {
                // The budget is spent inside this prompt: it goes on next step.
                prefilling.push_front(a);
                break;
            };
            if r.is_ok() {
                self.shared
                    .metrics
                    .time_to_first_token
                    .observe(a.first_token_ms / 1000.0);
            }
            match r {
                Ok(None) => active.push(a),
                Ok(Some(f)) => a.finish(f, &self.shared),
                Err(e) => a.fail(e.into(), &self.shared),
            }
            if self.prefill_chunk > 0 {
                budget -= ran.min(budget);
                if budget == 0 {
                    break;
                }
            }
        }
    }

    /// A request left the queue.
    fn dequeued(&self) {
        self.shared.queued.fetch_sub(1, Ordering::SeqCst);
        self.shared.metrics.queue_depth.dec();
    }

    /// The point `op` resolves to, and under a latency budget whether it is met.
    fn resolve(&self, op: OperatingPoint) -> (Point, Option<bool>) {
        let info = &self.shared.info;
        match op {
            OperatingPoint::Default => self.resolve(info.default),
            OperatingPoint::Highest => (Point::Highest, None),
            OperatingPoint::Target(t) => (Point::Target(t), None),
            OperatingPoint::Bits(b) => (Point::Bits(b), None),
            OperatingPoint::Latency(ms) => {
                let highest = info.highest_bits.unwrap_or(16.0);
                match self.shared.profile.best_within(ms, highest) {
                    Some((p, met)) => (p, Some(met)),
                    None => (Point::Highest, Some(false)),
                }
            }
        }
    }

    /// `j` made a request of the batch, its prompt not yet run (None when it
    /// cannot start; its events say why).
    fn start<'t>(&self, j: Job, tok: &'t TextTokenizer) -> Option<Active<'t, B>> {
        let (point, latency_met) = self.resolve(j.params.point);
        let r = (|| {
            let precision = profile::precision(&self.served, point)?;
            let capacity = j.prompt.len() + j.params.max_tokens;
            let session = self.served.session(precision, capacity)?;
            let sampler = Sampler::new(j.params.sampling.clone())?;
            Ok::<_, EngineError>((session, sampler))
        })();
        let (session, sampler) = match r {
            Ok(v) => v,
            Err(e) => {
                self.shared.metrics.failed();
                let _ = j.events.send(Event::Failed(e.into()));
                return None;
            }
        };
        let _ = j.events.send(Event::Started);
        Some(Active {
            session,
            sampler,
            text: TokenStream::new(tok).skip_special(true),
            stop: StopMatcher::new(j.params.stop),
            prompt_tokens: j.prompt.len(),
            history: j.prompt,
            prefilled: 0,
            next: 0,
            logit_bias: j.params.logit_bias,
            generated: 0,
            max_tokens: j.params.max_tokens,
            point,
            latency_met,
            events: j.events,
            received: j.received,
            first_token_ms: 0.0,
            decode_secs: 0.0,
            decode_steps: 0,
        })
    }
}

/// One decode step of every request in `active`, in one batched call; when
/// the batch fails, each request alone, so only the one at fault fails.
fn step<B: Backend>(active: &mut [Active<'_, B>]) -> Vec<Result<Next, EngineError>> {
    let mut batch: Vec<(&mut Session<B>, u32, Readout)> = active
        .iter_mut()
        .map(|a| {
            let readout = a.readout();
            (&mut a.session, a.next, readout)
        })
        .collect();
    match Session::decode_batch(&mut batch) {
        Ok(v) => v.into_iter().map(Ok).collect(),
        Err(e) if batch.len() == 1 => vec![Err(e)],
        Err(e) => {
            tracing::warn!("a batched decode step failed ({e}); running its requests one by one");
            batch
                .iter_mut()
                .map(|(s, t, r)| s.decode_next(*t, *r))
                .collect()
        }
    }
}
