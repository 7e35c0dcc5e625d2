//! `sdsparse convert` speed.
//!
//! - `convert/tiny`: the whole tiny fixture at the study's default targets.
//! - `prune_layer/*`: the core of a conversion, on the largest SD2.1 UNet Linear
//!   (`ff.net.0.proj`, 10240 x 1280, f16): find the exact cut, build the mask, gather
//!   the kept values (unstructured 35%), or build the 2:4 mask and encode.
//! - `convert/full`: only when `SDSPARSE_BENCH_CHECKPOINT` names a full-size dense
//!   diffusers folder (for example one written by `sdsparse synth --preset sd2.1-base`).
//!   A run takes seconds, so it uses criterion's minimum sample count.
//!
//! `cargo bench --bench convert`. The end-to-end wall time and peak memory of the CLI are
//! measured with `/usr/bin/time -v` and recorded in `docs/BENCHMARKS.md`.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use sdsparse::convert::{convert, ConvertOptions};
use sdsparse::format::codec::{encode_sparse24_bytes, gather_kept_bytes};
use sdsparse::prune::{self, Keys};
use sdsparse::DType;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd2-eps")
}

fn bench_convert_tiny(c: &mut Criterion) {
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = tmp.path().join("sparse");
    let opts = ConvertOptions { force: true, ..Default::default() };
    c.bench_function("convert/tiny", |b| {
        b.iter(|| black_box(convert(&fixture(), &out, &opts, &mut |_| {}).expect("convert")))
    });
}

/// Seeded f16 values with a spread of magnitudes (no NaN / inf).
fn layer_bytes(n: usize) -> Vec<u8> {
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut out = Vec::with_capacity(2 * n);
    for _ in 0..n {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let v = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1;
        out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes());
    }
    out
}

fn bench_prune_layer(c: &mut Criterion) {
    let (rows, cols) = (10240, 1280);
    let bytes = layer_bytes(rows * cols);
    let mut g = c.benchmark_group("prune_layer");
    g.sample_size(10);
    g.bench_function("unstructured35_f16_10240x1280", |b| {
        b.iter(|| {
            let keys = Keys::magnitude(DType::F16, &bytes);
            let k = prune::prune_count(0.35, rows * cols);
            let cut = prune::layer_cut(keys, k).expect("cut");
            let (mask, pruned) = prune::unstructured_mask(keys, rows, cols, cut);
            let values = gather_kept_bytes(&bytes, 2, rows, cols, &mask);
            black_box((mask, pruned, values))
        })
    });
    g.bench_function("sparse24_f16_10240x1280", |b| {
        b.iter(|| {
            let mask = prune::sparse24_mask(Keys::magnitude(DType::F16, &bytes), rows, cols);
            black_box(encode_sparse24_bytes(&bytes, 2, rows, cols, &mask).expect("encode"))
        })
    });
    g.finish();
}

fn bench_convert_full(c: &mut Criterion) {
    let Ok(model) = std::env::var("SDSPARSE_BENCH_CHECKPOINT") else {
        eprintln!("convert/full skipped: set SDSPARSE_BENCH_CHECKPOINT to a full-size diffusers folder");
        return;
    };
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = tmp.path().join("sparse");
    let opts = ConvertOptions { force: true, ..Default::default() };
    let mut g = c.benchmark_group("convert");
    g.sample_size(10).sampling_mode(SamplingMode::Flat).measurement_time(Duration::from_secs(30));
    g.bench_function("full", |b| {
        b.iter(|| black_box(convert(Path::new(&model), &out, &opts, &mut |_| {}).expect("convert")))
    });
    g.finish();
}

criterion_group!(benches, bench_convert_tiny, bench_prune_layer, bench_convert_full);
criterion_main!(benches);
