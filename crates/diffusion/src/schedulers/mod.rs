//! Noise schedules and samplers, number for number with diffusers.
//!
//! A [`Sampler`] walks a list of timesteps: for each, the pipeline asks it to scale the latents for
//! the model ([`Sampler::scale_model_input`]), runs the model at [`Sampler::timestep`], and hands
//! the output to [`Sampler::step`], which returns the next latents. Every sampler keeps its own
//! step counter (Heun and DPM2 visit some timesteps twice, so a timestep does not identify a step).
//! img2img starts part-way: [`Sampler::set_begin_index`] with [`Sampler::begin_index_for_strength`],
//! the latents from [`Sampler::add_noise`].
//!
//! The coefficients are computed in f64 from the same f32 tables diffusers builds; the tensor
//! arithmetic runs in the latents' dtype. `conformance::schedulers` replays diffusers' traces.

mod config;
mod ddpm;
mod dpmsolver;
pub mod flow_match;
mod k;
mod lcm;
mod pndm;
mod unipc;

use candle_core::{Result, Tensor};
use serde::{Deserialize, Serialize};

use crate::noise::NoiseSource;
pub use config::{SamplerOptions, SchedulerConfig};

/// How the betas run over the training timesteps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    #[default]
    Epsilon,
    VPrediction,
    Sample,
}

/// How inference timesteps are spread over the training range (Table 2 of "Common Diffusion Noise
/// Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// The training noise schedule of a model family (the fields of a diffusers scheduler config that
/// describe the model rather than the sampler).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ScheduleConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub prediction_type: PredictionType,
    pub timestep_spacing: TimestepSpacing,
    pub steps_offset: usize,
}

impl Default for ScheduleConfig {
    /// Stable Diffusion 1.x/2.x/XL.
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: TimestepSpacing::Leading,
            steps_offset: 1,
        }
    }
}

/// The schedule's tables, as diffusers holds them (f32 values, kept here as f64).
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    pub config: ScheduleConfig,
    pub alphas_cumprod: Vec<f64>,
}

fn f32r(v: f64) -> f64 {
    v as f32 as f64
}

impl NoiseSchedule {
    pub fn new(config: ScheduleConfig) -> Self {
        let n = config.num_train_timesteps.max(2);
        let lin = |a: f64, b: f64| -> Vec<f64> {
            (0..n)
                .map(|i| f32r(a + (b - a) * i as f64 / (n - 1) as f64))
                .collect()
        };
        let betas: Vec<f64> = match config.beta_schedule {
            BetaSchedule::Linear => lin(config.beta_start, config.beta_end),
            BetaSchedule::ScaledLinear => lin(config.beta_start.sqrt(), config.beta_end.sqrt())
                .into_iter()
                .map(|b| f32r(b * b))
                .collect(),
            BetaSchedule::SquaredCosCapV2 => {
                let alpha_bar = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let t1 = i as f64 / n as f64;
                        let t2 = (i + 1) as f64 / n as f64;
                        f32r((1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999))
                    })
                    .collect()
            }
        };
        // torch's cumprod on CPU accumulates in double and stores float.
        let mut acc = 1.0f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= f32r(1.0 - b);
                f32r(acc)
            })
            .collect();
        Self {
            config,
            alphas_cumprod,
        }
    }

    pub fn len(&self) -> usize {
        self.alphas_cumprod.len()
    }

    pub fn is_empty(&self) -> bool {
        self.alphas_cumprod.is_empty()
    }

    /// ᾱ at an integer timestep (clamped into the table).
    pub fn alpha_cumprod(&self, t: i64) -> f64 {
        let i = t.clamp(0, self.len() as i64 - 1) as usize;
        self.alphas_cumprod[i]
    }

    /// The Karras-style sigma of every training timestep: sqrt((1 - ᾱ) / ᾱ).
    pub fn train_sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|a| f32r(((1.0 - a) / a).sqrt()))
            .collect()
    }

    /// Forward diffusion at integer timestep `t`: sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·noise (for training and
    /// the DDPM-family samplers' img2img).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: i64) -> Result<Tensor> {
        let a = self.alpha_cumprod(t);
        lin2(a.sqrt(), x0, (1.0 - a).sqrt(), noise)
    }

    /// Signal-to-noise ratio ᾱ / (1 - ᾱ) at `t` (min-SNR weighting).
    pub fn snr(&self, t: i64) -> f64 {
        let a = self.alpha_cumprod(t);
        a / (1.0 - a)
    }

    /// Timesteps for samplers that run `n` steps over the training range (DDIM, DDPM, PNDM, Euler,
    /// LMS, Heun, DPM2), per the configured spacing.
    pub fn spaced_timesteps(&self, n: usize) -> Vec<f64> {
        let t_train = self.len();
        match self.config.timestep_spacing {
            TimestepSpacing::Linspace => linspace(0.0, (t_train - 1) as f64, n)
                .into_iter()
                .rev()
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = t_train / n.max(1);
                (0..n)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => trailing(t_train, n),
        }
    }

    /// Timesteps as DPM-Solver and UniPC space them (n + 1 points, the last dropped).
    pub fn solver_timesteps(&self, n: usize) -> Vec<f64> {
        let t_train = self.len();
        match self.config.timestep_spacing {
            TimestepSpacing::Linspace => {
                let mut v: Vec<f64> = linspace(0.0, (t_train - 1) as f64, n + 1)
                    .into_iter()
                    .map(f64::round_ties_even)
                    .rev()
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = t_train / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => trailing(t_train, n),
        }
    }

    /// Sigmas interpolated at (fractional) timesteps, as `np.interp` over the training sigmas.
    pub fn sigmas_at(&self, timesteps: &[f64]) -> Vec<f64> {
        let s = self.train_sigmas();
        timesteps.iter().map(|&t| f32r(interp(t, &s))).collect()
    }

    /// The (fractional) timestep whose sigma is `sigma`, interpolating in log-sigma (diffusers'
    /// `_sigma_to_t`).
    pub fn sigma_to_t(&self, sigma: f64) -> f64 {
        let log_sigmas: Vec<f64> = self.train_sigmas().iter().map(|s| f32r(s.ln())).collect();
        sigma_to_t(sigma, &log_sigmas)
    }
}

pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let count = log_sigmas.iter().filter(|&&l| log_sigma - l >= 0.0).count();
    let low = count.saturating_sub(1).min(log_sigmas.len() - 2);
    let high = low + 1;
    let (lo, hi) = (log_sigmas[low], log_sigmas[high]);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

fn trailing(t_train: usize, n: usize) -> Vec<f64> {
    let ratio = t_train as f64 / n.max(1) as f64;
    let count = (t_train as f64 / ratio).ceil() as usize;
    (0..count)
        .map(|k| (t_train as f64 - k as f64 * ratio).round_ties_even() - 1.0)
        .collect()
}

pub(crate) fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![a],
        _ => {
            let step = (b - a) / (n - 1) as f64;
            (0..n)
                .map(|i| if i == n - 1 { b } else { a + step * i as f64 })
                .collect()
        }
    }
}

/// `np.interp(t, arange(len), table)`.
pub(crate) fn interp(t: f64, table: &[f64]) -> f64 {
    if t <= 0.0 {
        return table[0];
    }
    let last = table.len() - 1;
    if t >= last as f64 {
        return table[last];
    }
    let i = t.floor() as usize;
    let w = t - i as f64;
    table[i] + (table[i + 1] - table[i]) * w
}

/// Karras et al. (2022) sigmas between `sigma_max` and `sigma_min`, rho 7.
pub(crate) fn karras_sigmas(sigma_max: f64, sigma_min: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let (min_inv, max_inv) = (sigma_min.powf(1.0 / rho), sigma_max.powf(1.0 / rho));
    linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// a·x + b·y.
pub(crate) fn lin2(a: f64, x: &Tensor, b: f64, y: &Tensor) -> Result<Tensor> {
    x.affine(a, 0.0)?.add(&y.affine(b, 0.0)?)
}

/// Σ cᵢ·tᵢ.
pub(crate) fn lin(terms: &[(f64, &Tensor)]) -> Result<Tensor> {
    let mut acc: Option<Tensor> = None;
    for (c, t) in terms {
        let term = t.affine(*c, 0.0)?;
        acc = Some(match acc {
            None => term,
            Some(a) => a.add(&term)?,
        });
    }
    acc.ok_or_else(|| candle_core::Error::Msg("empty linear combination".into()))
}

/// x0 predicted from a model output at a Karras sigma (input scaled by 1/sqrt(σ²+1)).
pub(crate) fn k_pred_original(
    prediction: PredictionType,
    sigma: f64,
    model_output: &Tensor,
    sample: &Tensor,
) -> Result<Tensor> {
    match prediction {
        PredictionType::Epsilon => lin2(1.0, sample, -sigma, model_output),
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            lin2(-sigma / s2.sqrt(), model_output, 1.0 / s2, sample)
        }
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

pub use atelier_contracts::samplers::SamplerKind;

/// A sampler of `kind` for `steps` steps on `schedule`, with the options of SD's published
/// configs (no clipping, the last step ends on ᾱ₀).
pub fn build(
    kind: SamplerKind,
    schedule: &NoiseSchedule,
    steps: usize,
) -> std::result::Result<Box<dyn Sampler>, SamplerError> {
    build_with(kind, schedule, steps, SamplerOptions::default())
}

/// [`build`] with the options a scheduler config gives (see [`SchedulerConfig::for_sampler`]).
pub fn build_with(
    kind: SamplerKind,
    schedule: &NoiseSchedule,
    steps: usize,
    options: SamplerOptions,
) -> std::result::Result<Box<dyn Sampler>, SamplerError> {
    if steps == 0 {
        return Err(SamplerError::NoSteps);
    }
    let s = schedule.clone();
    Ok(match kind {
        SamplerKind::Ddpm => Box::new(ddpm::Ddpm::new(s, steps, options)),
        SamplerKind::Ddim => Box::new(ddpm::Ddim::new(s, steps, options)),
        SamplerKind::Pndm => Box::new(pndm::Plms::new(s, steps, options)),
        SamplerKind::Lcm => Box::new(lcm::Lcm::new(s, steps)?),
        SamplerKind::Euler => Box::new(k::Euler::new(s, steps, false, kind)),
        SamplerKind::EulerKarras => Box::new(k::Euler::new(s, steps, true, kind)),
        SamplerKind::EulerTrailing => {
            let mut s = s;
            s.config.timestep_spacing = TimestepSpacing::Trailing;
            Box::new(k::Euler::new(s, steps, false, kind))
        }
        SamplerKind::EulerA => Box::new(k::EulerAncestral::new(s, steps)),
        SamplerKind::Heun => Box::new(k::Heun::new(s, steps)),
        SamplerKind::Lms => Box::new(k::Lms::new(s, steps)),
        SamplerKind::Dpm2 => Box::new(k::Kdpm2::new(s, steps)),
        SamplerKind::Dpm2A => Box::new(k::Kdpm2Ancestral::new(s, steps)),
        SamplerKind::DpmPp2m => Box::new(dpmsolver::DpmSolverMultistep::new(
            s, steps, false, false, kind,
        )),
        SamplerKind::DpmPp2mKarras => Box::new(dpmsolver::DpmSolverMultistep::new(
            s, steps, true, false, kind,
        )),
        SamplerKind::DpmPp2mSde => Box::new(dpmsolver::DpmSolverMultistep::new(
            s, steps, false, true, kind,
        )),
        SamplerKind::DpmPp2mSdeKarras => Box::new(dpmsolver::DpmSolverMultistep::new(
            s, steps, true, true, kind,
        )),
        SamplerKind::UniPc => Box::new(unipc::UniPc::new(s, steps)),
    })
}

/// Why a sampler cannot be built.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplerError {
    #[error("steps must be at least 1")]
    NoSteps,
    #[error("{0}")]
    Steps(String),
}

/// One sampling run: timesteps, the step counter, and the sampler's history.
pub trait Sampler: Send {
    fn kind(&self) -> SamplerKind;

    /// Every timestep of the full run, in order (Heun and DPM2 list most of them twice).
    fn timesteps(&self) -> &[f64];

    /// The Karras sigmas of the run, for samplers that work in sigma (else `None`).
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }

    /// Model evaluations per step as diffusers counts them (2 for Heun and DPM2): img2img skips
    /// `order × (steps − init)` entries of [`Sampler::timesteps`].
    fn order(&self) -> usize {
        1
    }

    /// The standard deviation of the initial noise: txt2img starts from `noise × init_noise_sigma`.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    /// Index into [`Sampler::timesteps`] of the next step.
    fn step_index(&self) -> usize;

    /// Start at timestep index `begin` (img2img). Call before the first step.
    fn set_begin_index(&mut self, begin: usize);

    /// The timestep the model is run at for the next step.
    fn timestep(&self) -> f64 {
        let ts = self.timesteps();
        ts[self.step_index().min(ts.len().saturating_sub(1))]
    }

    /// Whether every step has run.
    fn finished(&self) -> bool {
        self.step_index() >= self.timesteps().len()
    }

    /// Steps left to run.
    fn remaining(&self) -> usize {
        self.timesteps().len().saturating_sub(self.step_index())
    }

    /// The latents as the model sees them at the next step.
    fn scale_model_input(&self, sample: &Tensor) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// One step: the model's output at [`Sampler::timestep`] for `sample` → the next latents.
    fn step(
        &mut self,
        model_output: &Tensor,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;

    /// Noise clean latents to the level of the first step to run (img2img, inpainting's
    /// re-noising of the unmasked region uses [`Sampler::add_noise_at`]).
    fn add_noise(&self, original: &Tensor, noise: &Tensor) -> Result<Tensor> {
        self.add_noise_at(original, noise, self.step_index())
    }

    /// Noise clean latents to the level of timestep index `index`.
    fn add_noise_at(&self, original: &Tensor, noise: &Tensor, index: usize) -> Result<Tensor>;

    /// Where img2img at `strength` (0..=1) over `steps` steps starts, as diffusers' img2img
    /// pipeline computes it: `init = min(int(steps × strength), steps)`, start at `steps − init`.
    fn begin_index_for_strength(&self, steps: usize, strength: f64) -> usize {
        let init = ((steps as f64 * strength) as usize).min(steps);
        (steps - init) * self.order()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_both_ways() {
        for k in SamplerKind::ALL {
            assert_eq!(SamplerKind::parse(k.name()), Some(k), "{k}");
            if let Some(a) = k.a1111_name() {
                assert_eq!(SamplerKind::parse(a), Some(k), "{a}");
            }
        }
        assert_eq!(SamplerKind::parse("k_euler_a"), Some(SamplerKind::EulerA));
        assert_eq!(
            SamplerKind::parse("DPM++ 2M karras"),
            Some(SamplerKind::DpmPp2mKarras)
        );
        assert_eq!(SamplerKind::parse("nope"), None);
    }

    #[test]
    fn sd_schedule_tables() {
        let s = NoiseSchedule::new(ScheduleConfig::default());
        let sig = s.train_sigmas();
        assert!((sig[999] - 14.6146).abs() < 1e-3, "{}", sig[999]);
        assert!((sig[0] - 0.0292).abs() < 1e-3, "{}", sig[0]);
        // sigma_to_t inverts the table at the knots.
        for t in [0usize, 1, 500, 998, 999] {
            assert!((s.sigma_to_t(sig[t]) - t as f64).abs() < 1e-3, "t={t}");
        }
        assert_eq!(s.spaced_timesteps(20)[0], 951.0);
        assert_eq!(*s.spaced_timesteps(20).last().unwrap(), 1.0);
        assert_eq!(s.solver_timesteps(20)[0], 941.0);
        assert_eq!(trailing(1000, 20)[0], 999.0);
        assert_eq!(trailing(1000, 30).len(), 30);
    }
}
