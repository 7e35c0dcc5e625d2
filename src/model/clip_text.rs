//! The CLIP text encoder (SD2: gelu, 23 layers at full size; last_hidden_state after the final layer norm).
//!
//! transformers' `CLIPTextModel` as diffusers' SD2 pipelines call it: token + position
//! embeddings, a stack of pre-LN transformer layers with causal self-attention (no padding
//! mask: SD2's text encoder does not set `use_attention_mask`), and a final layer norm whose
//! output is the prompt embedding the UNet cross-attends to. Weights are loaded by the
//! transformers 5 names (`embeddings.…`, `encoder.layers.N.…`, `final_layer_norm.…`); the
//! checkpoint store also accepts the `text_model.`-prefixed names of transformers 4 files.

use crate::backend::{ops, Tensor};
use crate::checkpoint::VarBuilder;
use crate::error::{Error, Result};
use crate::format::Weight;
use crate::model::linear::{Linear, LinearAct};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;

/// The MLP non-linearity (`hidden_act` in `config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact erf GELU (SD2's OpenCLIP ViT-H text tower).
    Gelu,
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP, i.e. SD1.x).
    QuickGelu,
}

impl Activation {
    fn from_name(name: &str) -> Result<Self> {
        match name {
            "gelu" => Ok(Activation::Gelu),
            "quick_gelu" => Ok(Activation::QuickGelu),
            other => Err(Error::Checkpoint(format!(
                "text_encoder: hidden_act {other:?} is not supported (expected \"gelu\" or \"quick_gelu\")"
            ))),
        }
    }

    fn forward(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => ops::gelu(x),
            // x·sigmoid(1.702x) = silu(1.702x) / 1.702
            Activation::QuickGelu => ops::affine(&ops::silu(&ops::affine(x, 1.702, 0.0)?)?, 1.0 / 1.702, 0.0),
        }
    }
}

/// Hyper-parameters of `CLIPTextModel` (transformers' `CLIPTextConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// The sequence length the position table covers (77).
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    pub hidden_act: Activation,
}

/// `config.json` as written by transformers; missing fields take `CLIPTextConfig`'s defaults.
#[derive(Deserialize)]
#[serde(default)]
struct RawConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    layer_norm_eps: f64,
    hidden_act: String,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
            hidden_act: "quick_gelu".to_string(),
        }
    }
}

impl ClipTextConfig {
    /// The text encoder of SD2.1 and SD2.1-base (OpenCLIP ViT-H/14 text tower minus its last layer).
    pub fn v2_1() -> Self {
        ClipTextConfig {
            vocab_size: 49408,
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            max_position_embeddings: 77,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::Gelu,
        }
    }

    /// Parses the text of a `text_encoder/config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| Error::Checkpoint(format!("text_encoder config: invalid JSON ({e})")))?;
        let config = ClipTextConfig {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            layer_norm_eps: raw.layer_norm_eps,
            hidden_act: Activation::from_name(&raw.hidden_act)?,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads `text_encoder/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn validate(&self) -> Result<()> {
        let sizes = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        if let Some((name, _)) = sizes.iter().find(|(_, v)| *v == 0) {
            return Err(Error::Checkpoint(format!("text_encoder config: {name} must be positive")));
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::Checkpoint(format!(
                "text_encoder config: hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if !(self.layer_norm_eps.is_finite() && self.layer_norm_eps > 0.0) {
            return Err(Error::Checkpoint("text_encoder config: layer_norm_eps must be positive".into()));
        }
        Ok(())
    }
}

struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    fn new(vb: &VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm { weight: vb.get("weight", &[size])?, bias: vb.get("bias", &[size])?, eps: eps as f32 })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// Multi-head causal self-attention (`self_attn`).
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: &VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(ClipAttention {
            q_proj: Linear::load(&vb.pp("q_proj"), h, h, true)?,
            k_proj: Linear::load(&vb.pp("k_proj"), h, h, true)?,
            v_proj: Linear::load(&vb.pp("v_proj"), h, h, true)?,
            out_proj: Linear::load(&vb.pp("out_proj"), h, h, true)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `[B, S, H·D]` → `[B, H, S, D]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, _) = x.dims3()?;
        ops::permute(&x.reshape(&[b, s, self.heads, self.head_dim])?, &[0, 2, 1, 3])
    }

    /// `out_proj(attention(x)) + residual` (transformers' `residual + hidden_states`: one add,
    /// the same in either order; no dropout at inference between them).
    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (b, s, c) = x.dims3()?;
        let q = self.split_heads(&self.q_proj.forward(x)?)?;
        let k = self.split_heads(&self.k_proj.forward(x)?)?;
        let v = self.split_heads(&self.v_proj.forward(x)?)?;
        let scale = (self.head_dim as f32).powf(-0.5);
        // Causal: token i sees tokens 0..=i only, as CLIP was trained.
        let attended = ops::attention(&q, &k, &v, scale, true)?;
        let merged = ops::permute(&attended, &[0, 2, 1, 3])?.reshape(&[b, s, c])?;
        self.out_proj.forward_fused(&merged, LinearAct::None, Some(residual))
    }
}

struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl ClipMlp {
    fn new(vb: &VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(ClipMlp {
            fc1: Linear::load(&vb.pp("fc1"), cfg.hidden_size, cfg.intermediate_size, true)?,
            fc2: Linear::load(&vb.pp("fc2"), cfg.intermediate_size, cfg.hidden_size, true)?,
            activation: cfg.hidden_act,
        })
    }

    /// `fc2(act(fc1(x))) + residual`. The exact GELU of SD2's text tower runs in `fc1`'s
    /// epilogue and the residual in `fc2`'s where the sparse kernels can; quick_gelu (no
    /// kernel epilogue) stays a separate op.
    fn forward(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = match self.activation {
            Activation::Gelu => self.fc1.forward_fused(x, LinearAct::Gelu, None)?,
            Activation::QuickGelu => self.activation.forward(&self.fc1.forward(x)?)?,
        };
        self.fc2.forward_fused(&h, LinearAct::None, Some(residual))
    }
}

/// One pre-LN transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(vb: &VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(ClipEncoderLayer {
            layer_norm1: LayerNorm::new(&vb.pp("layer_norm1"), cfg.hidden_size, cfg.layer_norm_eps)?,
            self_attn: ClipAttention::new(&vb.pp("self_attn"), cfg)?,
            layer_norm2: LayerNorm::new(&vb.pp("layer_norm2"), cfg.hidden_size, cfg.layer_norm_eps)?,
            mlp: ClipMlp::new(&vb.pp("mlp"), cfg)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = self.self_attn.forward(&self.layer_norm1.forward(x)?, x)?;
        self.mlp.forward(&self.layer_norm2.forward(&x)?, &x)
    }
}

/// `CLIPTextModel` up to `last_hidden_state`.
pub struct ClipTextModel {
    config: ClipTextConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    /// Set by [`ClipTextModel::release_weights`]: the weights are gone, `forward` errors.
    released: bool,
}

impl ClipTextModel {
    /// Builds the model from `vb` rooted at the component (names like
    /// `embeddings.token_embedding.weight`); every tensor is checked against `config`'s shape.
    pub fn new(vb: &VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        config.validate()?;
        let h = config.hidden_size;
        let emb = vb.pp("embeddings");
        // The token table (49408 x 1024 for SD2) stays in its stored dtype; lookups widen rows.
        let token_embedding = emb.pp("token_embedding").get_stored("weight", &[config.vocab_size, h])?;
        let position_embedding =
            emb.pp("position_embedding").get_act("weight", &[config.max_position_embeddings, h])?;
        let layers_vb = vb.pp("encoder").pp("layers");
        let layers = (0..config.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(&layers_vb.pp(i), config))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(&vb.pp("final_layer_norm"), h, config.layer_norm_eps)?;
        Ok(ClipTextModel {
            config: config.clone(),
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm,
            released: false,
        })
    }

    /// Frees the weights (the token table and every layer; a one-shot run that has encoded
    /// its prompt needs them no more). Afterwards [`Self::forward`] is an error.
    pub fn release_weights(&mut self) {
        self.token_embedding = Tensor::zeros(&[0, self.config.hidden_size]);
        self.layers = Vec::new();
        self.released = true;
    }

    /// Whether [`Self::release_weights`] was called.
    pub fn is_released(&self) -> bool {
        self.released
    }

    /// Loads a diffusers `text_encoder/` folder: `config.json` plus its safetensors weights
    /// (dense, or compressed by `sdsparse convert`).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_dir_on(dir, &crate::backend::Device::Cpu)
    }

    /// [`Self::from_dir`] with the weights placed on `device`.
    pub fn from_dir_on(dir: &Path, device: &crate::backend::Device) -> Result<Self> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let vb = VarBuilder::new(Arc::new(crate::checkpoint::ComponentStore::open(dir)?)).on_device(device);
        Self::new(&vb, &config)
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Every Linear weight, dense or compressed as loaded (for memory reports).
    pub fn linear_weights(&self) -> impl Iterator<Item = &Weight> + '_ {
        self.layers.iter().flat_map(|l| {
            let a = &l.self_attn;
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj, &l.mlp.fc1, &l.mlp.fc2].map(|lin| lin.weight())
        })
    }

    /// Every Linear layer of the encoder layers, in weight-name order within each layer
    /// (to attach observers, or to swap in pruned weights in memory).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                let a = &mut l.self_attn;
                [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.out_proj, &mut l.mlp.fc1, &mut l.mlp.fc2]
            })
            .collect()
    }

    /// Logical parameters (a pruned weight counts its full `out × in`).
    pub fn parameter_count(&self) -> usize {
        let linear = |l: &Linear| {
            l.weight().dims2().map(|(o, i)| o * i).unwrap_or(0) + l.bias().map_or(0, |b| b.numel())
        };
        let norm = |n: &LayerNorm| n.weight.numel() + n.bias.numel();
        let per_layer = |l: &ClipEncoderLayer| {
            let a = &l.self_attn;
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.out_proj, &l.mlp.fc1, &l.mlp.fc2]
                .into_iter()
                .map(linear)
                .sum::<usize>()
                + norm(&l.layer_norm1)
                + norm(&l.layer_norm2)
        };
        self.token_embedding.numel()
            + self.position_embedding.numel()
            + self.layers.iter().map(per_layer).sum::<usize>()
            + norm(&self.final_layer_norm)
    }

    /// `last_hidden_state` `[B, S, hidden]` for `B` token sequences of one length `S`
    /// (at most `max_position_embeddings`; 77 as the tokenizer pads them).
    pub fn forward<T: AsRef<[u32]>>(&self, batch: &[T]) -> Result<Tensor> {
        if self.released {
            return Err(Error::Invalid("text encoder: its weights were released after encoding".into()));
        }
        let (b, s) = self.check_ids(batch)?;
        let h = self.config.hidden_size;
        let ids: Vec<u32> = batch.iter().flat_map(|row| row.as_ref().iter().copied()).collect();
        let tokens = ops::embedding(&self.token_embedding, &ids)?.reshape(&[b, s, h])?;
        // Positions 0..S, broadcast over the batch.
        let positions = ops::narrow(&self.position_embedding, 0, 0, s)?;
        let mut x = ops::add(&tokens, &positions)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.final_layer_norm.forward(&x)
    }

    fn check_ids<T: AsRef<[u32]>>(&self, batch: &[T]) -> Result<(usize, usize)> {
        let first = batch.first().ok_or_else(|| Error::Invalid("text encoder: empty batch".into()))?;
        let s = first.as_ref().len();
        if s == 0 || s > self.config.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "text encoder: sequence length {s} outside 1..={}",
                self.config.max_position_embeddings
            )));
        }
        for row in batch {
            let row = row.as_ref();
            if row.len() != s {
                return Err(Error::Invalid(format!(
                    "text encoder: sequences of different lengths ({s} and {}) in one batch",
                    row.len()
                )));
            }
            if let Some(&bad) = row.iter().find(|&&id| id as usize >= self.config.vocab_size) {
                return Err(Error::Invalid(format!(
                    "text encoder: token id {bad} outside the vocabulary of {}",
                    self.config.vocab_size
                )));
            }
        }
        Ok((batch.len(), s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_gelu_is_x_sigmoid_1702x() {
        let xs: Vec<f32> = (0..41).map(|i| (i as f32 - 20.0) * 0.37).collect();
        let got = Activation::QuickGelu.forward(&Tensor::from_vec(xs.clone(), &[41]).unwrap()).unwrap();
        for (&x, &y) in xs.iter().zip(got.as_slice().unwrap()) {
            let want = x / (1.0 + (-1.702 * x).exp());
            assert!((y - want).abs() <= 1e-6 * (1.0 + want.abs()), "quick_gelu({x}) = {y}, want {want}");
        }
    }
}
