//! Component configs read from diffusers' config.json files, with named constructors for the real SD2.1 sizes.

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// A config field diffusers allows as either one value for every block or a list per block.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for block `i` of `n` (errors when a list has the wrong length).
    fn expand(&self, field: &str, n: usize) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => {
                Err(Error::Checkpoint(format!("unet config: {field} has {} entries for {n} blocks", v.len())))
            }
        }
    }
}

/// The fields of diffusers' `UNet2DConditionModel` config the SD2 family uses. Unknown keys
/// are ignored; the features SD2 does not use (class/addition embeddings, scale-shift time
/// conditioning, ...) are rejected by [`UNetConfig::validate`] rather than silently ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "default_4")]
    pub in_channels: usize,
    #[serde(default = "default_4")]
    pub out_channels: usize,
    pub sample_size: Option<usize>,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f32,
    pub down_block_types: Vec<String>,
    #[serde(default = "default_mid_block")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_2")]
    pub layers_per_block: usize,
    #[serde(default = "default_1")]
    pub downsample_padding: usize,
    #[serde(default = "default_1f")]
    pub mid_block_scale_factor: f32,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default = "default_32")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f32,
    pub cross_attention_dim: usize,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock,
    /// Despite the name, in diffusers' UNet this is the number of attention HEADS per block
    /// when `num_attention_heads` is null (a historical misnomer diffusers keeps for
    /// compatibility): SD2.1's `[5, 10, 20, 20]` means 64 channels per head.
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Upcasts attention scores to f32 in fp16 runs; our attention always computes its
    /// softmax in f32, so this needs no handling in the model.
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default = "default_conv_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_conv_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default = "default_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "default_1f")]
    pub resnet_out_scale_factor: f32,
    #[serde(default = "default_positional")]
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub class_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub addition_embed_type: Option<String>,
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    pub cross_attention_norm: Option<String>,
    #[serde(default = "default_attention_type")]
    pub attention_type: String,
    pub mid_block_only_cross_attention: Option<bool>,
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
}

fn default_1() -> usize {
    1
}
fn default_2() -> usize {
    2
}
fn default_4() -> usize {
    4
}
fn default_32() -> usize {
    32
}
fn default_1f() -> f32 {
    1.0
}
fn default_eps() -> f32 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_conv_kernel() -> usize {
    3
}
fn default_act() -> String {
    "silu".into()
}
fn default_default() -> String {
    "default".into()
}
fn default_positional() -> String {
    "positional".into()
}
fn default_attention_type() -> String {
    "default".into()
}
fn default_mid_block() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn default_transformer_layers() -> PerBlock {
    PerBlock::One(1)
}

impl UNetConfig {
    /// SD2.1 768-v (`stabilityai/stable-diffusion-2-1`): 96x96 latents, v-prediction,
    /// `upcast_attention` true.
    pub fn v2_1() -> Self {
        UNetConfig { sample_size: Some(96), upcast_attention: true, ..Self::v2_1_base() }
    }

    /// SD2.1-base (`stabilityai/stable-diffusion-2-1-base`): 64x64 latents, epsilon.
    pub fn v2_1_base() -> Self {
        let s = |v: &str| v.to_string();
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            sample_size: Some(64),
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![
                s("CrossAttnDownBlock2D"),
                s("CrossAttnDownBlock2D"),
                s("CrossAttnDownBlock2D"),
                s("DownBlock2D"),
            ],
            mid_block_type: Some(s("UNetMidBlock2DCrossAttn")),
            up_block_types: vec![
                s("UpBlock2D"),
                s("CrossAttnUpBlock2D"),
                s("CrossAttnUpBlock2D"),
                s("CrossAttnUpBlock2D"),
            ],
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: s("silu"),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 1024,
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            num_attention_heads: None,
            use_linear_projection: true,
            upcast_attention: false,
            only_cross_attention: serde_json::Value::Bool(false),
            dual_cross_attention: false,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            resnet_time_scale_shift: s("default"),
            resnet_out_scale_factor: 1.0,
            time_embedding_type: s("positional"),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            class_embed_type: None,
            num_class_embeds: None,
            addition_embed_type: None,
            encoder_hid_dim: None,
            center_input_sample: false,
            resnet_skip_time_act: false,
            cross_attention_norm: None,
            attention_type: s("default"),
            mid_block_only_cross_attention: None,
            reverse_transformer_layers_per_block: None,
        }
    }

    /// Parses a diffusers `unet/config.json` text and checks it describes a UNet we can run.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let cfg: UNetConfig = serde_json::from_str(text)
            .map_err(|e| Error::Checkpoint(format!("unet config: invalid config.json ({e})")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `unet/config.json` (pass the file, or the component folder holding it).
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = if path.is_dir() { path.join("config.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        Self::from_json_str(&text).map_err(|e| Error::Checkpoint(format!("{}: {e}", file.display())))
    }

    /// Number of resolution levels (down blocks).
    pub fn levels(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Attention heads per down block (diffusers: `num_attention_heads or attention_head_dim`).
    pub fn heads_per_block(&self) -> Result<Vec<usize>> {
        let n = self.levels();
        match &self.num_attention_heads {
            Some(h) => h.expand("num_attention_heads", n),
            None => self.attention_head_dim.expand("attention_head_dim", n),
        }
    }

    pub fn transformer_layers(&self) -> Result<Vec<usize>> {
        self.transformer_layers_per_block.expand("transformer_layers_per_block", self.levels())
    }

    /// Width of the time embedding (`4 * block_out_channels[0]` unless overridden).
    pub fn time_embed_dim(&self) -> usize {
        self.time_embedding_dim.unwrap_or(4 * self.block_out_channels[0])
    }

    /// The spatial factor between the latents and the innermost level, `2^(levels-1)`;
    /// latent height and width must be multiples of it.
    pub fn downsample_factor(&self) -> usize {
        1 << self.levels().saturating_sub(1)
    }

    /// Rejects configs outside the SD2 family with a clear message (instead of computing
    /// something else than diffusers would).
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Checkpoint(format!("unet config: {msg}")));
        let n = self.levels();
        if n == 0 {
            return bad("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "{} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad(format!("down block type {t} is not supported"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad(format!("up block type {t} is not supported"));
            }
        }
        if self.mid_block_type.as_deref() != Some("UNetMidBlock2DCrossAttn") {
            return bad(format!("mid block type {:?} is not supported", self.mid_block_type));
        }
        let unsupported = [
            (self.act_fn != "silu", "act_fn other than silu"),
            (self.resnet_time_scale_shift != "default", "resnet_time_scale_shift other than default"),
            (self.time_embedding_type != "positional", "time_embedding_type other than positional"),
            (self.time_embedding_act_fn.is_some(), "time_embedding_act_fn"),
            (self.timestep_post_act.is_some(), "timestep_post_act"),
            (self.time_cond_proj_dim.is_some(), "time_cond_proj_dim"),
            (self.class_embed_type.is_some() || self.num_class_embeds.is_some(), "class embeddings"),
            (self.addition_embed_type.is_some(), "addition embeddings"),
            (self.encoder_hid_dim.is_some(), "encoder_hid_dim"),
            (self.center_input_sample, "center_input_sample"),
            (self.resnet_skip_time_act, "resnet_skip_time_act"),
            (self.cross_attention_norm.is_some(), "cross_attention_norm"),
            (self.attention_type != "default", "attention_type other than default"),
            (self.dual_cross_attention, "dual_cross_attention"),
            (
                self.only_cross_attention.as_bool() != Some(false) && !self.only_cross_attention.is_null(),
                "only_cross_attention",
            ),
            (self.mid_block_only_cross_attention == Some(true), "mid_block_only_cross_attention"),
            (
                self.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null()),
                "reverse_transformer_layers_per_block",
            ),
            (
                self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2),
                "even conv kernels",
            ),
            (self.downsample_padding != 1, "downsample_padding other than 1"),
        ];
        for (is_set, what) in unsupported {
            if is_set {
                return bad(format!("{what} is not supported (not an SD2-family UNet)"));
            }
        }
        let heads = self.heads_per_block()?;
        self.transformer_layers()?;
        for (i, (&c, &h)) in self.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || !c.is_multiple_of(h) {
                return bad(format!("block {i}: {c} channels do not split into {h} attention heads"));
            }
            if self.norm_num_groups == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return bad(format!(
                    "block {i}: {c} channels do not split into {} groups",
                    self.norm_num_groups
                ));
            }
        }
        Ok(())
    }
}
