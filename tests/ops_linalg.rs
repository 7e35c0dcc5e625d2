//! CPU linear algebra ops (linear with dense/2:4/bitmap weights, matmul, conv2d, attention)
//! against naive f64 references written here, on fresh seeded random inputs.
//!
//! Tolerance: f32 results vs f64 references, relative L2 error < 1e-5. Sums of up to a few
//! thousand products in f32 carry ~√K·2^-24 ≈ 3e-6 relative error, inside that bound.

mod ops_common;

use half::{bf16, f16};
use ops_common::*;
use sdsparse::backend::{ops, Tensor};
use sdsparse::format::{
    bitmap_row_bytes, sparse24_meta_row_bytes, BitmapWeight, DType, HostData, Sparse24Weight, Weight,
};

fn naive_linear(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, bias: Option<&[f32]>) -> Vec<f64> {
    let mut y = vec![0.0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = bias.map_or(0.0, |b| b[j] as f64);
            for p in 0..k {
                s += x[i * k + p] as f64 * w[j * k + p] as f64;
            }
            y[i * n + j] = s;
        }
    }
    y
}

#[test]
fn linear_dense_matches_naive() {
    let mut rng = Rng::new(1);
    for &(lead, k, n, with_bias) in &[
        (&[1usize][..], 1usize, 1usize, false),
        (&[3, 5], 7, 9, true),
        (&[2, 77], 64, 96, true),
        (&[300], 257, 190, false),
    ] {
        let mut shape = lead.to_vec();
        shape.push(k);
        let x = rng.tensor(&shape, 1.0);
        let w = rng.tensor(&[n, k], 0.5);
        let b = rng.tensor(&[n], 0.5);
        let bias = with_bias.then_some(&b);
        let y = ops::linear(&x, &Weight::Dense(w.clone()), bias).unwrap();
        let mut out_shape = lead.to_vec();
        out_shape.push(n);
        assert_eq!(y.shape(), &out_shape[..]);
        let m = x.numel() / k;
        let want = naive_linear(
            x.as_slice().unwrap(),
            m,
            k,
            w.as_slice().unwrap(),
            n,
            bias.map(|b| b.as_slice().unwrap()),
        );
        assert_close(&format!("linear {shape:?} x [{n}, {k}]"), &y, &want, F32_TOL);
    }
}

#[test]
fn linear_shape_errors_are_errors() {
    let x = Tensor::zeros(&[2, 8]);
    let w = Weight::Dense(Tensor::zeros(&[4, 6]));
    assert!(ops::linear(&x, &w, None).is_err());
    let w = Weight::Dense(Tensor::zeros(&[4, 8]));
    assert!(ops::linear(&x, &w, Some(&Tensor::zeros(&[5]))).is_err());
    assert!(ops::linear(&Tensor::zeros(&[]), &w, None).is_err());
}

fn host_data(values: &[f32], dtype: DType) -> HostData {
    HostData::F32(values.to_vec()).to_dtype(dtype)
}

/// A random 2:4 weight in the canonical layout plus its dense-with-zeros f32 form.
fn random_sparse24(rng: &mut Rng, rows: usize, cols: usize, dtype: DType) -> (Weight, Vec<f32>) {
    let mut values = Vec::with_capacity(rows * cols / 2);
    let mut meta = vec![0u8; rows * sparse24_meta_row_bytes(cols)];
    let mut positions = Vec::new();
    for r in 0..rows {
        for g in 0..cols / 4 {
            let i0 = rng.below(3);
            let i1 = i0 + 1 + rng.below(3 - i0);
            values.push(rng.uniform());
            values.push(rng.uniform());
            positions.push((r, 4 * g + i0));
            positions.push((r, 4 * g + i1));
            let nibble = (i0 | (i1 << 2)) as u8;
            meta[r * sparse24_meta_row_bytes(cols) + g / 2] |= nibble << (4 * (g % 2));
        }
    }
    let values = host_data(&values, dtype);
    let widened = values.to_f32();
    let mut dense = vec![0.0f32; rows * cols];
    for (&(r, c), &v) in positions.iter().zip(&widened) {
        dense[r * cols + c] = v;
    }
    (Weight::Sparse24(Sparse24Weight { rows, cols, values, meta }), dense)
}

/// A random unstructured weight (about `keep` of the entries kept) and its dense form.
fn random_bitmap(rng: &mut Rng, rows: usize, cols: usize, keep: f32, dtype: DType) -> (Weight, Vec<f32>) {
    let row_bytes = bitmap_row_bytes(cols);
    let mut bitmap = vec![0u8; rows * row_bytes];
    let mut values = Vec::new();
    let mut row_offsets = vec![0u32];
    let mut kept = Vec::new();
    for r in 0..rows {
        for c in 0..cols {
            if (rng.uniform() + 1.0) / 2.0 < keep {
                bitmap[r * row_bytes + c / 8] |= 1 << (c % 8);
                values.push(rng.uniform());
                kept.push((r, c));
            }
        }
        row_offsets.push(values.len() as u32);
    }
    let values = host_data(&values, dtype);
    let widened = values.to_f32();
    let mut dense = vec![0.0f32; rows * cols];
    for (&(r, c), &v) in kept.iter().zip(&widened) {
        dense[r * cols + c] = v;
    }
    (Weight::Bitmap(BitmapWeight { rows, cols, bitmap, row_offsets, values }), dense)
}

#[test]
fn sparse_linear_equals_dense_with_zeros() {
    let mut rng = Rng::new(2);
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for &(m, k, n) in &[(1usize, 4usize, 1usize), (5, 12, 7), (154, 1024, 320), (64, 100, 33)] {
            let x = rng.tensor(&[m, k], 1.0);
            let bias = rng.tensor(&[n], 0.5);
            let mut weights =
                vec![random_bitmap(&mut rng, n, k, 0.6, dtype), random_bitmap(&mut rng, n, k, 0.0, dtype)];
            if k % 4 == 0 {
                weights.push(random_sparse24(&mut rng, n, k, dtype));
            }
            for (w, dense) in weights {
                let dense_t = Tensor::from_vec(dense.clone(), &[n, k]).unwrap();
                let y_sparse = ops::linear(&x, &w, Some(&bias)).unwrap();
                let y_dense = ops::linear(&x, &Weight::Dense(dense_t), Some(&bias)).unwrap();
                // Same expanded weight, same GEMM: bit-identical, not merely close.
                assert_eq!(
                    y_sparse.to_vec().unwrap(),
                    y_dense.to_vec().unwrap(),
                    "{} {dtype:?} [{m},{k}]x[{n},{k}]",
                    w.format_name()
                );
                let want =
                    naive_linear(x.as_slice().unwrap(), m, k, &dense, n, Some(bias.as_slice().unwrap()));
                assert_close(&format!("{} linear", w.format_name()), &y_sparse, &want, F32_TOL);
            }
        }
    }
    let _ = (f16::ONE, bf16::ONE);
}

#[test]
fn corrupt_sparse_weights_are_errors() {
    let mut rng = Rng::new(3);
    let x = rng.tensor(&[2, 8], 1.0);
    let (w, _) = random_sparse24(&mut rng, 3, 8, DType::F32);
    let Weight::Sparse24(mut s) = w else { unreachable!() };
    s.meta[0] = 0x00; // idx0 == idx1
    assert!(ops::linear(&x, &Weight::Sparse24(s.clone()), None).is_err());
    s.meta.pop();
    assert!(ops::linear(&x, &Weight::Sparse24(s), None).is_err());

    let (w, _) = random_bitmap(&mut rng, 3, 8, 0.5, DType::F32);
    let Weight::Bitmap(mut b) = w else { unreachable!() };
    b.bitmap[0] = if b.bitmap[0] == 0 { 1 } else { 0 }; // bit count no longer matches the values
    assert!(ops::linear(&x, &Weight::Bitmap(b), None).is_err());
}

#[test]
fn matmul_matches_naive() {
    let mut rng = Rng::new(4);
    for &(batch, m, k, n) in
        &[(1usize, 1usize, 1usize, 1usize), (3, 17, 9, 5), (10, 64, 77, 64), (2, 200, 150, 120)]
    {
        let a = rng.tensor(&[batch, m, k], 1.0);
        let b = rng.tensor(&[batch, k, n], 1.0);
        let y = ops::matmul(&a, &b).unwrap();
        assert_eq!(y.shape(), &[batch, m, n]);
        let (av, bv) = (a.as_slice().unwrap(), b.as_slice().unwrap());
        let mut want = vec![0.0f64; batch * m * n];
        for t in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    want[(t * m + i) * n + j] =
                        (0..k).map(|p| av[(t * m + i) * k + p] as f64 * bv[(t * k + p) * n + j] as f64).sum();
                }
            }
        }
        assert_close("matmul", &y, &want, F32_TOL);
    }
    assert!(ops::matmul(&Tensor::zeros(&[2, 3, 4]), &Tensor::zeros(&[2, 5, 4])).is_err());
    assert!(ops::matmul(&Tensor::zeros(&[2, 3, 4]), &Tensor::zeros(&[3, 4, 4])).is_err());
    assert!(ops::matmul(&Tensor::zeros(&[4]), &Tensor::zeros(&[4])).is_err());
}

#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f32],
    (b, ci, h, w): (usize, usize, usize, usize),
    wt: &[f32],
    (co, kh, kw): (usize, usize, usize),
    bias: Option<&[f32]>,
    stride: usize,
    pad: usize,
) -> (Vec<f64>, usize, usize) {
    let ho = (h + 2 * pad - kh) / stride + 1;
    let wo = (w + 2 * pad - kw) / stride + 1;
    let mut out = vec![0.0f64; b * co * ho * wo];
    for n in 0..b {
        for o in 0..co {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = bias.map_or(0.0, |bb| bb[o] as f64);
                    for c in 0..ci {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    s += x[((n * ci + c) * h + iy as usize) * w + ix as usize] as f64
                                        * wt[((o * ci + c) * kh + ky) * kw + kx] as f64;
                                }
                            }
                        }
                    }
                    out[((n * co + o) * ho + oy) * wo + ox] = s;
                }
            }
        }
    }
    (out, ho, wo)
}

#[test]
fn conv2d_matches_naive() {
    let mut rng = Rng::new(5);
    // (batch, cin, h, w, cout, k, stride, pad, bias)
    let cases = [
        (2usize, 3usize, 8usize, 8usize, 5usize, 3usize, 1usize, 1usize, true),
        (1, 4, 7, 9, 6, 3, 1, 1, false),
        (2, 4, 8, 8, 4, 3, 2, 1, true), // SD2 downsample: 3x3, stride 2, padding 1
        (1, 3, 9, 7, 2, 3, 2, 1, true), // odd sizes with stride 2
        (2, 6, 5, 5, 3, 1, 1, 0, true), // 1x1
        (1, 2, 6, 6, 3, 1, 2, 0, false),
        (1, 2, 4, 4, 2, 3, 1, 0, true), // no padding
        (1, 2, 1, 1, 2, 3, 1, 1, true), // 1x1 image, kernel bigger than the image
        (1, 3, 5, 5, 2, 5, 3, 2, false),
        (2, 16, 40, 40, 8, 3, 1, 1, true),
        (1, 32, 33, 31, 40, 3, 1, 1, true), // Winograd F(2x2, 3x3) path (>= 32 channels), odd sizes
    ];
    for &(b, ci, h, w, co, k, stride, pad, with_bias) in &cases {
        let x = rng.tensor(&[b, ci, h, w], 1.0);
        let wt = rng.tensor(&[co, ci, k, k], 0.5);
        let bias = rng.tensor(&[co], 0.5);
        let bias = with_bias.then_some(&bias);
        let y = ops::conv2d(&x, &wt, bias, stride, pad).unwrap();
        let (want, ho, wo) = naive_conv(
            x.as_slice().unwrap(),
            (b, ci, h, w),
            wt.as_slice().unwrap(),
            (co, k, k),
            bias.map(|t| t.as_slice().unwrap()),
            stride,
            pad,
        );
        assert_eq!(y.shape(), &[b, co, ho, wo]);
        assert_close(&format!("conv2d case {:?}", (b, ci, h, w, co, k, stride, pad)), &y, &want, F32_TOL);
    }
}

#[test]
fn conv2d_shape_errors_are_errors() {
    let x = Tensor::zeros(&[1, 3, 4, 4]);
    assert!(ops::conv2d(&x, &Tensor::zeros(&[2, 4, 3, 3]), None, 1, 1).is_err());
    assert!(ops::conv2d(&x, &Tensor::zeros(&[2, 3, 3, 3]), Some(&Tensor::zeros(&[3])), 1, 1).is_err());
    assert!(ops::conv2d(&x, &Tensor::zeros(&[2, 3, 3, 3]), None, 0, 1).is_err());
    assert!(ops::conv2d(&x, &Tensor::zeros(&[2, 3, 7, 7]), None, 1, 1).is_err());
    assert!(ops::conv2d(&Tensor::zeros(&[3, 4, 4]), &Tensor::zeros(&[2, 3, 3, 3]), None, 1, 1).is_err());
}

fn naive_attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    (bh, sq, sk, d): (usize, usize, usize, usize),
    scale: f64,
    causal: bool,
) -> Vec<f64> {
    let mut out = vec![0.0f64; bh * sq * d];
    for h in 0..bh {
        for i in 0..sq {
            let visible = if causal { i + 1 + sk - sq } else { sk };
            let scores: Vec<f64> = (0..visible)
                .map(|j| {
                    (0..d)
                        .map(|c| q[(h * sq + i) * d + c] as f64 * k[(h * sk + j) * d + c] as f64)
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let sum: f64 = e.iter().sum();
            for c in 0..d {
                out[(h * sq + i) * d + c] =
                    (0..visible).map(|j| e[j] / sum * v[(h * sk + j) * d + c] as f64).sum();
            }
        }
    }
    out
}

#[test]
fn attention_matches_naive() {
    let mut rng = Rng::new(6);
    // (b, heads, sq, sk, d, causal)
    let cases = [
        (1usize, 1usize, 1usize, 1usize, 1usize, false),
        (2, 3, 77, 77, 16, true),   // CLIP text encoder: causal self-attention
        (2, 2, 300, 77, 32, false), // cross-attention, query rows not a multiple of the block
        (1, 5, 256, 256, 64, false),
        (1, 2, 10, 14, 8, true),
    ];
    for &(b, h, sq, sk, d, causal) in &cases {
        let q = rng.tensor(&[b, h, sq, d], 1.0);
        let k = rng.tensor(&[b, h, sk, d], 1.0);
        let v = rng.tensor(&[b, h, sk, d], 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        let y = ops::attention(&q, &k, &v, scale, causal).unwrap();
        assert_eq!(y.shape(), q.shape());
        let want = naive_attention(
            q.as_slice().unwrap(),
            k.as_slice().unwrap(),
            v.as_slice().unwrap(),
            (b * h, sq, sk, d),
            scale as f64,
            causal,
        );
        assert_close(&format!("attention {:?}", (b, h, sq, sk, d, causal)), &y, &want, F32_TOL);
    }
    let q = Tensor::zeros(&[1, 2, 4, 8]);
    assert!(
        ops::attention(&q, &Tensor::zeros(&[1, 2, 4, 4]), &Tensor::zeros(&[1, 2, 4, 4]), 1.0, false).is_err()
    );
    assert!(
        ops::attention(&q, &Tensor::zeros(&[1, 2, 5, 8]), &Tensor::zeros(&[1, 2, 6, 8]), 1.0, false).is_err()
    );
}

#[test]
fn interleaved_head_attention_equals_split_heads() {
    let mut rng = Rng::new(7);
    // (b, heads, sq, sk, d, causal)
    for &(b, h, sq, sk, d, causal) in &[
        (2usize, 5usize, 300usize, 77usize, 16usize, false),
        (2, 4, 77, 77, 8, true),
        (1, 1, 5, 9, 4, false),
    ] {
        let q = rng.tensor(&[b, sq, h * d], 1.0);
        let k = rng.tensor(&[b, sk, h * d], 1.0);
        let v = rng.tensor(&[b, sk, h * d], 1.0);
        let scale = 1.0 / (d as f32).sqrt();
        let y = ops::attention_heads(&q, &k, &v, h, scale, causal).unwrap();
        assert_eq!(y.shape(), q.shape());
        let split =
            |t: &Tensor, s: usize| ops::permute(&t.reshape(&[b, s, h, d]).unwrap(), &[0, 2, 1, 3]).unwrap();
        let (qs, ks, vs) = (split(&q, sq), split(&k, sk), split(&v, sk));
        let want = naive_attention(
            qs.as_slice().unwrap(),
            ks.as_slice().unwrap(),
            vs.as_slice().unwrap(),
            (b * h, sq, sk, d),
            scale as f64,
            causal,
        );
        let want = Tensor::from_vec(want.iter().map(|&x| x as f32).collect(), &[b, h, sq, d]).unwrap();
        let merged = ops::permute(&want, &[0, 2, 1, 3]).unwrap();
        assert_close(
            &format!("attention_heads {:?}", (b, h, sq, sk, d, causal)),
            &y,
            &f64s(&merged),
            F32_TOL,
        );
    }
    let q = Tensor::zeros(&[1, 4, 8]);
    assert!(ops::attention_heads(&q, &q, &q, 3, 1.0, false).is_err());
    assert!(ops::attention_heads(&q, &Tensor::zeros(&[1, 4, 6]), &Tensor::zeros(&[1, 4, 6]), 2, 1.0, false)
        .is_err());
}

#[test]
fn degenerate_sizes_do_not_panic() {
    let mut rng = Rng::new(8);
    // No input features: the product is empty, the bias remains.
    let bias = rng.tensor(&[3], 1.0);
    let y =
        ops::linear(&Tensor::zeros(&[2, 0]), &Weight::Dense(Tensor::zeros(&[3, 0])), Some(&bias)).unwrap();
    assert_eq!(y.shape(), &[2, 3]);
    assert_eq!(&y.as_slice().unwrap()[3..], bias.as_slice().unwrap());
    let y = ops::linear(&rng.tensor(&[2, 4], 1.0), &Weight::Dense(Tensor::zeros(&[0, 4])), None).unwrap();
    assert_eq!(y.shape(), &[2, 0]);
    let y = ops::linear(&Tensor::zeros(&[0, 4]), &Weight::Dense(rng.tensor(&[3, 4], 1.0)), None).unwrap();
    assert_eq!(y.shape(), &[0, 3]);
    let y = ops::matmul(&Tensor::zeros(&[2, 3, 0]), &Tensor::zeros(&[2, 0, 5])).unwrap();
    assert_eq!(y.as_slice().unwrap(), &[0.0; 30][..]);
    let q = Tensor::zeros(&[1, 2, 3, 4]);
    let empty = Tensor::zeros(&[1, 2, 0, 4]);
    assert_eq!(ops::attention(&q, &empty, &empty, 1.0, false).unwrap().as_slice().unwrap(), &[0.0; 24][..]);
    assert_eq!(
        ops::conv2d(&Tensor::zeros(&[0, 2, 4, 4]), &Tensor::zeros(&[3, 2, 3, 3]), None, 1, 1)
            .unwrap()
            .shape(),
        &[0, 3, 4, 4]
    );
}
