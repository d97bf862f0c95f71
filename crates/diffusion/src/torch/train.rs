//! LoRA training on libtorch: adapters as variables of a `VarStore` (libtorch's autograd and its
//! AdamW train them), the noise-prediction objective, and kohya's file layout.

use std::collections::HashMap;
use std::path::Path;

use tch::nn::{Init, VarStore};
use tch::{Kind, Tensor};

use super::lora::{unet_targets, Target};
use super::nn::Adapter;
use super::unet::{AddedCond, UNet};
use super::weights::to_candle;
use super::{msg, Result};
use crate::pipeline::Family;
use crate::schedulers::{NoiseSchedule, PredictionType};

/// One adapted layer: kohya's module key and its two matrices.
struct Layer {
    key: String,
    down: Tensor,
    up: Tensor,
    alpha: f64,
}

/// Trainable LoRA adapters attached to a UNet.
pub struct TrainableLora {
    pub vs: VarStore,
    layers: Vec<Layer>,
}

impl TrainableLora {
    /// Rank-`rank` adapters (scale alpha / rank) on the attention projections (to_q, to_k, to_v,
    /// to_out.0 of attn1 and attn2) of the UNet's transformer blocks, kohya's default targets:
    /// down Kaiming-uniform (as kohya and peft start it), up zero, so training starts from the
    /// base model. Keys are kohya's (`lora_unet_…`; LDM names for SDXL, as its scripts write them).
    pub fn attach_attention(unet: &mut UNet, family: Family, rank: i64, alpha: f64) -> Self {
        let cfg = unet.config.clone();
        let device = unet.conv_in.weight.device();
        let vs = VarStore::new(device);
        let root = vs.root();
        let mut layers = Vec::new();
        for (path, target) in unet_targets(unet) {
            let Target::Linear(l) = target else { continue };
            let attention = [".to_q", ".to_k", ".to_v", ".to_out.0"]
                .iter()
                .any(|s| path.ends_with(s));
            if !path.contains(".attentions.") || !attention {
                continue;
            }
            let name = match family {
                Family::Sdxl => crate::models::ldm::unet_name(&format!("{path}.weight"), &cfg)
                    .map(|n| n.trim_end_matches(".weight").to_string())
                    .unwrap_or_else(|| path.clone()),
                _ => path.clone(),
            };
            let key = format!("lora_unet_{}", name.replace('.', "_"));
            let bound = 1.0 / (l.in_dim() as f64).sqrt();
            let down = root.var(
                &format!("{key}__lora_down"),
                &[rank, l.in_dim()],
                Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            );
            let up = root.zeros(&format!("{key}__lora_up"), &[l.out_dim(), rank]);
            l.adapters.push(Adapter {
                down: down.shallow_clone(),
                up: up.shallow_clone(),
                scale: alpha / rank as f64,
            });
            layers.push(Layer {
                key,
                down,
                up,
                alpha,
            });
        }
        Self { vs, layers }
    }

    /// Trainable parameters.
    pub fn parameter_count(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.down.numel() + l.up.numel())
            .sum()
    }

    /// The network in kohya's layout (`<key>.lora_down.weight`, `.lora_up.weight`, `.alpha`), f32.
    pub fn tensors(&self) -> Result<HashMap<String, candle_core::Tensor>> {
        let mut out = HashMap::new();
        for l in &self.layers {
            out.insert(format!("{}.lora_down.weight", l.key), to_candle(&l.down)?);
            out.insert(format!("{}.lora_up.weight", l.key), to_candle(&l.up)?);
            out.insert(
                format!("{}.alpha", l.key),
                candle_core::Tensor::new(l.alpha as f32, &candle_core::Device::Cpu)?,
            );
        }
        Ok(out)
    }

    /// Write the network to a `.safetensors` file with `metadata` in its header.
    pub fn save(&self, path: &Path, metadata: &HashMap<String, String>) -> Result<()> {
        let bytes = crate::train::serialize(&self.tensors()?, metadata).map_err(msg)?;
        std::fs::write(path, bytes).map_err(|e| msg(format!("{}: {e}", path.display())))
    }
}

/// The training objective at timesteps `t` [B] with `noise` like `x0`: the mean squared error of
/// the UNet's prediction (noise, or v) for `x0` noised to `t`, weighted per sample by min-SNR-γ
/// when `min_snr_gamma` is set (for ε-prediction: min(SNR, γ) / SNR).
#[allow(clippy::too_many_arguments)]
pub fn loss(
    unet: &UNet,
    schedule: &NoiseSchedule,
    prediction: PredictionType,
    min_snr_gamma: Option<f64>,
    x0: &Tensor,
    noise: &Tensor,
    t: &[i64],
    context: &Tensor,
    added: Option<&AddedCond>,
) -> Result<Tensor> {
    let device = x0.device();
    let b = t.len() as i64;
    let per = |f: &dyn Fn(f64) -> f64| {
        let v: Vec<f32> = t
            .iter()
            .map(|&s| f(schedule.alpha_cumprod(s)) as f32)
            .collect();
        Tensor::from_slice(&v).to_device(device).view([b, 1, 1, 1])
    };
    let (sa, s1a) = (per(&|a| a.sqrt()), per(&|a| (1.0 - a).sqrt()));
    let noisy = x0 * &sa + noise * &s1a;
    let target = match prediction {
        PredictionType::Epsilon => noise.shallow_clone(),
        PredictionType::VPrediction => noise * &sa - x0 * &s1a,
        other => {
            return Err(msg(format!(
                "training for {other:?} prediction is not supported"
            )))
        }
    };
    let steps: Vec<f32> = t.iter().map(|&s| s as f32).collect();
    let ts = Tensor::from_slice(&steps).to_device(device);
    let pred = unet
        .forward(&noisy, &ts, context, added)?
        .to_kind(Kind::Float);
    let per_sample = (pred - target)
        .square()
        .mean_dim(&[1i64, 2, 3][..], false, Kind::Float);
    let weights: Vec<f32> = t
        .iter()
        .map(|&s| {
            let a = schedule.alpha_cumprod(s);
            let snr = a / (1.0 - a);
            match (min_snr_gamma, prediction) {
                (Some(g), PredictionType::VPrediction) => (snr.min(g) / (snr + 1.0)) as f32,
                (Some(g), _) => (snr.min(g) / snr) as f32,
                (None, _) => 1.0,
            }
        })
        .collect();
    Ok((per_sample * Tensor::from_slice(&weights).to_device(device)).mean(Kind::Float))
}
