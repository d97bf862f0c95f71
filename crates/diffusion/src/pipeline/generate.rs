//! One request on its own: txt2img, or img2img/inpainting from an [`Init`].

use candle_core::{DType, Tensor};

use super::cond::Cond;
use super::denoise::{Preview, Run};
use super::img2img::{Init, RepaintRun};
use super::seeds::{BatchNoise, ImageSeeds};
use super::{Generated, PResult, PipelineError, StableDiffusion, Txt2Img, MAX_PIXELS};
use crate::schedulers::{NoiseSchedule, Sampler};

/// Where the loop starts: latents, the UNet's extra channels, the repaint hooks.
pub(super) struct Start {
    pub x: Tensor,
    pub extra: Option<Tensor>,
    pub repaint: Option<Box<dyn RepaintRun>>,
}

impl StableDiffusion {
    /// The latent grid (h, w) of a `width`×`height` image, or why this model cannot make it.
    pub(super) fn latent_size(&self, width: usize, height: usize) -> PResult<(usize, usize)> {
        let f = self.vae_scale();
        if width % f != 0 || height % f != 0 {
            return Err(PipelineError::BadRequest(format!(
                "width and height must be multiples of {f} for this model"
            )));
        }
        let (h, w) = (height / f, width / f);
        if h * w > MAX_PIXELS / 64 {
            return Err(PipelineError::BadRequest(format!(
                "{width}x{height} is {} latent cells for this model, over its budget of {}",
                h * w,
                MAX_PIXELS / 64
            )));
        }
        Ok((h, w))
    }

    /// A fresh sampler of `req`'s kind over `req.steps` on this model's noise schedule.
    pub(super) fn sampler_for(&self, req: &Txt2Img) -> PResult<Box<dyn Sampler>> {
        let (config, options) =
            self.scheduler
                .for_sampler(req.sampler)
                .map_err(|e| PipelineError::Model {
                    path: format!("{}/scheduler", self.name),
                    reason: e,
                })?;
        crate::schedulers::build_with(req.sampler, &NoiseSchedule::new(config), req.steps, options)
            .map_err(|e| PipelineError::BadRequest(e.to_string()))
    }

    /// Latent channels the sampler works on (a 9-channel UNet's first 4).
    pub(super) fn latent_channels(&self) -> usize {
        self.nets.in_channels().min(4)
    }

    /// One request: `req.batch_size` images, image i from seed + i (its initial noise the given
    /// `latents`' row i when there are some).
    pub(super) fn generate(
        &self,
        req: &Txt2Img,
        (init, latents): (Option<&Init>, Option<&Tensor>),
        on_step: impl FnMut(usize, usize) -> bool,
        preview: Preview<'_, '_>,
    ) -> PResult<Vec<Generated>> {
        let (x, repaint) = self.denoised(req, (init, latents), on_step, preview)?;
        let decoded = self.decode_rgb(&x, req.width, req.height)?;
        Ok(decoded
            .into_iter()
            .enumerate()
            .map(|(i, image)| {
                let image = match &repaint {
                    Some(r) => r.finish(image),
                    None => image,
                };
                let seeds = ImageSeeds::of(req.seed, &req.noise, i);
                Generated {
                    seed: seeds.seed,
                    image,
                    parameters: self.parameters(req, &seeds, init.map(|i| i.strength)),
                }
            })
            .collect())
    }

    /// txt2img up to the VAE: the images as floats `[batch_size, height, width, 3]` in [0, 1]
    /// (diffusers' `output_type="np"`, before 8-bit rounding), from the seeds' noise or from
    /// given initial `latents` (see [`txt2img_from_latents`](Self::txt2img_from_latents)).
    pub fn txt2img_pixels(
        &self,
        req: &Txt2Img,
        latents: Option<&Tensor>,
        on_step: impl FnMut(usize, usize) -> bool,
    ) -> PResult<Tensor> {
        let (x, _) = self.denoised(req, (None, latents), on_step, None)?;
        self.decode_unit(&x)
    }

    /// One request's final latents (and the repaint hooks that finish its images).
    pub(super) fn denoised(
        &self,
        req: &Txt2Img,
        (init, latents): (Option<&Init>, Option<&Tensor>),
        mut on_step: impl FnMut(usize, usize) -> bool,
        preview: Preview<'_, '_>,
    ) -> PResult<(Tensor, Option<Box<dyn RepaintRun>>)> {
        req.validate().map_err(PipelineError::BadRequest)?;
        let (h, w) = self.latent_size(req.width, req.height)?;
        let b = req.batch_size;
        let use_cfg = req.cfg_scale != 1.0;
        let enc = self.encode_request(req, use_cfg)?;
        let size = (req.width, req.height);
        let conds = (0..enc.ctx.len())
            .map(|ci| self.stack(&[(&enc, ci)], use_cfg, size))
            .collect::<PResult<Vec<Cond>>>()?;
        let mut sampler = self.sampler_for(req)?;
        let mut noise = BatchNoise::new(
            req.noise.source,
            req.noise.eta_noise_seed_delta,
            (0..b).map(|i| ImageSeeds::of(req.seed, &req.noise, i)),
        );
        let shape = (b, self.latent_channels(), h, w);
        // Drawn either way, so later steps' noise is the seeds' next draws.
        let drawn = noise.initial((1, shape.1, h, w), self.device())?;
        let first = match latents {
            None => drawn,
            Some(l) if l.dims() == [shape.0, shape.1, shape.2, shape.3] => {
                l.to_dtype(DType::F32)?.to_device(self.device())?
            }
            Some(l) => {
                return Err(PipelineError::BadRequest(format!(
                    "initial latents of shape {:?}; this request needs {shape:?} \
                     (batch, channels, height / {f}, width / {f})",
                    l.dims(),
                    f = self.vae_scale()
                )))
            }
        };
        let start = match init {
            None => Start {
                x: first.affine(sampler.init_noise_sigma(), 0.0)?,
                extra: None,
                repaint: None,
            },
            Some(init) => self.start_from(init, req, sampler.as_mut(), &first)?,
        };
        let extra = match start.extra {
            Some(e) => Some(e),
            None if self.is_inpainting() => Some(self.whole_image_channels(req)?),
            None => None,
        };
        let run = Run {
            sampler,
            cfg_scale: req.cfg_scale,
            batch: b,
            size,
            extra,
            repaint: start.repaint.as_deref(),
            noise,
        };
        let x = start.x;
        let mut cond_at = |step: usize| Ok(conds[enc.entry_at(step)].clone());
        let x = self.denoise(run, x, &mut cond_at, &mut on_step, preview)?;
        Ok((x, start.repaint))
    }

    /// A 9-channel model's extra input when nothing is masked: the whole image is repainted
    /// (mask of ones, the masked image all mid grey), as A1111 runs txt2img on such models.
    fn whole_image_channels(&self, req: &Txt2Img) -> PResult<Tensor> {
        let (h, w) = self.latent_size(req.width, req.height)?;
        let b = req.batch_size;
        let m = Tensor::ones((b, 1, h, w), DType::F32, self.device())?;
        let grey = image::RgbImage::from_pixel(
            req.width as u32,
            req.height as u32,
            image::Rgb([128, 128, 128]),
        );
        let ml = self
            .encode_image(&grey, req.width, req.height)?
            .repeat((b, 1, 1, 1))?;
        Ok(Tensor::cat(&[m, ml], 1)?)
    }
}
