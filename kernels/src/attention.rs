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

/// One sequence's KV cache in fixed-size blocks: block `b` holds positions
/// `b*block_tokens .. (b+1)*block_tokens`, their keys first (`[block_tokens, kv_heads*head_dim]`)
/// then their values (same shape). Blocks come from a pool one at a time as the sequence
/// grows, so a cache never needs one large contiguous allocation (nor a copy to grow).
#[derive(Clone, Copy)]
pub struct KvBlocks<'a> {
    pub blocks: &'a [&'a [f32]],
    pub block_tokens: usize,
}

impl KvBlocks<'_> {
    /// Floats in one block for `kv_dim` = kv_heads·head_dim.
    pub fn block_len(block_tokens: usize, kv_dim: usize) -> usize {
        2 * block_tokens * kv_dim
    }
}

/// `q`: `[new, heads*head_dim]` (rotated); `kv`: the cache, already holding the new tokens
/// (`past + new` positions); new token `j` sits at position `past + j` and sees positions
/// `0..=past+j` — or, with a sliding `window`, only those after `past + j - window`.
/// Writes `out`: `[new, heads*head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn attend(
    q: &[f32],
    kv: KvBlocks,
    past: usize,
    window: Option<usize>,
    s: AttnShape,
    out: &mut [f32],
    par: &dyn Parallel,
) {
    let (hd, qd, kvd) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let new = q.len() / qd;
    let ctx = past + new;
    let bt = kv.block_tokens;
    assert!(
        bt > 0
            && kv.blocks.len() * bt >= ctx
            && kv.blocks.iter().all(|b| b.len() >= KvBlocks::block_len(bt, kvd))
            && out.len() == new * qd,
        "attention shapes"
    );
    // Key and value rows of position p, head kvh.
    let key = |p: usize, kvh: usize| &kv.blocks[p / bt][(p % bt) * kvd + kvh * hd..][..hd];
    let value = |p: usize, kvh: usize| &kv.blocks[p / bt][(bt + p % bt) * kvd + kvh * hd..][..hd];
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
                *sc = crate::matmul::dot_portable(qv, key(p, kvh)) * scale;
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
                for (ov, vv) in o.iter_mut().zip(value(p, kvh)) {
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

    /// Lays out `[ctx, kvd]` keys and values as blocks of `bt` positions.
    fn blocks(k: &[f32], v: &[f32], kvd: usize, bt: usize) -> Vec<Vec<f32>> {
        let ctx = k.len() / kvd;
        (0..ctx.div_ceil(bt))
            .map(|b| {
                let mut blk = vec![0f32; KvBlocks::block_len(bt, kvd)];
                for r in 0..bt.min(ctx - b * bt) {
                    let p = b * bt + r;
                    blk[r * kvd..(r + 1) * kvd].copy_from_slice(&k[p * kvd..(p + 1) * kvd]);
                    blk[(bt + r) * kvd..(bt + r + 1) * kvd].copy_from_slice(&v[p * kvd..(p + 1) * kvd]);
                }
                blk
            })
            .collect()
    }

    fn run(q: &[f32], k: &[f32], v: &[f32], past: usize, window: Option<usize>, s: AttnShape, bt: usize) -> Vec<f32> {
        let owned = blocks(k, v, s.kv_heads * s.head_dim, bt);
        let views: Vec<&[f32]> = owned.iter().map(|b| b.as_slice()).collect();
        let mut out = vec![0f32; q.len()];
        attend(q, KvBlocks { blocks: &views, block_tokens: bt }, past, window, s, &mut out, &Serial);
        out
    }

    #[test]
    fn single_position_returns_its_value_and_equal_keys_average() {
        let s = AttnShape { heads: 2, kv_heads: 1, head_dim: 2 };
        let q = [1.0f32, 0.0, 0.0, 1.0];
        assert_eq!(run(&q, &[0.5, 0.5], &[3.0, -1.0], 0, None, s, 4), [3.0, -1.0, 3.0, -1.0]);
        // Two cached positions with equal keys: the new token averages their values — the
        // same whether the positions share a block or not.
        let (k2, v2) = ([1.0f32, 1.0, 1.0, 1.0], [2.0f32, 0.0, 4.0, 2.0]);
        for bt in [1, 2, 16] {
            assert_eq!(run(&q, &k2, &v2, 1, None, s, bt), [3.0, 1.0, 3.0, 1.0], "block of {bt}");
            // A window of 1 sees only the token itself.
            assert_eq!(run(&q, &k2, &v2, 1, Some(1), s, bt), [4.0, 2.0, 4.0, 2.0], "block of {bt}");
        }
    }

    #[test]
    fn block_size_does_not_change_the_result() {
        let s = AttnShape { heads: 4, kv_heads: 2, head_dim: 8 };
        let (ctx, new) = (37, 5);
        let f = |i: usize| (i * 7919 % 113) as f32 / 56.0 - 1.0;
        let k: Vec<f32> = (0..ctx * 16).map(f).collect();
        let v: Vec<f32> = (0..ctx * 16).map(|i| f(i + 5)).collect();
        let q: Vec<f32> = (0..new * 32).map(|i| f(i + 11)).collect();
        let whole = run(&q, &k, &v, ctx - new, None, s, ctx);
        for bt in [1, 3, 16] {
            let paged = run(&q, &k, &v, ctx - new, None, s, bt);
            assert_eq!(paged, whole, "block of {bt}");
        }
    }
}
