//! The trained toy SD2 ("toy-shapes", `assets/toy-shapes/`, made by `tools/train_toy.py`),
//! embedded in the binary so `sdsparse demo` and sweeps work from an installed binary with no
//! path into the source tree: a tiny SD2-family pipeline trained on 64x64 images of one
//! filled circle, square or triangle on a plain background, captioned
//! `a {colour} {shape} on a {colour} background` (`task.json`).

use crate::error::{Error, Result};
use std::path::Path;

/// Every file of the toy model's diffusers folder, by relative path.
pub const FILES: [(&str, &[u8]); 13] = [
    ("model_index.json", include_bytes!("../assets/toy-shapes/model_index.json")),
    ("task.json", include_bytes!("../assets/toy-shapes/task.json")),
    ("train_info.json", include_bytes!("../assets/toy-shapes/train_info.json")),
    (
        "scheduler/scheduler_config.json",
        include_bytes!("../assets/toy-shapes/scheduler/scheduler_config.json"),
    ),
    ("text_encoder/config.json", include_bytes!("../assets/toy-shapes/text_encoder/config.json")),
    ("text_encoder/model.safetensors", include_bytes!("../assets/toy-shapes/text_encoder/model.safetensors")),
    ("unet/config.json", include_bytes!("../assets/toy-shapes/unet/config.json")),
    (
        "unet/diffusion_pytorch_model.safetensors",
        include_bytes!("../assets/toy-shapes/unet/diffusion_pytorch_model.safetensors"),
    ),
    ("vae/config.json", include_bytes!("../assets/toy-shapes/vae/config.json")),
    (
        "vae/diffusion_pytorch_model.safetensors",
        include_bytes!("../assets/toy-shapes/vae/diffusion_pytorch_model.safetensors"),
    ),
    // The real SD2 tokenizer (the toy folder holds copies of these fixture files).
    ("tokenizer/vocab.json", include_bytes!("../tests/fixtures/sd2-tokenizer/vocab.json")),
    ("tokenizer/merges.txt", include_bytes!("../tests/fixtures/sd2-tokenizer/merges.txt")),
    (
        "tokenizer/special_tokens_map.json",
        include_bytes!("../tests/fixtures/sd2-tokenizer/special_tokens_map.json"),
    ),
];

/// The tokenizer config (listed apart: the array above has a fixed length).
const TOKENIZER_CONFIG: (&str, &[u8]) = (
    "tokenizer/tokenizer_config.json",
    include_bytes!("../tests/fixtures/sd2-tokenizer/tokenizer_config.json"),
);

/// Writes the toy model's folder to `dir` (built in a temporary sibling, then renamed; an
/// existing `dir` is replaced only with `force`).
pub fn write_model(dir: &Path, force: bool) -> Result<()> {
    if dir.exists() && !force {
        return Err(Error::Invalid(format!("{} exists (pass --force to replace it)", dir.display())));
    }
    let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "toy".into());
    let tmp = dir.with_file_name(format!(".{name}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    for (rel, bytes) in FILES.iter().chain(std::iter::once(&TOKENIZER_CONFIG)) {
        let path = tmp.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}
