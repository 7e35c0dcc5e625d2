//! CPU normalisation, activation, broadcasting, layout and embedding ops against naive f64
//! references written here, on fresh seeded random inputs (relative L2 error < 1e-5).

mod ops_common;

use ops_common::*;
use sdsparse::backend::cpu::elementwise::exp_fast;
use sdsparse::backend::{ops, Tensor};

#[allow(clippy::too_many_arguments)] // mirrors the op's parameters one to one
fn naive_group_norm(
    x: &[f32],
    c: usize,
    spatial: usize,
    groups: usize,
    g: &[f32],
    b: &[f32],
    eps: f64,
    silu: bool,
) -> Vec<f64> {
    let per = c / groups * spatial;
    let mut out = vec![0.0f64; x.len()];
    for (gi, chunk) in x.chunks(per).enumerate() {
        let mean = chunk.iter().map(|&v| v as f64).sum::<f64>() / per as f64;
        let var = chunk.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / per as f64;
        for (i, &v) in chunk.iter().enumerate() {
            let ch = (gi % groups) * (c / groups) + i / spatial;
            let y = (v as f64 - mean) / (var + eps).sqrt() * g[ch] as f64 + b[ch] as f64;
            out[gi * per + i] = if silu { y / (1.0 + (-y).exp()) } else { y };
        }
    }
    out
}

#[test]
fn group_norm_matches_naive() {
    let mut rng = Rng::new(11);
    for &(shape, groups, silu) in &[
        (&[2usize, 8, 5, 5][..], 4usize, false),
        (&[2, 64, 16, 16][..], 32, true),
        (&[1, 6, 7][..], 3, true),
        (&[3, 4][..], 2, false),
    ] {
        // An offset makes the mean large next to the spread, as in real activations.
        let x =
            Tensor::from_vec(rng.vec(shape.iter().product(), 2.0).iter().map(|v| v + 3.0).collect(), shape)
                .unwrap();
        let c = shape[1];
        let gamma = rng.tensor(&[c], 1.0);
        let beta = rng.tensor(&[c], 1.0);
        let y = ops::group_norm(&x, groups, &gamma, &beta, 1e-5, silu).unwrap();
        let spatial = shape[2..].iter().product();
        let want = naive_group_norm(
            x.as_slice().unwrap(),
            c,
            spatial,
            groups,
            gamma.as_slice().unwrap(),
            beta.as_slice().unwrap(),
            1e-5,
            silu,
        );
        assert_close(&format!("group_norm {shape:?}/{groups} silu={silu}"), &y, &want, F32_TOL);
    }
    let x = Tensor::zeros(&[1, 6, 2, 2]);
    let g = Tensor::zeros(&[6]);
    assert!(ops::group_norm(&x, 4, &g, &g, 1e-5, false).is_err());
    assert!(ops::group_norm(&x, 0, &g, &g, 1e-5, false).is_err());
    assert!(ops::group_norm(&x, 3, &Tensor::zeros(&[5]), &g, 1e-5, false).is_err());
}

#[test]
fn layer_norm_matches_naive() {
    let mut rng = Rng::new(12);
    for shape in [&[2usize, 77, 64][..], &[5, 3][..], &[1, 1024][..]] {
        let dim = *shape.last().unwrap();
        let x = rng.tensor(shape, 3.0);
        let g = rng.tensor(&[dim], 1.0);
        let b = rng.tensor(&[dim], 1.0);
        let y = ops::layer_norm(&x, &g, &b, 1e-5).unwrap();
        let (xv, gv, bv) = (x.as_slice().unwrap(), g.as_slice().unwrap(), b.as_slice().unwrap());
        let mut want = Vec::new();
        for row in xv.chunks(dim) {
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / dim as f64;
            let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / dim as f64;
            for (i, &v) in row.iter().enumerate() {
                want.push((v as f64 - mean) / (var + 1e-5).sqrt() * gv[i] as f64 + bv[i] as f64);
            }
        }
        assert_close(&format!("layer_norm {shape:?}"), &y, &want, F32_TOL);
    }
    assert!(
        ops::layer_norm(&Tensor::zeros(&[2, 4]), &Tensor::zeros(&[3]), &Tensor::zeros(&[4]), 1e-5).is_err()
    );
}

#[test]
fn softmax_matches_naive() {
    let mut rng = Rng::new(13);
    let x = rng.tensor(&[7, 300], 20.0);
    let y = ops::softmax_last(&x).unwrap();
    let mut want = Vec::new();
    for row in x.as_slice().unwrap().chunks(300) {
        let max = row.iter().map(|&v| v as f64).fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - max).exp()).collect();
        let s: f64 = e.iter().sum();
        want.extend(e.iter().map(|v| v / s));
    }
    assert_close("softmax_last", &y, &want, F32_TOL);
}

#[test]
fn fast_exp_is_accurate() {
    // Every 97th f32 bit pattern between -87 and 88: worst relative error ≤ 2 ulp.
    let mut worst = 0.0f64;
    let mut x = -87.0f32;
    while x < 88.0 {
        let want = (x as f64).exp();
        let got = exp_fast(x) as f64;
        worst = worst.max(((got - want) / want).abs());
        x = f32::from_bits(if x < 0.0 { x.to_bits() - 9700 } else { x.to_bits() + 9700 });
        if x.abs() < 1e-30 {
            x = 1e-30;
        }
    }
    assert!(worst < 2.5e-7, "exp_fast worst relative error {worst:e}");
    assert!(exp_fast(f32::NAN).is_nan());
    assert!(exp_fast(-1000.0) < 1e-37);
}

/// Exact GELU in f64, with `1 + erf(z)` as `erfc(−z)` so that the left tail does not cancel.
fn gelu64(x: f64) -> f64 {
    0.5 * x * libm::erfc(-x / 2f64.sqrt())
}

#[test]
fn activations_match_naive() {
    let mut rng = Rng::new(14);
    let x = rng.tensor(&[3, 50, 40], 6.0);
    let xv: Vec<f64> = f64s(&x);
    let gelu: Vec<f64> = xv.iter().map(|&v| gelu64(v)).collect();
    assert_close("gelu", &ops::gelu(&x).unwrap(), &gelu, F32_TOL);
    let silu: Vec<f64> = xv.iter().map(|&v| v / (1.0 + (-v).exp())).collect();
    assert_close("silu", &ops::silu(&x).unwrap(), &silu, F32_TOL);
    let aff: Vec<f64> = xv.iter().map(|&v| v * 0.18215 + 0.5).collect();
    assert_close("affine", &ops::affine(&x, 0.18215, 0.5).unwrap(), &aff, F32_TOL);

    // GEGLU on [3, 50, 40]: halves of 20.
    let y = ops::geglu(&x).unwrap();
    assert_eq!(y.shape(), &[3, 50, 20]);
    let mut want = Vec::new();
    for row in xv.chunks(40) {
        for i in 0..20 {
            want.push(row[i] * gelu64(row[20 + i]));
        }
    }
    assert_close("geglu", &y, &want, F32_TOL);
    assert!(ops::geglu(&Tensor::zeros(&[2, 3])).is_err());
}

/// Naive broadcasting of `b` to `shape` (b right-aligned).
fn broadcast_ref(
    a: &[f32],
    shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    f: fn(f64, f64) -> f64,
) -> Vec<f64> {
    let rank = shape.len();
    let mut bs = vec![1usize; rank - b_shape.len()];
    bs.extend_from_slice(b_shape);
    let mut out = Vec::with_capacity(a.len());
    for (i, &av) in a.iter().enumerate() {
        let mut rem = i;
        let mut idx = vec![0usize; rank];
        for d in (0..rank).rev() {
            idx[d] = rem % shape[d];
            rem /= shape[d];
        }
        let mut off = 0;
        for d in 0..rank {
            off = off * bs[d] + if bs[d] == 1 { 0 } else { idx[d] };
        }
        out.push(f(av as f64, b[off] as f64));
    }
    out
}

#[test]
fn broadcasting_binary_ops_match_naive() {
    let mut rng = Rng::new(15);
    let cases: &[(&[usize], &[usize])] = &[
        (&[2, 8, 5, 5], &[2, 8, 5, 5]),
        (&[2, 8, 5, 5], &[2, 8, 1, 1]), // ResNet time embedding
        (&[2, 8, 5, 5], &[1, 8, 1, 1]),
        (&[2, 77, 64], &[64]), // bias over tokens
        (&[2, 77, 64], &[2, 1, 64]),
        (&[2, 3, 4], &[3, 1]),
        (&[2, 3, 4], &[1]),
        (&[4, 3, 40, 50], &[4, 1, 40, 1]),
        (&[2, 320, 64, 64], &[2, 320, 1, 1]),
    ];
    for &(sa, sb) in cases {
        let a = rng.tensor(sa, 1.0);
        let b = rng.tensor(sb, 1.0);
        let (av, bv) = (a.as_slice().unwrap(), b.as_slice().unwrap());
        assert_close(
            &format!("add {sa:?}+{sb:?}"),
            &ops::add(&a, &b).unwrap(),
            &broadcast_ref(av, sa, bv, sb, |x, y| x + y),
            F32_TOL,
        );
        assert_close(
            &format!("mul {sa:?}*{sb:?}"),
            &ops::mul(&a, &b).unwrap(),
            &broadcast_ref(av, sa, bv, sb, |x, y| x * y),
            F32_TOL,
        );
        assert_close(
            &format!("sub {sa:?}-{sb:?}"),
            &ops::sub(&a, &b).unwrap(),
            &broadcast_ref(av, sa, bv, sb, |x, y| x - y),
            F32_TOL,
        );
        // Commuting ops also broadcast the first operand.
        let swapped = ops::add(&b, &a).unwrap();
        assert_eq!(swapped.shape(), sa);
        assert_close("add swapped", &swapped, &broadcast_ref(av, sa, bv, sb, |x, y| x + y), F32_TOL);
    }
    assert!(ops::add(&Tensor::zeros(&[2, 3]), &Tensor::zeros(&[4])).is_err());
    assert!(ops::sub(&Tensor::zeros(&[3]), &Tensor::zeros(&[2, 3])).is_err());
    assert!(ops::mul(&Tensor::zeros(&[2, 3]), &Tensor::zeros(&[3, 3])).is_err());
}

#[test]
fn permute_matches_naive() {
    let mut rng = Rng::new(16);
    let shape = [2usize, 3, 4, 5];
    let x = rng.tensor(&shape, 1.0);
    let xv = x.as_slice().unwrap();
    let perms: &[[usize; 4]] =
        &[[0, 2, 1, 3], [0, 1, 3, 2], [3, 2, 1, 0], [0, 2, 3, 1], [1, 0, 2, 3], [0, 1, 2, 3]];
    for perm in perms {
        let y = ops::permute(&x, perm).unwrap();
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        assert_eq!(y.shape(), &out_shape[..]);
        let yv = y.as_slice().unwrap();
        let mut idx = [0usize; 4];
        for (i, &v) in yv.iter().enumerate() {
            let mut rem = i;
            for d in (0..4).rev() {
                idx[d] = rem % out_shape[d];
                rem /= out_shape[d];
            }
            let mut src = [0usize; 4];
            for d in 0..4 {
                src[perm[d]] = idx[d];
            }
            let off = ((src[0] * shape[1] + src[1]) * shape[2] + src[2]) * shape[3] + src[3];
            assert_eq!(v, xv[off], "permute {perm:?} at {i}");
        }
    }
    // [B, C, HW] → [B, HW, C] on a tile larger than the blocked transpose's block.
    let x = rng.tensor(&[2, 70, 45], 1.0);
    let y = ops::transpose(&x, 1, 2).unwrap();
    assert_eq!(y.shape(), &[2, 45, 70]);
    let (xv, yv) = (x.as_slice().unwrap(), y.as_slice().unwrap());
    for b in 0..2 {
        for c in 0..70 {
            for s in 0..45 {
                assert_eq!(yv[(b * 45 + s) * 70 + c], xv[(b * 70 + c) * 45 + s]);
            }
        }
    }
    assert!(ops::permute(&x, &[0, 1]).is_err());
    assert!(ops::permute(&x, &[0, 1, 1]).is_err());
    assert!(ops::permute(&x, &[0, 1, 3]).is_err());
}

#[test]
fn cat_narrow_chunk_upsample() {
    let mut rng = Rng::new(17);
    let a = rng.tensor(&[2, 3, 4], 1.0);
    let b = rng.tensor(&[2, 5, 4], 1.0);
    let c = ops::cat(&[&a, &b], 1).unwrap();
    assert_eq!(c.shape(), &[2, 8, 4]);
    let back_a = ops::narrow(&c, 1, 0, 3).unwrap();
    let back_b = ops::narrow(&c, 1, 3, 5).unwrap();
    assert_eq!(back_a.as_slice().unwrap(), a.as_slice().unwrap());
    assert_eq!(back_b.as_slice().unwrap(), b.as_slice().unwrap());
    let (cv, av, bv) = (c.as_slice().unwrap(), a.as_slice().unwrap(), b.as_slice().unwrap());
    assert_eq!(&cv[..12], &av[..12]);
    assert_eq!(&cv[12..32], &bv[..20]);

    let c0 = ops::cat(&[&a, &a], 0).unwrap();
    assert_eq!(c0.shape(), &[4, 3, 4]);
    assert_eq!(&c0.as_slice().unwrap()[24..], av);
    let c2 = ops::cat(&[&a, &a, &a], 2).unwrap();
    assert_eq!(c2.shape(), &[2, 3, 12]);
    assert_eq!(&c2.as_slice().unwrap()[4..8], &av[..4]);
    let parts = ops::chunk(&c2, 3, 2).unwrap();
    assert_eq!(parts.len(), 3);
    for p in &parts {
        assert_eq!(p.as_slice().unwrap(), av);
    }
    assert!(ops::cat(&[&a, &b], 0).is_err());
    assert!(ops::cat(&[], 0).is_err());
    assert!(ops::narrow(&a, 1, 2, 2).is_err());
    assert!(ops::narrow(&a, 3, 0, 1).is_err());
    assert!(ops::chunk(&a, 2, 1).is_err());

    let x = rng.tensor(&[2, 3, 5, 7], 1.0);
    let y = ops::upsample_nearest2x(&x).unwrap();
    assert_eq!(y.shape(), &[2, 3, 10, 14]);
    let (xv, yv) = (x.as_slice().unwrap(), y.as_slice().unwrap());
    for p in 0..6 {
        for i in 0..10 {
            for j in 0..14 {
                assert_eq!(yv[(p * 10 + i) * 14 + j], xv[(p * 5 + i / 2) * 7 + j / 2]);
            }
        }
    }
    assert!(ops::upsample_nearest2x(&Tensor::zeros(&[3, 4])).is_err());
}

#[test]
fn embedding_rows() {
    let mut rng = Rng::new(18);
    let table = rng.tensor(&[10, 6], 1.0);
    let y = ops::embedding(&table, &[3, 0, 9, 3]).unwrap();
    assert_eq!(y.shape(), &[4, 6]);
    let (tv, yv) = (table.as_slice().unwrap(), y.as_slice().unwrap());
    for (i, &id) in [3usize, 0, 9, 3].iter().enumerate() {
        assert_eq!(&yv[i * 6..(i + 1) * 6], &tv[id * 6..(id + 1) * 6]);
    }
    assert!(ops::embedding(&table, &[10]).is_err());
}

#[test]
fn timestep_embedding_matches_formula() {
    // f64 evaluation of diffusers' formula. The op follows PyTorch's f32 operation order;
    // the argument t·f of sin/cos carries an f32 rounding error up to ~|t|·2^-24 ≈ 6e-5 for
    // t ~ 999, so the comparison with an f64 evaluation allows 1e-4 (the PyTorch fixture test
    // checks the f32 values tightly).
    for &(dim, flip, shift) in &[(320usize, true, 0.0f32), (64, false, 1.0), (33, true, 1.0)] {
        let ts = [999.0f32, 500.5, 1.0, 0.0];
        let y = ops::timestep_embedding(&ts, dim, flip, shift).unwrap();
        assert_eq!(y.shape(), &[4, dim]);
        let half = dim / 2;
        let mut want = Vec::new();
        for &t in &ts {
            let args: Vec<f64> = (0..half)
                .map(|i| t as f64 * (-(10000f64.ln()) * i as f64 / (half as f64 - shift as f64)).exp())
                .collect();
            let (s, c): (Vec<f64>, Vec<f64>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
            if flip {
                want.extend(c.iter().chain(&s));
            } else {
                want.extend(s.iter().chain(&c));
            }
            if dim % 2 == 1 {
                want.push(0.0);
            }
        }
        assert_close(&format!("timestep_embedding dim {dim}"), &y, &want, 1e-4);
    }
    assert!(ops::timestep_embedding(&[1.0], 1, true, 0.0).is_err());
    assert!(ops::timestep_embedding(&[1.0], 2, true, 1.0).is_err());
}

#[test]
fn to_device_cpu_is_identity() {
    let x = Rng::new(19).tensor(&[3, 4], 1.0);
    let y = ops::to_device(&x, &sdsparse::backend::Device::Cpu).unwrap();
    assert_eq!(x.as_slice().unwrap(), y.as_slice().unwrap());
}

#[test]
fn gelu_and_silu_are_accurate_pointwise() {
    // Per-element relative error over [-12, 12] (both tails included), for the op (AVX2
    // path on machines that have it, remainder lanes scalar) and the scalar kernels. The
    // left tail of GELU is ill-conditioned in f32: gelu(x) ~ e^(−x²/2) turns the rounding of
    // x/√2 and of its square (~2^-24 relative) into ~x²·2^-24 relative error, so the bound
    // grows with x² (1.5e-5 at x = −12, where gelu ≈ 1e-32).
    let xs: Vec<f32> = (0..24_001).map(|i| -12.0 + i as f32 * 1e-3).collect();
    let x = Tensor::from_vec(xs.clone(), &[xs.len()]).unwrap();
    let gelu_op = ops::gelu(&x).unwrap().to_vec().unwrap();
    let silu_op = ops::silu(&x).unwrap().to_vec().unwrap();
    for (i, &v) in xs.iter().enumerate() {
        let g = gelu64(v as f64);
        let s = v as f64 / (1.0 + (-v as f64).exp());
        let rel = |got: f32, want: f64| {
            if want == 0.0 {
                got.abs() as f64
            } else {
                ((got as f64 - want) / want).abs()
            }
        };
        let tol = 1e-6 + 2e-7 * (v as f64).powi(2);
        for (what, err) in [
            ("gelu op", rel(gelu_op[i], g)),
            ("gelu scalar", rel(sdsparse::backend::cpu::simd::gelu(v), g)),
            ("silu op", rel(silu_op[i], s)),
            ("silu scalar", rel(sdsparse::backend::cpu::simd::silu(v), s)),
        ] {
            assert!(err < tol, "{what}({v}): relative error {err:e} ≥ {tol:e}");
        }
    }
}

#[test]
fn permute_with_merged_and_unit_axes() {
    // [B, C, H, W] ↔ [B, H, W, C] (the transformer's token layout) and unit axes anywhere.
    let mut rng = Rng::new(20);
    for (shape, perm) in [
        (vec![2usize, 40, 6, 7], vec![0usize, 2, 3, 1]),
        (vec![2, 6, 7, 40], vec![0, 3, 1, 2]),
        (vec![1, 3, 1, 5, 2], vec![4, 2, 0, 3, 1]),
        (vec![3, 1, 4], vec![1, 2, 0]),
        (vec![1, 1], vec![1, 0]),
    ] {
        let x = rng.tensor(&shape, 1.0);
        let y = ops::permute(&x, &perm).unwrap();
        let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
        assert_eq!(y.shape(), &out_shape[..]);
        let (xv, yv) = (x.as_slice().unwrap(), y.as_slice().unwrap());
        let rank = shape.len();
        for (i, &v) in yv.iter().enumerate() {
            let mut rem = i;
            let mut src = vec![0usize; rank];
            for d in (0..rank).rev() {
                src[perm[d]] = rem % out_shape[d];
                rem /= out_shape[d];
            }
            let off = src.iter().zip(&shape).fold(0, |acc, (&ix, &n)| acc * n + ix);
            assert_eq!(v, xv[off], "permute {shape:?} by {perm:?} at {i}");
        }
    }
}
