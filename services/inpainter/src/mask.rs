//! Inpainting masks: preparation (resize, invert, feathering as A1111's `mask_blur`), the
//! engine hooks that confine a run to the masked region, and the final paste of the original.

use std::sync::Arc;

use atelier_diffusion::pipeline::{PipelineError, Repaint, RepaintRun, RepaintStart};
use atelier_diffusion::schedulers::Sampler;
use candle_core::{Device, Tensor};

type PResult<T> = Result<T, PipelineError>;

/// An inpainting mask: white (≥ 128) is repainted.
#[derive(Debug, Clone)]
pub struct Mask {
    pub image: image::GrayImage,
    /// Gaussian feathering of the mask edge, in pixels (A1111's mask_blur).
    pub blur: f32,
    pub invert: bool,
}

impl Mask {
    /// The engine's hooks for this mask, to put in an `Init`.
    pub fn repaint(self) -> Arc<dyn Repaint> {
        Arc::new(self)
    }

    /// The mask at `w`×`h` (nearest-neighbour), inverted if asked, feathered if `feathered`.
    fn at(&self, w: u32, h: u32, feathered: bool) -> image::GrayImage {
        let mut m = if self.image.dimensions() != (w, h) {
            image::imageops::resize(&self.image, w, h, image::imageops::FilterType::Nearest)
        } else {
            self.image.clone()
        };
        if self.invert {
            image::imageops::invert(&mut m);
        }
        if feathered && self.blur > 0.0 {
            m = image::imageops::blur(&m, self.blur);
        }
        m
    }

    /// The feathered mask at latent resolution [1, 1, h, w], 1 where the image is repainted.
    fn latent(
        &self,
        (width, height): (usize, usize),
        (h, w): (usize, usize),
        device: &Device,
    ) -> PResult<Tensor> {
        let m = self.at(width as u32, height as u32, true);
        let small = image::imageops::resize(
            &m,
            w as u32,
            h as u32,
            image::imageops::FilterType::Triangle,
        );
        let v: Vec<f32> = small
            .into_raw()
            .into_iter()
            .map(|p| p as f32 / 255.0)
            .collect();
        Ok(Tensor::from_vec(v, (1, 1, h, w), device)?)
    }

    /// The init image at `width`×`height` with the repainted region set to mid grey (what a
    /// 9-channel model sees as the masked image).
    fn masked_image(&self, image: &image::RgbImage, width: u32, height: u32) -> image::RgbImage {
        let pm = self.at(width, height, false);
        let mut masked = if image.dimensions() != (width, height) {
            image::imageops::resize(image, width, height, image::imageops::FilterType::Lanczos3)
        } else {
            image.clone()
        };
        for (px, mp) in masked.pixels_mut().zip(pm.pixels()) {
            if mp.0[0] >= 128 {
                *px = image::Rgb([128, 128, 128]);
            }
        }
        masked
    }
}

impl Repaint for Mask {
    fn validate(&self, image: &image::RgbImage) -> Result<(), String> {
        if self.image.dimensions() != image.dimensions() {
            return Err(format!(
                "the mask is {}x{} but the image is {}x{}: they must be the same size",
                self.image.width(),
                self.image.height(),
                image.width(),
                image.height()
            ));
        }
        if !(self.blur.is_finite() && (0.0..=64.0).contains(&self.blur)) {
            return Err(format!(
                "mask_blur must be within 0..=64 (got {})",
                self.blur
            ));
        }
        Ok(())
    }

    fn begin(&self, s: &RepaintStart<'_>) -> PResult<Box<dyn RepaintRun>> {
        let (b, _, h, w) = s.clean.dims4()?;
        let device = s.model.device();
        let m = self
            .latent((s.width, s.height), (h, w), device)?
            .repeat((b, 1, 1, 1))?;
        let latents = if s.model.is_inpainting() {
            // 9-channel models repaint from the mask and the masked image they are given.
            let masked = self.masked_image(s.image, s.width as u32, s.height as u32);
            let ml = s
                .model
                .encode_image(&masked, s.width, s.height)?
                .repeat((b, 1, 1, 1))?;
            Latents::Channels(Tensor::cat(&[m, ml], 1)?)
        } else {
            let keep = (1.0 - &m)?;
            Latents::Inject {
                clean: s.clean.clone(),
                noise: s.noise.clone(),
                m,
                keep,
            }
        };
        Ok(Box::new(MaskRun {
            latents,
            original: s.image.clone(),
            mask: self.clone(),
        }))
    }
}

/// How the masked region is confined in latent space.
enum Latents {
    /// Regular models: after every step the unmasked region is replaced by the init image's
    /// latents re-noised to the next step's level (clean after the last).
    Inject {
        clean: Tensor,
        noise: Tensor,
        m: Tensor,
        keep: Tensor,
    },
    /// 9-channel models: the mask and the masked image's latents as extra UNet input.
    Channels(Tensor),
}

struct MaskRun {
    latents: Latents,
    original: image::RgbImage,
    mask: Mask,
}

impl RepaintRun for MaskRun {
    fn unet_channels(&self) -> PResult<Option<Tensor>> {
        Ok(match &self.latents {
            Latents::Channels(c) => Some(c.clone()),
            Latents::Inject { .. } => None,
        })
    }

    fn after_step(&self, x: Tensor, sampler: &dyn Sampler) -> PResult<Tensor> {
        let Latents::Inject {
            clean,
            noise,
            m,
            keep,
        } = &self.latents
        else {
            return Ok(x);
        };
        let orig = if sampler.finished() {
            clean.clone()
        } else {
            sampler.add_noise_at(clean, noise, sampler.step_index())?
        };
        Ok((x.broadcast_mul(m)? + orig.to_dtype(x.dtype())?.broadcast_mul(keep)?)?)
    }

    /// Pastes the original back where the (feathered) mask keeps it, as A1111 does, so the
    /// unmasked region is the original's pixels exactly.
    fn finish(&self, generated: image::RgbImage) -> image::RgbImage {
        let (w, h) = generated.dimensions();
        let orig = if self.original.dimensions() != (w, h) {
            image::imageops::resize(&self.original, w, h, image::imageops::FilterType::Lanczos3)
        } else {
            self.original.clone()
        };
        let m = self.mask.at(w, h, true);
        let mut out = generated.clone();
        for ((o, g), (src, mp)) in out
            .pixels_mut()
            .zip(generated.pixels())
            .zip(orig.pixels().zip(m.pixels()))
        {
            let a = mp.0[0] as f32 / 255.0;
            for c in 0..3 {
                o.0[c] = (g.0[c] as f32 * a + src.0[c] as f32 * (1.0 - a)).round() as u8;
            }
        }
        out
    }
}
