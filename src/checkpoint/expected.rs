//! The tensors (names and shapes) an SD2 component must hold, derived from its
//! `config.json` exactly as diffusers / transformers build the modules: CLIPTextModel,
//! UNet2DConditionModel (SD2 block types) and AutoencoderKL. `convert` checks a checkpoint
//! against this before writing anything, so a missing tensor or a wrong shape is one clear
//! error instead of a broken output.

use super::ComponentStore;
use crate::error::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// `(name, shape)` in current (transformers 5 / diffusers 0.42) spelling.
pub type Expected = Vec<(String, Vec<usize>)>;

fn get_usize(cfg: &Value, key: &str, file: &str) -> Result<usize> {
    cfg.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| Error::Checkpoint(format!("{file}: missing or invalid \"{key}\"")))
}

fn get_list(cfg: &Value, key: &str, file: &str) -> Result<Vec<Value>> {
    cfg.get(key)
        .and_then(Value::as_array)
        .cloned()
        .ok_or_else(|| Error::Checkpoint(format!("{file}: missing or invalid \"{key}\"")))
}

fn usize_list(cfg: &Value, key: &str, file: &str) -> Result<Vec<usize>> {
    get_list(cfg, key, file)?
        .iter()
        .map(|v| v.as_u64().map(|x| x as usize))
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| Error::Checkpoint(format!("{file}: \"{key}\" must be a list of integers")))
}

struct Out(Expected);

impl Out {
    fn t(&mut self, name: String, shape: &[usize]) {
        self.0.push((name, shape.to_vec()));
    }
    fn wb(&mut self, prefix: &str, w: &[usize], b: usize) {
        self.t(format!("{prefix}.weight"), w);
        self.t(format!("{prefix}.bias"), &[b]);
    }
    fn norm(&mut self, prefix: &str, c: usize) {
        self.wb(prefix, &[c], c);
    }
    fn linear(&mut self, prefix: &str, out: usize, inp: usize, bias: bool) {
        if bias {
            self.wb(prefix, &[out, inp], out);
        } else {
            self.t(format!("{prefix}.weight"), &[out, inp]);
        }
    }
    fn conv(&mut self, prefix: &str, out: usize, inp: usize, k: usize) {
        self.wb(prefix, &[out, inp, k, k], out);
    }
    /// A diffusers ResnetBlock2D (`temb`: time-embedding width, if any).
    fn resnet(&mut self, p: &str, inp: usize, out: usize, temb: Option<usize>) {
        self.norm(&format!("{p}.norm1"), inp);
        self.conv(&format!("{p}.conv1"), out, inp, 3);
        if let Some(t) = temb {
            self.linear(&format!("{p}.time_emb_proj"), out, t, true);
        }
        self.norm(&format!("{p}.norm2"), out);
        self.conv(&format!("{p}.conv2"), out, out, 3);
        if inp != out {
            self.conv(&format!("{p}.conv_shortcut"), out, inp, 1);
        }
    }
    /// A Transformer2DModel with one BasicTransformerBlock (inner dim = channels, as SD2).
    fn transformer(&mut self, p: &str, c: usize, cross: usize, linear_proj: bool) {
        self.norm(&format!("{p}.norm"), c);
        let proj = |s: &mut Self, name: &str| {
            if linear_proj {
                s.linear(&format!("{p}.{name}"), c, c, true)
            } else {
                s.conv(&format!("{p}.{name}"), c, c, 1)
            }
        };
        proj(self, "proj_in");
        let b = format!("{p}.transformer_blocks.0");
        for (attn, kv) in [("attn1", c), ("attn2", cross)] {
            self.linear(&format!("{b}.{attn}.to_q"), c, c, false);
            self.linear(&format!("{b}.{attn}.to_k"), c, kv, false);
            self.linear(&format!("{b}.{attn}.to_v"), c, kv, false);
            self.linear(&format!("{b}.{attn}.to_out.0"), c, c, true);
        }
        for n in ["norm1", "norm2", "norm3"] {
            self.norm(&format!("{b}.{n}"), c);
        }
        self.linear(&format!("{b}.ff.net.0.proj"), 8 * c, c, true);
        self.linear(&format!("{b}.ff.net.2"), c, 4 * c, true);
        proj(self, "proj_out");
    }
    /// The VAE's single-head mid-block attention.
    fn vae_attention(&mut self, p: &str, c: usize) {
        self.norm(&format!("{p}.group_norm"), c);
        for n in ["to_q", "to_k", "to_v", "to_out.0"] {
            self.linear(&format!("{p}.{n}"), c, c, true);
        }
    }
}

/// The tensors of a CLIPTextModel.
pub fn clip_text(cfg: &Value, file: &str) -> Result<Expected> {
    let h = get_usize(cfg, "hidden_size", file)?;
    let inter = get_usize(cfg, "intermediate_size", file)?;
    let layers = get_usize(cfg, "num_hidden_layers", file)?;
    let mut o = Out(Vec::new());
    o.t("embeddings.token_embedding.weight".into(), &[get_usize(cfg, "vocab_size", file)?, h]);
    o.t(
        "embeddings.position_embedding.weight".into(),
        &[get_usize(cfg, "max_position_embeddings", file)?, h],
    );
    for l in 0..layers {
        let p = format!("encoder.layers.{l}");
        for n in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            o.linear(&format!("{p}.self_attn.{n}"), h, h, true);
        }
        o.norm(&format!("{p}.layer_norm1"), h);
        o.linear(&format!("{p}.mlp.fc1"), inter, h, true);
        o.linear(&format!("{p}.mlp.fc2"), h, inter, true);
        o.norm(&format!("{p}.layer_norm2"), h);
    }
    o.norm("final_layer_norm", h);
    Ok(o.0)
}

/// The tensors of an SD2-style UNet2DConditionModel.
pub fn unet(cfg: &Value, file: &str) -> Result<Expected> {
    let boc = usize_list(cfg, "block_out_channels", file)?;
    let lpb = get_usize(cfg, "layers_per_block", file)?;
    let cross = get_usize(cfg, "cross_attention_dim", file)?;
    let in_ch = get_usize(cfg, "in_channels", file)?;
    let out_ch = get_usize(cfg, "out_channels", file)?;
    let linear_proj = cfg.get("use_linear_projection").and_then(Value::as_bool).unwrap_or(false);
    let down = get_list(cfg, "down_block_types", file)?;
    let up = get_list(cfg, "up_block_types", file)?;
    if boc.is_empty() || down.len() != boc.len() || up.len() != boc.len() {
        return Err(Error::Checkpoint(format!("{file}: block lists of different lengths")));
    }
    let is_cross = |v: &Value| v.as_str().is_some_and(|s| s.starts_with("CrossAttn"));
    let ted = boc[0] * 4;
    let n = boc.len();
    let mut o = Out(Vec::new());
    o.conv("conv_in", boc[0], in_ch, 3);
    o.linear("time_embedding.linear_1", ted, boc[0], true);
    o.linear("time_embedding.linear_2", ted, ted, true);
    let mut prev = boc[0];
    for (i, ty) in down.iter().enumerate() {
        let out = boc[i];
        for j in 0..lpb {
            let inp = if j == 0 { prev } else { out };
            o.resnet(&format!("down_blocks.{i}.resnets.{j}"), inp, out, Some(ted));
            if is_cross(ty) {
                o.transformer(&format!("down_blocks.{i}.attentions.{j}"), out, cross, linear_proj);
            }
        }
        if i + 1 < n {
            o.conv(&format!("down_blocks.{i}.downsamplers.0.conv"), out, out, 3);
        }
        prev = out;
    }
    let c = boc[n - 1];
    o.resnet("mid_block.resnets.0", c, c, Some(ted));
    o.transformer("mid_block.attentions.0", c, cross, linear_proj);
    o.resnet("mid_block.resnets.1", c, c, Some(ted));
    let rev: Vec<usize> = boc.iter().rev().copied().collect();
    let mut prev_out = rev[0];
    for (i, ty) in up.iter().enumerate() {
        let out = rev[i];
        let inp = rev[(i + 1).min(n - 1)];
        for j in 0..=lpb {
            let skip = if j == lpb { inp } else { out };
            let res_in = if j == 0 { prev_out } else { out };
            o.resnet(&format!("up_blocks.{i}.resnets.{j}"), res_in + skip, out, Some(ted));
            if is_cross(ty) {
                o.transformer(&format!("up_blocks.{i}.attentions.{j}"), out, cross, linear_proj);
            }
        }
        if i + 1 < n {
            o.conv(&format!("up_blocks.{i}.upsamplers.0.conv"), out, out, 3);
        }
        prev_out = out;
    }
    o.norm("conv_norm_out", boc[0]);
    o.conv("conv_out", out_ch, boc[0], 3);
    Ok(o.0)
}

/// The tensors of an AutoencoderKL.
pub fn vae(cfg: &Value, file: &str) -> Result<Expected> {
    let boc = usize_list(cfg, "block_out_channels", file)?;
    let lpb = get_usize(cfg, "layers_per_block", file)?;
    let in_ch = get_usize(cfg, "in_channels", file)?;
    let out_ch = get_usize(cfg, "out_channels", file)?;
    let lat = get_usize(cfg, "latent_channels", file)?;
    let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(true);
    if boc.is_empty() {
        return Err(Error::Checkpoint(format!("{file}: empty block_out_channels")));
    }
    let n = boc.len();
    let last = boc[n - 1];
    let mut o = Out(Vec::new());
    o.conv("encoder.conv_in", boc[0], in_ch, 3);
    let mut prev = boc[0];
    for (i, &out) in boc.iter().enumerate() {
        for j in 0..lpb {
            o.resnet(
                &format!("encoder.down_blocks.{i}.resnets.{j}"),
                if j == 0 { prev } else { out },
                out,
                None,
            );
        }
        if i + 1 < n {
            o.conv(&format!("encoder.down_blocks.{i}.downsamplers.0.conv"), out, out, 3);
        }
        prev = out;
    }
    for side in ["encoder", "decoder"] {
        o.resnet(&format!("{side}.mid_block.resnets.0"), last, last, None);
        if flag("mid_block_add_attention") {
            o.vae_attention(&format!("{side}.mid_block.attentions.0"), last);
        }
        o.resnet(&format!("{side}.mid_block.resnets.1"), last, last, None);
    }
    o.norm("encoder.conv_norm_out", last);
    o.conv("encoder.conv_out", 2 * lat, last, 3);
    if flag("use_quant_conv") {
        o.conv("quant_conv", 2 * lat, 2 * lat, 1);
    }
    if flag("use_post_quant_conv") {
        o.conv("post_quant_conv", lat, lat, 1);
    }
    o.conv("decoder.conv_in", last, lat, 3);
    let mut prev = last;
    for (i, &out) in boc.iter().rev().enumerate() {
        for j in 0..=lpb {
            o.resnet(
                &format!("decoder.up_blocks.{i}.resnets.{j}"),
                if j == 0 { prev } else { out },
                out,
                None,
            );
        }
        if i + 1 < n {
            o.conv(&format!("decoder.up_blocks.{i}.upsamplers.0.conv"), out, out, 3);
        }
        prev = out;
    }
    o.norm("decoder.conv_norm_out", boc[0]);
    o.conv("decoder.conv_out", out_ch, boc[0], 3);
    Ok(o.0)
}

/// The expected tensors of the component in `dir` from its `config.json`, or `None` for a
/// component this crate does not model (its tensors are then taken as they are).
pub fn expected_for_dir(dir: &Path, component: &str) -> Result<Option<Expected>> {
    if !matches!(component, "text_encoder" | "unet" | "vae") {
        return Ok(None);
    }
    let path = dir.join("config.json");
    let file = path.display().to_string();
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let cfg: Value =
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint(format!("{file}: invalid JSON ({e})")))?;
    Ok(Some(match component {
        "text_encoder" => clip_text(&cfg, &file)?,
        "unet" => unet(&cfg, &file)?,
        _ => vae(&cfg, &file)?,
    }))
}

/// Checks that a (dense) component holds every tensor its config implies, with the right
/// shape and a float dtype sdsparse reads (f64, f32, f16, bf16; legacy spellings accepted).
/// Extra tensors are allowed.
pub fn validate_component(store: &ComponentStore, component: &str) -> Result<()> {
    if store.is_mapped() {
        return Ok(()); // a single file's tensors were checked against its configs when opened
    }
    let Some(expected) = expected_for_dir(&store.dir, component)? else { return Ok(()) };
    for (name, shape) in expected {
        let stored = store.resolve(&name).ok_or_else(|| {
            Error::Checkpoint(format!(
                "{}: tensor {name} is missing (config.json implies it)",
                store.describe()
            ))
        })?;
        let raw = store.raw(&stored)?;
        if raw.load_dtype().is_none() {
            let why = if raw.is_float() {
                super::unsupported_dtype(&stored, raw.dtype)
            } else {
                format!("tensor {stored} has dtype {:?}; a weight must be floating point", raw.dtype)
            };
            return Err(Error::Checkpoint(format!("{}: {why}", store.describe())));
        }
        if raw.shape != shape.as_slice() {
            return Err(Error::Shape(format!(
                "{}: tensor {stored} has shape {:?}, config.json implies {:?}",
                store.describe(),
                raw.shape,
                shape
            )));
        }
    }
    Ok(())
}
