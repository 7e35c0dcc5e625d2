//! Euler discrete (no churn), as diffusers' `EulerDiscreteScheduler`: latents live at scale
//! `sigma`, the model sees them divided by `sqrt(sigma² + 1)`.

use super::{
    arange_down, check_index, check_steps, host_pair, interp_grid, np_linspace, PredictionType, Scheduler,
    SchedulerConfig, TimestepSpacing,
};
use crate::backend::Tensor;
use crate::error::{Error, Result};

pub struct EulerDiscreteScheduler {
    prediction: PredictionType,
    timesteps: Vec<f32>,
    /// One sigma per timestep plus the final one (0, or the smallest training sigma).
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
}

/// Training sigmas `sqrt((1 - ᾱ) / ᾱ)` in float32, indexed by training timestep.
pub(crate) fn training_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// The last sigma appended after the inference sigmas (`final_sigmas_type`).
pub(crate) fn final_sigma(config: &SchedulerConfig, train_sigmas: &[f32]) -> Result<f32> {
    match config.final_sigmas_type.as_deref().unwrap_or("zero") {
        "zero" => Ok(0.0),
        "sigma_min" => Ok(train_sigmas[0]),
        other => Err(Error::Invalid(format!("final_sigmas_type {other:?} is not supported"))),
    }
}

impl EulerDiscreteScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.reject_unsupported("Euler")?;
        if let Some(t) = config.interpolation_type.as_deref() {
            if t != "linear" {
                return Err(Error::Invalid(format!("Euler: interpolation_type {t:?} is not supported")));
            }
        }
        let num_train = config.num_train();
        check_steps(steps, num_train)?;
        let spacing = config.spacing(TimestepSpacing::Linspace)?;
        let offset = config.steps_offset.unwrap_or(0) as f32;
        // Float timesteps as diffusers computes them (numpy float64, then float32).
        let timesteps: Vec<f32> = match spacing {
            TimestepSpacing::Linspace => {
                np_linspace(0.0, (num_train - 1) as f64, steps).iter().rev().map(|&t| t as f32).collect()
            }
            TimestepSpacing::Leading => {
                let ratio = num_train / steps;
                (0..steps).rev().map(|i| (i * ratio) as f32 + offset).collect()
            }
            TimestepSpacing::Trailing => arange_down(num_train as f64, 0.0, num_train as f64 / steps as f64)
                .into_iter()
                .map(|t| super::round_half_even(t) as f32 - 1.0)
                .collect(),
        };
        let train = training_sigmas(&config.alphas_cumprod()?);
        let train_f64: Vec<f64> = train.iter().map(|&s| s as f64).collect();
        let mut sigmas: Vec<f32> =
            timesteps.iter().map(|&t| interp_grid(t as f64, &train_f64) as f32).collect();
        sigmas.push(final_sigma(config, &train)?);
        let max_sigma = sigmas.iter().cloned().fold(0.0f32, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(EulerDiscreteScheduler { prediction: config.prediction()?, timesteps, sigmas, init_noise_sigma })
    }

    /// Sigmas per step plus the final one.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn name(&self) -> &'static str {
        "euler"
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }
    fn scale_model_input(&self, sample: &Tensor, index: usize) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let sigma = self.sigmas[index];
        let denom = (sigma * sigma + 1.0).sqrt();
        let x = sample.to_vec()?;
        Tensor::from_vec(x.into_iter().map(|v| v / denom).collect(), sample.shape())
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let (m, x) = host_pair(model_output, sample)?;
        let sigma = self.sigmas[index];
        let dt = self.sigmas[index + 1] - sigma;
        let v_in = -sigma / (sigma * sigma + 1.0).sqrt();
        let v_x = sigma * sigma + 1.0;
        let out = m
            .iter()
            .zip(&x)
            .map(|(&m, &x)| {
                let x0 = match self.prediction {
                    PredictionType::Epsilon => x - sigma * m,
                    PredictionType::VPrediction => m * v_in + x / v_x,
                };
                let derivative = (x - x0) / sigma;
                x + derivative * dt
            })
            .collect();
        Tensor::from_vec(out, sample.shape())
    }
}
