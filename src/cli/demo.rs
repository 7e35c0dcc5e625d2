//! `sdsparse demo` (the quick start: tiny model → convert → generate) and `sdsparse synth`
//! (random-weight SD2-architecture checkpoints for tests and benchmarks).

use indicatif::{ProgressBar, ProgressStyle};
use sdsparse::synth::{write_checkpoint, SynthOptions, SynthPreset};
use sdsparse::DType;
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `sdsparse demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let _ = args;
    anyhow::bail!("sdsparse demo is not implemented yet")
}

/// Flags of `sdsparse synth`.
#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Architecture: tiny (the embedded test model), sd2.1-base or sd2.1 (full size).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Output diffusers folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype: f32, f16 or bf16 (default: f32 for tiny, f16 for full size).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace the output folder if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => anyhow::bail!("unknown dtype {s:?} (expected f32, f16 or bf16)"),
    }
}

pub fn run_synth(args: SynthArgs) -> anyhow::Result<()> {
    let preset = SynthPreset::parse(&args.preset)?;
    let dtype = match &args.dtype {
        Some(d) => parse_dtype(d)?,
        None if preset == SynthPreset::Tiny => DType::F32,
        None => DType::F16,
    };
    let opts = SynthOptions { preset, dtype, seed: args.seed, force: args.force };
    let start = Instant::now();
    let bar = ProgressBar::new(3).with_style(
        ProgressStyle::with_template("{msg:>14} [{bar:30}] {pos}/{len} components")?.progress_chars("=> "),
    );
    bar.set_message("synthesising");
    let report = write_checkpoint(&opts, &args.out, |_, done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    println!(
        "wrote {} ({} preset, {}, seed {}) in {:.1} s",
        report.out.display(),
        preset.name(),
        dtype.name(),
        args.seed,
        start.elapsed().as_secs_f64()
    );
    for (component, params, bytes) in &report.components {
        println!("  {component:<13} {params:>12} parameters  {:>10.1} MB", *bytes as f64 / 1e6);
    }
    Ok(())
}
