//! `sdsparse sweep`: quality against sparsity, the pruning study's measurement. For each
//! point (component x method x sparsity) the dense model's text encoder and/or UNet are pruned
//! **in memory** (pruned elements zeroed in an f32 copy, the same masks `convert` computes:
//! `prune::Selection`, keys, layer or global cut, unstructured or 2:4), the prompt set is
//! generated with fixed seeds, and the images are compared with the dense run's
//! (`quality::deviation`) and, when the model folder has a `task.json`, scored
//! (`quality::task`). Results go to `results.json` (the resume state: points already there
//! are skipped) and `results.csv`; `plot` draws `curves.png` and `grid.png`; every image is
//! kept under `images/` for outside measures (FID, CLIP score).

pub mod plot;

use crate::backend::Tensor;
use crate::calibrate::{Calibration, CalibrationOptions};
use crate::checkpoint::{ComponentStore, VarBuilder};
use crate::error::{Error, Result};
use crate::format::codec::matrix_dims;
use crate::format::DType;
use crate::model::clip_text::{ClipTextConfig, ClipTextModel};
use crate::model::config::UNetConfig;
use crate::model::linear::Linear;
use crate::model::unet::UNet2DConditionModel;
use crate::pipeline::{self, GenerateRequest, StableDiffusion};
use crate::prune::wanda::OwlParams;
use crate::prune::{self, ComponentKind, Keys, Method, Pattern, Scope, Selection};
use crate::prune_model::{prune_linears, PruneOptions};
use crate::quality::{deviation, task};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// PSNR of identical images is infinite; means and files use this cap instead (dB).
pub const PSNR_CAP_DB: f64 = 100.0;
/// At most this many points in one sweep (a typo in a range should not start a week of work).
pub const MAX_POINTS: usize = 10_000;

/// Which components a point prunes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    #[serde(rename = "text-encoder")]
    TextEncoder,
    #[serde(rename = "unet")]
    Unet,
    #[serde(rename = "both")]
    Both,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::TextEncoder => "text-encoder",
            Target::Unet => "unet",
            Target::Both => "both",
        }
    }
    fn prunes(self, kind: ComponentKind) -> bool {
        matches!(
            (self, kind),
            (Target::Both, _)
                | (Target::TextEncoder, ComponentKind::TextEncoder)
                | (Target::Unet, ComponentKind::Unet)
        )
    }
}

impl std::str::FromStr for Target {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "text-encoder" | "text_encoder" | "te" => Ok(Target::TextEncoder),
            "unet" => Ok(Target::Unet),
            "both" => Ok(Target::Both),
            _ => {
                Err(Error::Invalid(format!("unknown component '{s}' (expected text-encoder, unet or both)")))
            }
        }
    }
}

/// Parses `start:stop:step` (inclusive of `stop` up to rounding) or a comma list
/// (`0.35,0.475`); every value must lie in [0, 1).
pub fn parse_sparsities(spec: &str) -> Result<Vec<f64>> {
    let bad = |why: String| Error::Invalid(format!("--sparsities {spec:?}: {why}"));
    let num = |s: &str| s.trim().parse::<f64>().map_err(|_| bad(format!("{s:?} is not a number")));
    let values: Vec<f64> = if spec.contains(':') {
        let parts: Vec<&str> = spec.split(':').collect();
        if parts.len() != 3 {
            return Err(bad("expected START:STOP:STEP, e.g. 0:0.9:0.05".into()));
        }
        let (a, b, st) = (num(parts[0])?, num(parts[1])?, num(parts[2])?);
        if !(st > 0.0 && st.is_finite()) {
            return Err(bad(format!("step {st} must be positive")));
        }
        if a > b || a.is_nan() || b.is_nan() {
            return Err(bad(format!("start {a} is above stop {b}")));
        }
        let n = ((b - a) / st + 1e-9).floor() as usize + 1;
        if n > MAX_POINTS {
            return Err(bad(format!("{n} values (at most {MAX_POINTS})")));
        }
        // Rounded to 1e-9 so 0.1 + 2 * 0.05 prints as 0.2.
        (0..n).map(|i| ((a + i as f64 * st) * 1e9).round() / 1e9).collect()
    } else {
        spec.split(',').map(num).collect::<Result<_>>()?
    };
    if values.is_empty() {
        return Err(bad("no values".into()));
    }
    for &v in &values {
        if !(0.0..1.0).contains(&v) {
            return Err(bad(format!("{v} is outside [0, 1)")));
        }
    }
    // A value given twice is one point (measured once), in the order first given.
    let mut unique: Vec<f64> = Vec::with_capacity(values.len());
    for v in values {
        if !unique.contains(&v) {
            unique.push(v);
        }
    }
    Ok(unique)
}

/// Everything a sweep is told.
#[derive(Debug, Clone)]
pub struct SweepOptions {
    pub model: PathBuf,
    pub out: PathBuf,
    pub targets: Vec<Target>,
    pub sparsities: Vec<f64>,
    pub methods: Vec<Method>,
    pub scope: Scope,
    pub pattern: Pattern,
    pub include_conv: bool,
    /// `None`: the task's default prompts (with `task.json`), else [`DEFAULT_PROMPTS`].
    pub prompts: Option<Vec<String>>,
    /// Seeds 0..seeds of the initial noise, for every prompt.
    pub seeds: usize,
    pub steps: usize,
    pub guidance: f32,
    /// Seed of the random pruning method.
    pub prune_seed: u64,
    /// OWL's hyper-parameters (method `owl`).
    pub owl: OwlParams,
    /// How the dense model is calibrated once for the methods that need it (wanda, owl).
    pub calibration: CalibrationOptions,
}

/// Prompts of a model without `task.json`.
pub const DEFAULT_PROMPTS: [&str; 4] = [
    "a photograph of an astronaut riding a horse",
    "a red sports car parked on a city street at night",
    "a bowl of fruit on a wooden table, oil painting",
    "a snowy mountain landscape at sunrise",
];

/// Default prompts of a task model: `n` scenes spread over the grammar (every colour as
/// shape and as background, every shape).
pub fn task_prompts(spec: &task::TaskSpec, n: usize) -> Vec<String> {
    let scenes = spec.all_scenes();
    // A stride coprime to the scene count walks every colour pair and shape evenly.
    let stride = (1..scenes.len())
        .rev()
        .find(|s| gcd(*s, scenes.len()) == 1 && *s * 7 < scenes.len() * 3)
        .unwrap_or(1);
    (0..n.min(scenes.len())).map(|i| spec.caption(&scenes[(i * stride) % scenes.len()])).collect()
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// One measured point (also the dense reference, `target: None`, sparsity 0).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PointResult {
    /// `None` for the dense run.
    pub target: Option<Target>,
    pub method: String,
    pub scope: String,
    pub pattern: String,
    pub include_conv: bool,
    /// Target sparsity of the pruned components' prunable tensors.
    pub sparsity: f64,
    /// Achieved fraction of zeroed elements among the prunable tensors, per component.
    pub text_encoder_sparsity: f64,
    pub unet_sparsity: f64,
    /// Task score (fraction of images with colour, shape and background right); `None`
    /// without `task.json`.
    pub task_score: Option<f64>,
    pub task_shape_colour: Option<f64>,
    pub task_shape: Option<f64>,
    pub task_background: Option<f64>,
    /// Means over the prompt-seed pairs.
    pub latent_rel_err: f64,
    pub psnr_db: f64,
    pub ssim: f64,
    pub images: usize,
    pub seconds: f64,
    /// Folder of this point's images, relative to the output folder.
    pub image_dir: String,
}

impl PointResult {
    /// The identity of a point (what resuming compares).
    pub fn key(&self) -> String {
        point_key(self.target, &self.method, &self.scope, &self.pattern, self.include_conv, self.sparsity)
    }
}

fn point_key(t: Option<Target>, method: &str, scope: &str, pattern: &str, conv: bool, s: f64) -> String {
    let t = t.map(|t| t.name()).unwrap_or("dense");
    format!("{t}/{method}/{scope}/{pattern}/conv={conv}/{s:.4}")
}

/// The state in `results.json`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct SweepResults {
    pub model: String,
    pub prompts: Vec<String>,
    pub seeds: usize,
    pub steps: usize,
    pub guidance: f32,
    pub has_task: bool,
    /// OWL's hyper-parameters and the calibration of the wanda / owl points (absent when the
    /// sweep has none): a resumed sweep must use the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibrated_with: Option<String>,
    pub points: Vec<PointResult>,
    /// How many of this run's planned points were already in `results.json` (resumed, not
    /// measured again); not stored.
    #[serde(skip)]
    pub reused_points: usize,
    /// How many planned points this run measured; not stored.
    #[serde(skip)]
    pub measured_points: usize,
}

/// What decides the wanda / owl points beyond the point itself (`None` without such points).
fn calibrated_with(opts: &SweepOptions) -> Option<String> {
    let c = &opts.calibration;
    opts.methods.iter().any(|m| m.needs_calibration()).then(|| {
        format!(
            "owl m={} lambda={}; calibration {} ({} captions, {} UNet runs x {} steps, seed {}, guidance {})",
            opts.owl.m,
            opts.owl.lambda,
            c.prompts.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "default captions".into()),
            c.samples,
            c.unet_samples,
            c.steps,
            c.seed,
            c.guidance
        )
    })
}

/// A planned point.
#[derive(Debug, Clone, Copy)]
pub struct Point {
    pub target: Target,
    pub method: Method,
    pub sparsity: f64,
}

impl SweepOptions {
    /// Checks the options and lists the points (errors before any work is done).
    pub fn plan(&self) -> Result<Vec<Point>> {
        if self.targets.is_empty() || self.methods.is_empty() || self.sparsities.is_empty() {
            return Err(Error::Invalid("sweep: no components, methods or sparsities given".into()));
        }
        if self.seeds == 0 || self.steps == 0 {
            return Err(Error::Invalid("sweep: --seeds and --steps must be at least 1".into()));
        }
        if let Some(p) = &self.prompts {
            if p.is_empty() {
                return Err(Error::Invalid("sweep: the prompt file has no prompts".into()));
            }
        }
        if self.methods.iter().any(|m| m.needs_calibration()) {
            if self.include_conv {
                return Err(Error::Invalid(
                    "--methods wanda / owl prune Linear layers only (as the study did); drop --include-conv \
                     or sweep those methods separately"
                        .into(),
                ));
            }
            self.calibration.captions()?;
            self.owl.validate()?;
        }
        if self.pattern == Pattern::Sparse24 {
            if let Some(s) = self.sparsities.iter().find(|&&s| s != 0.5) {
                return Err(Error::Invalid(format!(
                    "--sparsities: the 2:4 pattern is exactly 50% sparse, so {s} cannot be swept (give 0.5)"
                )));
            }
        }
        let mut v = Vec::new();
        for &target in &self.targets {
            for &method in &self.methods {
                for &sparsity in &self.sparsities {
                    v.push(Point { target, method, sparsity });
                }
            }
        }
        if v.len() > MAX_POINTS {
            return Err(Error::Invalid(format!("sweep: {} points (at most {MAX_POINTS})", v.len())));
        }
        Ok(v)
    }

    fn key(&self, p: &Point) -> String {
        point_key(
            Some(p.target),
            p.method.name(),
            self.scope.name(),
            self.pattern.name(),
            self.include_conv,
            p.sparsity,
        )
    }
}

/// The dense f32 tensors of a component folder, by stored name.
pub struct DenseComponent {
    pub kind: ComponentKind,
    pub tensors: Vec<(String, Tensor)>,
}

impl DenseComponent {
    /// The layers of `linears` that `selection` prunes (as `convert` and [`prune_in_memory`]
    /// decide it, from the stored name and shape: e.g. a 1x1-convolution `proj_in` is a
    /// convolution there).
    fn prunable<'a>(&self, linears: Vec<&'a mut Linear>, selection: &Selection) -> Vec<&'a mut Linear> {
        linears
            .into_iter()
            .filter(|l| {
                self.tensors
                    .iter()
                    .find(|(n, _)| n == l.name())
                    .is_some_and(|(n, t)| selection.is_prunable(self.kind, n, t.shape()))
            })
            .collect()
    }

    /// A VarBuilder over the dense tensors (a fresh model to prune in place).
    fn var_builder(&self, label: &str) -> VarBuilder {
        let t: HashMap<String, Tensor> = self.tensors.iter().cloned().collect();
        VarBuilder::new(Arc::new(ComponentStore::from_tensors(label, t)))
    }

    pub fn load(dir: &Path, kind: ComponentKind) -> Result<Self> {
        let store = ComponentStore::open(dir)?;
        if store.sparse_header().is_some() {
            return Err(Error::Invalid(format!(
                "{}: sweep needs a dense checkpoint (this one is already converted)",
                dir.display()
            )));
        }
        let tensors =
            store.names().into_iter().map(|n| store.tensor_f32(&n).map(|t| (n, t))).collect::<Result<_>>()?;
        Ok(DenseComponent { kind, tensors })
    }
}

/// Zeroes the pruned elements of a component in a copy of its tensors, with exactly the masks
/// `sdsparse convert` computes for the same options. Returns the tensors and the achieved
/// sparsity over the prunable tensors (0 when none is prunable).
pub fn prune_in_memory(
    dense: &DenseComponent,
    selection: &Selection,
    method: Method,
    scope: Scope,
    pattern: Pattern,
    sparsity: f64,
    seed: u64,
) -> Result<(HashMap<String, Tensor>, f64)> {
    let mut out: HashMap<String, Tensor> = HashMap::with_capacity(dense.tensors.len());
    let mut idx = Vec::new();
    for (i, (name, t)) in dense.tensors.iter().enumerate() {
        let prunable = selection.is_prunable(dense.kind, name, t.shape())
            && (pattern == Pattern::Unstructured || matrix_dims(t.shape()).1.is_multiple_of(4));
        if prunable && sparsity > 0.0 {
            idx.push(i);
        } else {
            out.insert(name.clone(), t.clone());
        }
    }
    let bytes = |i: usize| -> Result<&[u8]> { Ok(bytemuck::cast_slice(dense.tensors[i].1.as_slice()?)) };
    let keys = |i: usize| -> Result<Keys<'_>> {
        Ok(Keys::new(method, seed, &dense.tensors[i].0, DType::F32, bytes(i)?))
    };
    // Global scope: one exact cut over every prunable tensor of the component.
    let global = if scope == Scope::Global && pattern == Pattern::Unstructured && !idx.is_empty() {
        let total: usize = idx.iter().map(|&i| dense.tensors[i].1.numel()).sum();
        let k = prune::prune_count(sparsity, total);
        Some(prune::find_cuts(idx.len(), k, |f| {
            for (n, &i) in idx.iter().enumerate() {
                f(n, keys(i)?);
            }
            Ok(())
        })?)
    } else {
        None
    };
    let (mut pruned_total, mut numel_total) = (0usize, 0usize);
    for (n, &i) in idx.iter().enumerate() {
        let (name, t) = &dense.tensors[i];
        let (rows, cols) = matrix_dims(t.shape());
        let k = keys(i)?;
        let mask = match pattern {
            Pattern::Sparse24 => prune::sparse24_mask(k, rows, cols),
            Pattern::Unstructured => {
                let cut = match &global {
                    Some(cuts) => cuts[n].0,
                    None => prune::layer_cut(k, prune::prune_count(sparsity, t.numel()))?,
                };
                prune::unstructured_mask(k, rows, cols, cut).0
            }
        };
        let rb = crate::format::bitmap_row_bytes(cols);
        let mut v = t.to_vec()?;
        let mut pruned = 0;
        for r in 0..rows {
            for c in 0..cols {
                if mask[r * rb + c / 8] & (1 << (c % 8)) == 0 {
                    v[r * cols + c] = 0.0;
                    pruned += 1;
                }
            }
        }
        pruned_total += pruned;
        numel_total += t.numel();
        out.insert(name.clone(), Tensor::from_vec(v, t.shape())?);
    }
    let achieved = if numel_total == 0 { 0.0 } else { pruned_total as f64 / numel_total as f64 };
    Ok((out, achieved))
}

/// What one generation of the dense run left for the comparisons.
struct Reference {
    latents: Tensor,
    width: usize,
    height: usize,
    rgb: Vec<u8>,
}

/// Progress of a sweep, for a bar: `(images done, images in total, what runs now)`.
pub type ProgressFn<'a> = dyn FnMut(usize, usize, &str) + 'a;

/// Runs (or resumes) a sweep. Writes `results.json`, `results.csv`, `curves.png`, `grid.png`
/// and `images/` under `opts.out`; returns the results (dense point first).
pub fn run(opts: &SweepOptions, progress: &mut ProgressFn<'_>) -> Result<SweepResults> {
    let points = opts.plan()?;
    let spec = task::TaskSpec::from_model_dir(&opts.model)?;
    let prompts: Vec<String> = match (&opts.prompts, &spec) {
        (Some(p), _) => p.clone(),
        (None, Some(s)) => task_prompts(s, 30),
        (None, None) => DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect(),
    };
    let scenes: Option<Vec<Option<task::Scene>>> =
        spec.as_ref().map(|s| prompts.iter().map(|p| s.parse(p)).collect());
    if let (Some(s), Some(sc)) = (&spec, &scenes) {
        if let Some(i) = sc.iter().position(|x| x.is_none()) {
            return Err(Error::Invalid(format!(
                "prompt {:?} does not follow the task grammar {:?} of {}/task.json",
                prompts[i],
                s.grammar,
                opts.model.display()
            )));
        }
    }
    crate::checkpoint::source::require_dense(&opts.model, "sweep")?;
    std::fs::create_dir_all(&opts.out).map_err(|e| Error::io(&opts.out, e))?;
    let results_path = opts.out.join("results.json");
    let mut results = if results_path.exists() {
        let text = std::fs::read_to_string(&results_path).map_err(|e| Error::io(&results_path, e))?;
        let r: SweepResults = serde_json::from_str(&text).map_err(|e| {
            Error::Invalid(format!("{}: cannot resume from it ({e})", results_path.display()))
        })?;
        if r.prompts != prompts
            || r.seeds != opts.seeds
            || r.steps != opts.steps
            || r.guidance != opts.guidance
        {
            return Err(Error::Invalid(format!(
                "{} was made with other prompts, seeds, steps or guidance; use another --out (or delete it)",
                results_path.display()
            )));
        }
        let mut r = r;
        match (&r.calibrated_with, calibrated_with(opts)) {
            (Some(a), Some(b)) if *a != b => {
                return Err(Error::Invalid(format!(
                    "{} has wanda / owl points made with {a}, this sweep asks for {b}; use another --out",
                    results_path.display()
                )))
            }
            (None, b @ Some(_)) => r.calibrated_with = b,
            _ => {}
        }
        r
    } else {
        SweepResults {
            model: opts.model.display().to_string(),
            prompts: prompts.clone(),
            seeds: opts.seeds,
            steps: opts.steps,
            guidance: opts.guidance,
            has_task: spec.is_some(),
            calibrated_with: calibrated_with(opts),
            points: Vec::new(),
            reused_points: 0,
            measured_points: 0,
        }
    };
    let planned = points.len();
    let todo: Vec<Point> =
        points.into_iter().filter(|p| !results.points.iter().any(|r| r.key() == opts.key(p))).collect();
    results.reused_points = planned - todo.len();
    results.measured_points = todo.len();

    let per_point = prompts.len() * opts.seeds;
    // Points at sparsity 0 are the dense model: measured once, by the dense run.
    let total = per_point * (todo.iter().filter(|p| p.sparsity > 0.0).count() + 1);
    let mut done = 0usize;
    let mut sd = StableDiffusion::load(&opts.model, &crate::Device::Cpu)?;
    let te_dir = opts.model.join("text_encoder");
    let unet_dir = opts.model.join("unet");

    // The dense run: the reference of every comparison (always regenerated: it is one point).
    progress(done, total, "dense");
    let mut reference = Vec::with_capacity(per_point);
    let dense_dir = opts.out.join("images").join("dense");
    let t0 = std::time::Instant::now();
    let dense =
        generate_all(&sd, opts, &prompts, Some(&dense_dir), &mut |n| progress(done + n, total, "dense"))?;
    done += per_point;
    for g in dense {
        reference.push(g);
    }
    let dense_result = measure(
        opts,
        None,
        None,
        0.0,
        (0.0, 0.0),
        &reference,
        &reference,
        &spec,
        &scenes,
        t0,
        "images/dense",
    )?;
    results.points.retain(|p| p.target.is_some());
    results.points.insert(0, dense_result.clone());
    save_results(&opts.out, &results)?;

    if !todo.is_empty() {
        let te = DenseComponent::load(&te_dir, ComponentKind::TextEncoder)?;
        let unet = DenseComponent::load(&unet_dir, ComponentKind::Unet)?;
        let te_config = ClipTextConfig::from_file(&te_dir.join("config.json"))?;
        let unet_config = UNetConfig::from_file(&unet_dir)?;
        let selection = Selection { include_conv: opts.include_conv, ..Selection::default() };
        // Wanda / OWL: the dense model's activation statistics, gathered once for every point.
        let calibrated = |kind| todo.iter().any(|p| p.method.needs_calibration() && p.target.prunes(kind));
        let (cal_te, cal_unet) = (calibrated(ComponentKind::TextEncoder), calibrated(ComponentKind::Unet));
        let calibration = if cal_te || cal_unet {
            progress(done, total, "calibrating");
            crate::calibrate::calibrate(&opts.model, &opts.calibration, cal_te, cal_unet, &mut |c| {
                progress(done, total, &format!("calibrating {} {}/{}", c.stage, c.done, c.total))
            })?
        } else {
            Calibration::default()
        };
        let prune_opts = |p: &Point| PruneOptions {
            method: p.method,
            pattern: opts.pattern,
            scope: opts.scope,
            sparsity: p.sparsity,
            seed: opts.prune_seed,
            owl: opts.owl,
        };
        for p in &todo {
            if p.sparsity == 0.0 {
                let mut r = dense_result.clone();
                r.target = Some(p.target);
                r.method = p.method.name().to_string();
                r.scope = opts.scope.name().to_string();
                r.pattern = opts.pattern.name().to_string();
                r.include_conv = opts.include_conv;
                r.seconds = 0.0;
                results.points.push(r);
                continue;
            }
            let label = format!("{} {} {:.3}", p.target.name(), p.method.name(), p.sparsity);
            progress(done, total, &label);
            let t0 = std::time::Instant::now();
            let mut achieved = (0.0, 0.0);
            let mut old_te = None;
            let mut old_unet = None;
            // A component's builder: magnitude / random zero the pruned weights in memory (the
            // masks `convert` computes); Wanda / OWL load the dense weights and prune the loaded
            // Linear layers with `prune_linears` (the decisions `convert` makes), run compressed.
            let calibrated = p.method.needs_calibration();
            let builder = |dense: &DenseComponent, label: &str| -> Result<(VarBuilder, f64)> {
                if calibrated {
                    return Ok((dense.var_builder(label), 0.0));
                }
                let (t, a) = prune_in_memory(
                    dense,
                    &selection,
                    p.method,
                    opts.scope,
                    opts.pattern,
                    p.sparsity,
                    opts.prune_seed,
                )?;
                Ok((VarBuilder::new(Arc::new(ComponentStore::from_tensors(label, t))), a))
            };
            if p.target.prunes(ComponentKind::TextEncoder) {
                let (vb, a) = builder(&te, "pruned text_encoder")?;
                let mut m = ClipTextModel::new(&vb, &te_config)?;
                achieved.0 = a;
                if calibrated {
                    let linears = te.prunable(m.linears_mut(), &selection);
                    achieved.0 =
                        prune_linears(linears, &prune_opts(p), calibration.text_encoder.as_ref())?.sparsity();
                }
                old_te = Some(sd.replace_text_encoder(m));
            }
            if p.target.prunes(ComponentKind::Unet) {
                let (vb, a) = builder(&unet, "pruned unet")?;
                let mut m = UNet2DConditionModel::load(&vb, &unet_config)?;
                achieved.1 = a;
                if calibrated {
                    let linears = unet.prunable(m.linears_mut(), &selection);
                    achieved.1 =
                        prune_linears(linears, &prune_opts(p), calibration.unet.as_ref())?.sparsity();
                }
                old_unet = Some(sd.replace_unet(m));
            }
            let rel = format!(
                "images/{}-{}-{}-{}{}-{:.4}",
                p.target.name(),
                p.method.name(),
                opts.scope.name(),
                opts.pattern.name().replace(':', "of"),
                if opts.include_conv { "-conv" } else { "" },
                p.sparsity
            );
            let gens = generate_all(&sd, opts, &prompts, Some(&opts.out.join(&rel)), &mut |n| {
                progress(done + n, total, &label)
            })?;
            done += per_point;
            if let Some(m) = old_te {
                sd.replace_text_encoder(m);
            }
            if let Some(m) = old_unet {
                sd.replace_unet(m);
            }
            let r = measure(
                opts,
                Some(p.target),
                Some(p.method),
                p.sparsity,
                achieved,
                &gens,
                &reference,
                &spec,
                &scenes,
                t0,
                &rel,
            )?;
            results.points.push(r);
            save_results(&opts.out, &results)?;
        }
    }
    progress(total, total, "plots");
    plot::curves(&results, &opts.out.join("curves.png"))?;
    plot::grid(&results, &opts.out, &opts.out.join("grid.png"))?;
    Ok(results)
}

/// Generates every prompt x seed, saving `pNN_sNN.png` under `dir`.
fn generate_all(
    sd: &StableDiffusion,
    opts: &SweepOptions,
    prompts: &[String],
    dir: Option<&Path>,
    progress: &mut dyn FnMut(usize),
) -> Result<Vec<Reference>> {
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut out = Vec::new();
    for (i, prompt) in prompts.iter().enumerate() {
        for seed in 0..opts.seeds {
            let mut req = GenerateRequest::new(prompt);
            req.steps = opts.steps;
            req.guidance = opts.guidance;
            req.seed = seed as u64;
            let g = sd.generate(&req, &mut |_, _| {})?;
            let (width, height, rgb) = pipeline::image_to_rgb8(&g.image)?;
            if let Some(dir) = dir {
                write_png(&dir.join(image_name(i, seed)), width, height, &rgb)?;
            }
            out.push(Reference { latents: g.latents, width, height, rgb });
            progress(out.len());
        }
    }
    Ok(out)
}

/// Task score of any model folder with a `task.json` (dense, or converted by `sdsparse
/// convert`, e.g. at the study's mixed targets): the fraction of `prompts` x seeds `0..seeds`
/// whose image passes [`task::judge`].
pub fn task_score_of(
    model: &Path,
    prompts: &[String],
    seeds: usize,
    steps: usize,
    guidance: f32,
) -> Result<f64> {
    let spec = task::TaskSpec::from_model_dir(model)?
        .ok_or_else(|| Error::Invalid(format!("{}: no task.json, so no task score", model.display())))?;
    let scenes: Vec<task::Scene> = prompts
        .iter()
        .map(|p| {
            spec.parse(p).ok_or_else(|| Error::Invalid(format!("prompt {p:?} is not in the task grammar")))
        })
        .collect::<Result<_>>()?;
    let sd = StableDiffusion::load(model, &crate::Device::Cpu)?;
    let opts = SweepOptions {
        model: model.to_path_buf(),
        out: PathBuf::new(),
        targets: vec![],
        sparsities: vec![],
        methods: vec![],
        scope: Scope::Layer,
        pattern: Pattern::Unstructured,
        include_conv: false,
        prompts: None,
        seeds,
        steps,
        guidance,
        prune_seed: 0,
        owl: OwlParams::default(),
        calibration: CalibrationOptions::default(),
    };
    let gens = generate_all(&sd, &opts, prompts, None, &mut |_| {})?;
    let mut pass = 0;
    for (k, g) in gens.iter().enumerate() {
        pass += task::judge(&spec, &scenes[k / seeds], g.width, g.height, &g.rgb)?.pass() as usize;
    }
    Ok(pass as f64 / gens.len().max(1) as f64)
}

/// File name of prompt `i`, seed `s` inside a point's image folder.
pub fn image_name(i: usize, s: usize) -> String {
    format!("p{i:03}_s{s:03}.png")
}

/// Writes an RGB8 PNG through a temporary name (no half-written file under the final name).
pub fn write_png(path: &Path, width: usize, height: usize, rgb: &[u8]) -> Result<()> {
    let tmp = path.with_extension("png.tmp");
    image::save_buffer_with_format(
        &tmp,
        rgb,
        width as u32,
        height as u32,
        image::ExtendedColorType::Rgb8,
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Msg(format!("{}: cannot write PNG: {e}", path.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[allow(clippy::too_many_arguments)]
fn measure(
    opts: &SweepOptions,
    target: Option<Target>,
    method: Option<Method>,
    sparsity: f64,
    achieved: (f64, f64),
    gens: &[Reference],
    reference: &[Reference],
    spec: &Option<task::TaskSpec>,
    scenes: &Option<Vec<Option<task::Scene>>>,
    t0: std::time::Instant,
    image_dir: &str,
) -> Result<PointResult> {
    let n = gens.len() as f64;
    let (mut rel, mut psnr, mut ssim) = (0.0, 0.0, 0.0);
    let mut counts = [0usize; 4];
    for (k, (g, r)) in gens.iter().zip(reference).enumerate() {
        rel += deviation::latent_relative_error(&g.latents, &r.latents)?;
        psnr += deviation::psnr(&g.rgb, &r.rgb, g.width, g.height)?.min(PSNR_CAP_DB);
        ssim += deviation::ssim(&g.rgb, &r.rgb, g.width, g.height)?;
        if let (Some(spec), Some(scenes)) = (spec, scenes) {
            if let Some(scene) = scenes[k / opts.seeds] {
                let v = task::judge(spec, &scene, g.width, g.height, &g.rgb)?;
                counts[0] += v.pass() as usize;
                counts[1] += v.shape_colour as usize;
                counts[2] += v.shape as usize;
                counts[3] += v.background as usize;
            }
        }
    }
    let frac = |c: usize| spec.as_ref().map(|_| c as f64 / n);
    Ok(PointResult {
        target,
        method: method.map(|m| m.name()).unwrap_or("none").to_string(),
        scope: if target.is_some() { opts.scope.name() } else { "none" }.to_string(),
        pattern: if target.is_some() { opts.pattern.name() } else { "none" }.to_string(),
        include_conv: target.is_some() && opts.include_conv,
        sparsity,
        text_encoder_sparsity: achieved.0,
        unet_sparsity: achieved.1,
        task_score: frac(counts[0]),
        task_shape_colour: frac(counts[1]),
        task_shape: frac(counts[2]),
        task_background: frac(counts[3]),
        latent_rel_err: rel / n,
        psnr_db: psnr / n,
        ssim: ssim / n,
        images: gens.len(),
        seconds: t0.elapsed().as_secs_f64(),
        image_dir: image_dir.to_string(),
    })
}

/// Writes `results.json` and `results.csv` (each through a temporary name).
pub fn save_results(out: &Path, results: &SweepResults) -> Result<()> {
    let json = serde_json::to_string_pretty(results).map_err(|e| Error::Msg(format!("results.json: {e}")))?;
    write_atomic(&out.join("results.json"), json.as_bytes())?;
    let opt = |x: Option<f64>| x.map(|v| format!("{v:.4}")).unwrap_or_default();
    let mut csv = String::from(
        "component,method,scope,pattern,include_conv,sparsity,text_encoder_sparsity,unet_sparsity,task_score,\
         task_shape_colour,task_shape,task_background,latent_rel_err,psnr_db,ssim,images,seconds\n",
    );
    for p in &results.points {
        csv += &format!(
            "{},{},{},{},{},{:.4},{:.4},{:.4},{},{},{},{},{:.6},{:.3},{:.4},{},{:.2}\n",
            p.target.map(|t| t.name()).unwrap_or("dense"),
            p.method,
            p.scope,
            p.pattern,
            p.include_conv,
            p.sparsity,
            p.text_encoder_sparsity,
            p.unet_sparsity,
            opt(p.task_score),
            opt(p.task_shape_colour),
            opt(p.task_shape),
            opt(p.task_background),
            p.latent_rel_err,
            p.psnr_db,
            p.ssim,
            p.images,
            p.seconds
        );
    }
    write_atomic(&out.join("results.csv"), csv.as_bytes())
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
