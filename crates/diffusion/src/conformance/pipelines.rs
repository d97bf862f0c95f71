//! The whole-txt2img checks of a model case (`pipeline`): atelier's pipeline run as the check
//! describes diffusers' run — from its given initial latents, or from its seeds with one torch
//! CPU generator per image — compared with diffusers' image before 8-bit rounding.

use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;

use super::models::{get, Tensors};
use crate::lora::{LoraFile, LoraMode};
use crate::noise::RandnSource;
use crate::pipeline::{ClipSkipConvention, NoiseOptions, Placement, StableDiffusion, Txt2Img};
use crate::schedulers::SamplerKind;

/// A case's model as the pipeline runs it, with the case's LoRA merged when it has one.
pub fn load(dir: &Path, lora: Option<(&LoraFile, f64)>) -> Result<StableDiffusion, String> {
    let m =
        StableDiffusion::load(dir, Placement::on(tch::Device::Cpu)).map_err(|e| e.to_string())?;
    match lora {
        None => Ok(m),
        Some((file, weight)) => {
            let (m, applied) = m
                .with_lora(file, weight, LoraMode::Merge)
                .map_err(|e| e.to_string())?;
            match applied.unmatched.is_empty() {
                true => Ok(m),
                false => Err(format!(
                    "LoRA layers matched no weight: {:?}",
                    applied.unmatched
                )),
            }
        }
    }
}

/// The sampler the check names (A1111's name or ours), checked against the scheduler class and
/// options diffusers ran.
fn sampler(check: &Value) -> Result<SamplerKind, String> {
    let name = check["sampler"]
        .as_str()
        .ok_or("pipeline check without sampler")?;
    let kind = SamplerKind::parse(name).ok_or_else(|| format!("unknown sampler {name:?}"))?;
    let sched = check["scheduler"]
        .as_object()
        .ok_or("pipeline check without scheduler")?;
    let class = sched
        .get("class")
        .and_then(Value::as_str)
        .unwrap_or_default();
    super::schedulers::fits(kind, Some(class), sched)?;
    Ok(kind)
}

/// The request the check describes; clip skip in diffusers' convention, as diffusers ran it.
fn request(check: &Value, seed: u64, batch_size: usize) -> Result<Txt2Img, String> {
    let text = |k: &str| check[k].as_str().unwrap_or_default().to_string();
    let num = |k: &str| {
        check[k]
            .as_f64()
            .ok_or_else(|| format!("pipeline check without {k}"))
    };
    Ok(Txt2Img {
        prompt: text("prompt"),
        negative_prompt: text("negative_prompt"),
        steps: num("steps")? as usize,
        cfg_scale: num("cfg_scale")?,
        seed,
        width: num("width")? as usize,
        height: num("height")? as usize,
        batch_size,
        sampler: sampler(check)?,
        clip_skip: check["clip_skip"].as_u64().unwrap_or(0) as usize,
        clip_skip_convention: ClipSkipConvention::Diffusers,
        noise: NoiseOptions {
            source: RandnSource::TorchCpu,
            ..NoiseOptions::default()
        },
    })
}

/// The images `[B, H, W, 3]` atelier makes for the check, and diffusers' (`image` is one H×W×3,
/// `images` a batch).
pub fn run(sd: &StableDiffusion, check: &Value, t: &Tensors) -> Result<(Tensor, Tensor), String> {
    let e = |e: crate::pipeline::PipelineError| e.to_string();
    if let Some(seeds) = check["seeds"].as_array() {
        let seeds: Vec<u64> = seeds.iter().filter_map(Value::as_u64).collect();
        if seeds.is_empty() {
            return Err("pipeline check with an empty seeds list".into());
        }
        if check["generator"]
            .as_str()
            .is_some_and(|g| g != "torch-cpu")
        {
            return Err(format!("unknown generator {}", check["generator"]));
        }
        let consecutive = seeds.windows(2).all(|w| w[1] == w[0].wrapping_add(1));
        let got = if consecutive {
            // One batch: image i draws from its own generator seeded seeds[0] + i.
            let req = request(check, seeds[0], seeds.len())?;
            sd.txt2img_pixels(&req, None, |_, _| true).map_err(e)?
        } else {
            let each = seeds
                .iter()
                .map(|&s| {
                    sd.txt2img_pixels(&request(check, s, 1)?, None, |_, _| true)
                        .map_err(e)
                })
                .collect::<Result<Vec<_>, String>>()?;
            Tensor::cat(&each, 0).map_err(|e| e.to_string())?
        };
        return Ok((got, get(t, check, "images")?.clone()));
    }
    let latents = get(t, check, "initial_latents")?;
    let req = request(check, 0, latents.dims().first().copied().unwrap_or(1))?;
    let got = sd
        .txt2img_pixels(&req, Some(latents), |_, _| true)
        .map_err(e)?;
    let want = get(t, check, "image")?;
    let want = match want.rank() {
        3 => want.unsqueeze(0).map_err(|e| e.to_string())?,
        _ => want.clone(),
    };
    Ok((got, want))
}
