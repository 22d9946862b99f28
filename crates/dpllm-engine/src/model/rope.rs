//! Rotary position embeddings (Hugging Face "rotate_half" layout), with the
//! linear and Llama 3.1 frequency scalings: the frequencies of a model and the
//! cos/sin table the backends' RoPE kernels read.

use dpllm_format::{ModelConfig, RopeScaling};

use crate::backend::cpu::rope::rope_apply;

/// Precomputed RoPE frequencies for one model.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f64>,
    head_dim: usize,
    rot_dim: usize,
}

impl Rope {
    /// Frequencies for the model's config (computed in f64).
    pub fn new(cfg: &ModelConfig) -> Rope {
        let rot_dim = cfg.rotary_dim();
        let base = cfg.rope.theta;
        let mut inv_freq: Vec<f64> = (0..rot_dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f64 / rot_dim as f64))
            .collect();
        match cfg.rope.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f64::consts::PI / *f;
                    if wavelen > low_wavelen {
                        *f /= factor;
                    } else if wavelen >= high_wavelen {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        *f = (1.0 - smooth) * *f / factor + smooth * *f;
                    }
                }
            }
        }
        Rope {
            inv_freq,
            head_dim: cfg.head_dim,
            rot_dim,
        }
    }

    /// Dimensions rotated per head.
    pub fn rot_dim(&self) -> usize {
        self.rot_dim
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// cos/sin of positions `pos0..pos0 + n`: per position, rot_dim/2 cosines then
    /// rot_dim/2 sines (angles in f64, rounded once to f32).
    pub fn table(&self, pos0: usize, n: usize) -> Vec<f32> {
        let half = self.rot_dim / 2;
        let mut t = vec![0f32; n * self.rot_dim];
        for (i, row) in t.chunks_mut(self.rot_dim.max(1)).enumerate().take(n) {
            let pos = (pos0 + i) as f64;
            for (j, f) in self.inv_freq.iter().enumerate() {
                let a = pos * f;
                row[j] = a.cos() as f32;
                row[half + j] = a.sin() as f32;
            }
        }
        t
    }

    /// Rotate `x` [n × heads × head_dim] in place; token t sits at position `pos0 + t`.
    pub fn apply(&self, x: &mut [f32], heads: usize, pos0: usize) {
        self.rotate(x, heads, pos0, false)
    }

    /// The inverse rotation (by −angle) of `x` [n × heads × head_dim], i.e. the
    /// transpose of [`Rope::apply`]: back-propagates a gradient through RoPE.
    pub fn apply_inverse(&self, x: &mut [f32], heads: usize, pos0: usize) {
        self.rotate(x, heads, pos0, true)
    }

    fn rotate(&self, x: &mut [f32], heads: usize, pos0: usize, inverse: bool) {
        let n = x.len() / (heads * self.head_dim).max(1);
        let table = self.table(pos0, n);
        rope_apply(x, heads, self.head_dim, self.rot_dim, 0, &table, inverse);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(extra: &str) -> ModelConfig {
        let s = format!(
            r#"{{"architectures":["LlamaForCausalLM"],"hidden_size":32,"intermediate_size":8,"num_hidden_layers":1,
            "num_attention_heads":2,"vocab_size":10{extra}}}"#
        );
        ModelConfig::from_json_str(&s, Path::new("c")).unwrap()
    }

    #[test]
    fn position_zero_is_identity_and_norm_is_preserved() {
        let r = Rope::new(&cfg(""));
        let orig: Vec<f32> = (0..32).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut x = orig.clone();
        r.apply(&mut x, 2, 0);
        assert_eq!(x, orig);
        r.apply(&mut x, 2, 1234);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-4);
    }

    #[test]
    fn relative_position_property() {
        // <R(p)q, R(p+d)k> depends only on d.
        let r = Rope::new(&cfg(r#","rope_theta":100.0"#));
        let q: Vec<f32> = (0..16).map(|i| (i as f32).cos()).collect();
        let k: Vec<f32> = (0..16).map(|i| (i as f32 * 0.5).sin()).collect();
        let score = |p: usize, d: usize| {
            let (mut a, mut b) = (q.clone(), k.clone());
            let r1 = Rope {
                head_dim: 16,
                ..r.clone()
            };
            r1.apply(&mut a, 1, p);
            r1.apply(&mut b, 1, p + d);
            a.iter().zip(&b).map(|(x, y)| x * y).sum::<f32>()
        };
        assert!((score(3, 5) - score(40, 5)).abs() < 1e-4);
    }

    #[test]
    fn llama3_scaling_bands() {
        let c = cfg(
            r#","rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":64}"#,
        );
        let plain = Rope::new(&cfg(r#","rope_theta":500000.0"#));
        let scaled = Rope::new(&c);
        // Highest frequency (short wavelength) untouched, lowest divided by the factor.
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((plain.inv_freq[last] / 8.0 - scaled.inv_freq[last]).abs() < 1e-15);
    }
}
