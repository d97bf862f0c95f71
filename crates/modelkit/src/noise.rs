//! Where samplers and pipelines get their Gaussian noise.
//!
//! Stochastic samplers (DDPM, Euler a, DPM2 a, DPM++ SDE, LCM) draw noise inside their step; they
//! take it from a [`NoiseSource`] so a run is reproducible from its seed ([`SeededNoise`]) and a
//! reference trace can be replayed draw for draw ([`ReplayNoise`]).

use std::collections::VecDeque;

use candle_core::{Device, Result, Shape, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A source of standard-normal tensors.
pub trait NoiseSource: Send {
    /// A tensor of independent N(0, 1) draws with the shape, dtype and device of `like`.
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor>;
}

/// Noise from a seeded ChaCha8 stream: the same seed gives the same draws on every machine and
/// every device (the draws are made on the host, then moved), unlike a device RNG.
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// `n` draws as f32.
    pub fn draws(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect()
    }

    /// A standard-normal tensor of `shape` on `device` (f32; cast as needed).
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data = self.draws(shape.elem_count());
        Tensor::from_vec(data, shape, device)
    }
}

impl NoiseSource for SeededNoise {
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        self.randn(like.shape(), like.device())?
            .to_dtype(like.dtype())
    }
}

/// Noise replayed from recorded draws, in order (conformance traces). Running out, or a draw of the
/// wrong size, is an error: the sampler asked for noise the reference did not use.
pub struct ReplayNoise {
    draws: VecDeque<Vec<f32>>,
}

impl ReplayNoise {
    pub fn new(draws: impl IntoIterator<Item = Vec<f32>>) -> Self {
        Self {
            draws: draws.into_iter().collect(),
        }
    }

    /// Draws not consumed yet.
    pub fn remaining(&self) -> usize {
        self.draws.len()
    }
}

impl NoiseSource for ReplayNoise {
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        let draw = self
            .draws
            .pop_front()
            .ok_or_else(|| candle_core::Error::Msg("the replayed noise ran out".into()))?;
        if draw.len() != like.elem_count() {
            return Err(candle_core::Error::Msg(format!(
                "replayed noise has {} values, the sampler needs {}",
                draw.len(),
                like.elem_count()
            )));
        }
        Tensor::from_vec(draw, like.shape(), like.device())?.to_dtype(like.dtype())
    }
}

/// No noise at all: for deterministic samplers; a stochastic one asking for noise gets an error.
pub struct NoNoise;

impl NoiseSource for NoNoise {
    fn randn_like(&mut self, _like: &Tensor) -> Result<Tensor> {
        Err(candle_core::Error::Msg(
            "this sampler needs noise but none was given".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_repeats_and_differs_by_seed() {
        let a = SeededNoise::new(7).draws(1000);
        let b = SeededNoise::new(7).draws(1000);
        let c = SeededNoise::new(8).draws(1000);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
        let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
        assert!(mean.abs() < 0.1, "mean {mean}");
        assert!((var - 1.0).abs() < 0.15, "variance {var}");
    }

    #[test]
    fn replay_checks_size_and_exhaustion() {
        let like = Tensor::zeros((1, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
        let mut r = ReplayNoise::new([vec![1.0, 2.0], vec![3.0]]);
        let t = r.randn_like(&like).unwrap();
        assert_eq!(
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1.0, 2.0]
        );
        assert!(r.randn_like(&like).is_err());
        assert!(r.randn_like(&like).is_err());
    }
}
