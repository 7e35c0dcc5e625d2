//! Weights kept in their stored dtype (f16 / bf16 / f32, `backend::CpuStorage`) and widened at
//! use: dtype round trips, the f32-only accessors' errors, and the weight-reading ops
//! (`linear`, `conv2d`, `embedding`) and whole models giving bit for bit the results of the
//! same weights widened to f32 beforehand.

use half::{bf16, f16};
use sdsparse::backend::ops;
use sdsparse::checkpoint::{ComponentStore, VarBuilder};
use sdsparse::model::vae::{VaeConfig, VaeDecoder};
use sdsparse::{DType, Tensor, Weight};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

/// Deterministic values spread over several binades, with a sign mix (never zeros only).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(12345);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32 - 0.5) * 4.0
        })
        .collect()
}

fn f16_tensor(shape: &[usize], seed: u32) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_f16_vec(values(n, seed).into_iter().map(f16::from_f32).collect(), shape).unwrap()
}

#[test]
fn dtype_round_trips() {
    let v = values(257, 1);
    let t = Tensor::from_vec(v.clone(), &[257]).unwrap();
    assert_eq!(t.dtype(), DType::F32);
    let h = t.to_dtype(DType::F16).unwrap();
    assert_eq!(h.dtype(), DType::F16);
    assert_eq!(h.nbytes(), 2 * 257);
    // Narrowing rounds to nearest even; widening back is exact, and so is a second trip.
    let want: Vec<f32> = v.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    assert_eq!(h.to_vec().unwrap(), want);
    let back = h.to_dtype(DType::F32).unwrap();
    assert_eq!(back.dtype(), DType::F32);
    assert_eq!(back.as_slice().unwrap(), want.as_slice());
    assert_eq!(back.to_dtype(DType::F16).unwrap().to_vec().unwrap(), want);
    let b = t.to_dtype(DType::BF16).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    let want_b: Vec<f32> = v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    assert_eq!(b.to_vec().unwrap(), want_b);
    // f16 → bf16 goes through f32 (exact) then rounds once.
    let hb = h.to_dtype(DType::BF16).unwrap();
    let want_hb: Vec<f32> = want.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    assert_eq!(hb.to_vec().unwrap(), want_hb);
    // Constructors check the length; a same-dtype conversion shares the data.
    assert!(Tensor::from_f16_vec(vec![f16::ONE; 3], &[2, 2]).is_err());
    assert!(Tensor::from_bf16_vec(vec![bf16::ONE; 4], &[2, 2]).is_ok());
    assert_eq!(h.to_dtype(DType::F16).unwrap().to_vec().unwrap(), want);
}

#[test]
fn as_slice_refuses_half_data_with_a_clear_error() {
    let h = f16_tensor(&[3, 4], 2);
    let e = h.as_slice().unwrap_err().to_string();
    assert!(e.contains("f16") && e.contains("[3, 4]"), "{e}");
    let e = h.to_dtype(DType::BF16).unwrap().as_slice().unwrap_err().to_string();
    assert!(e.contains("bf16"), "{e}");
    // Ops on activations read f32 only: an f16 input is an error, not a silent widening.
    assert!(ops::silu(&h).unwrap_err().to_string().contains("f16"));
    // to_vec widens.
    assert_eq!(h.to_vec().unwrap().len(), 12);
}

#[test]
fn linear_with_half_weights_equals_widened_weights_bit_for_bit() {
    let x = Tensor::from_vec(values(5 * 37, 3), &[5, 37]).unwrap();
    let bias = Tensor::from_vec(values(19, 4), &[19]).unwrap();
    for dtype in [DType::F16, DType::BF16] {
        let w = Tensor::from_vec(values(19 * 37, 5), &[19, 37]).unwrap().to_dtype(dtype).unwrap();
        let wide = w.to_dtype(DType::F32).unwrap();
        let a = ops::linear(&x, &Weight::Dense(w.clone()), Some(&bias)).unwrap();
        let b = ops::linear(&x, &Weight::Dense(wide), Some(&bias)).unwrap();
        assert_eq!(a.dtype(), DType::F32);
        assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "{dtype:?}");
    }
}

#[test]
fn conv2d_with_half_weights_equals_widened_weights_bit_for_bit() {
    let x = Tensor::from_vec(values(2 * 6 * 9 * 7, 6), &[2, 6, 9, 7]).unwrap();
    let bias = Tensor::from_vec(values(5, 7), &[5]).unwrap();
    for (k, stride, pad) in [(3, 1, 1), (3, 2, 1), (1, 1, 0)] {
        let w = f16_tensor(&[5, 6, k, k], 8);
        let wide = w.to_dtype(DType::F32).unwrap();
        let a = ops::conv2d(&x, &w, Some(&bias), stride, pad).unwrap();
        let b = ops::conv2d(&x, &wide, Some(&bias), stride, pad).unwrap();
        assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap(), "{k}x{k} stride {stride}");
    }
}

#[test]
fn embedding_from_a_half_table_widens_the_rows_asked_for() {
    let table = f16_tensor(&[11, 6], 9);
    let wide = table.to_dtype(DType::F32).unwrap();
    let ids = [3u32, 0, 10, 3];
    let a = ops::embedding(&table, &ids).unwrap();
    let b = ops::embedding(&wide, &ids).unwrap();
    assert_eq!(a.shape(), [4, 6]);
    assert_eq!(a.to_vec().unwrap(), b.to_vec().unwrap());
    assert!(ops::embedding(&table, &[11]).is_err());
}

/// The f16 toy's VAE: loaded from its file, the weights stay f16 (`get_stored`), and decoding
/// gives bit for bit what the same weights widened to f32 at load (the former behaviour) give.
#[test]
fn f16_checkpoint_stays_f16_and_decodes_like_its_f32_widening() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy-shapes/vae");
    let store = ComponentStore::open(&dir).unwrap();
    let conv = "decoder.conv_in.weight";
    let vb = VarBuilder::new(Arc::new(ComponentStore::open(&dir).unwrap()));
    let shape = store.tensor_f32(conv).unwrap().shape().to_vec();
    let stored = vb.get_stored(conv, &shape).unwrap();
    assert_eq!(stored.dtype(), DType::F16);
    // `get` widens; reading twice (its pages of the map were released after the first copy)
    // gives the same values.
    let wide = vb.get(conv, &shape).unwrap();
    assert_eq!(wide.dtype(), DType::F32);
    assert_eq!(wide.to_vec().unwrap(), stored.to_vec().unwrap());
    assert_eq!(vb.get_stored(conv, &shape).unwrap().to_vec().unwrap(), stored.to_vec().unwrap());

    let widened: HashMap<String, Tensor> =
        store.names().into_iter().map(|n| (n.clone(), store.tensor_f32(&n).unwrap())).collect();
    let config = VaeConfig::from_file(&dir.join("config.json")).unwrap();
    let half = VaeDecoder::new(&VarBuilder::new(Arc::new(store)), &config).unwrap();
    let full =
        VaeDecoder::new(&VarBuilder::new(Arc::new(ComponentStore::from_tensors("f32", widened))), &config)
            .unwrap();
    let latents = Tensor::from_vec(values(4 * 5 * 6, 10), &[1, 4, 5, 6]).unwrap();
    let a = half.decode(&latents).unwrap().to_vec().unwrap();
    let b = full.decode(&latents).unwrap().to_vec().unwrap();
    assert_eq!(a, b);
}

/// The whole f16 toy pipeline (text encoder and UNet weights kept in f16) gives bit for bit
/// the latents of the same pipeline with every weight widened to f32 at load, and its weight
/// memory counts the matrices and kernels at 2 bytes per value.
#[test]
fn f16_pipeline_equals_its_f32_widening() {
    use sdsparse::model::clip_text::{ClipTextConfig, ClipTextModel};
    use sdsparse::model::config::UNetConfig;
    use sdsparse::model::unet::UNet2DConditionModel;
    use sdsparse::{Device, GenerateRequest, StableDiffusion};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy-shapes");
    let widened = |c: &str| {
        let store = ComponentStore::open(&root.join(c)).unwrap();
        let t = store.names().into_iter().map(|n| (n.clone(), store.tensor_f32(&n).unwrap())).collect();
        VarBuilder::new(Arc::new(ComponentStore::from_tensors(c, t)))
    };
    let half = StableDiffusion::load(&root, &Device::Cpu).unwrap();
    let mut full = StableDiffusion::load(&root, &Device::Cpu).unwrap();
    let te_cfg = ClipTextConfig::from_file(&root.join("text_encoder/config.json")).unwrap();
    full.replace_text_encoder(ClipTextModel::new(&widened("text_encoder"), &te_cfg).unwrap());
    let unet_cfg = UNetConfig::from_file(&root.join("unet/config.json")).unwrap();
    full.replace_unet(UNet2DConditionModel::load(&widened("unet"), &unet_cfg).unwrap());
    let mut req = GenerateRequest::new("a red circle on a blue background");
    req.steps = 2;
    let a = half.denoise(&req, &mut |_, _| {}).unwrap().latents.to_vec().unwrap();
    let b = full.denoise(&req, &mut |_, _| {}).unwrap().latents.to_vec().unwrap();
    assert_eq!(a, b);
    // Memory: the f16 file's matrices count 2 bytes a value, so the total is well under the
    // f32 widening's 4 bytes a parameter.
    let m = half.memory();
    let params: usize = m.entries.values().map(|e| e.1).sum();
    let bytes = m.total_bytes() as f64;
    assert!(bytes < 2.2 * params as f64, "{bytes} bytes for {params} params");
}

/// Stored dtypes through a real safetensors file: f16 / bf16 stay as stored, f64 is narrowed
/// to f32, and an f64 value beyond f32's range (infinite once narrowed) is refused at load.
#[test]
fn stored_dtypes_from_a_file() {
    use safetensors::tensor::{serialize_to_file, Dtype, TensorView};
    let dir = tempfile::tempdir().unwrap();
    let h: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect();
    let b: Vec<u8> = [0.25f32, 3.0].iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();
    let d: Vec<u8> = [0.5f64, 1.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    let big: Vec<u8> = [1e300f64, 1.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    let views = [
        ("h", TensorView::new(Dtype::F16, vec![2], &h).unwrap()),
        ("b", TensorView::new(Dtype::BF16, vec![2], &b).unwrap()),
        ("d", TensorView::new(Dtype::F64, vec![2], &d).unwrap()),
        ("big", TensorView::new(Dtype::F64, vec![2], &big).unwrap()),
    ];
    serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let store = ComponentStore::open(dir.path()).unwrap();
    let t = store.tensor_stored("h").unwrap();
    assert_eq!((t.dtype(), t.to_vec().unwrap()), (DType::F16, vec![1.5, -2.0]));
    let t = store.tensor_stored("b").unwrap();
    assert_eq!((t.dtype(), t.to_vec().unwrap()), (DType::BF16, vec![0.25, 3.0]));
    let t = store.tensor_stored("d").unwrap();
    assert_eq!((t.dtype(), t.as_slice().unwrap()), (DType::F32, &[0.5f32, 1.0][..]));
    assert_eq!(store.tensor_f32("h").unwrap().dtype(), DType::F32);
    let e = store.tensor_stored("big").unwrap_err().to_string();
    assert!(e.contains("NaN/infinite"), "{e}");
}
