//! AutoencoderKL decoder (latents → image), as diffusers' `AutoencoderKL.decode`.
//!
//! `decode(latents) = decoder(post_quant_conv(latents / scaling_factor))`: conv_in, a mid
//! block (resnet, single-head self-attention over all pixels, resnet), up blocks of resnets
//! with a nearest-2x upsample + conv after every level but the last, then group norm, SiLU,
//! conv_out. The VAE is never pruned, so every weight here is dense.

use crate::backend::{ops, Tensor};
use crate::checkpoint::VarBuilder;
use crate::error::{Error, Result};
use crate::format::Weight;
use serde::Deserialize;
use std::path::Path;

/// Group-norm epsilon of every norm in diffusers' VAE decoder.
const VAE_NORM_EPS: f32 = 1e-6;

/// `vae/config.json` (the fields the decoder needs).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_out_channels")]
    pub out_channels: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f32,
    #[serde(default)]
    pub shift_factor: Option<f32>,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub sample_size: Option<usize>,
    #[serde(default)]
    pub act_fn: Option<String>,
}

fn default_layers_per_block() -> usize {
    1
}
fn default_latent_channels() -> usize {
    4
}
fn default_out_channels() -> usize {
    3
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_scaling_factor() -> f32 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl VaeConfig {
    /// The SD2.1 (and SD2.1-base) VAE.
    pub fn v2_1() -> Self {
        VaeConfig {
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            out_channels: 3,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            sample_size: Some(768),
            act_fn: Some("silu".into()),
        }
    }

    /// Reads `vae/config.json` and checks it describes a decoder we can run.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))
    }

    /// Parses a `vae/config.json` text and checks it describes a decoder we can run.
    pub fn from_json(text: &str) -> Result<Self> {
        let c: VaeConfig =
            serde_json::from_str(text).map_err(|e| Error::Checkpoint(format!("bad VAE config: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> Result<()> {
        if self.block_out_channels.is_empty() {
            return Err(Error::Checkpoint("VAE config: block_out_channels is empty".into()));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| t.as_str() != "UpDecoderBlock2D") {
            return Err(Error::Checkpoint(format!("VAE config: up block type {t:?} is not supported")));
        }
        if let Some(a) = self.act_fn.as_deref() {
            if a != "silu" {
                return Err(Error::Checkpoint(format!("VAE config: act_fn {a:?} is not supported")));
            }
        }
        if let Some(&c) = self
            .block_out_channels
            .iter()
            .find(|&&c| self.norm_num_groups == 0 || c % self.norm_num_groups != 0)
        {
            return Err(Error::Checkpoint(format!(
                "VAE config: {c} channels do not split into {} groups",
                self.norm_num_groups
            )));
        }
        Ok(())
    }

    /// Pixels per latent along each side: 2^(levels - 1) (8 for SD2).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// diffusers' default tile for tiled decoding, `tile_sample_min_size`: the config's
    /// `sample_size` (512 for SD2.1-base, 768 for SD2.1); 512 when the config has none.
    pub fn default_tile_size(&self) -> usize {
        self.sample_size.unwrap_or(512)
    }
}

/// Group norm with its affine parameters.
struct GroupNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
}

impl GroupNorm {
    fn new(vb: &VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(GroupNorm { gamma: vb.get("weight", &[channels])?, beta: vb.get("bias", &[channels])?, groups })
    }
    fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        ops::group_norm(x, self.groups, &self.gamma, &self.beta, VAE_NORM_EPS, silu)
    }
}

struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    padding: usize,
}

impl Conv2d {
    fn new(vb: &VarBuilder, cin: usize, cout: usize, kernel: usize) -> Result<Self> {
        Ok(Conv2d {
            weight: vb.get_stored("weight", &[cout, cin, kernel, kernel])?, // widened per call on the CPU
            bias: vb.get_act("bias", &[cout])?,
            padding: kernel / 2,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(x, &self.weight, Some(&self.bias), 1, self.padding)
    }
    fn params(&self) -> usize {
        self.weight.numel() + self.bias.numel()
    }
}

/// diffusers' `ResnetBlock2D` without a time embedding.
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: &VarBuilder, cin: usize, cout: usize, groups: usize) -> Result<Self> {
        Ok(ResnetBlock {
            norm1: GroupNorm::new(&vb.pp("norm1"), cin, groups)?,
            conv1: Conv2d::new(&vb.pp("conv1"), cin, cout, 3)?,
            norm2: GroupNorm::new(&vb.pp("norm2"), cout, groups)?,
            conv2: Conv2d::new(&vb.pp("conv2"), cout, cout, 3)?,
            shortcut: if cin != cout {
                Some(Conv2d::new(&vb.pp("conv_shortcut"), cin, cout, 1)?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        let skip = match &self.shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        ops::add(&skip, &h)
    }

    fn params(&self) -> usize {
        let norms = 2 * (self.norm1.gamma.numel() + self.norm2.gamma.numel());
        norms + self.conv1.params() + self.conv2.params() + self.shortcut.as_ref().map_or(0, |c| c.params())
    }
}

/// A Linear of the attention block. Current files store `[C, C]`; very old ones stored the
/// projections as 1x1 convs `[C, C, 1, 1]` (under the legacy names the store aliases).
struct AttnLinear {
    weight: Weight,
    bias: Tensor,
}

impl AttnLinear {
    fn new(vb: &VarBuilder, channels: usize) -> Result<Self> {
        let name = vb.path("weight");
        let w = vb.store().tensor_stored(&name)?;
        let ok = w.shape() == [channels, channels] || w.shape() == [channels, channels, 1, 1];
        if !ok {
            return Err(Error::Shape(format!(
                "{}: tensor {name} has shape {:?}, the model expects [{channels}, {channels}] (or [{channels}, {channels}, 1, 1])",
                vb.store().describe(),
                w.shape()
            )));
        }
        Ok(AttnLinear {
            weight: Weight::Dense(vb.place(w.reshape(&[channels, channels])?)?),
            bias: vb.get_act("bias", &[channels])?,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::linear(x, &self.weight, Some(&self.bias))
    }
}

/// Single-head self-attention over all pixels with a residual (the mid block's attention).
struct AttentionBlock {
    norm: GroupNorm,
    to_q: AttnLinear,
    to_k: AttnLinear,
    to_v: AttnLinear,
    to_out: AttnLinear,
    channels: usize,
}

impl AttentionBlock {
    fn new(vb: &VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        Ok(AttentionBlock {
            norm: GroupNorm::new(&vb.pp("group_norm"), channels, groups)?,
            to_q: AttnLinear::new(&vb.pp("to_q"), channels)?,
            to_k: AttnLinear::new(&vb.pp("to_k"), channels)?,
            to_v: AttnLinear::new(&vb.pp("to_v"), channels)?,
            to_out: AttnLinear::new(&vb.pp("to_out").pp(0), channels)?,
            channels,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        // [B, C, H, W] → tokens [B, HW, C].
        let tokens = ops::permute(&self.norm.forward(x, false)?.reshape(&[b, c, h * w])?, &[0, 2, 1])?;
        let heads = |t: Tensor| t.reshape(&[b, 1, h * w, c]);
        let q = heads(self.to_q.forward(&tokens)?)?;
        let k = heads(self.to_k.forward(&tokens)?)?;
        let v = heads(self.to_v.forward(&tokens)?)?;
        let scale = 1.0 / (self.channels as f32).sqrt();
        let attn = ops::attention(&q, &k, &v, scale, false)?.reshape(&[b, h * w, c])?;
        let out = self.to_out.forward(&attn)?;
        let out = ops::permute(&out, &[0, 2, 1])?.reshape(&[b, c, h, w])?;
        ops::add(&out, x)
    }

    fn params(&self) -> usize {
        2 * self.channels + 4 * (self.channels * self.channels + self.channels)
    }
}

/// One decoder level: resnets, then (except at the last level) nearest-2x upsample + conv.
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock>,
    upsample: Option<Conv2d>,
}

impl UpDecoderBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for r in &self.resnets {
            h = r.forward(&h)?;
        }
        if let Some(conv) = &self.upsample {
            h = conv.forward(&ops::upsample_nearest2x(&h)?)?;
        }
        Ok(h)
    }
}

/// The decoder half of diffusers' `AutoencoderKL`.
pub struct VaeDecoder {
    config: VaeConfig,
    post_quant_conv: Option<Conv2d>,
    conv_in: Conv2d,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: Option<AttentionBlock>,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl VaeDecoder {
    /// Loads the decoder from the VAE component (`vb` at the component root).
    pub fn new(vb: &VarBuilder, config: &VaeConfig) -> Result<Self> {
        config.validate()?;
        let groups = config.norm_num_groups;
        let channels = &config.block_out_channels;
        let top = *channels.last().unwrap_or(&0);
        let latent = config.latent_channels;
        let post_quant_conv = if config.use_post_quant_conv {
            Some(Conv2d::new(&vb.pp("post_quant_conv"), latent, latent, 1)?)
        } else {
            None
        };
        let dec = vb.pp("decoder");
        let conv_in = Conv2d::new(&dec.pp("conv_in"), latent, top, 3)?;
        let mid = dec.pp("mid_block");
        let mid_resnets = [
            ResnetBlock::new(&mid.pp("resnets").pp(0), top, top, groups)?,
            ResnetBlock::new(&mid.pp("resnets").pp(1), top, top, groups)?,
        ];
        let mid_attention = if config.mid_block_add_attention {
            Some(AttentionBlock::new(&mid.pp("attentions").pp(0), top, groups)?)
        } else {
            None
        };
        let mut up_blocks = Vec::new();
        let mut cin = top;
        let levels = channels.len();
        for (i, &cout) in channels.iter().rev().enumerate() {
            let ub = dec.pp("up_blocks").pp(i);
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock::new(&ub.pp("resnets").pp(j), if j == 0 { cin } else { cout }, cout, groups)
                })
                .collect::<Result<Vec<_>>>()?;
            let upsample = if i + 1 < levels {
                Some(Conv2d::new(&ub.pp("upsamplers").pp(0).pp("conv"), cout, cout, 3)?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock { resnets, upsample });
            cin = cout;
        }
        let bottom = channels[0];
        Ok(VaeDecoder {
            config: config.clone(),
            post_quant_conv,
            conv_in,
            mid_resnets,
            mid_attention,
            up_blocks,
            conv_norm_out: GroupNorm::new(&dec.pp("conv_norm_out"), bottom, groups)?,
            conv_out: Conv2d::new(&dec.pp("conv_out"), bottom, config.out_channels, 3)?,
        })
    }

    /// Opens `dir` (the `vae` folder: `config.json` + weights) and loads the decoder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_on(dir, &crate::backend::Device::Cpu)
    }

    /// [`Self::from_dir`] with the weights placed on `device`.
    pub fn from_dir_on(dir: &Path, device: &crate::backend::Device) -> Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        Self::new(&VarBuilder::from_dir(dir)?.on_device(device), &config)
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Pixels per latent along each side.
    pub fn scale_factor(&self) -> usize {
        self.config.scale_factor()
    }

    /// Diffusion latents `[B, latent_channels, h, w]` → image `[B, out_channels, h*f, w*f]`
    /// in about [-1, 1] (no clamp), as `vae.decode(latents / scaling_factor).sample`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = latents.dims4()?;
        if c != self.config.latent_channels {
            return Err(Error::Shape(format!(
                "VAE decode: latents have {c} channels, the VAE expects {}",
                self.config.latent_channels
            )));
        }
        let shift = self.config.shift_factor.unwrap_or(0.0);
        let z = ops::affine(latents, 1.0 / self.config.scaling_factor, shift)?;
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(&z)?,
            None => z,
        };
        self.decoder(&z)
    }

    /// [`Self::decode`] in overlapping tiles, as diffusers' `AutoencoderKL.tiled_decode`
    /// (`enable_tiling()`), so that the decoder's full-resolution feature maps are only ever
    /// one tile large. `tile_sample_size` is diffusers' `tile_sample_min_size` in pixels
    /// (its default: the VAE config's `sample_size`, [`VaeConfig::default_tile_size`]); the
    /// latent tile is `tile_sample_size / f`. Tiles start every `0.75` latent tiles
    /// (`tile_overlap_factor` 0.25); each tile's first `0.25 * tile_sample_size` pixel rows
    /// and columns are blended linearly into the (already blended) tile above and to its left
    /// (`blend_v`, `blend_h`), and each tile keeps its top-left `0.75 * tile_sample_size`
    /// pixels. As diffusers, latents no larger than one tile are decoded untiled.
    ///
    /// Returns the image and the tile grid `(rows, cols)` (`None` when untiled). Errors when
    /// the latent tile is not a positive multiple of 4 (diffusers' crops then stop adding up
    /// to the image size).
    pub fn decode_tiled(
        &self,
        latents: &Tensor,
        tile_sample_size: usize,
    ) -> Result<(Tensor, Option<(usize, usize)>)> {
        let (b, c, h, w) = latents.dims4()?;
        let f = self.scale_factor();
        let tile = tile_sample_size / f.max(1);
        if tile == 0 || !tile_sample_size.is_multiple_of(f) || !tile.is_multiple_of(4) {
            return Err(Error::Invalid(format!(
                "VAE tile size {tile_sample_size} pixels must be a positive multiple of {} (4 latents of {f} pixels)",
                4 * f
            )));
        }
        if h <= tile && w <= tile {
            return Ok((self.decode(latents)?, None));
        }
        if c != self.config.latent_channels {
            return self.decode(latents).map(|t| (t, None)); // the same channel error
        }
        let shift = self.config.shift_factor.unwrap_or(0.0);
        let z = ops::affine(latents, 1.0 / self.config.scaling_factor, shift)?;
        // diffusers: overlap_size = int(tile_latent * (1 - 0.25)), blend_extent =
        // int(tile_sample * 0.25), row_limit = tile_sample - blend_extent (exact here, as the
        // latent tile is a multiple of 4).
        let step = tile * 3 / 4;
        let blend = tile_sample_size / 4;
        let keep = tile_sample_size - blend;
        let starts = |n: usize| (0..n).step_by(step).collect::<Vec<_>>();
        let (rows, cols) = (starts(h), starts(w));
        let out_c = self.config.out_channels;
        let (oh, ow) = (h * f, w * f);
        let mut out = vec![0f32; b * out_c * oh * ow];
        let mut above: Vec<Tile> = Vec::new();
        for (ri, &i) in rows.iter().enumerate() {
            let mut row: Vec<Tile> = Vec::with_capacity(cols.len());
            for (cj, &j) in cols.iter().enumerate() {
                let th = tile.min(h - i);
                let tw = tile.min(w - j);
                let zt = ops::narrow(&ops::narrow(&z, 2, i, th)?, 3, j, tw)?;
                let zt = match &self.post_quant_conv {
                    Some(conv) => conv.forward(&zt)?,
                    None => zt,
                };
                let decoded = self.decoder(&zt)?;
                let (_, _, dh, dw) = decoded.dims4()?;
                let mut t = Tile { data: decoded.to_vec()?, planes: b * out_c, h: dh, w: dw };
                drop(decoded);
                if ri > 0 {
                    t.blend_v(&above[cj], blend);
                }
                if cj > 0 {
                    t.blend_h(&row[cj - 1], blend);
                }
                // The kept top-left crop goes to its place in the image.
                let (y0, x0) = (ri * keep, cj * keep);
                let (kh, kw) = (keep.min(t.h), keep.min(t.w));
                for p in 0..t.planes {
                    for y in 0..kh {
                        let src = &t.data[(p * t.h + y) * t.w..][..kw];
                        out[(p * oh + y0 + y) * ow + x0..][..kw].copy_from_slice(src);
                    }
                }
                row.push(t);
            }
            above = row;
        }
        Ok((Tensor::from_vec(out, &[b, out_c, oh, ow])?, Some((rows.len(), cols.len()))))
    }

    /// The decoder network proper (after `post_quant_conv`).
    fn decoder(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(z)?;
        h = self.mid_resnets[0].forward(&h)?;
        if let Some(attn) = &self.mid_attention {
            h = attn.forward(&h)?;
        }
        h = self.mid_resnets[1].forward(&h)?;
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        let h = self.conv_norm_out.forward(&h, true)?;
        self.conv_out.forward(&h)
    }

    /// Number of parameters of the decoder (all dense).
    pub fn num_params(&self) -> usize {
        let convs = self.post_quant_conv.as_ref().map_or(0, |c| c.params())
            + self.conv_in.params()
            + self.conv_out.params()
            + 2 * self.conv_norm_out.gamma.numel();
        let mid = self.mid_resnets.iter().map(|r| r.params()).sum::<usize>()
            + self.mid_attention.as_ref().map_or(0, |a| a.params());
        let up: usize = self
            .up_blocks
            .iter()
            .map(|b| {
                b.resnets.iter().map(|r| r.params()).sum::<usize>()
                    + b.upsample.as_ref().map_or(0, |c| c.params())
            })
            .sum();
        convs + mid + up
    }
}

/// One decoded tile `[planes = B * C, h, w]` on the host, for [`VaeDecoder::decode_tiled`].
struct Tile {
    data: Vec<f32>,
    planes: usize,
    h: usize,
    w: usize,
}

/// diffusers' blend weights for position `k` of `extent`: `(1 - k / extent, k / extent)`,
/// computed in f64 (Python floats) and applied in f32 as torch does.
fn blend_weights(k: usize, extent: usize) -> (f32, f32) {
    let t = k as f64 / extent as f64;
    ((1.0 - t) as f32, t as f32)
}

impl Tile {
    /// diffusers' `blend_v(a = above, b = self)`: the first rows of `self` fade in from the
    /// last rows of the tile above.
    fn blend_v(&mut self, above: &Tile, extent: usize) {
        let e = extent.min(above.h).min(self.h);
        for p in 0..self.planes {
            for y in 0..e {
                let (wa, wb) = blend_weights(y, e);
                let a = &above.data[(p * above.h + above.h - e + y) * above.w..][..above.w];
                let b = &mut self.data[(p * self.h + y) * self.w..][..self.w];
                for (bv, &av) in b.iter_mut().zip(a) {
                    *bv = av * wa + *bv * wb;
                }
            }
        }
    }

    /// diffusers' `blend_h(a = left, b = self)`: the first columns of `self` fade in from
    /// the last columns of the tile to the left.
    fn blend_h(&mut self, left: &Tile, extent: usize) {
        let e = extent.min(left.w).min(self.w);
        for p in 0..self.planes {
            for y in 0..self.h.min(left.h) {
                let a = &left.data[(p * left.h + y) * left.w + left.w - e..][..e];
                let b = &mut self.data[(p * self.h + y) * self.w..][..e];
                for (x, (bv, &av)) in b.iter_mut().zip(a).enumerate() {
                    let (wa, wb) = blend_weights(x, e);
                    *bv = av * wa + *bv * wb;
                }
            }
        }
    }
}
