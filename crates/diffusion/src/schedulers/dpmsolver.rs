//! DPM-Solver++ (2M) multistep, its SDE variant, with or without Karras sigmas.

use candle_core::{Result, Tensor};

use super::{karras_sigmas, lin, lin2, NoiseSchedule, PredictionType, Sampler, SamplerKind};
use crate::noise::NoiseSource;

const SOLVER_ORDER: usize = 2;

pub(super) struct DpmSolverMultistep {
    schedule: NoiseSchedule,
    kind: SamplerKind,
    sde: bool,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: usize,
    outputs: Vec<Tensor>,
    lower_order_nums: usize,
}

/// (α_t, σ_t) of a VP process from a Karras sigma.
pub(super) fn alpha_sigma(sigma: f64) -> (f64, f64) {
    let a = 1.0 / (sigma * sigma + 1.0).sqrt();
    (a, sigma * a)
}

/// λ = log α − log σ (+∞ at σ = 0).
pub(super) fn lambda(sigma: f64) -> f64 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

impl DpmSolverMultistep {
    pub(super) fn new(
        schedule: NoiseSchedule,
        steps: usize,
        karras: bool,
        sde: bool,
        kind: SamplerKind,
    ) -> Self {
        let (timesteps, mut sigmas) = if karras {
            let train = schedule.train_sigmas();
            let sig: Vec<f64> = karras_sigmas(train[train.len() - 1], train[0], steps);
            let ts = sig
                .iter()
                .map(|&s| schedule.sigma_to_t(s).round_ties_even())
                .collect();
            (ts, sig)
        } else {
            let ts = schedule.solver_timesteps(steps);
            let sig = schedule.sigmas_at(&ts);
            (ts, sig)
        };
        sigmas.push(0.0);
        let sigmas = sigmas.into_iter().map(|s| s as f32 as f64).collect();
        Self {
            schedule,
            kind,
            sde,
            timesteps,
            sigmas,
            index: 0,
            outputs: Vec::new(),
            lower_order_nums: 0,
        }
    }

    fn x0(&self, model_output: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[self.index]);
        match self.schedule.config.prediction_type {
            PredictionType::Epsilon => lin2(1.0 / a, sample, -s / a, model_output),
            PredictionType::VPrediction => lin2(a, sample, -s, model_output),
            PredictionType::Sample => Ok(model_output.clone()),
        }
    }
}

impl Sampler for DpmSolverMultistep {
    fn kind(&self) -> SamplerKind {
        self.kind
    }
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas)
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
        let n = self.timesteps.len();
        // final_sigmas_type "zero": the last step is always first order.
        let lower_order_final = i == n - 1;
        let lower_order_second = i + 2 == n && n < 15;
        let x0 = self.x0(model_output, sample)?;
        self.outputs.push(x0);
        if self.outputs.len() > SOLVER_ORDER {
            self.outputs.remove(0);
        }
        let z = if self.sde {
            Some(noise.randn_like(model_output)?)
        } else {
            None
        };

        let (sigma_t, sigma_s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let (alpha_t, sig_t) = alpha_sigma(sigma_t);
        let (_, sig_s0) = alpha_sigma(sigma_s0);
        let h = lambda(sigma_t) - lambda(sigma_s0);
        let m0 = &self.outputs[self.outputs.len() - 1];
        let first = self.lower_order_nums < 1 || lower_order_final;
        let _ = lower_order_second; // second order is the highest order here
        let prev = if first {
            if self.sde {
                let e = (-h).exp();
                let mut terms = vec![
                    (sig_t / sig_s0 * e, sample),
                    (alpha_t * (1.0 - (-2.0 * h).exp()), m0),
                ];
                let c = sig_t * (1.0 - (-2.0 * h).exp()).sqrt();
                if let Some(z) = &z {
                    terms.push((c, z));
                }
                lin(&clean(&terms))?
            } else {
                lin(&clean(&[
                    (sig_t / sig_s0, sample),
                    (-alpha_t * ((-h).exp() - 1.0), m0),
                ]))?
            }
        } else {
            let m1 = &self.outputs[self.outputs.len() - 2];
            let sigma_s1 = self.sigmas[i - 1];
            let h0 = lambda(sigma_s0) - lambda(sigma_s1);
            let r0 = h0 / h;
            // D1 = (m0 - m1) / r0; midpoint solver.
            if self.sde {
                let k = alpha_t * (1.0 - (-2.0 * h).exp());
                let mut terms = vec![
                    (sig_t / sig_s0 * (-h).exp(), sample),
                    (k + 0.5 * k / r0, m0),
                    (-0.5 * k / r0, m1),
                ];
                if let Some(z) = &z {
                    terms.push((sig_t * (1.0 - (-2.0 * h).exp()).sqrt(), z));
                }
                lin(&clean(&terms))?
            } else {
                let k = -alpha_t * ((-h).exp() - 1.0);
                lin(&clean(&[
                    (sig_t / sig_s0, sample),
                    (k + 0.5 * k / r0, m0),
                    (-0.5 * k / r0, m1),
                ]))?
            }
        };
        if self.lower_order_nums < SOLVER_ORDER {
            self.lower_order_nums += 1;
        }
        self.index += 1;
        Ok(prev)
    }

    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let (a, s) = alpha_sigma(self.sigmas[index.min(self.sigmas.len() - 1)]);
        lin2(a, original, s, noise)
    }
}

/// Coefficients that are NaN only because σ = 0 made a 0·∞ (the final step) are 0, as the
/// products they stand for vanish.
pub(super) fn clean<'a>(terms: &[(f64, &'a Tensor)]) -> Vec<(f64, &'a Tensor)> {
    terms
        .iter()
        .map(|&(c, t)| (if c.is_finite() { c } else { 0.0 }, t))
        .collect()
}
