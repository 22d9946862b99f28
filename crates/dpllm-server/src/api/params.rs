//! A request's fields checked and turned into what the scheduler runs
//! ([`GenParams`]); every value out of range is a 400 naming its field.

use dpllm_engine::sampler::SamplingParams;

use super::request::{CommonParams, DpllmOptions, Stop};
use crate::config::Limits;
use crate::error::ApiError;
use crate::scheduler::{GenParams, OperatingPoint};

/// At most this many stop strings (OpenAI's limit).
const MAX_STOPS: usize = 4;

/// The operating point `o` asks for: exactly one of its fields, in range.
pub fn operating_point(o: Option<&DpllmOptions>) -> Result<OperatingPoint, ApiError> {
    let Some(o) = o else {
        return Ok(OperatingPoint::Default);
    };
    let set = [
        o.target_bits.is_some(),
        o.bits.is_some(),
        o.max_ms_per_token.is_some(),
    ];
    match set.iter().filter(|&&s| s).count() {
        1 => {}
        0 => {
            return Err(ApiError::invalid(
                "dpllm",
                "dpllm needs one of target_bits, bits or max_ms_per_token",
            ))
        }
        _ => {
            return Err(ApiError::invalid(
                "dpllm",
                "dpllm takes only one of target_bits, bits or max_ms_per_token",
            ))
        }
    }
    if let Some(t) = o.target_bits {
        if !(t.is_finite() && (3.0..=8.0).contains(&t)) {
            return Err(ApiError::invalid(
                "dpllm.target_bits",
                format!("dpllm.target_bits must be in 3..=8, got {t}"),
            ));
        }
        return Ok(OperatingPoint::Target(t));
    }
    if let Some(b) = o.bits {
        if !(3..=8).contains(&b) {
            return Err(ApiError::invalid(
                "dpllm.bits",
                format!("dpllm.bits must be in 3..=8, got {b}"),
            ));
        }
        return Ok(OperatingPoint::Bits(b));
    }
    let ms = o.max_ms_per_token.unwrap_or_default();
    if !(ms.is_finite() && ms > 0.0) {
        return Err(ApiError::invalid(
            "dpllm.max_ms_per_token",
            format!("dpllm.max_ms_per_token must be a positive number, got {ms}"),
        ));
    }
    Ok(OperatingPoint::Latency(ms))
}

/// `p` checked against `limits`.
pub fn gen_params(p: &CommonParams, limits: &Limits) -> Result<GenParams, ApiError> {
    if let Some(n) = p.n {
        if n != 1 {
            return Err(ApiError::invalid(
                "n",
                format!("only n = 1 is supported, got {n}"),
            ));
        }
    }
    for (name, v) in [
        ("presence_penalty", p.presence_penalty),
        ("frequency_penalty", p.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(
                name,
                format!("{name} is not supported (only 0)"),
            ));
        }
    }
    if p.logprobs
        .as_ref()
        .is_some_and(|v| !matches!(v, serde_json::Value::Null | serde_json::Value::Bool(false)))
    {
        return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
    }
    let max_tokens = match (p.max_completion_tokens, p.max_tokens) {
        (Some(m), _) | (None, Some(m)) => m,
        (None, None) => limits.default_max_tokens.min(limits.max_tokens) as u64,
    };
    if max_tokens == 0 || max_tokens > limits.max_tokens as u64 {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "max_tokens must be in 1..={}, got {max_tokens}",
                limits.max_tokens
            ),
        ));
    }
    let temperature = p.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be in 0..=2, got {temperature}"),
        ));
    }
    let top_p = p.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let stop = match &p.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOPS {
        return Err(ApiError::invalid(
            "stop",
            format!("at most {MAX_STOPS} stop strings, got {}", stop.len()),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    let mut logit_bias = Vec::new();
    for (k, &v) in p.logit_bias.iter().flatten() {
        let id: u32 = k.parse().map_err(|_| {
            ApiError::invalid(
                "logit_bias",
                format!("logit_bias keys are token ids, got {k:?}"),
            )
        })?;
        if !(v.is_finite() && (-100.0..=100.0).contains(&v)) {
            return Err(ApiError::invalid(
                "logit_bias",
                format!("logit_bias values must be in -100..=100, got {v} for token {id}"),
            ));
        }
        logit_bias.push((id, v as f32));
    }
    logit_bias.sort_by_key(|&(id, _)| id);
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        seed: p.seed.unwrap_or_else(rand::random),
        ..SamplingParams::default()
    };
    Ok(GenParams {
        max_tokens: max_tokens as usize,
        sampling,
        stop,
        logit_bias,
        point: operating_point(p.dpllm.as_ref())?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> Result<GenParams, ApiError> {
        let p: CommonParams = serde_json::from_str(json).unwrap();
        gen_params(&p, &Limits::default())
    }

    fn refused(json: &str, param: &str) {
        let e = params(json).expect_err(json);
        assert_eq!(e.status, 400, "{json}");
        assert_eq!(e.param.as_deref(), Some(param), "{json}: {e}");
    }

    #[test]
    fn defaults_follow_openai() {
        let p = params("{}").unwrap();
        assert_eq!(p.max_tokens, Limits::default().default_max_tokens);
        assert_eq!(p.sampling.temperature, 1.0);
        assert_eq!(p.sampling.top_p, 1.0);
        assert!(p.stop.is_empty());
        assert_eq!(p.point, OperatingPoint::Default);
        let p = params(r#"{"max_tokens": 7, "max_completion_tokens": 5, "seed": 3, "stop": "x"}"#)
            .unwrap();
        assert_eq!((p.max_tokens, p.sampling.seed), (5, 3));
        assert_eq!(p.stop, ["x"]);
        let p = params(r#"{"logit_bias": {"9": -100, "2": 0.5}}"#).unwrap();
        assert_eq!(p.logit_bias, [(2, 0.5), (9, -100.0)]);
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        refused(r#"{"max_tokens": 0}"#, "max_tokens");
        refused(r#"{"max_tokens": 1000000}"#, "max_tokens");
        refused(r#"{"temperature": 2.5}"#, "temperature");
        refused(r#"{"temperature": -1}"#, "temperature");
        refused(r#"{"top_p": 0}"#, "top_p");
        refused(r#"{"top_p": 1.5}"#, "top_p");
        refused(r#"{"n": 2}"#, "n");
        refused(r#"{"stop": ["a", "b", "c", "d", "e"]}"#, "stop");
        refused(r#"{"stop": [""]}"#, "stop");
        refused(r#"{"presence_penalty": 0.5}"#, "presence_penalty");
        refused(r#"{"logprobs": true}"#, "logprobs");
        refused(r#"{"logit_bias": {"x": 1}}"#, "logit_bias");
        refused(r#"{"logit_bias": {"5": 101}}"#, "logit_bias");
        refused(r#"{"dpllm": {}}"#, "dpllm");
        refused(r#"{"dpllm": {"bits": 4, "target_bits": 4}}"#, "dpllm");
        refused(r#"{"dpllm": {"bits": 9}}"#, "dpllm.bits");
        refused(r#"{"dpllm": {"target_bits": 2.5}}"#, "dpllm.target_bits");
        refused(
            r#"{"dpllm": {"max_ms_per_token": 0}}"#,
            "dpllm.max_ms_per_token",
        );
    }

    #[test]
    fn operating_points() {
        let p = |j: &str| params(j).unwrap().point;
        assert_eq!(p(r#"{"dpllm": {"bits": 4}}"#), OperatingPoint::Bits(4));
        assert_eq!(
            p(r#"{"dpllm": {"target_bits": 3.5}}"#),
            OperatingPoint::Target(3.5)
        );
        assert_eq!(
            p(r#"{"dpllm": {"max_ms_per_token": 20}}"#),
            OperatingPoint::Latency(20.0)
        );
        assert!(serde_json::from_str::<CommonParams>(r#"{"dpllm": {"bitz": 4}}"#).is_err());
    }
}
