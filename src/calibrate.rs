//! Calibration for activation-aware pruning (Wanda, OWL): runs the dense model on captions
//! and reduces the input of every Linear layer to per-feature sums of squares as it streams
//! (never storing activations), through the observer hook of [`Linear`].
//!
//! - Text encoder: the captions are encoded (padded to 77 tokens, as the pipeline does), in
//!   batches of [`TEXT_BATCH`]; every token of every caption counts.
//! - UNet: for each of the first `unet_samples` captions `i`, one DDIM run of `steps` steps (default 4: timesteps 751, 501, 251
//!   and 1 with SD2's leading spacing) at the model's default size with classifier-free
//!   guidance 7.5 and an empty negative prompt, from the pipeline's seeded noise with seed
//!   `seed + i` ([`crate::pipeline::GaussianNoise`]): the UNet sees exactly the inputs of
//!   real generations (both CFG halves, a spread of noise levels).
//!
//! The captions are the first `samples` lines of `--calibration-prompts` or of the 128
//! captions embedded in the binary ([`DEFAULT_PROMPTS`], written for this project).

use crate::backend::Tensor;
use crate::error::{Error, Result};
use crate::model::linear::{Linear, LinearObserver};
use crate::pipeline::{GenerateRequest, StableDiffusion};
use crate::prune::wanda::{ActivationStats, FeatureStats};
use crate::scheduler::SchedulerKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The 128 default calibration captions, one per line.
pub const DEFAULT_PROMPTS: &str = include_str!("../assets/calibration_prompts.txt");
/// Captions encoded per text-encoder call.
pub const TEXT_BATCH: usize = 8;

/// How calibration runs.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrationOptions {
    /// A text file with one caption per line; `None`: the embedded captions.
    pub prompts: Option<PathBuf>,
    /// How many captions (the first N of the file) the text encoder encodes.
    pub samples: usize,
    /// How many of those (the first M) drive a UNet run each (UNet calls cost far more).
    pub unet_samples: usize,
    /// DDIM steps of each UNet calibration run.
    pub steps: usize,
    /// Caption `i`'s initial latents come from seed `seed + i`.
    pub seed: u64,
    /// Classifier-free guidance of the UNet runs.
    pub guidance: f32,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        CalibrationOptions { prompts: None, samples: 128, unet_samples: 16, steps: 4, seed: 0, guidance: 7.5 }
    }
}

impl CalibrationOptions {
    /// The captions calibration uses (checked: at least `samples` non-empty lines).
    pub fn captions(&self) -> Result<Vec<String>> {
        if self.samples == 0 {
            return Err(Error::Invalid("--calibration-samples must be at least 1".into()));
        }
        if self.unet_samples == 0 {
            return Err(Error::Invalid("--calibration-unet-samples must be at least 1".into()));
        }
        if self.steps == 0 {
            return Err(Error::Invalid("--calibration-steps must be at least 1".into()));
        }
        let (text, source) = match &self.prompts {
            Some(p) => (
                std::fs::read_to_string(p)
                    .map_err(|e| Error::Invalid(format!("--calibration-prompts {}: {e}", p.display())))?,
                p.display().to_string(),
            ),
            None => (DEFAULT_PROMPTS.to_string(), "the default captions".to_string()),
        };
        let lines: Vec<String> =
            text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect();
        if lines.len() < self.samples {
            return Err(Error::Invalid(format!(
                "--calibration-samples {} asks for more captions than {source} has ({})",
                self.samples,
                lines.len()
            )));
        }
        Ok(lines.into_iter().take(self.samples).collect())
    }
}

/// A [`LinearObserver`] that keeps per-feature sums of squares of every layer's inputs.
#[derive(Debug, Default)]
pub struct Recorder {
    stats: Mutex<ActivationStats>,
}

impl Recorder {
    pub fn new() -> Arc<Recorder> {
        Arc::new(Recorder::default())
    }

    /// The statistics gathered so far (the recorder starts empty again).
    pub fn take(&self) -> ActivationStats {
        std::mem::take(&mut *self.stats.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl LinearObserver for Recorder {
    fn observe(&self, layer: &str, input: &Tensor) -> Result<()> {
        let features = input.shape().last().copied().unwrap_or(0);
        let data = input.as_slice()?;
        let mut stats = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        let entry = stats.entry(layer.to_string()).or_insert_with(|| FeatureStats::new(features));
        if entry.sum_sq.len() != features {
            return Err(Error::Shape(format!(
                "{layer}: input width changed from {} to {features} during calibration",
                entry.sum_sq.len()
            )));
        }
        entry.add(data)
    }
}

/// Attaches `observer` to every layer (or detaches all with `None`).
pub fn attach(linears: Vec<&mut Linear>, observer: Option<Arc<dyn LinearObserver>>) {
    for l in linears {
        l.set_observer(observer.clone());
    }
}

/// Progress of calibration: `done` of `total` units of a stage (`text_encoder`: captions,
/// `unet`: UNet calls).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalibrationProgress {
    pub stage: &'static str,
    pub done: usize,
    pub total: usize,
}

/// Text-encoder statistics from encoding `captions`.
pub fn text_encoder_stats(
    sd: &mut StableDiffusion,
    captions: &[String],
    progress: &mut dyn FnMut(CalibrationProgress),
) -> Result<ActivationStats> {
    let rec = Recorder::new();
    attach(sd.text_encoder_mut().linears_mut(), Some(rec.clone()));
    let mut run = || -> Result<()> {
        for (b, batch) in captions.chunks(TEXT_BATCH).enumerate() {
            let ids: Vec<Vec<u32>> = batch.iter().map(|c| sd.tokenizer().encode(c)).collect();
            sd.text_encoder().forward(&ids)?;
            let done = (b * TEXT_BATCH + batch.len()).min(captions.len());
            progress(CalibrationProgress { stage: "text_encoder", done, total: captions.len() });
        }
        Ok(())
    };
    let result = run();
    attach(sd.text_encoder_mut().linears_mut(), None);
    result.map(|_| rec.take())
}

/// UNet statistics from one short DDIM run per caption (see the module docs).
pub fn unet_stats(
    sd: &mut StableDiffusion,
    captions: &[String],
    opts: &CalibrationOptions,
    progress: &mut dyn FnMut(CalibrationProgress),
) -> Result<ActivationStats> {
    let rec = Recorder::new();
    attach(sd.unet_mut().linears_mut(), Some(rec.clone()));
    let total = captions.len() * opts.steps;
    let mut run = || -> Result<()> {
        for (i, caption) in captions.iter().enumerate() {
            let mut req = GenerateRequest::new(caption);
            req.steps = opts.steps;
            req.guidance = opts.guidance;
            req.scheduler = Some(SchedulerKind::Ddim);
            req.seed = opts.seed.wrapping_add(i as u64);
            sd.denoise(&req, &mut |done, _| {
                progress(CalibrationProgress { stage: "unet", done: i * opts.steps + done, total })
            })?;
        }
        Ok(())
    };
    let result = run();
    attach(sd.unet_mut().linears_mut(), None);
    result.map(|_| rec.take())
}

/// Statistics of the components asked for.
#[derive(Debug, Clone, Default)]
pub struct Calibration {
    pub text_encoder: Option<ActivationStats>,
    pub unet: Option<ActivationStats>,
    /// Captions the text encoder encoded.
    pub captions: usize,
    /// Captions that drove UNet runs.
    pub unet_captions: usize,
}

impl Calibration {
    /// The statistics of a component folder (`text_encoder`, `unet`).
    pub fn component(&self, name: &str) -> Option<&ActivationStats> {
        match name {
            "text_encoder" => self.text_encoder.as_ref(),
            "unet" => self.unet.as_ref(),
            _ => None,
        }
    }
}

/// Loads the dense pipeline in `model` (CPU) and calibrates the components asked for.
pub fn calibrate(
    model: &Path,
    opts: &CalibrationOptions,
    text_encoder: bool,
    unet: bool,
    progress: &mut dyn FnMut(CalibrationProgress),
) -> Result<Calibration> {
    let captions = opts.captions()?;
    if !opts.guidance.is_finite() {
        return Err(Error::Invalid(format!("calibration guidance {} is not finite", opts.guidance)));
    }
    let mut sd = StableDiffusion::load(model, &crate::backend::Device::Cpu)?;
    let unet_captions = &captions[..opts.unet_samples.min(captions.len())];
    let mut out =
        Calibration { captions: captions.len(), unet_captions: unet_captions.len(), ..Default::default() };
    if text_encoder {
        out.text_encoder = Some(text_encoder_stats(&mut sd, &captions, progress)?);
    }
    if unet {
        out.unet = Some(unet_stats(&mut sd, unet_captions, opts, progress)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_captions_are_128_distinct_lines() {
        let c = CalibrationOptions::default().captions().unwrap();
        assert_eq!(c.len(), 128);
        let mut d = c.clone();
        d.sort();
        d.dedup();
        assert_eq!(d.len(), 128);
    }

    #[test]
    fn caption_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("sdsparse-captions-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.txt");
        std::fs::write(&f, "a cat\n\n  a dog  \n").unwrap();
        let opts = |samples| CalibrationOptions {
            prompts: Some(f.clone()),
            samples,
            ..CalibrationOptions::default()
        };
        assert_eq!(opts(2).captions().unwrap(), vec!["a cat", "a dog"]);
        assert!(opts(3).captions().unwrap_err().to_string().contains("more captions than"));
        assert!(opts(0).captions().is_err());
        let missing =
            CalibrationOptions { prompts: Some(dir.join("none.txt")), ..CalibrationOptions::default() };
        assert!(missing.captions().unwrap_err().to_string().contains("--calibration-prompts"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
