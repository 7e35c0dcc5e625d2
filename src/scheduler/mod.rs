//! Noise schedulers (DDIM, Euler discrete, DPM-Solver++ 2M, PNDM) behind one trait,
//! configured from a checkpoint's `scheduler_config.json` as diffusers does.
//!
//! The step math is elementwise on the latents, which are small (4 x 96 x 96 for SD2), so
//! schedulers work on host vectors and return CPU tensors; the pipeline moves them to the
//! model's device. Scalars follow diffusers' float32 arithmetic (betas from a float32
//! `linspace`, `alphas_cumprod` accumulated in double as torch's CPU `cumprod` does and
//! rounded to float32), so our latents match diffusers' to float32 rounding.
//!
//! Any scheduler can be built from any scheduler's config (diffusers' `from_config`): each
//! option the config does not name takes the default of the scheduler being built.

mod ddim;
mod dpmpp2m;
mod euler;
mod pndm;

pub use ddim::DdimScheduler;
pub use dpmpp2m::DpmSolverMultistepScheduler;
pub use euler::EulerDiscreteScheduler;
pub use pndm::PndmScheduler;

use crate::backend::Tensor;
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// One sampler: the timesteps to call the model at and the update after each call.
pub trait Scheduler: Send {
    /// Short name as on the command line (`ddim`, `euler`, `dpm++2m`, `pndm`).
    fn name(&self) -> &'static str;
    /// The timesteps fed to the model, one per model call, in call order.
    fn timesteps(&self) -> &[f32];
    /// The standard deviation of the initial noise (unit noise is multiplied by it); 1 for the
    /// alpha-parameterised schedulers, Euler's is its largest sigma.
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }
    /// The model input at call `index`: the identity except for Euler, which divides by
    /// `sqrt(sigma² + 1)`.
    fn scale_model_input(&self, sample: &Tensor, _index: usize) -> Result<Tensor> {
        Ok(sample.clone())
    }
    /// The latents after model call `index`, from the (guided) model output and the latents
    /// before that call. Calls must come in order 0, 1, 2, ...: multistep solvers keep history.
    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor>;
}

/// Which scheduler to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    Euler,
    DpmPp2m,
    Pndm,
}

impl SchedulerKind {
    /// From a command-line name: `ddim`, `euler`, `dpm++2m`, `pndm`.
    pub fn from_cli_name(name: &str) -> Result<Self> {
        match name.to_ascii_lowercase().as_str() {
            "ddim" => Ok(Self::Ddim),
            "euler" => Ok(Self::Euler),
            "dpm++2m" | "dpmpp2m" => Ok(Self::DpmPp2m),
            "pndm" => Ok(Self::Pndm),
            other => Err(Error::Invalid(format!(
                "unknown scheduler {other:?}; expected one of ddim, euler, dpm++2m, pndm"
            ))),
        }
    }

    /// From diffusers' `_class_name`.
    pub fn from_class_name(class: &str) -> Result<Self> {
        match class {
            "DDIMScheduler" => Ok(Self::Ddim),
            "EulerDiscreteScheduler" => Ok(Self::Euler),
            "DPMSolverMultistepScheduler" => Ok(Self::DpmPp2m),
            "PNDMScheduler" => Ok(Self::Pndm),
            other => Err(Error::Invalid(format!(
                "scheduler class {other:?} is not supported (supported: DDIMScheduler, \
                 EulerDiscreteScheduler, DPMSolverMultistepScheduler, PNDMScheduler); \
                 pick one with --scheduler"
            ))),
        }
    }

    pub fn cli_name(self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::DpmPp2m => "dpm++2m",
            Self::Pndm => "pndm",
        }
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

/// How inference timesteps are spread over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

/// `scheduler/scheduler_config.json`, as read: options a file omits stay `None` and take the
/// default of whichever scheduler is built from it (as diffusers' `from_config`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<usize>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub skip_prk_steps: Option<bool>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub final_sigmas_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    /// Values that apply only when the file's own class (`_class_name`) is built: options the
    /// file does not name, whose class default diffusers' pipeline corrected on load
    /// ([`SchedulerConfig::apply_pipeline_corrections`]). Another class built from this config
    /// (`--scheduler`) takes its own defaults for them, as diffusers' `from_config` does (it
    /// drops the keys listed in `_use_default_values`).
    #[serde(skip)]
    pub own_class_corrections: OwnClassCorrections,
}

/// See [`SchedulerConfig::own_class_corrections`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnClassCorrections {
    pub steps_offset: Option<usize>,
    pub clip_sample: Option<bool>,
}

impl SchedulerConfig {
    /// Reads `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))
    }

    pub fn from_json(text: &str) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| Error::Checkpoint(format!("bad scheduler config: {e}")))
    }

    /// The config the SD2.1 checkpoints ship (DDIM, scaled_linear 0.00085..0.012, leading,
    /// steps_offset 1); `v_prediction` for the 768px model, `epsilon` for `-base`.
    pub fn sd2_1(prediction: PredictionType) -> Self {
        SchedulerConfig {
            class_name: Some("DDIMScheduler".into()),
            num_train_timesteps: Some(1000),
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some("scaled_linear".into()),
            prediction_type: Some(
                match prediction {
                    PredictionType::Epsilon => "epsilon",
                    PredictionType::VPrediction => "v_prediction",
                }
                .into(),
            ),
            timestep_spacing: Some("leading".into()),
            steps_offset: Some(1),
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            ..Default::default()
        }
    }

    /// The corrections diffusers' `StableDiffusionPipeline.__init__` applies to the scheduler
    /// it loads (diffusers 0.42, with a deprecation warning each): `steps_offset` other than
    /// 1 becomes 1, and `clip_sample` true becomes false. They apply to the scheduler as
    /// diffusers instantiates it, i.e. with the class defaults filled in (DDIM's default
    /// `steps_offset` is 0 and `clip_sample` true, so an old DDIM config that omits both is
    /// corrected too). Returns what was corrected, for one note to the user; empty when the
    /// config needed nothing.
    pub fn apply_pipeline_corrections(&mut self) -> Vec<String> {
        let own = self.kind().ok();
        let class = self.class_name.clone().unwrap_or_else(|| "the scheduler".into());
        let mut notes = Vec::new();
        // Every supported class has `steps_offset` (default 0).
        match self.steps_offset {
            Some(1) => {}
            Some(v) => {
                self.steps_offset = Some(1);
                notes.push(format!("steps_offset {v} -> 1"));
            }
            None if own.is_some() => {
                self.own_class_corrections.steps_offset = Some(1);
                notes.push(format!("steps_offset (missing; {class} default 0) -> 1"));
            }
            None => {}
        }
        // Only DDIM has `clip_sample` (default true); a value the file spells out is kept for
        // other classes too (diffusers keeps it in the config) and corrected the same way.
        match self.clip_sample {
            Some(true) => {
                self.clip_sample = Some(false);
                notes.push("clip_sample true -> false".into());
            }
            None if own == Some(SchedulerKind::Ddim) => {
                self.own_class_corrections.clip_sample = Some(false);
                notes.push(format!("clip_sample (missing; {class} default true) -> false"));
            }
            _ => {}
        }
        notes
    }

    /// The config the pipeline builds its own scheduler from (no `--scheduler`): this one,
    /// plus the pipeline's corrections of the class defaults when `kind` is the file's own
    /// class. An explicitly chosen scheduler is built from the config as read, as diffusers'
    /// `Scheduler.from_config(pipe.scheduler.config)` does.
    pub fn for_kind(&self, kind: SchedulerKind) -> SchedulerConfig {
        let mut c = self.clone();
        if self.kind().ok() == Some(kind) {
            let own = &self.own_class_corrections;
            c.steps_offset = c.steps_offset.or(own.steps_offset);
            c.clip_sample = c.clip_sample.or(own.clip_sample);
        }
        c
    }

    /// The scheduler the file names (`_class_name`).
    pub fn kind(&self) -> Result<SchedulerKind> {
        match &self.class_name {
            Some(c) => SchedulerKind::from_class_name(c),
            None => Err(Error::Checkpoint("scheduler config has no _class_name".into())),
        }
    }

    pub(crate) fn num_train(&self) -> usize {
        self.num_train_timesteps.unwrap_or(1000)
    }

    pub(crate) fn prediction(&self) -> Result<PredictionType> {
        match self.prediction_type.as_deref().unwrap_or("epsilon") {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            other => Err(Error::Invalid(format!(
                "prediction_type {other:?} is not supported (epsilon or v_prediction)"
            ))),
        }
    }

    /// `timestep_spacing`, or the built scheduler's default when the file has none.
    pub(crate) fn spacing(&self, default: TimestepSpacing) -> Result<TimestepSpacing> {
        match self.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("leading") => Ok(TimestepSpacing::Leading),
            Some("trailing") => Ok(TimestepSpacing::Trailing),
            Some("linspace") => Ok(TimestepSpacing::Linspace),
            Some(other) => Err(Error::Invalid(format!(
                "timestep_spacing {other:?} is not supported (leading, trailing or linspace)"
            ))),
        }
    }

    /// Errors for options that change the math in ways we do not implement.
    pub(crate) fn reject_unsupported(&self, scheduler: &str) -> Result<()> {
        let flags = [
            ("thresholding", self.thresholding),
            ("rescale_betas_zero_snr", self.rescale_betas_zero_snr),
            ("use_karras_sigmas", self.use_karras_sigmas),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
        ];
        for (name, value) in flags {
            if value == Some(true) {
                return Err(Error::Invalid(format!(
                    "{scheduler}: scheduler option {name}=true is not supported"
                )));
            }
        }
        if let Some(t) = self.timestep_type.as_deref() {
            if t != "discrete" {
                return Err(Error::Invalid(format!("{scheduler}: timestep_type {t:?} is not supported")));
            }
        }
        Ok(())
    }

    /// `alphas_cumprod[t]` for the training timesteps, as diffusers computes it in float32.
    pub fn alphas_cumprod(&self) -> Result<Vec<f32>> {
        let n = self.num_train();
        if n < 2 {
            return Err(Error::Invalid(format!("num_train_timesteps must be at least 2, got {n}")));
        }
        let betas: Vec<f32> = if let Some(b) = &self.trained_betas {
            if b.len() != n {
                return Err(Error::Invalid(format!(
                    "trained_betas has {} values, num_train_timesteps is {n}",
                    b.len()
                )));
            }
            b.iter().map(|&x| x as f32).collect()
        } else {
            let start = self.beta_start.unwrap_or(0.0001);
            let end = self.beta_end.unwrap_or(0.02);
            match self.beta_schedule.as_deref().unwrap_or("linear") {
                "linear" => torch_linspace_f32(start, end, n),
                "scaled_linear" => {
                    torch_linspace_f32(start.sqrt(), end.sqrt(), n).into_iter().map(|b| b * b).collect()
                }
                "squaredcos_cap_v2" => betas_for_cosine_alpha_bar(n),
                other => return Err(Error::Invalid(format!("beta_schedule {other:?} is not supported"))),
            }
        };
        // torch's CPU cumprod accumulates float32 in double and rounds each output.
        let mut acc = 1.0f64;
        Ok(betas
            .iter()
            .map(|&b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect())
    }
}

/// `torch.linspace(start, end, steps, dtype=float32)`: float32 arithmetic, the first half
/// counted up from `start`, the second half down from `end` (as torch's CPU kernel).
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (s, e) = (start as f32, end as f32);
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { s + step * i as f32 } else { e - step * (steps - i - 1) as f32 })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine schedule (max beta 0.999).
fn betas_for_cosine_alpha_bar(n: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0).cos().powi(2);
    (0..n)
        .map(|i| {
            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// numpy `np.round` (half to even), used by diffusers' timestep arithmetic.
pub(crate) fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 {
        2.0 * (x / 2.0).round()
    } else {
        r
    }
}

/// `np.arange(start, stop, -step)` for a positive `step` (values `start - k*step > stop`).
pub(crate) fn arange_down(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / -step).ceil().max(0.0) as usize;
    (0..len).map(|k| start + k as f64 * -step).collect()
}

/// `np.linspace(start, stop, num)` in float64 (`i * step + start`, the last value exact).
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.interp(x, 0..len, ys)` on integer grid points.
pub(crate) fn interp_grid(x: f64, ys: &[f64]) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    // numpy: slope*(x - xp[i]) + fp[i]
    (ys[i + 1] - ys[i]) * w + ys[i]
}

/// Checks that the number of inference steps is usable.
pub(crate) fn check_steps(steps: usize, num_train: usize) -> Result<()> {
    if steps == 0 {
        return Err(Error::Invalid("the number of steps must be at least 1".into()));
    }
    if steps > num_train {
        return Err(Error::Invalid(format!(
            "{steps} steps is more than the {num_train} training timesteps of this scheduler"
        )));
    }
    Ok(())
}

/// Host copies of two same-shape tensors.
pub(crate) fn host_pair(a: &Tensor, b: &Tensor) -> Result<(Vec<f32>, Vec<f32>)> {
    if a.shape() != b.shape() {
        return Err(Error::Shape(format!(
            "scheduler step: model output {:?} and sample {:?} differ",
            a.shape(),
            b.shape()
        )));
    }
    Ok((a.to_vec()?, b.to_vec()?))
}

pub(crate) fn check_index(index: usize, len: usize) -> Result<()> {
    if index >= len {
        return Err(Error::Invalid(format!("scheduler step {index} is past the last of {len} steps")));
    }
    Ok(())
}

/// Builds scheduler `kind` for `steps` inference steps from `config` (any class's config).
/// This is diffusers' `from_config`: options the file does not name take `kind`'s defaults,
/// also for the file's own class (the pipeline's corrections of those defaults apply to the
/// scheduler the pipeline loads: build that one from [`SchedulerConfig::for_kind`]).
pub fn build(kind: SchedulerKind, config: &SchedulerConfig, steps: usize) -> Result<Box<dyn Scheduler>> {
    let s: Box<dyn Scheduler> = match kind {
        SchedulerKind::Ddim => Box::new(DdimScheduler::new(config, steps)?),
        SchedulerKind::Euler => Box::new(EulerDiscreteScheduler::new(config, steps)?),
        SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistepScheduler::new(config, steps)?),
        SchedulerKind::Pndm => Box::new(PndmScheduler::new(config, steps)?),
    };
    check_schedule(s.name(), s.timesteps(), config.num_train(), steps)?;
    Ok(s)
}

/// Refuses a schedule that cannot sample, where diffusers raises or returns NaN (see
/// `tests/fixtures/scheduler-edges.json`): a timestep past the training schedule (DDIM, PNDM
/// and DPM-Solver++ index their tables with it; Euler interpolates, clamping, and samples),
/// or, for DPM-Solver++, the same timestep twice (zero log-SNR step: a division by zero).
/// PNDM repeats timesteps by design.
pub(crate) fn check_schedule(name: &str, timesteps: &[f32], num_train: usize, steps: usize) -> Result<()> {
    if name != "euler" {
        if let Some(t) = timesteps.iter().find(|&&t| !(t >= 0.0 && t < num_train as f32)) {
            return Err(Error::Invalid(format!(
                "{name}: {steps} steps give timestep {t}, past the {num_train} training timesteps of this \
                 scheduler config; use fewer steps or another timestep_spacing"
            )));
        }
    }
    if name == "dpm++2m" && timesteps.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::Invalid(format!(
            "{name}: {steps} steps repeat a timestep on this {num_train}-timestep schedule, which this \
             solver cannot step over; use fewer steps or another timestep_spacing"
        )));
    }
    Ok(())
}

/// Leading/trailing/linspace integer timesteps as DDIM and PNDM compute them (descending).
pub(crate) fn integer_timesteps(
    spacing: TimestepSpacing,
    steps: usize,
    num_train: usize,
    steps_offset: usize,
) -> Vec<i64> {
    match spacing {
        TimestepSpacing::Linspace => {
            let last = (num_train - 1) as f64;
            let mut t: Vec<i64> =
                np_linspace(0.0, last, steps).into_iter().map(|x| round_half_even(x) as i64).collect();
            t.reverse();
            t
        }
        TimestepSpacing::Leading => {
            let ratio = num_train / steps;
            (0..steps).rev().map(|i| (i * ratio + steps_offset) as i64).collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = num_train as f64 / steps as f64;
            arange_down(num_train as f64, 0.0, ratio)
                .into_iter()
                .map(|x| round_half_even(x) as i64 - 1)
                .collect()
        }
    }
}
