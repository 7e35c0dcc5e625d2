//! `sdsparse demo` (the quick start: the embedded trained toy SD2 → convert at the study's
//! targets → dense and sparse images side by side) and `sdsparse synth` (random-weight
//! SD2-architecture checkpoints for tests and benchmarks).

use indicatif::{ProgressBar, ProgressStyle};
use sdsparse::pipeline::{image_to_rgb8, GenerateRequest, StableDiffusion};
use sdsparse::quality::task::{judge, TaskSpec};
use sdsparse::synth::{write_checkpoint, SynthOptions, SynthPreset};
use sdsparse::{DType, Device};
use std::path::PathBuf;
use std::time::Instant;

/// The demo's prompts: every colour appears, as shape or background, and every shape.
pub const DEMO_PROMPTS: [&str; 5] = [
    "a red circle on a blue background",
    "a yellow square on a black background",
    "a white triangle on a green background",
    "a black circle on a yellow background",
    "a blue triangle on a white background",
];

/// Flags of `sdsparse demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Working folder: its dense/ (the toy model), sparse/ (its conversion) and demo.png are replaced on
    /// every run; other files in it are left alone.
    #[arg(long, default_value = "sdsparse-demo")]
    pub out: PathBuf,
    /// A prompt (repeat the flag for several); the toy knows `a {colour} {shape} on a {colour} background`
    /// with colours red, green, blue, yellow, white, black and shapes circle, square, triangle.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Seed of the initial noise.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sparsity pattern of the conversion: unstructured or 2:4.
    #[arg(long, default_value = "unstructured")]
    pub pattern: String,
}

/// Parses a subcommand's flags exactly as the CLI would, so the demo runs the same code
/// paths (and defaults) a user gets from `sdsparse convert`.
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
    if args.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    args.pattern.parse::<sdsparse::prune::Pattern>()?; // refused before anything is written
    let prompts: Vec<String> = if args.prompt.is_empty() {
        DEMO_PROMPTS.iter().map(|p| p.to_string()).collect()
    } else {
        args.prompt.clone()
    };
    let dense = args.out.join("dense");
    let sparse = args.out.join("sparse");
    let image = args.out.join("demo.png");
    std::fs::create_dir_all(&args.out)
        .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", args.out.display()))?;

    outln!("== 1/3 write the embedded toy SD2 (trained here on coloured shapes; see task.json)");
    sdsparse::toy::write_model(&dense, true)?;
    outln!("wrote {}\n", dense.display());

    // 2:4 is exactly 50% of every pruned layer; unstructured uses the study's targets.
    let two_four = args.pattern.parse::<sdsparse::prune::Pattern>()? == sdsparse::prune::Pattern::Sparse24;
    let targets = if two_four { "2:4, 50% of every pruned Linear" } else { "TE 47.5%, UNet 35%" };
    if two_four {
        outln!("== 2/3 sdsparse convert with the 2:4 pattern (text encoder and UNet Linears 50%, magnitude)");
    } else {
        outln!(
            "== 2/3 sdsparse convert at the study's targets (text encoder 47.5%, UNet 35%, magnitude, per layer)"
        );
    }
    let s = |x: &std::path::Path| x.display().to_string();
    let flags = ["--model", &s(&dense), "--out", &s(&sparse), "--pattern", &args.pattern, "--force"];
    let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
    super::convert::run(parse_args("convert", &flags)?)?;
    outln!(
        "(the toy's files barely shrink: most of its bytes are the text encoder's token embedding, which is not \
         pruned{})",
        if two_four { "" } else { "; on SD2.1 the same targets store 0.83x of dense" }
    );
    outln!();

    outln!(
        "== 3/3 generate {} prompt{} with the dense and the sparse model (CPU, {} steps)",
        prompts.len(),
        if prompts.len() == 1 { "" } else { "s" },
        args.steps
    );
    let spec = TaskSpec::from_model_dir(&dense)?;
    let models =
        [StableDiffusion::load(&dense, &Device::Cpu)?, StableDiffusion::load(&sparse, &Device::Cpu)?];
    let bar = ProgressBar::new((2 * prompts.len()) as u64).with_style(
        ProgressStyle::with_template("{msg:>10} [{bar:30}] {pos}/{len} images")?.progress_chars("=> "),
    );
    let mut rows: Vec<Vec<image::RgbImage>> = vec![Vec::new(), Vec::new()];
    let mut marks: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
    let mut passed = [0usize; 2];
    for (m, sd) in models.iter().enumerate() {
        bar.set_message(["dense", "sparse"][m]);
        for prompt in &prompts {
            let mut req = GenerateRequest::new(prompt);
            req.steps = args.steps;
            req.seed = args.seed;
            let g = sd.generate(&req, &mut |_, _| {})?;
            let (w, h, rgb) = image_to_rgb8(&g.image)?;
            let verdict = match (&spec, spec.as_ref().and_then(|s| s.parse(prompt))) {
                (Some(spec), Some(scene)) => {
                    let v = judge(spec, &scene, w, h, &rgb)?;
                    passed[m] += v.pass() as usize;
                    let wrong: Vec<&str> =
                        [(v.shape_colour, "colour"), (v.shape, "shape"), (v.background, "bg")]
                            .iter()
                            .filter(|x| !x.0)
                            .map(|x| x.1)
                            .collect();
                    if wrong.is_empty() {
                        "right".to_string()
                    } else {
                        format!("wrong {}", wrong.join("+"))
                    }
                }
                _ => "(not in the task grammar)".to_string(),
            };
            marks[m].push(verdict);
            rows[m].push(
                image::RgbImage::from_raw(w as u32, h as u32, rgb)
                    .ok_or_else(|| anyhow::anyhow!("bad image buffer"))?,
            );
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let row_labels = ["dense".to_string(), format!("sparse ({targets})")];
    let picture = sdsparse::sweep::plot::side_by_side(&rows, &row_labels, &prompts, &marks)?;
    let tmp = image.with_extension("png.tmp");
    picture.save_with_format(&tmp, image::ImageFormat::Png)?;
    std::fs::rename(&tmp, &image)?;
    for (i, p) in prompts.iter().enumerate() {
        outln!("  {p:<42} dense: {:<22} sparse: {}", marks[0][i], marks[1][i]);
    }
    if spec.is_some() {
        outln!(
            "task score (colour, shape and background right, by image analysis): dense {}/{}, sparse {}/{}",
            passed[0],
            prompts.len(),
            passed[1],
            prompts.len()
        );
    }
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
    /// Replace an existing output folder: only a model folder (model_index.json or a component's
    /// config.json) or an empty one; anything else is refused.
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
