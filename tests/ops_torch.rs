//! CPU ops against PyTorch / diffusers outputs on small random inputs
//! (`tests/fixtures/ops/ops_reference.safetensors`, made by `tools/make_ops_reference.py`).
//! Tolerance: relative L2 error < 1e-5 (f32 against f32, different summation orders).

mod ops_common;

use ops_common::*;
use safetensors::SafeTensors;
use sdsparse::backend::{ops, Tensor};

struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    fn load() -> Fixture {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ops/ops_reference.safetensors");
        Fixture { bytes: std::fs::read(path).expect("fixture present") }
    }
    fn get(&self, name: &str) -> Tensor {
        let st = SafeTensors::deserialize(&self.bytes).expect("valid safetensors");
        let view = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
        let data: Vec<f32> =
            view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        Tensor::from_vec(data, view.shape()).expect("shape")
    }
    fn check(&self, what: &str, got: &Tensor, name: &str) {
        let want = self.get(name);
        assert_eq!(got.shape(), want.shape(), "{what}");
        assert_close(what, got, &f64s(&want), F32_TOL);
    }
}

#[test]
fn norms_match_pytorch() {
    let f = Fixture::load();
    let (x, g, b) = (f.get("gn_x"), f.get("gn_gamma"), f.get("gn_beta"));
    f.check("group_norm", &ops::group_norm(&x, 4, &g, &b, 1e-5, false).unwrap(), "gn_out");
    f.check("group_norm+silu", &ops::group_norm(&x, 4, &g, &b, 1e-5, true).unwrap(), "gn_silu_out");
    let (x, g, b) = (f.get("ln_x"), f.get("ln_gamma"), f.get("ln_beta"));
    f.check("layer_norm", &ops::layer_norm(&x, &g, &b, 1e-5).unwrap(), "ln_out");
}

#[test]
fn conv2d_matches_pytorch() {
    let f = Fixture::load();
    let (x, w, b) = (f.get("conv_x"), f.get("conv_w"), f.get("conv_b"));
    f.check("conv 3x3 s1 p1", &ops::conv2d(&x, &w, Some(&b), 1, 1).unwrap(), "conv_s1p1_out");
    f.check("conv 3x3 s2 p1", &ops::conv2d(&x, &w, Some(&b), 2, 1).unwrap(), "conv_s2p1_out");
    let (w, b) = (f.get("conv1x1_w"), f.get("conv1x1_b"));
    f.check("conv 1x1", &ops::conv2d(&x, &w, Some(&b), 1, 0).unwrap(), "conv1x1_out");
}

#[test]
fn attention_matches_pytorch() {
    let f = Fixture::load();
    let scale = 1.0 / 16f32.sqrt();
    let (q, k, v) = (f.get("attn_q"), f.get("attn_k"), f.get("attn_v"));
    f.check("cross attention", &ops::attention(&q, &k, &v, scale, false).unwrap(), "attn_out");
    let (q, k, v) = (f.get("causal_q"), f.get("causal_k"), f.get("causal_v"));
    f.check("causal attention", &ops::attention(&q, &k, &v, scale, true).unwrap(), "causal_out");
}

#[test]
fn activations_match_pytorch() {
    let f = Fixture::load();
    let x = f.get("act_x");
    f.check("gelu", &ops::gelu(&x).unwrap(), "gelu_out");
    f.check("silu", &ops::silu(&x).unwrap(), "silu_out");
    f.check("geglu", &ops::geglu(&x).unwrap(), "geglu_out");
    f.check("softmax", &ops::softmax_last(&ops::scale(&x, 3.0).unwrap()).unwrap(), "softmax_out");
    f.check("upsample", &ops::upsample_nearest2x(&f.get("up_x")).unwrap(), "up_out");
}

#[test]
fn timestep_embedding_matches_diffusers() {
    let f = Fixture::load();
    let ts = f.get("ts").to_vec().unwrap();
    // Same f32 operation order as diffusers: agreement to a few ulp of the sin/cos argument.
    let y = ops::timestep_embedding(&ts, 320, true, 0.0).unwrap();
    f.check("timestep_embedding 320", &y, "ts_320_flip_shift0");
    let y = ops::timestep_embedding(&ts, 64, false, 1.0).unwrap();
    f.check("timestep_embedding 64", &y, "ts_64_noflip_shift1");
}
