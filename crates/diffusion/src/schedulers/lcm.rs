//! LCM: latent consistency models' multistep sampling (a consistency step, then re-noising to the
//! next timestep), skipping through the 50 timesteps LCM was distilled on.

use candle_core::{Result, Tensor};

use super::{lin2, NoiseSchedule, PredictionType, Sampler, SamplerError, SamplerKind};
use crate::noise::NoiseSource;

const ORIGINAL_STEPS: usize = 50;
const TIMESTEP_SCALING: f64 = 10.0;
const SIGMA_DATA: f64 = 0.5;

pub(super) struct Lcm {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    index: usize,
}

impl Lcm {
    pub(super) fn new(
        schedule: NoiseSchedule,
        steps: usize,
    ) -> std::result::Result<Self, SamplerError> {
        let k = schedule.len() / ORIGINAL_STEPS;
        let origin: Vec<i64> = (1..=ORIGINAL_STEPS)
            .map(|i| (i * k) as i64 - 1)
            .rev()
            .collect();
        if steps > origin.len() {
            return Err(SamplerError::Steps(format!(
                "LCM runs at most {} steps (it was distilled on {ORIGINAL_STEPS} timesteps); got {steps}",
                origin.len()
            )));
        }
        let timesteps = (0..steps)
            .map(|i| {
                let idx = (origin.len() as f64 * i as f64 / steps as f64).floor() as usize;
                origin[idx] as f64
            })
            .collect();
        Ok(Self {
            schedule,
            timesteps,
            index: 0,
        })
    }
}

impl Sampler for Lcm {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Lcm
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
        let i = self.index;
        let t = self.timesteps[i] as i64;
        let prev_t = self.timesteps.get(i + 1).map_or(t, |&p| p as i64);
        let a_t = self.schedule.alpha_cumprod(t);
        // set_alpha_to_one = true for LCM.
        let a_prev = if prev_t >= 0 {
            self.schedule.alpha_cumprod(prev_t)
        } else {
            1.0
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let scaled = t as f64 * TIMESTEP_SCALING;
        let c_skip = SIGMA_DATA * SIGMA_DATA / (scaled * scaled + SIGMA_DATA * SIGMA_DATA);
        let c_out = scaled / (scaled * scaled + SIGMA_DATA * SIGMA_DATA).sqrt();
        let x0 = match self.schedule.config.prediction_type {
            PredictionType::Epsilon => lin2(
                1.0 / a_t.sqrt(),
                sample,
                -b_t.sqrt() / a_t.sqrt(),
                model_output,
            )?,
            PredictionType::VPrediction => lin2(a_t.sqrt(), sample, -b_t.sqrt(), model_output)?,
            PredictionType::Sample => model_output.clone(),
        };
        let denoised = lin2(c_out, &x0, c_skip, sample)?;
        self.index += 1;
        if i + 1 != self.timesteps.len() {
            let z = noise.randn_like(model_output)?;
            lin2(a_prev.sqrt(), &denoised, b_prev.sqrt(), &z)
        } else {
            Ok(denoised)
        }
    }

    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        self.schedule.add_noise(
            original,
            noise,
            self.timesteps[index.min(self.timesteps.len() - 1)] as i64,
        )
    }
}
