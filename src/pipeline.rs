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

use crate::backend::{ops, Device, Tensor};
use crate::checkpoint::ComponentStore;
use crate::error::{Error, Result};
use crate::model::clip_text::ClipTextModel;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::VaeDecoder;
use crate::scheduler::{self, SchedulerConfig, SchedulerKind};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f32,
    /// `None`: the checkpoint's own scheduler (`scheduler_config.json`'s `_class_name`).
    pub scheduler: Option<SchedulerKind>,
    pub seed: u64,
    /// Image size in pixels; `None`: the UNet's `sample_size` x the VAE scale factor (or the
    /// size `init_latents` implies).
    pub width: Option<usize>,
    pub height: Option<usize>,
    /// Unit-variance initial noise `[1, C, H/f, W/f]`; `None`: seeded noise.
    pub init_latents: Option<Tensor>,
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
        }
    }
}

/// Wall-clock time of each stage of one generation.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub text_encoder: Duration,
    pub unet_steps: Vec<Duration>,
    pub vae: Duration,
}

/// The result of one generation.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Final latents before decoding, `[1, C, H/f, W/f]`.
    pub latents: Tensor,
    /// The image `[1, 3, H, W]` in `[0, 1]`.
    pub image: Tensor,
    pub scheduler: &'static str,
    /// Timesteps the UNet was called at.
    pub timesteps: Vec<f32>,
    pub timings: Timings,
    /// Set when the prompt was longer than the text encoder's 77 tokens and was cut.
    pub prompt_truncated: bool,
}

/// Bytes and tensor counts of the loaded weights, by storage format.
#[derive(Debug, Clone, Default)]
pub struct WeightMemory {
    /// `(component, format) → (tensors, parameters, bytes in memory)`; format is `dense`,
    /// `2:4` or `unstructured`.
    pub entries: BTreeMap<(String, String), (usize, usize, u64)>,
}

impl WeightMemory {
    /// Adds the weights of one component folder: dense tensors count 4 bytes per element
    /// (they are widened to f32 at load), compressed ones their stored values + metadata.
    fn add_component(
        &mut self,
        component: &str,
        dir: &Path,
        only: Option<&dyn Fn(&str) -> bool>,
    ) -> Result<()> {
        let store = ComponentStore::open(dir)?;
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
                    if raw.float_dtype().is_none() {
                        continue; // integer buffers (e.g. position_ids) are not weights
                    }
                    let n: usize = raw.shape.iter().product();
                    ("dense".to_string(), n, 4 * n as u64)
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

/// A loaded SD2-family pipeline.
pub struct StableDiffusion {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    unet: UNet2DConditionModel,
    vae: VaeDecoder,
    scheduler_config: SchedulerConfig,
    device: Device,
    memory: WeightMemory,
    load_time: Duration,
}

impl StableDiffusion {
    /// Loads a diffusers folder (dense, or converted by `sdsparse convert`): `tokenizer/`,
    /// `text_encoder/`, `unet/`, `vae/` and `scheduler/scheduler_config.json`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Checkpoint(format!("{}: model folder not found", dir.display())));
        }
        if !device.is_cpu() {
            // The models keep their weights in host memory; the CUDA path moves them when
            // the CUDA backend provides model upload.
            return Err(Error::Cuda(format!(
                "running the pipeline on {} is not supported by this build; use --device cpu",
                device.name()
            )));
        }
        let start = Instant::now();
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let text_encoder = ClipTextModel::from_dir(&dir.join("text_encoder"))?;
        let unet = UNet2DConditionModel::from_dir(&dir.join("unet"))?;
        let vae = VaeDecoder::from_dir(&dir.join("vae"))?;
        let scheduler_config =
            SchedulerConfig::from_file(&dir.join("scheduler").join("scheduler_config.json"))?;
        let mut memory = WeightMemory::default();
        memory.add_component("text_encoder", &dir.join("text_encoder"), None)?;
        memory.add_component("unet", &dir.join("unet"), None)?;
        // Only the decoder half of the VAE is loaded.
        let decoder_only = |n: &str| n.starts_with("decoder.") || n.starts_with("post_quant_conv.");
        memory.add_component("vae", &dir.join("vae"), Some(&decoder_only))?;
        Ok(StableDiffusion {
            tokenizer,
            text_encoder,
            unet,
            vae,
            scheduler_config,
            device: device.clone(),
            memory,
            load_time: start.elapsed(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
    pub fn memory(&self) -> &WeightMemory {
        &self.memory
    }
    pub fn load_time(&self) -> Duration {
        self.load_time
    }
    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }
    /// Replaces the scheduler config read from the checkpoint (e.g. to try other options).
    pub fn set_scheduler_config(&mut self, config: SchedulerConfig) {
        self.scheduler_config = config;
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
        let s = self.unet.config().sample_size.unwrap_or(64) * f;
        (s, s)
    }

    /// The scheduler a request gets (its override, else the checkpoint's class).
    pub fn scheduler_kind(&self, req: &GenerateRequest) -> Result<SchedulerKind> {
        match req.scheduler {
            Some(k) => Ok(k),
            None => self.scheduler_config.kind(),
        }
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
                    "{flag} {v} must be a positive multiple of {f} (the VAE scale factor of this model)"
                )));
            }
        }
        Ok([1, c, h / f, w / f])
    }

    /// Text embeddings `[2, 77, C]` for `[negative, prompt]` (or `[1, 77, C]`, prompt only,
    /// when guidance is off) and whether the prompt was truncated.
    pub fn encode_prompt(&self, prompt: &str, negative: &str, guided: bool) -> Result<(Tensor, bool)> {
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
        if !req.guidance.is_finite() {
            return Err(Error::Invalid(format!("guidance must be a finite number, got {}", req.guidance)));
        }
        let shape = self.latent_shape(req)?;
        let kind = self.scheduler_kind(req)?;
        let mut sched = scheduler::build(kind, &self.scheduler_config, req.steps)?;
        // diffusers guides only when the scale is above 1.
        let guided = req.guidance > 1.0;
        let mut timings = Timings::default();

        let t0 = Instant::now();
        let (context, prompt_truncated) = self.encode_prompt(&req.prompt, &req.negative_prompt, guided)?;
        timings.text_encoder = t0.elapsed();

        let noise = match &req.init_latents {
            Some(t) => t.to_vec()?,
            None => GaussianNoise::new(req.seed).take(shape.iter().product()),
        };
        let sigma = sched.init_noise_sigma();
        let mut latents = Tensor::from_vec(noise.into_iter().map(|v| v * sigma).collect(), &shape)?;

        let timesteps = sched.timesteps().to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let ts = Instant::now();
            // Schedulers work on host copies (the latents are small); the UNet runs on the
            // pipeline's device.
            let x_in = ops::to_device(&sched.scale_model_input(&latents, i)?, &self.device)?;
            let guided_out = if guided {
                let out = self.unet.forward(&ops::cat(&[&x_in, &x_in], 0)?, t, &context)?;
                let all = out.to_vec()?;
                let (u, c) = all.split_at(all.len() / 2);
                let g = req.guidance;
                let v: Vec<f32> = u.iter().zip(c).map(|(&u, &c)| u + g * (c - u)).collect();
                Tensor::from_vec(v, &shape)?
            } else {
                self.unet.forward(&x_in, t, &context)?
            };
            latents = sched.step(&guided_out, i, &latents)?;
            timings.unet_steps.push(ts.elapsed());
            progress(i + 1, timesteps.len());
        }

        let tv = Instant::now();
        let decoded = self.vae.decode(&ops::to_device(&latents, &self.device)?)?;
        let image = ops::affine(&decoded, 0.5, 0.5)?.to_vec()?;
        let image =
            Tensor::from_vec(image.into_iter().map(|v| v.clamp(0.0, 1.0)).collect(), decoded.shape())?;
        timings.vae = tv.elapsed();

        Ok(Generated { latents, image, scheduler: sched.name(), timesteps, timings, prompt_truncated })
    }
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

/// Writes an image `[1, 3, H, W]` in `[0, 1]` as an 8-bit PNG.
pub fn save_png(image: &Tensor, path: &Path) -> Result<()> {
    let (w, h, rgb) = image_to_rgb8(image)?;
    image::save_buffer_with_format(
        path,
        &rgb,
        w as u32,
        h as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Msg(format!("{}: cannot write PNG: {e}", path.display())))
}

/// Reads tensor `latents` from a safetensors file (f32, f16 or bf16).
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
        other => {
            return Err(Error::Invalid(format!(
                "{}: tensor \"latents\" has dtype {other:?}; expected f32, f16 or bf16",
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

/// Writes `latents` as tensor `latents` (f32) of a safetensors file.
pub fn save_latents(latents: &Tensor, path: &Path) -> Result<()> {
    let data = latents.to_vec()?;
    let bytes: &[u8] = bytemuck::cast_slice(&data);
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, latents.shape().to_vec(), bytes)
        .map_err(|e| Error::Msg(format!("cannot serialise latents: {e}")))?;
    let out = safetensors::serialize([("latents", view)], None)
        .map_err(|e| Error::Msg(format!("cannot serialise latents: {e}")))?;
    std::fs::write(path, out).map_err(|e| Error::io(path, e))
}

/// A short human-readable report of a generation: time per stage and weight memory.
pub fn report(sd: &StableDiffusion, g: &Generated) -> String {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let t = &g.timings;
    let n = t.unet_steps.len().max(1);
    let unet_total: Duration = t.unet_steps.iter().sum();
    let mut s = String::new();
    s += &format!(
        "device {}, scheduler {}, {} UNet calls\n",
        sd.device().name(),
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
    s += &format!("  VAE decode    {:>10.1} ms\n", ms(t.vae));
    s += "weight memory (dense as f32, sparse as stored):\n";
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
    s
}
