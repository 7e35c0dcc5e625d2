//! `sdsparse generate`: prompt → PNG with a dense or converted sparse SD2 checkpoint.

use indicatif::{ProgressBar, ProgressStyle};
use sdsparse::backend::cuda::CudaDevice;
use sdsparse::backend::{profile, Device};
use sdsparse::format::DType;
use sdsparse::output;
use sdsparse::pipeline::{self, GenerateRequest, StableDiffusion};
use sdsparse::scheduler::SchedulerKind;
use sdsparse::Error;
use std::path::PathBuf;

/// Flags of `sdsparse generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// Diffusers pipeline folder (dense, or converted by `sdsparse convert`), or a
    /// single-file checkpoint (.safetensors / .ckpt in the original SD2 layout).
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    #[command(flatten)]
    pub single_file: super::SingleFileArgs,
    /// The text prompt.
    #[arg(long, value_name = "TEXT")]
    pub prompt: String,
    /// What the image should not show (the unconditional side of guidance).
    #[arg(long, value_name = "TEXT", default_value = "")]
    pub negative_prompt: String,
    /// Denoising steps.
    #[arg(long, value_name = "N", default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale (1 or less turns guidance off).
    #[arg(long, value_name = "G", default_value_t = 7.5, allow_negative_numbers = true)]
    pub guidance: f32,
    /// Scheduler: ddim, euler, dpm++2m or pndm (default: the checkpoint's scheduler_config.json).
    #[arg(long, value_name = "NAME")]
    pub scheduler: Option<String>,
    /// Seed of the initial noise (our own generator, not torch's; see --init-latents).
    #[arg(long, value_name = "S", default_value_t = 0)]
    pub seed: u64,
    /// Image width in pixels (a multiple of the VAE scale factor, 8 for SD2).
    #[arg(long, value_name = "W")]
    pub width: Option<usize>,
    /// Image height in pixels (a multiple of the VAE scale factor, 8 for SD2).
    #[arg(long, value_name = "H")]
    pub height: Option<usize>,
    /// Safetensors file with unit-variance noise `latents` [1,4,H/f,W/f] (sets the size).
    #[arg(long, value_name = "FILE")]
    pub init_latents: Option<PathBuf>,
    /// Also write the final latents (before VAE decode) as tensor `latents`.
    #[arg(long, value_name = "FILE")]
    pub save_latents: Option<PathBuf>,
    /// Decode the latents in overlapping tiles, as diffusers' `vae.enable_tiling()`: the VAE's
    /// memory follows the tile instead of the image (for large images on small machines).
    #[arg(long)]
    pub vae_tiling: bool,
    /// Tile size in pixels for --vae-tiling (diffusers' tile_sample_min_size; default: the
    /// VAE config's sample_size, 512 for SD2.1-base, 768 for SD2.1; a multiple of 32 for SD2).
    #[arg(long, value_name = "PIXELS", requires = "vae_tiling")]
    pub vae_tile_size: Option<usize>,
    /// Output PNG.
    #[arg(long, value_name = "FILE.png", default_value = "image.png")]
    pub out: PathBuf,
    /// auto (CUDA when a GPU and kernels are present, else the CPU with a note), cpu, or cuda.
    /// CUDA: compute capability 8.0 or newer runs everything (the sparse kernels, flash
    /// attention); 7.5 (Turing: T4, RTX 20xx) runs the dense path only (sparse weights expanded
    /// to dense at load, attention on cuBLAS + softmax; said in a note); older GPUs are refused.
    #[arg(long, value_name = "auto|cpu|cuda", default_value = "auto")]
    pub device: String,
    /// Activation dtype on CUDA: f16 (default), bf16 or f32; accumulation, norms and softmax
    /// are f32 in every case; bf16 needs compute capability 8.0. The CPU computes in f32 only.
    #[arg(long, value_name = "f16|bf16|f32")]
    pub dtype: Option<String>,
    /// Replace an existing --out / --save-latents file (without it, an existing file is an error).
    #[arg(long)]
    pub force: bool,
    /// Print the time per op kind (Linear dense / 2:4 / unstructured, conv, attention, norms,
    /// elementwise, ...) per stage (text encoder, UNet, VAE); on a GPU the stream is
    /// synchronised around every op and CUDA graphs are off. Also SDSPARSE_PROFILE=1.
    #[arg(long)]
    pub profile: bool,
    /// Measure the sparse kernel variants again on this GPU instead of using the cached choices
    /// (~/.cache/sdsparse/dispatch.json), and replace them.
    #[arg(long)]
    pub retune: bool,
    /// Run every UNet step eagerly instead of replaying a CUDA graph of it (also
    /// SDSPARSE_CUDA_GRAPHS=0).
    #[arg(long)]
    pub no_cuda_graphs: bool,
}

/// The device `--device` asks for, and the note to print once the run's inputs are checked
/// (`auto` falling back to the CPU says why). CUDA needs a GPU and a build with kernels; `cuda`
/// without them is an error.
pub fn select_device(choice: &str) -> Result<(Device, Option<String>), Error> {
    match choice {
        "cpu" => Ok((Device::Cpu, None)),
        "auto" => match cuda_device() {
            Ok(d) => Ok((d, None)),
            Err(why) => Ok((Device::Cpu, Some(format!("running on the CPU ({why})")))),
        },
        "cuda" => cuda_device()
            .map(|d| (d, None))
            .map_err(|why| Error::Msg(format!("--device cuda: {}", why.trim_start_matches("CUDA: ")))),
        other => Err(Error::Invalid(format!("--device must be auto, cpu or cuda, got {other:?}"))),
    }
}

/// The activation dtype for `device` from `--dtype`: the device's default when not given; on
/// the CPU, anything but f32 is an error for `--device cpu` and a note (then f32) when `auto`
/// fell back to the CPU.
pub fn select_dtype(choice: Option<&str>, device: &Device, device_choice: &str) -> Result<DType, Error> {
    let Some(name) = choice else {
        return Ok(device.default_activation_dtype());
    };
    let dtype = match name {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "f32" => DType::F32,
        other => return Err(Error::Invalid(format!("--dtype must be f16, bf16 or f32, got {other:?}"))),
    };
    if device.is_cpu() && dtype != DType::F32 {
        if device_choice == "auto" {
            eprintln!("note: --dtype {name} is for CUDA; the CPU computes in f32");
            return Ok(DType::F32);
        }
        return Err(Error::Invalid(format!(
            "--dtype {name}: the CPU backend computes in f32 only (f16 / bf16 activations are for --device cuda)"
        )));
    }
    Ok(dtype)
}

/// A CUDA device for the pipeline, or why there is none.
fn cuda_device() -> Result<Device, String> {
    // Errors (no kernels in this build, no driver, no GPU, GPU too old) come back as text.
    let gpu = CudaDevice::new(0).map_err(|e| e.to_string())?;
    // cuBLAS is loaded dynamically: its absence is a reason for `auto` to use the CPU.
    gpu.blas().map_err(|e| e.to_string())?;
    Ok(Device::Cuda(gpu))
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let scheduler = args.scheduler.as_deref().map(SchedulerKind::from_cli_name).transpose()?;
    if args.steps == 0 {
        anyhow::bail!("--steps must be at least 1");
    }
    if !args.guidance.is_finite() {
        anyhow::bail!("--guidance must be a finite number");
    }
    if let Some(ext) = args.out.extension().and_then(|e| e.to_str()) {
        if !ext.eq_ignore_ascii_case("png") {
            anyhow::bail!("--out {}: the output is a PNG; use a .png file name", args.out.display());
        }
    }
    // Every output is checked before any work, so a typo in a folder name costs nothing.
    output::check_output_file(&args.out, "--out")?;
    refuse_existing(&args.out, "--out", args.force)?;
    if let Some(p) = &args.save_latents {
        output::check_output_file(p, "--save-latents")?;
        refuse_existing(p, "--save-latents", args.force)?;
        if same_file(p, &args.out) {
            anyhow::bail!("--save-latents and --out name the same file {}", p.display());
        }
    }
    let init_latents = args.init_latents.as_deref().map(pipeline::load_latents).transpose()?;
    // A missing model is said before the device is picked (whose CPU fallback prints a note).
    if !args.model.exists() {
        anyhow::bail!("{}: not found", args.model.display());
    }
    let (device, device_note) = select_device(&args.device)?;
    let dtype = select_dtype(args.dtype.as_deref(), &device, &args.device)?;
    if device.is_cpu() {
        for (given, flag) in [(args.retune, "--retune"), (args.no_cuda_graphs, "--no-cuda-graphs")] {
            if given {
                eprintln!("note: {flag} is for CUDA; it changes nothing on the CPU");
            }
        }
    }
    sdsparse::tune::set_retune(args.retune);

    args.single_file.print_notes(&args.model)?;
    let mut sd = StableDiffusion::load_as(&args.model, &args.single_file.options(), &device, dtype)?;
    if args.no_cuda_graphs {
        sd.set_cuda_graphs(false);
    }
    let profiling = args.profile || profile::requested_by_env();
    if profiling {
        profile::start(match &device {
            Device::Cuda(d) => Some(d.clone()),
            Device::Cpu => None,
        });
    }
    let req = GenerateRequest {
        prompt: args.prompt,
        negative_prompt: args.negative_prompt,
        steps: args.steps,
        guidance: args.guidance,
        scheduler,
        seed: args.seed,
        width: args.width,
        height: args.height,
        init_latents,
        vae_tiling: args.vae_tiling,
        vae_tile_size: args.vae_tile_size,
    };
    // Check sizes and the scheduler before the text encoder runs, and before any note (an
    // error is one line).
    let shape = sd.latent_shape(&req)?;
    let kind = sd.scheduler_kind(&req)?;
    let calls = sd.scheduler_for(&req)?.timesteps().len();
    for note in device_note.iter().chain(sd.notes()) {
        eprintln!("note: {note}");
    }
    let f = sd.vae_scale_factor();
    if req.vae_tiling {
        let tile = sd.vae_tile_size(&req)?;
        let (lh, lw) = (shape[2] * f, shape[3] * f);
        if lh <= tile && lw <= tile {
            eprintln!("note: --vae-tiling: the image fits one {tile} px tile, so it is decoded untiled (as diffusers)");
        }
    }
    eprintln!(
        "generating {}x{} with {} ({} steps, {} UNet calls, guidance {}) on {}",
        shape[3] * f,
        shape[2] * f,
        kind.cli_name(),
        req.steps,
        calls,
        req.guidance,
        match &device {
            Device::Cuda(d) => format!("{} ({}, {} activations)", d.name(), d.gpu_name(), dtype.name()),
            Device::Cpu => device.name(),
        }
    );

    let bar = ProgressBar::new(calls as u64).with_style(
        ProgressStyle::with_template("denoising {bar:40} {pos}/{len} [{elapsed_precise} < {eta_precise}]")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    // One prompt per run, so each model is freed once its stage is done: the text encoder
    // after encoding, the UNet after denoising. Peak memory is then the weights at load,
    // not the weights plus the VAE decoder's large activations.
    let t0 = std::time::Instant::now();
    let embeddings = sd.encode_prompt(&req.prompt, &req.negative_prompt, req.guidance > 1.0)?;
    let text_encoder_time = t0.elapsed();
    sd.release_text_encoder();
    let denoised =
        sd.denoise_with_embeddings(&req, embeddings, &mut |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    sd.release_unet();
    let mut generated = sd.decode(&req, denoised)?;
    generated.timings.text_encoder = text_encoder_time;
    if generated.prompt_truncated {
        eprintln!("note: the prompt was longer than 77 tokens and was truncated");
    }

    // Both outputs are written under temporary names and renamed together: a failure
    // (full disk, vanished folder) leaves neither a truncated file nor one of the two.
    let mut pending = vec![output::PendingFile::write(&args.out, &pipeline::encode_png(&generated.image)?)?];
    if let Some(p) = &args.save_latents {
        pending.push(output::PendingFile::write(p, &pipeline::encode_latents(&generated.latents)?)?);
    }
    output::commit_all(pending)?;
    if let Some(p) = &args.save_latents {
        eprintln!("wrote latents {}", p.display());
    }
    eprint!("{}", pipeline::report(&sd, &generated));
    if let Some(p) = profile::finish() {
        eprint!("{}", p.table());
    }
    outln!("wrote {}", args.out.display());
    Ok(())
}

/// Whether two output paths name the same file (compared after resolving their folders).
fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    let resolve = |p: &std::path::Path| {
        let parent = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
        std::fs::canonicalize(parent).ok().map(|d| d.join(p.file_name().unwrap_or_default()))
    };
    a == b || (resolve(a).is_some() && resolve(a) == resolve(b))
}

/// No output is overwritten without `--force` (the project's rule for every output).
fn refuse_existing(path: &std::path::Path, what: &str, force: bool) -> anyhow::Result<()> {
    if path.exists() && !force {
        anyhow::bail!("{what} {} already exists (use --force to replace it)", path.display());
    }
    Ok(())
}
