//! Where samplers and pipelines get their Gaussian noise.
//!
//! A generation's noise comes from a [`Generator`] seeded with the image's seed, in the source the
//! user picks ([`RandnSource`]): torch's CPU generator (what diffusers with a CPU generator, ComfyUI
//! and A1111's default draw, bit for bit) or A1111's "NV" source (what torch draws on a CUDA
//! device). Stochastic samplers (DDPM, Euler a, DPM2 a, DPM++ SDE, LCM) draw noise inside their
//! step through a [`NoiseSource`], so a reference trace can also be replayed draw for draw
//! ([`ReplayNoise`]). [`SeededNoise`] (ChaCha8) makes random weights and test data.

mod cephes;
mod numpy_f32;
mod philox;
mod torch_cpu;

pub use philox::PhiloxGenerator;
pub use torch_cpu::TorchCpuGenerator;

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

/// Where a seed's noise comes from.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum RandnSource {
    /// `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))`: diffusers with a
    /// CPU generator, ComfyUI, A1111's "CPU" source.
    #[default]
    #[serde(alias = "CPU", alias = "torch_cpu")]
    #[serde(rename = "cpu")]
    TorchCpu,
    /// A1111's "NV" source: torch's CUDA draws, reproduced on any device.
    #[serde(alias = "NV")]
    Nv,
}

impl RandnSource {
    /// The source's name as A1111's `randn_source` option and infotexts spell it.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::TorchCpu => "CPU",
            Self::Nv => "NV",
        }
    }

    /// `cpu` / `nv` (any case; A1111's `CPU`, `NV`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "cpu" | "torch_cpu" | "torch-cpu" => Some(Self::TorchCpu),
            "nv" => Some(Self::Nv),
            _ => None,
        }
    }
}

/// One seeded generator of a [`RandnSource`]: consecutive draws continue its stream, as
/// consecutive `torch.randn` calls on one generator do.
#[derive(Clone)]
pub enum Generator {
    TorchCpu(TorchCpuGenerator),
    Nv(PhiloxGenerator),
}

impl Generator {
    pub fn new(source: RandnSource, seed: u64) -> Self {
        match source {
            RandnSource::TorchCpu => Self::TorchCpu(TorchCpuGenerator::new(seed)),
            RandnSource::Nv => Self::Nv(PhiloxGenerator::new(seed)),
        }
    }

    /// The next draw of `n` standard-normal float32 values.
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> {
        match self {
            Self::TorchCpu(g) => g.randn_f32(n),
            Self::Nv(g) => g.randn_f32(n),
        }
    }

    /// The next draw of `n` values drawn in float16 (widened); only torch's CPU source has a
    /// float16 path of its own.
    pub fn randn_f16(&mut self, n: usize) -> std::result::Result<Vec<f32>, String> {
        match self {
            Self::TorchCpu(g) => Ok(g.randn_f16(n).into_iter().map(f32::from).collect()),
            Self::Nv(_) => Err("the NV source draws in float32 only".into()),
        }
    }

    /// The next draw as an f32 tensor of `shape` on `device`.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data = self.randn_f32(shape.elem_count());
        Tensor::from_vec(data, shape, device)
    }
}

impl NoiseSource for Generator {
    fn randn_like(&mut self, like: &Tensor) -> Result<Tensor> {
        self.randn(like.shape(), like.device())?
            .to_dtype(like.dtype())
    }
}

/// Noise from a seeded ChaCha8 stream, for random weights and test data: the same seed gives the
/// same draws on every machine.
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
    fn generators_continue_their_stream_and_small_draws_share_torchs_cached_pair() {
        for source in [RandnSource::TorchCpu, RandnSource::Nv] {
            let mut a = Generator::new(source, 77);
            let first = a.randn_f32(64);
            let second = a.randn_f32(64);
            assert_ne!(first, second, "{source:?}: a generator moves on");
            assert_eq!(Generator::new(source, 77).randn_f32(64), first);
        }
        // Under 16 elements torch draws Box–Muller pairs and keeps the second for the next
        // element, across calls: one draw of 2 equals two draws of 1.
        let two = Generator::new(RandnSource::TorchCpu, 3).randn_f32(2);
        let mut g = Generator::new(RandnSource::TorchCpu, 3);
        let ones = [g.randn_f32(1)[0], g.randn_f32(1)[0]];
        assert_eq!(two, ones);
        // torch seeds its Mersenne Twister from the low 32 bits of the seed.
        let wide = Generator::new(RandnSource::TorchCpu, (1 << 32) + 9).randn_f32(40);
        assert_eq!(wide, Generator::new(RandnSource::TorchCpu, 9).randn_f32(40));
        assert_ne!(
            Generator::new(RandnSource::Nv, (1 << 32) + 9).randn_f32(40),
            Generator::new(RandnSource::Nv, 9).randn_f32(40),
            "the NV source keys on all 64 bits"
        );
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
