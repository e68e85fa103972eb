//! Causal grouped-query attention of blocks of new tokens over their sequences' KV caches.
//!
//! Fused and single-pass: each (token, query head) keeps a running maximum, a running sum and
//! a running weighted sum of values while it walks the cache one block of positions at a time
//! (the "online" softmax: when a block raises the maximum, what was summed so far is scaled
//! down by `exp(old - new)`), so scores are never stored for the whole context and no pass
//! re-reads the cache. All arithmetic is f32; the cache may hold f32, bf16 or f16.
//!
//! One call serves a whole batch: sequences of different lengths, each with any number of new
//! tokens (one when decoding, a block of the prompt when prefilling). Work is cut into tasks of
//! (sequence, KV head, a few new tokens); a task handles every query head that shares its KV
//! head, so each cache block is widened to f32 once and used by `heads / kv_heads` × tokens
//! rows while it sits in L1.

use crate::isa::{self, Isa};
use crate::par::{Parallel, SharedMut};
use std::cell::RefCell;

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

/// Element type of a KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KvType {
    F32,
    Bf16,
    F16,
}

impl KvType {
    /// Every type, in the order `parse` lists them.
    pub const ALL: [KvType; 3] = [KvType::F32, KvType::Bf16, KvType::F16];
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvType::F32 => 4,
            KvType::Bf16 | KvType::F16 => 2,
        }
    }
    /// `f32`, `bf16` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            KvType::F32 => "f32",
            KvType::Bf16 => "bf16",
            KvType::F16 => "f16",
        }
    }
    /// The type named `s`, if any.
    pub fn parse(s: &str) -> Option<KvType> {
        KvType::ALL.into_iter().find(|t| t.name() == s)
    }
}

/// The blocks of one sequence's KV cache, as stored.
#[derive(Clone, Copy)]
pub enum KvData<'a> {
    F32(&'a [&'a [f32]]),
    /// bfloat16 bit patterns.
    Bf16(&'a [&'a [u16]]),
    /// IEEE half-precision bit patterns.
    F16(&'a [&'a [u16]]),
}

impl KvData<'_> {
    fn blocks(&self) -> usize {
        match self {
            KvData::F32(b) => b.len(),
            KvData::Bf16(b) | KvData::F16(b) => b.len(),
        }
    }
    fn block_len(&self, b: usize) -> usize {
        match self {
            KvData::F32(x) => x[b].len(),
            KvData::Bf16(x) | KvData::F16(x) => x[b].len(),
        }
    }
}

/// One sequence's KV cache in fixed-size blocks: block `b` holds positions
/// `b*block_tokens .. (b+1)*block_tokens`, their keys first (`[block_tokens, kv_heads*head_dim]`)
/// then their values (same shape). Blocks come from a pool one at a time as the sequence
/// grows, so a cache never needs one large contiguous allocation (nor a copy to grow).
#[derive(Clone, Copy)]
pub struct KvBlocks<'a> {
    pub data: KvData<'a>,
    pub block_tokens: usize,
}

impl KvBlocks<'_> {
    /// Elements in one block for `kv_dim` = kv_heads·head_dim.
    pub fn block_len(block_tokens: usize, kv_dim: usize) -> usize {
        2 * block_tokens * kv_dim
    }
}

/// Writes one position's keys or values (`src`, f32) into a cache block's elements `dst` of
/// type `ty` (bf16 and f16 round to nearest even). `dst` holds `src.len()` elements of `ty`:
/// `&mut [f32]` for f32, `&mut [u16]` bit patterns otherwise — passed as [`KvRowMut`].
pub fn store_row(src: &[f32], dst: KvRowMut) {
    match dst {
        KvRowMut::F32(d) => d.copy_from_slice(src),
        KvRowMut::Bf16(d) => d.iter_mut().zip(src).for_each(|(d, s)| *d = half::bf16::from_f32(*s).to_bits()),
        KvRowMut::F16(d) => d.iter_mut().zip(src).for_each(|(d, s)| *d = half::f16::from_f32(*s).to_bits()),
    }
}

/// A destination for [`store_row`].
pub enum KvRowMut<'a> {
    F32(&'a mut [f32]),
    Bf16(&'a mut [u16]),
    F16(&'a mut [u16]),
}

/// One sequence of a batched attention call.
#[derive(Clone, Copy)]
pub struct SeqAttn<'a> {
    /// Its first new token's row in `q` and `out`.
    pub row: usize,
    /// New tokens (rows `row .. row + new`).
    pub new: usize,
    /// Positions cached before them: new token `j` sits at position `past + j`.
    pub past: usize,
    /// The cache, already holding the new tokens (`past + new` positions).
    pub kv: KvBlocks<'a>,
}

/// `q`: `[tokens, heads*head_dim]` (rotated), the new tokens of every sequence in `seqs`, each
/// at its `row`. New token `j` of a sequence sits at position `past + j` and sees positions
/// `0..=past+j` — or, with a sliding `window`, only those after `past + j - window`.
/// Writes each sequence's rows of `out` (`[tokens, heads*head_dim]`); other rows are untouched.
pub fn attend_batch(
    q: &[f32],
    seqs: &[SeqAttn],
    window: Option<usize>,
    s: AttnShape,
    out: &mut [f32],
    par: &dyn Parallel,
) {
    attend_batch_with(isa::detected(), q, seqs, window, s, out, par)
}

/// [`attend_batch`] on a given instruction-set path (for tests and benchmarks).
pub fn attend_batch_with(
    isa: Isa,
    q: &[f32],
    seqs: &[SeqAttn],
    window: Option<usize>,
    s: AttnShape,
    out: &mut [f32],
    par: &dyn Parallel,
) {
    let (qd, kvd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
    assert!(s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads) && q.len() == out.len() && q.len().is_multiple_of(qd));
    for sq in seqs {
        let bt = sq.kv.block_tokens;
        let d = sq.kv.data;
        assert!(
            bt > 0
                && d.blocks() * bt >= sq.past + sq.new
                && (0..d.blocks()).all(|b| d.block_len(b) >= KvBlocks::block_len(bt, kvd))
                && (sq.row + sq.new) * qd <= q.len(),
            "attention shapes"
        );
    }
    let group = s.heads / s.kv_heads;
    // Tokens per task: enough rows (tokens × the heads of a group) to reuse each widened
    // block, few enough that a long prompt still makes many tasks.
    let per_task = (32 / group).max(1);
    let mut tasks: Vec<Task> = Vec::new();
    for (i, sq) in seqs.iter().enumerate() {
        for t0 in (0..sq.new).step_by(per_task) {
            let t1 = (t0 + per_task).min(sq.new);
            for kvh in 0..s.kv_heads {
                tasks.push(Task { seq: i, t0, t1, kvh });
            }
        }
    }
    // Longest first: the last tokens of a prompt see the most positions.
    tasks.sort_by_key(|t| std::cmp::Reverse((seqs[t.seq].past + t.t1) * (t.t1 - t.t0)));
    let op = SharedMut(out.as_mut_ptr());
    let fast = matches!(isa, Isa::Avx2 | Isa::Avx512) && s.head_dim.is_multiple_of(8);
    par.run(tasks.len(), &|i| {
        SCRATCH.with(|sc| {
            let sc = &mut *sc.borrow_mut();
            // SAFETY: a task writes the rows of its own (sequence, tokens, KV head's query
            // heads), which no other task writes; `fast` implies AVX2, FMA and F16C.
            unsafe { run_task(&tasks[i], q, &seqs[tasks[i].seq], window, s, op, fast, sc) }
        })
    });
}

struct Task {
    seq: usize,
    t0: usize,
    t1: usize,
    kvh: usize,
}

#[derive(Default)]
struct Scratch {
    q: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    s: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::default();
}

fn grow(v: &mut Vec<f32>, n: usize, fill: f32) {
    v.clear();
    v.resize(n, fill);
}

/// Widens `n` rows of `hd` elements, `stride` apart, starting at element `at` of block `b`,
/// into `out` (`[n, hd]`). `fast`: AVX2 and F16C are present and `hd` is a multiple of 8.
#[allow(clippy::too_many_arguments)]
unsafe fn widen(d: KvData, b: usize, at: usize, stride: usize, n: usize, hd: usize, out: &mut [f32], fast: bool) {
    let rows = |r: usize| (at + r * stride..at + r * stride + hd, r * hd..(r + 1) * hd);
    match d {
        KvData::F32(x) => (0..n).map(rows).for_each(|(s, o)| out[o].copy_from_slice(&x[b][s])),
        KvData::Bf16(x) | KvData::F16(x) => {
            let f16 = matches!(d, KvData::F16(_));
            #[cfg(target_arch = "x86_64")]
            if fast {
                return avx2::widen_rows(x[b][at..].as_ptr(), stride, n, hd, out, f16);
            }
            let _ = fast;
            for (s, o) in (0..n).map(rows) {
                for (o, s) in out[o].iter_mut().zip(&x[b][s]) {
                    *o = if f16 { half::f16::from_bits(*s).to_f32() } else { crate::matmul::bf16_to_f32(*s) };
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn run_task(
    t: &Task,
    q: &[f32],
    sq: &SeqAttn,
    window: Option<usize>,
    s: AttnShape,
    out: SharedMut<f32>,
    fast: bool,
    sc: &mut Scratch,
) {
    let (hd, qd, kvd) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let group = s.heads / s.kv_heads;
    let bt = sq.kv.block_tokens;
    let rows = (t.t1 - t.t0) * group;
    // Row r: new token t0 + r / group, query head kvh·group + r % group; q pre-scaled.
    let scale = 1.0 / (hd as f32).sqrt();
    grow(&mut sc.q, rows * hd, 0.0);
    for r in 0..rows {
        let (j, h) = (sq.row + t.t0 + r / group, t.kvh * group + r % group);
        let src = &q[j * qd + h * hd..][..hd];
        sc.q[r * hd..(r + 1) * hd].iter_mut().zip(src).for_each(|(d, x)| *d = x * scale);
    }
    grow(&mut sc.m, rows, f32::NEG_INFINITY);
    grow(&mut sc.l, rows, 0.0);
    grow(&mut sc.acc, rows * hd, 0.0);
    grow(&mut sc.k, bt * hd, 0.0);
    grow(&mut sc.v, bt * hd, 0.0);
    grow(&mut sc.s, bt.next_multiple_of(8), 0.0);
    // Positions row r sees: lo(r)..=pos(r).
    let pos = |tok: usize| sq.past + tok;
    let lo = |tok: usize| window.map_or(0, |w| (pos(tok) + 1).saturating_sub(w));
    let (first, end) = (lo(t.t0), pos(t.t1 - 1) + 1);
    for b in first / bt..end.div_ceil(bt) {
        let (p0, p1) = ((b * bt).max(first), ((b + 1) * bt).min(end));
        let n = p1 - p0;
        let off = p0 - b * bt;
        widen(sq.kv.data, b, off * kvd + t.kvh * hd, kvd, n, hd, &mut sc.k, fast);
        widen(sq.kv.data, b, (bt + off) * kvd + t.kvh * hd, kvd, n, hd, &mut sc.v, fast);
        for r in 0..rows {
            let tok = t.t0 + r / group;
            let (a, z) = (lo(tok).max(p0), (pos(tok) + 1).min(p1));
            if a >= z {
                continue;
            }
            let (ks, vs) = (&sc.k[(a - p0) * hd..(z - p0) * hd], &sc.v[(a - p0) * hd..(z - p0) * hd]);
            let (qr, acc) = (&sc.q[r * hd..(r + 1) * hd], &mut sc.acc[r * hd..(r + 1) * hd]);
            #[cfg(target_arch = "x86_64")]
            if fast {
                avx2::fold(qr, ks, vs, z - a, &mut sc.m[r], &mut sc.l[r], acc, &mut sc.s);
                continue;
            }
            fold_portable(qr, ks, vs, z - a, &mut sc.m[r], &mut sc.l[r], acc, &mut sc.s);
        }
    }
    for r in 0..rows {
        let (j, h) = (sq.row + t.t0 + r / group, t.kvh * group + r % group);
        let o = out.slice(j * qd + h * hd, hd);
        let inv = 1.0 / sc.l[r];
        o.iter_mut().zip(&sc.acc[r * hd..(r + 1) * hd]).for_each(|(o, a)| *o = a * inv);
    }
}

/// Folds `n` positions (keys `k`, values `v`, `[n, hd]`) into one row's running maximum `m`,
/// sum `l` and weighted sum `acc`.
#[allow(clippy::too_many_arguments)]
fn fold_portable(q: &[f32], k: &[f32], v: &[f32], n: usize, m: &mut f32, l: &mut f32, acc: &mut [f32], s: &mut [f32]) {
    let hd = q.len();
    for (i, si) in s.iter_mut().enumerate().take(n) {
        *si = crate::matmul::dot_portable(q, &k[i * hd..(i + 1) * hd]);
    }
    let top = s[..n].iter().fold(*m, |a, &b| a.max(b));
    let corr = (*m - top).exp();
    *m = top;
    *l *= corr;
    acc.iter_mut().for_each(|a| *a *= corr);
    for (i, si) in s.iter().enumerate().take(n) {
        let e = (si - top).exp();
        *l += e;
        acc.iter_mut().zip(&v[i * hd..(i + 1) * hd]).for_each(|(a, x)| *a += e * x);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::matmul::avx2::hsum;
    use std::arch::x86_64::*;

    /// Widens `n` rows of `hd` (a multiple of 8) bf16 or f16 elements, `stride` elements apart.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn widen_rows(src: *const u16, stride: usize, n: usize, hd: usize, out: &mut [f32], f16: bool) {
        for r in 0..n {
            let (s, o) = (src.add(r * stride), out.as_mut_ptr().add(r * hd));
            for c in (0..hd).step_by(8) {
                let h = _mm_loadu_si128(s.add(c) as *const __m128i);
                let x = if f16 {
                    _mm256_cvtph_ps(h)
                } else {
                    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
                };
                _mm256_storeu_ps(o.add(c), x);
            }
        }
    }

    /// `exp(x)` of 8 lanes (Cephes' polynomial, relative error ~2e-7; inputs below -87.3
    /// give ~0, as the callers only pass x ≤ 0).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.376)), _mm256_set1_ps(-87.3));
        let fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E), _mm256_set1_ps(0.5)));
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693_359_4), x);
        let x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.121_944_4e-4), x);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5] {
            y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(c));
        }
        let y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.0));
        let pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }

    /// Scores of 8 consecutive key rows against `q`: lane j = q · k[j].
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot8(q: *const f32, k: *const f32, hd: usize) -> __m256 {
        let mut a = [_mm256_setzero_ps(); 8];
        for c in (0..hd).step_by(8) {
            let qv = _mm256_loadu_ps(q.add(c));
            for (j, aj) in a.iter_mut().enumerate() {
                *aj = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k.add(j * hd + c)), *aj);
            }
        }
        let u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
        let u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
        _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31))
    }

    /// [`super::fold_portable`] with `hd` a multiple of 8; `s` holds at least `n` rounded up
    /// to 8 floats.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn fold(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        m: &mut f32,
        l: &mut f32,
        acc: &mut [f32],
        s: &mut [f32],
    ) {
        let hd = q.len();
        let (qp, kp, vp, sp) = (q.as_ptr(), k.as_ptr(), v.as_ptr(), s.as_mut_ptr());
        let mut i = 0;
        while i + 8 <= n {
            _mm256_storeu_ps(sp.add(i), dot8(qp, kp.add(i * hd), hd));
            i += 8;
        }
        for i in i..n {
            let mut a = _mm256_setzero_ps();
            for c in (0..hd).step_by(8) {
                a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(c)), _mm256_loadu_ps(kp.add(i * hd + c)), a);
            }
            *sp.add(i) = hsum(a);
        }
        let top = s[..n].iter().fold(*m, |a, &b| a.max(b));
        let corr = (*m - top).exp();
        *m = top;
        let topv = _mm256_set1_ps(top);
        let mut sum = 0f32;
        let mut i = 0;
        while i < n {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sp.add(i)), topv));
            _mm256_storeu_ps(sp.add(i), e);
            i += 8;
        }
        for &e in &s[..n] {
            sum += e;
        }
        *l = *l * corr + sum;
        let cv = _mm256_set1_ps(corr);
        let ap = acc.as_mut_ptr();
        for c in (0..hd).step_by(8) {
            let mut a = _mm256_mul_ps(_mm256_loadu_ps(ap.add(c)), cv);
            for i in 0..n {
                a = _mm256_fmadd_ps(_mm256_set1_ps(*sp.add(i)), _mm256_loadu_ps(vp.add(i * hd + c)), a);
            }
            _mm256_storeu_ps(ap.add(c), a);
        }
    }
}

/// The plain definition — every score, then softmax, then the weighted sum — for tests.
pub fn attend_reference(q: &[f32], k: &[f32], v: &[f32], past: usize, window: Option<usize>, s: AttnShape) -> Vec<f32> {
    let (hd, qd, kvd) = (s.head_dim, s.heads * s.head_dim, s.kv_heads * s.head_dim);
    let new = q.len() / qd;
    let mut out = vec![0f32; q.len()];
    for j in 0..new {
        for h in 0..s.heads {
            let kvh = h / (s.heads / s.kv_heads);
            let p = past + j;
            let lo = window.map_or(0, |w| (p + 1).saturating_sub(w));
            let qv = &q[j * qd + h * hd..][..hd];
            let sc: Vec<f64> = (lo..=p)
                .map(|i| {
                    let kr = &k[i * kvd + kvh * hd..][..hd];
                    qv.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() / (hd as f64).sqrt()
                })
                .collect();
            let top = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = sc.iter().map(|x| (x - top).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                let acc: f64 = (lo..=p).zip(&e).map(|(i, w)| w * v[i * kvd + kvh * hd + d] as f64).sum();
                out[j * qd + h * hd + d] = (acc / sum) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Serial;

    /// Lays out `[ctx, kvd]` keys and values as blocks of `bt` positions, in f32.
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

    /// The same cache stored as `ty` (through `store_row`, as the operator writes it).
    fn narrowed(f: &[Vec<f32>], ty: KvType) -> Vec<Vec<u16>> {
        f.iter()
            .map(|b| {
                let mut d = vec![0u16; b.len()];
                match ty {
                    KvType::Bf16 => store_row(b, KvRowMut::Bf16(&mut d)),
                    _ => store_row(b, KvRowMut::F16(&mut d)),
                }
                d
            })
            .collect()
    }

    struct Case {
        s: AttnShape,
        seqs: Vec<(usize, usize)>, // (past, new)
        window: Option<usize>,
        bt: usize,
    }

    fn f(i: usize) -> f32 {
        ((i * 7919 + 13) % 113) as f32 / 56.0 - 1.0
    }

    /// Runs a batched call on `isa` with the cache as `ty`; returns it and the reference, whose
    /// keys and values went through the same rounding.
    fn check(c: &Case, ty: KvType, isa: Isa, seed: usize) -> (Vec<f32>, Vec<f32>) {
        let (qd, kvd) = (c.s.heads * c.s.head_dim, c.s.kv_heads * c.s.head_dim);
        let rows: usize = c.seqs.iter().map(|x| x.1).sum();
        let q: Vec<f32> = (0..rows * qd).map(|i| f(i + seed) * 2.0).collect();
        let round = |x: f32| match ty {
            KvType::F32 => x,
            KvType::Bf16 => half::bf16::from_f32(x).to_f32(),
            KvType::F16 => half::f16::from_f32(x).to_f32(),
        };
        let mut want = vec![0f32; q.len()];
        let mut caches = Vec::new();
        for (i, &(past, new)) in c.seqs.iter().enumerate() {
            let ctx = past + new;
            let k: Vec<f32> = (0..ctx * kvd).map(|j| f(j + 31 * i + seed + 5) * 1.5).collect();
            let v: Vec<f32> = (0..ctx * kvd).map(|j| f(j + 17 * i + seed + 7)).collect();
            caches.push(blocks(&k, &v, kvd, c.bt));
            let (kr, vr): (Vec<f32>, Vec<f32>) =
                (k.iter().map(|&x| round(x)).collect(), v.iter().map(|&x| round(x)).collect());
            let row: usize = c.seqs[..i].iter().map(|x| x.1).sum();
            let r = attend_reference(&q[row * qd..(row + new) * qd], &kr, &vr, past, c.window, c.s);
            want[row * qd..(row + new) * qd].copy_from_slice(&r);
        }
        let narrow: Vec<Vec<Vec<u16>>> = caches.iter().map(|b| narrowed(b, ty)).collect();
        let views32: Vec<Vec<&[f32]>> = caches.iter().map(|b| b.iter().map(|x| x.as_slice()).collect()).collect();
        let views16: Vec<Vec<&[u16]>> = narrow.iter().map(|b| b.iter().map(|x| x.as_slice()).collect()).collect();
        let mut row = 0;
        let seqs: Vec<SeqAttn> = c
            .seqs
            .iter()
            .enumerate()
            .map(|(i, &(past, new))| {
                let data = match ty {
                    KvType::F32 => KvData::F32(&views32[i]),
                    KvType::Bf16 => KvData::Bf16(&views16[i]),
                    KvType::F16 => KvData::F16(&views16[i]),
                };
                let sq = SeqAttn { row, new, past, kv: KvBlocks { data, block_tokens: c.bt } };
                row += new;
                sq
            })
            .collect();
        let mut got = vec![f32::NAN; q.len()];
        attend_batch_with(isa, &q, &seqs, c.window, c.s, &mut got, &Serial);
        (got, want)
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 2e-5 + 2e-5 * w.abs(), "{what}: element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn single_position_returns_its_value_and_equal_keys_average() {
        let s = AttnShape { heads: 2, kv_heads: 1, head_dim: 2 };
        let run = |k: &[f32], v: &[f32], past, window, bt| {
            let owned = blocks(k, v, 2, bt);
            let views: Vec<&[f32]> = owned.iter().map(|b| b.as_slice()).collect();
            let mut out = vec![0f32; 4];
            let kv = KvBlocks { data: KvData::F32(&views), block_tokens: bt };
            attend_batch(&[1.0, 0.0, 0.0, 1.0], &[SeqAttn { row: 0, new: 1, past, kv }], window, s, &mut out, &Serial);
            out
        };
        assert_eq!(run(&[0.5, 0.5], &[3.0, -1.0], 0, None, 4), [3.0, -1.0, 3.0, -1.0]);
        // Two cached positions with equal keys: the new token averages their values — the
        // same whether the positions share a block or not.
        let (k2, v2) = ([1.0f32, 1.0, 1.0, 1.0], [2.0f32, 0.0, 4.0, 2.0]);
        for bt in [1, 2, 16] {
            assert_eq!(run(&k2, &v2, 1, None, bt), [3.0, 1.0, 3.0, 1.0], "block of {bt}");
            // A window of 1 sees only the token itself.
            assert_eq!(run(&k2, &v2, 1, Some(1), bt), [4.0, 2.0, 4.0, 2.0], "block of {bt}");
        }
    }

    #[test]
    fn every_path_matches_the_reference_on_batches_of_uneven_sequences() {
        let shapes = [
            AttnShape { heads: 4, kv_heads: 2, head_dim: 8 },
            AttnShape { heads: 8, kv_heads: 1, head_dim: 16 },
            AttnShape { heads: 3, kv_heads: 3, head_dim: 5 }, // head_dim not a multiple of 8
            AttnShape { heads: 32, kv_heads: 4, head_dim: 64 },
        ];
        // (past, new) per sequence: decode steps, prompt blocks, a prompt after a cache,
        // sequences shorter than a block and longer than several.
        let seqs = vec![(0, 1), (37, 1), (0, 45), (20, 13), (3, 2), (100, 1)];
        for s in shapes {
            for &bt in &[1usize, 7, 16] {
                for window in [None, Some(5), Some(40)] {
                    let c = Case { s, seqs: seqs.clone(), window, bt };
                    for ty in KvType::ALL {
                        for isa in isa::available() {
                            let (got, want) = check(&c, ty, isa, bt);
                            let what = format!("{s:?} block {bt} window {window:?} {} {}", ty.name(), isa.name());
                            assert_close(&got, &want, &what);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn large_scores_stay_finite() {
        // Scores in the thousands: a naive exp overflows; the running maximum keeps it stable.
        let s = AttnShape { heads: 1, kv_heads: 1, head_dim: 8 };
        for isa in isa::available() {
            let (mut q, k, v) = (vec![0f32; 24], vec![0f32; 43 * 8], (0..43 * 8).map(f).collect::<Vec<_>>());
            q.iter_mut().for_each(|x| *x = 900.0);
            let mut k = k;
            k.iter_mut().enumerate().for_each(|(i, x)| *x = (i % 43) as f32 / 10.0);
            let owned = blocks(&k, &v, 8, 16);
            let views: Vec<&[f32]> = owned.iter().map(|b| b.as_slice()).collect();
            let mut got = vec![0f32; 24];
            let kv = KvBlocks { data: KvData::F32(&views), block_tokens: 16 };
            attend_batch_with(isa, &q, &[SeqAttn { row: 0, new: 3, past: 40, kv }], None, s, &mut got, &Serial);
            let want = attend_reference(&q, &k, &v, 40, None, s);
            assert!(got.iter().all(|x| x.is_finite()), "{}", isa.name());
            assert_close(&got, &want, isa.name());
        }
    }

    #[test]
    fn rows_of_other_sequences_are_untouched() {
        let s = AttnShape { heads: 2, kv_heads: 1, head_dim: 8 };
        let (k, v) = (vec![0.5f32; 8], vec![1.0f32; 8]);
        let owned = blocks(&k, &v, 8, 16);
        let views: Vec<&[f32]> = owned.iter().map(|b| b.as_slice()).collect();
        let kv = KvBlocks { data: KvData::F32(&views), block_tokens: 16 };
        let q = vec![1.0f32; 3 * 16];
        let mut out = vec![-7.0f32; 3 * 16];
        attend_batch(&q, &[SeqAttn { row: 1, new: 1, past: 0, kv }], None, s, &mut out, &Serial);
        assert!(out[..16].iter().chain(&out[32..]).all(|&x| x == -7.0));
        assert!(out[16..32].iter().all(|&x| x == 1.0));
    }
}
