//! The UNet's transformer blocks, as diffusers' `Transformer2DModel` (SD2: linear
//! projection in and out) over `BasicTransformerBlock`s (self-attention, cross-attention to
//! the text embeddings, GEGLU feed-forward), plus the small layers they are made of.
//!
//! Every Linear weight is loaded with `vb.get_weight`, so it runs dense, 2:4 or
//! unstructured-sparse as stored in the checkpoint.

use crate::backend::{ops, Tensor};
use crate::checkpoint::VarBuilder;
use crate::error::{Error, Result};

pub use super::linear::{Linear, LinearAct};

/// Layer norm over the last dim with affine parameters.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    gamma: Tensor,
    beta: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn load(vb: &VarBuilder, dim: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm { gamma: vb.get("weight", &[dim])?, beta: vb.get("bias", &[dim])?, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.gamma, &self.beta, self.eps)
    }
}

/// Multi-head attention as diffusers' `Attention` with SD2's settings: no bias on q/k/v,
/// bias on the output projection, scale `1/sqrt(head_dim)`.
///
/// `upcast_attention` (true for SD2.1 768-v) needs nothing here: it only makes fp16 runs
/// compute the scores and softmax in f32, and our attention always does.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl Attention {
    /// `context_dim` is the width of the keys/values source: the query width for
    /// self-attention, `cross_attention_dim` for cross-attention.
    pub fn load(
        vb: &VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Attention {
            to_q: Linear::load(&vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(&vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(&vb.pp("to_v"), context_dim, inner, false)?,
            to_out: Linear::load(&vb.pp("to_out").pp(0), inner, query_dim, true)?,
            heads,
            head_dim,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.to_q, &mut self.to_k, &mut self.to_v, &mut self.to_out]
    }

    /// `[B, S, C]` → `[B, heads, S, head_dim]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        ops::permute(&x.reshape(&[b, s, self.heads, self.head_dim])?, &[0, 2, 1, 3])
    }

    /// `x[B, S, C]` attends to `context[B, Sk, Cc]` (to itself when `context` is `None`).
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        self.forward_residual(x, context, None)
    }

    /// [`Self::forward`] plus `residual[B, S, C]`, added by the output projection (fused in the
    /// sparse kernels' epilogue): `to_out(attn) + residual`, diffusers'
    /// `attn_output + hidden_states` (SD2's blocks set no `residual_connection`, their
    /// `rescale_output_factor` is 1 and the dropout after `to_out.0` is the identity at
    /// inference, so nothing runs between the projection and the add).
    pub fn forward_residual(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        let kv_source = context.unwrap_or(x);
        let q = self.split_heads(&self.to_q.forward(x)?)?;
        let k = self.split_heads(&self.to_k.forward(kv_source)?)?;
        let v = self.split_heads(&self.to_v.forward(kv_source)?)?;
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let out = ops::attention(&q, &k, &v, scale, false)?;
        let out = ops::permute(&out, &[0, 2, 1, 3])?.reshape(&[b, s, self.heads * self.head_dim])?;
        self.to_out.forward_fused(&out, LinearAct::None, residual)
    }
}

/// `FeedForward` with GEGLU: `net.0.proj` to twice the inner width, `h * gelu(gate)`,
/// then `net.2` back to `dim` (inner width `4 * dim`).
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn load(vb: &VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(FeedForward {
            proj_in: Linear::load_geglu(&vb.pp("net").pp(0).pp("proj"), dim, 2 * inner)?,
            proj_out: Linear::load(&vb.pp("net").pp(2), inner, dim, true)?,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        vec![&mut self.proj_in, &mut self.proj_out]
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_residual(x, None)
    }

    /// [`Self::forward`] plus `residual[.., dim]` added by `net.2` (diffusers'
    /// `ff_output + hidden_states`; the dropouts are the identity at inference). The GEGLU runs
    /// in `net.0.proj`'s epilogue and the residual in `net.2`'s where the sparse kernels can.
    pub fn forward_residual(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let h = self.proj_in.forward_fused(x, LinearAct::Geglu, None)?;
        self.proj_out.forward_fused(&h, LinearAct::None, residual)
    }
}

/// Pre-norm transformer block: self-attention, cross-attention, feed-forward, each
/// added back to the residual stream.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

/// diffusers' `BasicTransformerBlock` layer-norm epsilon (its `norm_eps` default).
const TRANSFORMER_LAYER_NORM_EPS: f32 = 1e-5;

impl BasicTransformerBlock {
    pub fn load(
        vb: &VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_dim: usize,
    ) -> Result<Self> {
        let eps = TRANSFORMER_LAYER_NORM_EPS;
        Ok(BasicTransformerBlock {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, eps)?,
            attn1: Attention::load(&vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, eps)?,
            attn2: Attention::load(&vb.pp("attn2"), dim, cross_dim, heads, head_dim)?,
            norm3: LayerNorm::load(&vb.pp("norm3"), dim, eps)?,
            ff: FeedForward::load(&vb.pp("ff"), dim)?,
        })
    }

    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = self.attn1.linears_mut();
        v.extend(self.attn2.linears_mut());
        v.extend(self.ff.linears_mut());
        v
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        // Each sub-layer's output projection adds the residual stream (`out + x`, diffusers'
        // order; fused into the sparse kernels' epilogue where they run it).
        let x = self.attn1.forward_residual(&self.norm1.forward(x)?, None, Some(x))?;
        let x = self.attn2.forward_residual(&self.norm2.forward(&x)?, Some(context), Some(&x))?;
        self.ff.forward_residual(&self.norm3.forward(&x)?, Some(&x))
    }
}

/// diffusers' `Transformer2DModel` group-norm epsilon (fixed in its constructor).
const TRANSFORMER_GROUP_NORM_EPS: f32 = 1e-6;

/// `Transformer2DModel` on an image `[B, C, H, W]`: group norm, tokens `[B, H*W, C]`,
/// `proj_in`, the transformer blocks, `proj_out`, back to an image, plus the input.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm_gamma: Tensor,
    norm_beta: Tensor,
    groups: usize,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

/// Hyper-parameters of one [`Transformer2DModel`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub cross_attention_dim: usize,
    pub norm_groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn load(vb: &VarBuilder, spec: TransformerSpec) -> Result<Self> {
        let c = spec.channels;
        if spec.heads == 0 || !c.is_multiple_of(spec.heads) {
            return Err(Error::Checkpoint(format!(
                "{}: {c} channels do not split into {} heads",
                vb.path("attention"),
                spec.heads
            )));
        }
        let head_dim = c / spec.heads;
        let inner = spec.heads * head_dim;
        let (proj_in, proj_out) = if spec.use_linear_projection {
            (
                Linear::load(&vb.pp("proj_in"), c, inner, true)?,
                Linear::load(&vb.pp("proj_out"), inner, c, true)?,
            )
        } else {
            (
                Linear::load_from_conv1x1(&vb.pp("proj_in"), c, inner)?,
                Linear::load_from_conv1x1(&vb.pp("proj_out"), inner, c)?,
            )
        };
        let blocks = (0..spec.layers)
            .map(|i| {
                BasicTransformerBlock::load(
                    &vb.pp("transformer_blocks").pp(i),
                    inner,
                    spec.heads,
                    head_dim,
                    spec.cross_attention_dim,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Transformer2DModel {
            norm_gamma: vb.get("norm.weight", &[c])?,
            norm_beta: vb.get("norm.bias", &[c])?,
            groups: spec.norm_groups,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// Every Linear layer, in weight-name order (projections stored as 1x1 convs included).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut v = vec![&mut self.proj_in];
        for block in &mut self.blocks {
            v.extend(block.linears_mut());
        }
        v.push(&mut self.proj_out);
        v
    }

    /// `x[B, C, H, W]`, `context[B, S, cross_attention_dim]` → `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = ops::group_norm(
            x,
            self.groups,
            &self.norm_gamma,
            &self.norm_beta,
            TRANSFORMER_GROUP_NORM_EPS,
            false,
        )?;
        let tokens = ops::permute(&normed, &[0, 2, 3, 1])?.reshape(&[b, h * w, c])?;
        let mut t = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let t = self.proj_out.forward(&t)?;
        let image = ops::permute(&t.reshape(&[b, h, w, c])?, &[0, 3, 1, 2])?;
        ops::add(&image, x)
    }
}
