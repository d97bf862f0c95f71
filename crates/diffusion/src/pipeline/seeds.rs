//! Where a generation's noise comes from: one generator per image, seeded with the image's seed
//! (image i of a request has seed + i, as A1111's batches and diffusers' lists of generators),
//! drawing its initial latents and then each later step's noise, in the source the request names
//! (torch's CPU generator by default, or A1111's "NV"). A1111's variation seeds mix in a second
//! seed's noise by spherical interpolation; its "eta noise seed delta" reseeds the step noise.

use candle_core::{Device, Shape, Tensor};
use serde::{Deserialize, Serialize};

use super::PResult;
use crate::noise::{Generator, NoiseSource, RandnSource};

/// A request's noise settings beyond its seed (A1111's names in the comments).
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct NoiseOptions {
    /// `randn_source`: `cpu` (torch's CPU generator) or `nv`.
    #[serde(default)]
    pub source: RandnSource,
    /// Variation seed of the first image (image i: subseed + i); used when the strength is not 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subseed: Option<u64>,
    /// Variation strength: 0 is the seed's noise, 1 the variation seed's.
    #[serde(default)]
    pub subseed_strength: f64,
    /// `eta_noise_seed_delta` (ENSD): step noise after the initial latents comes from
    /// seed + delta; 0 keeps one stream.
    #[serde(default)]
    pub eta_noise_seed_delta: u64,
}

impl NoiseOptions {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.subseed_strength.is_finite() && (0.0..=1.0).contains(&self.subseed_strength)) {
            return Err(format!(
                "subseed_strength must be within 0..=1 (got {})",
                self.subseed_strength
            ));
        }
        Ok(())
    }

    /// Whether two requests draw alike enough to share one batch's noise streams.
    pub fn batch_key(&self) -> (RandnSource, u64) {
        (self.source, self.eta_noise_seed_delta)
    }
}

/// One image's seeds.
#[derive(Debug, Clone, Copy)]
pub(super) struct ImageSeeds {
    pub seed: u64,
    /// The variation seed and its strength, when it takes part.
    pub variation: Option<(u64, f64)>,
}

impl ImageSeeds {
    /// The seeds of image `i` of a request with `seed` and `opts`.
    pub fn of(seed: u64, opts: &NoiseOptions, i: usize) -> Self {
        let variation = match (opts.subseed, opts.subseed_strength) {
            (Some(sub), s) if s != 0.0 => Some((sub.wrapping_add(i as u64), s)),
            _ => None,
        };
        Self {
            seed: seed.wrapping_add(i as u64),
            variation,
        }
    }
}

/// The per-image generators of one run of the loop.
pub(super) struct BatchNoise {
    images: Vec<(ImageSeeds, Generator)>,
    source: RandnSource,
    delta: u64,
}

impl BatchNoise {
    pub fn new(
        source: RandnSource,
        delta: u64,
        images: impl IntoIterator<Item = ImageSeeds>,
    ) -> Self {
        Self {
            images: images
                .into_iter()
                .map(|s| (s, Generator::new(source, s.seed)))
                .collect(),
            source,
            delta,
        }
    }

    /// One draw of `one` (batch dimension 1) per image, stacked: the initial noise, mixed with
    /// the variation seed's first draw where one is set. With an eta noise seed delta, each
    /// image's step noise then starts over from seed + delta.
    pub fn initial(&mut self, one: impl Into<Shape>, device: &Device) -> PResult<Tensor> {
        let one = one.into();
        let mut parts = Vec::with_capacity(self.images.len());
        for (seeds, g) in &mut self.images {
            let mut noise = g.randn_f32(one.elem_count());
            if let Some((sub, strength)) = seeds.variation {
                let other = Generator::new(self.source, sub).randn_f32(one.elem_count());
                noise = slerp(strength, &noise, &other, one.dims());
            }
            parts.push(Tensor::from_vec(noise, one.clone(), device)?);
            if self.delta != 0 {
                *g = Generator::new(self.source, seeds.seed.wrapping_add(self.delta));
            }
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

impl NoiseSource for BatchNoise {
    fn randn_like(&mut self, like: &Tensor) -> candle_core::Result<Tensor> {
        let mut one = like.dims().to_vec();
        one[0] = 1;
        let parts = self
            .images
            .iter_mut()
            .map(|(_, g)| g.randn(one.clone(), like.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.to_dtype(like.dtype())
    }
}

/// A1111's `slerp(strength, noise, variation)` on one image's (1, C, H, W) noise: both are
/// normalised along H (its tensors are C×H×W and it takes the norm over dim 1), the angle is
/// taken per (C, W) column, and a near-parallel pair (mean cosine > 0.9995) is mixed linearly
/// the way A1111 writes it.
fn slerp(t: f64, low: &[f32], high: &[f32], dims: &[usize]) -> Vec<f32> {
    let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let c = low.len() / (h * w);
    let at = |ci: usize, y: usize, x: usize| (ci * h + y) * w + x;
    let norm = |v: &[f32], ci, x| {
        (0..h)
            .map(|y| f64::from(v[at(ci, y, x)]).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    let mut dots = vec![0.0; c * w];
    for ci in 0..c {
        for x in 0..w {
            let (nl, nh) = (norm(low, ci, x), norm(high, ci, x));
            dots[ci * w + x] = (0..h)
                .map(|y| f64::from(low[at(ci, y, x)]) / nl * f64::from(high[at(ci, y, x)]) / nh)
                .sum::<f64>();
        }
    }
    let mean = dots.iter().sum::<f64>() / dots.len() as f64;
    let mut out = vec![0.0f32; low.len()];
    for ci in 0..c {
        for x in 0..w {
            let omega = dots[ci * w + x].clamp(-1.0, 1.0).acos();
            let (a, b) = if mean > 0.9995 {
                (t, 1.0 - t)
            } else {
                let so = omega.sin();
                (((1.0 - t) * omega).sin() / so, (t * omega).sin() / so)
            };
            for y in 0..h {
                let i = at(ci, y, x);
                out[i] = (a * f64::from(low[i]) + b * f64::from(high[i])) as f32;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slerp_keeps_its_ends_and_the_noise_scale() {
        let dims = [1, 4, 16, 16];
        let a = Generator::new(RandnSource::TorchCpu, 1).randn_f32(1024);
        let b = Generator::new(RandnSource::TorchCpu, 2).randn_f32(1024);
        let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-5);
        assert!(close(&slerp(0.0, &a, &b, &dims), &a));
        assert!(close(&slerp(1.0, &a, &b, &dims), &b));
        // Spherical, not linear: halfway between two independent noises keeps unit variance
        // (a linear mix would fall to 0.5).
        let mid = slerp(0.5, &a, &b, &dims);
        let var = mid.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / 1024.0;
        assert!((var - 1.0).abs() < 0.15, "variance {var}");
        assert!(!close(&mid, &a) && !close(&mid, &b));
    }
}
