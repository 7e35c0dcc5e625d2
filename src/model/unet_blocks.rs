//! The UNet's building blocks, as diffusers names them: `ResnetBlock2D`, `Downsample2D`,
//! `Upsample2D`, and the down / mid / up blocks that chain them with the transformers of
//! [`super::attention`].

use super::attention::{Linear, Transformer2DModel, TransformerSpec};
use crate::backend::{ops, Tensor};
use crate::checkpoint::VarBuilder;
use crate::error::{Error, Result};

/// A 2-D convolution with bias (square kernel).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn load(
        vb: &VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Conv2d {
            // Kept in the checkpoint's dtype; `ops::conv2d` widens it per call.
            weight: vb.get_stored("weight", &[out_channels, in_channels, kernel, kernel])?,
            bias: vb.get_act("bias", &[out_channels])?,
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::conv2d(x, &self.weight, Some(&self.bias), self.stride, self.padding)
    }
}

/// Group norm with affine parameters, optionally followed by SiLU (fused in the op).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    gamma: Tensor,
    beta: Tensor,
    groups: usize,
    eps: f32,
}

impl GroupNorm {
    pub fn load(vb: &VarBuilder, channels: usize, groups: usize, eps: f32) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::Checkpoint(format!(
                "{}: {channels} channels do not split into {groups} groups",
                vb.path("weight")
            )));
        }
        Ok(GroupNorm {
            gamma: vb.get("weight", &[channels])?,
            beta: vb.get("bias", &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        ops::group_norm(x, self.groups, &self.gamma, &self.beta, self.eps, silu)
    }
}

/// Shared settings of every block of one UNet.
#[derive(Debug, Clone, Copy)]
pub struct BlockSettings {
    pub temb_channels: usize,
    pub norm_groups: usize,
    pub norm_eps: f32,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
    /// `resnet_out_scale_factor` (down/up blocks) or `mid_block_scale_factor` (mid block).
    pub output_scale: f32,
}

/// `ResnetBlock2D` (time conditioning "default"): two norm+SiLU+conv3x3 stages with the
/// projected time embedding added in between, plus a 1x1 `conv_shortcut` when the
/// channel count changes.
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale: f32,
}

impl ResnetBlock2D {
    pub fn load(vb: &VarBuilder, in_ch: usize, out_ch: usize, s: &BlockSettings) -> Result<Self> {
        let conv_shortcut = if in_ch != out_ch {
            Some(Conv2d::load(&vb.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0)?)
        } else {
            None
        };
        Ok(ResnetBlock2D {
            norm1: GroupNorm::load(&vb.pp("norm1"), in_ch, s.norm_groups, s.norm_eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: Linear::load(&vb.pp("time_emb_proj"), s.temb_channels, out_ch, true)?,
            norm2: GroupNorm::load(&vb.pp("norm2"), out_ch, s.norm_groups, s.norm_eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut,
            output_scale: s.output_scale,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.time_emb_proj]
    }

    /// `temb_act` is `silu(time embedding)`, `[B, temb_channels]` (every resnet applies SiLU
    /// to the same embedding, so the UNet computes it once).
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x, true)?)?;
        let (b, c, _, _) = h.dims4()?;
        let t = self.time_emb_proj.forward(temb_act)?.reshape(&[b, c, 1, 1])?;
        let h = ops::add(&h, &t)?;
        // Dropout is the identity at inference.
        let h = self.conv2.forward(&self.norm2.forward(&h, true)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = ops::add(&shortcut, &h)?;
        if self.output_scale == 1.0 {
            Ok(out)
        } else {
            ops::affine(&out, 1.0 / self.output_scale, 0.0)
        }
    }
}

/// `CrossAttnDownBlock2D` (with transformers) or `DownBlock2D` (without): resnets, each
/// optionally followed by a transformer, then an optional stride-2 conv downsampler.
#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Conv2d>,
}

/// Per-level hyper-parameters of a down or up block.
#[derive(Debug, Clone, Copy)]
pub struct LevelSpec {
    pub cross_attention: bool,
    pub layers: usize,
    pub heads: usize,
    pub transformer_layers: usize,
}

fn transformer_spec(channels: usize, level: &LevelSpec, s: &BlockSettings) -> TransformerSpec {
    TransformerSpec {
        channels,
        heads: level.heads,
        layers: level.transformer_layers,
        cross_attention_dim: s.cross_attention_dim,
        norm_groups: s.norm_groups,
        use_linear_projection: s.use_linear_projection,
    }
}

fn linears_of<'a>(
    resnets: &'a mut [ResnetBlock2D],
    attentions: &'a mut [Transformer2DModel],
) -> Vec<&'a mut Linear> {
    let mut v = Vec::new();
    for r in resnets {
        v.extend(r.linears_mut());
    }
    for a in attentions {
        v.extend(a.linears_mut());
    }
    v
}

impl DownBlock {
    pub fn load(
        vb: &VarBuilder,
        in_ch: usize,
        out_ch: usize,
        level: &LevelSpec,
        add_downsample: bool,
        s: &BlockSettings,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..level.layers {
            let cin = if i == 0 { in_ch } else { out_ch };
            resnets.push(ResnetBlock2D::load(&vb.pp("resnets").pp(i), cin, out_ch, s)?);
            if level.cross_attention {
                let spec = transformer_spec(out_ch, level, s);
                attentions.push(Transformer2DModel::load(&vb.pp("attentions").pp(i), spec)?);
            }
        }
        let downsampler = if add_downsample {
            Some(Conv2d::load(&vb.pp("downsamplers").pp(0).pp("conv"), out_ch, out_ch, 3, 2, 1)?)
        } else {
            None
        };
        Ok(DownBlock { resnets, attentions, downsampler })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        linears_of(&mut self.resnets, &mut self.attentions)
    }

    /// Runs the block and pushes every output the up path will consume as a skip
    /// connection (each resnet(+transformer) output, then the downsampled one).
    pub fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        context: &Tensor,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok(h)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, resnet) pairs.
#[derive(Debug, Clone)]
pub struct MidBlock {
    first: ResnetBlock2D,
    pairs: Vec<(Transformer2DModel, ResnetBlock2D)>,
}

impl MidBlock {
    /// One transformer (diffusers' default `num_layers = 1`), heads of the innermost level.
    pub fn load(vb: &VarBuilder, channels: usize, level: &LevelSpec, s: &BlockSettings) -> Result<Self> {
        let first = ResnetBlock2D::load(&vb.pp("resnets").pp(0), channels, channels, s)?;
        let attn =
            Transformer2DModel::load(&vb.pp("attentions").pp(0), transformer_spec(channels, level, s))?;
        let resnet = ResnetBlock2D::load(&vb.pp("resnets").pp(1), channels, channels, s)?;
        Ok(MidBlock { first, pairs: vec![(attn, resnet)] })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = self.first.linears_mut();
        for (attn, resnet) in &mut self.pairs {
            v.extend(attn.linears_mut());
            v.extend(resnet.linears_mut());
        }
        v
    }

    pub fn forward(&self, x: &Tensor, temb_act: &Tensor, context: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x, temb_act)?;
        for (attn, resnet) in &self.pairs {
            h = attn.forward(&h, context)?;
            h = resnet.forward(&h, temb_act)?;
        }
        Ok(h)
    }
}

/// `CrossAttnUpBlock2D` / `UpBlock2D`: each resnet takes the running features concatenated
/// (on channels) with the next skip connection from the down path, optionally followed by
/// a transformer; then an optional nearest-2x upsampler with a 3x3 conv.
#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Conv2d>,
}

impl UpBlock {
    /// `prev_out_ch`: channels coming from the block below; `skip_in_ch`: channels of the
    /// down level's input (the last skip this block consumes); `level.layers` resnets.
    pub fn load(
        vb: &VarBuilder,
        prev_out_ch: usize,
        out_ch: usize,
        skip_in_ch: usize,
        level: &LevelSpec,
        add_upsample: bool,
        s: &BlockSettings,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..level.layers {
            let skip_ch = if i + 1 == level.layers { skip_in_ch } else { out_ch };
            let cin = if i == 0 { prev_out_ch } else { out_ch };
            resnets.push(ResnetBlock2D::load(&vb.pp("resnets").pp(i), cin + skip_ch, out_ch, s)?);
            if level.cross_attention {
                let spec = transformer_spec(out_ch, level, s);
                attentions.push(Transformer2DModel::load(&vb.pp("attentions").pp(i), spec)?);
            }
        }
        let upsampler = if add_upsample {
            Some(Conv2d::load(&vb.pp("upsamplers").pp(0).pp("conv"), out_ch, out_ch, 3, 1, 1)?)
        } else {
            None
        };
        Ok(UpBlock { resnets, attentions, upsampler })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        linears_of(&mut self.resnets, &mut self.attentions)
    }

    /// Consumes skip connections from the end of `skips` (the most recent first). The
    /// upsampler resizes to the size of the next skip connection left in `skips` (diffusers'
    /// `upsample_size`), so odd feature-map sizes on the down path (latents that are not a
    /// multiple of `2^(levels-1)`) line up again; for even sizes that is exactly 2x.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb_act: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| Error::Shape("unet: the up path ran out of skip connections".into()))?;
            h = ops::cat(&[&h, &skip], 1)?;
            h = resnet.forward(&h, temb_act)?;
            if let Some(attn) = self.attentions.get(i) {
                h = attn.forward(&h, context)?;
            }
        }
        if let Some(up) = &self.upsampler {
            let up_in = match skips.last() {
                Some(next) => {
                    let (_, _, sh, sw) = next.dims4()?;
                    ops::upsample_nearest_to(&h, sh, sw)?
                }
                None => ops::upsample_nearest2x(&h)?,
            };
            h = up.forward(&up_in)?;
        }
        Ok(h)
    }
}
