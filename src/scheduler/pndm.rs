//! PNDM (pseudo numerical methods), as diffusers' `PNDMScheduler`: optional Runge-Kutta
//! warm-up (PRK, 4 model calls per step over the last 3 steps) then linear multistep (PLMS)
//! with up to 4 past model outputs. SD2.1-base ships it with `skip_prk_steps: true`, where
//! the warm-up is one extra model call at the second timestep. Either way the schedule has
//! more model calls than inference steps: iterate over [`Scheduler::timesteps`].

use super::{
    check_index, check_steps, host_pair, integer_timesteps, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing,
};
use crate::backend::Tensor;
use crate::error::{Error, Result};

pub struct PndmScheduler {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    /// `num_train // steps`: the distance between consecutive inference timesteps.
    stride: i64,
    prk_timesteps: Vec<i64>,
    /// All model-call timesteps: PRK then PLMS.
    timesteps: Vec<i64>,
    timesteps_f32: Vec<f32>,
    /// Model calls done so far.
    counter: usize,
    /// Past model outputs (newest last, at most 4 kept for the PLMS formula).
    ets: Vec<Vec<f32>>,
    /// PRK: the running weighted sum of the 4 model outputs of one Runge-Kutta step.
    prk_sum: Option<Vec<f32>>,
    /// The sample every sub-step of the current Runge-Kutta (or first PLMS) step starts from.
    cur_sample: Option<Vec<f32>>,
}

impl PndmScheduler {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        config.reject_unsupported("PNDM")?;
        let num_train = config.num_train();
        check_steps(steps, num_train)?;
        let alphas_cumprod = config.alphas_cumprod()?;
        let final_alpha_cumprod =
            if config.set_alpha_to_one.unwrap_or(false) { 1.0 } else { alphas_cumprod[0] };
        let spacing = config.spacing(TimestepSpacing::Leading)?;
        // Ascending inference timesteps (`_timesteps` in diffusers).
        let mut ascending = integer_timesteps(spacing, steps, num_train, config.steps_offset.unwrap_or(0));
        ascending.reverse();
        let stride = (num_train / steps) as i64;
        let (prk, plms): (Vec<i64>, Vec<i64>) = if config.skip_prk_steps.unwrap_or(false) {
            // [t0, .., t_{n-2}, t_{n-2}, t_{n-1}] reversed: the second timestep is called twice.
            let n = ascending.len();
            let mut plms: Vec<i64> = ascending[..n - 1].to_vec();
            if n >= 2 {
                plms.push(ascending[n - 2]);
            }
            plms.push(ascending[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            const ORDER: usize = 4;
            if ascending.len() < ORDER {
                return Err(Error::Invalid(format!(
                    "PNDM with Runge-Kutta warm-up (skip_prk_steps false) needs at least {ORDER} steps, got {steps}"
                )));
            }
            let half = stride / 2;
            // Each of the last 4 timesteps t gives t and t + stride/2; all but the very last
            // are doubled, then the outer two values are dropped and the list reversed.
            let mut base = Vec::new();
            for &t in &ascending[ascending.len() - ORDER..] {
                base.push(t);
                base.push(t + half);
            }
            base.pop();
            let doubled: Vec<i64> = base.iter().flat_map(|&t| [t, t]).collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms = ascending[..ascending.len() - 3].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let timesteps: Vec<i64> = prk.iter().chain(&plms).copied().collect();
        if let Some(&t) = timesteps.iter().find(|&&t| t < 0 || t as usize >= num_train) {
            return Err(Error::Invalid(format!("PNDM: timestep {t} is outside 0..{num_train}")));
        }
        Ok(PndmScheduler {
            alphas_cumprod,
            final_alpha_cumprod,
            prediction: config.prediction()?,
            stride,
            prk_timesteps: prk,
            timesteps_f32: timesteps.iter().map(|&t| t as f32).collect(),
            timesteps,
            counter: 0,
            ets: Vec::new(),
            prk_sum: None,
            cur_sample: None,
        })
    }

    fn alpha_at(&self, t: i64) -> Result<f32> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod
            .get(t as usize)
            .copied()
            .ok_or_else(|| Error::Invalid(format!("PNDM: timestep {t} is past the training schedule")))
    }

    /// One DDIM-like transfer of `sample` from `t` to `t_prev` with noise estimate `m`
    /// (eq. 9 of the PNDM paper, as diffusers' `_get_prev_sample`).
    fn prev_sample(&self, sample: &[f32], t: i64, t_prev: i64, m: &[f32]) -> Result<Vec<f32>> {
        let alpha_t = self.alpha_at(t)?;
        let alpha_prev = self.alpha_at(t_prev)?;
        let beta_t = 1.0 - alpha_t;
        let beta_prev = 1.0 - alpha_prev;
        let sample_coeff = (alpha_prev / alpha_t).sqrt();
        let denom = alpha_t * beta_prev.sqrt() + (alpha_t * beta_t * alpha_prev).sqrt();
        let diff = alpha_prev - alpha_t;
        let (sqrt_a, sqrt_b) = (alpha_t.sqrt(), beta_t.sqrt());
        Ok(sample
            .iter()
            .zip(m)
            .map(|(&x, &m)| {
                let eps = match self.prediction {
                    PredictionType::Epsilon => m,
                    PredictionType::VPrediction => sqrt_a * m + sqrt_b * x,
                };
                sample_coeff * x - diff * eps / denom
            })
            .collect())
    }

    fn step_prk(&mut self, m: Vec<f32>, t: i64, x: Vec<f32>) -> Result<Vec<f32>> {
        let c = self.counter;
        let diff_to_prev = if c % 2 == 1 { 0 } else { self.stride / 2 };
        let t_prev = t - diff_to_prev;
        let t_base = self.prk_timesteps[c / 4 * 4];
        let weighted = |sum: Option<Vec<f32>>, w: f32, m: &[f32]| -> Vec<f32> {
            match sum {
                None => m.iter().map(|&v| w * v).collect(),
                Some(s) => s.iter().zip(m).map(|(&s, &v)| s + w * v).collect(),
            }
        };
        let model_output = match c % 4 {
            0 => {
                self.prk_sum = Some(weighted(self.prk_sum.take(), 1.0 / 6.0, &m));
                self.ets.push(m.clone());
                self.cur_sample = Some(x.clone());
                m
            }
            1 | 2 => {
                self.prk_sum = Some(weighted(self.prk_sum.take(), 1.0 / 3.0, &m));
                m
            }
            _ => weighted(self.prk_sum.take(), 1.0 / 6.0, &m),
        };
        let base = self.cur_sample.as_deref().unwrap_or(&x);
        self.prev_sample(base, t_base, t_prev, &model_output)
    }

    fn step_plms(&mut self, m: Vec<f32>, t: i64, x: Vec<f32>) -> Result<Vec<f32>> {
        let (mut t, mut t_prev) = (t, t - self.stride);
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(m.clone());
        } else {
            // The repeated timestep: redo the first step with the averaged noise estimate.
            t_prev = t;
            t += self.stride;
        }
        let e = &self.ets;
        let n = e.len();
        let mut sample = x;
        let model_output: Vec<f32> = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            m
        } else if n == 1 && self.counter == 1 {
            sample = self.cur_sample.take().unwrap_or(sample);
            m.iter().zip(&e[0]).map(|(&a, &b)| (a + b) / 2.0).collect()
        } else if n == 2 {
            e[1].iter().zip(&e[0]).map(|(&e1, &e2)| (3.0 * e1 - e2) / 2.0).collect()
        } else if n == 3 {
            (0..m.len()).map(|i| (23.0 * e[2][i] - 16.0 * e[1][i] + 5.0 * e[0][i]) / 12.0).collect()
        } else {
            (0..m.len())
                .map(|i| (1.0f32 / 24.0) * (55.0 * e[3][i] - 59.0 * e[2][i] + 37.0 * e[1][i] - 9.0 * e[0][i]))
                .collect()
        };
        self.prev_sample(&sample, t, t_prev, &model_output)
    }
}

impl Scheduler for PndmScheduler {
    fn name(&self) -> &'static str {
        "pndm"
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps_f32
    }

    fn step(&mut self, model_output: &Tensor, index: usize, sample: &Tensor) -> Result<Tensor> {
        check_index(index, self.timesteps.len())?;
        if index != self.counter {
            return Err(Error::Invalid(format!(
                "PNDM steps must run in order: expected step {}, got {index}",
                self.counter
            )));
        }
        let (m, x) = host_pair(model_output, sample)?;
        let t = self.timesteps[index];
        let out = if self.counter < self.prk_timesteps.len() {
            self.step_prk(m, t, x)?
        } else {
            self.step_plms(m, t, x)?
        };
        self.counter += 1;
        Tensor::from_vec(out, sample.shape())
    }
}
