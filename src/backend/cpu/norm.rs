//! Normalisations on the CPU: group norm over `[B, C, spatial]` (optionally fused with
//! SiLU, as every SD2 ResNet block applies it right after) and layer norm over the last dim.
//!
//! Statistics are two-pass (mean, then mean of squared deviations) with f64 accumulators:
//! groups hold up to 10^6 values in SD2, where a one-pass f32 sum of squares loses digits.

use super::simd;
use rayon::prelude::*;

/// Mean and biased variance of `xs`.
fn moments(xs: &[f32]) -> (f64, f64) {
    let n = xs.len().max(1) as f64;
    // Eight independent partial sums so the loop vectorises and pipelines.
    let mut acc = [0.0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i] as f64;
        }
    }
    let mean = (acc.iter().sum::<f64>() + tail) / n;
    let mut acc = [0.0f64; 8];
    let chunks = xs.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&v| (v as f64 - mean).powi(2)).sum();
    for c in chunks {
        for i in 0..8 {
            let d = c[i] as f64 - mean;
            acc[i] += d * d;
        }
    }
    (mean, (acc.iter().sum::<f64>() + tail) / n)
}

/// Group norm of `x[batch, channels, spatial]` with per-channel `gamma`, `beta`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &[f32],
    channels: usize,
    spatial: usize,
    groups: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    silu: bool,
) -> Vec<f32> {
    let per_group = channels / groups * spatial;
    let mut out = vec![0.0f32; x.len()];
    if per_group == 0 {
        return out;
    }
    out.par_chunks_mut(per_group).zip(x.par_chunks(per_group)).enumerate().for_each(|(i, (o, xs))| {
        let (mean, var) = moments(xs);
        let inv = (1.0 / (var + eps as f64).sqrt()) as f32;
        let mean = mean as f32;
        let c0 = (i % groups) * (channels / groups);
        for (c, (orow, xrow)) in o.chunks_exact_mut(spatial).zip(xs.chunks_exact(spatial)).enumerate() {
            // y = (x - mean) * inv * gamma + beta, folded into one multiply-add per value.
            let a = inv * gamma[c0 + c];
            let b = beta[c0 + c] - mean * a;
            if silu {
                simd::affine_silu(xrow, a, b, orow);
            } else {
                for (y, &v) in orow.iter_mut().zip(xrow) {
                    *y = v * a + b;
                }
            }
        }
    });
    out
}

/// Layer norm over rows of length `dim`.
pub fn layer_norm(x: &[f32], dim: usize, gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    if dim == 0 {
        return out;
    }
    let row = |(o, xs): (&mut [f32], &[f32])| {
        let (mean, var) = moments(xs);
        let inv = (1.0 / (var + eps as f64).sqrt()) as f32;
        let mean = mean as f32;
        for (((y, &v), &g), &b) in o.iter_mut().zip(xs).zip(gamma).zip(beta) {
            *y = (v - mean) * inv * g + b;
        }
    };
    if x.len() >= super::PAR_MIN_ELEMS {
        out.par_chunks_mut(dim).zip(x.par_chunks(dim)).for_each(row);
    } else {
        out.chunks_mut(dim).zip(x.chunks(dim)).for_each(row);
    }
    out
}
