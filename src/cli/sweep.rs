//! `sdsparse sweep`: quality against sparsity (see `sdsparse::sweep`).

use indicatif::{ProgressBar, ProgressStyle};
use sdsparse::prune::{Method, Pattern, Scope};
use sdsparse::sweep::{self, SweepOptions, Target};
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `sdsparse sweep`.
#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// Dense diffusers SD2 folder (with a task.json for the task score, e.g. the toy model).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// Output folder: results.json/.csv, curves.png, grid.png, images/ (resumed if it exists).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Components to prune, comma-separated: text-encoder, unet, both.
    #[arg(long, value_name = "LIST", default_value = "text-encoder,unet,both")]
    pub components: String,
    /// Target sparsities: START:STOP:STEP (inclusive) or a comma list, each in [0, 1).
    #[arg(long, value_name = "RANGE", default_value = "0:0.9:0.05", allow_hyphen_values = true)]
    pub sparsities: String,
    /// Pruning methods, comma-separated: magnitude, random, wanda, owl (the last two calibrate
    /// the dense model once, see --calibration-*; Linear layers only).
    #[arg(long, value_name = "LIST", default_value = "magnitude,random")]
    pub methods: String,
    #[command(flatten)]
    pub calibration: super::CalibrationArgs,
    /// layer (each layer reaches the target) or global (one threshold per component).
    #[arg(long, default_value = "layer")]
    pub scope: String,
    /// unstructured, or 2:4 (exactly 50%: give --sparsities 0.5).
    #[arg(long, default_value = "unstructured")]
    pub pattern: String,
    /// Also prune the UNet's convolutions.
    #[arg(long)]
    pub include_conv: bool,
    /// Prompt file, one prompt per line (default: 30 prompts of the task grammar, or 4 generic ones).
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// Seeds per prompt (0..N).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub seeds: usize,
    /// Denoising steps per image.
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, value_name = "G", default_value_t = 7.5, allow_negative_numbers = true)]
    pub guidance: f32,
    /// Seed of the random pruning method.
    #[arg(long, default_value_t = 0)]
    pub prune_seed: u64,
    /// auto or cpu: the sweep runs the pipeline on the CPU in this build (auto is the CPU even
    /// with a GPU present; cuda is refused).
    #[arg(long, default_value = "auto")]
    pub device: String,
}

fn list<T: std::str::FromStr<Err = sdsparse::Error>>(s: &str) -> anyhow::Result<Vec<T>> {
    Ok(s.split(',').map(|x| x.trim().parse::<T>()).collect::<Result<Vec<T>, _>>()?)
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    let prompts = match &args.prompts {
        None => None,
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?;
            Some(text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect())
        }
    };
    let opts = SweepOptions {
        model: args.model.clone(),
        out: args.out.clone(),
        targets: list::<Target>(&args.components)?,
        sparsities: sweep::parse_sparsities(&args.sparsities)?,
        methods: list::<Method>(&args.methods)?,
        scope: args.scope.parse::<Scope>()?,
        pattern: args.pattern.parse::<Pattern>()?,
        include_conv: args.include_conv,
        prompts,
        seeds: args.seeds,
        steps: args.steps,
        guidance: args.guidance,
        prune_seed: args.prune_seed,
        owl: args.calibration.owl(),
        calibration: args.calibration.options(0),
    };
    let points = opts.plan()?;
    if !args.model.is_dir() {
        anyhow::bail!("{}: model folder not found", args.model.display());
    }
    // The sweep's in-memory pruning and its pipeline runs are CPU code in this build: `auto` is
    // the CPU even on a machine with a GPU (picking CUDA there would refuse the default).
    if args.device != "auto" && !super::generate::select_device(&args.device)?.0.is_cpu() {
        anyhow::bail!(
            "--device {}: the sweep runs the pipeline on the CPU in this build (use --device cpu)",
            args.device
        );
    }
    outln!(
        "sweep of {}: {} points x {} seed(s), {} steps -> {}",
        args.model.display(),
        points.len(),
        args.seeds,
        args.steps,
        args.out.display()
    );
    let start = Instant::now();
    let bar = ProgressBar::new(1).with_style(
        ProgressStyle::with_template(
            "{msg:>28} [{bar:30}] {pos}/{len} images, {elapsed} elapsed, ETA {eta}",
        )?
        .progress_chars("=> "),
    );
    let results = sweep::run(&opts, &mut |done, total, what| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(what.to_string());
    })?;
    bar.finish_and_clear();
    let dense = &results.points[0];
    let reused = match results.reused_points {
        0 => String::new(),
        n => format!(", {n} reused from results.json"),
    };
    outln!(
        "{} points measured{reused} in {:.1} s (dense task score {})",
        results.measured_points,
        start.elapsed().as_secs_f64(),
        dense.task_score.map(|s| format!("{s:.3}")).unwrap_or_else(|| "n/a: no task.json".into())
    );
    for f in ["results.csv", "results.json", "curves.png", "grid.png"] {
        outln!("  {}", args.out.join(f).display());
    }
    Ok(())
}
