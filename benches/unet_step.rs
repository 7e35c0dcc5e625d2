//! One denoising step of the full-size SD2.1-base UNet on the CPU: latents [2, 4, 64, 64]
//! (one classifier-free-guidance batch of a 512x512 image), timestep 500, text context
//! [2, 77, 1024], seeded random weights built in memory (no checkpoint needed).
//!
//! Variants: `dense`; `unstructured35` (every Linear weight pruned to 35% sparsity by
//! magnitude, top-k per row, run from the bitmap form); `sparse24` (every Linear weight
//! pruned 2:4, run from the 2:4 form). Convolutions stay dense in all three, as in the
//! study's checkpoints. Compare with `tools/bench_unet_torch.py` (same step in PyTorch).
//!
//! `cargo bench --bench unet_step [-- dense]`. A step takes seconds, so the sample count is
//! criterion's minimum (10) with one iteration per sample.

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use sdsparse::checkpoint::{ComponentStore, VarBuilder};
use sdsparse::format::{bitmap_row_bytes, sparse24_meta_row_bytes};
use sdsparse::model::config::UNetConfig;
use sdsparse::model::unet::UNet2DConditionModel;
use sdsparse::synth::{tensor_specs, tensor_values, SynthPreset};
use sdsparse::{BitmapWeight, HostData, Sparse24Weight, Tensor, Weight};
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

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

/// Keeps the `(1 - sparsity) * cols` largest-magnitude values of each row, as a bitmap weight.
fn prune_unstructured(w: &Tensor, sparsity: f64) -> Weight {
    let (rows, cols) = w.dims2().unwrap();
    let data = w.as_slice().unwrap();
    let keep = cols - (sparsity * cols as f64).round() as usize;
    let row_bytes = bitmap_row_bytes(cols);
    let mut bitmap = vec![0u8; rows * row_bytes];
    let mut values = Vec::with_capacity(rows * keep);
    let mut row_offsets = vec![0u32];
    let mut order: Vec<usize> = Vec::with_capacity(cols);
    for r in 0..rows {
        let row = &data[r * cols..(r + 1) * cols];
        order.clear();
        order.extend(0..cols);
        if keep < cols {
            order.select_nth_unstable_by(keep, |&a, &b| row[b].abs().total_cmp(&row[a].abs()));
        }
        let mut kept = order[..keep].to_vec();
        kept.sort_unstable();
        for &c in &kept {
            bitmap[r * row_bytes + c / 8] |= 1 << (c % 8);
            values.push(row[c]);
        }
        row_offsets.push(values.len() as u32);
    }
    Weight::Bitmap(BitmapWeight { rows, cols, bitmap, row_offsets, values: HostData::F32(values) })
}

/// Keeps the two largest-magnitude values of every group of 4 along each row, as 2:4.
fn prune_24(w: &Tensor) -> Weight {
    let (rows, cols) = w.dims2().unwrap();
    assert!(cols % 4 == 0, "2:4 needs in_features % 4 == 0");
    let data = w.as_slice().unwrap();
    let meta_row = sparse24_meta_row_bytes(cols);
    let mut values = Vec::with_capacity(rows * cols / 2);
    let mut meta = vec![0u8; rows * meta_row];
    for r in 0..rows {
        for g in 0..cols / 4 {
            let group = &data[r * cols + 4 * g..r * cols + 4 * g + 4];
            let mut idx = [0usize, 1, 2, 3];
            idx.sort_by(|&a, &b| group[b].abs().total_cmp(&group[a].abs()));
            let (i0, i1) = (idx[0].min(idx[1]), idx[0].max(idx[1]));
            values.push(group[i0]);
            values.push(group[i1]);
            let nibble = (i0 | (i1 << 2)) as u8;
            meta[r * meta_row + g / 2] |= if g % 2 == 0 { nibble } else { nibble << 4 };
        }
    }
    Weight::Sparse24(Sparse24Weight { rows, cols, values: HostData::F32(values), meta })
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

fn unet_step(c: &mut Criterion) {
    let dense = dense_unet();
    let (latents, context) = inputs();
    let timestep = 500.0;

    let mut group = c.benchmark_group("unet_step_sd21_base_2x4x64x64");
    group.sample_size(10).sampling_mode(SamplingMode::Flat).warm_up_time(Duration::from_millis(1));
    group.measurement_time(Duration::from_secs(10));

    let wanted = |name: &str| {
        let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
        filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()))
    };

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
