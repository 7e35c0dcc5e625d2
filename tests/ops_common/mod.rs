//! Shared helpers of the op tests: a seeded PRNG for fresh non-zero inputs, the relative
//! error metric of the developer guide, and tensor constructors.
#![allow(dead_code)]

use sdsparse::backend::Tensor;

/// SplitMix64: tiny, seeded, good enough to make test inputs.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1]`, never exactly zero.
    pub fn uniform(&mut self) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32; // [0, 1)
        let v = 2.0 * u - 1.0;
        if v == 0.0 {
            0.5
        } else {
            v
        }
    }
    pub fn vec(&mut self, n: usize, amplitude: f32) -> Vec<f32> {
        (0..n).map(|_| amplitude * self.uniform()).collect()
    }
    pub fn tensor(&mut self, shape: &[usize], amplitude: f32) -> Tensor {
        let n = shape.iter().product();
        Tensor::from_vec(self.vec(n, amplitude), shape).unwrap()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// ‖got − want‖ / ‖want‖ in f64; infinite when anything is NaN or the lengths differ.
pub fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    if got.len() != want.len() || got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

/// Fails with the measured error unless `got` is within `tol` of `want` (relative, L2).
pub fn assert_close(what: &str, got: &Tensor, want: &[f64], tol: f64) {
    let got = got.to_vec().unwrap();
    let err = rel_err(&got, want);
    assert!(err < tol, "{what}: relative error {err:e} ≥ {tol:e}");
}

pub fn f64s(x: &Tensor) -> Vec<f64> {
    x.to_vec().unwrap().iter().map(|&v| v as f64).collect()
}

/// Tolerance for f32 results against f64 references (developer guide).
pub const F32_TOL: f64 = 1e-5;
