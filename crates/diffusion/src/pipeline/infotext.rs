//! What a PNG says about how it was made: A1111's `parameters` text, which A1111, ComfyUI and
//! civitai read back.

use super::seeds::ImageSeeds;
use super::{PResult, PipelineError, StableDiffusion, Txt2Img};

#[derive(Debug, Clone)]
pub struct Generated {
    pub seed: u64,
    pub image: image::RgbImage,
    /// A1111's `parameters` text.
    pub parameters: String,
}

impl Generated {
    /// PNG bytes with the `parameters` text chunk (A1111, ComfyUI and civitai read it back).
    pub fn png(&self) -> PResult<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.image.width(), self.image.height());
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.add_text_chunk("parameters".into(), self.parameters.clone())
                .map_err(|e| PipelineError::Compute(e.to_string()))?;
            let mut w = enc
                .write_header()
                .map_err(|e| PipelineError::Compute(e.to_string()))?;
            w.write_image_data(self.image.as_raw())
                .map_err(|e| PipelineError::Compute(e.to_string()))?;
        }
        Ok(out)
    }
}

impl StableDiffusion {
    /// A1111's `parameters` text for one image's seeds (`strength`: an img2img's denoising
    /// strength), fields in A1111's order. `RNG` names the noise source always: A1111's default
    /// is "GPU", so a text without it would send an A1111 user to other noise.
    pub(super) fn parameters(
        &self,
        req: &Txt2Img,
        seeds: &ImageSeeds,
        strength: Option<f64>,
    ) -> String {
        let mut s = req.prompt.clone();
        if !req.negative_prompt.is_empty() {
            s.push_str(&format!("\nNegative prompt: {}", req.negative_prompt));
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}",
            req.steps,
            req.sampler.a1111_name().unwrap_or(req.sampler.name()),
            req.cfg_scale,
            seeds.seed,
            req.width,
            req.height,
            self.hash,
            self.name
        ));
        if let Some((vae, hash)) = &self.vae_file {
            s.push_str(&format!(", VAE hash: {hash}, VAE: {vae}"));
        }
        if let Some((sub, w)) = seeds.variation {
            s.push_str(&format!(
                ", Variation seed: {sub}, Variation seed strength: {w}"
            ));
        }
        if let Some(d) = strength {
            s.push_str(&format!(", Denoising strength: {d}"));
        }
        // A1111's count (the prompt's layer; diffusers' k is written as k + 1).
        let (layer, _) = req.clip_layers();
        if layer > 1 {
            s.push_str(&format!(", Clip skip: {layer}"));
        }
        if req.noise.eta_noise_seed_delta != 0 {
            s.push_str(&format!(", ENSD: {}", req.noise.eta_noise_seed_delta));
        }
        s.push_str(&format!(", RNG: {}", req.noise.source.a1111_name()));
        s.push_str(&lora_hashes(&self.lora_hashes));
        s.push_str(&format!(", Version: atelier {}", env!("CARGO_PKG_VERSION")));
        s
    }
}

/// A1111's `, Lora hashes: "name: hash, …"` field, or nothing without LoRAs.
pub(crate) fn lora_hashes(loras: &[(String, String)]) -> String {
    if loras.is_empty() {
        return String::new();
    }
    let list: Vec<String> = loras.iter().map(|(n, h)| format!("{n}: {h}")).collect();
    format!(", Lora hashes: \"{}\"", list.join(", "))
}
