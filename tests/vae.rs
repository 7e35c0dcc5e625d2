//! The VAE decoder against diffusers: `vae.decode(init_latents / 0.18215).sample` of the tiny
//! fixture (`vae_decode_init` in the reference), plus config and legacy-weight handling.

use sdsparse::checkpoint::{ComponentStore, VarBuilder};
use sdsparse::model::vae::{VaeConfig, VaeDecoder};
use sdsparse::Tensor;
use std::collections::HashMap;
use std::sync::Arc;

mod reference_util;
use reference_util::{fixture, load_f32, rel_err};

#[test]
fn configs_parse_and_scale_factor() {
    let tiny = VaeConfig::from_file(&fixture("tiny-sd2-eps/vae/config.json")).unwrap();
    assert_eq!(tiny.scale_factor(), 2);
    assert_eq!(tiny.scaling_factor, 0.18215);
    let real = VaeConfig::from_file(&fixture("sd2.1-configs/stable-diffusion-2-1/vae/config.json")).unwrap();
    assert_eq!(real.scale_factor(), 8);
    let named = VaeConfig::v2_1();
    assert_eq!(named.block_out_channels, real.block_out_channels);
    assert_eq!(named.layers_per_block, real.layers_per_block);
    assert_eq!(named.scaling_factor, real.scaling_factor);
}

#[test]
fn decode_matches_diffusers() {
    let refs = load_f32(&fixture("tiny-sd2-eps/reference/reference.safetensors"));
    let vae = VaeDecoder::from_dir(&fixture("tiny-sd2-eps/vae")).unwrap();
    let out = vae.decode(&refs["init_latents"]).unwrap();
    let want = &refs["vae_decode_init"];
    assert_eq!(out.shape(), want.shape());
    let e = rel_err(&out.to_vec().unwrap(), want.as_slice().unwrap());
    println!("VAE decode rel err vs diffusers: {e:.3e}");
    assert!(e < 1e-4, "VAE decode rel err {e}");
}

/// Old checkpoints name the mid-block attention `query/key/value/proj_attn` and very old ones
/// store those projections as 1x1 convs; both must decode identically to the current names.
#[test]
fn legacy_attention_names_and_conv_shapes_decode_the_same() {
    let store = ComponentStore::open(&fixture("tiny-sd2-eps/vae")).unwrap();
    let config = VaeConfig::from_file(&fixture("tiny-sd2-eps/vae/config.json")).unwrap();
    let mut legacy = HashMap::new();
    for name in store.names() {
        let t = store.tensor_f32(&name).unwrap();
        let renamed = name
            .replace(".to_q.", ".query.")
            .replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn.");
        let t = if renamed != name && t.rank() == 2 {
            let (a, b) = t.dims2().unwrap();
            t.reshape(&[a, b, 1, 1]).unwrap()
        } else {
            t
        };
        legacy.insert(renamed, t);
    }
    let vb = VarBuilder::new(Arc::new(ComponentStore::from_tensors("legacy vae", legacy)));
    let old = VaeDecoder::new(&vb, &config).unwrap();
    let new = VaeDecoder::new(&VarBuilder::new(Arc::new(store)), &config).unwrap();
    assert_eq!(old.num_params(), new.num_params());
    let refs = load_f32(&fixture("tiny-sd2-eps/reference/reference.safetensors"));
    let a = old.decode(&refs["init_latents"]).unwrap().to_vec().unwrap();
    let b = new.decode(&refs["init_latents"]).unwrap().to_vec().unwrap();
    assert_eq!(a, b);
}

#[test]
fn param_count_matches_the_decoder_tensors() {
    let store = ComponentStore::open(&fixture("tiny-sd2-eps/vae")).unwrap();
    let want: usize = store
        .names()
        .iter()
        .filter(|n| n.starts_with("decoder.") || n.starts_with("post_quant_conv."))
        .map(|n| store.tensor_f32(n).unwrap().numel())
        .sum();
    let vae = VaeDecoder::from_dir(&fixture("tiny-sd2-eps/vae")).unwrap();
    assert_eq!(vae.num_params(), want);
}

#[test]
fn wrong_latent_channels_is_an_error() {
    let vae = VaeDecoder::from_dir(&fixture("tiny-sd2-eps/vae")).unwrap();
    let x = Tensor::zeros(&[1, 3, 4, 4]);
    assert!(vae.decode(&x).is_err());
}

/// The full-size SD2.1 decoder over zero tensors of the manifest's shapes (structure only,
/// no weights): every tensor it asks for exists with the manifest's shape, and it uses
/// every decoder tensor of the manifest (parameter counts agree).
#[test]
fn structure_matches_sd21_manifest() {
    let path = fixture("sd2.1-configs/manifests/vae.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut tensors = HashMap::new();
    let mut decoder_numel = 0usize;
    for t in v["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap().to_string();
        let shape: Vec<usize> =
            t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        if name.starts_with("decoder.") || name.starts_with("post_quant_conv.") {
            decoder_numel += shape.iter().product::<usize>();
            tensors.insert(name, Tensor::zeros(&shape));
        }
    }
    let vb = VarBuilder::new(Arc::new(ComponentStore::from_tensors("sd2.1 vae manifest", tensors)));
    for config in [
        VaeConfig::v2_1(),
        VaeConfig::from_file(&fixture("sd2.1-configs/stable-diffusion-2-1-base/vae/config.json")).unwrap(),
    ] {
        let vae = VaeDecoder::new(&vb, &config)
            .unwrap_or_else(|e| panic!("decoder does not fit the manifest: {e}"));
        assert_eq!(vae.num_params(), decoder_numel);
        assert_eq!(vae.scale_factor(), 8);
    }
}

/// Tiled decoding against diffusers' `tiled_decode` (`enable_tiling()` with 16-pixel tiles on
/// the tiny VAE: a 20x26 latent in 4 x 5 overlapping tiles; tools/make_vae_tiling_reference.py).
#[test]
fn tiled_decode_matches_diffusers() {
    let refs = load_f32(&fixture("vae-tiling/reference.safetensors"));
    let vae = VaeDecoder::from_dir(&fixture("tiny-sd2-eps/vae")).unwrap();
    let (out, grid) = vae.decode_tiled(&refs["latents"], 16).unwrap();
    assert_eq!(grid, Some((4, 5)));
    let want = &refs["tiled"];
    assert_eq!(out.shape(), want.shape());
    let got = out.to_vec().unwrap();
    let e = rel_err(&got, want.as_slice().unwrap());
    let max = got.iter().zip(want.as_slice().unwrap()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("tiled VAE decode vs diffusers: rel err {e:.3e}, max abs {max:.3e}");
    assert!(e < 1e-4 && max < 1e-3, "tiled VAE decode rel err {e}, max abs {max}");
    // The reference is not the untiled decode in disguise: tiling changes the image.
    let untiled = rel_err(&got, refs["untiled"].as_slice().unwrap());
    assert!(untiled > 1e-2, "tiled output equals the untiled one (rel err {untiled})");
}

/// As diffusers, latents no larger than one tile are decoded in one piece; a tile that is not
/// a multiple of 4 latents is refused (diffusers' crops would not add up to the image).
#[test]
fn tiled_decode_small_latents_and_bad_tiles() {
    let refs = load_f32(&fixture("vae-tiling/reference.safetensors"));
    let vae = VaeDecoder::from_dir(&fixture("tiny-sd2-eps/vae")).unwrap();
    let (out, grid) = vae.decode_tiled(&refs["latents"], 64).unwrap();
    assert_eq!(grid, None);
    assert_eq!(out.to_vec().unwrap(), vae.decode(&refs["latents"]).unwrap().to_vec().unwrap());
    for bad in [0, 12, 15] {
        let e = vae.decode_tiled(&refs["latents"], bad).unwrap_err().to_string();
        assert!(e.contains("multiple of 8"), "{bad}: {e}");
    }
}
