//! SwiGLU's middle: `out = silu(gate) * up`, elementwise in f32.

/// `out[i] = gate[i] / (1 + e^-gate[i]) * up[i]`, in place over `gate`.
pub fn silu_mul_inplace(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul shapes");
    for (g, u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

/// `a[i] += b[i]`.
pub fn add_inplace(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "add shapes");
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn silu_of_zero_is_zero_and_large_is_identity() {
        let mut g = [0.0f32, 30.0, -30.0];
        super::silu_mul_inplace(&mut g, &[5.0, 2.0, 2.0]);
        assert_eq!(g[0], 0.0);
        assert!((g[1] - 60.0).abs() < 1e-4);
        assert!(g[2].abs() < 1e-10);
    }
}
