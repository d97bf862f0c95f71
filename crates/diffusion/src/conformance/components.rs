//! A loaded model as the component checks see it: answering the text encoder, UNet and VAE
//! questions with candle tensors (the references' format).

use std::path::Path;

use candle_core::Tensor;

use crate::lora::LoraFile;
use crate::torch::weights::{from_candle, to_candle};
use crate::torch::{guard, TorchModels};

/// A text encoder's last (normed) states, penultimate layer output and pooled embedding.
pub type TextOut = (Tensor, Tensor, Tensor);

/// A model the component checks ask (f32 on the CPU, on libtorch).
pub struct Components(TorchModels);

fn s(e: impl std::fmt::Display) -> String {
    e.to_string()
}

/// A model (diffusers folder or single file), f32 on the CPU, with a LoRA merged at a weight.
pub fn load(dir: &Path, lora: Option<(&LoraFile, f64)>) -> Result<Components, String> {
    let mut m = TorchModels::load(dir, tch::Device::Cpu, tch::Kind::Float).map_err(s)?;
    if let Some((file, weight)) = lora {
        let applied = crate::torch::lora::merge_file(&mut m, file, weight).map_err(s)?;
        unmatched(&applied.unmatched)?;
    }
    Ok(Components(m))
}

fn unmatched(keys: &[String]) -> Result<(), String> {
    if keys.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} LoRA layers matched no weight: {keys:?}",
            keys.len()
        ))
    }
}

/// The penultimate layer's output among an encoder's hidden states.
fn penultimate<T>(hidden: &[T]) -> Result<&T, String> {
    hidden
        .get(hidden.len().saturating_sub(2))
        .ok_or_else(|| "the encoder returned no hidden states".to_string())
}

fn tt(t: &Tensor) -> Result<tch::Tensor, String> {
    from_candle(t).map_err(s)
}

fn ct(t: &tch::Tensor) -> Result<Tensor, String> {
    to_candle(t).map_err(s)
}

impl Components {
    pub fn text(&self, index: usize, ids: &Tensor) -> Result<TextOut, String> {
        let model = self
            .0
            .text
            .get(index)
            .ok_or_else(|| format!("the model has no text encoder {}", index + 1))?;
        let ids = tt(ids)?;
        let out = guard(|| tch::no_grad(|| model.forward(&ids))).map_err(s)?;
        let pen = penultimate(&out.hidden)?;
        Ok((ct(&out.last)?, ct(pen)?, ct(&out.pooled)?))
    }

    pub fn unet(
        &self,
        x: &Tensor,
        t: f64,
        ctx: &Tensor,
        added: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor, String> {
        let added = match added {
            Some((e, i)) => Some(crate::torch::unet::AddedCond {
                text_embeds: tt(e)?,
                time_ids: tt(i)?,
            }),
            None => None,
        };
        let ts = tch::Tensor::from(t as f32);
        let (x, ctx) = (tt(x)?, tt(ctx)?);
        let out = guard(|| tch::no_grad(|| self.0.unet.forward(&x, &ts, &ctx, added.as_ref())))
            .map_err(s)?;
        ct(&out)
    }

    pub fn vae_decode(&self, z: &Tensor) -> Result<Tensor, String> {
        let z = tt(z)?;
        ct(&guard(|| Ok(tch::no_grad(|| self.0.vae.decode(&z)))).map_err(s)?)
    }

    pub fn vae_encode_mean(&self, image: &Tensor) -> Result<Tensor, String> {
        let image = tt(image)?;
        ct(&guard(|| Ok(tch::no_grad(|| self.0.vae.encode_moments(&image).0))).map_err(s)?)
    }
}
