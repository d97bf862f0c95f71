//! Stable Diffusion pipelines on our models: load a checkpoint, then txt2img (alone or batched),
//! img2img and the engine's side of inpainting, with any sampler, A1111 prompts and seeds, and
//! PNGs carrying A1111's `parameters` text.
//!
//! - [`request`]: what a generation asks for and its limits;
//! - [`load`]: diffusers folders, single files, random weights; [`convert`]: folder → single file;
//! - `denoise`: the one denoise loop and its one guidance function, which every path runs;
//! - [`txt2img`] (alone and batched), [`img2img`] (init images, and the [`Repaint`] hooks the
//!   inpainter implements); [`infotext`]: the PNG's `parameters`; [`fixtures`]: tiny models.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::conditioning::{self, Layer};
use crate::schedulers::{ScheduleConfig, SchedulerConfig};
use crate::tokenizer::ClipTokenizer;
use nets::Nets;

mod cond;
pub mod convert;
mod denoise;
pub mod fixtures;
mod generate;
pub mod hires;
mod images;
pub mod img2img;
pub mod infotext;
pub mod load;
mod nets;
pub mod request;
mod seeds;
pub mod txt2img;

pub use convert::write_single_file;
pub use fixtures::{make_tiny, make_tiny_for_training, make_tiny_with};
pub use hires::{Hires, HiresUpscaler};
pub use img2img::{Init, Repaint, RepaintRun, RepaintStart};
pub use infotext::Generated;
pub(crate) use load::single_file_config;
pub use load::SingleFileConfig;
pub use request::{BatchKey, ClipSkipConvention, Txt2Img, MAX_PIXELS, MAX_STEPS};
pub use seeds::NoiseOptions;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("model {path}: {reason}")]
    Model { path: String, reason: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Compute(String),
}

impl From<candle_core::Error> for PipelineError {
    fn from(e: candle_core::Error) -> Self {
        PipelineError::Compute(e.to_string())
    }
}

pub(crate) type PResult<T> = std::result::Result<T, PipelineError>;

/// Receives (step, decoded first image) during generation.
pub type PreviewFn<'a> = dyn FnMut(usize, image::RgbImage) + 'a;

/// Which Stable Diffusion this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    Sd1,
    Sd2,
    Sdxl,
}

/// Where a model's libtorch networks run, and the UNet's precision there.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Placement {
    pub device: tch::Device,
    pub kind: tch::Kind,
}

impl Placement {
    /// The CPU in f32.
    pub const CPU: Placement = Placement {
        device: tch::Device::Cpu,
        kind: tch::Kind::Float,
    };

    /// `cpu` (f32), `cuda` or `cuda:N` (the UNet in f16), as the workers' `--device` says.
    pub fn named(name: &str) -> PResult<Self> {
        let device = crate::torch::device_named(name).map_err(|e| PipelineError::Model {
            path: "--device".into(),
            reason: e.to_string(),
        })?;
        Ok(Self::on(device))
    }

    /// The device `ATELIER_DEVICE` names (`cpu`, `cuda`, `cuda:N`), else the first CUDA GPU
    /// libtorch sees, else the CPU.
    pub fn from_env() -> PResult<Self> {
        let device = crate::torch::device().map_err(|e| PipelineError::Model {
            path: "ATELIER_DEVICE".into(),
            reason: e.to_string(),
        })?;
        Ok(Self::on(device))
    }

    /// `device` in f32 on the CPU, f16 on a GPU.
    pub fn on(device: tch::Device) -> Self {
        let kind = match device {
            tch::Device::Cpu => tch::Kind::Float,
            _ => tch::Kind::Half,
        };
        Self { device, kind }
    }
}

/// The kind loaded VAEs compute in: f32 unless `ATELIER_VAE_DTYPE` says `f16` or `bf16` (faster
/// on GPUs; SD 1.x/2.x decode well in f16, SDXL's VAE overflows f16 and wants bf16 or f32).
pub fn vae_kind() -> PResult<tch::Kind> {
    match std::env::var("ATELIER_VAE_DTYPE").as_deref() {
        Err(_) | Ok("") | Ok("f32") => Ok(tch::Kind::Float),
        Ok("f16") => Ok(tch::Kind::Half),
        Ok("bf16") => Ok(tch::Kind::BFloat16),
        Ok(other) => Err(PipelineError::Model {
            path: "ATELIER_VAE_DTYPE".into(),
            reason: format!("the worker setting must be f32, f16 or bf16 (got {other:?})"),
        }),
    }
}

/// How the images of a batch go through the UNet and the VAE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetBatch {
    /// One pass per image, each of the shape it has alone: image i of a batch is bit-identical
    /// to its seed generated alone (the default).
    Exact,
    /// One pass for the whole batch: faster on GPUs; images equal their single runs to about
    /// 1e-6 before 8-bit rounding (matrix products of other sizes round differently).
    Stacked,
}

/// `ATELIER_UNET_BATCH`: `exact` (default) or `stacked`.
pub fn unet_batch() -> PResult<UnetBatch> {
    match std::env::var("ATELIER_UNET_BATCH").as_deref() {
        Err(_) | Ok("") | Ok("exact") => Ok(UnetBatch::Exact),
        Ok("stacked") => Ok(UnetBatch::Stacked),
        Ok(other) => Err(PipelineError::Model {
            path: "ATELIER_UNET_BATCH".into(),
            reason: format!("the worker setting must be exact or stacked (got {other:?})"),
        }),
    }
}

/// A loaded model, ready to sample. Cloning is cheap (weights are shared).
#[derive(Clone)]
pub struct StableDiffusion {
    pub family: Family,
    pub name: String,
    /// A1111's short model hash: the first 10 hex digits of the UNet weights' SHA-256.
    pub hash: String,
    /// The model's own noise schedule (what it was trained with), read from `scheduler` at load.
    pub schedule: ScheduleConfig,
    /// The model's scheduler config: each sampler reads its options from it as diffusers'
    /// `from_config` does (keys the file lacks take the sampler class's defaults).
    pub scheduler: SchedulerConfig,
    nets: Nets,
    tokenizers: Vec<ClipTokenizer>,
    embeddings: Vec<conditioning::Embedding>,
    /// (name, A1111 short hash) of the LoRAs applied, for the `parameters` text.
    lora_hashes: Vec<(String, String)>,
    /// A separate VAE file's (name, A1111 short hash), for the `parameters` text.
    vae_file: Option<(String, String)>,
    /// An empty negative prompt conditions on zeros (SDXL: diffusers' `force_zeros_for_empty_prompt`
    /// from `model_index.json`, true by default; A1111 does the same).
    zero_empty_negative: bool,
    weight_bytes: u64,
}

/// Where the pipeline's own tensors live (latents, conditioning, masks: f32 on the CPU); the
/// networks take them onto their device and kind.
static PIPELINE_DEVICE: Device = Device::Cpu;

impl StableDiffusion {
    /// Bytes of the weights this model holds (in their loaded dtypes; adapters not counted).
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// This model with a LoRA applied at `weight` (the weights it does not touch stay shared).
    pub fn with_lora(
        &self,
        file: &crate::lora::LoraFile,
        weight: f64,
        mode: crate::lora::LoraMode,
    ) -> PResult<(Self, crate::lora::Applied)> {
        let mut m = self.clone();
        let applied = m.nets.apply_lora(file, weight, mode)?;
        Ok((m, applied))
    }

    /// This model recording that LoRA `name` (A1111's short hash `hash`) is applied: PNG
    /// parameters then carry `Lora hashes: "name: hash, ..."` as A1111 writes them.
    pub fn with_lora_hash(mut self, name: &str, hash: &str) -> Self {
        self.lora_hashes.push((name.to_owned(), hash.to_owned()));
        self
    }

    /// Whether this is a 9-channel inpainting model (latents, mask, masked-image latents).
    pub fn is_inpainting(&self) -> bool {
        self.nets.in_channels() == 9
    }

    /// The UNet's shape (what memory estimates read).
    pub fn unet_config(&self) -> &crate::models::config::UNetConfig {
        self.nets.unet_config()
    }

    /// Pixels per latent cell (8 for real SD VAEs).
    pub fn vae_scale(&self) -> usize {
        1 << self.nets.vae_levels().saturating_sub(1)
    }

    /// One prompt's conditioning [1, 77k, D] and pooled embedding (SDXL), in the model's dtype.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        clip_skip: usize,
    ) -> PResult<(Tensor, Option<Tensor>)> {
        let bad = |e: String| PipelineError::BadRequest(format!("prompt: {e}"));
        let enc = |i: usize, layer: Layer| {
            let (Some(model), Some(tok)) = (self.nets.text(i), self.tokenizers.get(i)) else {
                return Err(PipelineError::Compute(format!("no text encoder {}", i + 1)));
            };
            conditioning::encode_with(model, tok, prompt, layer, DType::F32, &self.embeddings, i)
                .map_err(bad)
        };
        match self.family {
            Family::Sdxl => {
                let (z1, _) = enc(0, Layer::Penultimate)?;
                let (z2, pooled) = enc(1, Layer::Penultimate)?;
                Ok((Tensor::cat(&[z1, z2], 2)?, Some(pooled)))
            }
            _ => {
                let (z, _) = enc(0, Layer::Normed { clip_skip })?;
                Ok((z, None))
            }
        }
    }

    /// The networks, to attach trainable adapters.
    pub fn torch_mut(&mut self) -> &mut crate::torch::TorchModels {
        &mut self.nets.0
    }

    /// Text encoder `index`'s tokenizer.
    pub fn tokenizer(&self, index: usize) -> Option<&ClipTokenizer> {
        self.tokenizers.get(index)
    }

    /// The networks (libtorch).
    pub fn torch(&self) -> &crate::torch::TorchModels {
        &self.nets.0
    }

    /// Where the pipeline's own tensors (latents, masks) live: the CPU, in f32.
    pub fn device(&self) -> &Device {
        &PIPELINE_DEVICE
    }

    /// This model with textual-inversion embeddings available to prompts by name.
    pub fn with_embeddings(&self, embeddings: Vec<conditioning::Embedding>) -> Self {
        let mut m = self.clone();
        m.embeddings.extend(embeddings);
        m
    }
}
