//! The library side of `sdsparse convert`, `export` and `inspect`: dense diffusers folder
//! → pruned sparse folder, sparse folder → dense diffusers folder (zeros in place), and a
//! per-layer description of either.
//!
//! Both writers build the result in a temporary sibling folder and rename it into place at
//! the end, so a failure leaves no partial output; the input folder is only read (by
//! memory map), one component at a time, one batch of tensors at a time.

use crate::calibrate::{Calibration, CalibrationOptions};
use crate::checkpoint::source::{has_weights, listed_components};
use crate::checkpoint::{ComponentStore, ModelSource, RawTensor, SingleFileOptions};
use crate::error::{Error, Result};
use crate::format::codec::{
    crc32_hex, dtype_from_name, matrix_dims, LayerRecord, PatternName, SparseHeader, FORMAT_VERSION,
};
use crate::format::writer::{Entry, StreamWriter};
use crate::format::{bitmap_row_bytes, sparse24_meta_row_bytes, DType, HostData, Weight};
use crate::output::{copy_file, TempDir};
use crate::prune::wanda::{self, ActivationStats, OwlGroup, OwlParams, Rule};
use crate::prune::{self, ComponentKind, Cut, Method, Pattern, Scope, Selection};
use rayon::prelude::*;
use safetensors::Dtype as StDtype;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The study's text-encoder target.
pub const DEFAULT_TEXT_ENCODER_SPARSITY: f64 = 0.475;
/// The study's UNet target.
pub const DEFAULT_UNET_SPARSITY: f64 = 0.35;
/// File name of the conversion summary at the top of a sparse folder.
pub const SUMMARY_FILE: &str = "sdsparse.json";

/// Everything `convert` can be told. `Default` reproduces the study.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// `None`: 0.475, or 0.5 when the text encoder is 2:4.
    pub text_encoder_sparsity: Option<f64>,
    /// `None`: 0.35, or 0.5 when the UNet is 2:4.
    pub unet_sparsity: Option<f64>,
    /// Pattern of both components unless overridden below.
    pub pattern: Pattern,
    pub text_encoder_pattern: Option<Pattern>,
    pub unet_pattern: Option<Pattern>,
    pub method: Method,
    pub scope: Scope,
    /// Seed of the random method.
    pub seed: u64,
    /// Stored dtype of every float tensor; `None` keeps each as it is.
    pub dtype: Option<DType>,
    pub selection: Selection,
    /// Replace an existing output folder.
    pub force: bool,
    /// How to read a single-file checkpoint (ignored for a diffusers folder).
    pub single_file: SingleFileOptions,
    /// OWL's `M` and `λ` (method `owl`).
    pub owl: OwlParams,
    /// Calibration of the activation-aware methods (`wanda`, `owl`).
    pub calibration: CalibrationOptions,
    /// A per-layer plan from `sdsparse plan` (`convert --plan`): it sets every listed
    /// layer's pattern and sparsity (magnitude, layer scope); unlisted layers stay dense.
    pub mixed_plan: Option<Arc<crate::plan::MixedPlan>>,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            text_encoder_sparsity: None,
            unet_sparsity: None,
            pattern: Pattern::Unstructured,
            text_encoder_pattern: None,
            unet_pattern: None,
            method: Method::Magnitude,
            scope: Scope::Layer,
            seed: 0,
            dtype: None,
            selection: Selection::default(),
            force: false,
            single_file: SingleFileOptions::default(),
            owl: OwlParams::default(),
            calibration: CalibrationOptions::default(),
            mixed_plan: None,
        }
    }
}

/// What one component is pruned to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ComponentPlan {
    pub pattern: Pattern,
    pub sparsity: f64,
}

impl ConvertOptions {
    /// The plan of a component, `None` when it stays dense; errors on a target outside
    /// [0, 1) or a 2:4 target other than 0 or 0.5.
    pub fn plan(&self, kind: ComponentKind) -> Result<Option<ComponentPlan>> {
        let (flag, given, pattern, default) = match kind {
            ComponentKind::TextEncoder => (
                "--text-encoder-sparsity",
                self.text_encoder_sparsity,
                self.text_encoder_pattern.unwrap_or(self.pattern),
                DEFAULT_TEXT_ENCODER_SPARSITY,
            ),
            ComponentKind::Unet => (
                "--unet-sparsity",
                self.unet_sparsity,
                self.unet_pattern.unwrap_or(self.pattern),
                DEFAULT_UNET_SPARSITY,
            ),
            _ => return Ok(None),
        };
        if let Some(s) = given {
            if !(0.0..1.0).contains(&s) {
                return Err(Error::Invalid(format!("{flag} {s} is outside [0, 1)")));
            }
        }
        let sparsity = match (pattern, given) {
            (Pattern::Sparse24, None) => 0.5,
            (Pattern::Sparse24, Some(s)) if s != 0.0 && s != 0.5 => {
                return Err(Error::Invalid(format!(
                    "{flag} {s} cannot be used with the 2:4 pattern, which is exactly 50% sparse \
                     (give 0.5, or 0 to keep the component dense)"
                )))
            }
            (_, Some(s)) => s,
            (Pattern::Unstructured, None) => default,
        };
        Ok((sparsity > 0.0).then_some(ComponentPlan { pattern, sparsity }))
    }

    /// Checks every option (also done by [`convert`] before anything is written).
    pub fn validate(&self) -> Result<()> {
        self.plan(ComponentKind::TextEncoder)?;
        self.plan(ComponentKind::Unet)?;
        if self.method.needs_calibration() {
            self.owl.validate()?;
            self.calibration.captions()?;
        }
        if self.mixed_plan.is_some() && (self.method != Method::Magnitude || self.scope != Scope::Layer) {
            return Err(Error::Invalid(
                "--plan prunes each layer by magnitude to its own target; it cannot be combined with \
                 --method or --scope global"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// Progress of a long operation, in input bytes.
#[derive(Debug, Clone)]
pub enum Progress {
    /// Total input bytes to process.
    Begin {
        total_bytes: u64,
    },
    /// A component starts.
    Component {
        name: String,
    },
    /// Another `bytes` processed.
    Advance {
        bytes: u64,
    },
    /// Calibration (methods `wanda`, `owl`) before any writing: `done` of `total` units of
    /// `stage` (`text_encoder`: captions; `unet`: UNet calls).
    Calibration {
        stage: &'static str,
        done: usize,
        total: usize,
    },
    Finish,
}

/// One tensor in a report.
#[derive(Debug, Clone)]
pub struct LayerReport {
    pub name: String,
    pub shape: Vec<usize>,
    /// `dense`, `2:4` or `unstructured`.
    pub format: String,
    pub dtype: String,
    pub numel: usize,
    /// Pruned elements (sparse layers) or zero elements (dense tensors, inspect only).
    pub zeros: usize,
    pub bytes: u64,
    /// Why a tensor selected for pruning stayed dense.
    pub note: Option<String>,
}

/// One component of a conversion.
#[derive(Debug, Clone)]
pub struct ComponentReport {
    pub name: String,
    /// `None`: kept dense.
    pub plan: Option<ComponentPlan>,
    /// Elements in the layers selected for pruning.
    pub prunable_params: usize,
    pub pruned: usize,
    /// Bytes of all tensors as read.
    pub bytes_before: u64,
    /// Bytes of the written weight file.
    pub bytes_after: u64,
    /// Bytes of all tensors, dense, in the output dtypes (what an unpruned copy would take).
    pub dense_bytes_out: u64,
    /// Tensor data written (file minus header).
    pub data_bytes_after: u64,
    /// Estimated data bytes with the other choice of `--include-conv`.
    pub data_bytes_other_conv: u64,
    pub seconds: f64,
    /// The pruned layers.
    pub layers: Vec<LayerReport>,
    /// Layers selected for pruning that stayed dense, with the reason.
    pub kept_dense: Vec<(String, String)>,
    /// OWL's layer groups with their outlier ratios and sparsities (method `owl`).
    pub owl_groups: Vec<OwlGroup>,
}

impl ComponentReport {
    pub fn achieved_sparsity(&self) -> f64 {
        if self.prunable_params == 0 {
            0.0
        } else {
            self.pruned as f64 / self.prunable_params as f64
        }
    }
}

/// What `convert` did.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub out: PathBuf,
    pub components: Vec<ComponentReport>,
    pub include_conv: bool,
    pub seconds: f64,
}

impl ConvertReport {
    fn te_unet(&self) -> impl Iterator<Item = &ComponentReport> {
        self.components.iter().filter(|c| c.name == "text_encoder" || c.name == "unet")
    }
    /// Stored size of text encoder + UNet relative to their dense size (same dtype).
    pub fn te_unet_ratio(&self) -> f64 {
        let (a, d) = self.te_unet().fold((0, 0), |(a, d), c| (a + c.data_bytes_after, d + c.dense_bytes_out));
        a as f64 / d.max(1) as f64
    }
    /// The same ratio with the other choice of `--include-conv` (estimated from shapes).
    pub fn te_unet_ratio_other_conv(&self) -> f64 {
        let (a, d) =
            self.te_unet().fold((0, 0), |(a, d), c| (a + c.data_bytes_other_conv, d + c.dense_bytes_out));
        a as f64 / d.max(1) as f64
    }
}

/// Files that hold weights in other formats; never copied into an output folder.
fn is_weight_file(name: &str) -> bool {
    [
        ".safetensors",
        ".safetensors.index.json",
        ".bin",
        ".bin.index.json",
        ".ckpt",
        ".pt",
        ".pth",
        ".msgpack",
        ".h5",
        ".onnx",
        ".onnx_data",
        ".pb",
    ]
    .iter()
    .any(|s| name.ends_with(s))
}

/// Copies a folder's files (recursively) except weight files and hidden entries.
fn copy_non_weights(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
    let rd = std::fs::read_dir(from).map_err(|e| Error::io(from, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io(from, e))?;
        let name = entry.file_name().to_string_lossy().to_string();
        let src = entry.path();
        if name.starts_with('.') || name == SUMMARY_FILE {
            continue;
        }
        if src.is_dir() {
            copy_non_weights(&src, &to.join(&name))?;
        } else if !is_weight_file(&name) {
            copy_file(&src, &to.join(&name))?;
        }
    }
    Ok(())
}

/// The output folder of `convert` / `export`, checked before any work (absent unless
/// `force`, not the input nor inside it, its parent writable), as a temporary sibling that is
/// renamed into place when complete.
fn output_folder(input: &Path, out: &Path, force: bool) -> Result<TempDir> {
    let abs = |p: &Path| -> Result<PathBuf> {
        let p = if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir().map_err(|e| Error::io(".", e))?.join(p)
        };
        Ok(std::fs::canonicalize(&p).unwrap_or(p))
    };
    let (ain, aout) = (abs(input)?, abs(out)?);
    if aout.starts_with(&ain) || ain.starts_with(&aout) {
        return Err(Error::Invalid(format!(
            "the output {} must not be the input {} or inside it (the input is never modified)",
            out.display(),
            input.display()
        )));
    }
    TempDir::new(out, force, "--out")
}

/// The weight file name diffusers / transformers look for in a component folder.
fn weight_file_name(component: &str) -> &'static str {
    if component == "text_encoder" || component.starts_with("text_encoder_") {
        "model.safetensors"
    } else {
        "diffusion_pytorch_model.safetensors"
    }
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
    }
}

/// What happens to one stored tensor.
#[derive(Debug, Clone)]
enum Action {
    /// Written unchanged (or cast to `out_dtype`).
    Dense,
    /// Pruned with this pattern; `cut` is known up front for global scope.
    Prune { pattern: Pattern, k: usize, cut: Option<Option<Cut>> },
}

#[derive(Debug, Clone)]
struct Job {
    name: String,
    shape: Vec<usize>,
    in_dtype: StDtype,
    /// `None` for non-float tensors (copied as they are).
    out_dtype: Option<DType>,
    in_bytes: usize,
    action: Action,
    /// Wanda / OWL: the per-feature activation RMS and how the scores are cut.
    wanda: Option<(Arc<Vec<f32>>, Rule)>,
}

impl Job {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    fn out_dtype_size(&self) -> usize {
        self.out_dtype.map(|d| d.size_in_bytes()).unwrap_or(self.in_dtype.bitsize() / 8)
    }
    /// The stored entries this job writes.
    fn entries(&self) -> Vec<Entry> {
        let (rows, cols) = matrix_dims(&self.shape);
        let vd = self.out_dtype.map(st_dtype).unwrap_or(self.in_dtype);
        match &self.action {
            Action::Dense => vec![Entry { name: self.name.clone(), dtype: vd, shape: self.shape.clone() }],
            Action::Prune { pattern: Pattern::Sparse24, .. } => vec![
                Entry {
                    name: format!("{}{}", self.name, crate::format::codec::S24_VALUES),
                    dtype: vd,
                    shape: vec![rows, cols / 2],
                },
                Entry {
                    name: format!("{}{}", self.name, crate::format::codec::S24_META),
                    dtype: StDtype::U8,
                    shape: vec![rows, sparse24_meta_row_bytes(cols)],
                },
            ],
            Action::Prune { pattern: Pattern::Unstructured, k, .. } => vec![
                Entry {
                    name: format!("{}{}", self.name, crate::format::codec::BITMAP_MASK),
                    dtype: StDtype::U8,
                    shape: vec![rows, bitmap_row_bytes(cols)],
                },
                Entry {
                    name: format!("{}{}", self.name, crate::format::codec::BITMAP_VALUES),
                    dtype: vd,
                    shape: vec![self.numel() - k],
                },
            ],
        }
    }
    fn pattern_name(&self) -> Option<PatternName> {
        match self.action {
            Action::Dense => None,
            Action::Prune { pattern: Pattern::Sparse24, .. } => Some(PatternName::Sparse24),
            Action::Prune { pattern: Pattern::Unstructured, .. } => Some(PatternName::Unstructured),
        }
    }
}

/// The values of a float tensor in the job's output dtype (f64 is read as f32). A cast that
/// overflows (a finite value beyond f16's range) is an error naming the tensor.
fn load_values(raw: &RawTensor<'_>, out: Option<DType>) -> Result<HostData> {
    let v = raw.host_data()?;
    Ok(match out {
        Some(d) if d != v.dtype() => {
            let cast = v.to_dtype(d);
            let bad = crate::checkpoint::count_nonfinite_bytes(cast.as_bytes(), st_dtype(d));
            if bad > 0 {
                return Err(Error::Invalid(format!(
                    "tensor {}: {bad} value(s) overflow {} (its largest magnitude is {:e}); use --dtype bf16, \
                     f32 or keep",
                    raw.name,
                    d.name(),
                    v.to_f32().iter().fold(0f32, |m, x| m.max(x.abs()))
                )));
            }
            cast
        }
        _ => v,
    })
}

/// The stored bytes of one processed job: (entry name, bytes) in entry order.
type Parts<'a> = Vec<(String, Cow<'a, [u8]>)>;

fn host_bytes(h: HostData) -> Vec<u8> {
    h.as_bytes().to_vec()
}

/// Runs one job: returns its stored parts and (for pruned layers) the pruned count.
fn run_job<'a>(
    store: &'a ComponentStore,
    job: &Job,
    method: Method,
    seed: u64,
) -> Result<(Parts<'a>, usize)> {
    let raw = store.raw(&job.name)?;
    let bad = raw.count_nonfinite();
    if bad > 0 {
        return Err(crate::checkpoint::nonfinite_error(&store.describe(), &job.name, bad, job.numel()));
    }
    let (rows, cols) = matrix_dims(&job.shape);
    match &job.action {
        Action::Dense => {
            let same = job.out_dtype.is_none() || raw.float_dtype() == job.out_dtype;
            let bytes = if same {
                Cow::Borrowed(raw.bytes)
            } else {
                Cow::Owned(host_bytes(load_values(&raw, job.out_dtype)?))
            };
            Ok((vec![(job.name.clone(), bytes)], 0))
        }
        Action::Prune { pattern, k, cut } => {
            // Work on the mapped bytes directly unless a dtype cast is needed (asked for, or
            // f64 input, which is stored as f32).
            let out_dtype =
                job.out_dtype.ok_or_else(|| Error::Format(format!("{}: not a float tensor", job.name)))?;
            let cast;
            let bytes: &[u8] = if raw.float_dtype() == Some(out_dtype) {
                raw.bytes
            } else {
                cast = load_values(&raw, Some(out_dtype))?;
                cast.as_bytes()
            };
            let es = out_dtype.size_in_bytes();
            let entries = job.entries();
            if let Some((rms, rule)) = &job.wanda {
                let values = load_values(&raw, Some(out_dtype))?.to_f32();
                let keys = wanda::score_keys(&wanda::scores(&values, cols, rms));
                let (mask, pruned) = wanda::apply(*rule, &keys, rows, cols);
                if pruned != *k {
                    return Err(Error::Format(format!(
                        "{}: pruned {pruned} elements, planned {k}",
                        job.name
                    )));
                }
                let parts = match pattern {
                    Pattern::Sparse24 => {
                        let (values, meta) =
                            crate::format::codec::encode_sparse24_bytes(bytes, es, rows, cols, &mask)?;
                        vec![
                            (entries[0].name.clone(), Cow::Owned(values)),
                            (entries[1].name.clone(), Cow::Owned(meta)),
                        ]
                    }
                    Pattern::Unstructured => {
                        let values = crate::format::codec::gather_kept_bytes(bytes, es, rows, cols, &mask);
                        vec![
                            (entries[0].name.clone(), Cow::Owned(mask)),
                            (entries[1].name.clone(), Cow::Owned(values)),
                        ]
                    }
                };
                return Ok((parts, pruned));
            }
            let keys = prune::Keys::new(method, seed, &job.name, out_dtype, bytes);
            match pattern {
                Pattern::Sparse24 => {
                    let mask = prune::sparse24_mask(keys, rows, cols);
                    let (values, meta) =
                        crate::format::codec::encode_sparse24_bytes(bytes, es, rows, cols, &mask)?;
                    Ok((
                        vec![
                            (entries[0].name.clone(), Cow::Owned(values)),
                            (entries[1].name.clone(), Cow::Owned(meta)),
                        ],
                        rows * cols / 2,
                    ))
                }
                Pattern::Unstructured => {
                    let cut = match cut {
                        Some(c) => *c,
                        None => prune::layer_cut(keys, *k)?,
                    };
                    let (mask, pruned) = prune::unstructured_mask(keys, rows, cols, cut);
                    if pruned != *k {
                        return Err(Error::Format(format!(
                            "{}: pruned {pruned} elements, planned {k}",
                            job.name
                        )));
                    }
                    let values = crate::format::codec::gather_kept_bytes(bytes, es, rows, cols, &mask);
                    Ok((
                        vec![
                            (entries[0].name.clone(), Cow::Owned(mask)),
                            (entries[1].name.clone(), Cow::Owned(values)),
                        ],
                        pruned,
                    ))
                }
            }
        }
    }
}

/// Estimated stored bytes of a tensor pruned with `pattern` at `s` (for the what-if figure).
fn estimate_pruned_bytes(shape: &[usize], dsize: usize, pattern: Pattern, s: f64) -> Option<u64> {
    let (rows, cols) = matrix_dims(shape);
    let numel = rows * cols;
    match pattern {
        Pattern::Sparse24 if !cols.is_multiple_of(4) => None,
        Pattern::Sparse24 => Some((numel / 2 * dsize + rows * sparse24_meta_row_bytes(cols)) as u64),
        Pattern::Unstructured => {
            Some(((numel - prune::prune_count(s, numel)) * dsize + rows * bitmap_row_bytes(cols)) as u64)
        }
    }
}

/// Batches of consecutive jobs of at most this many input bytes run in parallel.
const BATCH_BYTES: usize = 64 << 20;

#[allow(clippy::too_many_arguments)]
fn convert_component(
    store: &ComponentStore,
    name: &str,
    kind: ComponentKind,
    plan: Option<ComponentPlan>,
    opts: &ConvertOptions,
    stats: Option<&ActivationStats>,
    source: &str,
    out_file: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<ComponentReport> {
    let t0 = Instant::now();
    if store.sparse_header().is_some() {
        return Err(Error::Invalid(format!(
            "{}: already an sdsparse checkpoint (convert takes a dense one)",
            store.describe()
        )));
    }
    crate::checkpoint::expected::validate_component(store, name)?;
    let mut jobs = Vec::new();
    let mut kept_dense = Vec::new();
    let mut other_conv_delta: i64 = 0;
    for tname in store.names() {
        let raw = store.raw(&tname)?;
        let shape = raw.shape.to_vec();
        // f64 is read (and, with --dtype keep, stored) as f32; other float widths (float8)
        // cannot be read and are refused rather than copied as opaque bytes.
        let float = raw.load_dtype();
        if float.is_none() && raw.is_float() {
            return Err(Error::Checkpoint(format!(
                "{}: {}",
                store.describe(),
                crate::checkpoint::unsupported_dtype(&tname, raw.dtype)
            )));
        }
        let out_dtype = float.map(|d| opts.dtype.unwrap_or(d));
        let numel: usize = shape.iter().product();
        let mut action = Action::Dense;
        if let (Some(mp), Some(_)) = (&opts.mixed_plan, float) {
            if opts.selection.is_prunable(kind, &tname, &shape) {
                if let Some(lp) = mp.choice(name, &tname) {
                    let (rows, cols) = matrix_dims(&shape);
                    if [rows, cols] != lp.shape {
                        return Err(Error::Invalid(format!(
                            "{name}: {tname} is {shape:?} but the plan has {:?} (a plan for another model?)",
                            lp.shape
                        )));
                    }
                    action = match lp.chosen {
                        crate::plan::Choice::Dense => Action::Dense,
                        crate::plan::Choice::Sparse24 if !cols.is_multiple_of(4) => {
                            return Err(Error::Invalid(format!(
                                "{tname}: the plan says 2:4 but {cols} columns"
                            )))
                        }
                        crate::plan::Choice::Sparse24 => {
                            Action::Prune { pattern: Pattern::Sparse24, k: numel / 2, cut: None }
                        }
                        crate::plan::Choice::Unstructured(s) => Action::Prune {
                            pattern: Pattern::Unstructured,
                            k: prune::prune_count(s, numel),
                            cut: None,
                        },
                    };
                }
            }
        }
        if let (Some(p), Some(_)) = (plan, float) {
            if opts.selection.is_prunable(kind, &tname, &shape) {
                let (_, cols) = matrix_dims(&shape);
                if p.pattern == Pattern::Sparse24 && !cols.is_multiple_of(4) {
                    kept_dense.push((
                        tname.clone(),
                        format!("input dimension {cols} is not a multiple of 4, so it cannot be 2:4"),
                    ));
                } else {
                    let k = match p.pattern {
                        Pattern::Sparse24 => numel / 2,
                        Pattern::Unstructured => prune::prune_count(p.sparsity, numel),
                    };
                    action = Action::Prune { pattern: p.pattern, k, cut: None };
                }
            }
            // The what-if figure: how the bytes change with the other --include-conv choice.
            let mut other = opts.selection.clone();
            other.include_conv = !other.include_conv;
            let now = !matches!(action, Action::Dense);
            let then = other.is_prunable(kind, &tname, &shape);
            if now != then {
                let ds = out_dtype.map(|d| d.size_in_bytes()).unwrap_or(1);
                let dense = (numel * ds) as i64;
                if let Some(sp) = estimate_pruned_bytes(&shape, ds, p.pattern, p.sparsity) {
                    other_conv_delta += if then { sp as i64 - dense } else { dense - sp as i64 };
                }
            }
        }
        jobs.push(Job {
            name: tname,
            shape,
            in_dtype: raw.dtype,
            out_dtype,
            in_bytes: raw.bytes.len(),
            action,
            wanda: None,
        });
    }

    // Wanda / OWL: scores from the calibration statistics, decided over the whole component.
    let mut owl_groups = Vec::new();
    if let (true, Some(p)) = (opts.method.needs_calibration(), plan) {
        owl_groups = plan_activation_aware(store, &mut jobs, p, opts, stats)?;
    }

    // Global scope: one exact cut over every unstructured layer of the component.
    if let (Scope::Global, Some(p), false) = (opts.scope, plan, opts.method.needs_calibration()) {
        if p.pattern == Pattern::Unstructured {
            let idx = pruned_jobs(&jobs);
            let total: usize = idx.iter().map(|&i| jobs[i].numel()).sum();
            let k = prune::prune_count(p.sparsity, total);
            let cuts = prune::find_cuts(idx.len(), k, |f| {
                for (n, &i) in idx.iter().enumerate() {
                    let raw = store.raw(&jobs[i].name)?;
                    let values = load_values(&raw, jobs[i].out_dtype)?;
                    f(
                        n,
                        prune::Keys::new(
                            opts.method,
                            opts.seed,
                            &jobs[i].name,
                            values.dtype(),
                            values.as_bytes(),
                        ),
                    );
                }
                Ok(())
            })?;
            for (&i, (cut, pruned)) in idx.iter().zip(cuts) {
                jobs[i].action = Action::Prune { pattern: Pattern::Unstructured, k: pruned, cut: Some(cut) };
            }
        }
    }

    // Sparsity asked for a component none of whose layers can take it: an error, not a
    // silent dense copy reported as a conversion.
    if let Some(p) = plan {
        if !jobs.iter().any(|j| matches!(j.action, Action::Prune { .. })) {
            let why = if kept_dense.is_empty() {
                "no tensor matches the layer selection (Linear weights, --include-conv, --include, --exclude)"
                    .to_string()
            } else {
                format!("all {} selected layers must stay dense ({})", kept_dense.len(), kept_dense[0].1)
            };
            return Err(Error::Invalid(format!(
                "{}: {} {} sparsity was asked for, but {why}; give a sparsity of 0 for this component to keep \
                 it dense",
                store.describe(),
                p.pattern.name(),
                p.sparsity
            )));
        }
    }

    // Header with placeholder checksums (fixed width), rewritten at the end.
    let mut header = SparseHeader {
        format_version: FORMAT_VERSION,
        component: name.to_string(),
        method: opts.method.name().to_string(),
        scope: opts.scope.name().to_string(),
        seed: opts.seed,
        source: source.to_string(),
        layers: BTreeMap::new(),
        kept_dense: kept_dense.iter().cloned().collect(),
    };
    for j in &jobs {
        if let (Action::Prune { k, .. }, Some(pn)) = (&j.action, j.pattern_name()) {
            let numel = j.numel();
            let crc = pn.suffixes().iter().map(|s| (s.to_string(), "00000000".to_string())).collect();
            header.layers.insert(
                j.name.clone(),
                LayerRecord {
                    pattern: pn,
                    shape: j.shape.clone(),
                    dtype: j.out_dtype.map(|d| d.name()).unwrap_or("f32").to_string(),
                    pruned: *k as u64,
                    sparsity: *k as f64 / numel.max(1) as f64,
                    crc32: crc,
                },
            );
        }
    }
    let entries: Vec<Entry> = jobs.iter().flat_map(|j| j.entries()).collect();
    let mut writer = StreamWriter::create(out_file, entries, &header.to_metadata()?)?;

    // Compute batches in parallel on the rayon pool while a writer thread streams the
    // previous batch to disk and fills in the checksums; the bounded channel keeps at most
    // one finished batch waiting, so memory stays at a few batches.
    let jobs_ref = &jobs;
    let (file_size, layers) = std::thread::scope(|scope| -> Result<(u64, Vec<LayerReport>)> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<(usize, Parts<'_>, usize)>>(1);
        let writer_thread = scope.spawn(move || -> Result<(u64, Vec<LayerReport>)> {
            let mut layers = Vec::new();
            for batch in rx {
                for (i, parts, pruned) in batch {
                    let j = &jobs_ref[i];
                    let mut out_bytes = 0u64;
                    for (pname, b) in &parts {
                        writer.write(pname, b)?;
                        out_bytes += b.len() as u64;
                        if let Some(rec) = header.layers.get_mut(&j.name) {
                            rec.crc32.insert(pname[j.name.len()..].to_string(), crc32_hex(b));
                        }
                    }
                    if let Some(pn) = j.pattern_name() {
                        layers.push(LayerReport {
                            name: j.name.clone(),
                            shape: j.shape.clone(),
                            format: pn.as_str().to_string(),
                            dtype: j.out_dtype.map(|d| d.name()).unwrap_or("?").to_string(),
                            numel: j.numel(),
                            zeros: pruned,
                            bytes: out_bytes,
                            note: None,
                        });
                    }
                }
            }
            Ok((writer.finish(&header.to_metadata()?)?, layers))
        });
        let mut failure = None;
        let mut start = 0;
        while start < jobs.len() {
            let mut end = start + 1;
            let mut bytes = jobs[start].in_bytes;
            while end < jobs.len() && bytes + jobs[end].in_bytes <= BATCH_BYTES {
                bytes += jobs[end].in_bytes;
                end += 1;
            }
            let results: Vec<Result<(Parts<'_>, usize)>> =
                jobs[start..end].par_iter().map(|j| run_job(store, j, opts.method, opts.seed)).collect();
            let mut batch = Vec::with_capacity(end - start);
            for (i, res) in (start..end).zip(results) {
                match res {
                    Ok((parts, pruned)) => batch.push((i, parts, pruned)),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            }
            // A send error means the writer stopped on an error, which join reports.
            if failure.is_some() || tx.send(batch).is_err() {
                break;
            }
            progress(Progress::Advance { bytes: bytes as u64 });
            start = end;
        }
        drop(tx);
        let written = writer_thread.join().map_err(|_| Error::Msg("the writer thread panicked".into()))?;
        match failure {
            Some(e) => Err(e),
            None => written,
        }
    })?;

    let data_after: u64 = jobs.iter().flat_map(|j| j.entries()).map(|e| e.nbytes() as u64).sum();
    let dense_out: u64 = jobs.iter().map(|j| (j.numel() * j.out_dtype_size()) as u64).sum();
    let prunable_params: usize = jobs
        .iter()
        .filter(|j| matches!(j.action, Action::Prune { .. }) || kept_dense.iter().any(|(n, _)| n == &j.name))
        .map(|j| j.numel())
        .sum();
    Ok(ComponentReport {
        name: name.to_string(),
        plan,
        prunable_params,
        pruned: layers.iter().map(|l| l.zeros).sum(),
        bytes_before: jobs.iter().map(|j| j.in_bytes as u64).sum(),
        bytes_after: file_size,
        dense_bytes_out: dense_out,
        data_bytes_after: data_after,
        data_bytes_other_conv: (data_after as i64 + other_conv_delta).max(0) as u64,
        seconds: t0.elapsed().as_secs_f64(),
        layers,
        kept_dense,
        owl_groups,
    })
}

/// The indices of the jobs that prune their tensor.
fn pruned_jobs(jobs: &[Job]) -> Vec<usize> {
    jobs.iter()
        .enumerate()
        .filter(|(_, j)| matches!(j.action, Action::Prune { .. }))
        .map(|(i, _)| i)
        .collect()
}

/// Decides the Wanda / OWL cut of every pruned job of a component (see
/// [`wanda::decide`]) and records it in the jobs. Returns OWL's groups.
fn plan_activation_aware(
    store: &ComponentStore,
    jobs: &mut [Job],
    p: ComponentPlan,
    opts: &ConvertOptions,
    stats: Option<&ActivationStats>,
) -> Result<Vec<OwlGroup>> {
    let idx = pruned_jobs(jobs);
    let mut layers = Vec::with_capacity(idx.len());
    let mut rms = Vec::with_capacity(idx.len());
    for &i in &idx {
        let j = &jobs[i];
        let (rows, cols) = matrix_dims(&j.shape);
        let s = stats.and_then(|s| wanda::lookup(s, &j.name)).ok_or_else(|| {
            Error::Invalid(format!(
                "{}: --method {} needs the layer's input activations, but calibration saw none \
                 (it prunes Linear layers only: drop --include-conv / --include for it, or --exclude it)",
                j.name,
                opts.method.name()
            ))
        })?;
        if s.sum_sq.len() != cols || j.shape.len() != 2 {
            return Err(Error::Shape(format!(
                "{}: calibration saw {} input features, the weight is {:?}",
                j.name,
                s.sum_sq.len(),
                j.shape
            )));
        }
        layers.push(wanda::Layer { name: j.name.clone(), rows, cols });
        rms.push(Arc::new(s.rms()));
    }
    let spec = wanda::Spec {
        method: opts.method,
        pattern: p.pattern,
        scope: opts.scope,
        sparsity: p.sparsity,
        owl: opts.owl,
    };
    let jobs_ro: &[Job] = jobs;
    let mut keys_of = |n: usize| -> Result<Vec<u32>> {
        let j = &jobs_ro[idx[n]];
        let values = load_values(&store.raw(&j.name)?, j.out_dtype)?.to_f32();
        Ok(wanda::score_keys(&wanda::scores(&values, layers[n].cols, &rms[n])))
    };
    let (decisions, groups) = wanda::decide(&layers, &spec, &mut keys_of)?;
    for ((&i, d), r) in idx.iter().zip(decisions).zip(rms) {
        jobs[i].action = Action::Prune { pattern: p.pattern, k: d.pruned, cut: None };
        jobs[i].wanda = Some((r, d.rule));
    }
    Ok(groups)
}

/// Converts the dense diffusers folder `model` into a sparse folder `out`.
pub fn convert(
    model: &Path,
    out: &Path,
    opts: &ConvertOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ConvertReport> {
    let t0 = Instant::now();
    opts.validate()?;
    let src = ModelSource::open(model, &opts.single_file)?;
    let weight_components = match &src {
        ModelSource::Folder(_) => folder_weight_components(model)?,
        ModelSource::SingleFile(_) => src.weight_components()?,
    };
    // The output location and the whole input are checked before anything is written:
    // every component generate needs must load (tokenizer, configs, scheduler, tensor names,
    // shapes and dtypes), so convert never succeeds on a folder generate would refuse. (A
    // single file's tensors were checked against its configs when it was opened.)
    let tmp = output_folder(model, out, opts.force)?;
    let mut total = 0u64;
    for c in &weight_components {
        let store = src.store(c)?;
        if store.sparse_header().is_some() {
            return Err(Error::Invalid(format!(
                "{}: already an sdsparse checkpoint (convert takes a dense one)",
                store.describe()
            )));
        }
        crate::checkpoint::expected::validate_component(&store, c)?;
        total += store.data_bytes();
    }
    if let ModelSource::Folder(_) = &src {
        crate::pipeline::check_folder(model)?;
    }
    // Wanda / OWL: calibrate on the dense model (after validation, before anything is written).
    let calibration = if opts.method.needs_calibration() {
        if let ModelSource::SingleFile(_) = &src {
            return Err(Error::Invalid(format!(
                "{}: Wanda / OWL calibration of a single file is not supported yet; export it to a diffusers \
                 folder first (sdsparse export --model FILE --out DIR)",
                model.display()
            )));
        }
        let te = opts.plan(ComponentKind::TextEncoder)?.is_some();
        let unet = opts.plan(ComponentKind::Unet)?.is_some();
        crate::calibrate::calibrate(model, &opts.calibration, te, unet, &mut |c| {
            progress(Progress::Calibration { stage: c.stage, done: c.done, total: c.total })
        })?
    } else {
        Calibration::default()
    };
    let result = (|| -> Result<ConvertReport> {
        write_non_weights(&src, tmp.path())?;
        progress(Progress::Begin { total_bytes: total });
        let source = model.display().to_string();
        let mut components = Vec::new();
        for c in &weight_components {
            progress(Progress::Component { name: c.clone() });
            let store = src.store(c)?;
            let kind = ComponentKind::from_folder(c);
            // A mixed plan decides per layer (in convert_component) instead of per component.
            let plan = if opts.mixed_plan.is_some() { None } else { opts.plan(kind)? };
            let file = tmp.path().join(c).join(weight_file_name(c));
            let stats = calibration.component(c);
            components.push(convert_component(&store, c, kind, plan, opts, stats, &source, &file, progress)?);
        }
        let report = ConvertReport {
            out: out.to_path_buf(),
            components,
            include_conv: opts.selection.include_conv,
            seconds: 0.0,
        };
        write_summary(tmp.path(), &report, opts, &calibration)?;
        Ok(report)
    })();
    let report = result.map_err(|e| tmp.name_output(e))?;
    tmp.commit()?;
    progress(Progress::Finish);
    Ok(ConvertReport { seconds: t0.elapsed().as_secs_f64(), ..report })
}

/// The weight components of a diffusers folder, checking that every listed component
/// folder exists and that the text encoder and UNet hold weights.
fn folder_weight_components(model: &Path) -> Result<Vec<String>> {
    let listed = listed_components(model)?;
    for c in &listed {
        let dir = model.join(c);
        if !dir.is_dir() {
            return Err(Error::Checkpoint(format!(
                "{}: component folder not found (model_index.json lists {c})",
                dir.display()
            )));
        }
    }
    let weight_components: Vec<String> =
        listed.iter().filter(|c| has_weights(&model.join(c))).cloned().collect();
    for required in ["text_encoder", "unet"] {
        if listed.iter().any(|c| c == required) && !weight_components.iter().any(|c| c == required) {
            return Err(Error::Checkpoint(format!(
                "{}: no *.safetensors weights found",
                model.join(required).display()
            )));
        }
    }
    Ok(weight_components)
}

/// Configs, tokenizer and scheduler of an output folder: copied from a diffusers folder,
/// or written from a single file's (inferred or `--config`) configs.
fn write_non_weights(src: &ModelSource, to: &Path) -> Result<()> {
    match src {
        ModelSource::Folder(dir) => copy_non_weights(dir, to),
        ModelSource::SingleFile(s) => s.write_configs(to),
    }
}

/// `sdsparse.json`: how the folder was made, for people and for `inspect`.
fn write_summary(dir: &Path, r: &ConvertReport, opts: &ConvertOptions, cal: &Calibration) -> Result<()> {
    let comps: Vec<serde_json::Value> = r
        .components
        .iter()
        .map(|c| {
            serde_json::json!({
                "name": c.name,
                "pattern": c.plan.map(|p| p.pattern.name()),
                "target_sparsity": c.plan.map(|p| p.sparsity),
                "prunable_params": c.prunable_params,
                "pruned": c.pruned,
                "achieved_sparsity": c.achieved_sparsity(),
                "bytes_before": c.bytes_before,
                "bytes_after": c.bytes_after,
                "kept_dense": c.kept_dense.iter().map(|(n, why)| serde_json::json!({"name": n, "reason": why})).collect::<Vec<_>>(),
                "owl_groups": c.owl_groups.iter().map(|g| serde_json::json!({
                    "name": g.name, "params": g.params, "outlier_ratio": g.outlier_ratio, "sparsity": g.sparsity,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let calibration = opts.method.needs_calibration().then(|| {
        serde_json::json!({
            "prompts": opts.calibration.prompts.as_ref().map(|p| p.display().to_string()),
            "captions": cal.captions,
            "unet_captions": cal.unet_captions,
            "unet_ddim_steps": opts.calibration.steps,
            "seed": opts.calibration.seed,
            "guidance": opts.calibration.guidance,
            "owl_m": opts.owl.m,
            "owl_lambda": opts.owl.lambda,
        })
    });
    let mixed_plan = opts.mixed_plan.as_ref().map(|p| {
        serde_json::json!({
            "source_model": p.model,
            "budget": p.budget,
            "predicted_deviation": p.predicted_deviation,
            "measured_deviation": p.measured_deviation,
            "cost_vs_dense": p.cost / p.dense_cost.max(f64::MIN_POSITIVE),
        })
    });
    let v = serde_json::json!({
        "format": "sdsparse",
        "calibration": calibration,
        "mixed_plan": mixed_plan,
        "format_version": FORMAT_VERSION,
        "method": opts.method.name(),
        "scope": opts.scope.name(),
        "seed": opts.seed,
        "include_conv": opts.selection.include_conv,
        "components": comps,
        "te_unet_size_ratio": r.te_unet_ratio(),
    });
    let path = dir.join(SUMMARY_FILE);
    let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Format(e.to_string()))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))
}

/// What `export` did.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub out: PathBuf,
    /// (component, bytes written)
    pub components: Vec<(String, u64)>,
}

/// Stored dtype and shape of a tensor as it is exported dense (compressed ones as recorded).
fn dense_entry(store: &ComponentStore, c: &str, n: &str) -> Result<(StDtype, Vec<usize>)> {
    Ok(match store.sparse_header().and_then(|h| h.layers.get(n)) {
        Some(rec) => {
            let d = dtype_from_name(&rec.dtype)
                .ok_or_else(|| Error::Format(format!("{c}: {n}: unknown dtype {}", rec.dtype)))?;
            (st_dtype(d), rec.shape.clone())
        }
        None => {
            let raw = store.raw(n)?;
            (raw.dtype, raw.shape.to_vec())
        }
    })
}

/// A tensor's dense bytes (compressed ones decompressed with zeros in place, checksums
/// verified) and the stored bytes that took, for progress.
fn dense_bytes<'a>(store: &'a ComponentStore, n: &str) -> Result<(Cow<'a, [u8]>, u64)> {
    if store.sparse_header().is_some_and(|h| h.layers.contains_key(n)) {
        let weight = crate::checkpoint::compressed::load_compressed(store, n)?;
        let b = match &weight {
            Weight::Sparse24(s) => s.values.as_bytes().len() + s.meta.len(),
            Weight::Bitmap(b) => b.values.as_bytes().len() + b.bitmap.len(),
            Weight::Dense(_) => 0,
        };
        Ok((Cow::Owned(weight.to_dense_host()?.as_bytes().to_vec()), b as u64))
    } else {
        let raw = store.raw(n)?;
        Ok((Cow::Borrowed(raw.bytes), raw.bytes.len() as u64))
    }
}

/// Writes a dense diffusers folder (zeros in place, stored dtypes kept) from a sparse one
/// (or from a single-file checkpoint). Checksums are verified on the way.
pub fn export(
    sparse: &Path,
    out: &Path,
    force: bool,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportReport> {
    export_with(sparse, out, force, &SingleFileOptions::default(), progress)
}

/// [`export`] with single-file options for a single-file input.
pub fn export_with(
    model: &Path,
    out: &Path,
    force: bool,
    single_file: &SingleFileOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportReport> {
    let src = ModelSource::open(model, single_file)?;
    let comps = src.weight_components()?;
    let mut total = 0u64;
    for c in &comps {
        total += src.store(c)?.data_bytes();
    }
    let tmp = output_folder(model, out, force)?;
    let result = (|| -> Result<Vec<(String, u64)>> {
        write_non_weights(&src, tmp.path())?;
        progress(Progress::Begin { total_bytes: total });
        let mut written = Vec::new();
        for c in &comps {
            progress(Progress::Component { name: c.clone() });
            let store = src.store(c)?;
            let names = store.logical_names();
            let mut entries = Vec::new();
            for n in &names {
                let (dtype, shape) = dense_entry(&store, c, n)?;
                entries.push(Entry { name: n.clone(), dtype, shape });
            }
            let dir = tmp.path().join(c);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            let file = dir.join(weight_file_name(c));
            let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
            let mut w = StreamWriter::create(&file, entries, &meta)?;
            for n in &names {
                let (bytes, read) = dense_bytes(&store, n)?;
                w.write(n, &bytes)?;
                progress(Progress::Advance { bytes: read });
            }
            written.push((c.clone(), w.finish(&meta)?));
        }
        Ok(written)
    })();
    let written = result.map_err(|e| tmp.name_output(e))?;
    tmp.commit()?;
    progress(Progress::Finish);
    Ok(ExportReport { out: out.to_path_buf(), components: written })
}

/// Writes one `.safetensors` in the original single-file layout (`model.diffusion_model.*`,
/// `first_stage_model.*`, `cond_stage_model.model.*` with fused `in_proj`), dense with
/// zeros in place, for tools that load single files (A1111, ComfyUI, stable-diffusion.cpp).
/// Names and shapes follow diffusers' `convert_diffusers_to_original_stable_diffusion.py`
/// (VAE attention weights as `[c, c, 1, 1]`). The file is written under a temporary name
/// and renamed when complete.
pub fn export_single_file(
    model: &Path,
    out: &Path,
    force: bool,
    single_file: &SingleFileOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<ExportReport> {
    use crate::checkpoint::single_file::{NameMap, TextLayout};
    if out.exists() && !force {
        return Err(Error::Invalid(format!("{} already exists (use --force to replace it)", out.display())));
    }
    if out.is_dir() {
        return Err(Error::Invalid(format!(
            "{}: a folder; --format single-file writes one file",
            out.display()
        )));
    }
    let src = ModelSource::open(model, single_file)?;
    let cfg = |rel: &str| -> Result<serde_json::Value> {
        serde_json::from_str(&src.config_text(rel)?)
            .map_err(|e| Error::Checkpoint(format!("{rel}: invalid JSON ({e})")))
    };
    let map = NameMap::new(&cfg("unet/config.json")?, &cfg("vae/config.json")?, TextLayout::OpenClip, 0)?;
    let comps = ["text_encoder", "unet", "vae"];
    let stores: Vec<ComponentStore> = comps.iter().map(|c| src.store(c)).collect::<Result<_>>()?;
    // Plan: one entry per original tensor; a fused in_proj gathers q, k, v in that order.
    struct Planned {
        entry: Entry,
        /// (component index, diffusers names)
        parts: (usize, Vec<String>),
    }
    let mut plan: Vec<Planned> = Vec::new();
    let mut fused: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0u64;
    for (ci, (c, store)) in comps.iter().zip(&stores).enumerate() {
        total += store.data_bytes();
        for n in store.logical_names() {
            let (dtype, shape) = dense_entry(store, c, &n)?;
            let Some(orig) = map.original(c, &n) else {
                continue; // not part of the SD2 layout (e.g. position_ids)
            };
            let oname = orig.names[0].clone();
            match orig.third {
                None => {
                    // VAE attention Linear weights are 1x1 convolutions in the original.
                    let mut shape = shape;
                    if *c == "vae" && n.contains(".attentions.") && n.ends_with(".weight") && shape.len() == 2
                    {
                        shape.extend([1, 1]);
                    }
                    plan.push(Planned { entry: Entry { name: oname, dtype, shape }, parts: (ci, vec![n]) });
                }
                Some(i) => {
                    let idx = *fused.entry(oname.clone()).or_insert_with(|| {
                        let mut s = shape.clone();
                        s[0] *= 3;
                        plan.push(Planned {
                            entry: Entry { name: oname.clone(), dtype, shape: s },
                            parts: (ci, vec![String::new(); 3]),
                        });
                        plan.len() - 1
                    });
                    plan[idx].parts.1[i] = n;
                }
            }
        }
    }
    if let Some(p) = plan.iter().find(|p| p.parts.1.iter().any(String::is_empty)) {
        return Err(Error::Checkpoint(format!(
            "{}: q, k or v of {} is missing",
            model.display(),
            p.entry.name
        )));
    }
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let base = out.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "out".into());
    let tmp = parent.join(format!(".{base}.sdsparse-tmp-{}", std::process::id()));
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    progress(Progress::Begin { total_bytes: total });
    let result = (|| -> Result<u64> {
        let mut w = StreamWriter::create(&tmp, plan.iter().map(|p| p.entry.clone()).collect(), &meta)?;
        for p in &plan {
            let store = &stores[p.parts.0];
            let mut bytes: Vec<u8> = Vec::new();
            for n in &p.parts.1 {
                let (b, read) = dense_bytes(store, n)?;
                bytes.extend_from_slice(&b);
                progress(Progress::Advance { bytes: read });
            }
            w.write(&p.entry.name, &bytes)?;
        }
        w.finish(&meta)
    })();
    let size = match result {
        Ok(size) => size,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(out, e)
    })?;
    progress(Progress::Finish);
    Ok(ExportReport { out: out.to_path_buf(), components: vec![("single-file".into(), size)] })
}

/// One component in an inspection.
#[derive(Debug, Clone)]
pub struct InspectComponent {
    pub name: String,
    /// The sparse header when the component is converted.
    pub header: Option<SparseHeader>,
    pub tensors: Vec<LayerReport>,
    pub file_bytes: u64,
}

/// Per-tensor format, shape, sparsity and bytes of a dense or sparse pipeline folder, of
/// one component folder, or of a single-file checkpoint (under diffusers names).
pub fn inspect(path: &Path) -> Result<Vec<InspectComponent>> {
    inspect_with(path, &SingleFileOptions::default())
}

/// [`inspect`] with single-file options for a single-file input.
pub fn inspect_with(path: &Path, single_file: &SingleFileOptions) -> Result<Vec<InspectComponent>> {
    let stores: Vec<(String, ComponentStore)> = if path.is_file() || path.join("model_index.json").is_file() {
        let src = ModelSource::open(path, single_file)?;
        src.weight_components()?
            .into_iter()
            .map(|c| Ok((c.clone(), src.store(&c)?)))
            .collect::<Result<_>>()?
    } else if path.is_dir() {
        let name = path.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        vec![(name, ComponentStore::open(path)?)]
    } else {
        return Err(Error::Checkpoint(format!("{}: not found", path.display())));
    };
    let mut out = Vec::new();
    for (name, store) in stores {
        let header = store.sparse_header().cloned();
        let mut tensors = Vec::new();
        for n in store.logical_names() {
            if let Some(rec) = header.as_ref().and_then(|h| h.layers.get(&n)) {
                let bytes: u64 = rec
                    .pattern
                    .suffixes()
                    .iter()
                    .map(|s| store.raw(&format!("{n}{s}")).map(|r| r.bytes.len() as u64).unwrap_or(0))
                    .sum();
                tensors.push(LayerReport {
                    name: n.clone(),
                    shape: rec.shape.clone(),
                    format: rec.pattern.as_str().to_string(),
                    dtype: rec.dtype.clone(),
                    numel: rec.shape.iter().product(),
                    zeros: rec.pruned as usize,
                    bytes,
                    note: None,
                });
            } else {
                let raw = store.raw(&n)?;
                let zeros = count_zeros(&raw);
                tensors.push(LayerReport {
                    name: n.clone(),
                    shape: raw.shape.to_vec(),
                    format: "dense".into(),
                    dtype: raw
                        .float_dtype()
                        .map(|d| d.name().to_string())
                        .unwrap_or_else(|| format!("{:?}", raw.dtype).to_lowercase()),
                    numel: raw.shape.iter().product(),
                    zeros,
                    bytes: raw.bytes.len() as u64,
                    note: header.as_ref().and_then(|h| h.kept_dense.get(&n).cloned()),
                });
            }
        }
        let file_bytes = if store.is_mapped() {
            store.data_bytes()
        } else {
            store.files.iter().map(|f| std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0)).sum()
        };
        out.push(InspectComponent { name, header, tensors, file_bytes });
    }
    Ok(out)
}

/// Zero elements of a float tensor (0 for other dtypes).
fn count_zeros(raw: &RawTensor<'_>) -> usize {
    match raw.dtype {
        StDtype::F32 => {
            raw.bytes.chunks_exact(4).filter(|c| c.iter().all(|&b| b == 0) || c == &[0, 0, 0, 0x80]).count()
        }
        StDtype::F16 | StDtype::BF16 => {
            raw.bytes.chunks_exact(2).filter(|c| c[0] == 0 && (c[1] & 0x7f) == 0).count()
        }
        _ => 0,
    }
}
