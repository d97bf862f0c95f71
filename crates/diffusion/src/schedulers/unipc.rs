//! UniPC (bh2, data prediction, order 2): a predictor step and, from the second step on, a
//! corrector that refines the previous prediction with the new model output.

use candle_core::{Result, Tensor};

use super::dpmsolver::{alpha_sigma, clean, lambda};
use super::{lin, lin2, NoiseSchedule, PredictionType, Sampler, SamplerKind};
use crate::noise::NoiseSource;

const SOLVER_ORDER: usize = 2;

pub(super) struct UniPc {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    index: usize,
    outputs: Vec<Tensor>,
    last_sample: Option<Tensor>,
    this_order: usize,
    lower_order_nums: usize,
}

/// (h_phi_1, B_h, b) for a step of log-SNR length `h` with `order` terms (bh2, data prediction).
fn coefficients(h: f64, order: usize) -> (f64, f64, Vec<f64>) {
    let hh = -h;
    let h_phi_1 = hh.exp_m1();
    let b_h = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial = 1.0;
    let mut b = Vec::with_capacity(order);
    for i in 1..=order {
        b.push(h_phi_k * factorial / b_h);
        factorial *= (i + 1) as f64;
        h_phi_k = h_phi_k / hh - 1.0 / factorial;
    }
    (h_phi_1, b_h, b)
}

/// Solve R·x = b for the Vandermonde-like R[i][j] = rks[j]^i (tiny systems; Gaussian elimination).
fn solve(rks: &[f64], b: &[f64]) -> Vec<f64> {
    let n = b.len();
    let mut m: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = (0..n).map(|j| rks[j].powi(i as i32)).collect();
            row.push(b[i]);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))
            .unwrap_or(col);
        m.swap(col, pivot);
        let pivot_row = m[col].clone();
        if pivot_row[col] == 0.0 {
            continue;
        }
        for (r, row) in m.iter_mut().enumerate() {
            if r != col {
                let f = row[col] / pivot_row[col];
                for (v, p) in row.iter_mut().zip(&pivot_row).skip(col) {
                    *v -= f * p;
                }
            }
        }
    }
    (0..n).map(|i| m[i][n] / m[i][i]).collect()
}

impl UniPc {
    pub(super) fn new(schedule: NoiseSchedule, steps: usize) -> Self {
        let timesteps = schedule.solver_timesteps(steps);
        let mut sigmas = schedule.sigmas_at(&timesteps);
        sigmas.push(0.0);
        Self {
            schedule,
            timesteps,
            sigmas,
            index: 0,
            outputs: Vec::new(),
            last_sample: None,
            this_order: 0,
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

    /// The predictor: from `sample` at σ[i] to σ[i+1] with the stored outputs.
    fn predict(&self, sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.index;
        let (sigma_t, sigma_s0) = (self.sigmas[i + 1], self.sigmas[i]);
        let (alpha_t, sig_t) = alpha_sigma(sigma_t);
        let (_, sig_s0) = alpha_sigma(sigma_s0);
        let (l_t, l_s0) = (lambda(sigma_t), lambda(sigma_s0));
        let h = l_t - l_s0;
        let k = self.outputs.len();
        let m0 = &self.outputs[k - 1];
        let mut rks = Vec::new();
        let mut d1s: Vec<(f64, &Tensor)> = Vec::new(); // D1_j = (m_j - m0) / rk_j
        for j in 1..order {
            let rk = (lambda(self.sigmas[i - j]) - l_s0) / h;
            rks.push(rk);
            d1s.push((rk, &self.outputs[k - 1 - j]));
        }
        rks.push(1.0);
        let (h_phi_1, b_h, b) = coefficients(h, order);
        let rhos: Vec<f64> = match order {
            1 => vec![],
            2 => vec![0.5],
            _ => solve(&rks[..order - 1], &b[..order - 1]),
        };
        let mut terms = vec![(sig_t / sig_s0, sample), (-alpha_t * h_phi_1, m0)];
        let scale = -alpha_t * b_h;
        let mut m0_coeff = 0.0;
        for (rho, (rk, m)) in rhos.iter().zip(d1s.iter()) {
            terms.push((scale * rho / rk, *m));
            m0_coeff -= scale * rho / rk;
        }
        terms[1].0 += m0_coeff;
        lin(&clean(&terms))
    }

    /// The corrector: redo the step from `last_sample` (at σ[i-1]) to σ[i] using the new output.
    fn correct(&self, this_output: &Tensor, last_sample: &Tensor, order: usize) -> Result<Tensor> {
        let i = self.index;
        let (sigma_t, sigma_s0) = (self.sigmas[i], self.sigmas[i - 1]);
        let (alpha_t, sig_t) = alpha_sigma(sigma_t);
        let (_, sig_s0) = alpha_sigma(sigma_s0);
        let (l_t, l_s0) = (lambda(sigma_t), lambda(sigma_s0));
        let h = l_t - l_s0;
        let k = self.outputs.len();
        let m0 = &self.outputs[k - 1];
        let mut rks = Vec::new();
        let mut d1s: Vec<(f64, &Tensor)> = Vec::new();
        for j in 1..order {
            let rk = (lambda(self.sigmas[i - (j + 1)]) - l_s0) / h;
            rks.push(rk);
            d1s.push((rk, &self.outputs[k - 1 - j]));
        }
        rks.push(1.0);
        let (h_phi_1, b_h, b) = coefficients(h, order);
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve(&rks, &b)
        };
        let scale = -alpha_t * b_h;
        let mut terms = vec![(sig_t / sig_s0, last_sample), (-alpha_t * h_phi_1, m0)];
        let mut m0_coeff = 0.0;
        for (rho, (rk, m)) in rhos[..rhos.len() - 1].iter().zip(d1s.iter()) {
            terms.push((scale * rho / rk, *m));
            m0_coeff -= scale * rho / rk;
        }
        let rho_t = rhos[rhos.len() - 1];
        terms.push((scale * rho_t, this_output));
        m0_coeff -= scale * rho_t;
        terms[1].0 += m0_coeff;
        lin(&clean(&terms))
    }
}

impl Sampler for UniPc {
    fn kind(&self) -> SamplerKind {
        SamplerKind::UniPc
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let x0 = self.x0(model_output, sample)?;
        let sample = match self.last_sample.take() {
            Some(last) if self.index > 0 => self.correct(&x0, &last, self.this_order)?,
            _ => sample.clone(),
        };
        self.outputs.push(x0);
        if self.outputs.len() > SOLVER_ORDER {
            self.outputs.remove(0);
        }
        let n = self.timesteps.len();
        let order = SOLVER_ORDER.min(n - self.index); // lower_order_final
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predict(&sample, self.this_order)?;
        self.last_sample = Some(sample);
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
