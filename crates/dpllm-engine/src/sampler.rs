//! Token sampling from logits: repetition penalty, greedy decoding, temperature,
//! top-k, top-p (nucleus) and seeded random draws, following the semantics of
//! Hugging Face transformers' logits processors.

use crate::error::{EngineError, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;

/// Parameters controlling how the next token is chosen from the logits.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; `0.0` means greedy (argmax) decoding.
    pub temperature: f32,
    /// Keep only the `top_k` highest logits before sampling; `0` disables top-k.
    pub top_k: usize,
    /// Nucleus sampling threshold in `(0, 1]`; `1.0` disables top-p.
    pub top_p: f32,
    /// Repetition penalty (`1.0` = off); values `> 1` discourage repeated tokens.
    pub repetition_penalty: f32,
    /// Seed of the random number generator used for sampling.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy decoding with every filter disabled and seed 0.
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Check that the parameters are usable; the error names the offending command-line flag.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(EngineError::Sampling(format!(
                "--temperature must be a finite number >= 0, got {}",
                self.temperature
            )));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(EngineError::Sampling(format!(
                "--top-p must be in the range (0, 1], got {}",
                self.top_p
            )));
        }
        if !self.repetition_penalty.is_finite() || self.repetition_penalty <= 0.0 {
            return Err(EngineError::Sampling(format!(
                "--repetition-penalty must be a finite number > 0, got {}",
                self.repetition_penalty
            )));
        }
        Ok(())
    }
}

/// Stateful sampler: owns the sampling parameters and a seeded RNG, so a given
/// seed reproduces the same token sequence for the same logits.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch buffer of candidate indices, reused between calls.
    idx: Vec<u32>,
    /// Scratch buffer of candidate probabilities, reused between calls.
    probs: Vec<f32>,
}

/// Width of the top-p filter's logit buckets (nats below the maximum) and
/// their number; the last one takes everything further down.
const NUCLEUS_BUCKET_NATS: f32 = 0.25;
const NUCLEUS_BUCKETS: usize = 128;

/// Leave in `idx` (all token ids) the top tokens by logit, sorted descending,
/// that hold at least `top_p` of the vocabulary's softmax mass, and return
/// that mass (Σ exp(logit − max) over the whole vocabulary); None, with
/// `idx` fully sorted, when no logit is finite. The tokens are bucketed by
/// how far their logit lies below the maximum: the buckets' masses, summed
/// from the top, say which bucket the nucleus ends in, and only the tokens
/// down to it are sorted. Sorting all 128K logits of a Llama-3 vocabulary
/// takes milliseconds a token; this is two linear passes and a sort of the
/// nucleus's neighbourhood.
fn nucleus_candidates(logits: &[f32], top_p: f32, idx: &mut Vec<u32>) -> Option<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let order = |a: &u32, b: &u32| desc(logits, *a, *b);
    if !max.is_finite() {
        idx.sort_unstable_by(order);
        return None;
    }
    let bucket = |l: f32| (((max - l) / NUCLEUS_BUCKET_NATS) as usize).min(NUCLEUS_BUCKETS - 1);
    let mut mass = [0f64; NUCLEUS_BUCKETS];
    let mut total = 0f32;
    for &l in logits {
        let p = (l - max).exp();
        total += p;
        mass[bucket(l)] += p as f64;
    }
    let want = top_p as f64 * mass.iter().sum::<f64>();
    let mut cum = 0f64;
    let last = mass
        .iter()
        .position(|&m| {
            cum += m;
            cum >= want
        })
        .unwrap_or(NUCLEUS_BUCKETS - 1);
    if last < NUCLEUS_BUCKETS - 1 {
        idx.retain(|&i| bucket(logits[i as usize]) <= last);
    }
    idx.sort_unstable_by(order);
    Some(total)
}

/// Order by descending logit, then ascending index (deterministic tie-break).
/// NaNs must have been replaced before calling.
fn desc(logits: &[f32], a: u32, b: u32) -> Ordering {
    logits[b as usize]
        .total_cmp(&logits[a as usize])
        .then(a.cmp(&b))
}

impl Sampler {
    /// Create a sampler after validating `params`.
    pub fn new(params: SamplingParams) -> Result<Sampler> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Sampler {
            params,
            rng,
            idx: Vec::new(),
            probs: Vec::new(),
        })
    }

    /// The parameters this sampler was built with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The draw of the next token when it may be made where the logits are
    /// ([`crate::model::Readout::Sample`]): the temperature, filters and the
    /// uniform `u` this sampler's generator gives that token, so that [`draw`]
    /// of the logits with it is the token [`Sampler::sample`] would pick. None
    /// for greedy decoding, a repetition penalty (it needs the history) and
    /// temperatures under 1e-3 (the host's path handles logits that overflow
    /// when scaled).
    pub fn device_draw(&mut self) -> Option<Draw> {
        let p = &self.params;
        (p.repetition_penalty == 1.0 && p.temperature >= 1e-3).then(|| self.next_draw())
    }

    /// The draw of the next token at temperature > 0, taking its uniform number.
    fn next_draw(&mut self) -> Draw {
        let p = &self.params;
        Draw {
            inv_temperature: 1.0 / p.temperature,
            top_k: p.top_k.min(u32::MAX as usize) as u32,
            top_p: p.top_p,
            uniform: self.rng.random::<f32>(),
        }
    }

    /// True when every choice is the argmax of the logits as they come
    /// (greedy, no repetition penalty): the model may then pick the token
    /// where the logits are ([`crate::model::Readout::Argmax`]).
    pub fn is_argmax(&self) -> bool {
        self.params.temperature == 0.0 && self.params.repetition_penalty == 1.0
    }

    /// Choose the next token. `history` = all tokens so far (prompt + generated),
    /// used by the repetition penalty. `logits` is modified in place (penalty,
    /// temperature, NaN replacement). NaN logits are treated as `-inf`; history
    /// ids outside the vocabulary are ignored; an empty `logits` slice yields 0.
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        if logits.is_empty() {
            return 0;
        }
        for l in logits.iter_mut() {
            if l.is_nan() {
                *l = f32::NEG_INFINITY;
            }
        }
        self.apply_repetition_penalty(logits, history);

        if self.params.temperature == 0.0 {
            return argmax(logits);
        }
        let d = self.next_draw();
        draw_into(logits, d, &mut self.idx, &mut self.probs)
    }

    fn apply_repetition_penalty(&self, logits: &mut [f32], history: &[u32]) {
        let penalty = self.params.repetition_penalty;
        if penalty == 1.0 || history.is_empty() {
            return;
        }
        let mut ids: Vec<u32> = history
            .iter()
            .copied()
            .filter(|&t| (t as usize) < logits.len())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for t in ids {
            let l = &mut logits[t as usize];
            if *l > 0.0 {
                *l /= penalty;
            } else {
                *l *= penalty;
            }
        }
    }
}

/// One random draw of a token: what [`Sampler::sample`] does with the logits
/// after the repetition penalty, as a backend's
/// [`crate::Backend::sample_rows`] takes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Draw {
    /// One over the temperature (> 0).
    pub inv_temperature: f32,
    /// Keep the `top_k` highest logits (0: all).
    pub top_k: u32,
    /// Keep the smallest set of top tokens holding this share of the mass (1: all).
    pub top_p: f32,
    /// The draw's uniform number in [0, 1).
    pub uniform: f32,
}

impl Draw {
    /// A draw from the softmax at temperature 1 / `inv_temperature` with no filter.
    pub fn tempered(inv_temperature: f32, uniform: f32) -> Draw {
        Draw {
            inv_temperature,
            top_k: 0,
            top_p: 1.0,
            uniform,
        }
    }

    /// The argmax as a draw (top-k 1: the largest logit, the lowest index
    /// on ties), for a greedy row among random ones.
    pub fn greedy() -> Draw {
        Draw {
            inv_temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            uniform: 0.0,
        }
    }

    /// Whether top-k or top-p narrows the candidates of a vocabulary of `n`
    /// tokens (then they are taken in descending order of logit, else in
    /// index order).
    pub fn filters(&self, n: usize) -> bool {
        (self.top_k > 0 && (self.top_k as usize) < n) || self.top_p < 1.0
    }
}

/// The token [`Sampler::sample`] draws with `d` from `logits` (NaNs taken as
/// −∞): scaled by the temperature; the top-k, then the top-p candidates in
/// descending order of logit (ties: lower index first), or every token in
/// index order when neither filters; the first whose cumulative probability
/// exceeds `d.uniform` times the candidates' total (else the last with a
/// non-zero probability). The reference for [`crate::Backend::sample_rows`].
pub fn draw(logits: &[f32], d: Draw) -> u32 {
    let mut l: Vec<f32> = logits
        .iter()
        .map(|&v| if v.is_nan() { f32::NEG_INFINITY } else { v })
        .collect();
    draw_into(&mut l, d, &mut Vec::new(), &mut Vec::new())
}

/// [`draw`] on logits without NaNs, scaled in place; `idx` and `probs` scratch.
fn draw_into(logits: &mut [f32], d: Draw, idx: &mut Vec<u32>, probs: &mut Vec<f32>) -> u32 {
    if logits.is_empty() {
        return 0;
    }
    for l in logits.iter_mut() {
        *l *= d.inv_temperature;
        if l.is_nan() {
            *l = f32::NEG_INFINITY;
        }
    }

    // Candidate set, sorted by descending logit when a filter needs order.
    let n = logits.len();
    let k = d.top_k as usize;
    let use_top_p = d.top_p < 1.0;
    idx.clear();
    idx.extend(0..n as u32);
    // Top-p alone is relative to the whole vocabulary's mass.
    let mut vocab_mass = None;
    if k > 0 && k < n {
        idx.select_nth_unstable_by(k - 1, |&a, &b| desc(logits, a, b));
        idx.truncate(k);
        idx.sort_unstable_by(|&a, &b| desc(logits, a, b));
    } else if use_top_p {
        vocab_mass = nucleus_candidates(logits, d.top_p, idx);
    }

    // Numerically stable softmax over the candidates.
    let max = idx
        .iter()
        .map(|&i| logits[i as usize])
        .fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        // All -inf (or +inf present): no usable distribution, fall back to greedy.
        return argmax(logits);
    }
    probs.clear();
    probs.extend(idx.iter().map(|&i| (logits[i as usize] - max).exp()));
    let mut total: f32 = vocab_mass.unwrap_or_else(|| probs.iter().sum());

    // Top-p: smallest prefix (sorted descending) whose mass reaches top_p.
    if use_top_p {
        let threshold = d.top_p * total;
        let mut cum = 0.0f32;
        let mut keep = probs.len();
        for (j, &p) in probs.iter().enumerate() {
            cum += p;
            if cum >= threshold {
                keep = j + 1;
                break;
            }
        }
        probs.truncate(keep.max(1));
        idx.truncate(keep.max(1));
        total = probs.iter().sum();
    }

    // Draw (renormalisation is implicit by scaling the uniform draw by `total`).
    let mut r = d.uniform * total;
    for (j, &p) in probs.iter().enumerate() {
        if r < p {
            return idx[j];
        }
        r -= p;
    }
    // Rounding left a remainder: take the last candidate with non-zero mass.
    let last = probs.iter().rposition(|&p| p > 0.0).unwrap_or(0);
    idx[last]
}

/// Index of the largest value, lowest index on ties; NaNs are never chosen
/// unless everything is NaN (then 0).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in logits.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if !found || v > best_v {
            best = i;
            best_v = v;
            found = true;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed,
        }
    }

    fn random_logits(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>() * 10.0 - 5.0).collect()
    }

    #[test]
    fn a_device_draw_picks_the_token_the_sampler_would() {
        // Plain temperature, top-k, top-p, both, and filters that keep everything.
        for (k, p) in [
            (0, 1.0),
            (5, 1.0),
            (0, 0.9),
            (40, 0.8),
            (5000, 1.0),
            (0, 0.3),
        ] {
            let mut host = Sampler::new(params(0.8, k, p, 7)).unwrap();
            let mut device = Sampler::new(params(0.8, k, p, 7)).unwrap();
            let mut spread = std::collections::HashSet::new();
            for i in 0..300 {
                let logits = random_logits(1000 + i, i as u64);
                let d = device.device_draw().unwrap();
                assert!((d.inv_temperature - 1.25).abs() < 1e-6);
                assert_eq!((d.top_k as usize, d.top_p), (k, p));
                assert!((0.0..1.0).contains(&d.uniform));
                let t = draw(&logits, d);
                assert_eq!(
                    t,
                    host.sample(&mut logits.clone(), &[]),
                    "k {k} p {p} draw {i}"
                );
                spread.insert(t);
            }
            let least = if k == 5 { 5 } else { 20 };
            assert!(
                spread.len() >= least,
                "k {k} p {p}: the draws must differ: {}",
                spread.len()
            );
        }
        // Penalties, greedy and tiny temperatures stay on the host.
        let mut penalised = params(0.8, 0, 1.0, 7);
        penalised.repetition_penalty = 1.1;
        for p in [params(0.0, 0, 1.0, 7), params(1e-4, 0, 1.0, 7), penalised] {
            assert_eq!(
                Sampler::new(p.clone()).unwrap().device_draw(),
                None,
                "{p:?}"
            );
        }
    }

    #[test]
    fn default_is_greedy_and_valid() {
        let p = SamplingParams::default();
        assert_eq!(p.temperature, 0.0);
        assert_eq!(p.top_k, 0);
        assert_eq!(p.top_p, 1.0);
        assert_eq!(p.repetition_penalty, 1.0);
        assert!(p.validate().is_ok());
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        let mut l = vec![0.1, 3.0, -2.0, 2.9];
        assert_eq!(s.sample(&mut l, &[]), 1);
        // ties -> lowest index
        let mut l = vec![1.0, 5.0, 5.0, 0.0];
        assert_eq!(s.sample(&mut l, &[]), 1);
        let big = random_logits(150_000, 7);
        let expect = big
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
                if v > bv {
                    (i, v)
                } else {
                    (bi, bv)
                }
            })
            .0 as u32;
        assert_eq!(s.sample(&mut big.clone(), &[]), expect);
    }

    #[test]
    fn top_k_one_equals_greedy_at_any_temperature() {
        for (t, seed) in [(0.5f32, 1u64), (1.0, 2), (5.0, 3), (100.0, 4)] {
            let mut s = Sampler::new(params(t, 1, 1.0, seed)).unwrap();
            for round in 0..20 {
                let logits = random_logits(1000, round);
                let want = argmax(&logits);
                assert_eq!(
                    s.sample(&mut logits.clone(), &[]),
                    want,
                    "t={t} round={round}"
                );
            }
        }
    }

    #[test]
    fn same_seed_same_sequence_different_seed_differs() {
        let run = |seed: u64| -> Vec<u32> {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed)).unwrap();
            (0..64)
                .map(|_| s.sample(&mut vec![0.0f32; 100], &[]))
                .collect()
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        // flat distribution should produce many distinct tokens
        let mut d = a.clone();
        d.sort();
        d.dedup();
        assert!(d.len() > 20, "only {} distinct tokens", d.len());
    }

    #[test]
    fn small_top_p_keeps_only_top_token() {
        let mut s = Sampler::new(params(1.0, 0, 0.01, 9)).unwrap();
        for _ in 0..200 {
            let mut l = vec![1.0, 2.0, 1.9, 0.5, 1.95];
            assert_eq!(s.sample(&mut l, &[]), 1);
        }
        // with top-k as well
        let mut s = Sampler::new(params(2.0, 3, 0.01, 9)).unwrap();
        for _ in 0..200 {
            let mut l = vec![1.0, 2.0, 1.9, 0.5, 1.95];
            assert_eq!(s.sample(&mut l, &[]), 1);
        }
    }

    #[test]
    fn nucleus_candidates_hold_the_nucleus_of_a_full_sort() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // The nucleus (prefix of the sorted ids reaching top_p of `total`).
        let nucleus = |logits: &[f32], sorted: &[u32], total: f32, top_p: f32| -> Vec<u32> {
            let max = logits[sorted[0] as usize];
            let mut cum = 0f32;
            for (j, &i) in sorted.iter().enumerate() {
                cum += (logits[i as usize] - max).exp();
                if cum >= top_p * total {
                    return sorted[..=j].to_vec();
                }
            }
            sorted.to_vec()
        };
        // Peaked, flat (the nucleus is most of the vocabulary: widened to all
        // of it), ties, and -inf entries.
        for (n, scale, top_p) in [
            (50_000usize, 8.0f32, 0.9f32),
            (50_000, 0.0, 0.5),
            (3_000, 0.01, 0.99),
            (10, 3.0, 0.7),
        ] {
            let mut logits: Vec<f32> = (0..n)
                .map(|_| (rng.random::<f32>() * scale).round())
                .collect();
            logits[n / 2] = f32::NEG_INFINITY;
            let mut idx: Vec<u32> = (0..n as u32).collect();
            let total = nucleus_candidates(&logits, top_p, &mut idx).unwrap();
            let mut all: Vec<u32> = (0..n as u32).collect();
            all.sort_unstable_by(|&a, &b| desc(&logits, a, b));
            assert_eq!(
                nucleus(&logits, &idx, total, top_p),
                nucleus(&logits, &all, total, top_p),
                "n={n} scale={scale} top_p={top_p}"
            );
        }
        // No finite logit: everything, sorted, and no mass.
        let mut idx: Vec<u32> = (0..4).collect();
        assert_eq!(
            nucleus_candidates(&[f32::NEG_INFINITY; 4], 0.9, &mut idx),
            None
        );
        assert_eq!(idx.len(), 4);
    }

    #[test]
    fn top_p_restricts_to_nucleus() {
        // probs ~ [0.5, 0.3, 0.15, 0.05]; top_p 0.75 keeps tokens 0 and 1 only.
        let base: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
        let mut s = Sampler::new(params(1.0, 0, 0.75, 5)).unwrap();
        let mut counts = [0usize; 4];
        for _ in 0..5000 {
            counts[s.sample(&mut base.clone(), &[]) as usize] += 1;
        }
        assert_eq!(counts[2] + counts[3], 0, "{counts:?}");
        assert!(counts[0] > 0 && counts[1] > 0);
        let f0 = counts[0] as f32 / 5000.0;
        assert!((f0 - 0.625).abs() < 0.03, "f0={f0}");
    }

    #[test]
    fn empirical_frequencies_match_softmax() {
        let logits = [1.0f32, 2.0, 0.5, -1.0];
        let max = 2.0f32;
        let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let z: f32 = exps.iter().sum();
        let want: Vec<f32> = exps.iter().map(|e| e / z).collect();
        let mut s = Sampler::new(params(1.0, 0, 1.0, 1234)).unwrap();
        let n = 20_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&mut logits.to_vec(), &[]) as usize] += 1;
        }
        for i in 0..4 {
            let f = counts[i] as f32 / n as f32;
            assert!(
                (f - want[i]).abs() < 0.02,
                "token {i}: got {f}, want {}",
                want[i]
            );
        }
        // temperature 2 flattens: compare against softmax(logits/2)
        let exps: Vec<f32> = logits.iter().map(|l| ((l - max) / 2.0).exp()).collect();
        let z: f32 = exps.iter().sum();
        let mut s = Sampler::new(params(2.0, 0, 1.0, 99)).unwrap();
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&mut logits.to_vec(), &[]) as usize] += 1;
        }
        for i in 0..4 {
            let f = counts[i] as f32 / n as f32;
            assert!((f - exps[i] / z).abs() < 0.02, "T=2 token {i}: got {f}");
        }
    }

    #[test]
    fn top_k_never_picks_outside_k() {
        let logits = random_logits(150_000, 3);
        let mut sorted: Vec<u32> = (0..logits.len() as u32).collect();
        sorted.sort_by(|&a, &b| desc(&logits, a, b));
        let top: Vec<u32> = sorted[..5].to_vec();
        let mut s = Sampler::new(params(3.0, 5, 1.0, 11)).unwrap();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..300 {
            let t = s.sample(&mut logits.clone(), &[]);
            assert!(top.contains(&t), "{t} not in top-5");
            seen.insert(t);
        }
        assert!(
            seen.len() >= 3,
            "high temperature should spread over the top-5"
        );
    }

    #[test]
    fn repetition_penalty_switches_argmax() {
        let mut s = Sampler::new(SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        })
        .unwrap();
        let mut l = vec![3.0, 2.0, -1.0];
        // 3.0/2 = 1.5 < 2.0 -> token 1 wins
        assert_eq!(s.sample(&mut l, &[0, 0, 0]), 1);
        assert_eq!(l[0], 1.5, "penalty applied once per distinct id");
        // negative logits are multiplied
        let mut l = vec![-1.0, -1.5, -3.0];
        assert_eq!(s.sample(&mut l, &[0, 99_999]), 1);
        assert_eq!(l[0], -2.0);
        // without history nothing changes
        let mut l = vec![3.0, 2.0];
        assert_eq!(s.sample(&mut l, &[]), 0);
    }

    #[test]
    fn nan_and_degenerate_logits_do_not_panic() {
        let mut g = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(g.sample(&mut [f32::NAN, 1.0, f32::NAN, 0.5], &[]), 1);
        assert_eq!(g.sample(&mut [], &[]), 0);
        let mut s = Sampler::new(params(0.8, 2, 0.9, 3)).unwrap();
        for _ in 0..50 {
            let t = s.sample(&mut [f32::NAN, 1.0, f32::NAN, 0.9], &[0, 7]);
            assert!(t == 1 || t == 3);
        }
        assert_eq!(s.sample(&mut [f32::NAN; 4], &[]), 0);
        assert_eq!(
            s.sample(&mut [f32::NEG_INFINITY, f32::NEG_INFINITY], &[]),
            0
        );
        assert_eq!(s.sample(&mut [0.0, f32::INFINITY, 1.0], &[]), 1);
    }

    #[test]
    fn validate_rejects_bad_values() {
        let bad = [
            (
                SamplingParams {
                    temperature: -0.1,
                    ..Default::default()
                },
                "--temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::NAN,
                    ..Default::default()
                },
                "--temperature",
            ),
            (
                SamplingParams {
                    temperature: f32::INFINITY,
                    ..Default::default()
                },
                "--temperature",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..Default::default()
                },
                "--top-p",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..Default::default()
                },
                "--top-p",
            ),
            (
                SamplingParams {
                    top_p: f32::NAN,
                    ..Default::default()
                },
                "--top-p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..Default::default()
                },
                "--repetition-penalty",
            ),
            (
                SamplingParams {
                    repetition_penalty: f32::NAN,
                    ..Default::default()
                },
                "--repetition-penalty",
            ),
        ];
        for (p, flag) in bad {
            let e = p.validate().unwrap_err().to_string();
            assert!(e.contains(flag), "{e}");
            assert!(Sampler::new(p).is_err());
        }
        assert!(SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            repetition_penalty: 1.1,
            seed: 5
        }
        .validate()
        .is_ok());
    }
}
