//! The `sdsparse` command line: thin wrappers that parse flags and call the library.

/// `println!` that returns an error instead of panicking when standard output is closed
/// (`sdsparse inspect X | head -1`): the caller's `?` turns it into the one-line error.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($arg)*)
            .map_err(|e| anyhow::anyhow!("cannot write to standard output: {e}"))?;
    }};
}

pub mod convert;
pub mod demo;
pub mod generate;
pub mod inspect;
pub mod plan;
pub mod sweep;

use sdsparse::calibrate::CalibrationOptions;
use sdsparse::checkpoint::SingleFileOptions;
use sdsparse::prune::wanda::OwlParams;
use std::path::PathBuf;

/// Flags of the activation-aware methods (Wanda, OWL), shared by `convert` and `sweep`.
#[derive(clap::Args, Debug, Clone)]
pub struct CalibrationArgs {
    /// OWL: a score is an outlier above M x its block's mean score.
    #[arg(long, default_value_t = 5.0)]
    pub owl_m: f64,
    /// OWL: block sparsities spread over at most 2·λ around the target.
    #[arg(long, default_value_t = 0.08)]
    pub owl_lambda: f64,
    /// Wanda / OWL: calibration captions, one per line (default: 128 built-in captions).
    #[arg(long, value_name = "FILE")]
    pub calibration_prompts: Option<PathBuf>,
    /// Wanda / OWL: how many captions calibrate the text encoder (the first N).
    #[arg(long, default_value_t = 128)]
    pub calibration_samples: usize,
    /// Wanda / OWL: how many of those drive a UNet calibration run (the first M).
    #[arg(long, default_value_t = 16)]
    pub calibration_unet_samples: usize,
    /// Wanda / OWL: DDIM steps of each caption's UNet calibration run.
    #[arg(long, default_value_t = 4)]
    pub calibration_steps: usize,
}

impl CalibrationArgs {
    pub fn owl(&self) -> OwlParams {
        OwlParams { m: self.owl_m, lambda: self.owl_lambda }
    }

    /// The calibration options; caption `i`'s UNet run starts from seed `seed + i`.
    pub fn options(&self, seed: u64) -> CalibrationOptions {
        CalibrationOptions {
            prompts: self.calibration_prompts.clone(),
            samples: self.calibration_samples,
            unet_samples: self.calibration_unet_samples,
            steps: self.calibration_steps,
            seed,
            ..CalibrationOptions::default()
        }
    }
}

/// Flags that describe a single-file checkpoint (`.safetensors` / `.ckpt` in the original
/// layout); a diffusers folder carries its own configs, so they are refused there.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct SingleFileArgs {
    /// Single file: its configs, as a diffusers folder (unet/, vae/, text_encoder/ config.json;
    /// scheduler/ and tokenizer/ optional) or the original v2-inference*.yaml.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Single file: epsilon (512-base configs) or v_prediction (768-v); default: inferred.
    #[arg(long, value_name = "TYPE")]
    pub prediction_type: Option<String>,
    /// Single file: set the UNet's upcast_attention (true when given without a value).
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub upcast_attention: Option<bool>,
    /// Single file: use the training weights even when an EMA copy (model_ema.*) is present.
    #[arg(long)]
    pub no_ema: bool,
}

impl SingleFileArgs {
    /// For a single file: what was inferred when opening it (empty for a folder), so the
    /// user sees, e.g., that a 768-v model was assumed.
    pub fn notes(&self, path: &std::path::Path) -> anyhow::Result<Vec<String>> {
        if path.is_file() {
            let src = sdsparse::checkpoint::ModelSource::open(path, &self.options())?;
            if let sdsparse::checkpoint::ModelSource::SingleFile(s) = src {
                return Ok(s.notes.clone());
            }
        }
        Ok(Vec::new())
    }

    /// [`Self::notes`] as `note:` lines on stderr.
    pub fn print_notes(&self, path: &std::path::Path) -> anyhow::Result<()> {
        for n in self.notes(path)? {
            eprintln!("note: {n}");
        }
        Ok(())
    }

    pub fn options(&self) -> SingleFileOptions {
        SingleFileOptions {
            config: self.config.clone(),
            prediction_type: self.prediction_type.clone(),
            upcast_attention: self.upcast_attention,
            no_ema: self.no_ema,
        }
    }
}
