//! DDPM (ancestral, fixed-small variance) and DDIM (η = 0).

use candle_core::{Result, Tensor};

use super::{lin2, NoiseSchedule, PredictionType, Sampler, SamplerKind, SamplerOptions};
use crate::noise::NoiseSource;

/// x0 (clamped to ±`clip` when set, as diffusers' `clip_sample`) and ε from a model output at
/// ᾱ_t. ε stays the unclipped model's.
fn pred_x0_eps(
    prediction: PredictionType,
    alpha_prod_t: f64,
    model_output: &Tensor,
    sample: &Tensor,
    clip: Option<f64>,
) -> Result<(Tensor, Tensor)> {
    let (x0, eps) = pred_unclipped(prediction, alpha_prod_t, model_output, sample)?;
    match clip {
        Some(r) => Ok((x0.clamp(-r, r)?, eps)),
        None => Ok((x0, eps)),
    }
}

fn pred_unclipped(
    prediction: PredictionType,
    alpha_prod_t: f64,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (sa, sb) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
    Ok(match prediction {
        PredictionType::Epsilon => (
            lin2(1.0 / sa, sample, -sb / sa, model_output)?,
            model_output.clone(),
        ),
        PredictionType::VPrediction => (
            lin2(sa, sample, -sb, model_output)?,
            lin2(sa, model_output, sb, sample)?,
        ),
        PredictionType::Sample => (
            model_output.clone(),
            lin2(1.0 / sb, sample, -sa / sb, model_output)?,
        ),
    })
}

pub(super) struct Ddpm {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    steps: usize,
    index: usize,
    options: SamplerOptions,
}

impl Ddpm {
    pub(super) fn new(schedule: NoiseSchedule, steps: usize, options: SamplerOptions) -> Self {
        let timesteps = schedule.spaced_timesteps(steps);
        Self {
            schedule,
            timesteps,
            steps,
            index: 0,
            options,
        }
    }
}

impl Sampler for Ddpm {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Ddpm
    }
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn step_index(&self) -> usize {
        self.index
    }
    fn set_begin_index(&mut self, begin: usize) {
        self.index = begin;
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.timestep() as i64;
        let prev_t = t - (self.schedule.len() / self.steps) as i64;
        let a_t = self.schedule.alpha_cumprod(t);
        let a_prev = if prev_t >= 0 {
            self.schedule.alpha_cumprod(prev_t)
        } else {
            1.0
        };
        let (beta_t, beta_prev) = (1.0 - a_t, 1.0 - a_prev);
        let cur_alpha = a_t / a_prev;
        let cur_beta = 1.0 - cur_alpha;
        let (x0, _) = pred_x0_eps(
            self.schedule.config.prediction_type,
            a_t,
            model_output,
            sample,
            self.options.clip_sample,
        )?;
        let c_x0 = a_prev.sqrt() * cur_beta / beta_t;
        let c_x = cur_alpha.sqrt() * beta_prev / beta_t;
        let mut prev = lin2(c_x0, &x0, c_x, sample)?;
        if t > 0 {
            let variance = (beta_prev / beta_t * cur_beta).max(1e-20);
            let z = noise.randn_like(model_output)?;
            prev = prev.add(&z.affine(variance.sqrt(), 0.0)?)?;
        }
        self.index += 1;
        Ok(prev)
    }

    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule.add_noise(
            original,
            noise,
            self.timesteps[index.min(self.timesteps.len() - 1)] as i64,
        )
    }
}

pub(super) struct Ddim {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    steps: usize,
    index: usize,
    options: SamplerOptions,
}

impl Ddim {
    pub(super) fn new(schedule: NoiseSchedule, steps: usize, options: SamplerOptions) -> Self {
        let timesteps = schedule.spaced_timesteps(steps);
        Self {
            schedule,
            timesteps,
            steps,
            index: 0,
            options,
        }
    }
}

impl Sampler for Ddim {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Ddim
    }
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn step_index(&self) -> usize {
        self.index
    }
    fn set_begin_index(&mut self, begin: usize) {
        self.index = begin;
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let t = self.timestep() as i64;
        let prev_t = t - (self.schedule.len() / self.steps) as i64;
        let a_t = self.schedule.alpha_cumprod(t);
        // Past timestep 0: ᾱ = 1 with set_alpha_to_one, else ᾱ_0.
        let a_prev = match (prev_t >= 0, self.options.set_alpha_to_one) {
            (true, _) => self.schedule.alpha_cumprod(prev_t),
            (false, true) => 1.0,
            (false, false) => self.schedule.alpha_cumprod(0),
        };
        let (x0, eps) = pred_x0_eps(
            self.schedule.config.prediction_type,
            a_t,
            model_output,
            sample,
            self.options.clip_sample,
        )?;
        self.index += 1;
        lin2(a_prev.sqrt(), &x0, (1.0 - a_prev).sqrt(), &eps)
    }

    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule.add_noise(
            original,
            noise,
            self.timesteps[index.min(self.timesteps.len() - 1)] as i64,
        )
    }
}
