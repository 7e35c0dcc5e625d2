//! DDIM (deterministic, eta = 0), as diffusers' `DDIMScheduler`.

use super::{
    check_index, check_steps, host_pair, integer_timesteps, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing,
};
use crate::backend::Tensor;
use crate::error::Result;

pub struct DdimScheduler {
    alphas_cumprod: Vec<f32>,
    /// `alphas_cumprod` "before" timestep 0: 1, or `alphas_cumprod[0]` (`set_alpha_to_one`).
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    clip_sample: Option<f32>,
    /// Distance to the previous timestep: diffusers uses `num_train // steps` for any spacing.
    stride: i64,
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.reject_unsupported("DDIM")?;
        let num_train = config.num_train();
        check_steps(steps, num_train)?;
        let alphas_cumprod = config.alphas_cumprod()?;
        let final_alpha_cumprod =
            if config.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] };
        let spacing = config.spacing(TimestepSpacing::Leading)?;
        let timesteps = integer_timesteps(spacing, steps, num_train, config.steps_offset.unwrap_or(0));
        let clip_sample =
            config.clip_sample.unwrap_or(true).then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(DdimScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction: config.prediction()?,
            clip_sample,
            stride: (num_train / steps) as i64,
            timesteps_f32: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
        })
    }

    fn alpha_at(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[(t as usize).min(self.alphas_cumprod.len() - 1)]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for DdimScheduler {
    fn name(&self) -> &'static str {
        "ddim"
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        let (eps_or_v, x) = host_pair(model_output, sample)?;
        let t = self.timesteps[index];
        let alpha_t = self.alpha_at(t);
        let alpha_prev = self.alpha_at(t - self.stride);
        let beta_t = 1.0 - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());
        let (sqrt_a_prev, dir_coeff) = (alpha_prev.sqrt(), (1.0 - alpha_prev).sqrt());
        let out: Vec<f32> = eps_or_v
            .iter()
            .zip(&x)
            .map(|(&m, &x)| {
                let (mut x0, eps) = match self.prediction {
                    PredictionType::Epsilon => ((x - sqrt_b * m) / sqrt_a, m),
                    PredictionType::VPrediction => (sqrt_a * x - sqrt_b * m, sqrt_a * m + sqrt_b * x),
                };
                if let Some(r) = self.clip_sample {
                    x0 = x0.clamp(-r, r);
                }
                sqrt_a_prev * x0 + dir_coeff * eps
            })
            .collect();
        Tensor::from_vec(out, sample.shape())
    }
}
