//! RMSNorm: `out = w * x / sqrt(mean(x²) + eps)`, row by row, in f32.

use crate::par::{Parallel, SharedMut};

/// Normalises each row of `x` (`[rows, d]`) with weight `w` (`[d]`) into `out` (`[rows, d]`).
pub fn rmsnorm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32], par: &dyn Parallel) {
    let d = w.len();
    assert!(d > 0 && x.len().is_multiple_of(d) && out.len() == x.len(), "rmsnorm shapes");
    let rows = x.len() / d;
    let op = SharedMut(out.as_mut_ptr());
    let tasks = if rows >= 8 { par.threads().min(rows) } else { 1 };
    par.run(tasks, &|i| {
        let r = crate::par::split_range(rows, tasks, 1, i);
        for row in r {
            let xr = &x[row * d..(row + 1) * d];
            // SAFETY: each task writes only its own rows.
            let orow = unsafe { op.slice(row * d, d) };
            rmsnorm_row(xr, w, eps, orow);
        }
    });
}

/// One row of [`rmsnorm`]; also the reference.
pub fn rmsnorm_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let ss = crate::matmul::dot_portable(x, x);
    let inv = 1.0 / (ss / x.len() as f32 + eps).sqrt();
    for ((o, xv), wv) in out.iter_mut().zip(x).zip(w) {
        *o = wv * (xv * inv);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Serial;

    #[test]
    fn unit_rms_rows_are_scaled_by_weight_only() {
        let x = [1.0f32, -1.0, 1.0, -1.0, 2.0, 2.0, 2.0, 2.0];
        let w = [1.0f32, 2.0, 3.0, 4.0];
        let mut out = [0f32; 8];
        rmsnorm(&x, &w, 0.0, &mut out, &Serial);
        assert_eq!(out, [1.0, -2.0, 3.0, -4.0, 1.0, 2.0, 3.0, 4.0]);
    }
}
