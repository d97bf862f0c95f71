//! Generation with the transformer families (FLUX.1, SD 3 / 3.5): a registry folder whose
//! denoiser is a transformer is run by the engine's flow-matching pipeline. txt2img only, with
//! Euler (the flow-matching sampler these families ship with) or Heun; the parameters the UNet
//! families have and these do not (hires fix, img2img, a separate VAE, variation seeds, clip
//! skip) are refused with the reason rather than ignored.

use std::path::{Path, PathBuf};

use atelier_contracts::{GenerateKind, GenerateSpec, ImagesOutput, JobOutput};
use atelier_diffusion::flow::{FlowFamily, FlowModel, FlowRequest, FlowSampler};
use atelier_diffusion::lora::{LoraFile, LoraMode};
use atelier_diffusion::schedulers::SamplerKind;
use atelier_kit::{JobCtx, JobError};

use crate::{
    pipeline_err, randn_source, rendered, seed_for, store_images, Generator, Lora, Rendered,
};

/// The flow-matching sampler a job names (A1111's `Euler`/`Heun`, ours, or diffusers' label).
fn flow_sampler(name: &str) -> Option<FlowSampler> {
    FlowSampler::parse(name).or_else(|| match SamplerKind::parse(name) {
        Some(SamplerKind::Euler) => Some(FlowSampler::Euler),
        Some(SamplerKind::Heun) => Some(FlowSampler::Heun),
        _ => None,
    })
}

fn invalid(m: impl Into<String>) -> JobError {
    JobError::permanent("invalid_job", m.into())
}

/// What a transformer-family model cannot honour in `g`, if anything.
fn refuse(kind: GenerateKind, g: &GenerateSpec, family: &str) -> Result<(), JobError> {
    let why = if kind != GenerateKind::Txt2Img {
        Some("img2img and inpainting run on the UNet families (SD 1.x, 2.x, SDXL); this model takes txt2img")
    } else if g.hires.is_some() {
        Some("hires fix runs on the UNet families; ask for the size you want directly")
    } else if g.vae.is_some() {
        Some("a separate VAE file applies to the UNet families; this model has its own 16-channel VAE")
    } else if g.subseed_strength != 0.0 {
        Some("variation seeds (subseed_strength) are not supported for this model")
    } else if g.clip_skip > 1 {
        Some("clip_skip applies to the UNet families' CLIP conditioning")
    } else {
        None
    };
    if let Some(w) = why {
        return Err(invalid(format!("{family}: {w}")));
    }
    if flow_sampler(&g.sampler).is_none() {
        return Err(JobError::permanent(
            "unknown_sampler",
            format!(
                "{family} samples with Euler or Heun (flow matching); sampler {:?} is for the UNet families",
                g.sampler
            ),
        ));
    }
    Ok(())
}

impl Generator {
    /// The model with the job's LoRAs applied at run time.
    fn flow_prepared(&self, path: &Path, loras: &[Lora]) -> Result<FlowModel, JobError> {
        let mut model = (*self.flow_model(path)?).clone();
        for (p, w, name) in loras {
            let bytes = std::fs::read(p)
                .map_err(|e| JobError::retryable("local_disk", format!("{}: {e}", p.display())))?;
            let file = LoraFile::from_bytes(&bytes)
                .map_err(|e| JobError::permanent("bad_lora", format!("{}: {e}", p.display())))?;
            let (hash, _) = atelier_diffusion::lora::file_hashes(&bytes);
            model = model
                .with_lora(&file, *w, LoraMode::Runtime)
                .map_err(|e| JobError::permanent("bad_lora", format!("{name}: {e}")))?
                .0
                .with_lora_hash(name, &hash[..12]);
        }
        Ok(model)
    }

    /// A txt2img job on a FLUX or SD 3 model (`family`, as routing found it).
    pub(crate) async fn run_flow(
        &self,
        ctx: &JobCtx,
        (kind, family): (GenerateKind, FlowFamily),
        g: &GenerateSpec,
        path: PathBuf,
        loras: Vec<Lora>,
    ) -> Result<JobOutput, JobError> {
        refuse(kind, g, family.label())?;
        let (prompt, _) =
            atelier_diffusion::prompt::extract_extra_networks(&g.prompt).map_err(invalid)?;
        ctx.progress(0.0, Some(format!("loading {}", g.model)))
            .await;
        let this = self.clone();
        let g2 = g.clone();
        let seed = g.seed.unwrap_or_else(|| seed_for(ctx));
        let cancel = ctx.cancellation().clone();
        let (reports, relay) = crate::relay::channel();
        let every = g.preview_every as usize;
        let work = tokio::task::spawn_blocking(move || -> Result<Rendered, JobError> {
            let model = this.flow_prepared(&path, &loras)?;
            let req = FlowRequest {
                prompt: prompt.trim().to_string(),
                negative_prompt: g2.negative_prompt.clone(),
                steps: g2.steps as usize,
                cfg_scale: g2.cfg_scale,
                guidance: g2.guidance.unwrap_or(3.5),
                width: g2.width as usize,
                height: g2.height as usize,
                seed,
                batch_size: g2.batch_size as usize,
                max_sequence_length: g2
                    .max_sequence_length
                    .map_or(model.default_sequence_length(), |n| n as usize),
                shift: g2.shift,
                sampler: flow_sampler(&g2.sampler).unwrap_or_default(),
                noise: randn_source(g2.randn_source),
            };
            let on_step = |done: usize, total: usize| {
                reports.step(done, total);
                !cancel.is_cancelled()
            };
            let mut send = |step: usize, img: image::RgbImage| reports.preview(step, img);
            let previews =
                (every > 0).then_some((every, &mut send as &mut dyn FnMut(usize, image::RgbImage)));
            let images = model
                .txt2img_with_previews(&req, on_step, previews)
                .map_err(pipeline_err)?;
            rendered(&images, &model.hash)
        });
        let (pngs, parameters, model_hash) = relay.run(ctx, work, g.steps as usize).await?;
        let images = store_images(ctx, pngs).await?;
        Ok(JobOutput::Images(ImagesOutput {
            images,
            parameters,
            model_hash,
            batch_jobs: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_the_transformer_families_refuse() {
        let g = GenerateSpec::txt2img("flux", "a cat");
        // The default sampler (Euler a, ancestral) is not flow matching's.
        assert!(refuse(GenerateKind::Txt2Img, &g, "FLUX.1").is_err());
        let g = GenerateSpec {
            sampler: "Euler".into(),
            ..g
        };
        assert!(refuse(GenerateKind::Txt2Img, &g, "FLUX.1").is_ok());
        let e = refuse(GenerateKind::Img2Img, &g, "FLUX.1").unwrap_err();
        assert!(e.to_string().contains("txt2img"), "{e}");
        let dpm = GenerateSpec {
            sampler: "DPM++ 2M".into(),
            ..g.clone()
        };
        let e = refuse(GenerateKind::Txt2Img, &dpm, "FLUX.1").unwrap_err();
        assert!(
            e.to_string().contains("Euler or Heun (flow matching)"),
            "{e}"
        );
        for ok in ["Euler", "euler", "Euler (flow matching)", "Heun"] {
            let s = GenerateSpec {
                sampler: ok.into(),
                ..g.clone()
            };
            assert!(refuse(GenerateKind::Txt2Img, &s, "SD 3").is_ok(), "{ok}");
        }
        let v = GenerateSpec {
            subseed_strength: 0.5,
            ..g
        };
        assert!(refuse(GenerateKind::Txt2Img, &v, "SD 3").is_err());
    }
}
