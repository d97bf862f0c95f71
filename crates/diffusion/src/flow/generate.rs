//! Finished images of the transformer families: 8-bit RGB with A1111's `parameters` text, as
//! Forge writes it for FLUX ("Distilled CFG Scale" for the embedded guidance).

use tch::{Kind, Tensor};

use super::{FlowFamily, FlowModel, FlowRequest};
use crate::pipeline::{Generated, PipelineError};

type PResult<T> = Result<T, PipelineError>;

impl FlowModel {
    /// The request's images with their seeds and infotexts; `progress(step, steps)` returns
    /// false to cancel.
    pub fn txt2img(
        &self,
        req: &FlowRequest,
        progress: impl FnMut(usize, usize) -> bool,
    ) -> PResult<Vec<Generated>> {
        self.txt2img_with_previews(req, progress, None)
    }

    /// [`Self::txt2img`] with live previews of the first image (see [`super::Previews`]).
    pub fn txt2img_with_previews(
        &self,
        req: &FlowRequest,
        progress: impl FnMut(usize, usize) -> bool,
        previews: Option<super::Previews>,
    ) -> PResult<Vec<Generated>> {
        let pixels = self.txt2img_observed(req, None, progress, previews)?;
        (0..req.batch_size)
            .map(|i| {
                let seed = req.seed.wrapping_add(i as u64);
                Ok(Generated {
                    seed,
                    image: unit_to_rgb(&pixels.get(i as i64))?,
                    parameters: self.parameters(req, seed),
                })
            })
            .collect()
    }

    /// A1111's `parameters` text for one image.
    pub fn parameters(&self, req: &FlowRequest, seed: u64) -> String {
        let mut s = req.prompt.clone();
        if !req.negative_prompt.is_empty() && self.family == FlowFamily::Sd3 {
            s.push_str(&format!("\nNegative prompt: {}", req.negative_prompt));
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, Schedule type: Simple",
            req.steps,
            req.sampler.a1111_name()
        ));
        match self.family {
            FlowFamily::Flux => {
                s.push_str(", CFG scale: 1");
                if self.has_guidance() {
                    s.push_str(&format!(", Distilled CFG Scale: {}", req.guidance));
                }
            }
            FlowFamily::Sd3 => s.push_str(&format!(", CFG scale: {}", req.cfg_scale)),
        }
        s.push_str(&format!(
            ", Seed: {seed}, Size: {}x{}, Model hash: {}, Model: {}",
            req.width, req.height, self.hash, self.name
        ));
        if let Some(shift) = req.shift {
            s.push_str(&format!(", Shift: {shift}"));
        }
        s.push_str(&format!(
            ", Max sequence length: {}, RNG: {}",
            req.max_sequence_length,
            req.noise.a1111_name()
        ));
        s.push_str(&crate::pipeline::infotext::lora_hashes(&self.lora_hashes));
        s.push_str(&format!(", Version: atelier {}", env!("CARGO_PKG_VERSION")));
        s
    }

    /// Whether the transformer takes FLUX-dev's embedded guidance.
    pub fn has_guidance(&self) -> bool {
        matches!(&self.denoiser, super::Denoiser::Flux(f) if f.config.guidance_embeds)
    }

    /// The T5 length diffusers' pipelines default to: 512 for FLUX-dev, 256 otherwise.
    pub fn default_sequence_length(&self) -> usize {
        if self.has_guidance() {
            512
        } else {
            256
        }
    }

    /// Records a LoRA's (name, short hash) for the infotext.
    pub fn with_lora_hash(mut self, name: &str, hash: &str) -> Self {
        self.lora_hashes.push((name.to_string(), hash.to_string()));
        self
    }
}

/// Unit pixels [H, W, 3] → 8-bit RGB.
pub(crate) fn unit_to_rgb(unit: &Tensor) -> PResult<image::RgbImage> {
    let (h, w) = (unit.size()[0] as u32, unit.size()[1] as u32);
    let bytes = (unit * 255.0)
        .round()
        .clamp(0.0, 255.0)
        .to_kind(Kind::Uint8)
        .contiguous();
    let raw = Vec::<u8>::try_from(bytes.flatten(0, -1))
        .map_err(|e| PipelineError::Compute(e.to_string()))?;
    image::RgbImage::from_raw(w, h, raw)
        .ok_or_else(|| PipelineError::Compute("decoded image has the wrong size".into()))
}
