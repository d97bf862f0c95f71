//! The networks a loaded model runs, on libtorch. The pipeline sees candle tensors on the CPU
//! (latents, conditioning, the schedulers' arithmetic); each network takes them onto its device
//! and kind and hands its result back in f32.

use candle_core::Tensor;

use super::cond::AddedCond;
use super::{PResult, PipelineError};
use crate::conditioning::{Layer, TextEncoder};
use crate::lora::{Applied, LoraFile, LoraMode};
use crate::torch::{self, TorchModels};

/// A model's libtorch networks.
#[derive(Clone)]
pub(crate) struct Nets(pub TorchModels);

// SAFETY: `tch::Tensor` is `Send` but not `Sync` because some of its methods change a tensor
// through a shared reference (in-place ops, gradients accumulated by `backward`). Through a
// shared `Nets` the networks only run inference: every call goes through `run`, under
// `no_grad`, and reads the weights to allocate new tensors (libtorch's ops are safe to call
// concurrently on shared inputs). Changing them (applying a LoRA, attaching a trainer's
// adapters) takes `&mut` on a clone and replaces tensor handles rather than writing into the
// shared storage.
unsafe impl Sync for Nets {}

impl From<torch::Error> for PipelineError {
    fn from(e: torch::Error) -> Self {
        PipelineError::Compute(e.to_string())
    }
}

/// A candle tensor on libtorch's `device`, in `kind`.
fn to_torch(t: &Tensor, kind: tch::Kind, device: tch::Device) -> torch::Result<tch::Tensor> {
    Ok(torch::weights::from_candle(t)?
        .to_kind(kind)
        .to_device(device))
}

/// Runs libtorch inference: no autograd graph, its errors as errors.
fn run<T>(f: impl FnOnce() -> torch::Result<T>) -> torch::Result<T> {
    torch::guard(|| tch::no_grad(f))
}

impl Nets {
    pub fn in_channels(&self) -> usize {
        self.0.unet.config.in_channels
    }

    /// The UNet's shape.
    pub fn unet_config(&self) -> &crate::models::config::UNetConfig {
        &self.0.unet.config
    }

    /// Downsampling levels of the VAE (its scale is 2^(levels − 1)).
    pub fn vae_levels(&self) -> usize {
        self.0.vae.config.block_out_channels.len()
    }

    /// Text encoder `i`.
    pub fn text(&self, i: usize) -> Option<&dyn TextEncoder> {
        self.0.text.get(i).map(|t| t as &dyn TextEncoder)
    }

    /// The UNet's prediction for latents `x` [B, C, h, w] at timestep `t`.
    pub fn unet(
        &self,
        x: &Tensor,
        t: f64,
        ctx: &Tensor,
        added: Option<&AddedCond>,
    ) -> PResult<Tensor> {
        let b = x.dim(0)? as i64;
        let unet = &self.0.unet;
        Ok(run(|| {
            let (kind, dev) = (unet.conv_in.weight.kind(), unet.conv_in.weight.device());
            let added = added
                .map(|a| {
                    Ok::<_, torch::Error>(torch::unet::AddedCond {
                        text_embeds: to_torch(&a.text_embeds, kind, dev)?,
                        time_ids: to_torch(&a.time_ids, kind, dev)?,
                    })
                })
                .transpose()?;
            let ts = tch::Tensor::full([b], t, (tch::Kind::Float, dev));
            let out = unet.forward(
                &to_torch(x, kind, dev)?,
                &ts,
                &to_torch(ctx, kind, dev)?,
                added.as_ref(),
            )?;
            torch::weights::to_candle(&out)
        })?)
    }

    /// Pixels [B, 3, H, W] in [-1, 1] → scaled latents (the distribution's mean).
    pub fn vae_encode(&self, pixels: &Tensor) -> PResult<Tensor> {
        let vae = &self.0.vae;
        Ok(run(|| {
            let z = vae.encode(&to_torch(pixels, tch::Kind::Float, vae.device())?);
            torch::weights::to_candle(&z)
        })?)
    }

    /// Scaled latents → pixels in [-1, 1], f32.
    pub fn vae_decode(&self, z: &Tensor) -> PResult<Tensor> {
        let vae = &self.0.vae;
        Ok(run(|| {
            let px = vae.decode(&to_torch(z, tch::Kind::Float, vae.device())?);
            torch::weights::to_candle(&px)
        })?)
    }

    /// `file` at `weight` applied to the UNet and the text encoders.
    pub fn apply_lora(&mut self, file: &LoraFile, weight: f64, mode: LoraMode) -> PResult<Applied> {
        run(|| torch::lora::apply_file(&mut self.0, file, weight, mode))
            .map_err(|e| PipelineError::BadRequest(e.to_string()))
    }
}

impl TextEncoder for torch::clip::ClipTextModel {
    fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn states(
        &self,
        ids: &[u32],
        overrides: &[(usize, Tensor)],
        layer: Layer,
    ) -> Result<(Tensor, Tensor), String> {
        let states = || {
            let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
            let ids = tch::Tensor::from_slice(&ids).view([1, -1]);
            let overrides = overrides
                .iter()
                .map(|(i, v)| Ok((*i, torch::weights::from_candle(v)?)))
                .collect::<torch::Result<Vec<_>>>()?;
            let out = self.forward_with(&ids, &overrides)?;
            let z = match layer {
                Layer::Normed { clip_skip } => self.conditioning(&out, clip_skip),
                Layer::Penultimate => Self::penultimate(&out),
            };
            Ok((
                torch::weights::to_candle(&z)?,
                torch::weights::to_candle(&out.pooled)?,
            ))
        };
        run(states).map_err(|e| e.to_string())
    }
}
