//! PNDM with its Runge–Kutta warm-up skipped, i.e. PLMS (the "PLMS" of A1111 and Stable Diffusion's
//! original scripts): linear multistep on ε with up to four previous outputs.

use candle_core::{Result, Tensor};

use super::{lin, lin2, NoiseSchedule, PredictionType, Sampler, SamplerKind, SamplerOptions};
use crate::noise::NoiseSource;

pub(super) struct Plms {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    ratio: i64,
    index: usize,
    counter: usize,
    ets: Vec<Tensor>,
    cur_sample: Option<Tensor>,
    /// Past timestep 0 the step lands on ᾱ = 1 (else ᾱ₀).
    set_alpha_to_one: bool,
}

impl Plms {
    pub(super) fn new(schedule: NoiseSchedule, steps: usize, options: SamplerOptions) -> Self {
        // Ascending spaced timesteps; the second-largest is visited twice (the warm-up pair).
        let mut asc = schedule.spaced_timesteps(steps);
        asc.reverse();
        let mut ts: Vec<f64> = asc[..asc.len() - 1].to_vec();
        if asc.len() >= 2 {
            ts.push(asc[asc.len() - 2]);
        }
        ts.push(asc[asc.len() - 1]);
        ts.reverse();
        let ratio = (schedule.len() / steps) as i64;
        Self {
            schedule,
            timesteps: ts,
            ratio,
            index: 0,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            set_alpha_to_one: options.set_alpha_to_one,
        }
    }

    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let a_t = self.schedule.alpha_cumprod(t);
        let a_prev = match (prev_t >= 0, self.set_alpha_to_one) {
            (true, _) => self.schedule.alpha_cumprod(prev_t),
            (false, true) => 1.0,
            (false, false) => self.schedule.alpha_cumprod(0),
        };
        let (b_t, b_prev) = (1.0 - a_t, 1.0 - a_prev);
        let eps = match self.schedule.config.prediction_type {
            PredictionType::VPrediction => lin2(a_t.sqrt(), model_output, b_t.sqrt(), sample)?,
            _ => model_output.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        lin2(sample_coeff, sample, -(a_prev - a_t) / denom, &eps)
    }
}

impl Sampler for Plms {
    fn kind(&self) -> SamplerKind {
        SamplerKind::Pndm
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

    fn begin_index_for_strength(&self, steps: usize, strength: f64) -> usize {
        let init = ((steps as f64 * strength) as usize).min(steps);
        steps - init
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let mut t = self.timestep() as i64;
        let mut prev_t = t - self.ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += self.ratio;
        }
        let n = self.ets.len();
        let mut sample = sample.clone();
        let combined = if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if n == 1 && self.counter == 1 {
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            lin2(0.5, model_output, 0.5, &self.ets[0])?
        } else if n == 2 {
            lin(&[(1.5, &self.ets[1]), (-0.5, &self.ets[0])])?
        } else if n == 3 {
            lin(&[
                (23.0 / 12.0, &self.ets[2]),
                (-16.0 / 12.0, &self.ets[1]),
                (5.0 / 12.0, &self.ets[0]),
            ])?
        } else {
            lin(&[
                (55.0 / 24.0, &self.ets[n - 1]),
                (-59.0 / 24.0, &self.ets[n - 2]),
                (37.0 / 24.0, &self.ets[n - 3]),
                (-9.0 / 24.0, &self.ets[n - 4]),
            ])?
        };
        let prev = self.prev_sample(&sample, t, prev_t, &combined)?;
        self.counter += 1;
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
