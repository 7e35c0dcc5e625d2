//! The text-to-image pipeline: prompt → embeddings → denoising loop with CFG → VAE → image.
//!
//! It follows diffusers' `StableDiffusionPipeline` step for step so that, from the same
//! initial latents, it produces the same latents and image: the prompt and the negative
//! prompt are tokenized (padded to 77) and encoded as one batch `[uncond, cond]`; each
//! denoising step runs the UNet on the doubled latents, guides with `u + g * (c - u)` and
//! lets the scheduler update the latents; the VAE decodes `latents / scaling_factor` and the
//! image is `(x / 2 + 0.5).clamp(0, 1)`, written as 8-bit PNG `round(x * 255)`.
//!
//! Initial noise comes from `--init-latents` (unit noise, multiplied by the scheduler's
//! `init_noise_sigma` like diffusers' `latents=` argument) or from our own seeded generator
//! ([`GaussianNoise`]), which is NOT torch's RNG: a seed gives the same image here on every
//! machine, but not the image diffusers gives for that seed.

use crate::backend::cuda::graph::{self as cuda_graph, StepGraphs, StepPlan};
use crate::backend::profile::{self, Stage};
use crate::backend::{ops, Device, Tensor};
use crate::checkpoint::{ComponentStore, ModelSource, SingleFileOptions, VarBuilder};
use crate::error::{Error, Result};
use crate::format::DType;
use crate::model::clip_text::ClipTextConfig;
use crate::model::clip_text::ClipTextModel;
use crate::model::config::UNetConfig;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::VaeConfig;
use crate::model::vae::VaeDecoder;
use crate::scheduler::{self, SchedulerConfig, SchedulerKind};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// The text prompt (tokenized to the text encoder's 77 tokens; longer ones are cut).
    pub prompt: String,
    /// The unconditional side of classifier-free guidance (`""`: diffusers' default).
    pub negative_prompt: String,
    /// Denoising steps (at least 1; PNDM makes more UNet calls than steps).
    pub steps: usize,
    /// Classifier-free guidance scale `g` in `u + g * (c - u)`; 1 or less turns guidance off.
    pub guidance: f32,
    /// `None`: the checkpoint's own scheduler (`scheduler_config.json`'s `_class_name`).
    pub scheduler: Option<SchedulerKind>,
    /// Seed of the initial noise ([`GaussianNoise`], not torch's generator).
    pub seed: u64,
    /// Image size in pixels; `None`: the UNet's `sample_size` x the VAE scale factor (or the
    /// size `init_latents` implies).
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Unit-variance initial noise `[1, C, H/f, W/f]`; `None`: seeded noise.
    pub init_latents: Option<Tensor>,
    /// Decode in overlapping tiles, as diffusers' `vae.enable_tiling()`
    /// ([`VaeDecoder::decode_tiled`]): the VAE's memory then follows the tile, not the image.
    /// Latents no larger than one tile are decoded untiled, as in diffusers.
    pub vae_tiling: bool,
    /// The tile in pixels (diffusers' `tile_sample_min_size`); `None`: the VAE config's
    /// `sample_size`, diffusers' default. A multiple of 4 times the VAE scale factor.
    pub vae_tile_size: Option<usize>,
}

impl GenerateRequest {
    /// diffusers' defaults: 50 steps, guidance 7.5, empty negative prompt, seed 0.
    pub fn new(prompt: &str) -> Self {
        GenerateRequest {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            steps: 50,
            guidance: 7.5,
            scheduler: None,
            seed: 0,
            width: None,
            height: None,
            init_latents: None,
            vae_tiling: false,
            vae_tile_size: None,
        }
    }
}

/// Wall-clock time of each stage of one generation.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Tokenizing and encoding the prompt and the negative prompt.
    pub text_encoder: Duration,
    /// Each UNet call with guidance and the scheduler step, in order.
    pub unet_steps: Vec<Duration>,
    /// VAE decode and conversion to `[0, 1]`.
    pub vae: Duration,
    /// CUDA graphs of the UNet step captured (0: every step ran eagerly).
    pub cuda_graphs: usize,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Final latents before decoding, `[1, C, H/f, W/f]`.
    pub latents: Tensor,
    /// The image `[1, 3, H, W]` in `[0, 1]`.
    pub image: Tensor,
    /// The scheduler that ran (`ddim`, `euler`, `dpm++2m`, `pndm`).
    pub scheduler: &'static str,
    /// Timesteps the UNet was called at.
    pub timesteps: Vec<f32>,
    pub timings: Timings,
    /// Set when the prompt was longer than the text encoder's 77 tokens and was cut.
    pub prompt_truncated: bool,
    /// The VAE tile grid `(rows, cols)` and tile size in pixels when the image was decoded
    /// in tiles (`None`: in one piece).
    pub vae_tiles: Option<(usize, usize, usize)>,
}

/// An 8-bit RGB image: `pixels` holds `3 * width * height` bytes, row-major, channels
/// interleaved (R, G, B), no padding between rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

impl Generated {
    /// The image as 8-bit RGB, `round(x * 255)` (the bytes [`save_png`] writes).
    pub fn to_rgb8(&self) -> Result<RgbImage> {
        let (width, height, pixels) = image_to_rgb8(&self.image)?;
        Ok(RgbImage { width, height, pixels })
    }
}

/// Bytes and tensor counts of the loaded weights, by storage format.
#[derive(Debug, Clone, Default)]
pub struct WeightMemory {
    /// `(component, format) → (tensors, parameters, bytes in memory)`; format is `dense`,
    /// `2:4` or `unstructured`.
    pub entries: BTreeMap<(String, String), (usize, usize, u64)>,
}

impl WeightMemory {
    /// Adds the weights of one component: dense matrices and convolution kernels (2-D and
    /// up) count their stored bytes (they stay in the checkpoint's dtype), 1-D tensors
    /// (biases, norms) and the position embedding 4 bytes per element (widened to f32 at
    /// load), compressed ones their stored values + metadata.
    fn add_component(
        &mut self,
        component: &str,
        store: &ComponentStore,
        only: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<()> {
        let header = store.sparse_header().cloned();
        for name in store.logical_names() {
            if let Some(f) = only {
                if !f(&name) {
                    continue;
                }
            }
            let (format, numel, bytes) = match header.as_ref().and_then(|h| h.layers.get(&name)) {
                Some(rec) => {
                    let bytes: u64 = rec
                        .pattern
                        .suffixes()
                        .iter()
                        .map(|s| store.raw(&format!("{name}{s}")).map(|r| r.bytes.len() as u64).unwrap_or(0))
                        .sum();
                    (rec.pattern.as_str().to_string(), rec.shape.iter().product::<usize>(), bytes)
                }
                None => {
                    let raw = store.raw(&name)?;
                    if raw.load_dtype().is_none() {
                        continue; // integer buffers (e.g. position_ids) are not weights
                    }
                    let n: usize = raw.shape.iter().product();
                    let kept = raw.shape.len() >= 2 && !name.contains("position_embedding");
                    let width = match raw.load_dtype() {
                        Some(d) if kept => d.size_in_bytes(),
                        _ => 4,
                    };
                    ("dense".to_string(), n, (width * n) as u64)
                }
            };
            let e = self.entries.entry((component.to_string(), format)).or_default();
            e.0 += 1;
            e.1 += numel;
            e.2 += bytes;
        }
        Ok(())
    }

    /// Total bytes per format over all components.
    pub fn by_format(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for ((_, f), (_, _, b)) in &self.entries {
            *out.entry(f.clone()).or_insert(0) += b;
        }
        out
    }

    pub fn total_bytes(&self) -> u64 {
        self.entries.values().map(|e| e.2).sum()
    }
}

/// Every device the pipeline runs on: the CPU, or a GPU that `CudaDevice::new` opened (which
/// already refused GPUs older than sm_80 and builds without kernels); cuBLAS must load too,
/// checked here so a missing library is one line before any weight is read.
fn check_device(device: &Device) -> Result<()> {
    if let Device::Cuda(d) = device {
        d.blas()?;
    }
    Ok(())
}

/// The CPU computes in f32 only (it is the reference); f16 / bf16 activations are for CUDA,
/// bf16 for GPUs of compute capability 8.0 or newer.
fn check_dtype(device: &Device, dtype: DType) -> Result<()> {
    match device {
        Device::Cpu if dtype != DType::F32 => Err(Error::Invalid(format!(
            "--dtype {}: the CPU backend computes in f32 only (f16 / bf16 activations are for --device cuda)",
            dtype.name()
        ))),
        Device::Cuda(d) => {
            crate::backend::cuda::check_activation_dtype(d.gpu_name(), d.compute_capability(), dtype)
        }
        Device::Cpu => Ok(()),
    }
}

/// A loaded SD2-family pipeline.
pub struct StableDiffusion {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: VaeDecoder,
    scheduler_config: SchedulerConfig,
    /// UNet `sample_size` after diffusers' load-time correction (see [`load_notes`]).
    sample_size: usize,
    device: Device,
    /// The activation dtype (f16 by default on CUDA, f32 on the CPU).
    dtype: DType,
    memory: WeightMemory,
    /// GPU memory the load took (weights in their device layouts), when on CUDA.
    gpu_bytes: Option<u64>,
    load_time: Duration,
    notes: Vec<String>,
    /// Capture the UNet step in a CUDA graph and replay it (CUDA only; [`Self::set_cuda_graphs`]).
    cuda_graphs: bool,
}

/// The scheduler config of a pipeline folder with the corrections diffusers'
/// `StableDiffusionPipeline.__init__` applies ([`SchedulerConfig::apply_pipeline_corrections`]),
/// and the note that says what was corrected (`None` when nothing was).
pub fn load_scheduler_config(dir: &Path) -> Result<(SchedulerConfig, Option<String>)> {
    let path = dir.join("scheduler").join("scheduler_config.json");
    let mut config = SchedulerConfig::from_file(&path)?;
    let fixed = config.apply_pipeline_corrections();
    let note = (!fixed.is_empty()).then(|| {
        format!(
            "{} is outdated; corrected as diffusers' StableDiffusionPipeline does: {}",
            path.display(),
            fixed.join(", ")
        )
    });
    Ok((config, note))
}

/// The UNet's `sample_size` (the default latent size) with diffusers' pipeline correction: a
/// UNet config written by diffusers before 0.9 with `sample_size` below 64 gets 64 (with a
/// deprecation warning there, a note here).
fn corrected_sample_size(unet_dir: &Path, sample_size: Option<usize>) -> Result<(usize, Option<String>)> {
    let path = unet_dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Checkpoint(format!("{}: invalid JSON ({e})", path.display())))?;
    let old = v.get("_diffusers_version").and_then(|v| v.as_str()).and_then(|ver| {
        let mut parts = ver.split(|c: char| !c.is_ascii_digit()).filter(|p| !p.is_empty());
        let major: u64 = parts.next()?.parse().ok()?;
        let minor: u64 = parts.next()?.parse().ok()?;
        Some((major, minor) < (0, 9))
    });
    match sample_size {
        Some(s) if s < 64 && old == Some(true) => Ok((
            64,
            Some(format!(
                "{}: sample_size {s} from a diffusers version before 0.9 -> 64, as diffusers' \
                 StableDiffusionPipeline corrects it",
                path.display()
            )),
        )),
        Some(s) => Ok((s, None)),
        None => Ok((64, None)),
    }
}

/// Checks that `dir` is a pipeline folder [`StableDiffusion::load`] can load, without reading
/// the weights' values: the tokenizer loads, every config parses and is supported, the
/// scheduler builds, and each weight component holds every tensor its config implies, with
/// the right shape and a float dtype. Returns the load notes (corrections) it would print.
/// `convert` runs this before writing anything.
pub fn check_folder(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Err(Error::Checkpoint(format!("{}: model folder not found", dir.display())));
    }
    ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
    crate::model::clip_text::ClipTextConfig::from_file(&dir.join("text_encoder").join("config.json"))?;
    let unet = crate::model::config::UNetConfig::from_file(&dir.join("unet"))?;
    unet.validate()?;
    crate::model::vae::VaeConfig::from_file(&dir.join("vae").join("config.json"))?;
    let (sched, note) = load_scheduler_config(dir)?;
    let kind = sched.kind()?;
    // The default step count (diffusers' 50), or all training timesteps when there are fewer.
    scheduler::build(kind, &sched.for_kind(kind), 50.min(sched.num_train_timesteps.unwrap_or(1000)))?;
    let mut notes: Vec<String> = note.into_iter().collect();
    let (_, unet_note) = corrected_sample_size(&dir.join("unet"), unet.sample_size)?;
    notes.extend(unet_note);
    for c in ["text_encoder", "unet", "vae"] {
        let store = ComponentStore::open(&dir.join(c))?;
        if store.sparse_header().is_none() {
            crate::checkpoint::expected::validate_component(&store, c)?;
        }
    }
    Ok(notes)
}

impl StableDiffusion {
    /// Loads a diffusers folder (dense, or converted by `sdsparse convert`): `tokenizer/`,
    /// `text_encoder/`, `unet/`, `vae/` and `scheduler/scheduler_config.json`; or a
    /// single-file checkpoint (`.safetensors` / `.ckpt` in the original layout, configuration
    /// inferred as `docs/SINGLE_FILE.md` describes).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with(path, &SingleFileOptions::default(), device)
    }

    /// [`Self::load`] with options for a single-file checkpoint (`--config`,
    /// `--prediction-type`, `--upcast-attention`, `--no-ema`).
    pub fn load_with(path: &Path, single_file: &SingleFileOptions, device: &Device) -> Result<Self> {
        Self::load_as(path, single_file, device, device.default_activation_dtype())
    }

    /// [`Self::load_with`] with activations in `dtype` (`--dtype`): f16 (the CUDA default),
    /// bf16 or f32 on CUDA, where weights are uploaded in it and the GEMMs accumulate in f32
    /// (norms and softmax in f32 inside the kernels); f32 only on the CPU (another dtype is a
    /// one-line error, before anything is read).
    pub fn load_as(
        path: &Path,
        single_file: &SingleFileOptions,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        check_device(device)?;
        check_dtype(device, dtype)?;
        Self::load_source_as(&ModelSource::open(path, single_file)?, device, dtype)
    }

    /// Loads an opened [`ModelSource`] (the device's default activation dtype).
    pub fn load_source(src: &ModelSource, device: &Device) -> Result<Self> {
        Self::load_source_as(src, device, device.default_activation_dtype())
    }

    /// Loads an opened [`ModelSource`] with activations in `dtype` (see [`Self::load_as`]).
    pub fn load_source_as(src: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        check_device(device)?;
        check_dtype(device, dtype)?;
        let on = |vb: VarBuilder| vb.on_device(device).with_activation_dtype(dtype);
        let start = Instant::now();
        let free_before = match device {
            Device::Cuda(d) => Some(d.memory_info()?.0),
            Device::Cpu => None,
        };
        let (tokenizer, text_encoder, unet, vae, scheduler_config, sample_size, notes) = match src {
            ModelSource::Folder(dir) => {
                let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
                let text_encoder = ClipTextModel::new(
                    &on(VarBuilder::from_dir(&dir.join("text_encoder"))?)?,
                    &ClipTextConfig::from_file(&dir.join("text_encoder").join("config.json"))?,
                )?;
                let unet = UNet2DConditionModel::load(
                    &on(VarBuilder::from_dir(&dir.join("unet"))?)?,
                    &UNetConfig::from_file(&dir.join("unet"))?,
                )?;
                let vae = VaeDecoder::new(
                    &on(VarBuilder::from_dir(&dir.join("vae"))?)?,
                    &VaeConfig::from_file(&dir.join("vae").join("config.json"))?,
                )?;
                let (scheduler_config, scheduler_note) = load_scheduler_config(dir)?;
                let (sample_size, unet_note) =
                    corrected_sample_size(&dir.join("unet"), unet.config().sample_size)?;
                let notes: Vec<String> = scheduler_note.into_iter().chain(unet_note).collect();
                (tokenizer, text_encoder, unet, vae, scheduler_config, sample_size, notes)
            }
            ModelSource::SingleFile(s) => {
                let vb = |c: &str| -> Result<VarBuilder> { on(VarBuilder::new(Arc::new(s.store(c)?))) };
                let label =
                    |e: Error, rel: &str| Error::Checkpoint(format!("{} ({rel}): {e}", s.path.display()));
                let cfg = |rel: &str| s.config_text(rel);
                let unet = UNet2DConditionModel::load(
                    &vb("unet")?,
                    &UNetConfig::from_json_str(cfg("unet/config.json")?)
                        .map_err(|e| label(e, "unet/config.json"))?,
                )?;
                let mut scheduler_config =
                    SchedulerConfig::from_json(cfg("scheduler/scheduler_config.json")?)
                        .map_err(|e| label(e, "scheduler/scheduler_config.json"))?;
                let fixed = scheduler_config.apply_pipeline_corrections();
                let notes = if fixed.is_empty() {
                    Vec::new()
                } else {
                    vec![format!(
                        "the scheduler config is outdated; corrected as diffusers' StableDiffusionPipeline does: {}",
                        fixed.join(", ")
                    )]
                };
                let sample_size = unet.config().sample_size.unwrap_or(64);
                (
                    src.tokenizer()?,
                    ClipTextModel::new(
                        &vb("text_encoder")?,
                        &ClipTextConfig::from_json(cfg("text_encoder/config.json")?)
                            .map_err(|e| label(e, "text_encoder/config.json"))?,
                    )?,
                    unet,
                    VaeDecoder::new(
                        &vb("vae")?,
                        &VaeConfig::from_json(cfg("vae/config.json")?)
                            .map_err(|e| label(e, "vae/config.json"))?,
                    )?,
                    scheduler_config,
                    sample_size,
                    notes,
                )
            }
        };
        // A dense-only GPU (below 8.0) says so once, with the load's other notes.
        let notes = match device {
            Device::Cuda(d) => d.arch_note().into_iter().chain(notes).collect(),
            Device::Cpu => notes,
        };
        let mut memory = WeightMemory::default();
        memory.add_component("text_encoder", &src.store("text_encoder")?, None)?;
        memory.add_component("unet", &src.store("unet")?, None)?;
        // Only the decoder half of the VAE is loaded.
        let decoder_only = |n: &str| n.starts_with("decoder.") || n.starts_with("post_quant_conv.");
        memory.add_component("vae", &src.store("vae")?, Some(&decoder_only))?;
        let gpu_bytes = match (device, free_before) {
            (Device::Cuda(d), Some(before)) => {
                d.synchronize()?;
                Some(before.saturating_sub(d.memory_info()?.0) as u64)
            }
            _ => None,
        };
        Ok(StableDiffusion {
            cuda_graphs: crate::backend::cuda::graph::enabled_by_env(),
            gpu_bytes,
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            sample_size,
            device: device.clone(),
            dtype,
            memory,
            load_time: start.elapsed(),
            notes,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    /// The activation dtype the models compute in (f32 on the CPU).
    pub fn activation_dtype(&self) -> DType {
        self.dtype
    }
    /// Names the activation dtype in a non-finite-value error when it is f16, whose range
    /// (65504) a checkpoint's activations can exceed; bf16 and f32 have f32's range.
    fn f16_note(&self) -> &'static str {
        if self.dtype == DType::F16 {
            " with f16 activations (if the checkpoint overflows f16, try --dtype bf16 or f32)"
        } else {
            ""
        }
    }

    /// A host tensor (latents) on the pipeline's device in its activation dtype: the f32 →
    /// f16 / bf16 boundary of a CUDA run.
    fn to_activations(&self, t: &Tensor) -> Result<Tensor> {
        ops::to_device(t, &self.device)?.to_dtype(self.dtype)
    }
    pub fn memory(&self) -> &WeightMemory {
        &self.memory
    }
    pub fn load_time(&self) -> Duration {
        self.load_time
    }
    /// What loading corrected, one line each, as diffusers corrects it (outdated scheduler
    /// config, old UNet `sample_size`), and on a GPU below 8.0 that it runs the dense path only
    /// (`cuda::ArchMode::DenseOnly`); empty for an up-to-date checkpoint on the CPU or a newer GPU.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }
    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }
    pub fn text_encoder(&self) -> &ClipTextModel {
        &self.text_encoder
    }
    /// The text encoder, e.g. to attach observers or swap in pruned weights.
    pub fn text_encoder_mut(&mut self) -> &mut ClipTextModel {
        &mut self.text_encoder
    }
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.unet
    }
    /// The UNet, e.g. to attach observers or swap in pruned weights.
    pub fn unet_mut(&mut self) -> &mut UNet2DConditionModel {
        &mut self.unet
    }
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }
    /// Replaces the scheduler config read from the checkpoint (e.g. to try other options).
    pub fn set_scheduler_config(&mut self, config: SchedulerConfig) {
        self.scheduler_config = config;
    }

    /// Frees the text encoder's weights: a one-shot run (the CLI) calls it once the prompt is
    /// encoded ([`Self::encode_prompt`]) and continues with [`Self::denoise_with_embeddings`],
    /// so that the UNet and VAE run without the text encoder in memory. Later prompts
    /// cannot be encoded (a clear error).
    pub fn release_text_encoder(&mut self) {
        self.text_encoder.release_weights();
    }

    /// Frees the UNet's weights (after [`Self::denoise_with_embeddings`], before
    /// [`Self::decode`]), so that the VAE decodes without the UNet in memory. Later runs
    /// cannot denoise (a clear error).
    pub fn release_unet(&mut self) {
        self.unet.release_weights();
    }

    /// Swaps in another text encoder (e.g. one pruned in memory by `sweep`) and returns the
    /// one it replaces. [`Self::memory`] still describes the weights loaded from the folder.
    pub fn replace_text_encoder(&mut self, text_encoder: ClipTextModel) -> ClipTextModel {
        std::mem::replace(&mut self.text_encoder, text_encoder)
    }

    /// Swaps in another UNet (see [`Self::replace_text_encoder`]) and returns the old one.
    pub fn replace_unet(&mut self, unet: UNet2DConditionModel) -> UNet2DConditionModel {
        std::mem::replace(&mut self.unet, unet)
    }

    /// Pixels per latent along each side (8 for SD2).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// The default image size `(width, height)`: UNet `sample_size` x the VAE scale factor.
    pub fn default_size(&self) -> (usize, usize) {
        let f = self.vae_scale_factor();
        let s = self.sample_size * f;
        (s, s)
    }

    /// The scheduler a request gets (its override, else the checkpoint's class).
    pub fn scheduler_kind(&self, req: &GenerateRequest) -> Result<SchedulerKind> {
        match req.scheduler {
            Some(k) => Ok(k),
            None => self.scheduler_config.kind(),
        }
    }

    /// The scheduler a request runs: the checkpoint's own class with the pipeline's load-time
    /// corrections, or the `--scheduler` override built from the config as diffusers'
    /// `from_config` builds it.
    pub fn scheduler_for(&self, req: &GenerateRequest) -> Result<Box<dyn scheduler::Scheduler>> {
        let kind = self.scheduler_kind(req)?;
        let config = match req.scheduler {
            None => self.scheduler_config.for_kind(kind),
            Some(_) => self.scheduler_config.clone(),
        };
        scheduler::build(kind, &config, req.steps)
    }

    /// Latent shape `[1, C, H/f, W/f]` for a request, after checking sizes.
    pub fn latent_shape(&self, req: &GenerateRequest) -> Result<[usize; 4]> {
        let f = self.vae_scale_factor();
        let c = self.unet.config().in_channels;
        if let Some(init) = &req.init_latents {
            let (b, ci, h, w) = init.dims4().map_err(|_| {
                Error::Invalid(format!(
                    "init latents must have shape [1, {c}, H/{f}, W/{f}], got {:?}",
                    init.shape()
                ))
            })?;
            if b != 1 || ci != c || h == 0 || w == 0 {
                return Err(Error::Invalid(format!(
                    "init latents must have shape [1, {c}, H/{f}, W/{f}], got {:?}",
                    init.shape()
                )));
            }
            for (flag, given, implied) in [("--width", req.width, w * f), ("--height", req.height, h * f)] {
                if let Some(g) = given {
                    if g != implied {
                        return Err(Error::Invalid(format!(
                            "{flag} {g} disagrees with the init latents, which imply {implied}"
                        )));
                    }
                }
            }
            return Ok([1, c, h, w]);
        }
        let (dw, dh) = self.default_size();
        let (w, h) = (req.width.unwrap_or(dw), req.height.unwrap_or(dh));
        for (flag, v) in [("width", w), ("height", h)] {
            if v == 0 || v % f != 0 {
                return Err(Error::Invalid(format!(
                    "{flag} {v} must be a positive multiple of {f} pixels (the VAE scale factor of this model)"
                )));
            }
        }
        self.check_memory(req, w, h)?;
        Ok([1, c, h / f, w / f])
    }

    /// The VAE tile in pixels for `req` (its `vae_tile_size` or the VAE config's default),
    /// checked against the scale factor.
    pub fn vae_tile_size(&self, req: &GenerateRequest) -> Result<usize> {
        let f = self.vae_scale_factor();
        let tile = req.vae_tile_size.unwrap_or_else(|| self.vae.config().default_tile_size());
        if tile == 0 || !tile.is_multiple_of(4 * f) {
            return Err(Error::Invalid(format!(
                "VAE tile size {tile} pixels must be a positive multiple of {} (4 latents of {f} pixels)",
                4 * f
            )));
        }
        Ok(tile)
    }

    /// Refuses an image size whose activations cannot fit in memory, before any work: the
    /// largest live buffers are the VAE decoder's full-resolution feature maps (about four
    /// of them with the widest full-resolution channel count, f32), one tile large with
    /// `vae_tiling`. On a GPU add the 3x3 convolution's im2col buffer (9 of those maps) and
    /// the VAE mid-block's attention scores (scores and probabilities, `(h/f · w/f)²` each,
    /// per tile), checked against free GPU memory.
    fn check_memory(&self, req: &GenerateRequest, w: usize, h: usize) -> Result<()> {
        let ch = &self.vae.config().block_out_channels;
        let widest = ch.iter().take(2).copied().max().unwrap_or(0);
        let (dw, dh) = if req.vae_tiling {
            let tile = self.vae_tile_size(req)?;
            (w.min(tile), h.min(tile))
        } else {
            (w, h)
        };
        let map = (dw as u128) * (dh as u128) * (widest as u128) * 4;
        let (need, available, what) = match &self.device {
            Device::Cpu => (map * 4, available_memory().unwrap_or(u64::MAX) as u128, "memory"),
            Device::Cuda(d) => {
                let f = self.vae_scale_factor() as u128;
                let tokens = (dw as u128 / f) * (dh as u128 / f);
                // Feature maps in the activation dtype; the attention scores and
                // probabilities are f32 whatever it is.
                let map = map / 4 * self.dtype.size_in_bytes() as u128;
                (map * 13 + tokens * tokens * 4 * 2, d.memory_info()?.0 as u128, "free GPU memory")
            }
        };
        if need > available {
            return Err(Error::Invalid(format!(
                "{w}x{h} pixels need about {:.1} GiB for the VAE decoder, more than the {:.1} GiB of {what} \
                 available; use a smaller --width / --height, or --vae-tiling",
                need as f64 / (1u64 << 30) as f64,
                available as f64 / (1u64 << 30) as f64
            )));
        }
        Ok(())
    }

    /// Text embeddings `[2, 77, C]` for `[negative, prompt]` (or `[1, 77, C]`, prompt only,
    /// when guidance is off) and whether the prompt was truncated.
    pub fn encode_prompt(&self, prompt: &str, negative: &str, guided: bool) -> Result<(Tensor, bool)> {
        profile::set_stage(Stage::TextEncoder);
        let cond = self.tokenizer.encode_with_info(prompt);
        let embeddings = if guided {
            let uncond = self.tokenizer.encode_with_info(negative);
            self.text_encoder.forward(&[uncond.ids, cond.ids.clone()])?
        } else {
            self.text_encoder.forward(std::slice::from_ref(&cond.ids))?
        };
        Ok((embeddings, cond.truncated))
    }

    /// Runs the whole pipeline. `progress(done, total)` is called after every UNet call.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        self.generate_inner(req, None, progress)
    }

    /// [`Self::denoise`] from prompt embeddings [`Self::encode_prompt`] made for `req`
    /// (`(embeddings, truncated)`; `[2, 77, C]` when `req` guides, else `[1, 77, C]`), so the
    /// text encoder can be released before the UNet runs. The text encoder's time stays zero.
    /// [`Self::decode`] finishes the run.
    pub fn denoise_with_embeddings(
        &self,
        req: &GenerateRequest,
        embeddings: (Tensor, bool),
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Denoised> {
        self.denoise_inner(req, Some(embeddings), progress)
    }

    fn generate_inner(
        &self,
        req: &GenerateRequest,
        embeddings: Option<(Tensor, bool)>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Generated> {
        let d = self.denoise_inner(req, embeddings, progress)?;
        self.decode(req, d)
    }

    /// The VAE decode of [`Self::denoise`]'s latents into the image (tiled when `req` asks),
    /// completing what [`Self::generate`] returns.
    pub fn decode(&self, req: &GenerateRequest, d: Denoised) -> Result<Generated> {
        let mut timings = d.timings;
        profile::set_stage(Stage::Vae);
        let tv = Instant::now();
        let latents = self.to_activations(&d.latents)?;
        let (decoded, vae_tiles) = if req.vae_tiling {
            let tile = self.vae_tile_size(req)?;
            let (img, grid) = self.vae.decode_tiled(&latents, tile)?;
            (img, grid.map(|(r, c)| (r, c, tile)))
        } else {
            (self.vae.decode(&latents)?, None)
        };
        drop(latents);
        // The image is finished in f32 (a no-op on the CPU).
        let decoded = decoded.to_dtype(DType::F32)?;
        check_finite(&decoded, || format!("the VAE decoder's output{}", self.f16_note()))?;
        let image = ops::affine(&decoded, 0.5, 0.5)?.to_vec()?;
        let image =
            Tensor::from_vec(image.into_iter().map(|v| v.clamp(0.0, 1.0)).collect(), decoded.shape())?;
        timings.vae = tv.elapsed();
        Ok(Generated {
            latents: d.latents,
            image,
            scheduler: d.scheduler,
            timesteps: d.timesteps,
            timings,
            prompt_truncated: d.prompt_truncated,
            vae_tiles,
        })
    }

    /// The pipeline up to the final latents (no VAE decode): text encoding and the
    /// denoising loop with classifier-free guidance. `progress(done, total)` is called after
    /// every UNet call. Calibration (`crate::calibrate`) runs this with observers attached.
    pub fn denoise(&self, req: &GenerateRequest, progress: &mut dyn FnMut(usize, usize)) -> Result<Denoised> {
        self.denoise_inner(req, None, progress)
    }

    /// Captures the UNet step in a CUDA graph and replays it (default: on, unless
    /// `SDSPARSE_CUDA_GRAPHS=0`); no effect on the CPU.
    pub fn set_cuda_graphs(&mut self, on: bool) {
        self.cuda_graphs = on;
    }

    /// One UNet call with classifier-free guidance on device tensors: `x` the scaled latents,
    /// `t_freq` their timestep features (`[2B, C]` when guided). Device work only, so a CUDA
    /// graph can capture it.
    fn unet_step(
        &self,
        x: &Tensor,
        t_freq: &Tensor,
        context: &Tensor,
        guided: bool,
        guidance: f32,
    ) -> Result<Tensor> {
        if guided {
            let out = self.unet.forward_frequencies(&ops::cat(&[x, x], 0)?, t_freq, context)?;
            ops::cfg_combine(&out.to_dtype(DType::F32)?, guidance)
        } else {
            self.unet.forward_frequencies(x, t_freq, context)?.to_dtype(DType::F32)
        }
    }

    fn denoise_inner(
        &self,
        req: &GenerateRequest,
        embeddings: Option<(Tensor, bool)>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Denoised> {
        if !req.guidance.is_finite() {
            return Err(Error::Invalid(format!("guidance must be a finite number, got {}", req.guidance)));
        }
        let shape = self.latent_shape(req)?;
        let mut sched = self.scheduler_for(req)?;
        // diffusers guides only when the scale is above 1.
        let guided = req.guidance > 1.0;
        let mut timings = Timings::default();

        let t0 = Instant::now();
        let (context, prompt_truncated) = match embeddings {
            Some((e, truncated)) => {
                let want = if guided { 2 } else { 1 };
                if e.rank() != 3 || e.shape()[0] != want {
                    return Err(Error::Shape(format!(
                        "prompt embeddings {:?}: expected [{want}, S, C] (guidance {})",
                        e.shape(),
                        req.guidance
                    )));
                }
                (e, truncated)
            }
            None => {
                let e = self.encode_prompt(&req.prompt, &req.negative_prompt, guided)?;
                timings.text_encoder = t0.elapsed();
                e
            }
        };
        check_finite(&context, || {
            format!("the text encoder's output (the prompt embeddings){}", self.f16_note())
        })?;

        let noise = match &req.init_latents {
            Some(t) => t.to_vec()?,
            None => GaussianNoise::new(req.seed).take(shape.iter().product()),
        };
        let sigma = sched.init_noise_sigma();
        let mut latents = Tensor::from_vec(noise.into_iter().map(|v| v * sigma).collect(), &shape)?;

        let timesteps = sched.timesteps().to_vec();
        profile::set_stage(Stage::Unet);
        // CUDA graphs of the UNet step (one per shape; off while profiling, which synchronises
        // around every op, and with SDSPARSE_CUDA_GRAPHS=0).
        let gpu = match &self.device {
            Device::Cuda(d) if self.cuda_graphs && !profile::active() => Some(d.clone()),
            _ => None,
        };
        let mut graphs: StepGraphs<StepKey, StepGraph> = StepGraphs::new(gpu.is_some());
        for (i, &t) in timesteps.iter().enumerate() {
            let ts = Instant::now();
            // Schedulers work on host copies (the latents are small); the UNet runs on the
            // pipeline's device.
            // On a GPU only the latents cross the bus (in, and the guided prediction out); the
            // text embeddings and every activation stay on the device.
            // With f16 / bf16 activations the UNet's input is cast on the device and its output
            // widened to f32 there, so the CFG combine and the scheduler run in f32.
            let x_host = sched.scale_model_input(&latents, i)?;
            let batch = if guided { 2 } else { 1 } * x_host.shape()[0];
            let key = StepKey {
                latents: x_host.shape().to_vec(),
                guidance: guided.then_some(req.guidance.to_bits()),
            };
            let guided_out = match (graphs.plan(&key), &gpu) {
                (StepPlan::Replay, Some(_)) => {
                    let g = graphs.graph(&key).ok_or_else(|| Error::Cuda("graph vanished".into()))?;
                    cuda_graph::write_values(&g.x, &x_host.to_vec()?)?;
                    cuda_graph::write_values(
                        &g.t_freq,
                        &self.unet.timestep_frequencies(&vec![t; batch])?.to_vec()?,
                    )?;
                    cuda_graph::launch(&g.graph)?;
                    ops::to_device(&g.out, &Device::Cpu)?
                }
                (StepPlan::Capture, Some(dev)) => {
                    let x = self.to_activations(&x_host)?;
                    let t_freq =
                        ops::to_device(&self.unet.timestep_frequencies(&vec![t; batch])?, &self.device)?;
                    let mut out_shape = x_host.shape().to_vec();
                    out_shape[1] = self.unet.config().out_channels;
                    let out = ops::to_device(&Tensor::zeros(&out_shape), &self.device)?;
                    let captured = cuda_graph::capture(dev, || {
                        let y = self.unet_step(&x, &t_freq, &context, guided, req.guidance)?;
                        cuda_graph::copy_f32(&y, &out)
                    });
                    match captured {
                        Ok(graph) => {
                            cuda_graph::launch(&graph)?;
                            let host = ops::to_device(&out, &Device::Cpu)?;
                            graphs.captured(&key, StepGraph { graph, x, t_freq, out });
                            host
                        }
                        Err(e) => {
                            eprintln!("note: {}", graphs.capture_failed(&key, &e.to_string()));
                            let y = self.unet_step(&x, &t_freq, &context, guided, req.guidance)?;
                            ops::to_device(&y, &Device::Cpu)?
                        }
                    }
                }
                _ => {
                    let x = self.to_activations(&x_host)?;
                    let t_freq =
                        ops::to_device(&self.unet.timestep_frequencies(&vec![t; batch])?, &self.device)?;
                    ops::to_device(
                        &self.unet_step(&x, &t_freq, &context, guided, req.guidance)?,
                        &Device::Cpu,
                    )?
                }
            };
            // One pass over the (small) UNet output and latents per step: a NaN / inf stops the
            // run here, naming the step, instead of ending as a black image.
            let n = timesteps.len();
            check_finite(&guided_out, || {
                format!("the UNet's output at step {}/{n} (timestep {t}){}", i + 1, self.f16_note())
            })?;
            latents = sched.step(&guided_out, i, &latents)?;
            check_finite(&latents, || {
                format!("the latents after {} step {}/{n} (timestep {t})", sched.name(), i + 1)
            })?;
            timings.unet_steps.push(ts.elapsed());
            progress(i + 1, timesteps.len());
        }
        timings.cuda_graphs = graphs.len();
        Ok(Denoised { latents, scheduler: sched.name(), timesteps, timings, prompt_truncated })
    }
}

/// A UNet step's shape: the scaled latents' shape and, with guidance, the scale (baked into
/// the captured CFG combine).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StepKey {
    latents: Vec<usize>,
    guidance: Option<u32>,
}

/// A captured UNet step and the fixed buffers it reads (latents, timestep features) and
/// writes (the guided prediction).
struct StepGraph {
    graph: cudarc::driver::CudaGraph,
    x: Tensor,
    t_freq: Tensor,
    out: Tensor,
}

/// The result of [`StableDiffusion::denoise`]: what [`Generated`] holds minus the image.
#[derive(Debug, Clone)]
pub struct Denoised {
    /// Final latents `[1, C, H/f, W/f]`.
    pub latents: Tensor,
    pub scheduler: &'static str,
    pub timesteps: Vec<f32>,
    /// Text encoder and UNet times (`vae` stays zero).
    pub timings: Timings,
    pub prompt_truncated: bool,
}

/// Errors when `t` holds NaN or an infinite value; `what` says where it was produced.
fn check_finite(t: &Tensor, what: impl FnOnce() -> String) -> Result<()> {
    let v = t.to_vec()?;
    let bad = v.iter().filter(|x| !x.is_finite()).count();
    if bad > 0 {
        return Err(Error::Msg(format!(
            "{} holds {bad} NaN/infinite value(s) of {}; stopped, no image written (the checkpoint's \
             weights or the chosen settings overflow)",
            what(),
            v.len()
        )));
    }
    Ok(())
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux), `None` where unknown.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The UNet calls a request will make (PNDM makes more calls than steps).
pub fn unet_calls(config: &SchedulerConfig, kind: SchedulerKind, steps: usize) -> Result<usize> {
    Ok(scheduler::build(kind, config, steps)?.timesteps().len())
}

/// Seeded standard-normal noise: xoshiro256** seeded through SplitMix64, Box-Muller
/// transform (two normals per pair of uniforms). Deterministic across platforms; not
/// torch's generator, so seeds do not reproduce diffusers' images (use `--init-latents`).
pub struct GaussianNoise {
    s: [u64; 4],
    spare: Option<f32>,
}

impl GaussianNoise {
    pub fn new(seed: u64) -> Self {
        let mut z = seed;
        let mut split_mix = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        GaussianNoise { s: [split_mix(), split_mix(), split_mix(), split_mix()], spare: None }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in (0, 1]: never 0, so the logarithm below is finite.
    fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    }

    pub fn next_normal(&mut self) -> f32 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((r * theta.sin()) as f32);
        (r * theta.cos()) as f32
    }

    pub fn take(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next_normal()).collect()
    }
}

/// 8-bit RGB pixels of an image `[1, 3, H, W]` in `[0, 1]`: `round(x * 255)` (half to even,
/// as numpy), interleaved HWC.
pub fn image_to_rgb8(image: &Tensor) -> Result<(usize, usize, Vec<u8>)> {
    let (b, c, h, w) = image.dims4()?;
    if b != 1 || c != 3 {
        return Err(Error::Shape(format!("expected an image [1, 3, H, W], got {:?}", image.shape())));
    }
    let x = image.to_vec()?;
    let plane = h * w;
    let mut out = vec![0u8; 3 * plane];
    for p in 0..plane {
        for ch in 0..3 {
            let v = (x[ch * plane + p] * 255.0).round_ties_even();
            out[3 * p + ch] = v.clamp(0.0, 255.0) as u8;
        }
    }
    Ok((w, h, out))
}

/// An image `[1, 3, H, W]` in `[0, 1]` encoded as an 8-bit PNG file's bytes.
pub fn encode_png(image: &Tensor) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let (w, h, rgb) = image_to_rgb8(image)?;
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&rgb, w as u32, h as u32, image::ExtendedColorType::Rgb8)
        .map_err(|e| Error::Msg(format!("cannot encode the PNG: {e}")))?;
    Ok(out)
}

/// Writes an image `[1, 3, H, W]` in `[0, 1]` as an 8-bit PNG (temporary file, renamed when
/// complete: a failure leaves no partial file).
pub fn save_png(image: &Tensor, path: &Path) -> Result<()> {
    crate::output::write_file(path, &encode_png(image)?)
}

/// Reads tensor `latents` from a safetensors file (f64, f32, f16 or bf16).
pub fn load_latents(path: &Path) -> Result<Tensor> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: not a safetensors file: {e}", path.display())))?;
    // `latents` as documented; also the reference fixtures' `init_latents`, or the only tensor.
    let names = st.names();
    let name = ["latents", "init_latents"]
        .into_iter()
        .find(|n| names.iter().any(|m| m == n))
        .or(if names.len() == 1 { Some(names[0]) } else { None })
        .ok_or_else(|| Error::Invalid(format!("{}: no tensor named \"latents\"", path.display())))?;
    let t = st.tensor(name).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    let data: Vec<f32> = match t.dtype() {
        safetensors::Dtype::F32 => {
            t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        }
        safetensors::Dtype::F16 => {
            t.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        safetensors::Dtype::BF16 => {
            t.data().chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        safetensors::Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32)
            .collect(),
        other => {
            return Err(Error::Invalid(format!(
                "{}: tensor \"latents\" has dtype {other:?}; expected f64, f32, f16 or bf16",
                path.display()
            )))
        }
    };
    if data.iter().any(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "{}: tensor \"latents\" holds NaN or infinite values",
            path.display()
        )));
    }
    Tensor::from_vec(data, t.shape())
}

/// `latents` as tensor `latents` (f32) of a safetensors file's bytes.
pub fn encode_latents(latents: &Tensor) -> Result<Vec<u8>> {
    let data = latents.to_vec()?;
    let bytes: &[u8] = bytemuck::cast_slice(&data);
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, latents.shape().to_vec(), bytes)
        .map_err(|e| Error::Msg(format!("cannot serialise latents: {e}")))?;
    safetensors::serialize([("latents", view)], None)
        .map_err(|e| Error::Msg(format!("cannot serialise latents: {e}")))
}

/// Writes `latents` as tensor `latents` (f32) of a safetensors file (temporary file, renamed
/// when complete).
pub fn save_latents(latents: &Tensor, path: &Path) -> Result<()> {
    crate::output::write_file(path, &encode_latents(latents)?)
}

/// A short human-readable report of a generation: time per stage and weight memory.
pub fn report(sd: &StableDiffusion, g: &Generated) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let t = &g.timings;
    let n = t.unet_steps.len().max(1);
    let unet_total: Duration = t.unet_steps.iter().sum();
    let mut s = String::new();
    s += &format!(
        "device {} ({} activations), scheduler {}, {} UNet calls\n",
        sd.device().name(),
        sd.activation_dtype().name(),
        g.scheduler,
        t.unet_steps.len()
    );
    s += &format!("  load          {:>10.1} ms\n", ms(sd.load_time()));
    s += &format!("  text encoder  {:>10.1} ms\n", ms(t.text_encoder));
    s += &format!(
        "  UNet          {:>10.1} ms total, {:.1} ms per step (min {:.1}, max {:.1})\n",
        ms(unet_total),
        ms(unet_total) / n as f64,
        t.unet_steps.iter().map(|&d| ms(d)).fold(f64::INFINITY, f64::min).min(ms(unet_total)),
        t.unet_steps.iter().map(|&d| ms(d)).fold(0.0, f64::max),
    );
    let tiling = match g.vae_tiles {
        Some((r, c, px)) => format!(" (tiled: {r}x{c} tiles of {px} px)"),
        None => String::new(),
    };
    s += &format!("  VAE decode    {:>10.1} ms{tiling}\n", ms(t.vae));
    if let Device::Cuda(_) = sd.device() {
        s += &match t.cuda_graphs {
            0 => "  UNet steps ran eagerly (no CUDA graph)\n".to_string(),
            n => {
                format!("  UNet steps replayed from {n} CUDA graph(s) after one eager step and one capture\n")
            }
        };
    }
    s += "weight memory (dense weights as stored, biases and norms as f32, sparse as stored):\n";
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    for ((component, format), (tensors, params, bytes)) in &sd.memory().entries {
        s += &format!(
            "  {component:<13} {format:<13} {tensors:>5} tensors {params:>13} params {:>10.2} MiB\n",
            mib(*bytes)
        );
    }
    let by_format: Vec<String> =
        sd.memory().by_format().iter().map(|(f, b)| format!("{f} {:.2} MiB", mib(*b))).collect();
    s += &format!("  total {:.2} MiB ({})\n", mib(sd.memory().total_bytes()), by_format.join(", "));
    if let Some(b) = sd.gpu_bytes {
        let sparse = match sd.device() {
            Device::Cuda(d) if !d.arch_mode().sparse_kernels() => "sparse expanded to dense: dense-only GPU",
            _ => "sparse packed for the kernels or expanded",
        };
        s += &format!(
            "  on the GPU: {:.2} MiB taken at load (dense in {}, {sparse})\n",
            mib(b),
            sd.activation_dtype().name()
        );
    }
    // Which libraries the convolutions and dense Linears actually ran on (cuDNN / cuBLASLt, or
    // the cuBLAS fallbacks and why), counted since the process started.
    if let Device::Cuda(dev) = sd.device() {
        s += &format!("{}\n", crate::backend::cuda::libs::usage(dev).summary());
    }
    s
}
