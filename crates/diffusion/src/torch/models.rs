//! A Stable Diffusion model's networks on libtorch, loaded from a diffusers folder or a single
//! file (or made of seeded random weights of a family's real geometry, for benchmarks).

use std::path::Path;
use tch::{Device, Kind};

use super::clip::ClipTextModel;
use super::unet::UNet;
use super::vae::Vae;
use super::{msg, Result};
use crate::pipeline::load::Checkpoint;
use crate::pipeline::{Family, Placement};

/// The UNet, the VAE and the text encoders (one, or SDXL's two). Cloning shares the weights.
#[derive(Clone)]
pub struct TorchModels {
    pub family: Family,
    pub unet: UNet,
    pub vae: Vae,
    pub text: Vec<ClipTextModel>,
}

impl TorchModels {
    /// Load a model: a diffusers folder, or a single `.safetensors` checkpoint (A1111's and
    /// ComfyUI's LDM layout), with the UNet in `kind`, the VAE and text encoders in f32.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        Checkpoint::open(path)
            .map_err(|e| msg(e.to_string()))?
            .torch(Placement { device, kind }, Kind::Float)
    }

    /// `family`'s real geometry with seeded random weights, the UNet in `kind`, the VAE in
    /// `vae_kind`, the text encoders in f32.
    pub fn random(
        family: Family,
        device: Device,
        (kind, vae_kind): (Kind, Kind),
        seed: u64,
    ) -> Result<Self> {
        Checkpoint::random(family, Path::new("."), seed).torch(Placement { device, kind }, vae_kind)
    }
}
