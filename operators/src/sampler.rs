//! Sampler: chooses the next token of every sequence from its last row of logits.
//!
//! Greedy (temperature 0; ties go to the lowest id), or temperature with top-k and top-p, from
//! a random stream seeded by the request's seed and the position of the token drawn — no
//! state kept between passes, so a seed reproduces a sample wherever each token is drawn (a
//! prefill worker draws the first, a decode worker the rest: the same tokens as one worker).
//!
//! Port: `logits` `[rows, vocab]` f32 (rows per [`crate::Batch::logit_rows`]).
//! Output: `tokens` — a `Sampled` packet, carrying the logits when a sequence asked for them.

use crate::spec::{int, Carries, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{Batch, LogitsWanted, Packet, Sampling};
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, Step};

/// A sampler node: `sampler vocab=…`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub vocab: usize,
}

impl OpSpec for Spec {
    const KIND: &'static str = "sampler";
    fn from_params(p: &mut Params) -> Spec {
        Spec { vocab: p.usize("vocab") }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        vec![("vocab", int(self.vocab))]
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port::act("logits", self.vocab)]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::of("tokens", Carries::Tokens)]
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(Sampler::new(self.vocab))
    }
}

/// xoshiro256** seeded through SplitMix64: small, fast, reproducible everywhere.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    /// A stream from a seed.
    pub fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut s = [0u64; 4];
        for v in s.iter_mut() {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            *v = x ^ (x >> 31);
        }
        Rng(s)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }
    /// Uniform in `[0, 1)`.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The index of the largest value; the lowest index among equals.
pub fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best
}

/// Chooses one token from `logits` (`[vocab]`).
pub fn sample(logits: &[f32], p: &Sampling, rng: &mut Rng) -> usize {
    if p.temperature <= 0.0 || logits.len() <= 1 {
        return argmax(logits);
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    // Highest first; equal logits keep the lower id first.
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if p.top_k > 0 {
        idx.truncate(p.top_k);
    }
    let max = logits[idx[0]] as f64;
    let t = p.temperature as f64;
    let mut probs: Vec<f64> = idx.iter().map(|&i| ((logits[i] as f64 - max) / t).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if p.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            cum += q;
            if cum >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        idx.truncate(keep);
    }
    let total: f64 = probs.iter().sum();
    let mut u = rng.next_f64() * total;
    for (i, q) in probs.iter().enumerate() {
        if u < *q {
            return idx[i];
        }
        u -= q;
    }
    idx[probs.len() - 1]
}

/// See the module doc.
pub struct Sampler {
    vocab: usize,
}

impl Sampler {
    /// A sampler for this vocabulary.
    pub fn new(vocab: usize) -> Sampler {
        Sampler { vocab }
    }
}

impl Rng {
    /// The stream that draws the token at `position` of a sequence sampled with `seed`.
    pub fn at(seed: u64, position: usize) -> Rng {
        let mut r = Rng::new(seed);
        Rng::new(r.next_u64() ^ (position as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }
}

impl Operator<Packet> for Sampler {
    fn kind(&self) -> &str {
        "sampler"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, _cx: &FireCx) -> Result<Step, OpError> {
        let Packet::Act { batch, x } = ins.take(0) else {
            return Err(OpError::new("port `logits` expected activations"));
        };
        let rows: usize = batch.seqs.iter().map(Batch::logit_rows).sum();
        if x.shape != [rows, self.vocab] {
            return Err(OpError::new(format!("port `logits`: shape {:?}, expected [{rows}, {}]", x.shape, self.vocab)));
        }
        let data = x.f32();
        let mut tokens = Vec::with_capacity(batch.seqs.len());
        let mut row = 0;
        for s in &batch.seqs {
            let n = Batch::logit_rows(s);
            if n == 0 {
                tokens.push(0);
                continue;
            }
            let mut rng = Rng::at(s.sampling.seed, s.start + s.len);
            let last = row + n - 1;
            tokens.push(sample(&data[last * self.vocab..(last + 1) * self.vocab], &s.sampling, &mut rng) as u32);
            row += n;
        }
        let wants = batch.seqs.iter().any(|s| matches!(s.logits, LogitsWanted::Last | LogitsWanted::All));
        out.send(0, Packet::Sampled { batch, tokens, logits: wants.then_some(x) });
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(sample(&[1.0, 3.0, 3.0, 2.0], &Sampling::default(), &mut Rng::new(0)), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_seeds_reproduce() {
        let l: Vec<f32> = (0..50).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let p = Sampling { temperature: 1.0, top_k: 1, top_p: 1.0, seed: 3 };
        assert_eq!(sample(&l, &p, &mut Rng::new(1)), argmax(&l));
        let p = Sampling { temperature: 0.8, top_k: 0, top_p: 0.9, seed: 3 };
        let a: Vec<usize> = {
            let mut r = Rng::new(9);
            (0..20).map(|_| sample(&l, &p, &mut r)).collect()
        };
        let b: Vec<usize> = {
            let mut r = Rng::new(9);
            (0..20).map(|_| sample(&l, &p, &mut r)).collect()
        };
        let c: Vec<usize> = {
            let mut r = Rng::new(10);
            (0..20).map(|_| sample(&l, &p, &mut r)).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // One token holds almost all the mass: with top_p 0.5 nothing else can be drawn.
        let l = [10.0f32, 0.0, 0.0, 0.0];
        let p = Sampling { temperature: 1.0, top_k: 0, top_p: 0.5, seed: 0 };
        let mut r = Rng::new(5);
        assert!((0..200).all(|_| sample(&l, &p, &mut r) == 0));
        // Without the cut, a hot temperature draws the others too.
        let p = Sampling { temperature: 100.0, top_k: 0, top_p: 1.0, seed: 0 };
        assert!((0..200).any(|_| sample(&l, &p, &mut r) != 0));
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let l = [0.0f32, (3.0f32).ln()]; // probabilities 1/4 and 3/4
        let p = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 };
        let mut r = Rng::new(42);
        let ones = (0..20000).filter(|_| sample(&l, &p, &mut r) == 1).count();
        assert!((ones as f64 / 20000.0 - 0.75).abs() < 0.02, "{ones}");
    }
}
