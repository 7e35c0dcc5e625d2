//! The mixed sparsity plan (`sdsparse plan`): for every prunable Linear layer, choose dense,
//! 2:4 or unstructured-at-`s` so that the estimated cost is lowest while the estimated
//! quality loss stays within a budget. `convert --plan` applies it; `inspect` shows it.
//!
//! 1. Sensitivity: a short deterministic generation (`captions` captions, `steps` DDIM steps,
//!    guidance 7.5, seeded noise; no VAE) gives reference final latents `z`. For each layer
//!    and option, only that layer is pruned (magnitude, in memory) and the run repeated:
//!    `d = ‖z' − z‖² / ‖z‖²`. Text-encoder and UNet layers share this one scale.
//! 2. Cost: a layer `[out, in]` that sees `T` tokens per image costs `T · out · in · f`, with
//!    `f` the pattern's time factor ([`CostModel`]: dense 1, 2:4 0.6, unstructured
//!    `max(0.25, 1.15 − s)`, capped at 1). `T` is counted during the reference run; UNet
//!    tokens are scaled from `steps` to [`CostModel::image_steps`] denoising steps.
//! 3. Choice: minimise `Σ cost` subject to `Σ d ≤ budget` (sensitivities assumed additive),
//!    a multiple-choice knapsack solved exactly by dynamic programming over the budget cut
//!    into [`BUDGET_BINS`] bins (deviations rounded up, so the plan never exceeds it).
//! 4. Check: the chosen plan is applied as a whole and its measured deviation is recorded
//!    next to the predicted sum (docs/PRUNING.md reports how well additivity holds).

use crate::error::{Error, Result};
use crate::model::linear::Linear;
use crate::pipeline::{GenerateRequest, StableDiffusion};
use crate::prune::wanda::OwlParams;
use crate::prune::{Method, Pattern, Scope};
use crate::prune_model::{prune_linears, PruneOptions};
use crate::scheduler::SchedulerKind;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Bins the budget is cut into by the dynamic programme.
pub const BUDGET_BINS: usize = 2000;
/// Marks a plan file.
pub const PLAN_FORMAT: &str = "sdsparse-plan";

/// How `plan` measures.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanOptions {
    /// Upper bound on the summed relative deviation of the final latents.
    pub budget: f64,
    /// Unstructured sparsities offered to every layer (2:4 and dense are always offered).
    pub sparsities: Vec<f64>,
    /// Captions of the evaluation run (the first N default calibration captions).
    pub captions: usize,
    /// DDIM steps of the evaluation run.
    pub steps: usize,
    pub seed: u64,
    pub text_encoder: bool,
    pub unet: bool,
    pub cost: CostModel,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            budget: 0.01,
            sparsities: vec![0.3, 0.5, 0.7],
            captions: 1,
            steps: 2,
            seed: 0,
            text_encoder: true,
            unet: true,
            cost: CostModel::default(),
        }
    }
}

/// Relative time of a layer's GEMM by pattern (assumed, not measured: no GPU timings yet).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    /// 2:4 time relative to dense (sparse tensor cores: up to 2x on the math, ~1.6x end to end).
    pub sparse24: f64,
    /// Unstructured: `max(floor, offset − s)` relative to dense, capped at 1.
    pub unstructured_offset: f64,
    pub unstructured_floor: f64,
    /// Denoising steps per image the UNet's cost is scaled to.
    pub image_steps: usize,
}

impl Default for CostModel {
    fn default() -> Self {
        CostModel { sparse24: 0.6, unstructured_offset: 1.15, unstructured_floor: 0.25, image_steps: 50 }
    }
}

impl CostModel {
    /// Time factor of a choice.
    pub fn factor(&self, c: Choice) -> f64 {
        match c {
            Choice::Dense => 1.0,
            Choice::Sparse24 => self.sparse24,
            Choice::Unstructured(s) => (self.unstructured_offset - s).clamp(self.unstructured_floor, 1.0),
        }
    }
}

/// What a layer becomes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "pattern", content = "sparsity", rename_all = "lowercase")]
pub enum Choice {
    Dense,
    #[serde(rename = "2:4")]
    Sparse24,
    Unstructured(f64),
}

impl Choice {
    pub fn describe(&self) -> String {
        match self {
            Choice::Dense => "dense".into(),
            Choice::Sparse24 => "2:4".into(),
            Choice::Unstructured(s) => format!("unstructured {:.0}%", 100.0 * s),
        }
    }
}

/// One option of a layer with its measured deviation and its cost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerOption {
    pub choice: Choice,
    pub deviation: f64,
    pub cost: f64,
}

/// One layer of the plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerPlan {
    /// `text_encoder` or `unet`.
    pub component: String,
    pub name: String,
    pub shape: [usize; 2],
    /// Tokens the layer sees per image (UNet: scaled to `image_steps`).
    pub tokens_per_image: f64,
    /// Every option measured (dense first).
    pub options: Vec<LayerOption>,
    pub chosen: Choice,
}

impl LayerPlan {
    fn option(&self, c: Choice) -> Option<&LayerOption> {
        self.options.iter().find(|o| o.choice == c)
    }
}

/// A plan file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixedPlan {
    pub format: String,
    pub model: String,
    pub method: String,
    pub budget: f64,
    pub captions: usize,
    pub steps: usize,
    pub seed: u64,
    pub cost_model: CostModel,
    /// Σ cost of all layers dense.
    pub dense_cost: f64,
    /// Σ cost of the chosen options.
    pub cost: f64,
    /// Σ deviation of the chosen options (the additive prediction).
    pub predicted_deviation: f64,
    /// Deviation measured with the whole plan applied at once.
    pub measured_deviation: f64,
    pub layers: Vec<LayerPlan>,
}

impl MixedPlan {
    /// The choice for tensor `name` of `component` (also under transformers 4's
    /// `text_model.` prefix); `None` when the plan does not list it.
    pub fn choice(&self, component: &str, name: &str) -> Option<&LayerPlan> {
        let short = name.strip_prefix("text_model.").unwrap_or(name);
        self.layers.iter().find(|l| l.component == component && (l.name == name || l.name == short))
    }

    pub fn load(path: &Path) -> Result<MixedPlan> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let plan: MixedPlan = serde_json::from_str(&text)
            .map_err(|e| Error::Invalid(format!("{}: not an sdsparse plan ({e})", path.display())))?;
        if plan.format != PLAN_FORMAT {
            return Err(Error::Invalid(format!("{}: not an sdsparse plan", path.display())));
        }
        for l in &plan.layers {
            if let Choice::Unstructured(s) = l.chosen {
                if !(0.0..1.0).contains(&s) {
                    return Err(Error::Invalid(format!(
                        "{}: {}: sparsity {s} outside [0, 1)",
                        path.display(),
                        l.name
                    )));
                }
            }
        }
        Ok(plan)
    }

    /// Writes the plan to `path` (through a temporary file, renamed when complete).
    pub fn save(&self, path: &Path, force: bool) -> Result<()> {
        if path.exists() && !force {
            return Err(Error::Invalid(format!(
                "{} already exists (use --force to replace it)",
                path.display()
            )));
        }
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Format(e.to_string()))?;
        crate::output::write_file(path, (text + "\n").as_bytes())
    }
}

/// Chooses one option per layer: least total cost with total deviation within `budget`
/// (exact multiple-choice knapsack over `BUDGET_BINS` bins; deviations rounded up).
/// Dense (deviation 0) is always feasible.
pub fn choose(layers: &mut [LayerPlan], budget: f64) {
    let bins = BUDGET_BINS;
    let bin = |d: f64| -> usize {
        if budget <= 0.0 {
            return if d <= 0.0 { 0 } else { bins + 1 };
        }
        let b = (d.max(0.0) / budget * bins as f64).ceil();
        if b.is_finite() && b <= bins as f64 {
            b as usize
        } else {
            bins + 1
        }
    };
    const INF: f64 = f64::INFINITY;
    // best[b] = least cost of the layers so far using exactly b bins; choices kept per layer.
    let mut best = vec![INF; bins + 1];
    best[0] = 0.0;
    let mut picks: Vec<Vec<u16>> = Vec::with_capacity(layers.len());
    for l in layers.iter() {
        let mut next = vec![INF; bins + 1];
        let mut pick = vec![u16::MAX; bins + 1];
        for (oi, o) in l.options.iter().enumerate() {
            let w = bin(o.deviation);
            if w > bins {
                continue;
            }
            for b in 0..=bins - w {
                if best[b] < INF && best[b] + o.cost < next[b + w] {
                    next[b + w] = best[b] + o.cost;
                    pick[b + w] = oi as u16;
                }
            }
        }
        best = next;
        picks.push(pick);
    }
    // Cheapest end state, then walk back.
    let mut b = (0..=bins).min_by(|&x, &y| best[x].total_cmp(&best[y])).unwrap_or(0);
    for (l, pick) in layers.iter_mut().zip(&picks).rev() {
        let oi = pick[b] as usize;
        let o = l.options[oi];
        l.chosen = o.choice;
        b -= bin(o.deviation);
    }
}

/// The evaluation run's captions: for a model with a `task.json` (the toy), the first `n` of
/// the task's prompts (the sweep's defaults: the model was trained on that grammar and
/// nothing else), else the first `n` default calibration captions.
pub fn evaluation_captions(model: &Path, n: usize) -> Result<Vec<String>> {
    if let Some(spec) = crate::quality::task::TaskSpec::from_model_dir(model)? {
        let prompts = crate::sweep::task_prompts(&spec, n);
        if prompts.len() < n {
            return Err(Error::Invalid(format!(
                "--captions {n}: the task of {} has only {} distinct prompts",
                model.display(),
                prompts.len()
            )));
        }
        return Ok(prompts);
    }
    crate::calibrate::CalibrationOptions { samples: n, ..crate::calibrate::CalibrationOptions::default() }
        .captions()
}

/// Final latents of the evaluation run (concatenated over captions).
fn evaluate(sd: &StableDiffusion, captions: &[String], opts: &PlanOptions) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for (i, c) in captions.iter().enumerate() {
        let mut req = GenerateRequest::new(c);
        req.steps = opts.steps;
        req.scheduler = Some(SchedulerKind::Ddim);
        req.seed = opts.seed.wrapping_add(i as u64);
        out.extend(sd.denoise(&req, &mut |_, _| {})?.latents.to_vec()?);
    }
    Ok(out)
}

fn deviation(a: &[f32], reference: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(reference).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = reference.iter().map(|&y| (y as f64).powi(2)).sum();
    let d = num / den.max(f64::MIN_POSITIVE);
    if d.is_nan() {
        f64::INFINITY
    } else {
        d
    }
}

fn linears<'a>(sd: &'a mut StableDiffusion, component: &str) -> Vec<&'a mut Linear> {
    if component == "text_encoder" {
        sd.text_encoder_mut().linears_mut()
    } else {
        sd.unet_mut().linears_mut()
    }
}

/// Prunes the listed layers of a loaded pipeline in memory (magnitude, layer scope).
fn apply_choices(sd: &mut StableDiffusion, choices: &[(String, String, Choice)]) -> Result<()> {
    for component in ["text_encoder", "unet"] {
        for l in linears(sd, component) {
            let Some((_, _, c)) = choices.iter().find(|(comp, n, _)| comp == component && n == l.name())
            else {
                continue;
            };
            let (pattern, sparsity) = match *c {
                Choice::Dense => continue,
                Choice::Sparse24 => (Pattern::Sparse24, 0.5),
                Choice::Unstructured(s) => (Pattern::Unstructured, s),
            };
            let p = PruneOptions {
                method: Method::Magnitude,
                pattern,
                scope: Scope::Layer,
                sparsity,
                seed: 0,
                owl: OwlParams::default(),
            };
            prune_linears(vec![l], &p, None)?;
        }
    }
    Ok(())
}

/// Progress of `plan`: `done` of `total` evaluation runs.
pub type PlanProgress<'a> = &'a mut dyn FnMut(usize, usize);

/// Measures every layer's sensitivity in the dense pipeline `model` and chooses the plan.
pub fn make_plan(model: &Path, opts: &PlanOptions, progress: PlanProgress<'_>) -> Result<MixedPlan> {
    if !(opts.budget.is_finite() && opts.budget >= 0.0) {
        return Err(Error::Invalid(format!("--budget {} must be a non-negative number", opts.budget)));
    }
    if let Some(s) = opts.sparsities.iter().find(|s| !(0.0..1.0).contains(*s) || **s == 0.0) {
        return Err(Error::Invalid(format!("--sparsities: {s} is outside (0, 1)")));
    }
    if opts.steps == 0 || opts.captions == 0 {
        return Err(Error::Invalid("plan needs at least one caption and one step".into()));
    }
    crate::checkpoint::source::require_dense(model, "plan")?;
    let captions = evaluation_captions(model, opts.captions)?;
    let mut sd = StableDiffusion::load(model, &crate::backend::Device::Cpu)?;

    // Reference run, counting each layer's tokens.
    let rec = crate::calibrate::Recorder::new();
    for c in ["text_encoder", "unet"] {
        crate::calibrate::attach(linears(&mut sd, c), Some(rec.clone()));
    }
    let reference = evaluate(&sd, &captions, opts);
    for c in ["text_encoder", "unet"] {
        crate::calibrate::attach(linears(&mut sd, c), None);
    }
    let reference = reference?;
    let tokens = rec.take();

    let mut layers = Vec::new();
    for (component, on) in [("text_encoder", opts.text_encoder), ("unet", opts.unet)] {
        if !on {
            continue;
        }
        for l in linears(&mut sd, component) {
            let crate::format::Weight::Dense(w) = l.weight() else { continue };
            let (rows, cols) = w.dims2()?;
            let seen = tokens.get(l.name()).map(|s| s.tokens as f64).unwrap_or(0.0) / captions.len() as f64;
            let per_image = if component == "unet" {
                seen * opts.cost.image_steps as f64 / opts.steps as f64
            } else {
                seen
            };
            let mut choices = vec![Choice::Dense];
            if cols.is_multiple_of(4) {
                choices.push(Choice::Sparse24);
            }
            choices.extend(opts.sparsities.iter().map(|&s| Choice::Unstructured(s)));
            let base = per_image * (rows * cols) as f64;
            layers.push(LayerPlan {
                component: component.to_string(),
                name: l.name().to_string(),
                shape: [rows, cols],
                tokens_per_image: per_image,
                options: choices
                    .into_iter()
                    .map(|c| LayerOption { choice: c, deviation: 0.0, cost: base * opts.cost.factor(c) })
                    .collect(),
                chosen: Choice::Dense,
            });
        }
    }

    // Sensitivities: one layer pruned at a time.
    let total: usize = layers.iter().map(|l| l.options.len() - 1).sum();
    let mut done = 0;
    for l in layers.iter_mut() {
        let original = linears(&mut sd, &l.component)
            .into_iter()
            .find(|x| x.name() == l.name)
            .map(|x| x.weight().clone())
            .ok_or_else(|| Error::Msg(format!("{}: layer vanished", l.name)))?;
        for o in l.options.iter_mut().skip(1) {
            apply_choices(&mut sd, &[(l.component.clone(), l.name.clone(), o.choice)])?;
            let run = evaluate(&sd, &captions, opts);
            if let Some(x) = linears(&mut sd, &l.component).into_iter().find(|x| x.name() == l.name) {
                x.set_weight(original.clone())?;
            }
            o.deviation = deviation(&run?, &reference);
            done += 1;
            progress(done, total + 1);
        }
    }

    choose(&mut layers, opts.budget);
    let chosen: Vec<_> = layers.iter().map(|l| (l.component.clone(), l.name.clone(), l.chosen)).collect();
    apply_choices(&mut sd, &chosen)?;
    let measured = deviation(&evaluate(&sd, &captions, opts)?, &reference);
    progress(total + 1, total + 1);
    let sum = |f: &dyn Fn(&LayerPlan) -> f64| layers.iter().map(f).sum::<f64>();
    Ok(MixedPlan {
        format: PLAN_FORMAT.into(),
        model: model.display().to_string(),
        method: Method::Magnitude.name().into(),
        budget: opts.budget,
        captions: captions.len(),
        steps: opts.steps,
        seed: opts.seed,
        cost_model: opts.cost,
        dense_cost: sum(&|l| l.options[0].cost),
        cost: sum(&|l| l.option(l.chosen).map_or(0.0, |o| o.cost)),
        predicted_deviation: sum(&|l| l.option(l.chosen).map_or(0.0, |o| o.deviation)),
        measured_deviation: measured,
        layers,
    })
}

/// The measured deviation of the final latents (same evaluation run as [`make_plan`])
/// when every layer of `plan` takes its `chosen` option at once, in the dense pipeline
/// `model`. Used to check how well the additive prediction holds for other budgets.
pub fn measure(model: &Path, plan: &MixedPlan) -> Result<f64> {
    let opts =
        PlanOptions { captions: plan.captions, steps: plan.steps, seed: plan.seed, ..PlanOptions::default() };
    crate::checkpoint::source::require_dense(model, "plan")?;
    let captions = evaluation_captions(model, opts.captions)?;
    let mut sd = StableDiffusion::load(model, &crate::backend::Device::Cpu)?;
    let reference = evaluate(&sd, &captions, &opts)?;
    let chosen: Vec<_> =
        plan.layers.iter().map(|l| (l.component.clone(), l.name.clone(), l.chosen)).collect();
    apply_choices(&mut sd, &chosen)?;
    Ok(deviation(&evaluate(&sd, &captions, &opts)?, &reference))
}

impl MixedPlan {
    /// Re-chooses the layers for another budget from the measured sensitivities (the
    /// `measured_deviation` field is left as it was; see [`measure`]).
    pub fn rechoose(&mut self, budget: f64) {
        choose(&mut self.layers, budget);
        self.budget = budget;
        let pick = |l: &LayerPlan| l.option(l.chosen).copied();
        self.cost = self.layers.iter().filter_map(pick).map(|o| o.cost).sum();
        self.predicted_deviation = self.layers.iter().filter_map(pick).map(|o| o.deviation).sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(opts: &[(Choice, f64, f64)]) -> LayerPlan {
        LayerPlan {
            component: "unet".into(),
            name: "x".into(),
            shape: [4, 4],
            tokens_per_image: 1.0,
            options: opts
                .iter()
                .map(|&(choice, deviation, cost)| LayerOption { choice, deviation, cost })
                .collect(),
            chosen: Choice::Dense,
        }
    }

    #[test]
    fn knapsack_picks_the_cheapest_plan_within_budget() {
        let u = Choice::Unstructured(0.5);
        let mut ls = vec![
            layer(&[(Choice::Dense, 0.0, 10.0), (Choice::Sparse24, 0.004, 6.0), (u, 0.009, 5.0)]),
            layer(&[(Choice::Dense, 0.0, 10.0), (Choice::Sparse24, 0.002, 6.0), (u, 0.006, 4.0)]),
        ];
        // budget 0.01: options (24, 24)=12 dev .006; (24,u)=10 dev .010; (u,24)=11 dev .011 (over)
        choose(&mut ls, 0.01);
        assert_eq!((ls[0].chosen, ls[1].chosen), (Choice::Sparse24, u));
        choose(&mut ls, 0.0);
        assert_eq!((ls[0].chosen, ls[1].chosen), (Choice::Dense, Choice::Dense));
        choose(&mut ls, 1.0);
        assert_eq!((ls[0].chosen, ls[1].chosen), (u, u));
    }

    #[test]
    fn choices_serialise_readably() {
        let s = serde_json::to_string(&[Choice::Dense, Choice::Sparse24, Choice::Unstructured(0.5)]).unwrap();
        assert_eq!(s, r#"[{"pattern":"dense"},{"pattern":"2:4"},{"pattern":"unstructured","sparsity":0.5}]"#);
    }
}
