//! Full text-to-image runs on the tiny fixture against diffusers: from the reference initial
//! latents, every scheduler's final latents (relative error < 1e-4) and PNG (within 1/255 on
//! at least 99.9% of the pixels); on CUDA the same with f32 activations, and with f16 (< 2e-2,
//! within 2/255 on 99%) and bf16; a converted sparse checkpoint against its dense export;
//! and the request checks users hit.

use sdsparse::backend::Device;
use sdsparse::format::DType;
use sdsparse::pipeline::{self, GenerateRequest, StableDiffusion};
use sdsparse::scheduler::SchedulerKind;
use sdsparse::{test_device, Tensor};
use std::path::{Path, PathBuf};

mod reference_util;
use reference_util::{fixture, load_f32, rel_err};

fn model_dir() -> PathBuf {
    fixture("tiny-sd2-eps")
}

/// Fraction of 8-bit channel values of our PNG within `tol` of the reference PNG's, and the
/// largest difference.
fn png_agreement_within(ours: &Tensor, reference_png: &Path, tol: u8) -> (f64, u8) {
    let (w, h, rgb) = pipeline::image_to_rgb8(ours).unwrap();
    let want = image::open(reference_png).unwrap().to_rgb8();
    assert_eq!((want.width() as usize, want.height() as usize), (w, h));
    let want = want.into_raw();
    let mut within = 0usize;
    let mut max = 0u8;
    for (&a, &b) in rgb.iter().zip(&want) {
        let d = a.abs_diff(b);
        max = max.max(d);
        if d <= tol {
            within += 1;
        }
    }
    (within as f64 / rgb.len() as f64, max)
}

fn reference_request(steps: usize, scheduler: SchedulerKind) -> GenerateRequest {
    let refs = load_f32(&fixture("tiny-sd2-eps/reference/reference.safetensors"));
    let mut req = GenerateRequest::new("a photograph of an astronaut riding a horse");
    req.steps = steps;
    req.guidance = 7.5;
    req.scheduler = Some(scheduler);
    req.init_latents = Some(refs["init_latents"].clone());
    req
}

/// Bounds of a run against diffusers: final latents' relative error, and the fraction of PNG
/// channel values that must lie within `pixel` / 255.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    latents: f64,
    pixel: u8,
    fraction: f64,
}

/// f32 activations (CPU, and CUDA with `--dtype f32`).
const F32_BOUNDS: Bounds = Bounds { latents: 1e-4, pixel: 1, fraction: 0.999 };
/// f16 activations on CUDA (issue 8: latents < 2e-2, image within 2/255 on 99% of pixels).
const F16_BOUNDS: Bounds = Bounds { latents: 2e-2, pixel: 2, fraction: 0.99 };
/// bf16 activations: 8 bits of mantissa (f16 has 11), so 8x f16's rounding; a provisional
/// bound, to be set from the first GPU run.
const BF16_BOUNDS: Bounds = Bounds { latents: 8e-2, pixel: 4, fraction: 0.99 };

/// Runs one reference configuration and checks latents and image.
fn check_run(
    sd: &StableDiffusion,
    kind: SchedulerKind,
    steps: usize,
    want_latents: &Tensor,
    want_timesteps: Option<&[f32]>,
    png: &Path,
) {
    check_run_within(sd, kind, steps, want_latents, want_timesteps, png, F32_BOUNDS)
}

fn check_run_within(
    sd: &StableDiffusion,
    kind: SchedulerKind,
    steps: usize,
    want_latents: &Tensor,
    want_timesteps: Option<&[f32]>,
    png: &Path,
    b: Bounds,
) {
    let g = sd.generate(&reference_request(steps, kind), &mut |_, _| {}).unwrap();
    if let Some(t) = want_timesteps {
        assert_eq!(g.timesteps, t, "{kind:?} timesteps");
    }
    let e = rel_err(&g.latents.to_vec().unwrap(), want_latents.as_slice().unwrap());
    let (frac, max) = png_agreement_within(&g.image, png, b.pixel);
    println!(
        "{kind:?} ({} activations on {}): final latents rel err {e:.3e}; PNG within {}/255 on {:.4}% (max diff {max})",
        sd.activation_dtype().name(),
        sd.device().name(),
        b.pixel,
        frac * 100.0
    );
    // Which libraries ran the convolutions and dense Linears (cuDNN / cuBLASLt or the cuBLAS
    // fallbacks, and why): the device check's log shows it next to the agreement.
    if let Device::Cuda(dev) = sd.device() {
        println!("{kind:?}: {}", sdsparse::backend::cuda::libs::usage(dev).summary());
    }
    assert!(e.is_finite() && e < b.latents, "{kind:?}: final latents rel err {e} (bound {})", b.latents);
    assert!(frac >= b.fraction, "{kind:?}: only {frac} of the pixels within {}/255", b.pixel);
}

/// The fixture on `device` in f32 activations (the CUDA default is f16: the f32 runs ask).
fn load_f32_activations(device: &Device) -> sdsparse::Result<StableDiffusion> {
    StableDiffusion::load_as(&model_dir(), &Default::default(), device, DType::F32)
}

// The scheduler runs below are written once for both devices (`test_device!`): `::cpu` is the
// reference backend, `::cuda` the GPU pipeline with f32 activations (`--dtype f32`: cuBLAS
// SGEMM, the f32 softmax attention path), held to the same 1e-4 bound against diffusers; it
// skips without a GPU. `gpu_f16_matches_diffusers` / `gpu_bf16_matches_diffusers` run the
// same references with f16 / bf16 activations.

fn ddim_matches_diffusers(device: &Device) -> sdsparse::Result<()> {
    let sd = load_f32_activations(device)?;
    // The fixture's own scheduler is DDIM: the default must pick it.
    assert_eq!(sd.scheduler_config().kind().unwrap(), SchedulerKind::Ddim);
    let refs = load_f32(&fixture("tiny-sd2-eps/reference/reference.safetensors"));
    let png = fixture("tiny-sd2-eps/reference/ddim.png");
    check_run(
        &sd,
        SchedulerKind::Ddim,
        4,
        &refs["ddim_final_latents"],
        Some(&[751.0, 501.0, 251.0, 1.0]),
        &png,
    );
    Ok(())
}
test_device!(ddim_matches_diffusers);

/// A 6-step run of the tiny fixture (f32 activations) with `kind` against diffusers'
/// `NAME_final_latents` and `NAME.png`, with the timesteps diffusers used.
fn scheduler_matches(device: &Device, kind: SchedulerKind, name: &str, t: &[f32; 6]) -> sdsparse::Result<()> {
    let sd = load_f32_activations(device)?;
    let refs = load_f32(&fixture("tiny-sd2-eps/reference/reference.safetensors"));
    let png = fixture(&format!("tiny-sd2-eps/reference/{name}.png"));
    check_run(&sd, kind, 6, &refs[&format!("{name}_final_latents")], Some(t), &png);
    Ok(())
}

fn euler_matches_diffusers(device: &Device) -> sdsparse::Result<()> {
    scheduler_matches(device, SchedulerKind::Euler, "euler", &[831.0, 665.0, 499.0, 333.0, 167.0, 1.0])
}
test_device!(euler_matches_diffusers);

fn dpmpp2m_matches_diffusers(device: &Device) -> sdsparse::Result<()> {
    scheduler_matches(device, SchedulerKind::DpmPp2m, "dpmpp2m", &[853.0, 711.0, 569.0, 427.0, 285.0, 143.0])
}
test_device!(dpmpp2m_matches_diffusers);

/// DDIM, Euler and DPM++ 2M on CUDA with half-precision activations against diffusers' f32
/// references (the device check's f16 pipeline slot); skips without a GPU.
fn gpu_half_matches_diffusers(test: &str, dtype: DType, b: Bounds) {
    let Some(dev) = sdsparse::backend::test_util::cuda_device_or_skip(test) else {
        return;
    };
    let device = Device::Cuda(dev);
    let sd = StableDiffusion::load_as(&model_dir(), &Default::default(), &device, dtype).unwrap();
    assert_eq!(sd.activation_dtype(), dtype);
    let refs = load_f32(&fixture("tiny-sd2-eps/reference/reference.safetensors"));
    for (kind, steps, key, png) in [
        (SchedulerKind::Ddim, 4, "ddim_final_latents", "ddim.png"),
        (SchedulerKind::Euler, 6, "euler_final_latents", "euler.png"),
        (SchedulerKind::DpmPp2m, 6, "dpmpp2m_final_latents", "dpmpp2m.png"),
    ] {
        let png = fixture(&format!("tiny-sd2-eps/reference/{png}"));
        check_run_within(&sd, kind, steps, &refs[key], None, &png, b);
    }
}

#[test]
fn gpu_f16_matches_diffusers() {
    gpu_half_matches_diffusers("gpu_f16_matches_diffusers", DType::F16, F16_BOUNDS);
}

#[test]
fn gpu_bf16_matches_diffusers() {
    gpu_half_matches_diffusers("gpu_bf16_matches_diffusers", DType::BF16, BF16_BOUNDS);
}

/// The CPU is the f32 reference: f16 / bf16 activations there are refused before any work, by
/// the library and by the CLI (one line, non-zero exit, nothing written); `--device auto`
/// falling back to the CPU notes it and runs in f32.
#[test]
fn cpu_refuses_half_activations() {
    for dtype in [DType::F16, DType::BF16] {
        let e =
            StableDiffusion::load_as(&model_dir(), &Default::default(), &Device::Cpu, dtype).err().unwrap();
        assert!(e.to_string().contains("computes in f32 only"), "{e}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("out.png");
    for (device, dtype, want) in [
        ("cpu", "f16", "computes in f32 only"),
        ("cpu", "bf16", "computes in f32 only"),
        ("cpu", "f64", "--dtype must be f16, bf16 or f32"),
    ] {
        let (ok, stderr) = generate_tiny(
            &["--prompt", "a red circle", "--steps", "1", "--device", device, "--dtype", dtype],
            &png,
        );
        assert!(!ok, "--device {device} --dtype {dtype}: succeeded: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        assert!(stderr.contains(want), "{stderr}");
        assert!(!png.exists(), "nothing written");
    }
}

/// PNDM as SD2.1-base ships it (`skip_prk_steps: true`), reference made by
/// tools/make_pndm_reference.py; plus the from_config default with Runge-Kutta warm-up.
#[test]
fn pndm_matches_diffusers() {
    let mut sd = StableDiffusion::load(&model_dir(), &Device::Cpu).unwrap();
    let refs = load_f32(&fixture("tiny-sd2-eps/reference/pndm_reference.safetensors"));
    let base = sd.scheduler_config().clone();

    let mut skip = base.clone();
    skip.skip_prk_steps = Some(true);
    sd.set_scheduler_config(skip);
    let png = fixture("tiny-sd2-eps/reference/pndm.png");
    let t = [831.0, 665.0, 665.0, 499.0, 333.0, 167.0, 1.0];
    check_run(&sd, SchedulerKind::Pndm, 6, &refs["pndm_final_latents"], Some(&t), &png);

    // With PRK steps: no PNG was written for this run; compare against its float image.
    sd.set_scheduler_config(base);
    let g = sd.generate(&reference_request(4, SchedulerKind::Pndm), &mut |_, _| {}).unwrap();
    assert_eq!(g.timesteps.len(), 13);
    let e = rel_err(&g.latents.to_vec().unwrap(), refs["pndm_prk_final_latents"].as_slice().unwrap());
    println!("Pndm (PRK warm-up): final latents rel err {e:.3e}");
    assert!(e < 1e-4, "PNDM with PRK: rel err {e}");
    // Reference image is [1, H, W, 3]; ours [1, 3, H, W].
    let want = refs["pndm_prk_image"].as_slice().unwrap().to_vec();
    let ours = g.image.to_vec().unwrap();
    let (h, w) = (64, 64);
    let worst = (0..h * w * 3)
        .map(|i| {
            let (p, c) = (i / 3, i % 3);
            (ours[c * h * w + p] - want[i]).abs()
        })
        .fold(0.0f32, f32::max);
    assert!(worst < 1.0 / 255.0, "PNDM with PRK: image differs by {worst}");
}

/// A checkpoint converted by `sdsparse convert` runs from the compressed weights and gives
/// the same image as its dense `sdsparse export` copy, for unstructured (the study's
/// default sparsities) and 2:4 pruning.
#[test]
fn sparse_checkpoint_matches_its_dense_export() {
    use sdsparse::convert::{convert, export, ConvertOptions};
    use sdsparse::prune::Pattern;
    for (pattern, format) in [(Pattern::Unstructured, "unstructured"), (Pattern::Sparse24, "2:4")] {
        let tmp = tempfile::tempdir().unwrap();
        let sparse = tmp.path().join("sparse");
        let dense = tmp.path().join("dense");
        let opts = ConvertOptions { pattern, ..ConvertOptions::default() };
        convert(&model_dir(), &sparse, &opts, &mut |_| {}).unwrap();
        export(&sparse, &dense, false, &mut |_| {}).unwrap();

        let req = reference_request(4, SchedulerKind::Ddim);
        let sd_sparse = StableDiffusion::load(&sparse, &Device::Cpu).unwrap();
        let formats = sd_sparse.memory().by_format();
        assert!(formats.contains_key(format), "expected {format} weights, got {formats:?}");
        let a = sd_sparse.generate(&req, &mut |_, _| {}).unwrap();
        let sd_dense = StableDiffusion::load(&dense, &Device::Cpu).unwrap();
        assert_eq!(sd_dense.memory().by_format().keys().collect::<Vec<_>>(), ["dense"]);
        let b = sd_dense.generate(&req, &mut |_, _| {}).unwrap();

        let e = rel_err(&a.latents.to_vec().unwrap(), b.latents.as_slice().unwrap());
        let (_, _, pa) = pipeline::image_to_rgb8(&a.image).unwrap();
        let (_, _, pb) = pipeline::image_to_rgb8(&b.image).unwrap();
        let max = pa.iter().zip(&pb).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
        println!("{format} sparse vs dense export: latents rel err {e:.3e}, max pixel diff {max}");
        assert!(e < 1e-5, "{format}: sparse vs dense latents rel err {e}");
        assert!(max <= 1, "{format}: sparse vs dense images differ by {max}/255");
    }
}

/// The tiny fixture converted with `pattern` (the study's default sparsities) into a temporary
/// folder (kept alive by the returned guard), the 4-step DDIM request and the CPU's run of it:
/// the reference every GPU run of a sparse checkpoint is held to.
fn converted_with_cpu_run(
    pattern: sdsparse::prune::Pattern,
) -> (tempfile::TempDir, PathBuf, GenerateRequest, pipeline::Generated) {
    use sdsparse::convert::{convert, ConvertOptions};
    let tmp = tempfile::tempdir().unwrap();
    let sparse = tmp.path().join("sparse");
    let opts = ConvertOptions { pattern, ..ConvertOptions::default() };
    convert(&model_dir(), &sparse, &opts, &mut |_| {}).unwrap();
    let req = reference_request(4, SchedulerKind::Ddim);
    let cpu = StableDiffusion::load(&sparse, &Device::Cpu).unwrap().generate(&req, &mut |_, _| {}).unwrap();
    (tmp, sparse, req, cpu)
}

/// The GPU pipeline on converted checkpoints (unstructured at the study's sparsities, and 2:4)
/// against the CPU run of the same checkpoint. With `SDSPARSE_GPU_SPARSE=dense` the compressed
/// weights are expanded once on the GPU and multiplied in f32 (bound 1e-4, like the dense
/// model); by default they run through the sparse GEMM kernels, which round activations to f16
/// (bound 2e-2 on the latents, the image within 2/255 on 99% of the channel values). The device
/// check runs it both ways, each in its own process; without a GPU it skips.
#[test]
fn gpu_sparse_checkpoints_match_cpu() {
    use sdsparse::prune::Pattern;
    let Some(dev) = sdsparse::backend::test_util::cuda_device_or_skip("gpu_sparse_checkpoints_match_cpu")
    else {
        return;
    };
    let expanded = std::env::var("SDSPARSE_GPU_SPARSE").is_ok_and(|v| v == "dense");
    let (latent_bound, pixel_bound, pixel_frac) = if expanded { (1e-4, 1, 0.999) } else { (2e-2, 2, 0.99) };
    for (pattern, format) in [(Pattern::Unstructured, "unstructured"), (Pattern::Sparse24, "2:4")] {
        let (_tmp, sparse, req, cpu) = converted_with_cpu_run(pattern);
        // Expanded: f32 activations (exact cuBLAS SGEMM); sparse kernels: the CUDA default, f16.
        let dtype = if expanded { DType::F32 } else { DType::F16 };
        let sd_gpu =
            StableDiffusion::load_as(&sparse, &Default::default(), &Device::Cuda(dev.clone()), dtype)
                .unwrap();
        let gpu = sd_gpu.generate(&req, &mut |_, _| {}).unwrap();
        let e = rel_err(&gpu.latents.to_vec().unwrap(), cpu.latents.as_slice().unwrap());
        let (_, _, pa) = pipeline::image_to_rgb8(&gpu.image).unwrap();
        let (_, _, pb) = pipeline::image_to_rgb8(&cpu.image).unwrap();
        let within = pa.iter().zip(&pb).filter(|(x, y)| x.abs_diff(**y) <= pixel_bound).count();
        let frac = within as f64 / pa.len() as f64;
        println!(
            "{format} on the GPU ({}) vs CPU: latents rel err {e:.3e}, {:.3}% of pixels within {pixel_bound}/255",
            if expanded { "expanded, f32 cuBLAS" } else { "sparse kernels, f16 activations" },
            100.0 * frac
        );
        assert!(e < latent_bound, "{format}: GPU vs CPU latents rel err {e} (bound {latent_bound})");
        assert!(frac >= pixel_frac, "{format}: only {frac} of the pixels within {pixel_bound}/255");
    }
}

/// The dense-only mode: a GPU below compute capability 8.0 (Turing), or any GPU with
/// `SDSPARSE_GPU_ARCH_MODE=dense-only` (how the device check runs this on its H200). The mode is
/// said once, in one line, with the load's notes; the dense tiny model in f16 (attention on the
/// scores path: cuBLAS + the f32 softmax, never the flash kernel) matches diffusers within the
/// f16 bounds; converted 2:4 and unstructured checkpoints are expanded to dense at load, so not
/// one sparse Linear runs (the profile counts none) and the latents match the CPU run within
/// the f16 bound; below 8.0 `--dtype bf16` is refused. Skips without a GPU, and says why on a
/// GPU that runs every kernel (then the device check's forced run covers it).
#[test]
fn gpu_dense_only_mode_expands_sparse_weights_and_matches_diffusers() {
    use sdsparse::backend::profile::{self, OpKind};
    use sdsparse::prune::Pattern;
    let test = "gpu_dense_only_mode_expands_sparse_weights_and_matches_diffusers";
    let Some(dev) = sdsparse::backend::test_util::cuda_device_or_skip(test) else {
        return;
    };
    if dev.arch_mode().sparse_kernels() {
        eprintln!(
            "{test}: not in dense-only mode: {} runs every kernel (SDSPARSE_GPU_ARCH_MODE=dense-only forces the mode)",
            dev.gpu_name()
        );
        return;
    }
    let device = Device::Cuda(dev.clone());
    if dev.compute_capability() < (8, 0) {
        let e =
            StableDiffusion::load_as(&model_dir(), &Default::default(), &device, DType::BF16).err().unwrap();
        assert!(e.to_string().contains("bf16") && !e.to_string().contains('\n'), "{e}");
    }
    let sd = StableDiffusion::load_as(&model_dir(), &Default::default(), &device, DType::F16).unwrap();
    let said: Vec<&String> = sd.notes().iter().filter(|n| n.contains("expanded to dense")).collect();
    assert_eq!(said.len(), 1, "{:?}", sd.notes());
    assert!(said[0].contains(dev.gpu_name()) && !said[0].contains('\n'), "{}", said[0]);
    let refs = load_f32(&fixture("tiny-sd2-eps/reference/reference.safetensors"));
    let png = fixture("tiny-sd2-eps/reference/ddim.png");
    check_run_within(&sd, SchedulerKind::Ddim, 4, &refs["ddim_final_latents"], None, &png, F16_BOUNDS);
    drop(sd);
    for (pattern, format) in [(Pattern::Unstructured, "unstructured"), (Pattern::Sparse24, "2:4")] {
        let (_tmp, sparse, req, cpu) = converted_with_cpu_run(pattern);
        let sd_gpu = StableDiffusion::load_as(&sparse, &Default::default(), &device, DType::F16).unwrap();
        profile::start(Some(dev.clone()));
        let gpu = sd_gpu.generate(&req, &mut |_, _| {});
        let prof = profile::finish().expect("profiling was started");
        let gpu = gpu.unwrap();
        let (sparse_calls, dense_calls) = (
            prof.total(OpKind::Linear24).0 + prof.total(OpKind::LinearUnstructured).0,
            prof.total(OpKind::LinearDense).0,
        );
        println!("{format} in dense-only mode: {sparse_calls} sparse Linear calls, {dense_calls} dense");
        assert_eq!(sparse_calls, 0, "{format}: a sparse Linear ran in dense-only mode");
        assert!(dense_calls > 0);
        let e = rel_err(&gpu.latents.to_vec().unwrap(), cpu.latents.as_slice().unwrap());
        println!("{format} in dense-only mode (f16, expanded) vs CPU: latents rel err {e:.3e}");
        assert!(e < F16_BOUNDS.latents, "{format}: latents rel err {e}");
    }
}

/// CUDA graphs of the UNet step: the run that replays a captured step (steps 3 and 4 of 4:
/// step 1 eager, step 2 captured) gives the eager run's latents, and one graph was captured.
/// The device check's pipeline step runs it; without a GPU it skips.
#[test]
fn gpu_cuda_graphs_match_eager_steps() {
    let Some(dev) = sdsparse::backend::test_util::cuda_device_or_skip("gpu_cuda_graphs_match_eager_steps")
    else {
        return;
    };
    let req = reference_request(4, SchedulerKind::Ddim);
    let mut sd = StableDiffusion::load(&model_dir(), &Device::Cuda(dev)).unwrap();
    sd.set_cuda_graphs(false);
    let eager = sd.generate(&req, &mut |_, _| {}).unwrap();
    sd.set_cuda_graphs(true);
    let graphed = sd.generate(&req, &mut |_, _| {}).unwrap();
    assert_eq!(eager.timings.cuda_graphs, 0);
    assert_eq!(graphed.timings.cuda_graphs, 1, "the step was not captured (see the note above)");
    let e = rel_err(&graphed.latents.to_vec().unwrap(), eager.latents.as_slice().unwrap());
    println!("graph replay vs eager: latents rel err {e:.3e}");
    assert!(e < 1e-6, "graph replay vs eager latents rel err {e}");
}

/// `--device cuda` on a machine without a usable GPU: one line naming the reason, a non-zero
/// exit, and no output file. (On a machine with a GPU this checks nothing and says so.)
#[test]
fn cli_device_cuda_without_gpu_is_one_line_error() {
    if sdsparse::backend::cuda::CudaDevice::new(0).is_ok() {
        eprintln!("skipped: a GPU is present");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("out.png");
    // The default activation dtype, then each one asked for explicitly.
    for dtype in [None, Some("f16"), Some("bf16"), Some("f32")] {
        let mut args = vec!["--prompt", "a red circle", "--steps", "2", "--device", "cuda"];
        args.extend(dtype.iter().flat_map(|d| ["--dtype", *d]));
        let (ok, stderr) = generate_tiny(&args, &png);
        assert!(!ok, "--dtype {dtype:?}: succeeded: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "--dtype {dtype:?}: one line: {stderr}");
        assert!(stderr.contains("--device cuda"), "{stderr}");
        assert!(
            stderr.contains("no CUDA driver")
                || stderr.contains("no GPU")
                || stderr.contains("without CUDA kernels"),
            "{stderr}"
        );
        assert!(!png.exists(), "nothing written");
    }
    // auto falls back to the CPU with a note and writes the image.
    let (ok, stderr) = generate_tiny(&["--prompt", "a red circle", "--steps", "1", "--device", "auto"], &png);
    assert!(ok && stderr.contains("note: running on the CPU"), "{stderr}");
    assert!(png.exists());
    // auto with --dtype f16 on the CPU: a note, then the f32 run.
    std::fs::remove_file(&png).unwrap();
    let (ok, stderr) = generate_tiny(
        &["--prompt", "a red circle", "--steps", "1", "--device", "auto", "--dtype", "f16"],
        &png,
    );
    assert!(ok, "{stderr}");
    assert!(stderr.contains("note: --dtype f16 is for CUDA; the CPU computes in f32"), "{stderr}");
    assert!(png.exists());
}

#[test]
fn seeded_noise_is_deterministic_and_standard_normal() {
    let a = pipeline::GaussianNoise::new(7).take(100_000);
    let b = pipeline::GaussianNoise::new(7).take(100_000);
    assert_eq!(a, b);
    assert_ne!(a, pipeline::GaussianNoise::new(8).take(100_000));
    let n = a.len() as f64;
    let mean = a.iter().map(|&x| x as f64).sum::<f64>() / n;
    let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!(mean.abs() < 0.02 && (var - 1.0).abs() < 0.02, "mean {mean}, var {var}");
    assert!(a.iter().all(|x| x.is_finite()));
}

#[test]
fn sizes_are_checked() {
    let sd = StableDiffusion::load(&model_dir(), &Device::Cpu).unwrap();
    // Tiny fixture: UNet sample_size 32, VAE factor 2.
    assert_eq!(sd.vae_scale_factor(), 2);
    assert_eq!(sd.default_size(), (64, 64));
    let mut req = GenerateRequest::new("x");
    assert_eq!(sd.latent_shape(&req).unwrap(), [1, 4, 32, 32]);
    req.width = Some(48);
    req.height = Some(40);
    assert_eq!(sd.latent_shape(&req).unwrap(), [1, 4, 20, 24]);
    req.width = Some(47);
    let e = sd.latent_shape(&req).unwrap_err().to_string();
    assert!(e.contains("multiple of 2"), "{e}");
    // Init latents set the size; a disagreeing --width is an error; wrong ranks too.
    let mut req = GenerateRequest::new("x");
    req.init_latents = Some(Tensor::zeros(&[1, 4, 8, 12]));
    assert_eq!(sd.latent_shape(&req).unwrap(), [1, 4, 8, 12]);
    req.width = Some(64);
    assert!(sd.latent_shape(&req).is_err());
    req.width = None;
    req.init_latents = Some(Tensor::zeros(&[4, 8, 12]));
    assert!(sd.latent_shape(&req).is_err());
    req.init_latents = Some(Tensor::zeros(&[1, 3, 8, 8]));
    assert!(sd.latent_shape(&req).is_err());
}

#[test]
fn latents_files_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("l.safetensors");
    let t = Tensor::from_vec((0..2 * 4 * 3).map(|i| i as f32 * 0.5 - 3.0).collect(), &[1, 4, 2, 3]).unwrap();
    pipeline::save_latents(&t, &p).unwrap();
    let back = pipeline::load_latents(&p).unwrap();
    assert_eq!(back.shape(), t.shape());
    assert_eq!(back.to_vec().unwrap(), t.to_vec().unwrap());
    // The fixture's init latents file names its tensor `init_latents`; it is accepted too.
    let init = pipeline::load_latents(&fixture("tiny-sd2-eps/reference/init_latents.safetensors")).unwrap();
    assert_eq!(init.shape(), &[1, 4, 32, 32]);
    assert!(pipeline::load_latents(&tmp.path().join("missing.safetensors")).is_err());
    std::fs::write(&p, b"not safetensors").unwrap();
    assert!(pipeline::load_latents(&p).is_err());
}

#[test]
fn missing_model_folder_is_an_error() {
    let e = StableDiffusion::load(Path::new("/nonexistent/model"), &Device::Cpu).err().unwrap();
    assert!(e.to_string().contains("not found"), "{e}");
}

fn sdsparse() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_sdsparse"))
}

/// `sdsparse generate --model <the tiny fixture> ARGS --out PNG`: whether it exited 0, and its
/// stderr.
fn generate_tiny(args: &[&str], png: &Path) -> (bool, String) {
    let out = sdsparse()
        .args(["generate", "--model"])
        .arg(model_dir())
        .args(args)
        .arg("--out")
        .arg(png)
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `sdsparse generate` end to end: reference init latents in, PNG and latents out.
#[test]
fn cli_generate_matches_diffusers() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("out.png");
    let lat = tmp.path().join("final.safetensors");
    let out = sdsparse()
        .args(["generate", "--model"])
        .arg(model_dir())
        .args([
            "--prompt",
            "a photograph of an astronaut riding a horse",
            "--steps",
            "4",
            "--guidance",
            "7.5",
            "--profile",
        ])
        .args(["--scheduler", "ddim", "--device", "cpu", "--init-latents"])
        .arg(fixture("tiny-sd2-eps/reference/init_latents.safetensors"))
        .arg("--save-latents")
        .arg(&lat)
        .arg("--out")
        .arg(&png)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("text encoder") && stderr.contains("weight memory"), "report missing: {stderr}");
    // --profile: the per-op table, host timers on the CPU, a column per stage, and the
    // results unchanged (the latents bound below).
    let table = stderr.split("per-op time on cpu (host timers)").nth(1).unwrap_or_else(|| panic!("{stderr}"));
    for col in ["text enc ms", "UNet ms", "VAE ms", "total ms"] {
        assert!(table.contains(col), "column {col} missing: {table}");
    }
    for row in ["linear dense", "conv", "attention", "norms", "elementwise", "all ops", "outside ops"] {
        assert!(table.lines().any(|l| l.trim_start().starts_with(row)), "row {row} missing: {table}");
    }
    // The text encoder has no convolution; the VAE has one (at least conv_in).
    let conv: Vec<&str> =
        table.lines().find(|l| l.trim_start().starts_with("conv")).unwrap().split_whitespace().collect();
    assert_eq!(conv[2].parse::<f64>().unwrap(), 0.0, "{table}");
    assert!(conv[4].parse::<f64>().unwrap() > 0.0, "{table}");
    let refs = load_f32(&fixture("tiny-sd2-eps/reference/reference.safetensors"));
    let got = pipeline::load_latents(&lat).unwrap();
    let e = rel_err(&got.to_vec().unwrap(), refs["ddim_final_latents"].as_slice().unwrap());
    assert!(e < 1e-4, "CLI latents rel err {e}");
    let ours = image::open(&png).unwrap().to_rgb8().into_raw();
    let want = image::open(fixture("tiny-sd2-eps/reference/ddim.png")).unwrap().to_rgb8().into_raw();
    let within = ours.iter().zip(&want).filter(|(a, b)| a.abs_diff(**b) <= 1).count();
    assert!(within as f64 >= 0.999 * want.len() as f64);
}

/// Bad input ends in one `error: ...` line and a non-zero exit, never a panic.
#[test]
fn cli_bad_input_is_one_line_error() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_dir();
    let m = model.to_str().unwrap();
    let missing = tmp.path().join("missing.safetensors");
    let out_png = tmp.path().join("x.png");
    let o = out_png.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--model", m, "--prompt", "x", "--scheduler", "lms", "--out", o], "unknown scheduler"),
        (vec!["--model", m, "--prompt", "x", "--width", "63", "--out", o], "multiple of 2"),
        (vec!["--model", "/nonexistent/model", "--prompt", "x", "--out", o], "not found"),
        (vec!["--model", m, "--prompt", "x", "--device", "cuda", "--out", o], "--device cuda"),
        (vec!["--model", m, "--prompt", "x", "--device", "tpu", "--out", o], "--device must be"),
        (
            vec!["--model", m, "--prompt", "x", "--init-latents", missing.to_str().unwrap(), "--out", o],
            "missing",
        ),
        (vec!["--model", m, "--prompt", "x", "--steps", "0", "--out", o], "--steps"),
        (vec!["--model", m, "--prompt", "x", "--out", "x.jpg"], "PNG"),
        (
            vec!["--model", m, "--prompt", "x", "--vae-tiling", "--vae-tile-size", "12", "--out", o],
            "multiple of 8",
        ),
    ];
    for (args, needle) in cases {
        let out = sdsparse().arg("generate").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        // One line and no note before it (the CPU fallback's note waits until the inputs are checked).
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: expected one line, got {stderr}");
        assert!(lines[0].starts_with("error: ") && lines[0].contains(needle), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// Notes say what a flag did where it did nothing, and none comes before an unrelated error
/// (found by the new-user review): a missing model is said before the device is picked (whose
/// CPU fallback prints a note); `--retune` / `--no-cuda-graphs` on the CPU say they change
/// nothing; a single-file export of a non-standard architecture says it needs `--config`.
#[test]
fn cli_notes_say_what_a_flag_did() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("x.png");
    let out = sdsparse()
        .args(["generate", "--model", "/nonexistent/model", "--prompt", "x", "--out"])
        .arg(&png)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.trim() == "error: /nonexistent/model: not found", "{stderr}");
    let (ok, stderr) = generate_tiny(
        &["--prompt", "x", "--steps", "1", "--device", "cpu", "--retune", "--no-cuda-graphs"],
        &png,
    );
    assert!(ok, "{stderr}");
    for flag in ["--retune", "--no-cuda-graphs"] {
        assert!(
            stderr.contains(&format!("note: {flag} is for CUDA; it changes nothing on the CPU")),
            "{stderr}"
        );
    }
    let single = tmp.path().join("tiny.safetensors");
    let out = sdsparse()
        .args(["export", "--quiet", "--format", "single-file", "--model"])
        .arg(model_dir())
        .arg("--out")
        .arg(&single)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && single.is_file(), "{stderr}");
    let note = format!("reading it back needs its configs: --config {}", model_dir().display());
    assert!(stderr.contains(&note), "{stderr}");
}

/// A negative number reaches our range check (one line naming the flag and the range), not
/// clap's "unexpected argument '-0.1'" (found by the new-user reviews).
#[test]
fn cli_negative_numbers_reach_validation() {
    let tmp = tempfile::tempdir().unwrap();
    let m = model_dir();
    let cases: [(&str, Vec<&str>, &str); 3] = [
        ("convert", vec!["--unet-sparsity", "-0.1"], "--unet-sparsity -0.1 is outside [0, 1)"),
        ("sweep", vec!["--sparsities", "-0.1"], "-0.1 is outside [0, 1)"),
        ("plan", vec!["--sparsities", "-0.1"], "-0.1 is outside (0, 1)"),
    ];
    for (cmd, args, needle) in cases {
        let out = sdsparse()
            .args([cmd, "--model"])
            .arg(&m)
            .arg("--out")
            .arg(tmp.path().join(cmd))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{cmd} {args:?}: {stderr}");
        assert!(stderr.trim().starts_with("error: ") && stderr.contains(needle), "{cmd} {args:?}: {stderr}");
        assert!(!tmp.path().join(cmd).exists(), "{cmd} wrote its output before refusing");
    }
}

/// With guidance 1 or less diffusers skips the unconditional batch; the update must then
/// equal the guided one at scale 1 (`u + 1 * (c - u) = c`) up to rounding.
#[test]
fn guidance_one_runs_the_conditional_batch_only() {
    let sd = StableDiffusion::load(&model_dir(), &Device::Cpu).unwrap();
    let mut req = reference_request(2, SchedulerKind::Ddim);
    req.guidance = 1.0;
    let off = sd.generate(&req, &mut |_, _| {}).unwrap();
    req.guidance = 1.0 + 1e-6;
    let on = sd.generate(&req, &mut |_, _| {}).unwrap();
    let e = rel_err(&off.latents.to_vec().unwrap(), on.latents.as_slice().unwrap());
    assert!(e < 1e-5, "guidance off vs scale 1: rel err {e}");
}

/// The CLI's one-shot path: encode, release the text encoder, denoise from the embeddings,
/// release the UNet, decode. Same latents and image as `generate`; afterwards encoding and
/// denoising are clear errors; embeddings of the wrong batch for the guidance are refused;
/// `vae_tiling` decodes in tiles and the report says so.
#[test]
fn released_models_and_vae_tiling() {
    let mut sd = StableDiffusion::load(&model_dir(), &Device::Cpu).unwrap();
    let req = reference_request(2, SchedulerKind::Ddim);
    let want = sd.generate(&req, &mut |_, _| {}).unwrap();
    let emb = sd.encode_prompt(&req.prompt, &req.negative_prompt, true).unwrap();
    sd.release_text_encoder();
    let e = sd.encode_prompt(&req.prompt, "", true).unwrap_err().to_string();
    assert!(e.contains("released"), "{e}");
    let unguided = GenerateRequest { guidance: 1.0, ..req.clone() };
    let e = sd.denoise_with_embeddings(&unguided, emb.clone(), &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("prompt embeddings"), "{e}");
    let d = sd.denoise_with_embeddings(&req, emb.clone(), &mut |_, _| {}).unwrap();
    sd.release_unet();
    let e = sd.denoise_with_embeddings(&req, emb, &mut |_, _| {}).unwrap_err().to_string();
    assert!(e.contains("released"), "{e}");
    let got = sd.decode(&req, d.clone()).unwrap();
    assert_eq!(got.latents.to_vec().unwrap(), want.latents.to_vec().unwrap());
    assert_eq!(got.image.to_vec().unwrap(), want.image.to_vec().unwrap());
    assert_eq!(got.vae_tiles, None);

    // 32x32 latents in 16-pixel tiles (8 latents, starting every 6): 6 x 6 tiles.
    let tiled_req = GenerateRequest { vae_tiling: true, vae_tile_size: Some(16), ..req.clone() };
    let tiled = sd.decode(&tiled_req, d.clone()).unwrap();
    assert_eq!(tiled.vae_tiles, Some((6, 6, 16)));
    assert_ne!(tiled.image.to_vec().unwrap(), want.image.to_vec().unwrap());
    assert!(pipeline::report(&sd, &tiled).contains("tiled: 6x6 tiles of 16 px"));
    let bad = GenerateRequest { vae_tiling: true, vae_tile_size: Some(12), ..req };
    let e = sd.decode(&bad, d).unwrap_err().to_string();
    assert!(e.contains("multiple of 8"), "{e}");
}

/// `generate --vae-tiling` says in its report that (and how) the image was tiled, and says
/// so when the image fits one tile and is decoded whole.
#[test]
fn cli_generate_reports_vae_tiling() {
    let tmp = tempfile::tempdir().unwrap();
    for (tile, want) in [("16", "tiled: 6x6 tiles of 16 px"), ("64", "decoded untiled")] {
        let png = tmp.path().join(format!("t{tile}.png"));
        let out = sdsparse()
            .args(["generate", "--model"])
            .arg(model_dir())
            .args([
                "--prompt",
                "x",
                "--steps",
                "1",
                "--device",
                "cpu",
                "--vae-tiling",
                "--vae-tile-size",
                tile,
            ])
            .arg("--out")
            .arg(&png)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains(want), "{tile}: {stderr}");
        assert!(png.exists());
    }
}
