//! The SD2 UNet against diffusers: its configs, its tensor names and shapes on the real
//! SD2.1 manifest (structure only, no weights), and one call of the tiny fixture model
//! against the reference outputs diffusers produced.

use sdsparse::backend::{CpuStorage, Storage};
use sdsparse::checkpoint::{ComponentStore, VarBuilder};
use sdsparse::model::config::UNetConfig;
use sdsparse::model::unet::UNet2DConditionModel;
use sdsparse::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn sd21_config(variant: &str) -> UNetConfig {
    let path = fixtures().join("sd2.1-configs").join(variant).join("unet/config.json");
    UNetConfig::from_file(&path).expect("SD2.1 unet config parses")
}

#[test]
fn named_constructors_equal_the_sd21_config_files() {
    assert_eq!(sd21_config("stable-diffusion-2-1"), UNetConfig::v2_1());
    assert_eq!(sd21_config("stable-diffusion-2-1-base"), UNetConfig::v2_1_base());
    let cfg = UNetConfig::v2_1();
    assert_eq!(cfg.heads_per_block().unwrap(), vec![5, 10, 20, 20], "attention_head_dim is the head count");
    assert_eq!(cfg.time_embed_dim(), 1280);
    assert_eq!(cfg.downsample_factor(), 8);
}

#[test]
fn tiny_config_parses() {
    let cfg = UNetConfig::from_file(&fixtures().join("tiny-sd2-eps/unet")).unwrap();
    assert_eq!(cfg.block_out_channels, vec![32, 64]);
    assert_eq!(cfg.heads_per_block().unwrap(), vec![2, 4]);
    assert_eq!(cfg.cross_attention_dim, 32);
}

#[test]
fn unsupported_configs_are_clear_errors() {
    let base = std::fs::read_to_string(fixtures().join("tiny-sd2-eps/unet/config.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["class_embed_type"] = serde_json::json!("timestep");
    let err = UNetConfig::from_json_str(&v.to_string()).unwrap_err().to_string();
    assert!(err.contains("class embeddings"), "{err}");

    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["attention_head_dim"] = serde_json::json!([3, 4]);
    let err = UNetConfig::from_json_str(&v.to_string()).unwrap_err().to_string();
    assert!(err.contains("heads"), "{err}");

    let err = UNetConfig::from_json_str("{not json").unwrap_err().to_string();
    assert!(err.contains("invalid config.json"), "{err}");
}

/// Reads the manifest's `tensors` as name → shape.
fn manifest_shapes() -> Vec<(String, Vec<usize>)> {
    let path = fixtures().join("sd2.1-configs/manifests/unet.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let name = t["name"].as_str().unwrap().to_string();
            let shape = t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (name, shape)
        })
        .collect()
}

/// How many owners share a tensor's buffer.
fn owners(t: &Tensor) -> usize {
    match t.storage() {
        Storage::Cpu(CpuStorage::F32(data)) => Arc::strong_count(data),
        _ => unreachable!("the test builds CPU tensors"),
    }
}

/// Builds the full-size UNet over zero tensors (lazily mapped zero pages: no real memory)
/// for every manifest tensor. Construction succeeding proves every tensor the model asks
/// for exists with the manifest's shape (`VarBuilder` checks shapes); every manifest
/// tensor then being shared by the model (a third owner of its buffer, besides this test
/// and the store) proves the model uses all of them.
fn check_structure(config: &UNetConfig) {
    let manifest = manifest_shapes();
    assert_eq!(manifest.len(), 686);
    let tensors: HashMap<String, Tensor> =
        manifest.iter().map(|(name, shape)| (name.clone(), Tensor::zeros(shape))).collect();
    let vb = VarBuilder::new(Arc::new(ComponentStore::from_tensors("sd2.1 unet manifest", tensors.clone())));
    let mut model = UNet2DConditionModel::load(&vb, config)
        .unwrap_or_else(|e| panic!("the model does not fit the manifest: {e}"));
    assert_eq!(model.linears_mut().len(), 216, "SD2.1 has 216 Linear layers (manifest `linear.count`)");
    let unused: Vec<&String> = manifest.iter().map(|(n, _)| n).filter(|n| owners(&tensors[*n]) < 3).collect();
    assert!(unused.is_empty(), "{} manifest tensors the model does not use: {unused:?}", unused.len());
    drop((model, vb));
}

#[test]
fn structure_matches_sd21_manifest() {
    check_structure(&UNetConfig::v2_1());
}

#[test]
fn structure_matches_sd21_base_manifest() {
    check_structure(&UNetConfig::v2_1_base());
}

#[test]
fn wrong_shapes_are_clear_errors() {
    let mut tensors: HashMap<String, Tensor> =
        manifest_shapes().into_iter().map(|(name, shape)| (name, Tensor::zeros(&shape))).collect();
    tensors.insert("down_blocks.1.attentions.0.proj_in.weight".into(), Tensor::zeros(&[640, 320]));
    let store = ComponentStore::from_tensors("broken", tensors);
    let err = UNet2DConditionModel::load(&VarBuilder::new(Arc::new(store)), &UNetConfig::v2_1_base())
        .unwrap_err()
        .to_string();
    assert!(err.contains("down_blocks.1.attentions.0.proj_in.weight"), "{err}");
}

fn tiny_unet() -> UNet2DConditionModel {
    UNet2DConditionModel::from_dir(&fixtures().join("tiny-sd2-eps/unet")).expect("tiny unet loads")
}

fn reference(name: &str) -> Tensor {
    let store = ComponentStore::open(&fixtures().join("tiny-sd2-eps/reference")).unwrap();
    store.tensor_f32(name).unwrap()
}

fn rel_error(out: &Tensor, reference: &Tensor) -> f64 {
    assert_eq!(out.shape(), reference.shape());
    let (a, b) = (out.to_vec().unwrap(), reference.to_vec().unwrap());
    let diff: f64 = a.iter().zip(&b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    let e = (diff / norm).sqrt();
    assert!(e.is_finite(), "NaN/inf in the output");
    e
}

fn check_call(embeds: &str, expected: &str) {
    let unet = tiny_unet();
    let out = unet.forward(&reference("init_latents"), 981.0, &reference(embeds)).unwrap();
    let e = rel_error(&out, &reference(expected));
    eprintln!("{expected}: relative error {e:.3e}");
    assert!(e < 1e-4, "{expected}: relative error {e:.3e}");
}

#[test]
fn unet_matches_diffusers_t981_cond() {
    check_call("cond_embeds", "unet_out_t981_cond");
}

#[test]
fn unet_matches_diffusers_t981_uncond() {
    check_call("uncond_embeds", "unet_out_t981_uncond");
}

#[test]
fn batched_call_with_per_sample_timesteps_matches_single_calls() {
    let unet = tiny_unet();
    let latents = reference("init_latents");
    let cond = reference("cond_embeds");
    let uncond = reference("uncond_embeds");
    let latents2 = sdsparse::backend::ops::cat(&[&latents, &latents], 0).unwrap();
    let ctx2 = sdsparse::backend::ops::cat(&[&uncond, &cond], 0).unwrap();
    let out = unet.forward_timesteps(&latents2, &[981.0, 500.0], &ctx2).unwrap();
    let second = sdsparse::backend::ops::narrow(&out, 0, 1, 1).unwrap();
    let single = unet.forward(&latents, 500.0, &cond).unwrap();
    assert!(rel_error(&second, &single) < 1e-5);
    let first = sdsparse::backend::ops::narrow(&out, 0, 0, 1).unwrap();
    assert!(rel_error(&first, &reference("unet_out_t981_uncond")) < 1e-4);
}

#[test]
fn bad_inputs_are_clear_errors() {
    let unet = tiny_unet();
    let ctx = Tensor::zeros(&[1, 77, 32]);
    // Odd sizes run (the upsampler takes the skip connection's size, as diffusers; checked
    // against diffusers in tests/inputs.rs); an empty one is an error.
    let out = unet.forward(&Tensor::zeros(&[1, 4, 31, 33]), 1.0, &ctx).unwrap();
    assert_eq!(out.shape(), [1, 4, 31, 33]);
    let err = unet.forward(&Tensor::zeros(&[1, 4, 0, 32]), 1.0, &ctx).unwrap_err().to_string();
    assert!(err.contains("must be positive"), "{err}");
    let err = unet.forward(&Tensor::zeros(&[1, 3, 32, 32]), 1.0, &ctx).unwrap_err().to_string();
    assert!(err.contains("channels"), "{err}");
    let err = unet.forward(&Tensor::zeros(&[1, 4, 32, 32]), 1.0, &Tensor::zeros(&[1, 77, 16])).unwrap_err();
    assert!(err.to_string().contains("text embeddings"), "{err}");
    let err = unet.forward_timesteps(&Tensor::zeros(&[2, 4, 32, 32]), &[1.0], &ctx).unwrap_err();
    assert!(err.to_string().contains("timesteps"), "{err}");
}

/// The tiny UNet with every Linear weight pruned (`prune` returns the compressed weight
/// and its dense-with-zeros twin): the compressed model must match the masked dense one.
fn check_sparse_matches_masked_dense(prune: impl Fn(&Tensor) -> (sdsparse::Weight, sdsparse::Weight)) {
    let mut sparse = tiny_unet();
    let mut masked = sparse.clone();
    for (s, m) in sparse.linears_mut().into_iter().zip(masked.linears_mut()) {
        let sdsparse::Weight::Dense(w) = s.weight() else { panic!("fixture weights are dense") };
        let (compressed, dense_twin) = prune(w);
        s.set_weight(compressed).unwrap();
        m.set_weight(dense_twin).unwrap();
    }
    let (latents, ctx) = (reference("init_latents"), reference("cond_embeds"));
    let out = sparse.forward(&latents, 981.0, &ctx).unwrap();
    let expected = masked.forward(&latents, 981.0, &ctx).unwrap();
    let e = rel_error(&out, &expected);
    assert!(e < 1e-5, "relative error {e:.3e}");
    // The pruning must have changed the result (else the test proves nothing).
    assert!(rel_error(&out, &reference("unet_out_t981_cond")) > 1e-3);
}

fn compressed_and_twin(
    w: &Tensor,
    keep_of: impl Fn(&[u32], usize, usize) -> Vec<u8>,
    bitmap: bool,
) -> (sdsparse::Weight, sdsparse::Weight) {
    use sdsparse::{BitmapWeight, HostData, Sparse24Weight, Weight};
    let (rows, cols) = w.dims2().unwrap();
    let dense = HostData::F32(w.to_vec().unwrap());
    let keep = keep_of(&sdsparse::prune::magnitude_keys(&dense), rows, cols);
    let rb = cols.div_ceil(8);
    let mut masked = dense.to_f32();
    for r in 0..rows {
        for c in 0..cols {
            if keep[r * rb + c / 8] >> (c % 8) & 1 == 0 {
                masked[r * cols + c] = 0.0;
            }
        }
    }
    let compressed = if bitmap {
        Weight::Bitmap(BitmapWeight::from_dense(&dense, rows, cols, &keep).unwrap())
    } else {
        Weight::Sparse24(Sparse24Weight::from_dense(&dense, rows, cols, &keep).unwrap())
    };
    (compressed, Weight::Dense(Tensor::from_vec(masked, &[rows, cols]).unwrap()))
}

#[test]
fn unstructured_sparse_unet_matches_masked_dense() {
    use sdsparse::prune::{layer_cut, prune_count, unstructured_mask};
    check_sparse_matches_masked_dense(|w| {
        let keep_of = |keys: &[u32], rows: usize, cols: usize| {
            let cut = layer_cut(keys, prune_count(0.5, rows * cols)).unwrap();
            unstructured_mask(keys, rows, cols, cut).0
        };
        compressed_and_twin(w, keep_of, true)
    });
}

#[test]
fn sparse24_unet_matches_masked_dense() {
    check_sparse_matches_masked_dense(|w| {
        compressed_and_twin(w, |k: &[u32], r, c| sdsparse::prune::sparse24_mask(k, r, c), false)
    });
}
