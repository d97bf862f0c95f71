//! A Stable Diffusion model's networks on libtorch, loaded from a diffusers folder (or made of
//! seeded random weights of a family's real geometry, for benchmarks).

use std::path::Path;
use tch::{Device, Kind};

use super::clip::{ClipConfig, ClipTextModel};
use super::unet::{UNet, UNetConfig};
use super::vae::{Vae, VaeConfig};
use super::weights::Weights;
use super::{msg, Result};
use crate::models::load::{component_weights, SafetensorsWeights};
use crate::pipeline::load::SingleFile;
use crate::pipeline::{Family, SingleFileConfig};

/// The UNet, the VAE and the text encoders (one, or SDXL's two). Cloning shares the weights.
#[derive(Clone)]
pub struct TorchModels {
    pub family: Family,
    pub unet: UNet,
    pub vae: Vae,
    pub text: Vec<ClipTextModel>,
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> Result<T> {
    crate::pipeline::load::read_json(p).map_err(|e| msg(e.to_string()))
}

/// A diffusers component folder's weights, handing out `kind` on `device`.
fn files(dir: &Path, kind: Kind, device: Device) -> Result<Weights> {
    let st = SafetensorsWeights::open(&component_weights(dir)?)?;
    Ok(Weights::from_backend(st, kind, device))
}

fn at(dir: &Path, e: super::Error) -> super::Error {
    msg(format!("{}: {e}", dir.display()))
}

impl TorchModels {
    /// Load a model: a diffusers folder, or a single `.safetensors` checkpoint (A1111's and
    /// ComfyUI's LDM layout), with the UNet in `kind`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        if path.is_dir() {
            Self::load_diffusers(path, device, kind)
        } else if path.exists() {
            Self::load_single_file(path, device, kind)
        } else {
            Err(msg(format!(
                "{}: does not exist (expected a diffusers folder or a .safetensors checkpoint)",
                path.display()
            )))
        }
    }

    /// Load a single-file checkpoint through the same name maps as the candle engine.
    pub fn load_single_file(path: &Path, device: Device, kind: Kind) -> Result<Self> {
        let file = SingleFile::open(path).map_err(|e| msg(e.to_string()))?;
        let source = |w: SafetensorsWeights, k: Kind| Weights::from_backend(w, k, device);
        let cfg = file.cfg;
        let unet = UNet::new(&source(file.unet, kind), cfg.unet).map_err(|e| at(path, e))?;
        let vae = Vae::new(&source(file.vae, Kind::Float), cfg.vae).map_err(|e| at(path, e))?;
        let text = file
            .text
            .into_iter()
            .zip(cfg.text)
            .map(|((w, proj, _), c)| {
                ClipTextModel::new(&source(w, Kind::Float), c, proj).map_err(|e| at(path, e))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            family: cfg.family,
            unet,
            vae,
            text,
        })
    }

    /// Load a diffusers folder: the UNet in `kind`, the VAE and text encoders in f32.
    pub fn load_diffusers(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        if !dir.join("model_index.json").exists() {
            return Err(msg(format!(
                "{}: not a diffusers folder (expected model_index.json with unet/, vae/, text_encoder/, tokenizer/)",
                dir.display()
            )));
        }
        let sdxl = dir.join("text_encoder_2").exists();
        let unet_cfg: UNetConfig = read_json(&dir.join("unet/config.json"))?;
        let vae_cfg: VaeConfig = read_json(&dir.join("vae/config.json"))?;
        let te_cfg: ClipConfig = read_json(&dir.join("text_encoder/config.json"))?;
        let unet_dir = dir.join("unet");
        let unet =
            UNet::new(&files(&unet_dir, kind, device)?, unet_cfg).map_err(|e| at(&unet_dir, e))?;
        let vae_dir = dir.join("vae");
        let vae = Vae::new(&files(&vae_dir, Kind::Float, device)?, vae_cfg)
            .map_err(|e| at(&vae_dir, e))?;
        let encoders: &[(&str, bool)] = if sdxl {
            &[("text_encoder", false), ("text_encoder_2", true)]
        } else {
            &[("text_encoder", false)]
        };
        let text = encoders
            .iter()
            .map(|(te, proj)| {
                let d = dir.join(te);
                let cfg: ClipConfig = read_json(&d.join("config.json"))?;
                ClipTextModel::new(&files(&d, Kind::Float, device)?, cfg, *proj)
                    .map_err(|e| at(&d, e))
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            family: Family::of_diffusers(sdxl, &te_cfg),
            unet,
            vae,
            text,
        })
    }

    /// `family`'s real geometry with seeded random weights (the same values as the candle
    /// engine's [`crate::pipeline::StableDiffusion::random`] for the same seed), the UNet in `kind`,
    /// the VAE in `vae_kind`, the text encoders in f32.
    pub fn random(
        family: Family,
        device: Device,
        (kind, vae_kind): (Kind, Kind),
        seed: u64,
    ) -> Result<Self> {
        use atelier_modelkit::shapes::RandomWeights;
        let random =
            |s: u64, k: Kind| Weights::from_backend(RandomWeights::unrecorded(s), k, device);
        let cfg = SingleFileConfig::standard(family, 4);
        let unet = UNet::new(&random(seed, kind), cfg.unet.clone())?;
        let vae = Vae::new(&random(seed + 1, vae_kind), cfg.vae.clone())?;
        let text = cfg
            .text
            .iter()
            .enumerate()
            .map(|(i, tc)| {
                let proj = family == Family::Sdxl && i == 1;
                ClipTextModel::new(&random(seed + 2 + i as u64, Kind::Float), tc.clone(), proj)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            family,
            unet,
            vae,
            text,
        })
    }
}
