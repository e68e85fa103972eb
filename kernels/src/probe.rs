//! The memory-read bound, measured the way the decode kernels read.
//!
//! A one-token matmul reads its weight rows a tile at a time: several rows (streams) side by
//! side, with a software prefetch ahead. A plain sum reads one stream. Which of the two gets
//! more out of memory depends on the machine, so the bound is the better of both, measured
//! in the same run as the kernel it bounds ([`read_bandwidth`]).

use crate::par::{split_range, Parallel};
use std::time::Instant;

/// How a probe walks its part of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadPattern {
    /// One sequential stream per task.
    Sequential,
    /// Eight streams side by side per task, prefetched ahead (as the decode kernel read before
    /// it took one row after another; kept as a second bound).
    Tiled,
}

impl ReadPattern {
    /// Both patterns.
    pub const ALL: [ReadPattern; 2] = [ReadPattern::Sequential, ReadPattern::Tiled];
    /// `sequential` or `tiled`.
    pub fn name(self) -> &'static str {
        match self {
            ReadPattern::Sequential => "sequential",
            ReadPattern::Tiled => "tiled",
        }
    }
}

/// Reads every element of `data` once with the lane's cores in `pattern`; returns their sum
/// (so that the reads cannot be optimised away).
pub fn read(data: &[f32], pattern: ReadPattern, par: &dyn Parallel) -> f32 {
    let tasks = par.threads() * 4;
    let parts: Vec<std::sync::Mutex<f32>> = (0..tasks).map(|_| Default::default()).collect();
    par.run(tasks, &|i| {
        let part = &data[split_range(data.len(), tasks, 64, i)];
        let s = read_part(part, pattern);
        if let Ok(mut p) = parts[i].lock() {
            *p = s;
        }
    });
    parts.iter().filter_map(|p| p.lock().ok().map(|p| *p)).sum()
}

fn read_part(part: &[f32], pattern: ReadPattern) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was just detected.
        return unsafe {
            match pattern {
                ReadPattern::Sequential => avx2::streams::<1, false>(part),
                ReadPattern::Tiled => avx2::streams::<8, true>(part),
            }
        };
    }
    let _ = pattern;
    let mut acc = [0f32; 32];
    for c in part.chunks_exact(32) {
        for j in 0..32 {
            acc[j] += c[j];
        }
    }
    acc.iter().sum::<f32>() + part.chunks_exact(32).remainder().iter().sum::<f32>()
}

/// GB/s read from memory by the lane's cores: the best of a few rounds of each pattern over
/// `bytes` of data (a multiple of the caches, so that it comes from memory).
pub fn read_bandwidth(bytes: usize, par: &dyn Parallel) -> f64 {
    let words = bytes / 4;
    let mut buf = vec![0f32; words];
    for (i, w) in buf.iter_mut().enumerate().step_by(1024) {
        *w = i as f32;
    }
    let mut best = 0f64;
    let mut sink = 0f32;
    for _ in 0..4 {
        for pattern in ReadPattern::ALL {
            let t0 = Instant::now();
            sink += read(&buf, pattern, par);
            best = best.max((words * 4) as f64 / t0.elapsed().as_secs_f64() / 1e9);
        }
    }
    std::hint::black_box(sink);
    best
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// How far ahead (in elements) the tiled pattern prefetches.
    const PREFETCH: usize = 512;

    /// Sums `part` read as `S` equal streams side by side, 128 bytes of each per round.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn streams<const S: usize, const PF: bool>(part: &[f32]) -> f32 {
        let per = part.len() / S / 32 * 32;
        let p = part.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut off = 0;
        while off < per {
            for s in 0..S {
                let q = p.add(s * per + off);
                if PF {
                    _mm_prefetch(q.wrapping_add(PREFETCH) as *const i8, _MM_HINT_T0);
                }
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_add_ps(*a, _mm256_loadu_ps(q.add(8 * j)));
                }
            }
            off += 32;
        }
        let mut lanes = [0f32; 8];
        let v = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        _mm256_storeu_ps(lanes.as_mut_ptr(), v);
        lanes.iter().sum::<f32>() + part[S * per..].iter().sum::<f32>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Serial;

    #[test]
    fn every_pattern_reads_every_element_once() {
        // Sizes that are not multiples of a stream's round, nor of the tasks' split.
        for n in [0usize, 1, 31, 32, 255, 256 * 8 + 7, 10_000] {
            let data: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
            let want: f32 = data.iter().sum();
            for pattern in ReadPattern::ALL {
                assert_eq!(read(&data, pattern, &Serial), want, "{} over {n}", pattern.name());
            }
        }
    }
}
