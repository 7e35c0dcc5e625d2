//! Synthesises SD2-architecture checkpoints with seeded random weights: the embedded tiny
//! model the demo runs without any download, and full-size SD2.1 / SD2.1-base checkpoints
//! for benchmarks (no real weights are ever needed or shipped).
//!
//! The result is a diffusers folder (`model_index.json`, `scheduler/`, `tokenizer/`,
//! `text_encoder/`, `unet/`, `vae/`) that diffusers itself loads. Tensor names and shapes
//! come from embedded manifests: the tiny fixture's (`assets/tiny-sd2/tensors.json`) and
//! the real SD2.1 ones (`tests/fixtures/sd2.1-configs/manifests/`). Values follow PyTorch's
//! default initialisation scale (uniform ±1/√fan_in) so activations stay in a sane range;
//! every tensor is generated from `(seed, name, chunk)` alone, so output is identical
//! whatever the thread count.

use crate::error::{Error, Result};
use crate::format::DType;
use half::{bf16, f16};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Which architecture to synthesise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SynthPreset {
    /// The tiny SD2 test architecture (about 3.4 M parameters, 64x64 images).
    Tiny,
    /// Full-size SD2.1-base (512x512, epsilon).
    Sd21Base,
    /// Full-size SD2.1 (768x768, v-prediction).
    Sd21,
}

impl SynthPreset {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "tiny" => Ok(SynthPreset::Tiny),
            "sd2.1-base" | "sd21-base" => Ok(SynthPreset::Sd21Base),
            "sd2.1" | "sd21" => Ok(SynthPreset::Sd21),
            _ => Err(Error::Invalid(format!("unknown preset {s:?} (expected tiny, sd2.1-base or sd2.1)"))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            SynthPreset::Tiny => "tiny",
            SynthPreset::Sd21Base => "sd2.1-base",
            SynthPreset::Sd21 => "sd2.1",
        }
    }
}

/// The component folders and their weight-file names, in write order.
const COMPONENTS: [(&str, &str); 3] = [
    ("text_encoder", "model.safetensors"),
    ("unet", "diffusion_pytorch_model.safetensors"),
    ("vae", "diffusion_pytorch_model.safetensors"),
];

pub(crate) mod embedded {
    pub const TOKENIZER: [(&str, &str); 4] = [
        ("vocab.json", include_str!("../tests/fixtures/sd2-tokenizer/vocab.json")),
        ("merges.txt", include_str!("../tests/fixtures/sd2-tokenizer/merges.txt")),
        ("special_tokens_map.json", include_str!("../tests/fixtures/sd2-tokenizer/special_tokens_map.json")),
        ("tokenizer_config.json", include_str!("../tests/fixtures/sd2-tokenizer/tokenizer_config.json")),
    ];
    pub const TINY_TENSORS: &str = include_str!("../assets/tiny-sd2/tensors.json");
    pub const TINY_CONFIGS: [(&str, &str); 5] = [
        ("model_index.json", include_str!("../assets/tiny-sd2/model_index.json")),
        (
            "scheduler/scheduler_config.json",
            include_str!("../assets/tiny-sd2/scheduler/scheduler_config.json"),
        ),
        ("text_encoder/config.json", include_str!("../assets/tiny-sd2/text_encoder/config.json")),
        ("unet/config.json", include_str!("../assets/tiny-sd2/unet/config.json")),
        ("vae/config.json", include_str!("../assets/tiny-sd2/vae/config.json")),
    ];
    macro_rules! sd21 {
        ($v:literal) => {
            [
                (
                    "model_index.json",
                    include_str!(concat!("../tests/fixtures/sd2.1-configs/", $v, "/model_index.json")),
                ),
                (
                    "scheduler/scheduler_config.json",
                    include_str!(concat!(
                        "../tests/fixtures/sd2.1-configs/",
                        $v,
                        "/scheduler/scheduler_config.json"
                    )),
                ),
                (
                    "text_encoder/config.json",
                    include_str!(concat!(
                        "../tests/fixtures/sd2.1-configs/",
                        $v,
                        "/text_encoder/config.json"
                    )),
                ),
                (
                    "unet/config.json",
                    include_str!(concat!("../tests/fixtures/sd2.1-configs/", $v, "/unet/config.json")),
                ),
                (
                    "vae/config.json",
                    include_str!(concat!("../tests/fixtures/sd2.1-configs/", $v, "/vae/config.json")),
                ),
            ]
        };
    }
    pub const SD21_BASE_CONFIGS: [(&str, &str); 5] = sd21!("stable-diffusion-2-1-base");
    pub const SD21_CONFIGS: [(&str, &str); 5] = sd21!("stable-diffusion-2-1");
    pub const SD21_MANIFESTS: [(&str, &str); 3] = [
        ("text_encoder", include_str!("../tests/fixtures/sd2.1-configs/manifests/text_encoder.json")),
        ("unet", include_str!("../tests/fixtures/sd2.1-configs/manifests/unet.json")),
        ("vae", include_str!("../tests/fixtures/sd2.1-configs/manifests/vae.json")),
    ];
}

/// One tensor to synthesise.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

fn bad_manifest(e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("embedded manifest is invalid: {e}"))
}

/// One manifest entry: `[name, shape]` (the tiny list) or `{"name", "shape", ..}` (the SD2.1
/// manifests).
fn parse_spec(entry: &serde_json::Value) -> Result<TensorSpec> {
    let (name, shape) = match entry {
        serde_json::Value::Array(pair) => (pair.first(), pair.get(1)),
        _ => (entry.get("name"), entry.get("shape")),
    };
    let name = name.and_then(|n| n.as_str()).ok_or_else(|| bad_manifest("tensor without a name"))?;
    let shape = shape
        .and_then(|s| s.as_array())
        .and_then(|s| s.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| bad_manifest(format!("tensor {name} without a valid shape")))?;
    Ok(TensorSpec { name: name.to_string(), shape })
}

/// The tensors of `component` ("text_encoder", "unet" or "vae") for a preset.
pub fn tensor_specs(preset: SynthPreset, component: &str) -> Result<Vec<TensorSpec>> {
    let (text, list_key) = match preset {
        SynthPreset::Tiny => (embedded::TINY_TENSORS, component),
        SynthPreset::Sd21Base | SynthPreset::Sd21 => {
            let text = embedded::SD21_MANIFESTS
                .iter()
                .find(|(c, _)| *c == component)
                .map(|(_, t)| *t)
                .ok_or_else(|| bad_manifest(component))?;
            (text, "tensors")
        }
    };
    let v: serde_json::Value = serde_json::from_str(text).map_err(bad_manifest)?;
    let list = v.get(list_key).and_then(|l| l.as_array()).ok_or_else(|| bad_manifest(component))?;
    list.iter().map(parse_spec).collect()
}

/// Options of [`write_checkpoint`].
#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub preset: SynthPreset,
    pub dtype: DType,
    pub seed: u64,
    /// Replace an existing output folder.
    pub force: bool,
}

/// What [`write_checkpoint`] wrote.
#[derive(Debug, Clone)]
pub struct SynthReport {
    pub out: PathBuf,
    /// (component, parameters, bytes on disk)
    pub components: Vec<(String, usize, u64)>,
}

/// splitmix64: a small, high-quality, seekable generator (we seed one per chunk).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a, to give every tensor name its own stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// `(centre, half_width)` of the uniform distribution a tensor is drawn from.
fn init_range(spec: &TensorSpec) -> (f32, f32) {
    let is_norm = spec.name.contains("norm") && spec.shape.len() == 1;
    if spec.name.contains("embedding") && spec.shape.len() == 2 && !spec.name.contains("time_embedding") {
        // Token / position tables: std 0.02 as CLIP initialises them (uniform: half-width = std·√3).
        (0.0, 0.02 * 3f32.sqrt())
    } else if spec.shape.len() >= 2 {
        let fan_in: usize = spec.shape[1..].iter().product();
        (0.0, 1.0 / (fan_in.max(1) as f32).sqrt())
    } else if is_norm && spec.name.ends_with(".weight") {
        // Norm scales near 1, perturbed so that a wrong channel order would show in tests.
        (1.0, 0.1)
    } else {
        (0.0, 0.05)
    }
}

const CHUNK: usize = 1 << 16;

/// The values of one tensor, deterministic in `(seed, name)`.
pub fn tensor_values(spec: &TensorSpec, seed: u64) -> Vec<f32> {
    let (centre, half) = init_range(spec);
    let base = seed ^ name_hash(&spec.name);
    let mut out = vec![0f32; spec.numel()];
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(ci, chunk)| {
        let mut state = base.wrapping_add((ci as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        for v in chunk.iter_mut() {
            // 24 random bits → uniform in [-1, 1).
            let u = (splitmix64(&mut state) >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            *v = centre + half * u;
        }
    });
    out
}

fn encode(values: &[f32], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        DType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
    }
}

fn st_dtype(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "F32",
        DType::F16 => "F16",
        DType::BF16 => "BF16",
    }
}

/// Streams one safetensors file: header first, then each tensor generated on the fly, so
/// memory stays at one tensor whatever the model size.
fn write_safetensors(path: &Path, specs: &[TensorSpec], dtype: DType, seed: u64) -> Result<u64> {
    let mut header = serde_json::Map::new();
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    meta.insert("sdsparse_synth_seed".into(), seed.to_string().into());
    header.insert("__metadata__".into(), meta.into());
    let mut offset = 0usize;
    for s in specs {
        let bytes = s.numel() * dtype.size_in_bytes();
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": st_dtype(dtype), "shape": s.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header).map_err(|e| Error::Msg(e.to_string()))?;
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    let file = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    let io = |e| Error::io(path, e);
    w.write_all(&(header.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&header).map_err(io)?;
    for s in specs {
        w.write_all(&encode(&tensor_values(s, seed), dtype)).map_err(io)?;
    }
    w.flush().map_err(io)?;
    Ok((8 + header.len() + offset) as u64)
}

fn write_text(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Writes a complete diffusers folder at `out` (via a temporary folder renamed at the end).
/// `progress(component, done, total)` is called after each component.
pub fn write_checkpoint(
    opts: &SynthOptions,
    out: &Path,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<SynthReport> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    // Checked (absent unless force, writable parent), written in a temporary sibling folder,
    // renamed when complete; errors name the output, not the temporary folder.
    let tmp = crate::output::TempDir::new(out, opts.force, "--out")?;
    let report = write_into(opts, tmp.path(), &mut progress).map_err(|e| tmp.name_output(e))?;
    tmp.commit()?;
    Ok(SynthReport { out: out.to_path_buf(), components: report })
}

fn write_into(
    opts: &SynthOptions,
    dir: &Path,
    progress: &mut impl FnMut(&str, usize, usize),
) -> Result<Vec<(String, usize, u64)>> {
    let configs: &[(&str, &str)] = match opts.preset {
        SynthPreset::Tiny => &embedded::TINY_CONFIGS,
        SynthPreset::Sd21Base => &embedded::SD21_BASE_CONFIGS,
        SynthPreset::Sd21 => &embedded::SD21_CONFIGS,
    };
    for (rel, text) in configs {
        write_text(&dir.join(rel), text)?;
    }
    for (rel, text) in embedded::TOKENIZER {
        write_text(&dir.join("tokenizer").join(rel), text)?;
    }
    let mut report = Vec::new();
    for (i, (component, file)) in COMPONENTS.iter().enumerate() {
        let specs = tensor_specs(opts.preset, component)?;
        let params = specs.iter().map(TensorSpec::numel).sum();
        let seed = opts.seed.wrapping_add(i as u64);
        let bytes = write_safetensors(&dir.join(component).join(file), &specs, opts.dtype, seed)?;
        report.push((component.to_string(), params, bytes));
        progress(component, i + 1, COMPONENTS.len());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_specs_match_fixture_counts() {
        let n = |c| tensor_specs(SynthPreset::Tiny, c).unwrap().iter().map(TensorSpec::numel).sum::<usize>();
        // Parameter counts of tests/fixtures/tiny-sd2-eps (reference.json) plus the text
        // encoder's position_ids buffer that older checkpoints do not have.
        assert_eq!(n("unet"), 1_106_212);
        assert_eq!(n("vae"), 658_375);
    }

    #[test]
    fn sd21_specs_match_manifest_totals() {
        let n =
            |c| tensor_specs(SynthPreset::Sd21Base, c).unwrap().iter().map(TensorSpec::numel).sum::<usize>();
        assert_eq!(n("unet"), 865_910_724);
        assert_eq!(n("text_encoder"), 340_387_840);
    }

    #[test]
    fn values_are_deterministic_and_in_range() {
        let spec = TensorSpec { name: "a.weight".into(), shape: vec![300, 400] };
        let a = tensor_values(&spec, 7);
        assert_eq!(a, tensor_values(&spec, 7));
        assert_ne!(a, tensor_values(&spec, 8));
        let b = 1.0 / 20.0;
        assert!(a.iter().all(|v| v.abs() <= b));
        assert!(a.iter().filter(|v| **v == 0.0).count() < 5);
    }
}
