//! LoRA training: what a run is made of apart from the tensors — the network's shape and
//! targets, the denoising objective's settings and min-SNR-γ weights, AdamW's hyper-parameters,
//! learning-rate schedules, reproducible random streams, kohya's file serialisation — with the
//! trainable network, the loss, AdamW and gradient clipping on libtorch ([`crate::torch::train`]).
//!
//! The base weights stay plain tensors; only the adapters require gradients, so gradients (and
//! the memory they cost) exist for the LoRA alone.

use std::collections::HashMap;

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::schedulers::{NoiseSchedule, PredictionType};

pub use crate::torch::train::{clip_grad_norm, AdamW, Batch, LoraNetwork, TrainableLayer};

/// Which UNet layers get a LoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetTargets {
    /// The attention projections only (to_q, to_k, to_v, to_out.0).
    Attention,
    /// Every linear (and 1×1 projection) of the transformer blocks: kohya's default.
    Transformer,
}

/// The shape of a LoRA network.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// network_dim.
    pub rank: usize,
    /// network_alpha: the adapter's output is scaled by alpha / rank.
    pub alpha: f64,
    /// conv_dim: also adapt the ResNet and resampling 3×3 convolutions (LoCon).
    pub conv_rank: Option<usize>,
    pub conv_alpha: f64,
    pub unet_targets: UnetTargets,
    /// Adapt the text encoder(s) too.
    pub text_encoder: bool,
}

/// Which learning rate a layer trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    Unet,
    Text,
}

/// A safetensors file's bytes, tensors sorted by name, with `metadata`.
pub fn serialize(
    tensors: &HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let mut data: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    data.sort_by_key(|(k, _)| *k);
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::serialize(data, meta).map_err(|e| e.to_string())
}

/// The denoising objective.
#[derive(Debug, Clone)]
pub struct Objective {
    pub prediction: PredictionType,
    /// min-SNR-γ loss weighting (Hang et al. 2023); None turns it off.
    pub min_snr_gamma: Option<f64>,
    /// Adds offset·N(0,1) per sample and channel to the noise (darker darks, brighter lights).
    pub noise_offset: f64,
    /// Timesteps are drawn uniformly from [min, max).
    pub min_timestep: usize,
    pub max_timestep: usize,
}

impl Objective {
    /// The loss weight of a sample at timestep `t`: min-SNR-γ (min(SNR, γ) / SNR for noise
    /// targets, min(SNR, γ) / (SNR + 1) for v targets), or 1 without it.
    pub fn snr_weight(&self, schedule: &NoiseSchedule, t: i64) -> f64 {
        match self.min_snr_gamma {
            None => 1.0,
            Some(g) => {
                let snr = schedule.snr(t);
                match self.prediction {
                    PredictionType::VPrediction => snr.min(g) / (snr + 1.0),
                    _ => snr.min(g) / snr,
                }
            }
        }
    }
}

/// AdamW's hyper-parameters (PyTorch's names and defaults, weight decay as kohya's 0.01).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Learning-rate schedules (diffusers' `get_scheduler` names and shapes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
}

impl LrSchedule {
    pub const NAMES: [&'static str; 5] = [
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "cosine_with_restarts" => Self::CosineWithRestarts,
            _ => return None,
        })
    }

    /// The multiplier of the base rate at optimizer step `step` (0-based) of `total`.
    pub fn factor(self, step: usize, warmup: usize, total: usize, cycles: usize) -> f64 {
        if self == Self::Constant {
            return 1.0;
        }
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
        match self {
            Self::Constant | Self::ConstantWithWarmup => 1.0,
            Self::Linear => (1.0 - progress).max(0.0),
            Self::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
            Self::CosineWithRestarts => {
                if progress >= 1.0 {
                    0.0
                } else {
                    let c = (cycles.max(1) as f64 * progress) % 1.0;
                    (0.5 * (1.0 + (std::f64::consts::PI * c).cos())).max(0.0)
                }
            }
        }
    }
}

/// A reproducible random stream for (seed, purpose, index): a run resumed at step n draws what an
/// uninterrupted run drew at step n.
pub fn stream(seed: u64, purpose: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(purpose);
    rng.set_word_pos((index as u128) << 32);
    rng
}
