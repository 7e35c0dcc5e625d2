//! UNet2DConditionModel, SD2 family.
//!
//! The denoiser: latents `[B, 4, h, w]`, a timestep and the text embeddings
//! `[B, 77, cross_attention_dim]` in, the predicted noise (or v) out. Every size comes from
//! the component's `config.json` ([`UNetConfig`]), so the real SD2.1 / SD2.1-base models and
//! the tiny test fixture run through the same code. Weights are read by their diffusers
//! names; Linear weights may be dense, 2:4 or unstructured-sparse.

use super::attention::Linear;
use super::config::UNetConfig;
use super::unet_blocks::{BlockSettings, Conv2d, DownBlock, GroupNorm, LevelSpec, MidBlock, UpBlock};
use crate::backend::{ops, Tensor};
use crate::checkpoint::VarBuilder;
use crate::error::{Error, Result};
use std::path::Path;

#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    config: UNetConfig,
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down_blocks: Vec<DownBlock>,
    /// `None` once [`UNet2DConditionModel::release_weights`] was called.
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl UNet2DConditionModel {
    /// Builds the model from `vb` (rooted at the UNet's tensors) and its config.
    pub fn load(vb: &VarBuilder, config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let ch = &config.block_out_channels;
        let levels = ch.len();
        let heads = config.heads_per_block()?;
        let transformer_layers = config.transformer_layers()?;
        let temb_channels = config.time_embed_dim();
        let settings = BlockSettings {
            temb_channels,
            norm_groups: config.norm_num_groups,
            norm_eps: config.norm_eps,
            cross_attention_dim: config.cross_attention_dim,
            use_linear_projection: config.use_linear_projection,
            output_scale: config.resnet_out_scale_factor,
        };

        let pad_in = (config.conv_in_kernel - 1) / 2;
        let conv_in =
            Conv2d::load(&vb.pp("conv_in"), config.in_channels, ch[0], config.conv_in_kernel, 1, pad_in)?;
        let time_linear_1 =
            Linear::load(&vb.pp("time_embedding").pp("linear_1"), ch[0], temb_channels, true)?;
        let time_linear_2 =
            Linear::load(&vb.pp("time_embedding").pp("linear_2"), temb_channels, temb_channels, true)?;

        let mut down_blocks = Vec::with_capacity(levels);
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let level = LevelSpec {
                cross_attention: kind == "CrossAttnDownBlock2D",
                layers: config.layers_per_block,
                heads: heads[i],
                transformer_layers: transformer_layers[i],
            };
            let in_ch = if i == 0 { ch[0] } else { ch[i - 1] };
            let add_downsample = i + 1 < levels;
            down_blocks.push(DownBlock::load(
                &vb.pp("down_blocks").pp(i),
                in_ch,
                ch[i],
                &level,
                add_downsample,
                &settings,
            )?);
        }

        let inner = ch[levels - 1];
        let mid_level = LevelSpec {
            cross_attention: true,
            layers: 1,
            heads: heads[levels - 1],
            transformer_layers: transformer_layers[levels - 1],
        };
        let mid_settings = BlockSettings { output_scale: config.mid_block_scale_factor, ..settings };
        let mid_block = MidBlock::load(&vb.pp("mid_block"), inner, &mid_level, &mid_settings)?;

        // The up path mirrors the down path: up block `i` works at level `levels-1-i`.
        let mut up_blocks = Vec::with_capacity(levels);
        let mut prev_out = inner;
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let level_idx = levels - 1 - i;
            let out_ch = ch[level_idx];
            let skip_in_ch = ch[level_idx.saturating_sub(1)];
            let level = LevelSpec {
                cross_attention: kind == "CrossAttnUpBlock2D",
                layers: config.layers_per_block + 1,
                heads: heads[level_idx],
                transformer_layers: transformer_layers[level_idx],
            };
            let add_upsample = i + 1 < levels;
            up_blocks.push(UpBlock::load(
                &vb.pp("up_blocks").pp(i),
                prev_out,
                out_ch,
                skip_in_ch,
                &level,
                add_upsample,
                &settings,
            )?);
            prev_out = out_ch;
        }

        let conv_norm_out =
            GroupNorm::load(&vb.pp("conv_norm_out"), ch[0], config.norm_num_groups, config.norm_eps)?;
        let pad_out = (config.conv_out_kernel - 1) / 2;
        let conv_out =
            Conv2d::load(&vb.pp("conv_out"), ch[0], config.out_channels, config.conv_out_kernel, 1, pad_out)?;

        Ok(UNet2DConditionModel {
            config: config.clone(),
            conv_in,
            time_linear_1,
            time_linear_2,
            down_blocks,
            mid_block: Some(mid_block),
            up_blocks,
            conv_norm_out,
            conv_out,
        })
    }

    /// Loads a diffusers `unet/` folder: `config.json` plus its safetensors weights.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_on(dir, &crate::backend::Device::Cpu)
    }

    /// [`Self::from_dir`] with the weights placed on `device`.
    pub fn from_dir_on(dir: &Path, device: &crate::backend::Device) -> Result<Self> {
        let config = UNetConfig::from_file(dir)?;
        Self::load(&VarBuilder::from_dir(dir)?.on_device(device), &config)
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Every Linear layer of the model (216 in SD2.1), e.g. to swap dense weights for
    /// pruned, compressed ones in memory (benchmarks, experiments).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = vec![&mut self.time_linear_1, &mut self.time_linear_2];
        for b in &mut self.down_blocks {
            v.extend(b.linears_mut());
        }
        if let Some(m) = &mut self.mid_block {
            v.extend(m.linears_mut());
        }
        for b in &mut self.up_blocks {
            v.extend(b.linears_mut());
        }
        v
    }

    /// Frees the down, mid and up blocks (nearly all the weights; a one-shot run that has
    /// finished denoising needs them no more). Afterwards `forward` is an error.
    pub fn release_weights(&mut self) {
        self.down_blocks = Vec::new();
        self.mid_block = None;
        self.up_blocks = Vec::new();
    }

    /// One denoiser call with the same timestep for the whole batch.
    pub fn forward(&self, latents: &Tensor, timestep: f32, context: &Tensor) -> Result<Tensor> {
        let batch = latents.shape().first().copied().unwrap_or(0);
        self.forward_timesteps(latents, &vec![timestep; batch], context)
    }

    /// One denoiser call with a timestep per batch element:
    /// `latents[B, in_channels, h, w]`, `context[B, S, cross_attention_dim]` →
    /// `[B, out_channels, h, w]`.
    pub fn forward_timesteps(&self, latents: &Tensor, timesteps: &[f32], context: &Tensor) -> Result<Tensor> {
        if self.mid_block.is_none() {
            return Err(released());
        }
        self.check_inputs(latents, timesteps, context)?;
        // Computed on the host (a few hundred values), then moved to the latents' device.
        let t_freq = ops::to_device(&self.timestep_frequencies(timesteps)?, &latents.device())?;
        self.forward_frequencies(latents, &t_freq, context)
    }

    /// The sinusoidal timestep features `[B, block_out_channels[0]]` (host tensor) that
    /// [`Self::forward_frequencies`] takes.
    pub fn timestep_frequencies(&self, timesteps: &[f32]) -> Result<Tensor> {
        let cfg = &self.config;
        ops::timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    }

    /// [`Self::forward_timesteps`] from the timestep features already on the latents' device:
    /// everything after is device work only (no host copy), which is what a CUDA graph of the
    /// step captures (the pipeline updates the features' buffer before each replay).
    pub fn forward_frequencies(&self, latents: &Tensor, t_freq: &Tensor, context: &Tensor) -> Result<Tensor> {
        if self.mid_block.is_none() {
            return Err(released());
        }
        let rows = t_freq.shape().first().copied().unwrap_or(0);
        self.check_inputs(latents, &vec![0.0; rows], context)?;
        let temb = self.time_linear_2.forward(&ops::silu(&self.time_linear_1.forward(t_freq)?)?)?;
        let temb_act = ops::silu(&temb)?;

        let mut h = self.conv_in.forward(latents)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            h = block.forward(&h, &temb_act, context, &mut skips)?;
        }
        let mid = self.mid_block.as_ref().ok_or_else(released)?;
        h = mid.forward(&h, &temb_act, context)?;
        for block in &self.up_blocks {
            h = block.forward(&h, &mut skips, &temb_act, context)?;
        }
        debug_assert!(skips.is_empty());

        let h = self.conv_norm_out.forward(&h, true)?;
        self.conv_out.forward(&h)
    }

    fn check_inputs(&self, latents: &Tensor, timesteps: &[f32], context: &Tensor) -> Result<()> {
        let cfg = &self.config;
        let (b, c, h, w) = latents.dims4()?;
        if c != cfg.in_channels {
            return Err(Error::Shape(format!(
                "unet: latents have {c} channels, the model takes {}",
                cfg.in_channels
            )));
        }
        // Any positive size works: the upsamplers resize to their skip connection's size
        // (diffusers' `forward_upsample_size`).
        if h == 0 || w == 0 {
            return Err(Error::Invalid(format!("unet: latent size {h}x{w} must be positive")));
        }
        if timesteps.len() != b {
            return Err(Error::Shape(format!("unet: {} timesteps for a batch of {b}", timesteps.len())));
        }
        let (cb, _, cd) = context.dims3()?;
        if cb != b || cd != cfg.cross_attention_dim {
            return Err(Error::Shape(format!(
                "unet: text embeddings {:?} do not fit latents {:?} (expected [{b}, S, {}])",
                context.shape(),
                latents.shape(),
                cfg.cross_attention_dim
            )));
        }
        Ok(())
    }
}

fn released() -> Error {
    Error::Invalid("unet: its weights were released after denoising".into())
}
