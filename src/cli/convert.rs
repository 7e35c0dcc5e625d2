//! `sdsparse convert`: prune a dense diffusers SD2 folder into a sparse checkpoint, with a
//! progress bar and a per-component summary.

use indicatif::{ProgressBar, ProgressStyle};
use sdsparse::convert::{convert, ConvertOptions, ConvertReport, Progress};
use sdsparse::prune::{Glob, Method, Pattern, Scope, Selection};
use sdsparse::DType;
use std::path::PathBuf;

/// Flags of `sdsparse convert`.
#[derive(clap::Args, Debug)]
pub struct ConvertArgs {
    /// Dense diffusers folder (model_index.json, text_encoder/, unet/, vae/, ...) or
    /// single-file checkpoint (.safetensors / .ckpt in the original SD2 layout).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub single_file: super::SingleFileArgs,
    /// Output folder (must not exist unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Text-encoder target sparsity in [0, 1) (default 0.475; 0.5 under 2:4; 0 = dense).
    #[arg(long, allow_negative_numbers = true)]
    pub text_encoder_sparsity: Option<f64>,
    /// UNet target sparsity in [0, 1) (default 0.35; 0.5 under 2:4; 0 = dense).
    #[arg(long, allow_negative_numbers = true)]
    pub unet_sparsity: Option<f64>,
    /// Pattern of both components: unstructured or 2:4.
    #[arg(long, default_value = "unstructured")]
    pub pattern: String,
    /// Overrides --pattern for the text encoder.
    #[arg(long)]
    pub text_encoder_pattern: Option<String>,
    /// Overrides --pattern for the UNet.
    #[arg(long)]
    pub unet_pattern: Option<String>,
    /// magnitude (smallest |w| pruned), random (seeded baseline), wanda (|w|·‖x‖ per output
    /// row, from calibration activations) or owl (Wanda with per-block sparsities from
    /// outlier ratios). See docs/PRUNING.md.
    #[arg(long, default_value = "magnitude")]
    pub method: String,
    #[command(flatten)]
    pub calibration: super::CalibrationArgs,
    /// layer (each layer reaches the target) or global (one threshold per component).
    #[arg(long, default_value = "layer")]
    pub scope: String,
    /// Stored dtype: keep, f16, bf16 or f32.
    #[arg(long, default_value = "keep")]
    pub dtype: String,
    /// Seed of the random method.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also prune the UNet's convolution weights.
    #[arg(long)]
    pub include_conv: bool,
    /// Also prune tensors whose name matches this glob (`*`, `?`); repeatable.
    #[arg(long, value_name = "GLOB")]
    pub include: Vec<String>,
    /// Never prune tensors whose name matches this glob; repeatable.
    #[arg(long, value_name = "GLOB")]
    pub exclude: Vec<String>,
    /// A per-layer plan from `sdsparse plan` (sets each layer's pattern and sparsity; the
    /// sparsity / pattern flags then do not apply).
    #[arg(long, value_name = "PLAN.json")]
    pub plan: Option<PathBuf>,
    /// Replace an existing output folder: only a model folder (model_index.json or a component's
    /// config.json) or an empty one; anything else is refused.
    #[arg(long)]
    pub force: bool,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

fn parse_dtype(s: &str) -> anyhow::Result<Option<DType>> {
    Ok(match s {
        "keep" => None,
        "f16" | "fp16" | "float16" => Some(DType::F16),
        "bf16" | "bfloat16" => Some(DType::BF16),
        "f32" | "fp32" | "float32" => Some(DType::F32),
        _ => anyhow::bail!("invalid argument: unknown dtype '{s}' (expected keep, f16, bf16 or f32)"),
    })
}

impl ConvertArgs {
    pub fn options(&self) -> anyhow::Result<ConvertOptions> {
        let pat = |s: &str| s.parse::<Pattern>();
        let mixed_plan = match &self.plan {
            Some(p) => {
                let uniform = self.text_encoder_sparsity.is_some()
                    || self.unet_sparsity.is_some()
                    || self.pattern != "unstructured"
                    || self.text_encoder_pattern.is_some()
                    || self.unet_pattern.is_some();
                if uniform {
                    anyhow::bail!(
                        "invalid argument: --plan sets every layer's pattern and sparsity; drop the \
                         --*-sparsity / --*-pattern flags"
                    );
                }
                Some(std::sync::Arc::new(sdsparse::plan::MixedPlan::load(p)?))
            }
            None => None,
        };
        Ok(ConvertOptions {
            text_encoder_sparsity: self.text_encoder_sparsity,
            unet_sparsity: self.unet_sparsity,
            pattern: pat(&self.pattern)?,
            text_encoder_pattern: self.text_encoder_pattern.as_deref().map(pat).transpose()?,
            unet_pattern: self.unet_pattern.as_deref().map(pat).transpose()?,
            method: self.method.parse::<Method>()?,
            scope: self.scope.parse::<Scope>()?,
            seed: self.seed,
            dtype: parse_dtype(&self.dtype)?,
            selection: Selection {
                include_conv: self.include_conv,
                include: self.include.iter().map(|g| Glob::new(g)).collect(),
                exclude: self.exclude.iter().map(|g| Glob::new(g)).collect(),
            },
            force: self.force,
            single_file: self.single_file.options(),
            owl: self.calibration.owl(),
            calibration: self.calibration.options(self.seed),
            mixed_plan,
        })
    }
}

/// A byte progress bar driven by the library's progress events.
pub fn progress_bar(quiet: bool) -> (ProgressBar, impl FnMut(Progress)) {
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(0) };
    let style = |t: &str| {
        ProgressStyle::with_template(t).unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ")
    };
    let bytes_style = style("{spinner} {msg:14} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}");
    let count_style = style("{spinner} calibrating {msg:12} [{bar:40}] {pos}/{len} eta {eta}");
    bar.set_style(bytes_style.clone());
    let b = bar.clone();
    let f = move |p: Progress| match p {
        Progress::Calibration { stage, done, total } => {
            if b.length() != Some(total as u64) || b.message() != stage {
                b.set_style(count_style.clone());
                b.set_message(stage);
                b.set_length(total as u64);
                b.reset_eta();
            }
            b.set_position(done as u64);
        }
        Progress::Begin { total_bytes } => {
            b.set_style(bytes_style.clone());
            b.set_position(0);
            b.set_length(total_bytes)
        }
        Progress::Component { name } => b.set_message(name),
        Progress::Advance { bytes } => b.inc(bytes),
        Progress::Finish => b.finish_and_clear(),
    };
    (bar, f)
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

/// The summary table printed after a conversion.
pub fn print_report(r: &ConvertReport) -> anyhow::Result<()> {
    outln!(
        "{:<14} {:>12} {:>14} {:>14} {:>9} {:>12} {:>12} {:>8}",
        "component",
        "pattern",
        "prunable",
        "zeros",
        "sparsity",
        "before",
        "after",
        "time"
    );
    for c in &r.components {
        let pattern = match c.plan {
            Some(p) => p.pattern.name(),
            None if c.pruned > 0 => "mixed",
            None => "dense",
        };
        outln!(
            "{:<14} {:>12} {:>14} {:>14} {:>8.2}% {:>12} {:>12} {:>7.1}s",
            c.name,
            pattern,
            c.prunable_params,
            c.pruned,
            100.0 * c.achieved_sparsity(),
            mb(c.bytes_before),
            mb(c.bytes_after),
            c.seconds
        );
        for (name, why) in &c.kept_dense {
            outln!("  kept dense: {name}: {why}");
        }
        if !c.owl_groups.is_empty() {
            let (lo, hi) =
                c.owl_groups.iter().fold((1f64, 0f64), |(a, b), g| (a.min(g.sparsity), b.max(g.sparsity)));
            outln!(
                "  {}: OWL gave {} blocks sparsities {:.1}%..{:.1}%",
                c.name,
                c.owl_groups.len(),
                100.0 * lo,
                100.0 * hi
            );
        }
    }
    let (this, other) = if r.include_conv {
        ("with --include-conv", "Linear layers only")
    } else {
        ("Linear layers only", "with --include-conv")
    };
    outln!(
        "text encoder + UNet stored size: {:.3}x of dense ({this}); {:.3}x {other} (estimate)",
        r.te_unet_ratio(),
        r.te_unet_ratio_other_conv()
    );
    outln!("wrote {} in {:.1}s", r.out.display(), r.seconds);
    Ok(())
}

pub fn run(args: ConvertArgs) -> anyhow::Result<()> {
    let opts = args.options()?;
    if !args.quiet {
        args.single_file.print_notes(&args.model)?;
    }
    let (_bar, mut progress) = progress_bar(args.quiet);
    let report = convert(&args.model, &args.out, &opts, &mut progress)?;
    print_report(&report)
}
