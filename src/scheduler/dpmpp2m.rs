//! DPM-Solver++ 2M (multistep, second order, data prediction), as diffusers'
//! `DPMSolverMultistepScheduler` with `algorithm_type="dpmsolver++"`, `solver_order=2`.
//!
//! The first step and (with `lower_order_final`, fewer than 15 steps, or a zero final
//! sigma) the last step are first order, as in diffusers.

use super::euler::{final_sigma, training_sigmas};
use super::{
    arange_down, check_index, check_steps, host_pair, interp_grid, np_linspace, round_half_even,
    PredictionType, Scheduler, SchedulerConfig, TimestepSpacing,
};
use crate::backend::Tensor;
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SolverType {
    Midpoint,
    Heun,
}

pub struct DpmSolverMultistepScheduler {
    prediction: PredictionType,
    solver_type: SolverType,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_is_zero: bool,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    /// The data predictions (x0) of the previous call, for the second-order update.
    previous_x0: Option<Vec<f32>>,
    /// The index the next `step` call must have (the history is only valid in order).
    next_index: usize,
}

/// `(alpha_t, sigma_t)` of the variance-preserving process at noise level `sigma`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Half log-SNR `lambda = log(alpha) - log(sigma)` (+inf at sigma 0).
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverMultistepScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.reject_unsupported("DPM-Solver++")?;
        if let Some(a) = config.algorithm_type.as_deref() {
            // `--scheduler dpm++2m` on a DPM config of another flavour still means DPM++ 2M.
            if !matches!(a, "dpmsolver++" | "dpmsolver" | "sde-dpmsolver++" | "sde-dpmsolver") {
                return Err(Error::Invalid(format!("DPM-Solver: algorithm_type {a:?} is not supported")));
            }
        }
        let solver_type = match config.solver_type.as_deref().unwrap_or("midpoint") {
            "midpoint" => SolverType::Midpoint,
            "heun" => SolverType::Heun,
            other => {
                return Err(Error::Invalid(format!("DPM-Solver: solver_type {other:?} is not supported")))
            }
        };
        let num_train = config.num_train();
        check_steps(steps, num_train)?;
        let offset = config.steps_offset.unwrap_or(0) as i64;
        // With lambda_min_clipped = -inf (the default) the last usable timestep is num_train.
        let last = num_train;
        let timesteps: Vec<i64> = match config.spacing(TimestepSpacing::Linspace)? {
            TimestepSpacing::Linspace => np_linspace(0.0, (last - 1) as f64, steps + 1)
                .iter()
                .rev()
                .take(steps)
                .map(|&t| round_half_even(t) as i64)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = last / (steps + 1);
                (1..=steps).rev().map(|i| (i * ratio) as i64 + offset).collect()
            }
            TimestepSpacing::Trailing => arange_down(last as f64, 0.0, num_train as f64 / steps as f64)
                .into_iter()
                .map(|t| round_half_even(t) as i64 - 1)
                .collect(),
        };
        let train = training_sigmas(&config.alphas_cumprod()?);
        let train_f64: Vec<f64> = train.iter().map(|&s| s as f64).collect();
        let mut sigmas: Vec<f32> =
            timesteps.iter().map(|&t| interp_grid(t as f64, &train_f64) as f32).collect();
        let final_sigma_is_zero = config.final_sigmas_type.as_deref().unwrap_or("zero") == "zero";
        sigmas.push(final_sigma(config, &train)?);
        Ok(DpmSolverMultistepScheduler {
            prediction: config.prediction()?,
            solver_type,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigma_is_zero,
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            sigmas,
            previous_x0: None,
            next_index: 0,
        })
    }

    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
}

impl Scheduler for DpmSolverMultistepScheduler {
    fn name(&self) -> &'static str {
        "dpm++2m"
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        let n = self.timesteps.len();
        check_index(index, n)?;
        if index != self.next_index {
            return Err(Error::Invalid(format!(
                "DPM-Solver++ steps must run in order: expected step {}, got {index}",
                self.next_index
            )));
        }
        let (m, x) = host_pair(model_output, sample)?;

        // The model output as a data (x0) prediction.
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[index]);
        let x0: Vec<f32> = match self.prediction {
            PredictionType::Epsilon => {
                m.iter().zip(&x).map(|(&m, &x)| (x - sigma_s0 * m) / alpha_s0).collect()
            }
            PredictionType::VPrediction => {
                m.iter().zip(&x).map(|(&m, &x)| alpha_s0 * x - sigma_s0 * m).collect()
            }
        };

        let last_step = index == n - 1;
        let first_order_final = last_step
            && (self.euler_at_final || (self.lower_order_final && n < 15) || self.final_sigma_is_zero);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[index + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let sample_coeff = sigma_t / sigma_s0;
        let d0_coeff = alpha_t * ((-h).exp() - 1.0);

        let out: Vec<f32> = match (&self.previous_x0, first_order_final) {
            (Some(prev), false) => {
                // Second order: D1 is the finite difference of the x0 predictions in lambda.
                let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[index - 1]);
                let h_0 = lambda_s0 - lambda(alpha_s1, sigma_s1);
                let inv_r0 = 1.0 / (h_0 / h);
                let d1_coeff = match self.solver_type {
                    SolverType::Midpoint => -(0.5 * d0_coeff),
                    SolverType::Heun => alpha_t * (((-h).exp() - 1.0) / h + 1.0),
                };
                x.iter()
                    .zip(x0.iter().zip(prev))
                    .map(|(&x, (&m0, &m1))| {
                        let d1 = inv_r0 * (m0 - m1);
                        sample_coeff * x - d0_coeff * m0 + d1_coeff * d1
                    })
                    .collect()
            }
            _ => x.iter().zip(&x0).map(|(&x, &m0)| sample_coeff * x - d0_coeff * m0).collect(),
        };
        self.previous_x0 = Some(x0);
        self.next_index += 1;
        Tensor::from_vec(out, sample.shape())
    }
}
