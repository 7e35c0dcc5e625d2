//! CPU op timings on the shapes of one full-size SD2.1-base UNet step (batch 2 = one CFG
//! pair, 64x64 latents): the convolutions, projections, attention and normalisations that
//! dominate the step. Run: `cargo bench --bench ops_cpu` (add `-- <filter>` for a subset).

use criterion::{criterion_group, criterion_main, Criterion};
use sdsparse::backend::{ops, Tensor};
use sdsparse::format::{bitmap_row_bytes, BitmapWeight, HostData, Weight};
use std::hint::black_box;

/// Deterministic non-zero pseudo-random values (the bench needs no statistics).
fn tensor(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
        })
        .collect();
    Tensor::from_vec(data, shape).expect("shape matches")
}

/// An unstructured weight keeping every other element (50% sparsity).
fn half_sparse(rows: usize, cols: usize) -> Weight {
    let row_bytes = bitmap_row_bytes(cols);
    let bitmap = vec![0x55u8; rows * row_bytes];
    let kept_per_row = (0..cols).filter(|c| c % 2 == 0).count();
    let row_offsets = (0..=rows).map(|r| (r * kept_per_row) as u32).collect();
    let values = HostData::F32(tensor(&[rows * kept_per_row], 7).to_vec().expect("cpu"));
    Weight::Bitmap(BitmapWeight { rows, cols, bitmap, row_offsets, values })
}

fn convs(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv2d");
    g.sample_size(10);
    for &(ch, hw, stride) in &[(320usize, 64usize, 1usize), (640, 32, 1), (1280, 16, 1), (320, 64, 2)] {
        let x = tensor(&[2, ch, hw, hw], 1);
        let w = tensor(&[ch, ch, 3, 3], 2);
        let b = tensor(&[ch], 3);
        g.bench_function(format!("3x3 {ch}ch {hw}x{hw} s{stride} b2"), |bench| {
            bench.iter(|| black_box(ops::conv2d(&x, &w, Some(&b), stride, 1).expect("conv")))
        });
    }
    let x = tensor(&[2, 640, 32, 32], 1);
    let w = tensor(&[320, 640, 1, 1], 2);
    g.bench_function("1x1 640->320ch 32x32 b2", |bench| {
        bench.iter(|| black_box(ops::conv2d(&x, &w, None, 1, 0).expect("conv")))
    });
    g.finish();
}

fn linears(c: &mut Criterion) {
    let mut g = c.benchmark_group("linear");
    g.sample_size(10);
    // Tokens of the 64x64 level (2 x 4096) through attention and feed-forward projections.
    for &(k, n) in &[(320usize, 320usize), (320, 2560), (1280, 320)] {
        let x = tensor(&[2, 4096, k], 1);
        let w = Weight::Dense(tensor(&[n, k], 2));
        let b = tensor(&[n], 3);
        g.bench_function(format!("dense [8192,{k}]x[{n},{k}]"), |bench| {
            bench.iter(|| black_box(ops::linear(&x, &w, Some(&b)).expect("linear")))
        });
    }
    let x = tensor(&[2, 4096, 320], 1);
    let w = half_sparse(2560, 320);
    g.bench_function("bitmap50% [8192,320]x[2560,320]", |bench| {
        bench.iter(|| black_box(ops::linear(&x, &w, None).expect("linear")))
    });
    g.finish();
}

fn attentions(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10);
    let q = tensor(&[2, 5, 4096, 64], 1);
    let k = tensor(&[2, 5, 4096, 64], 2);
    let v = tensor(&[2, 5, 4096, 64], 3);
    g.bench_function("self [2,5,4096,64]", |bench| {
        bench.iter(|| black_box(ops::attention(&q, &k, &v, 0.125, false).expect("attention")))
    });
    let (qi, ki, vi) = (tensor(&[2, 4096, 320], 1), tensor(&[2, 4096, 320], 2), tensor(&[2, 4096, 320], 3));
    g.bench_function("self heads-interleaved [2,4096,5x64]", |bench| {
        bench.iter(|| black_box(ops::attention_heads(&qi, &ki, &vi, 5, 0.125, false).expect("attention")))
    });
    let kc = tensor(&[2, 5, 77, 64], 4);
    let vc = tensor(&[2, 5, 77, 64], 5);
    g.bench_function("cross [2,5,4096,64]x77", |bench| {
        bench.iter(|| black_box(ops::attention(&q, &kc, &vc, 0.125, false).expect("attention")))
    });
    g.finish();
}

fn pointwise(c: &mut Criterion) {
    let mut g = c.benchmark_group("pointwise");
    g.sample_size(10);
    let x = tensor(&[2, 320, 64, 64], 1);
    let gamma = tensor(&[320], 2);
    let beta = tensor(&[320], 3);
    g.bench_function("group_norm+silu [2,320,64,64]/32", |bench| {
        bench.iter(|| black_box(ops::group_norm(&x, 32, &gamma, &beta, 1e-5, true).expect("gn")))
    });
    let t = tensor(&[2, 4096, 320], 4);
    g.bench_function("layer_norm [2,4096,320]", |bench| {
        bench.iter(|| black_box(ops::layer_norm(&t, &gamma, &beta, 1e-5).expect("ln")))
    });
    let h = tensor(&[2, 4096, 2560], 5);
    g.bench_function("geglu [2,4096,2560]", |bench| bench.iter(|| black_box(ops::geglu(&h).expect("geglu"))));
    g.bench_function("silu [2,320,64,64]", |bench| bench.iter(|| black_box(ops::silu(&x).expect("silu"))));
    let bias = tensor(&[2, 320, 1, 1], 6);
    g.bench_function("add [2,320,64,64]+[2,320,1,1]", |bench| {
        bench.iter(|| black_box(ops::add(&x, &bias).expect("add")))
    });
    let flat = x.reshape(&[2, 320, 4096]).expect("reshape");
    g.bench_function("permute [2,320,4096]->[2,4096,320]", |bench| {
        bench.iter(|| black_box(ops::permute(&flat, &[0, 2, 1]).expect("permute")))
    });
    g.finish();
}

criterion_group!(benches, convs, linears, attentions, pointwise);
criterion_main!(benches);
