//! Inpainting masks: preparation (resize, invert, feathering as A1111's `mask_blur`), what the
//! masked area starts from ([`InpaintFill`]), "only masked" runs over a [`Region`], the engine
//! hooks that confine a run to the masked region, and the final paste of the original.

use std::sync::Arc;

use atelier_contracts::generate::InpaintFill;
use atelier_diffusion::pipeline::{PipelineError, Repaint, RepaintRun, RepaintStart};
use atelier_diffusion::schedulers::Sampler;
use candle_core::{Device, Tensor};

use crate::region::Region;

type PResult<T> = Result<T, PipelineError>;

/// An inpainting mask: white (≥ 128) is repainted.
#[derive(Debug, Clone)]
pub struct Mask {
    pub image: image::GrayImage,
    /// Gaussian feathering of the mask edge, in pixels (A1111's mask_blur).
    pub blur: f32,
    pub invert: bool,
    /// What the masked area starts from.
    pub fill: InpaintFill,
    /// "Only masked": the part of the init image that is generated and pasted back.
    pub region: Option<Region>,
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

    /// The inverted (if asked) and feathered mask at `w`×`h`.
    pub fn at_size(&self, w: u32, h: u32) -> image::GrayImage {
        self.at(w, h, true)
    }

    /// The mask as the run sees it: the region's part (or all of it) at `w`×`h`.
    fn processing(&self, w: u32, h: u32, feathered: bool) -> image::GrayImage {
        let Some(r) = self.region else {
            return self.at(w, h, feathered);
        };
        let (iw, ih) = self.image.dimensions();
        let full = self.at(iw, ih, feathered);
        let part = image::imageops::crop_imm(&full, r.x1, r.y1, r.width(), r.height()).to_image();
        image::imageops::resize(&part, w, h, image::imageops::FilterType::Triangle)
    }

    /// The init image as the run sees it: the region's part (or all of it) at `w`×`h`.
    fn processing_image(&self, image: &image::RgbImage, w: u32, h: u32) -> image::RgbImage {
        let part = match self.region {
            Some(r) => {
                image::imageops::crop_imm(image, r.x1, r.y1, r.width(), r.height()).to_image()
            }
            None => image.clone(),
        };
        if part.dimensions() == (w, h) {
            return part;
        }
        image::imageops::resize(&part, w, h, image::imageops::FilterType::Lanczos3)
    }

    /// The feathered mask at latent resolution [1, 1, h, w], 1 where the image is repainted.
    fn latent(
        &self,
        (width, height): (usize, usize),
        (h, w): (usize, usize),
        device: &Device,
    ) -> PResult<Tensor> {
        let m = self.processing(width as u32, height as u32, true);
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
        let pm = self.processing(width, height, false);
        let mut masked = self.processing_image(image, width, height);
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

    /// The region's part of the init image and, unless the fill is `original`, its masked area
    /// painted over with the colours around it (A1111 fills for every fill but `original`).
    fn prepare_image(&self, image: &image::RgbImage) -> Option<image::RgbImage> {
        if self.region.is_none() && self.fill == InpaintFill::Original {
            return None;
        }
        // The run's size is not known here: work at the region's own size; the engine resizes.
        let (w, h) = match self.region {
            Some(r) => (r.width(), r.height()),
            None => image.dimensions(),
        };
        let part = self.processing_image(image, w, h);
        Some(match self.fill {
            InpaintFill::Original => part,
            _ => crate::fill::fill(&part, &self.processing(w, h, true)),
        })
    }

    /// `latent_noise` puts the run's noise in the masked area, `latent_nothing` zeros.
    fn prepare_clean(&self, clean: Tensor, noise: &Tensor) -> PResult<Tensor> {
        let replace_with = match self.fill {
            InpaintFill::LatentNoise => noise.to_dtype(clean.dtype())?,
            InpaintFill::LatentNothing => clean.zeros_like()?,
            InpaintFill::Original | InpaintFill::Fill => return Ok(clean),
        };
        let (_, _, h, w) = clean.dims4()?;
        let (width, height) = (w * 8, h * 8);
        let m = self
            .latent((width, height), (h, w), clean.device())?
            .to_dtype(clean.dtype())?;
        let keep = (1.0 - &m)?;
        Ok((clean.broadcast_mul(&keep)? + replace_with.broadcast_mul(&m)?)?)
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
        // Only masked: the generated region goes back into the init image, at its size.
        let generated = match self.mask.region {
            Some(r) => {
                let part = image::imageops::resize(
                    &generated,
                    r.width(),
                    r.height(),
                    image::imageops::FilterType::Lanczos3,
                );
                let mut whole = self.original.clone();
                image::imageops::replace(&mut whole, &part, r.x1 as i64, r.y1 as i64);
                whole
            }
            None => generated,
        };
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
