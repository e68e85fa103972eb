//! Rotary position embedding, Hugging Face "rotate half" layout: dimension `i` pairs with
//! `i + head_dim/2`.

/// How the inverse frequencies are scaled (`rope_scaling` / `rope_parameters` in config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3's smooth per-frequency scaling.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: f32 },
}

/// The inverse frequencies of one model: `head_dim / 2` values.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[head_dim / 2]`
    pub inv_freq: Vec<f32>,
    /// Per-head dimension.
    pub head_dim: usize,
}

impl Rope {
    /// Builds the table as transformers does, in f32.
    pub fn new(head_dim: usize, theta: f32, scaling: &RopeScaling) -> Rope {
        let half = head_dim / 2;
        let mut inv: Vec<f32> = (0..half)
            .map(|i| {
                let e = (2 * i) as f32 / head_dim as f32;
                1.0 / theta.powf(e)
            })
            .collect();
        match *scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen { *f / factor } else { *f };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    *f = if medium {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Rope { inv_freq: inv, head_dim }
    }

    /// Rotates every head of `x` (`[heads, head_dim]`) for position `pos`, in place.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let half = self.head_dim / 2;
        let (mut cos, mut sin) = ([0f32; 256], [0f32; 256]);
        for i in 0..half {
            let a = pos as f32 * self.inv_freq[i];
            cos[i] = a.cos();
            sin[i] = a.sin();
        }
        for head in x.chunks_exact_mut(self.head_dim) {
            for i in 0..half {
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * cos[i] - x2 * sin[i];
                head[i + half] = x2 * cos[i] + x1 * sin[i];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn position_zero_is_identity_and_rotation_keeps_norm() {
        let r = Rope::new(8, 10000.0, &RopeScaling::Default);
        let mut x = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let orig = x;
        r.apply(&mut x, 0);
        assert_eq!(x, orig);
        r.apply(&mut x, 17);
        let n0: f32 = orig.iter().map(|v| v * v).sum();
        let n1: f32 = x.iter().map(|v| v * v).sum();
        assert!((n0 - n1).abs() < 1e-3);
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let plain = Rope::new(128, 500000.0, &RopeScaling::Default);
        let s = Rope::new(
            128,
            500000.0,
            &RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            },
        );
        assert_eq!(s.inv_freq[0], plain.inv_freq[0]);
        assert!((s.inv_freq[63] - plain.inv_freq[63] / 8.0).abs() < 1e-12);
    }
}
