//! Causal grouped-query attention of a block of new tokens over one sequence's KV cache.
//!
//! Fused per head: scores, a numerically stable softmax in f32 and the weighted sum of values
//! in one pass over the cache. Query head `h` reads KV head `h / (heads / kv_heads)`.

use crate::par::{Parallel, SharedMut};

/// Shapes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (divides `heads`).
    pub kv_heads: usize,
    /// Dimension of one head.
    pub head_dim: usize,
}

/// `q`: `[new, heads*head_dim]` (rotated); `k`, `v`: `[past+new, kv_heads*head_dim]` (the cache,
/// already holding the new tokens); new token `j` sits at position `past + j` and sees
/// positions `0..=past+j` — or, with a sliding `window`, only those after `past + j - window`.
/// Writes `out`: `[new, heads*head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    past: usize,
    window: Option<usize>,
    s: AttnShape,
    out: &mut [f32],
    par: &dyn Parallel,
) {
    let (hd, qd, kvd) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let new = q.len() / qd;
    let ctx = past + new;
    assert!(k.len() >= ctx * kvd && v.len() >= ctx * kvd && out.len() == new * qd, "attention shapes");
    let group = s.heads / s.kv_heads;
    let scale = 1.0 / (hd as f32).sqrt();
    let op = SharedMut(out.as_mut_ptr());
    let tasks = s.heads * new;
    par.run(tasks.min(par.threads() * 8).max(1), &|task| {
        let range = crate::par::split_range(tasks, tasks.min(par.threads() * 8).max(1), 1, task);
        let mut scores = vec![0f32; ctx];
        for item in range {
            let (j, h) = (item / s.heads, item % s.heads);
            let kvh = h / group;
            let qv = &q[j * qd + h * hd..j * qd + (h + 1) * hd];
            let seen = past + j + 1;
            let first = window.map_or(0, |w| seen.saturating_sub(w));
            let mut max = f32::NEG_INFINITY;
            for (p, sc) in scores.iter_mut().enumerate().take(seen).skip(first) {
                let kr = &k[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd];
                *sc = crate::matmul::dot_portable(qv, kr) * scale;
                max = max.max(*sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut().take(seen).skip(first) {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            // SAFETY: each (token, head) pair writes its own head_dim slice of `out`.
            let o = unsafe { op.slice(j * qd + h * hd, hd) };
            o.fill(0.0);
            for (p, sc) in scores.iter().enumerate().take(seen).skip(first) {
                let w = sc / sum;
                let vr = &v[p * kvd + kvh * hd..p * kvd + (kvh + 1) * hd];
                for (ov, vv) in o.iter_mut().zip(vr) {
                    *ov += w * vv;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Serial;

    #[test]
    fn single_position_returns_its_value_and_equal_keys_average() {
        let s = AttnShape { heads: 2, kv_heads: 1, head_dim: 2 };
        let q = [1.0f32, 0.0, 0.0, 1.0];
        let k = [0.5f32, 0.5];
        let v = [3.0f32, -1.0];
        let mut out = [0f32; 4];
        attend(&q, &k, &v, 0, None, s, &mut out, &Serial);
        assert_eq!(out, [3.0, -1.0, 3.0, -1.0]);
        // Two cached positions with equal keys: the new token averages their values.
        let k2 = [1.0f32, 1.0, 1.0, 1.0];
        let v2 = [2.0f32, 0.0, 4.0, 2.0];
        let mut out1 = [0f32; 4];
        attend(&q, &k2, &v2, 1, None, s, &mut out1, &Serial);
        assert_eq!(out1, [3.0, 1.0, 3.0, 1.0]);
        // A window of 1 sees only the token itself.
        attend(&q, &k2, &v2, 1, Some(1), s, &mut out1, &Serial);
        assert_eq!(out1, [4.0, 2.0, 4.0, 2.0]);
    }
}
