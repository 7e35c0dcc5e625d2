//! Shared by the tests that compare against diffusers' reference outputs: fixture paths,
//! f32 tensors of a safetensors file, and the relative error every comparison uses.

// Each test binary uses its own subset of these helpers.
#![allow(dead_code)]

use sdsparse::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `tests/fixtures/<rel>` under the crate root: `CARGO_MANIFEST_DIR` at run time when set (the
/// device check runs these executables in another checkout and sets it to that root), else the
/// root this executable was built in.
pub fn fixture(rel: &str) -> PathBuf {
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    root.join("tests/fixtures").join(rel)
}

/// Every f32 tensor of a safetensors file, by name, as `(shape, values)`.
pub fn load_f32_raw(path: &Path) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(k, v)| {
            let data =
                v.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            (k, (v.shape().to_vec(), data))
        })
        .collect()
}

/// Every f32 tensor of a safetensors file, by name.
pub fn load_f32(path: &Path) -> HashMap<String, Tensor> {
    load_f32_raw(path)
        .into_iter()
        .map(|(k, (shape, data))| (k, Tensor::from_vec(data, &shape).unwrap()))
        .collect()
}

/// ‖a − b‖ / ‖b‖ in f64; a NaN anywhere fails the test.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    let e = (num / den).sqrt();
    assert!(!e.is_nan(), "NaN in comparison");
    e
}
