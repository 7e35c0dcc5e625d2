//! Single-file SD2 checkpoints in the original (Stability / LDM) layout:
//! `model.diffusion_model.*` (UNet), `first_stage_model.*` (VAE) and
//! `cond_stage_model.model.*` (OpenCLIP text encoder with fused `in_proj` attention), as
//! `.safetensors` or as a PyTorch `.ckpt` / `.pt` (read by [`super::pickle`], which never
//! runs pickled code).
//!
//! Opening one infers the configuration (SD2 or not, 512-base or 768-v, EMA or not; rules
//! in `docs/SINGLE_FILE.md`), maps every tensor to its diffusers name exactly as diffusers'
//! `from_single_file` does (`loaders/single_file_utils.py`), checks names and shapes against
//! the configs, and exposes each component as a [`ComponentStore`] whose tensors are byte
//! ranges of the mapped file: nothing is copied (a q/k/v third of `in_proj_weight` is a
//! contiguous range). The same name map, run the other way, writes single files
//! (`export --format single-file`).

use super::expected;
use super::pickle::{self, TensorRef, Value};
use super::store::{Backing, MappedTensor};
use super::ComponentStore;
use crate::error::{Error, Result};
use memmap2::Mmap;
use safetensors::Dtype as StDtype;
use serde_json::Value as Json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Prefixes of the original layout.
pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
/// SD1-style (transformers CLIP) text encoder prefix; accepted for SD2-family files whose
/// text encoder was written in this layout.
pub const HF_CLIP_PREFIX: &str = "cond_stage_model.transformer.";

/// diffusers counts a checkpoint as holding EMA weights when more than this many tensors
/// start with `model_ema.`.
const EMA_MIN_TENSORS: usize = 100;

/// What the user may tell about a single file (all optional).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SingleFileOptions {
    /// A diffusers folder (its `unet/`, `vae/`, `text_encoder/` `config.json`, optional
    /// `scheduler/` and `tokenizer/`) or an original `v2-inference*.yaml`.
    pub config: Option<PathBuf>,
    /// `epsilon` or `v_prediction`: overrides the inferred 512-base / 768-v choice.
    pub prediction_type: Option<String>,
    /// Overrides the UNet config's `upcast_attention`.
    pub upcast_attention: Option<bool>,
    /// Use the training weights even when EMA weights (`model_ema.*`) are present.
    pub no_ema: bool,
}

impl SingleFileOptions {
    /// Whether any option was given (they apply to single files only).
    pub fn is_default(&self) -> bool {
        *self == SingleFileOptions::default()
    }
}

/// The two SD2.x variants whose configs are bundled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sd2Variant {
    /// SD2.x-base: 512x512, epsilon prediction.
    Base512,
    /// SD2.x: 768x768, v-prediction, upcast attention.
    V768,
}

impl Sd2Variant {
    pub fn name(self) -> &'static str {
        match self {
            Sd2Variant::Base512 => "512-base (epsilon)",
            Sd2Variant::V768 => "768-v (v_prediction, upcast attention)",
        }
    }
    /// The bundled SD2.1 config files of this variant (relative path, text).
    pub fn configs(self) -> &'static [(&'static str, &'static str); 5] {
        match self {
            Sd2Variant::Base512 => &crate::synth::embedded::SD21_BASE_CONFIGS,
            Sd2Variant::V768 => &crate::synth::embedded::SD21_CONFIGS,
        }
    }
}

/// Which layout the text encoder is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextLayout {
    /// `cond_stage_model.model.*`: OpenCLIP, fused `in_proj` (SD2).
    OpenClip,
    /// `cond_stage_model.transformer.text_model.*`: transformers' CLIP names.
    HfClip,
}

/// The facts the name map needs beyond a tensor's own name.
#[derive(Debug, Clone)]
pub struct NameMap {
    /// UNet `layers_per_block`.
    pub unet_layers_per_block: usize,
    /// Per UNet up block: whether it has attentions (its upsampler is then `.2`, else `.1`).
    pub unet_up_attention: Vec<bool>,
    /// VAE levels.
    pub vae_levels: usize,
    /// `decoder.up.{levels - 1 - i + offset}`: 0 normally; diffusers' conversion script
    /// numbers the decoder levels as if there were 4, so a 2-level VAE it wrote has
    /// offset 2.
    pub vae_up_offset: usize,
    pub text: TextLayout,
}

/// Where a diffusers tensor lives in the original layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Original {
    /// Candidate names, the canonical one first.
    pub names: Vec<String>,
    /// `Some(i)`: the i-th third (q, k, v) of a fused `in_proj` tensor.
    pub third: Option<usize>,
}

fn index_prefix(s: &str) -> Option<(usize, &str)> {
    let (n, rest) = s.split_once('.')?;
    Some((n.parse().ok()?, rest))
}

/// A UNet resnet's diffusers sub-name → original.
fn unet_resnet(rest: &str) -> String {
    for (d, o) in [
        ("norm1.", "in_layers.0."),
        ("conv1.", "in_layers.2."),
        ("norm2.", "out_layers.0."),
        ("conv2.", "out_layers.3."),
        ("time_emb_proj.", "emb_layers.1."),
        ("conv_shortcut.", "skip_connection."),
    ] {
        if let Some(x) = rest.strip_prefix(d) {
            return format!("{o}{x}");
        }
    }
    rest.to_string()
}

fn vae_resnet(rest: &str) -> String {
    match rest.strip_prefix("conv_shortcut.") {
        Some(x) => format!("nin_shortcut.{x}"),
        None => rest.to_string(),
    }
}

/// The VAE mid-block attention's diffusers sub-name → original.
fn vae_attention(rest: &str) -> Option<String> {
    for (d, o) in [
        ("group_norm.", "norm."),
        ("to_q.", "q."),
        ("to_k.", "k."),
        ("to_v.", "v."),
        ("to_out.0.", "proj_out."),
    ] {
        if let Some(x) = rest.strip_prefix(d) {
            return Some(format!("{o}{x}"));
        }
    }
    None
}

impl NameMap {
    /// From the UNet and VAE configs and the text-encoder layout.
    pub fn new(unet_cfg: &Json, vae_cfg: &Json, text: TextLayout, vae_up_offset: usize) -> Result<Self> {
        let lpb = unet_cfg.get("layers_per_block").and_then(Json::as_u64).unwrap_or(2) as usize;
        let up = unet_cfg
            .get("up_block_types")
            .and_then(Json::as_array)
            .ok_or_else(|| Error::Checkpoint("unet config: missing up_block_types".into()))?;
        let unet_up_attention =
            up.iter().map(|t| t.as_str().is_some_and(|s| s.starts_with("CrossAttn"))).collect();
        let vae_levels = vae_cfg
            .get("block_out_channels")
            .and_then(Json::as_array)
            .map(|a| a.len())
            .ok_or_else(|| Error::Checkpoint("vae config: missing block_out_channels".into()))?;
        Ok(NameMap { unet_layers_per_block: lpb, unet_up_attention, vae_levels, vae_up_offset, text })
    }

    /// The original location of a diffusers tensor of `component`, or `None` for a name
    /// outside the SD2 layout.
    pub fn original(&self, component: &str, name: &str) -> Option<Original> {
        match component {
            "unet" => self.unet(name).map(|names| Original { names, third: None }),
            "vae" => self.vae(name).map(|names| Original { names, third: None }),
            "text_encoder" => match self.text {
                // transformers < 5 saved `text_model.*`; 5 saves the names without it.
                TextLayout::HfClip => Some(Original {
                    names: vec![
                        format!("{HF_CLIP_PREFIX}text_model.{name}"),
                        format!("{HF_CLIP_PREFIX}{name}"),
                    ],
                    third: None,
                }),
                TextLayout::OpenClip => self.open_clip(name),
            },
            _ => None,
        }
    }

    fn unet(&self, name: &str) -> Option<Vec<String>> {
        let p = UNET_PREFIX;
        let l = self.unet_layers_per_block + 1;
        let fixed = [
            ("conv_in.", "input_blocks.0.0."),
            ("time_embedding.linear_1.", "time_embed.0."),
            ("time_embedding.linear_2.", "time_embed.2."),
            ("conv_norm_out.", "out.0."),
            ("conv_out.", "out.2."),
        ];
        for (d, o) in fixed {
            if let Some(x) = name.strip_prefix(d) {
                return Some(vec![format!("{p}{o}{x}")]);
            }
        }
        if let Some(s) = name.strip_prefix("down_blocks.") {
            let (i, rest) = index_prefix(s)?;
            if let Some(s) = rest.strip_prefix("resnets.") {
                let (j, r) = index_prefix(s)?;
                return Some(vec![format!("{p}input_blocks.{}.0.{}", i * l + j + 1, unet_resnet(r))]);
            }
            if let Some(s) = rest.strip_prefix("attentions.") {
                let (j, r) = index_prefix(s)?;
                return Some(vec![format!("{p}input_blocks.{}.1.{r}", i * l + j + 1)]);
            }
            let x = rest.strip_prefix("downsamplers.0.conv.")?;
            return Some(vec![format!("{p}input_blocks.{}.0.op.{x}", (i + 1) * l)]);
        }
        if let Some(s) = name.strip_prefix("mid_block.") {
            if let Some(s) = s.strip_prefix("resnets.") {
                let (k, r) = index_prefix(s)?;
                return Some(vec![format!("{p}middle_block.{}.{}", 2 * k, unet_resnet(r))]);
            }
            let r = s.strip_prefix("attentions.0.")?;
            return Some(vec![format!("{p}middle_block.1.{r}")]);
        }
        if let Some(s) = name.strip_prefix("up_blocks.") {
            let (i, rest) = index_prefix(s)?;
            if let Some(s) = rest.strip_prefix("resnets.") {
                let (j, r) = index_prefix(s)?;
                return Some(vec![format!("{p}output_blocks.{}.0.{}", i * l + j, unet_resnet(r))]);
            }
            if let Some(s) = rest.strip_prefix("attentions.") {
                let (j, r) = index_prefix(s)?;
                return Some(vec![format!("{p}output_blocks.{}.1.{r}", i * l + j)]);
            }
            let x = rest.strip_prefix("upsamplers.0.conv.")?;
            let b = i * l + self.unet_layers_per_block;
            // After the resnet (.0) and, in an attention block, the attention (.1).
            let (first, second) =
                if self.unet_up_attention.get(i).copied().unwrap_or(true) { (2, 1) } else { (1, 2) };
            return Some(vec![
                format!("{p}output_blocks.{b}.{first}.conv.{x}"),
                format!("{p}output_blocks.{b}.{second}.conv.{x}"),
            ]);
        }
        None
    }

    fn vae(&self, name: &str) -> Option<Vec<String>> {
        let p = VAE_PREFIX;
        for side in ["encoder", "decoder"] {
            let Some(s) = name.strip_prefix(side).and_then(|s| s.strip_prefix('.')) else { continue };
            if s.starts_with("conv_in.") || s.starts_with("conv_out.") {
                return Some(vec![format!("{p}{name}")]);
            }
            if let Some(x) = s.strip_prefix("conv_norm_out.") {
                return Some(vec![format!("{p}{side}.norm_out.{x}")]);
            }
            if let Some(s) = s.strip_prefix("mid_block.") {
                if let Some(s) = s.strip_prefix("resnets.") {
                    let (k, r) = index_prefix(s)?;
                    return Some(vec![format!("{p}{side}.mid.block_{}.{}", k + 1, vae_resnet(r))]);
                }
                let r = vae_attention(s.strip_prefix("attentions.0.")?)?;
                return Some(vec![format!("{p}{side}.mid.attn_1.{r}")]);
            }
            if side == "encoder" {
                let s = s.strip_prefix("down_blocks.")?;
                let (i, rest) = index_prefix(s)?;
                if let Some(s) = rest.strip_prefix("resnets.") {
                    let (j, r) = index_prefix(s)?;
                    return Some(vec![format!("{p}encoder.down.{i}.block.{j}.{}", vae_resnet(r))]);
                }
                let x = rest.strip_prefix("downsamplers.0.conv.")?;
                return Some(vec![format!("{p}encoder.down.{i}.downsample.conv.{x}")]);
            }
            let s = s.strip_prefix("up_blocks.")?;
            let (i, rest) = index_prefix(s)?;
            let level = (self.vae_levels.checked_sub(1 + i)?) + self.vae_up_offset;
            if let Some(s) = rest.strip_prefix("resnets.") {
                let (j, r) = index_prefix(s)?;
                return Some(vec![format!("{p}decoder.up.{level}.block.{j}.{}", vae_resnet(r))]);
            }
            let x = rest.strip_prefix("upsamplers.0.conv.")?;
            return Some(vec![format!("{p}decoder.up.{level}.upsample.conv.{x}")]);
        }
        if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
            return Some(vec![format!("{p}{name}")]);
        }
        None
    }

    /// OpenCLIP names; the alternates are what diffusers' conversion script writes for a text
    /// encoder saved by transformers 5 (no `text_model.` prefix, so its renames miss:
    /// `transformer.encoder.layers.N.attn.in_proj_weight`, `transformer.embeddings.*`,
    /// `transformer.final_layer_norm.*`).
    fn open_clip(&self, name: &str) -> Option<Original> {
        let p = OPEN_CLIP_PREFIX;
        let some = |names: Vec<String>| Some(Original { names, third: None });
        match name {
            "embeddings.token_embedding.weight" => {
                return some(vec![
                    format!("{p}token_embedding.weight"),
                    format!("{p}transformer.embeddings.token_embedding.weight"),
                ])
            }
            "embeddings.position_embedding.weight" => {
                return some(vec![
                    format!("{p}positional_embedding"),
                    format!("{p}transformer.embeddings.position_embedding.weight"),
                ])
            }
            _ => {}
        }
        if let Some(x) = name.strip_prefix("final_layer_norm.") {
            return some(vec![format!("{p}ln_final.{x}"), format!("{p}transformer.final_layer_norm.{x}")]);
        }
        let (l, rest) = index_prefix(name.strip_prefix("encoder.layers.")?)?;
        let blocks = [format!("{p}transformer.resblocks.{l}"), format!("{p}transformer.encoder.layers.{l}")];
        let names = |sub: String| blocks.iter().map(|b| format!("{b}.{sub}")).collect::<Vec<_>>();
        if let Some(s) = rest.strip_prefix("self_attn.") {
            for (i, q) in ["q_proj.", "k_proj.", "v_proj."].iter().enumerate() {
                if let Some(x) = s.strip_prefix(q) {
                    return Some(Original { names: names(format!("attn.in_proj_{x}")), third: Some(i) });
                }
            }
            let x = s.strip_prefix("out_proj.")?;
            return some(names(format!("attn.out_proj.{x}")));
        }
        for (d, o) in [
            ("layer_norm1.", "ln_1."),
            ("layer_norm2.", "ln_2."),
            ("mlp.fc1.", "mlp.c_fc."),
            ("mlp.fc2.", "mlp.c_proj."),
        ] {
            if let Some(x) = rest.strip_prefix(d) {
                return some(names(format!("{o}{x}")));
            }
        }
        None
    }
}

/// A stored shape that holds the tensor the model expects: equal, or with trailing 1s
/// (the VAE attention's `[c, c, 1, 1]` conv weights are diffusers' `[c, c]` Linear weights).
fn compatible(stored: &[usize], expected: &[usize]) -> bool {
    stored.len() >= expected.len()
        && stored[..expected.len()] == *expected
        && stored[expected.len()..].iter().all(|&d| d == 1)
}

/// The tensors of the file under their original names, and what else the file says.
struct FileTensors {
    tensors: HashMap<String, MappedTensor>,
    format: &'static str,
    global_step: Option<i64>,
}

fn map_file(path: &Path) -> Result<Arc<Backing>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: read-only map of a file we never write; see SafetensorsFile::open.
    let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(Arc::new(Backing::Mmap(mmap)))
}

fn read_safetensors(path: &Path, backing: Arc<Backing>) -> Result<FileTensors> {
    let bytes = backing.bytes();
    let (n, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::Checkpoint(format!("{}: not a valid safetensors file ({e})", path.display())))?;
    let start = 8 + n;
    let mut tensors = HashMap::new();
    for (name, info) in meta.tensors() {
        let (a, b) = info.data_offsets;
        tensors.insert(
            name.clone(),
            MappedTensor {
                dtype: info.dtype,
                shape: info.shape.clone(),
                backing: backing.clone(),
                range: start + a..start + b,
                original: name.clone(),
            },
        );
    }
    Ok(FileTensors { tensors, format: "safetensors", global_step: None })
}

/// dtype and element size of a torch storage class.
fn storage_dtype(class: &str) -> Option<(StDtype, usize)> {
    Some(match class {
        "FloatStorage" => (StDtype::F32, 4),
        "HalfStorage" => (StDtype::F16, 2),
        "BFloat16Storage" => (StDtype::BF16, 2),
        "DoubleStorage" => (StDtype::F64, 8),
        "LongStorage" => (StDtype::I64, 8),
        "IntStorage" => (StDtype::I32, 4),
        "ShortStorage" => (StDtype::I16, 2),
        "CharStorage" => (StDtype::I8, 1),
        "ByteStorage" => (StDtype::U8, 1),
        "BoolStorage" => (StDtype::BOOL, 1),
        _ => return None,
    })
}

fn read_torch_zip(path: &Path, backing: Arc<Backing>) -> Result<FileTensors> {
    let ctx = |what: String| Error::Checkpoint(format!("{}: {what}", path.display()));
    let bytes = backing.bytes();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes))
        .map_err(|e| ctx(format!("not a valid PyTorch zip checkpoint ({e})")))?;
    let names: Vec<String> = zip.file_names().filter_map(|n| n.ok().map(|n| n.to_string())).collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl") && n.matches('/').count() <= 1)
        .ok_or_else(|| ctx("a zip without data.pkl: not a PyTorch checkpoint".into()))?
        .clone();
    let root = pkl.strip_suffix("data.pkl").unwrap_or("").to_string();
    if let Ok(mut f) = zip.by_name(&format!("{root}byteorder")) {
        let mut s = String::new();
        use std::io::Read;
        let _ = f.read_to_string(&mut s);
        if s.trim() == "big" {
            return Err(ctx("a big-endian PyTorch checkpoint is not supported".into()));
        }
    }
    let data = read_entry(&mut zip, &pkl, 1 << 30).map_err(ctx)?;
    let value = pickle::load(&data).map_err(|e| ctx(e.to_string()))?;
    let global_step = match value.get("global_step") {
        Some(Value::Int(g)) => Some(*g),
        _ => None,
    };
    let mut sd = &value;
    while let Some(inner) = sd.get("state_dict") {
        sd = inner;
    }
    let Value::Dict(items) = sd else {
        return Err(ctx("the pickle holds no state dict".into()));
    };
    // Storage key → (backing, byte range of the storage).
    let mut storages: HashMap<String, (Arc<Backing>, std::ops::Range<usize>)> = HashMap::new();
    let mut tensors = HashMap::new();
    for (k, v) in items {
        let (Value::Str(name), Value::Tensor(t)) = (k, v) else { continue };
        let (dtype, es) = storage_dtype(&t.storage.class)
            .ok_or_else(|| ctx(format!("tensor {name}: unsupported storage type {}", t.storage.class)))?;
        if !storages.contains_key(&t.storage.key) {
            let entry = format!("{root}data/{}", t.storage.key);
            let need = (t.storage.numel as usize)
                .checked_mul(es)
                .ok_or_else(|| ctx(format!("tensor {name}: storage size overflows")))?;
            let s = storage_bytes(&mut zip, &backing, &entry, need)
                .map_err(|e| ctx(format!("tensor {name}: {e}")))?;
            storages.insert(t.storage.key.clone(), s);
        }
        let (sb, srange) = &storages[&t.storage.key];
        let m = tensor_view(t, es, sb, srange.clone()).map_err(|e| ctx(format!("tensor {name}: {e}")))?;
        tensors.insert(name.clone(), MappedTensor { dtype, original: name.clone(), ..m });
    }
    Ok(FileTensors { tensors, format: "PyTorch zip", global_step })
}

type Zip<'a> = zip::ZipArchive<std::io::Cursor<&'a [u8]>>;

/// An entry's bytes, read fully (at most `limit` bytes).
fn read_entry(zip: &mut Zip<'_>, name: &str, limit: u64) -> std::result::Result<Vec<u8>, String> {
    use std::io::Read;
    let f = zip.by_name(name).map_err(|e| format!("{name}: {e}"))?;
    if f.size() > limit {
        return Err(format!("{name} is implausibly large ({} bytes)", f.size()));
    }
    // The declared size is only a hint: a hostile zip may claim anything.
    let mut out = Vec::with_capacity(f.size().min(64 << 20) as usize);
    f.take(limit).read_to_end(&mut out).map_err(|e| format!("{name}: {e}"))?;
    Ok(out)
}

/// A storage's bytes: a range of the file map when stored uncompressed (as torch.save
/// writes them), else decompressed into memory. At least `need` bytes.
fn storage_bytes(
    zip: &mut Zip<'_>,
    backing: &Arc<Backing>,
    entry: &str,
    need: usize,
) -> std::result::Result<(Arc<Backing>, std::ops::Range<usize>), String> {
    let (stored, start, size) = {
        let f = zip.by_name(entry).map_err(|e| format!("storage {entry}: {e}"))?;
        (f.compression() == zip::CompressionMethod::Stored, f.data_start(), f.size())
    };
    if (size as usize) < need {
        return Err(format!("storage {entry} holds {size} bytes, {need} needed (truncated file?)"));
    }
    if let (true, Some(start)) = (stored, start) {
        let a = start as usize;
        let b = a.checked_add(need).ok_or("storage range overflows")?;
        if b > backing.bytes().len() {
            return Err(format!("storage {entry} extends past the end of the file (truncated file?)"));
        }
        return Ok((backing.clone(), a..b));
    }
    let v = read_entry(zip, entry, need as u64)?;
    if v.len() < need {
        return Err(format!("storage {entry} is truncated"));
    }
    Ok((Arc::new(Backing::Owned(v)), 0..need))
}

/// A strided view as a contiguous byte range (row-major views borrow the storage; others are
/// gathered into their own buffer).
fn tensor_view(
    t: &TensorRef,
    es: usize,
    sb: &Arc<Backing>,
    srange: std::ops::Range<usize>,
) -> std::result::Result<MappedTensor, String> {
    let shape: Vec<usize> = t.size.iter().map(|&d| d as usize).collect();
    let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("size overflows")?;
    let storage_len = srange.len() / es;
    let offset = t.offset as usize;
    let mk = |backing: Arc<Backing>, range| MappedTensor {
        dtype: StDtype::U8,
        shape: shape.clone(),
        backing,
        range,
        original: String::new(),
    };
    if numel == 0 {
        return Ok(mk(sb.clone(), srange.start..srange.start));
    }
    // The largest element index the view touches.
    let mut last = offset;
    for (&d, &s) in t.size.iter().zip(&t.stride) {
        last = (d as usize - 1)
            .checked_mul(s as usize)
            .and_then(|x| last.checked_add(x))
            .ok_or("stride overflows")?;
    }
    if last >= storage_len {
        return Err(format!("view reaches element {last} of a {storage_len}-element storage"));
    }
    let mut row_major = vec![1u64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        row_major[i] = row_major[i + 1] * t.size[i + 1];
    }
    let contiguous = t.size.iter().zip(&t.stride).zip(&row_major).all(|((&d, &s), &r)| d == 1 || s == r);
    if contiguous {
        let a = srange.start + offset * es;
        return Ok(mk(sb.clone(), a..a + numel * es));
    }
    let src = &sb.bytes()[srange];
    let mut out = Vec::with_capacity(numel * es);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..numel {
        let e = offset + idx.iter().zip(&t.stride).map(|(&i, &s)| i * s as usize).sum::<usize>();
        out.extend_from_slice(&src[e * es..(e + 1) * es]);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    let n = out.len();
    Ok(mk(Arc::new(Backing::Owned(out)), 0..n))
}

fn read_file_tensors(path: &Path) -> Result<FileTensors> {
    if !path.is_file() {
        return Err(Error::Checkpoint(format!("{}: file not found", path.display())));
    }
    let backing = map_file(path)?;
    let head = &backing.bytes()[..backing.bytes().len().min(16)];
    if head.starts_with(b"PK\x03\x04") || head.starts_with(b"PK\x05\x06") {
        return read_torch_zip(path, backing);
    }
    if head.first() == Some(&0x80) {
        // torch < 1.6 wrote a pickled magic number first; anything else is a bare pickle,
        // which is run through the restricted reader only to say what it would do.
        const LEGACY_MAGIC: [u8; 12] =
            [0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
        let what = if head.get(2..14) == Some(&LEGACY_MAGIC[..]) {
            "a legacy (torch < 1.6, not zip) PyTorch file; re-save it with a current torch.save or as .safetensors"
                .to_string()
        } else {
            match pickle::load(backing.bytes()) {
                Err(e) => e.to_string(),
                Ok(_) => "a bare pickle, not a PyTorch zip checkpoint (no tensor storages)".to_string(),
            }
        };
        return Err(Error::Checkpoint(format!("{}: {what}", path.display())));
    }
    read_safetensors(path, backing)
}

/// A single-file checkpoint, opened and mapped to diffusers components.
pub struct SingleFileModel {
    pub path: PathBuf,
    /// `safetensors` or `PyTorch zip`.
    pub format: &'static str,
    /// Config files by relative path, as a diffusers folder would hold them
    /// (`model_index.json`, `scheduler/scheduler_config.json`, `unet/config.json`, ...).
    pub configs: BTreeMap<String, String>,
    /// `tokenizer/` of a `--config` folder; `None`: the bundled SD2 tokenizer.
    pub tokenizer_dir: Option<PathBuf>,
    /// What was inferred and why, one line each (printed by `inspect`).
    pub notes: Vec<String>,
    /// Original names the model does not use (text projection, the 24th OpenCLIP block,
    /// EMA copies, ...).
    pub ignored: Vec<String>,
    pub name_map: NameMap,
    components: BTreeMap<String, HashMap<String, MappedTensor>>,
}

/// The components a single file provides.
pub const COMPONENTS: [&str; 3] = ["text_encoder", "unet", "vae"];

fn config_error(path: &Path, problem: &str) -> Error {
    Error::Checkpoint(format!(
        "{}: not a standard SD2.x architecture ({problem}); head counts and block layout cannot be read from \
         tensor shapes, so give the model's configs with --config PATH (a diffusers folder with unet/, vae/ and \
         text_encoder/ config.json, or the original v2-inference*.yaml)",
        path.display()
    ))
}

fn json(text: &str, what: &str) -> Result<Json> {
    serde_json::from_str(text).map_err(|e| Error::Checkpoint(format!("{what}: invalid JSON ({e})")))
}

/// The last dimension of the first cross-attention key projection: the text width the UNet
/// was trained with (768: SD1.x, 1024: SD2.x).
fn context_dim(t: &HashMap<String, MappedTensor>) -> Option<usize> {
    let mut keys: Vec<&String> =
        t.keys().filter(|k| k.starts_with(UNET_PREFIX) && k.ends_with("attn2.to_k.weight")).collect();
    keys.sort();
    keys.first().and_then(|k| t[*k].shape.last().copied())
}

/// Refuses files that are not SD2 text-to-image, naming what they are.
fn check_family(
    path: &Path,
    t: &HashMap<String, MappedTensor>,
    text: Option<TextLayout>,
    configured: bool,
) -> Result<()> {
    let p = path.display();
    if t.keys().any(|k| k.starts_with("conditioner.embedders.")) {
        return Err(Error::Checkpoint(format!(
            "{p}: an SDXL checkpoint (conditioner.embedders.*), not SD2; sdsparse runs SD2.x only"
        )));
    }
    if !t.keys().any(|k| k.starts_with(UNET_PREFIX)) {
        let hint = if t.contains_key("conv_in.weight")
            || t.contains_key("text_model.embeddings.token_embedding.weight")
        {
            " (it looks like one diffusers component; pass the whole diffusers folder instead)"
        } else {
            ""
        };
        return Err(Error::Checkpoint(format!(
            "{p}: not a Stable Diffusion single-file checkpoint: no model.diffusion_model.* tensors{hint}"
        )));
    }
    let ctx = context_dim(t);
    if text == Some(TextLayout::HfClip) && ctx == Some(768) && !configured {
        return Err(Error::Checkpoint(format!(
            "{p}: an SD1.x checkpoint (CLIP ViT-L text encoder, 768-wide cross-attention), not SD2; sdsparse runs SD2.x only"
        )));
    }
    if let Some(w) = t.get(&format!("{UNET_PREFIX}input_blocks.0.0.weight")) {
        if w.shape.len() == 4 && w.shape[1] != 4 {
            let what = match w.shape[1] {
                9 => "an inpainting model",
                5 => "a depth-conditioned model",
                7 => "an upscaler",
                _ => "not a text-to-image model",
            };
            return Err(Error::Checkpoint(format!(
                "{p}: the UNet takes {} input channels: {what}; sdsparse runs SD2 text-to-image models (4 latent channels)",
                w.shape[1]
            )));
        }
    }
    if text.is_none() {
        return Err(Error::Checkpoint(format!(
            "{p}: no text encoder (cond_stage_model.model.* or cond_stage_model.transformer.*) in the file"
        )));
    }
    Ok(())
}

/// 512-base or 768-v for an SD2 file without configs, and why (`docs/SINGLE_FILE.md`):
/// `--prediction-type` decides; else diffusers' rules: a checkpoint whose `global_step` is
/// 875000 (SD2-base's) is epsilon, every other SD2 file is taken as
/// `stabilityai/stable-diffusion-2-1` (768-v), the config `from_single_file` fetches.
pub fn choose_variant(prediction: Option<&str>, global_step: Option<i64>) -> (Sd2Variant, String) {
    match (prediction, global_step) {
        (Some("epsilon"), _) => (Sd2Variant::Base512, "512-base (epsilon) configs: --prediction-type epsilon".into()),
        (Some(_), _) => (Sd2Variant::V768, "768-v configs: --prediction-type v_prediction".into()),
        (None, Some(875000)) => (
            Sd2Variant::Base512,
            "512-base (epsilon) configs: global_step 875000 is SD2-base's (diffusers' rule)".into(),
        ),
        (None, _) => (
            Sd2Variant::V768,
            "768-v (v_prediction) configs assumed, as diffusers does for every SD2 file; a 512-base model needs \
             --prediction-type epsilon"
                .into(),
        ),
    }
}

/// Sets `key` in a JSON object text.
fn patch_json(text: &str, what: &str, key: &str, value: Json) -> Result<String> {
    let mut v = json(text, what)?;
    if let Some(o) = v.as_object_mut() {
        o.insert(key.to_string(), value);
    }
    serde_json::to_string_pretty(&v).map_err(|e| Error::Checkpoint(format!("{what}: {e}")))
}

fn normalize_prediction(p: &str) -> Result<&'static str> {
    match p {
        "epsilon" | "eps" => Ok("epsilon"),
        "v_prediction" | "v" | "v-prediction" => Ok("v_prediction"),
        _ => Err(Error::Invalid(format!("--prediction-type must be epsilon or v_prediction, got {p:?}"))),
    }
}

/// Configs from a `--config` diffusers folder; a file it lacks is taken from the bundled
/// SD2.1 configs of `variant_fallback` (named in `notes`; the shape check then tells whether
/// that fits).
fn configs_from_folder(
    dir: &Path,
    variant_fallback: Sd2Variant,
    notes: &mut Vec<String>,
) -> Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let bundled: BTreeMap<&str, &str> = variant_fallback.configs().iter().copied().collect();
    let mut fallback = Vec::new();
    for rel in [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
    ] {
        let p = dir.join(rel);
        if p.is_file() {
            out.insert(rel.to_string(), std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?);
        } else {
            out.insert(rel.to_string(), bundled[rel].to_string());
            if rel != "model_index.json" {
                fallback.push(rel);
            }
        }
    }
    if fallback.len() == 4 {
        return Err(Error::Checkpoint(format!(
            "--config {}: no unet/, vae/ or text_encoder/ config.json (a diffusers folder's configs are expected)",
            dir.display()
        )));
    }
    if !fallback.is_empty() {
        notes.push(format!(
            "not in --config, so the SD2.1 {} ones: {}",
            variant_fallback.name(),
            fallback.join(", ")
        ));
    }
    Ok(out)
}

impl SingleFileModel {
    /// Opens `path` (`.safetensors`, `.ckpt`, `.pt`), infers or reads the configuration and
    /// maps every tensor; errors are one line naming the file and what to do.
    pub fn open(path: &Path, opts: &SingleFileOptions) -> Result<Self> {
        let file = read_file_tensors(path)?;
        let t = &file.tensors;
        let text = if t.keys().any(|k| k.starts_with(OPEN_CLIP_PREFIX)) {
            Some(TextLayout::OpenClip)
        } else if t.keys().any(|k| k.starts_with(HF_CLIP_PREFIX)) {
            Some(TextLayout::HfClip)
        } else {
            None
        };
        let beside = path.with_extension("yaml");
        check_family(path, t, text, opts.config.is_some() || beside.is_file())?;
        let text = text.unwrap_or(TextLayout::OpenClip);
        let mut notes = vec![format!(
            "single-file checkpoint ({}), text encoder in {} layout",
            file.format,
            match text {
                TextLayout::OpenClip => "OpenCLIP (cond_stage_model.model.*)",
                TextLayout::HfClip => "transformers CLIP (cond_stage_model.transformer.*)",
            }
        )];

        // The variant: the flag, else diffusers' rule.
        let prediction = opts.prediction_type.as_deref().map(normalize_prediction).transpose()?;
        let (variant, variant_note) = choose_variant(prediction, file.global_step);
        let mut variant_notes = vec![variant_note];
        // A1111's convention: `model.yaml` beside `model.ckpt` gives its config.
        let config = match &opts.config {
            Some(c) => Some(c.clone()),
            None if beside.is_file() => {
                notes
                    .push(format!("{} beside the file used as its config (as A1111 does)", beside.display()));
                Some(beside)
            }
            None => None,
        };
        let (mut configs, tokenizer_dir, standard) = match &config {
            None => {
                notes.append(&mut variant_notes);
                (
                    variant
                        .configs()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<BTreeMap<_, _>>(),
                    None,
                    true,
                )
            }
            Some(c) if c.is_dir() => {
                let tok = c.join("tokenizer");
                notes.push(format!("configs from --config {}", c.display()));
                (configs_from_folder(c, variant, &mut notes)?, tok.is_dir().then_some(tok), false)
            }
            Some(c) if c.extension().is_some_and(|e| e == "yaml" || e == "yml") => {
                notes.push(format!("configs from --config {}", c.display()));
                (super::ldm_yaml::configs_from_yaml(c)?, None, false)
            }
            Some(c) => {
                return Err(Error::Invalid(format!(
                    "--config {}: not found, or neither a diffusers folder nor a .yaml file",
                    c.display()
                )))
            }
        };
        if let Some(p) = prediction {
            let s = configs["scheduler/scheduler_config.json"].clone();
            configs.insert(
                "scheduler/scheduler_config.json".into(),
                patch_json(&s, "scheduler config", "prediction_type", p.into())?,
            );
        }
        if let Some(u) = opts.upcast_attention {
            let s = configs["unet/config.json"].clone();
            configs.insert(
                "unet/config.json".into(),
                patch_json(&s, "unet config", "upcast_attention", u.into())?,
            );
            notes.push(format!("upcast_attention {u}: --upcast-attention"));
        }

        let cfg = |rel: &str| json(&configs[rel], rel);
        let (unet_cfg, vae_cfg, te_cfg) =
            (cfg("unet/config.json")?, cfg("vae/config.json")?, cfg("text_encoder/config.json")?);
        // diffusers' conversion script numbers decoder levels as if the VAE had 4.
        let vae_levels = vae_cfg.get("block_out_channels").and_then(Json::as_array).map_or(4, |a| a.len());
        let vae_up_offset = if vae_levels < 4
            && t.keys().any(|k| k.starts_with(&format!("{VAE_PREFIX}decoder.up.{vae_levels}.")))
        {
            notes.push(format!(
                "VAE decoder levels numbered from {} (as diffusers' conversion script writes a {vae_levels}-level VAE)",
                4 - vae_levels
            ));
            4 - vae_levels
        } else {
            0
        };
        let name_map = NameMap::new(&unet_cfg, &vae_cfg, text, vae_up_offset)?;

        // EMA: diffusers' flat names, `model_ema.` + the UNet key without its dots.
        let ema_count = t.keys().filter(|k| k.starts_with("model_ema.")).count();
        let use_ema = ema_count > EMA_MIN_TENSORS && !opts.no_ema;
        if ema_count > EMA_MIN_TENSORS {
            notes.push(if use_ema {
                "UNet: EMA weights (model_ema.*), as the original repo does; --no-ema for the training weights".into()
            } else {
                "UNet: training weights (--no-ema); the EMA copy is ignored".into()
            });
        }

        let label = path.display().to_string();
        let mut used: HashSet<String> = HashSet::new();
        let mut components = BTreeMap::new();
        for (component, expected) in [
            ("text_encoder", expected::clip_text(&te_cfg, "text_encoder/config.json")?),
            ("unet", expected::unet(&unet_cfg, "unet/config.json")?),
            ("vae", expected::vae(&vae_cfg, "vae/config.json")?),
        ] {
            let mut map = HashMap::new();
            for (name, shape) in expected {
                let orig = name_map.original(component, &name).ok_or_else(|| {
                    Error::Checkpoint(format!("{label}: {component} tensor {name} has no single-file name"))
                })?;
                let found = orig.names.iter().find(|n| t.contains_key(*n));
                let Some(oname) = found else {
                    let problem =
                        format!("{component} tensor {} (diffusers {name}) is missing", orig.names[0]);
                    return Err(if standard {
                        config_error(path, &problem)
                    } else {
                        mismatch(path, &config, &problem)
                    });
                };
                let mut src = t[oname].clone();
                if use_ema && component == "unet" {
                    let flat = format!("model_ema.{}", oname.split('.').skip(1).collect::<String>());
                    if let Some(e) = t.get(&flat) {
                        src = e.clone();
                    }
                }
                used.insert(src.original.clone());
                let m = match orig.third {
                    None => {
                        if !compatible(&src.shape, &shape) {
                            let problem = format!(
                                "{component} tensor {} has shape {:?}, {} {:?}",
                                src.original,
                                src.shape,
                                if standard { "SD2.x has" } else { "the configs imply" },
                                shape
                            );
                            return Err(if standard {
                                config_error(path, &problem)
                            } else {
                                mismatch(path, &config, &problem)
                            });
                        }
                        MappedTensor { shape: shape.clone(), ..src }
                    }
                    Some(i) => {
                        // q/k/v: the i-th third of the fused [3h, h] / [3h] tensor.
                        let mut fused = shape.clone();
                        fused[0] *= 3;
                        if src.shape != fused {
                            let problem = format!(
                                "{component} tensor {} has shape {:?}, {:?} expected (q, k, v of {name})",
                                src.original, src.shape, fused
                            );
                            return Err(if standard {
                                config_error(path, &problem)
                            } else {
                                mismatch(path, &config, &problem)
                            });
                        }
                        let third = src.range.len() / 3;
                        let a = src.range.start + i * third;
                        MappedTensor { shape: shape.clone(), range: a..a + third, ..src }
                    }
                };
                let width = m.dtype.bitsize() / 8;
                let numel: usize = m.shape.iter().product();
                if m.range.len() != numel * width.max(1) {
                    return Err(Error::Checkpoint(format!(
                        "{label}: tensor {} holds {} bytes, shape {:?} needs {}",
                        m.original,
                        m.range.len(),
                        m.shape,
                        numel * width
                    )));
                }
                map.insert(name, m);
            }
            components.insert(component.to_string(), map);
        }
        let mut ignored: Vec<String> = t.keys().filter(|k| !used.contains(*k)).cloned().collect();
        ignored.sort();
        if !ignored.is_empty() {
            notes.push(format!("{} tensors in the file are not used (e.g. {})", ignored.len(), ignored[0]));
        }
        Ok(SingleFileModel {
            path: path.to_path_buf(),
            format: file.format,
            configs,
            tokenizer_dir,
            notes,
            ignored,
            name_map,
            components,
        })
    }

    /// One component as a store of its diffusers-named tensors.
    pub fn store(&self, component: &str) -> Result<ComponentStore> {
        let map = self.components.get(component).ok_or_else(|| {
            Error::Checkpoint(format!("{}: a single file has no {component}", self.path.display()))
        })?;
        Ok(ComponentStore::from_mapped(&format!("{} [{component}]", self.path.display()), map.clone()))
    }

    /// A config file's text by relative path (`unet/config.json`, ...).
    pub fn config_text(&self, rel: &str) -> Result<&str> {
        self.configs
            .get(rel)
            .map(String::as_str)
            .ok_or_else(|| Error::Checkpoint(format!("{}: no {rel} for a single file", self.path.display())))
    }

    /// The tokenizer files to write into a diffusers folder made from this file.
    pub fn tokenizer_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        match &self.tokenizer_dir {
            Some(d) => {
                let mut out = Vec::new();
                for e in std::fs::read_dir(d).map_err(|e| Error::io(d, e))? {
                    let e = e.map_err(|e| Error::io(d, e))?;
                    if e.path().is_file() {
                        let b = std::fs::read(e.path()).map_err(|err| Error::io(e.path(), err))?;
                        out.push((e.file_name().to_string_lossy().to_string(), b));
                    }
                }
                Ok(out)
            }
            None => Ok(crate::synth::embedded::TOKENIZER
                .iter()
                .map(|(n, t)| (n.to_string(), t.as_bytes().to_vec()))
                .collect()),
        }
    }

    /// Writes configs and tokenizer as a diffusers folder holds them (no weights).
    /// `model_index.json` lists only the components written (a `--config` folder's may name
    /// a safety checker or feature extractor this folder will not have).
    pub fn write_configs(&self, dir: &Path) -> Result<()> {
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for (k, v) in &self.configs {
            let text = if k == "model_index.json" {
                let mut idx = json(v, "model_index.json")?;
                if let Some(o) = idx.as_object_mut() {
                    for (name, entry) in o.iter_mut() {
                        let kept = ["scheduler", "text_encoder", "tokenizer", "unet", "vae"]
                            .contains(&name.as_str());
                        if !name.starts_with('_') && entry.is_array() && !kept {
                            *entry = serde_json::json!([null, null]);
                        }
                    }
                }
                serde_json::to_string_pretty(&idx)
                    .map_err(|e| Error::Checkpoint(format!("model_index.json: {e}")))?
            } else {
                v.clone()
            };
            files.push((k.clone(), text.into_bytes()));
        }
        files.extend(self.tokenizer_files()?.into_iter().map(|(n, b)| (format!("tokenizer/{n}"), b)));
        for (rel, bytes) in files {
            let p = dir.join(&rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
            std::fs::write(&p, bytes).map_err(|e| Error::io(&p, e))?;
        }
        Ok(())
    }
}

fn mismatch(path: &Path, config: &Option<PathBuf>, problem: &str) -> Error {
    Error::Checkpoint(format!(
        "{}: does not match the configs of {}: {problem}",
        path.display(),
        config.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
    ))
}

/// Whether `path` names a single-file checkpoint (a file, not a folder).
pub fn is_single_file(path: &Path) -> bool {
    path.is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd21_map() -> NameMap {
        let c: BTreeMap<&str, &str> = Sd2Variant::V768.configs().iter().copied().collect();
        NameMap::new(
            &json(c["unet/config.json"], "u").unwrap(),
            &json(c["vae/config.json"], "v").unwrap(),
            TextLayout::OpenClip,
            0,
        )
        .unwrap()
    }

    /// Strided torch views become the row-major values they denote.
    #[test]
    fn strided_views_are_gathered() {
        use super::pickle::StorageRef;
        // A 6x5 f32 storage holding 0..30.
        let bytes: Vec<u8> = (0..30).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let sb = Arc::new(Backing::Owned(bytes));
        let storage = StorageRef { class: "FloatStorage".into(), key: "0".into(), numel: 30 };
        let view = |offset: u64, size: Vec<u64>, stride: Vec<u64>| {
            let t = TensorRef { storage: storage.clone(), offset, size, stride };
            let m = tensor_view(&t, 4, &sb, 0..120).unwrap();
            m.backing.bytes()[m.range.clone()]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect::<Vec<_>>()
        };
        assert_eq!(view(0, vec![6, 5], vec![5, 1]), (0..30).map(|i| i as f32).collect::<Vec<_>>());
        // base.t(): [5, 6] with strides (1, 5).
        let t: Vec<f32> = (0..5).flat_map(|c| (0..6).map(move |r| (r * 5 + c) as f32)).collect();
        assert_eq!(view(0, vec![5, 6], vec![1, 5]), t);
        assert_eq!(view(10, vec![5], vec![1]), vec![10.0, 11.0, 12.0, 13.0, 14.0]); // base[2]
        assert_eq!(view(3, vec![6], vec![5]), vec![3.0, 8.0, 13.0, 18.0, 23.0, 28.0]); // base[:, 3]
        assert_eq!(view(1, vec![3, 2], vec![10, 2]), vec![1.0, 3.0, 11.0, 13.0, 21.0, 23.0]); // base[::2, 1::2]
        assert!(view(0, vec![0, 3], vec![3, 1]).is_empty());
        assert_eq!(view(7, vec![], vec![]), vec![7.0]); // a scalar
                                                        // A view past the storage is an error, not a panic.
        let t = TensorRef { storage, offset: 25, size: vec![2, 5], stride: vec![5, 1] };
        assert!(tensor_view(&t, 4, &sb, 0..120).is_err());
    }

    #[test]
    fn variant_rule() {
        assert_eq!(choose_variant(None, None).0, Sd2Variant::V768);
        assert_eq!(choose_variant(None, Some(110000)).0, Sd2Variant::V768);
        assert_eq!(choose_variant(None, Some(875000)).0, Sd2Variant::Base512);
        assert_eq!(choose_variant(Some("epsilon"), Some(110000)).0, Sd2Variant::Base512);
        assert_eq!(choose_variant(Some("v_prediction"), Some(875000)).0, Sd2Variant::V768);
    }

    #[test]
    fn names_follow_diffusers_for_sd21() {
        let m = sd21_map();
        let o = |c: &str, n: &str| m.original(c, n).unwrap().names[0].clone();
        assert_eq!(
            o("unet", "down_blocks.1.resnets.0.conv_shortcut.weight"),
            "model.diffusion_model.input_blocks.4.0.skip_connection.weight"
        );
        assert_eq!(
            o("unet", "down_blocks.2.downsamplers.0.conv.bias"),
            "model.diffusion_model.input_blocks.9.0.op.bias"
        );
        assert_eq!(
            o("unet", "up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.weight"),
            "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_k.weight"
        );
        assert_eq!(
            o("unet", "up_blocks.0.upsamplers.0.conv.weight"),
            "model.diffusion_model.output_blocks.2.1.conv.weight"
        );
        assert_eq!(
            o("unet", "up_blocks.1.upsamplers.0.conv.weight"),
            "model.diffusion_model.output_blocks.5.2.conv.weight"
        );
        assert_eq!(
            o("unet", "mid_block.resnets.1.time_emb_proj.weight"),
            "model.diffusion_model.middle_block.2.emb_layers.1.weight"
        );
        assert_eq!(
            o("vae", "decoder.up_blocks.0.resnets.2.conv_shortcut.bias"),
            "first_stage_model.decoder.up.3.block.2.nin_shortcut.bias"
        );
        assert_eq!(
            o("vae", "encoder.mid_block.attentions.0.to_out.0.weight"),
            "first_stage_model.encoder.mid.attn_1.proj_out.weight"
        );
        assert_eq!(o("vae", "decoder.conv_norm_out.weight"), "first_stage_model.decoder.norm_out.weight");
        let q = m.original("text_encoder", "encoder.layers.22.self_attn.v_proj.bias").unwrap();
        assert_eq!(q.names[0], "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_bias");
        assert_eq!(q.third, Some(2));
        assert_eq!(
            o("text_encoder", "embeddings.position_embedding.weight"),
            "cond_stage_model.model.positional_embedding"
        );
    }

    #[test]
    fn every_sd21_tensor_has_a_distinct_original_name() {
        let m = sd21_map();
        let c: BTreeMap<&str, &str> = Sd2Variant::V768.configs().iter().copied().collect();
        let mut seen = HashSet::new();
        for (comp, list) in [
            ("unet", expected::unet(&json(c["unet/config.json"], "u").unwrap(), "u").unwrap()),
            ("vae", expected::vae(&json(c["vae/config.json"], "v").unwrap(), "v").unwrap()),
            (
                "text_encoder",
                expected::clip_text(&json(c["text_encoder/config.json"], "t").unwrap(), "t").unwrap(),
            ),
        ] {
            for (n, _) in list {
                let o = m.original(comp, &n).unwrap_or_else(|| panic!("{comp} {n}"));
                assert!(seen.insert((o.names[0].clone(), o.third)), "{comp} {n} -> {:?} twice", o);
            }
        }
    }
}
