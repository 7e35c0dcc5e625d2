//! Where a pipeline comes from: a diffusers folder or a single-file checkpoint. Everything
//! that takes a model path (`convert`, `generate`, `inspect`, `export`, the library's
//! `StableDiffusion::load`) opens it through [`ModelSource::open`], so a single file works
//! wherever a folder does.

use super::single_file::{SingleFileModel, SingleFileOptions};
use super::ComponentStore;
use crate::error::{Error, Result};
use crate::model::tokenizer::ClipTokenizer;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A diffusers folder or a single-file checkpoint.
#[derive(Clone)]
pub enum ModelSource {
    Folder(PathBuf),
    SingleFile(Arc<SingleFileModel>),
}

impl ModelSource {
    /// A folder is taken as a diffusers folder (`opts` must then be empty); a file as a
    /// single-file checkpoint.
    pub fn open(path: &Path, opts: &SingleFileOptions) -> Result<Self> {
        if path.is_file() {
            return Ok(ModelSource::SingleFile(Arc::new(SingleFileModel::open(path, opts)?)));
        }
        if !path.exists() {
            return Err(Error::Checkpoint(format!("{}: not found", path.display())));
        }
        // A component folder (unet/, vae/, ...) given for the pipeline: its config.json sits where
        // model_index.json would, and the loader would otherwise complain about the tokenizer.
        if !path.join("model_index.json").exists()
            && path.join("config.json").is_file()
            && !path.join("unet").exists()
        {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            return Err(Error::Checkpoint(format!(
                "{}: this is one component ({name}) of a pipeline, not the pipeline; give the folder that holds \
                 model_index.json (probably {})",
                path.display(),
                parent.display()
            )));
        }
        if !opts.is_default() {
            return Err(Error::Invalid(format!(
                "{}: --config, --prediction-type, --upcast-attention and --no-ema apply to single-file \
                 checkpoints; a diffusers folder carries its own configs",
                path.display()
            )));
        }
        Ok(ModelSource::Folder(path.to_path_buf()))
    }

    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Folder(p) => p,
            ModelSource::SingleFile(s) => &s.path,
        }
    }

    /// The components that hold weights, sorted.
    pub fn weight_components(&self) -> Result<Vec<String>> {
        match self {
            ModelSource::Folder(dir) => {
                Ok(listed_components(dir)?.into_iter().filter(|c| has_weights(&dir.join(c))).collect())
            }
            ModelSource::SingleFile(_) => {
                Ok(super::single_file::COMPONENTS.iter().map(|s| s.to_string()).collect())
            }
        }
    }

    /// One component's tensors.
    pub fn store(&self, component: &str) -> Result<ComponentStore> {
        match self {
            ModelSource::Folder(dir) => ComponentStore::open(&dir.join(component)),
            ModelSource::SingleFile(s) => s.store(component),
        }
    }

    /// A config file's text by relative path (`unet/config.json`,
    /// `scheduler/scheduler_config.json`, ...).
    pub fn config_text(&self, rel: &str) -> Result<String> {
        match self {
            ModelSource::Folder(dir) => {
                let p = dir.join(rel);
                std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))
            }
            ModelSource::SingleFile(s) => s.config_text(rel).map(str::to_string),
        }
    }

    /// The tokenizer: the folder's `tokenizer/`, or for a single file the `--config`
    /// folder's or the bundled SD2 one.
    pub fn tokenizer(&self) -> Result<ClipTokenizer> {
        let dir = match self {
            ModelSource::Folder(dir) => Some(dir.join("tokenizer")),
            ModelSource::SingleFile(s) => s.tokenizer_dir.clone(),
        };
        if let Some(d) = dir {
            return ClipTokenizer::from_dir(&d);
        }
        let files: std::collections::BTreeMap<&str, &str> =
            crate::synth::embedded::TOKENIZER.iter().copied().collect();
        let parse = |name: &str| -> Result<serde_json::Value> {
            serde_json::from_str(files[name])
                .map_err(|e| Error::Msg(format!("bundled tokenizer {name}: {e}")))
        };
        ClipTokenizer::from_parts(
            &parse("vocab.json")?,
            files["merges.txt"],
            Some(&parse("special_tokens_map.json")?),
            Some(&parse("tokenizer_config.json")?),
        )
    }
}

/// The components a pipeline folder's `model_index.json` lists (non-null entries), sorted.
pub fn listed_components(model: &Path) -> Result<Vec<String>> {
    let path = model.join("model_index.json");
    if !model.is_dir() {
        return Err(Error::Checkpoint(format!("{}: folder not found", model.display())));
    }
    let text = std::fs::read_to_string(&path).map_err(|_| {
        Error::Checkpoint(format!("{}: not a diffusers folder (no model_index.json)", model.display()))
    })?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{}: invalid JSON ({e})", path.display())))?;
    let obj =
        v.as_object().ok_or_else(|| Error::Checkpoint(format!("{}: not a JSON object", path.display())))?;
    let mut out: Vec<String> = obj
        .iter()
        .filter(|(k, v)| !k.starts_with('_') && v.as_array().is_some_and(|a| a.len() == 2 && !a[0].is_null()))
        .map(|(k, _)| k.clone())
        .collect();
    out.sort();
    Ok(out)
}

/// A component folder that holds weights (as opposed to tokenizer / scheduler).
pub fn has_weights(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        })
        .unwrap_or(false)
}

/// Refuses, before any work, a model that `what` (sweep, plan) cannot start from: anything
/// [`ModelSource::open`] refuses (a missing path, a component folder) and a checkpoint already
/// converted by sdsparse (its text encoder or UNet has a sparse header): pruning starts from dense.
pub fn require_dense(path: &Path, what: &str) -> Result<()> {
    let src = ModelSource::open(path, &SingleFileOptions::default())?;
    if let ModelSource::Folder(dir) = &src {
        for c in ["text_encoder", "unet"] {
            if dir.join(c).is_dir() && src.store(c)?.sparse_header().is_some() {
                return Err(Error::Invalid(format!(
                    "{}: {what} needs a dense checkpoint (this one is already converted; give the model it \
                     was converted from)",
                    path.display()
                )));
            }
        }
    }
    Ok(())
}
