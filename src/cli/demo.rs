//! `sdsparse demo` (the quick start: tiny model → convert → generate) and `sdsparse synth`
//! (random-weight SD2-architecture checkpoints for tests and benchmarks).

use indicatif::{ProgressBar, ProgressStyle};
use sdsparse::synth::{write_checkpoint, SynthOptions, SynthPreset};
use sdsparse::DType;
use std::path::PathBuf;
use std::time::Instant;

/// Flags of `sdsparse demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Working folder (replaced if it exists): holds the dense model, its sparse conversion and the image.
    #[arg(long, default_value = "sdsparse-demo")]
    pub out: PathBuf,
    /// Prompt of the generated image.
    #[arg(long, default_value = "a photograph of an astronaut riding a horse")]
    pub prompt: String,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Seed of the weights and of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sparsity pattern of the conversion: unstructured or 2:4.
    #[arg(long, default_value = "unstructured")]
    pub pattern: String,
}

/// Parses a subcommand's flags exactly as the CLI would, so the demo runs the same code
/// paths (and defaults) a user gets from `sdsparse convert` / `sdsparse generate`.
fn parse_args<A: clap::Args>(command: &str, flags: &[String]) -> anyhow::Result<A> {
    #[derive(clap::Parser)]
    struct Wrap<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    let argv = std::iter::once(command.to_string()).chain(flags.iter().cloned());
    Ok(<Wrap<A> as clap::Parser>::try_parse_from(argv)?.args)
}

pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    let dense = args.out.join("dense");
    let sparse = args.out.join("sparse");
    let image = args.out.join("demo.png");
    std::fs::create_dir_all(&args.out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", args.out.display()))?;

    outln!("== 1/3 synthesise the embedded tiny SD2 model (seeded random weights, the real SD2 tokenizer)");
    let opts = SynthOptions { preset: SynthPreset::Tiny, dtype: DType::F32, seed: args.seed, force: true };
    let report = write_checkpoint(&opts, &dense, |_, _, _| {})?;
    let params: usize = report.components.iter().map(|c| c.1).sum();
    outln!("wrote {} ({params} parameters)\n", dense.display());

    outln!(
        "== 2/3 sdsparse convert at the study's targets (text encoder 47.5%, UNet 35%, magnitude, per layer)"
    );
    let s = |x: &std::path::Path| x.display().to_string();
    let flags = ["--model", &s(&dense), "--out", &s(&sparse), "--pattern", &args.pattern, "--force"];
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    super::convert::run(parse_args("convert", &flags)?)?;
    outln!();

    outln!("== 3/3 sdsparse generate on the sparse checkpoint");
    let flags = [
        "--model",
        &s(&sparse),
        "--prompt",
        &args.prompt,
        "--steps",
        &args.steps.to_string(),
        "--seed",
        &args.seed.to_string(),
        "--out",
        &s(&image),
        "--device",
        "cpu",
    ];
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    super::generate::run(parse_args("generate", &flags)?)?;
    outln!("\ndemo finished in {:.1} s: {}", start.elapsed().as_secs_f64(), image.display());
    Ok(())
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
    outln!(
        "wrote {} ({} preset, {}, seed {}) in {:.1} s",
        report.out.display(),
        preset.name(),
        dtype.name(),
        args.seed,
        start.elapsed().as_secs_f64()
    );
    for (component, params, bytes) in &report.components {
        outln!("  {component:<13} {params:>12} parameters  {:>10.1} MB", *bytes as f64 / 1e6);
    }
    Ok(())
}
