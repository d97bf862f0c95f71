//! The checks of the transformer-family cases (`flux-dev`, `sd35`, `flux-lora-peft`): CLIP
//! encoders, the FLUX transformer and the SD 3 MMDiT on given inputs, the 16-channel VAE, and
//! whole txt2img runs from given latents with the model folder's flow-matching scheduler.

use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;

use super::models::{diff, get, Tensors};
use crate::flow::{FlowModel, FlowRequest};
use crate::lora::{LoraFile, LoraMode};
use crate::pipeline::Placement;
use crate::torch::clip::ClipTextModel;
use crate::torch::flux::FluxInput;
use crate::torch::guard;
use crate::torch::weights::{from_candle, to_candle};

fn s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn tt(t: &Tensor) -> Result<tch::Tensor, String> {
    from_candle(t).map_err(s)
}

fn ct(t: &tch::Tensor) -> Result<Tensor, String> {
    to_candle(t).map_err(s)
}

/// The case's model in f32 on the CPU, with a LoRA merged at a weight.
pub fn load(dir: &Path, lora: Option<(&LoraFile, f64)>) -> Result<FlowModel, String> {
    let m = FlowModel::load(dir, Placement::CPU).map_err(s)?;
    match lora {
        None => Ok(m),
        Some((file, w)) => {
            let (m, applied) = m.with_lora(file, w, LoraMode::Merge)?;
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

/// The largest difference of one check's outputs from the references.
pub fn run_check(m: &FlowModel, kind: &str, check: &Value, t: &Tensors) -> Result<f64, String> {
    let r = match kind {
        "text_encoder" => text_encoder(m, check, t),
        "transformer_flux" => transformer_flux(m, check, t),
        "transformer_sd3" => transformer_sd3(m, check, t),
        "vae_decode" => {
            let z = tt(get(t, check, "scaled_latents")?)?;
            let out = guard(|| Ok(tch::no_grad(|| m.vae.decode(&z)))).map_err(s)?;
            diff(&ct(&out)?, get(t, check, "output")?)
        }
        "vae_encode" => {
            let x = tt(get(t, check, "image")?)?;
            let out = guard(|| Ok(tch::no_grad(|| m.vae.encode_moments(&x).0))).map_err(s)?;
            diff(&ct(&out)?, get(t, check, "mean")?)
        }
        "pipeline_flux" | "pipeline_sd3" => pipeline(m, check, t),
        other => return Err(format!("unknown check kind {other:?}")),
    };
    r.map_err(|e| format!("{kind}: {e}"))
}

fn text_encoder(m: &FlowModel, check: &Value, t: &Tensors) -> Result<f64, String> {
    let index = match check["component"].as_str() {
        Some("text_encoder") => 0,
        Some("text_encoder_2") => 1,
        other => return Err(format!("unknown component {other:?}")),
    };
    let enc = m
        .clip
        .get(index)
        .ok_or("the model has no such CLIP encoder")?;
    let ids = tt(get(t, check, "input_ids")?)?;
    let out = guard(|| tch::no_grad(|| enc.forward(&ids))).map_err(s)?;
    let mut d = diff(&ct(&out.last)?, get(t, check, "last_hidden_state")?)?;
    d = d.max(diff(
        &ct(&ClipTextModel::penultimate(&out))?,
        get(t, check, "penultimate_hidden_state")?,
    )?);
    for field in ["pooler_output", "text_embeds"] {
        if check.get(field).is_some_and(|v| !v.is_null()) {
            d = d.max(diff(&ct(&out.pooled)?, get(t, check, field)?)?);
        }
    }
    Ok(d)
}

fn transformer_flux(m: &FlowModel, check: &Value, t: &Tensors) -> Result<f64, String> {
    let crate::flow::Denoiser::Flux(f) = &m.denoiser else {
        return Err("not a FLUX model".into());
    };
    let num = |k: &str| check[k].as_f64();
    let ids = |k: &str| -> Result<tch::Tensor, String> {
        let x = tt(get(t, check, k)?)?;
        Ok(if x.dim() == 3 { x.get(0) } else { x })
    };
    let ts = tch::Tensor::from_slice(&[num("timestep").ok_or("no timestep")? as f32]);
    let g = num("guidance").map(|g| tch::Tensor::from_slice(&[g as f32]));
    let (x, c, p) = (
        tt(get(t, check, "hidden_states")?)?,
        tt(get(t, check, "encoder_hidden_states")?)?,
        tt(get(t, check, "pooled_projections")?)?,
    );
    let (img_ids, txt_ids) = (ids("img_ids")?, ids("txt_ids")?);
    let out = guard(|| {
        Ok(tch::no_grad(|| {
            f.forward(&FluxInput {
                hidden: &x,
                context: &c,
                pooled: &p,
                timestep: &ts.expand([x.size()[0]], false),
                guidance: g.as_ref().map(|g| g.expand([x.size()[0]], false)).as_ref(),
                img_ids: &img_ids,
                txt_ids: &txt_ids,
            })
        }))
    })
    .map_err(s)?;
    diff(&ct(&out)?, get(t, check, "output")?)
}

fn transformer_sd3(m: &FlowModel, check: &Value, t: &Tensors) -> Result<f64, String> {
    let crate::flow::Denoiser::Sd3(d) = &m.denoiser else {
        return Err("not an SD 3 model".into());
    };
    let step = check["timestep"].as_f64().ok_or("no timestep")? as f32;
    let (x, c, p) = (
        tt(get(t, check, "hidden_states")?)?,
        tt(get(t, check, "encoder_hidden_states")?)?,
        tt(get(t, check, "pooled_projections")?)?,
    );
    let ts = tch::Tensor::from_slice(&[step]).expand([x.size()[0]], false);
    let out = guard(|| tch::no_grad(|| d.forward(&x, &ts, &c, &p))).map_err(s)?;
    diff(&ct(&out)?, get(t, check, "output")?)
}

fn pipeline(m: &FlowModel, check: &Value, t: &Tensors) -> Result<f64, String> {
    let num = |k: &str| check[k].as_f64();
    let name = check["sampler"].as_str().unwrap_or_default();
    let sampler = crate::flow::FlowSampler::parse(name)
        .ok_or_else(|| format!("unknown flow-matching sampler {name:?}"))?;
    let latents = tt(get(t, check, "initial_latents")?)?;
    let req = FlowRequest {
        prompt: check["prompt"].as_str().unwrap_or_default().into(),
        negative_prompt: check["negative_prompt"].as_str().unwrap_or_default().into(),
        steps: num("steps").ok_or("no steps")? as usize,
        cfg_scale: num("cfg_scale").unwrap_or(1.0),
        guidance: num("guidance").unwrap_or(0.0),
        width: num("width").ok_or("no width")? as usize,
        height: num("height").ok_or("no height")? as usize,
        seed: 0,
        batch_size: latents.size()[0] as usize,
        max_sequence_length: num("max_sequence_length").unwrap_or(256.0) as usize,
        shift: None,
        noise: Default::default(),
        sampler,
    };
    let want = get(t, check, "image")?;
    let want = match want.rank() {
        3 => want.unsqueeze(0).map_err(s)?,
        _ => want.clone(),
    };
    let got = m
        .txt2img_pixels(&req, Some(&latents), |_, _| true)
        .map_err(s)?;
    diff(&ct(&got)?, &want)
}
