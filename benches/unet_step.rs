//! One denoising step of the full-size SD2.1-base UNet on the CPU: latents [2, 4, 64, 64]
//! (one classifier-free-guidance batch of a 512x512 image), timestep 500, text context
//! [2, 77, 1024], seeded random weights built in memory (no checkpoint needed).
//!
//! Variants: `dense`; `unstructured35` (every Linear weight pruned to 35% sparsity by
//! magnitude, layer-wise, run from the bitmap form); `sparse24` (every Linear weight
//! pruned 2:4, run from the 2:4 form). Convolutions stay dense in all three, as in the
//! study's checkpoints. Compare with `tools/bench_unet_torch.py` (same step in PyTorch).
//!
//! `cargo bench --bench unet_step [-- dense]`. A step takes seconds, so the sample count is
//! criterion's minimum (10) with one iteration per sample.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use sdsparse::checkpoint::{ComponentStore, VarBuilder};
use sdsparse::model::config::UNetConfig;
use sdsparse::model::unet::UNet2DConditionModel;
use sdsparse::prune::{layer_cut, magnitude_keys, prune_count, sparse24_mask, unstructured_mask};
use sdsparse::synth::{tensor_specs, tensor_values, SynthPreset};
use sdsparse::{BitmapWeight, HostData, Sparse24Weight, Tensor, Weight};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEED: u64 = 0x5D2_1BA5E;
const UNSTRUCTURED_SPARSITY: f64 = 0.35;

fn dense_unet() -> UNet2DConditionModel {
    let specs = tensor_specs(SynthPreset::Sd21Base, "unet").expect("embedded SD2.1 manifest");
    let tensors: HashMap<String, Tensor> = specs
        .iter()
        .map(|s| (s.name.clone(), Tensor::from_vec(tensor_values(s, SEED), &s.shape).unwrap()))
        .collect();
    let vb = VarBuilder::new(Arc::new(ComponentStore::from_tensors("synthetic sd2.1-base unet", tensors)));
    UNet2DConditionModel::load(&vb, &UNetConfig::v2_1_base()).expect("unet builds")
}

/// Magnitude pruning of one layer to `sparsity` (the `convert` code path: layer-wise cut
/// of the smallest |w|), compressed to the bitmap form.
fn prune_unstructured(w: &Tensor, sparsity: f64) -> Weight {
    let (rows, cols) = w.dims2().unwrap();
    let dense = HostData::F32(w.to_vec().unwrap());
    let keys = magnitude_keys(&dense);
    let cut = layer_cut(&keys, prune_count(sparsity, rows * cols)).unwrap();
    let (keep, _) = unstructured_mask(&keys, rows, cols, cut);
    Weight::Bitmap(BitmapWeight::from_dense(&dense, rows, cols, &keep).unwrap())
}

/// 2:4 magnitude pruning (the two largest |w| of every group of 4 along a row).
fn prune_24(w: &Tensor) -> Weight {
    let (rows, cols) = w.dims2().unwrap();
    let dense = HostData::F32(w.to_vec().unwrap());
    let keep = sparse24_mask(&magnitude_keys(&dense), rows, cols);
    Weight::Sparse24(Sparse24Weight::from_dense(&dense, rows, cols, &keep).unwrap())
}

/// A copy of `dense` whose Linear weights are replaced by `prune(weight)` (convolutions,
/// norms and biases are shared with `dense`).
fn pruned_copy(dense: &UNet2DConditionModel, prune: impl Fn(&Tensor) -> Weight) -> UNet2DConditionModel {
    let mut model = dense.clone();
    for linear in model.linears_mut() {
        let Weight::Dense(w) = linear.weight() else { unreachable!("synthetic weights are dense") };
        let pruned = prune(w);
        linear.set_weight(pruned).unwrap();
    }
    model
}

fn inputs() -> (Tensor, Tensor) {
    let latents =
        tensor_values(&sdsparse::synth::TensorSpec { name: "latents".into(), shape: vec![2, 4, 64, 64] }, 1);
    let context =
        tensor_values(&sdsparse::synth::TensorSpec { name: "context".into(), shape: vec![2, 77, 1024] }, 2);
    // tensor_values draws uniform [-0.05, 0.05) for these names; scale to unit-ish range.
    let scale = |v: Vec<f32>| v.into_iter().map(|x| x * 20.0).collect::<Vec<_>>();
    (
        Tensor::from_vec(scale(latents), &[2, 4, 64, 64]).unwrap(),
        Tensor::from_vec(scale(context), &[2, 77, 1024]).unwrap(),
    )
}

/// User + system CPU time of this process (all threads), from `/proc/self/stat` (Linux;
/// NaN elsewhere). Clock ticks are 100 per second on Linux.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return f64::NAN };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { return f64::NAN };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (ticks(11) + ticks(12)) / 100.0
}

/// `UNET_STEP_ITERS=N`: instead of criterion's 10 samples per variant, one untimed step
/// then `N` timed steps per variant, printed like `tools/bench_unet_torch.py` prints them
/// (for a side-by-side run on a busy machine, where 10 samples of each take too long).
fn quick_mode(iters: usize, variants: &[(&str, &UNet2DConditionModel)], latents: &Tensor, context: &Tensor) {
    for (name, model) in variants {
        let mut times = Vec::new();
        for i in 0..=iters {
            let (t0, c0) = (Instant::now(), process_cpu_seconds());
            black_box(model.forward(latents, 500.0, context).unwrap());
            let dt = t0.elapsed().as_secs_f64();
            let cpu = process_cpu_seconds() - c0;
            // CPU time (all threads) is the fairer figure on a shared, overloaded machine.
            println!("{name} {}: {dt:.3} s wall, {cpu:.3} s cpu", if i == 0 { "warmup" } else { "step" });
            if i > 0 {
                times.push(dt);
            }
        }
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
        println!("{name}: mean {mean:.3} s over {} steps (min {min:.3} s)", times.len());
    }
}

fn unet_step(c: &mut Criterion) {
    let dense = dense_unet();
    let (latents, context) = inputs();
    let timestep = 500.0;
    println!("rayon threads: {}", rayon::current_num_threads());

    let wanted = |name: &str| {
        let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
        filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()))
    };

    if let Some(iters) = std::env::var("UNET_STEP_ITERS").ok().and_then(|v| v.parse::<usize>().ok()) {
        let unstructured = wanted("unstructured35")
            .then(|| pruned_copy(&dense, |w| prune_unstructured(w, UNSTRUCTURED_SPARSITY)));
        let sparse24 = wanted("sparse24").then(|| pruned_copy(&dense, prune_24));
        let mut variants = Vec::new();
        if wanted("dense") {
            variants.push(("dense", &dense));
        }
        variants.extend(unstructured.as_ref().map(|m| ("unstructured35", m)));
        variants.extend(sparse24.as_ref().map(|m| ("sparse24", m)));
        quick_mode(iters.max(1), &variants, &latents, &context);
        return;
    }

    let mut group = c.benchmark_group("unet_step_sd21_base_2x4x64x64");
    group.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_secs(10));

    if wanted("dense") {
        group.bench_function("dense", |b| {
            b.iter(|| black_box(dense.forward(&latents, timestep, &context).unwrap()))
        });
    }
    if wanted("unstructured35") {
        let sparse = pruned_copy(&dense, |w| prune_unstructured(w, UNSTRUCTURED_SPARSITY));
        group.bench_function("unstructured35", |b| {
            b.iter(|| black_box(sparse.forward(&latents, timestep, &context).unwrap()))
        });
    }
    if wanted("sparse24") {
        let sparse = pruned_copy(&dense, prune_24);
        group.bench_function("sparse24", |b| {
            b.iter(|| black_box(sparse.forward(&latents, timestep, &context).unwrap()))
        });
    }
    group.finish();
}

criterion_group!(benches, unet_step);
criterion_main!(benches);
