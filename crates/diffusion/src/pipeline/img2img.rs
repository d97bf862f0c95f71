//! img2img, and the engine's side of inpainting: an [`Init`] image noised to the strength's
//! timestep, with [`Repaint`] hooks around the denoise loop. The inpainter implements the hooks
//! (mask preparation and blur, latent injection, the 9-channel models' mask channels); the
//! engine knows no masks.

use std::sync::Arc;

use candle_core::Tensor;

use super::generate::Start;
use super::{Generated, PResult, PipelineError, PreviewFn, StableDiffusion, Txt2Img};
use crate::schedulers::Sampler;

/// The starting image of img2img and inpainting.
#[derive(Debug, Clone)]
pub struct Init {
    pub image: image::RgbImage,
    /// 0..=1: how much of the schedule runs (1 = from pure noise).
    pub strength: f64,
    /// What repaints only part of the image (the inpainter's masks); none repaints all of it.
    pub repaint: Option<Arc<dyn Repaint>>,
    /// Clean latents to start from instead of encoding `image`, one row per image of the batch
    /// (the hires fix's upscaled first pass).
    pub latents: Option<Tensor>,
    /// Encode `image` at its own size (floored to multiples of 8) and resize the latents
    /// bilinearly to the output's, instead of resizing the pixels (A1111's resize mode 3).
    pub latent_resize: bool,
}

impl Init {
    /// A start from latents (`[batch, 4, h, w]`), noised to `strength`'s step.
    pub fn from_latents(latents: Tensor, strength: f64) -> Self {
        Self {
            image: image::RgbImage::new(0, 0),
            strength,
            repaint: None,
            latents: Some(latents),
            latent_resize: false,
        }
    }

    /// A clear reason for any setting out of range.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.strength.is_finite() && (0.0..=1.0).contains(&self.strength)) {
            return Err(format!(
                "strength must be within 0..=1 (got {})",
                self.strength
            ));
        }
        match &self.repaint {
            Some(r) => r.validate(&self.image),
            None => Ok(()),
        }
    }
}

/// Repainting part of an image: hooks the engine calls around one img2img run.
pub trait Repaint: Send + Sync + std::fmt::Debug {
    /// A clear reason when this cannot apply to `image` (a mask of another size, say).
    fn validate(&self, image: &image::RgbImage) -> std::result::Result<(), String>;

    /// The image the run encodes, from the init image as given (a region of it, or the masked
    /// area painted over); `None`: the init image itself.
    fn prepare_image(&self, _image: &image::RgbImage) -> Option<image::RgbImage> {
        None
    }

    /// The clean latents the run noises and starts from (the masked area's replaced, say), given
    /// the encoded ones and the run's noise.
    fn prepare_clean(&self, clean: Tensor, _noise: &Tensor) -> PResult<Tensor> {
        Ok(clean)
    }

    /// Before the first step: this run's hooks.
    fn begin(&self, start: &RepaintStart<'_>) -> PResult<Box<dyn RepaintRun>>;
}

/// What a run's hooks start from.
pub struct RepaintStart<'a> {
    pub model: &'a StableDiffusion,
    /// The init image as given and the output size it is resized to.
    pub image: &'a image::RgbImage,
    pub width: usize,
    pub height: usize,
    /// The init image's clean latents and the run's initial noise, both `[B, 4, h, w]` f32.
    pub clean: &'a Tensor,
    pub noise: &'a Tensor,
}

/// One run's hooks.
pub trait RepaintRun {
    /// Input channels the UNet takes after the latents (`[B, 5, h, w]` for 9-channel models).
    fn unet_channels(&self) -> PResult<Option<Tensor>>;

    /// After each sampler step: the latents the next step starts from.
    fn after_step(&self, x: Tensor, sampler: &dyn Sampler) -> PResult<Tensor>;

    /// A decoded image's final pixels.
    fn finish(&self, image: image::RgbImage) -> image::RgbImage;
}

impl StableDiffusion {
    /// img2img: start from `init` noised to the strength's timestep (pure noise at strength 1,
    /// which then equals txt2img from the same seed); `init.repaint` confines the change.
    pub fn img2img(
        &self,
        req: &Txt2Img,
        init: &Init,
        on_step: impl FnMut(usize, usize) -> bool,
    ) -> PResult<Vec<Generated>> {
        init.validate().map_err(PipelineError::BadRequest)?;
        self.generate(req, (Some(init), None), on_step, None)
    }

    /// txt2img (`init` None) or img2img, decoding the first image's current latents every
    /// `every` steps for `on_preview(step, image)` (A1111's live preview, full VAE decode).
    pub fn generate_with_previews(
        &self,
        req: &Txt2Img,
        init: Option<&Init>,
        on_step: impl FnMut(usize, usize) -> bool,
        every: usize,
        on_preview: &mut PreviewFn<'_>,
    ) -> PResult<Vec<Generated>> {
        if let Some(i) = init {
            i.validate().map_err(PipelineError::BadRequest)?;
        }
        self.generate(req, (init, None), on_step, Some((every.max(1), on_preview)))
    }

    /// The loop's start from an init image: the sampler set to begin at the strength's step,
    /// the clean latents noised to it, and the repaint hooks begun.
    pub(super) fn start_from(
        &self,
        init: &Init,
        req: &Txt2Img,
        sampler: &mut dyn Sampler,
        noise: &Tensor,
    ) -> PResult<Start> {
        let clean = match &init.latents {
            Some(l) => l.to_dtype(noise.dtype())?,
            None => {
                let prepared = init
                    .repaint
                    .as_ref()
                    .and_then(|r| r.prepare_image(&init.image));
                let image = prepared.as_ref().unwrap_or(&init.image);
                let encoded = if init.latent_resize {
                    let own = |side: u32| ((side / 8) * 8).max(8) as usize;
                    self.encode_image(image, own(image.width()), own(image.height()))?
                        .upsample_bilinear2d(noise.dim(2)?, noise.dim(3)?, false)?
                } else {
                    self.encode_image(image, req.width, req.height)?
                };
                encoded.repeat((req.batch_size, 1, 1, 1))?
            }
        };
        let clean = match &init.repaint {
            Some(r) => r.prepare_clean(clean, noise)?,
            None => clean,
        };
        if init.strength < 1.0 {
            let begin = sampler.begin_index_for_strength(req.steps, init.strength);
            sampler.set_begin_index(begin);
        }
        if sampler.finished() {
            return Err(PipelineError::BadRequest(format!(
                "strength {} over {} steps leaves no step to run: raise strength or steps",
                init.strength, req.steps
            )));
        }
        let x = if init.strength >= 1.0 {
            noise.affine(sampler.init_noise_sigma(), 0.0)?
        } else {
            sampler.add_noise(&clean, noise)?
        };
        let repaint = match &init.repaint {
            None => None,
            Some(r) => Some(r.begin(&RepaintStart {
                model: self,
                image: &init.image,
                width: req.width,
                height: req.height,
                clean: &clean,
                noise,
            })?),
        };
        let extra = match &repaint {
            Some(r) => r.unet_channels()?,
            None => None,
        };
        Ok(Start { x, extra, repaint })
    }
}
