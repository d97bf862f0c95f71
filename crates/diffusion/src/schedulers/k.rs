//! The k-diffusion family in sigma space: Euler, Euler a, Heun, LMS, DPM2, DPM2 a. The model sees
//! `x / sqrt(σ² + 1)`; txt2img starts from noise scaled by the largest sigma.

use candle_core::{Result, Tensor};

use super::{
    k_pred_original, karras_sigmas, lin, lin2, NoiseSchedule, Sampler, SamplerKind, TimestepSpacing,
};
use crate::noise::NoiseSource;

/// Timesteps, sigmas (with the final 0) and the start scale shared by the family.
struct KBase {
    schedule: NoiseSchedule,
    timesteps: Vec<f64>,
    sigmas: Vec<f64>,
    init_sigma: f64,
    index: usize,
}

impl KBase {
    fn new(schedule: NoiseSchedule, steps: usize, karras: bool) -> Self {
        let mut timesteps = schedule.spaced_timesteps(steps);
        let mut sigmas = schedule.sigmas_at(&timesteps);
        if karras && !sigmas.is_empty() {
            let (max, min) = (sigmas[0], sigmas[sigmas.len() - 1]);
            sigmas = karras_sigmas(max, min, steps)
                .into_iter()
                .map(|s| s as f32 as f64)
                .collect();
            timesteps = sigmas
                .iter()
                .map(|&s| schedule.sigma_to_t(s) as f32 as f64)
                .collect();
        }
        sigmas.push(0.0);
        let init_sigma = Self::init_sigma(&schedule, &sigmas);
        Self {
            schedule,
            timesteps,
            sigmas,
            init_sigma,
            index: 0,
        }
    }

    fn init_sigma(schedule: &NoiseSchedule, sigmas: &[f64]) -> f64 {
        let max = sigmas.iter().cloned().fold(0.0, f64::max);
        match schedule.config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    fn scale(&self, sample: &Tensor, sigma: f64) -> Result<Tensor> {
        sample.affine(1.0 / (sigma * sigma + 1.0).sqrt(), 0.0)
    }

    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
        let sigma = self.sigmas[index.min(self.sigmas.len() - 1)];
        lin2(1.0, original, sigma, noise)
    }
}

/// Boilerplate shared by the family's `Sampler` impls.
macro_rules! k_common {
    () => {
        fn timesteps(&self) -> &[f64] {
            &self.base.timesteps
        }
        fn sigmas(&self) -> Option<&[f64]> {
            Some(&self.base.sigmas)
        }
        fn init_noise_sigma(&self) -> f64 {
            self.base.init_sigma
        }
        fn step_index(&self) -> usize {
            self.base.index
        }
        fn set_begin_index(&mut self, begin: usize) {
            self.base.index = begin;
        }
        fn add_noise_at(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor> {
            self.base.add_noise_at(original, noise, index)
        }
    };
}

pub(super) struct Euler {
    base: KBase,
    kind: SamplerKind,
}

impl Euler {
    pub(super) fn new(
        schedule: NoiseSchedule,
        steps: usize,
        karras: bool,
        kind: SamplerKind,
    ) -> Self {
        Self {
            base: KBase::new(schedule, steps, karras),
            kind,
        }
    }
}

impl Sampler for Euler {
    k_common!();
    fn kind(&self) -> SamplerKind {
        self.kind
    }
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        self.base.scale(sample, self.base.sigmas[self.base.index])
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.base.index;
        let (sigma, next) = (self.base.sigmas[i], self.base.sigmas[i + 1]);
        let x0 = k_pred_original(
            self.base.schedule.config.prediction_type,
            sigma,
            model_output,
            sample,
        )?;
        // x + (x - x0)/σ · (σ_next - σ)
        let r = (next - sigma) / sigma;
        self.base.index += 1;
        lin2(1.0 + r, sample, -r, &x0)
    }
}

pub(super) struct EulerAncestral {
    base: KBase,
}

impl EulerAncestral {
    pub(super) fn new(schedule: NoiseSchedule, steps: usize) -> Self {
        Self {
            base: KBase::new(schedule, steps, false),
        }
    }
}

impl Sampler for EulerAncestral {
    k_common!();
    fn kind(&self) -> SamplerKind {
        SamplerKind::EulerA
    }
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        self.base.scale(sample, self.base.sigmas[self.base.index])
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.base.index;
        let (from, to) = (self.base.sigmas[i], self.base.sigmas[i + 1]);
        let x0 = k_pred_original(
            self.base.schedule.config.prediction_type,
            from,
            model_output,
            sample,
        )?;
        let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let down = (to * to - up * up).max(0.0).sqrt();
        let r = (down - from) / from;
        let z = noise.randn_like(model_output)?;
        self.base.index += 1;
        lin(&[(1.0 + r, sample), (-r, &x0), (up, &z)])
    }
}

/// Heun's second-order method: an Euler step to σ_next, then the average of both slopes.
pub(super) struct Heun {
    base: KBase,
    /// (slope, dt, sample) of the pending first-order half.
    pending: Option<(Tensor, f64, Tensor)>,
}

impl Heun {
    pub(super) fn new(schedule: NoiseSchedule, steps: usize) -> Self {
        let mut base = KBase::new(schedule, steps, false);
        // [t0, t1, t1, t2, t2, ...] and [σ0, σ1, σ1, ..., σn-1, σn-1, 0].
        let ts = &base.timesteps;
        let mut timesteps = vec![ts[0]];
        for &t in &ts[1..] {
            timesteps.extend([t, t]);
        }
        let s = &base.sigmas[..base.sigmas.len() - 1];
        let mut sigmas = vec![s[0]];
        for &v in &s[1..] {
            sigmas.extend([v, v]);
        }
        sigmas.push(0.0);
        base.timesteps = timesteps;
        base.sigmas = sigmas;
        Self {
            base,
            pending: None,
        }
    }
}

impl Sampler for Heun {
    k_common!();
    fn kind(&self) -> SamplerKind {
        SamplerKind::Heun
    }
    fn order(&self) -> usize {
        2
    }
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        self.base.scale(sample, self.base.sigmas[self.base.index])
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.base.index;
        let pred = self.base.schedule.config.prediction_type;
        self.base.index += 1;
        match self.pending.take() {
            None => {
                let (sigma, next) = (self.base.sigmas[i], self.base.sigmas[i + 1]);
                let x0 = k_pred_original(pred, sigma, model_output, sample)?;
                let slope = lin2(1.0 / sigma, sample, -1.0 / sigma, &x0)?;
                let dt = next - sigma;
                let prev = lin2(1.0, sample, dt, &slope)?;
                self.pending = Some((slope, dt, sample.clone()));
                Ok(prev)
            }
            Some((slope0, dt, start)) => {
                let next = self.base.sigmas[i];
                let x0 = k_pred_original(pred, next, model_output, sample)?;
                let slope1 = lin2(1.0 / next, sample, -1.0 / next, &x0)?;
                lin(&[(1.0, &start), (0.5 * dt, &slope0), (0.5 * dt, &slope1)])
            }
        }
    }
}

/// Linear multistep on the ODE slope, with up to four previous slopes and coefficients integrated
/// exactly over each sigma interval.
pub(super) struct Lms {
    base: KBase,
    slopes: Vec<Tensor>,
}

impl Lms {
    const ORDER: usize = 4;

    pub(super) fn new(schedule: NoiseSchedule, steps: usize) -> Self {
        Self {
            base: KBase::new(schedule, steps, false),
            slopes: Vec::new(),
        }
    }

    /// ∫ from σ_t to σ_{t+1} of the Lagrange basis polynomial `current` over σ_t, σ_{t-1}, ….
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = &self.base.sigmas;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s[t - k]) / (s[t - current] - s[t - k]))
                .product::<f64>()
        };
        // 4-point Gauss–Legendre: exact for the cubic basis polynomials.
        const NODES: [(f64, f64); 4] = [
            (-0.861_136_311_594_052_6, 0.347_854_845_137_453_8),
            (-0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
            (0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
            (0.861_136_311_594_052_6, 0.347_854_845_137_453_8),
        ];
        let (a, b) = (s[t], s[t + 1]);
        let (half, mid) = ((b - a) / 2.0, (a + b) / 2.0);
        NODES
            .iter()
            .map(|(x, w)| w * basis(mid + half * x))
            .sum::<f64>()
            * half
    }
}

impl Sampler for Lms {
    k_common!();
    fn kind(&self) -> SamplerKind {
        SamplerKind::Lms
    }
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        self.base.scale(sample, self.base.sigmas[self.base.index])
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.base.index;
        let sigma = self.base.sigmas[i];
        let x0 = k_pred_original(
            self.base.schedule.config.prediction_type,
            sigma,
            model_output,
            sample,
        )?;
        self.slopes
            .push(lin2(1.0 / sigma, sample, -1.0 / sigma, &x0)?);
        if self.slopes.len() > Self::ORDER {
            self.slopes.remove(0);
        }
        // As diffusers: the order follows the step index, the terms the slopes at hand (an
        // img2img run starting mid-schedule uses the high-order coefficient of its one slope).
        let order = (i + 1).min(Self::ORDER);
        let mut terms = vec![(1.0, sample)];
        let coeffs: Vec<f64> = (0..order).map(|c| self.coefficient(order, i, c)).collect();
        for (c, slope) in coeffs.iter().zip(self.slopes.iter().rev()) {
            terms.push((*c, slope));
        }
        self.base.index += 1;
        lin(&terms)
    }
}

/// DPM2 (k-diffusion's `sample_dpm_2`): a half step to the geometric midpoint sigma, then the full
/// step with the midpoint's slope.
pub(super) struct Kdpm2 {
    base: KBase,
    sigmas_interpol: Vec<f64>,
    pending: Option<Tensor>,
}

fn interleave(v: &[f64]) -> Vec<f64> {
    let mut out = vec![v[0]];
    for &x in &v[1..] {
        out.extend([x, x]);
    }
    out.push(v[v.len() - 1]);
    out
}

impl Kdpm2 {
    pub(super) fn new(schedule: NoiseSchedule, steps: usize) -> Self {
        let mut base = KBase::new(schedule, steps, false);
        let s = base.sigmas.clone(); // n + 1, ending in 0
        let n = s.len();
        // Geometric mean of each sigma and the one before it (0 for the first).
        let si: Vec<f64> = (0..n)
            .map(|k| {
                let prev = s[(k + n - 1) % n];
                ((s[k].ln() + prev.ln()) / 2.0).exp() as f32 as f64
            })
            .collect();
        let t_interp: Vec<f64> = si
            .iter()
            .map(|&x| base.schedule.sigma_to_t(x) as f32 as f64)
            .collect();
        let ts = base.timesteps.clone();
        let mut timesteps = vec![ts[0]];
        for k in 1..ts.len() {
            timesteps.extend([t_interp[k], ts[k]]);
        }
        base.timesteps = timesteps;
        base.sigmas = interleave(&s);
        Self {
            base,
            sigmas_interpol: interleave(&si),
            pending: None,
        }
    }
}

impl Sampler for Kdpm2 {
    k_common!();
    fn kind(&self) -> SamplerKind {
        SamplerKind::Dpm2
    }
    fn order(&self) -> usize {
        2
    }
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        let i = self.base.index;
        let sigma = if self.pending.is_none() {
            self.base.sigmas[i]
        } else {
            self.sigmas_interpol[i]
        };
        self.base.scale(sample, sigma)
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.base.index;
        let pred = self.base.schedule.config.prediction_type;
        self.base.index += 1;
        match self.pending.take() {
            None => {
                let (sigma, mid) = (self.base.sigmas[i], self.sigmas_interpol[i + 1]);
                let x0 = k_pred_original(pred, sigma, model_output, sample)?;
                let r = (mid - sigma) / sigma;
                self.pending = Some(sample.clone());
                lin2(1.0 + r, sample, -r, &x0)
            }
            Some(start) => {
                let (sigma, mid, next) = (
                    self.base.sigmas[i - 1],
                    self.sigmas_interpol[i],
                    self.base.sigmas[i],
                );
                let x0 = k_pred_original(pred, mid, model_output, sample)?;
                let dt = next - sigma;
                lin(&[(1.0, &start), (dt / mid, sample), (-dt / mid, &x0)])
            }
        }
    }
}

/// DPM2 ancestral: the DPM2 step aimed at σ_down, then fresh noise of σ_up.
pub(super) struct Kdpm2Ancestral {
    base: KBase,
    sigmas_interpol: Vec<f64>,
    sigmas_up: Vec<f64>,
    sigmas_down: Vec<f64>,
    pending: Option<Tensor>,
}

impl Kdpm2Ancestral {
    pub(super) fn new(schedule: NoiseSchedule, steps: usize) -> Self {
        let mut base = KBase::new(schedule, steps, false);
        let s = base.sigmas.clone();
        let n = s.len();
        let next = |k: usize| if k + 1 < n { s[k + 1] } else { 0.0 };
        let up: Vec<f64> = (0..n)
            .map(|k| {
                let (a, b) = (s[k], next(k));
                if a == 0.0 {
                    f64::NAN
                } else {
                    (b * b * (a * a - b * b) / (a * a)).sqrt() as f32 as f64
                }
            })
            .collect();
        let mut down: Vec<f64> = (0..n)
            .map(|k| {
                let b = next(k);
                (b * b - up[k] * up[k]).max(0.0).sqrt() as f32 as f64
            })
            .collect();
        down[n - 1] = 0.0;
        let mut si: Vec<f64> = (0..n)
            .map(|k| ((s[k].ln() + down[k].ln()) / 2.0).exp() as f32 as f64)
            .collect();
        for v in si.iter_mut().skip(n.saturating_sub(2)) {
            *v = 0.0;
        }
        let t_interp: Vec<f64> = si
            .iter()
            .map(|&x| base.schedule.sigma_to_t(x) as f32 as f64)
            .collect();
        let ts = base.timesteps.clone();
        let mut timesteps = vec![ts[0]];
        for k in 1..ts.len() {
            timesteps.extend([t_interp[k - 1], ts[k]]);
        }
        base.timesteps = timesteps;
        base.sigmas = interleave(&s);
        Self {
            base,
            sigmas_interpol: interleave(&si),
            sigmas_up: interleave(&up),
            sigmas_down: interleave(&down),
            pending: None,
        }
    }
}

impl Sampler for Kdpm2Ancestral {
    k_common!();
    fn kind(&self) -> SamplerKind {
        SamplerKind::Dpm2A
    }
    fn order(&self) -> usize {
        2
    }
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        let i = self.base.index;
        let sigma = if self.pending.is_none() {
            self.base.sigmas[i]
        } else {
            self.sigmas_interpol[i - 1]
        };
        self.base.scale(sample, sigma)
    }
    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.base.index;
        let pred = self.base.schedule.config.prediction_type;
        self.base.index += 1;
        match self.pending.take() {
            None => {
                let (sigma, mid) = (self.base.sigmas[i], self.sigmas_interpol[i]);
                let x0 = k_pred_original(pred, sigma, model_output, sample)?;
                let r = (mid - sigma) / sigma;
                self.pending = Some(sample.clone());
                lin2(1.0 + r, sample, -r, &x0)
            }
            Some(start) => {
                let sigma = self.base.sigmas[i - 1];
                let (mid, up, down) = (
                    self.sigmas_interpol[i - 1],
                    self.sigmas_up[i - 1],
                    self.sigmas_down[i - 1],
                );
                let x0 = k_pred_original(pred, mid, model_output, sample)?;
                let dt = down - sigma;
                let z = noise.randn_like(model_output)?;
                lin(&[
                    (1.0, &start),
                    (dt / mid, sample),
                    (-dt / mid, &x0),
                    (up, &z),
                ])
            }
        }
    }
}
