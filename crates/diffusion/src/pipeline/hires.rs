//! A1111's hires fix: txt2img at the request's size, the result upscaled to the hires size —
//! in latent space (`Latent`: bilinear, `Latent (nearest)`), or as pixels (`Lanczos`, `Nearest`)
//! re-encoded — then img2img at that size from the same seeds for the hires steps at the hires
//! denoising strength. The infotext says what A1111's does: the first pass's size, then
//! `Denoising strength`, `Hires upscale` or `Hires resize`, `Hires steps`, `Hires upscaler`.

use super::img2img::Init;
use super::{Generated, PResult, PipelineError, StableDiffusion, Txt2Img};

/// How the first pass's result is brought to the hires size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiresUpscaler {
    Latent,
    LatentNearest,
    Lanczos,
    Nearest,
}

impl HiresUpscaler {
    /// A1111's names (`hr_upscaler`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "Latent" | "Latent (bilinear)" => Some(Self::Latent),
            "Latent (nearest)" => Some(Self::LatentNearest),
            "Lanczos" => Some(Self::Lanczos),
            "Nearest" => Some(Self::Nearest),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Latent => "Latent",
            Self::LatentNearest => "Latent (nearest)",
            Self::Lanczos => "Lanczos",
            Self::Nearest => "Nearest",
        }
    }
}

/// The second pass.
#[derive(Debug, Clone, PartialEq)]
pub struct Hires {
    pub width: usize,
    pub height: usize,
    pub upscaler: HiresUpscaler,
    /// Steps of the second pass; 0: the first pass's.
    pub steps: usize,
    pub denoising_strength: f64,
    /// The second pass's prompts; `None`: the first pass's.
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    /// What the infotext names the target: `Hires upscale: 2` or `Hires resize: 1024x768`.
    pub label: String,
}

impl StableDiffusion {
    /// txt2img with a hires second pass (see the module).
    pub fn txt2img_hires(
        &self,
        req: &Txt2Img,
        hr: &Hires,
        mut on_step: impl FnMut(usize, usize) -> bool,
    ) -> PResult<Vec<Generated>> {
        if !(hr.denoising_strength.is_finite() && (0.0..=1.0).contains(&hr.denoising_strength)) {
            return Err(PipelineError::BadRequest(format!(
                "hires denoising strength must be within 0..=1 (got {})",
                hr.denoising_strength
            )));
        }
        let second = Txt2Img {
            width: hr.width,
            height: hr.height,
            steps: if hr.steps == 0 { req.steps } else { hr.steps },
            prompt: hr.prompt.clone().unwrap_or_else(|| req.prompt.clone()),
            negative_prompt: hr
                .negative_prompt
                .clone()
                .unwrap_or_else(|| req.negative_prompt.clone()),
            ..req.clone()
        };
        second.validate().map_err(PipelineError::BadRequest)?;
        let (h, w) = self.latent_size(hr.width, hr.height)?;
        // Progress over both passes (the second runs about strength × its steps).
        let later = ((second.steps as f64) * hr.denoising_strength).ceil() as usize;
        let (x, _) = self.denoised(req, (None, None), |d, t| on_step(d, t + later), None)?;
        let init = match hr.upscaler {
            HiresUpscaler::Latent => {
                Init::from_latents(x.upsample_bilinear2d(h, w, false)?, hr.denoising_strength)
            }
            HiresUpscaler::LatentNearest => {
                Init::from_latents(x.upsample_nearest2d(h, w)?, hr.denoising_strength)
            }
            HiresUpscaler::Lanczos | HiresUpscaler::Nearest => {
                let filter = match hr.upscaler {
                    HiresUpscaler::Lanczos => image::imageops::FilterType::Lanczos3,
                    _ => image::imageops::FilterType::Nearest,
                };
                let images = self.decode_rgb(&x, req.width, req.height)?;
                let up: Vec<_> = images
                    .iter()
                    .map(|i| image::imageops::resize(i, hr.width as u32, hr.height as u32, filter))
                    .collect();
                let mut latents = Vec::with_capacity(up.len());
                for i in &up {
                    latents.push(self.encode_image(i, hr.width, hr.height)?);
                }
                Init::from_latents(
                    candle_core::Tensor::cat(&latents, 0)?,
                    hr.denoising_strength,
                )
            }
        };
        let first = req.steps;
        let mut out = self.generate(
            &second,
            (Some(&init), None),
            |d, t| on_step(first + d, first + t),
            None,
        )?;
        for g in &mut out {
            g.parameters = g
                .parameters
                .replace(
                    &format!("Size: {}x{}", hr.width, hr.height),
                    &format!("Size: {}x{}", req.width, req.height),
                )
                .replace(
                    &format!("Steps: {}", second.steps),
                    &format!("Steps: {}", req.steps),
                );
            g.parameters.push_str(&format!(
                ", {}, Hires steps: {}, Hires upscaler: {}",
                hr.label,
                second.steps,
                hr.upscaler.name()
            ));
        }
        Ok(out)
    }
}
