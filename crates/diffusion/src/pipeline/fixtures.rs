//! Tiny random-weight models in diffusers' layout, for tests and the demo.

use std::path::Path;

use super::load::model_err;
use super::{Family, PResult};
use crate::models::config::{Activation, ClipConfig, PerBlock, UNetConfig, VaeConfig};
use crate::models::load::save;
use crate::models::shapes::RandomWeights;
use crate::schedulers::{ScheduleConfig, SchedulerConfig};
use crate::tokenizer::write_tiny_vocab;
use crate::torch::clip::ClipTextModel;
use crate::torch::unet::UNet;
use crate::torch::vae::Vae;
use crate::torch::{self, weights::Weights};

pub fn make_tiny(dir: &Path, family: Family, seed: u64) -> PResult<()> {
    make_tiny_with(dir, family, seed, false)
}

/// [`make_tiny`], optionally with a 9-channel inpainting UNet.
pub fn make_tiny_with(dir: &Path, family: Family, seed: u64, inpainting: bool) -> PResult<()> {
    write_tiny(dir, family, seed, inpainting, 2)
}

/// [`make_tiny`] with a VAE that downsamples 4× (one more level), so 64-pixel training images
/// (the smallest multiple of 64) give 16×16 latents: fast training tests.
pub fn make_tiny_for_training(dir: &Path, family: Family, seed: u64) -> PResult<()> {
    write_tiny(dir, family, seed, false, 3)
}

fn write_tiny(
    dir: &Path,
    family: Family,
    seed: u64,
    inpainting: bool,
    vae_levels: usize,
) -> PResult<()> {
    let e = |err: std::io::Error| model_err(dir, err);
    std::fs::create_dir_all(dir).map_err(e)?;
    let words: &[(&str, &str)] = &[
        ("r", "e"),
        ("re", "d</w>"),
        ("b", "l"),
        ("bl", "u"),
        ("blu", "e</w>"),
        ("c", "i"),
        ("ci", "r"),
        ("s", "q"),
        ("a", "n"),
        ("an", "d</w>"),
        ("o", "n</w>"),
        ("t", "h"),
        ("th", "e</w>"),
    ];
    let write_component = |name: &str,
                           config: serde_json::Value,
                           build: &dyn Fn(&Weights) -> torch::Result<()>|
     -> PResult<()> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).map_err(e)?;
        std::fs::write(
            d.join("config.json"),
            serde_json::to_string_pretty(&config).unwrap_or_default(),
        )
        .map_err(e)?;
        let weights = RandomWeights::new(seed ^ name.len() as u64 ^ 0x5eed);
        build(&Weights::from_backend(
            weights.clone(),
            tch::Kind::Float,
            tch::Device::Cpu,
        ))
        .map_err(|err| model_err(&d, err))?;
        let file = if name.starts_with("text_encoder") {
            "model.safetensors"
        } else {
            "diffusion_pytorch_model.safetensors"
        };
        save(&weights.tensors(), &d.join(file))?;
        Ok(())
    };
    let sdxl = family == Family::Sdxl;
    let mut vocab = 0;
    for tk in if sdxl {
        vec!["tokenizer", "tokenizer_2"]
    } else {
        vec!["tokenizer"]
    } {
        vocab = write_tiny_vocab(&dir.join(tk), words).map_err(e)?;
    }
    let clip = ClipConfig {
        vocab_size: vocab,
        hidden_size: 32,
        intermediate_size: 37,
        projection_dim: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        ..ClipConfig::default()
    };
    let te = serde_json::to_value(&clip).unwrap_or_default();
    write_component("text_encoder", te.clone(), &|w| {
        ClipTextModel::new(w, clip.clone(), false).map(|_| ())
    })?;
    if sdxl {
        let mut c2 = clip.clone();
        c2.hidden_act = Activation::Gelu;
        let te2 = serde_json::to_value(&c2).unwrap_or_default();
        write_component("text_encoder_2", te2, &|w| {
            ClipTextModel::new(w, c2.clone(), true).map(|_| ())
        })?;
    }
    let mut unet = UNetConfig {
        sample_size: 16,
        layers_per_block: 1,
        block_out_channels: vec![32, 64],
        down_block_types: vec!["CrossAttnDownBlock2D".into(), "DownBlock2D".into()],
        up_block_types: vec!["UpBlock2D".into(), "CrossAttnUpBlock2D".into()],
        cross_attention_dim: 32,
        attention_head_dim: PerBlock::One(2),
        norm_num_groups: 8,
        ..UNetConfig::default()
    };
    if inpainting {
        unet.in_channels = 9;
    }
    if sdxl {
        unet.down_block_types = vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()];
        unet.up_block_types = vec!["CrossAttnUpBlock2D".into(), "UpBlock2D".into()];
        unet.cross_attention_dim = 64;
        unet.transformer_layers_per_block = PerBlock::Each(vec![1, 2]);
        unet.use_linear_projection = true;
        unet.addition_embed_type = Some("text_time".into());
        unet.addition_time_embed_dim = Some(8);
        unet.projection_class_embeddings_input_dim = Some(6 * 8 + 32);
    }
    let uc = unet.clone();
    write_component(
        "unet",
        serde_json::to_value(&unet).unwrap_or_default(),
        &|w| UNet::new(w, uc.clone()).map(|_| ()),
    )?;
    let vae = VaeConfig {
        block_out_channels: [16, 32, 32][..vae_levels.clamp(1, 3)].to_vec(),
        layers_per_block: 1,
        norm_num_groups: 8,
        scaling_factor: if sdxl { 0.13025 } else { 0.18215 },
        sample_size: 32,
        ..VaeConfig::default()
    };
    let vc = vae.clone();
    write_component(
        "vae",
        serde_json::to_value(&vae).unwrap_or_default(),
        &|w| Vae::new(w, vc.clone()).map(|_| ()),
    )?;
    let sched = dir.join("scheduler");
    std::fs::create_dir_all(&sched).map_err(e)?;
    std::fs::write(
        sched.join("scheduler_config.json"),
        serde_json::to_string_pretty(
            &SchedulerConfig::of_schedule(&ScheduleConfig::default()).to_value(),
        )
        .unwrap_or_default(),
    )
    .map_err(e)?;
    let class = if sdxl {
        "StableDiffusionXLPipeline"
    } else {
        "StableDiffusionPipeline"
    };
    std::fs::write(
        dir.join("model_index.json"),
        serde_json::json!({"_class_name": class, "_diffusers_version": "0.42.1", "_atelier_tiny": true}).to_string(),
    )
    .map_err(e)?;
    Ok(())
}
