//! The Winograd F(2x2, 3x3) convolution (and `conv2d`'s dispatch to it) against the im2col +
//! GEMM reference path, on fresh random inputs (a new seed every run, printed on failure):
//! odd sizes, padding 0 / 1 / 2, batch 2, with and without bias, strips of tile rows, and the
//! shapes that must keep the reference path (stride 2, 1x1, 5x5).
//!
//! Bounds: relative L2 error < 1e-5 (the suite's f32 tolerance) AND every element within
//! 1e-5 · max|reference| + 1e-6 of the reference (NaN fails both).

mod ops_common;

use ops_common::Rng;
use sdsparse::backend::cpu::conv::{conv2d, conv2d_im2col, use_winograd, winograd_f23, ConvShape};

fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1
}

fn check(what: &str, got: &[f32], want: &[f32], seed: u64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g as f64 - w as f64).abs();
        let bound = 1e-5 * scale + 1e-6;
        assert!(d <= bound, "{what} (seed {seed}): element {i}: {g} vs {w} (|diff| {d:e} > {bound:e})");
        num += d * d;
        den += (w as f64) * (w as f64);
    }
    let rel = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    assert!(rel < 1e-5, "{what} (seed {seed}): relative L2 error {rel:e}");
}

#[allow(clippy::too_many_arguments)]
fn shape(
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> ConvShape {
    ConvShape { batch, c_in, h, w, c_out, kh: k, kw: k, stride, padding }
}

#[test]
fn winograd_matches_im2col() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    // (batch, c_in, h, w, c_out, padding, bias)
    let cases = [
        (1usize, 1usize, 1usize, 1usize, 1usize, 1usize, true), // 1x1 image: one tile, mostly padding
        (1, 3, 2, 3, 2, 1, false),
        (2, 4, 7, 9, 5, 1, true),  // odd sizes: the last tile row / column is cut
        (1, 5, 8, 8, 3, 0, true),  // no padding: 6x6 output
        (1, 3, 5, 6, 4, 0, false), // no padding, odd output
        (1, 2, 5, 5, 3, 2, true),  // padding 2: 7x7 output
        (2, 33, 17, 15, 40, 1, true),
        (1, 64, 32, 32, 64, 1, true),
        (1, 96, 96, 80, 96, 1, true), // two strips of tile rows
    ];
    for (b, ci, h, w, co, pad, with_bias) in cases {
        let s = shape(b, ci, h, w, co, 3, 1, pad);
        let x = rng.vec(b * ci * h * w, 1.0);
        let wt = rng.vec(co * ci * 9, 0.5);
        let bias = rng.vec(co, 0.5);
        let bias = with_bias.then_some(&bias[..]);
        let want = conv2d_im2col(&x, &wt, bias, s);
        check(&format!("winograd {s:?}"), &winograd_f23(&x, &wt, bias, s), &want, seed);
    }
}

#[test]
fn conv2d_dispatch_matches_im2col() {
    let seed = fresh_seed();
    let mut rng = Rng::new(seed);
    let cases = [
        (shape(2, 64, 32, 32, 48, 3, 1, 1), true),  // Winograd
        (shape(1, 40, 33, 35, 36, 3, 1, 1), true),  // Winograd, odd sizes
        (shape(2, 64, 16, 16, 64, 3, 1, 1), false), // too few tiles (the UNet's 1280-channel levels)
        (shape(2, 64, 16, 16, 64, 3, 2, 1), false), // SD2 downsample: stride 2
        (shape(1, 64, 9, 7, 32, 3, 2, 1), false),   // stride 2, odd sizes
        (shape(2, 64, 12, 12, 96, 1, 1, 0), false), // 1x1
        (shape(1, 48, 10, 10, 40, 5, 1, 2), false), // 5x5
        (shape(1, 8, 16, 16, 8, 3, 1, 1), false),   // too few channels
    ];
    for (s, winograd) in cases {
        assert_eq!(use_winograd(s), winograd, "dispatch of {s:?}");
        let x = rng.vec(s.batch * s.c_in * s.h * s.w, 1.0);
        let wt = rng.vec(s.c_out * s.c_in * s.kh * s.kw, 0.5);
        let bias = rng.vec(s.c_out, 0.5);
        let want = conv2d_im2col(&x, &wt, Some(&bias), s);
        check(&format!("conv2d {s:?}"), &conv2d(&x, &wt, Some(&bias), s), &want, seed);
    }
}

#[test]
fn winograd_nan_is_not_hidden() {
    let s = shape(1, 32, 8, 8, 32, 3, 1, 1);
    let mut rng = Rng::new(fresh_seed());
    let mut x = rng.vec(32 * 64, 1.0);
    x[5 * 64 + 27] = f32::NAN;
    let wt = rng.vec(32 * 32 * 9, 0.5);
    let y = winograd_f23(&x, &wt, None, s);
    // Output pixel (3, 3) reads input (3, 3) of every channel: NaN must reach it.
    assert!((0..32).all(|co| y[co * 64 + 3 * 8 + 3].is_nan()));
}
