//! Helpers shared by the format / prune / convert / checkpoint tests: fixture paths,
//! folder copies, raw safetensors reading and writing, and an independent (sort-based)
//! reference of magnitude pruning.
#![allow(dead_code)]

use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd2-eps")
}

pub fn configs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/sd2.1-configs")
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        if p.is_dir() {
            copy_dir(&p, &to.join(e.file_name()));
        } else {
            std::fs::copy(&p, to.join(e.file_name())).unwrap();
        }
    }
}

/// A tensor as stored: dtype, shape, raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Raw {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

pub fn read_file(path: &Path) -> (BTreeMap<String, Raw>, Option<std::collections::HashMap<String, String>>) {
    let buf = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&buf).unwrap();
    let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        out.insert(
            name,
            Raw { dtype: view.dtype(), shape: view.shape().to_vec(), bytes: view.data().to_vec() },
        );
    }
    (out, meta.metadata().clone())
}

pub fn write_file(
    path: &Path,
    tensors: &BTreeMap<String, Raw>,
    meta: Option<std::collections::HashMap<String, String>>,
) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, r)| {
            (n.clone(), safetensors::tensor::TensorView::new(r.dtype, r.shape.clone(), &r.bytes).unwrap())
        })
        .collect();
    safetensors::serialize_to_file(views, meta, path).unwrap();
}

pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

pub fn f16s_as_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

/// Reference magnitude pruning: indices sorted by (|w|, index); the first `k` are pruned.
pub fn reference_pruned(values: &[f32], k: usize) -> Vec<bool> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[a].abs().total_cmp(&values[b].abs()).then(a.cmp(&b)));
    let mut pruned = vec![false; values.len()];
    for &i in &idx[..k] {
        pruned[i] = true;
    }
    pruned
}

/// `floor(s * n)` as the spec states it.
pub fn floor_count(s: f64, n: usize) -> usize {
    (s * n as f64).floor() as usize
}

pub fn weight_file(dir: &Path, component: &str) -> PathBuf {
    dir.join(component).join(if component == "text_encoder" {
        "model.safetensors"
    } else {
        "diffusion_pytorch_model.safetensors"
    })
}

/// Runs the binary; returns (exit code, stdout, stderr).
pub fn run_bin(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdsparse")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Whether a tensor of the tiny text encoder / UNet is prunable by default.
pub fn default_prunable(component: &str, name: &str, shape: &[usize]) -> bool {
    let linear = name.ends_with(".weight") && shape.len() == 2 && !name.contains("embeddings.");
    match component {
        "text_encoder" => linear && name.trim_start_matches("text_model.").starts_with("encoder.layers."),
        "unet" => linear,
        _ => false,
    }
}
