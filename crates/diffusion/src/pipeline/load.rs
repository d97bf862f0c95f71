//! Loading models: diffusers folders, single-file checkpoints (A1111's and ComfyUI's), and
//! random weights of a real geometry for benchmarks.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{vae_dtype, Family, PResult, PipelineError, StableDiffusion, TextStack};
use crate::models::clip::{ClipConfig, ClipTextModel};
use crate::models::load::{component_weights, SafetensorsWeights};
use crate::models::nn::Ops;
use crate::models::unet::{PerBlock, UNet, UNetConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::schedulers::ScheduleConfig;
use crate::tokenizer::ClipTokenizer;

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> PResult<T> {
    let text = std::fs::read_to_string(p).map_err(|e| PipelineError::Model {
        path: p.display().to_string(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| PipelineError::Model {
        path: p.display().to_string(),
        reason: e.to_string(),
    })
}

pub(super) fn model_err(dir: &Path, e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Model {
        path: dir.display().to_string(),
        reason: e.to_string(),
    }
}

fn file_hash(paths: &[PathBuf]) -> PResult<String> {
    let mut h = Sha256::new();
    for p in paths {
        let mut f = std::fs::File::open(p).map_err(|e| model_err(p, e))?;
        std::io::copy(&mut f, &mut h).map_err(|e| model_err(p, e))?;
    }
    Ok(hex::encode(h.finalize())[..10].to_string())
}

/// The configs a single file's architecture implies (stored in atelier's own files' metadata,
/// else the published SD 1.x / 2.x / XL configs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SingleFileConfig {
    pub family: Family,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text: Vec<ClipConfig>,
    pub schedule: ScheduleConfig,
}

pub(super) const META_KEY: &str = "atelier.config";

impl Family {
    /// A diffusers folder's family: XL by its pipeline class (or a second text encoder), 2.x by
    /// its OpenCLIP text encoder (GELU), 1.x otherwise.
    pub(crate) fn of_diffusers(sdxl: bool, text_encoder: &ClipConfig) -> Self {
        if sdxl {
            Family::Sdxl
        } else if text_encoder.hidden_act == crate::models::clip::Activation::Gelu {
            Family::Sd2
        } else {
            Family::Sd1
        }
    }
}

/// The configs of a single-file checkpoint: those atelier stored in its metadata, or the
/// published ones of the family its keys name (`in_channels` from the UNet's first convolution,
/// the prediction type from the `NAME.json` sidecar's text). `shape_of` answers from the file's
/// header, so listing a registry reads no weights.
pub(crate) fn single_file_config(
    path: &Path,
    meta: &std::collections::HashMap<String, String>,
    shape_of: impl Fn(&str) -> Option<Vec<usize>>,
    sidecar: Option<&str>,
) -> PResult<SingleFileConfig> {
    if let Some(json) = meta.get(META_KEY) {
        return serde_json::from_str(json).map_err(|e| model_err(path, format!("{META_KEY}: {e}")));
    }
    let has = |n: &str| shape_of(n).is_some();
    let family = if has("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
    {
        Family::Sdxl
    } else if has("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight") {
        Family::Sd2
    } else if has("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight") {
        Family::Sd1
    } else {
        return Err(model_err(path, "unknown checkpoint layout: expected SD 1.x (cond_stage_model.transformer.*), SD 2.x (cond_stage_model.model.*) or SDXL (conditioner.embedders.*) keys beside model.diffusion_model.*"));
    };
    let in_ch = shape_of("model.diffusion_model.input_blocks.0.0.weight")
        .and_then(|s| s.get(1).copied())
        .unwrap_or(4);
    let mut c = SingleFileConfig::standard(family, in_ch);
    if let Some(text) = sidecar {
        let label = path.with_extension("json");
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| model_err(&label, e))?;
        if let Some(p) = v.get("prediction_type") {
            c.schedule.prediction_type =
                serde_json::from_value(p.clone()).map_err(|e| model_err(&label, e))?;
        }
    }
    Ok(c)
}

impl SingleFileConfig {
    /// The published configs of a family (`in_channels` 9 for inpainting checkpoints).
    pub fn standard(family: Family, in_channels: usize) -> Self {
        let mut unet = UNetConfig {
            in_channels,
            ..UNetConfig::default()
        };
        let mut vae = VaeConfig::default();
        let clip_l = ClipConfig::default();
        let openclip = |hidden, inter, layers, heads, proj| ClipConfig {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            projection_dim: proj,
            hidden_act: crate::models::clip::Activation::Gelu,
            ..ClipConfig::default()
        };
        let mut schedule = ScheduleConfig::default();
        let text = match family {
            Family::Sd1 => vec![clip_l],
            Family::Sd2 => {
                unet.sample_size = 96;
                unet.cross_attention_dim = 1024;
                unet.attention_head_dim = PerBlock::Each(vec![5, 10, 20, 20]);
                unet.use_linear_projection = true;
                // As diffusers' SD 2.1 config: its attention overflows f16.
                unet.upcast_attention = true;
                // SD 2.x 768 checkpoints are v-prediction (the 512 "base" ones are not: set
                // prediction_type in a sidecar `<name>.json` for those).
                schedule.prediction_type = crate::schedulers::PredictionType::VPrediction;
                vec![openclip(1024, 4096, 23, 16, 512)]
            }
            Family::Sdxl => {
                unet.sample_size = 128;
                unet.block_out_channels = vec![320, 640, 1280];
                unet.down_block_types = vec![
                    "DownBlock2D".into(),
                    "CrossAttnDownBlock2D".into(),
                    "CrossAttnDownBlock2D".into(),
                ];
                unet.up_block_types = vec![
                    "CrossAttnUpBlock2D".into(),
                    "CrossAttnUpBlock2D".into(),
                    "UpBlock2D".into(),
                ];
                unet.cross_attention_dim = 2048;
                unet.attention_head_dim = PerBlock::Each(vec![5, 10, 20]);
                unet.transformer_layers_per_block = PerBlock::Each(vec![1, 2, 10]);
                unet.use_linear_projection = true;
                unet.addition_embed_type = Some("text_time".into());
                unet.addition_time_embed_dim = Some(256);
                unet.projection_class_embeddings_input_dim = Some(2816);
                vae.scaling_factor = 0.13025;
                vae.sample_size = 1024;
                vec![clip_l, openclip(1280, 5120, 32, 20, 1280)]
            }
        };
        Self {
            family,
            unet,
            vae,
            text,
            schedule,
        }
    }
}

impl StableDiffusion {
    /// Load a model: a diffusers folder, or a single `.safetensors` checkpoint.
    pub fn load(path: &Path, device: &Device, dtype: DType) -> PResult<Self> {
        Self::load_with_ops(path, device, dtype, Ops::INFERENCE)
    }

    /// [`StableDiffusion::load`] for training: every op of the UNet and text encoders records
    /// gradients (the fused softmax and layer-norm kernels do not). The weights stay plain
    /// tensors; only the adapters a trainer attaches are `Var`s.
    pub fn load_for_training(path: &Path, device: &Device, dtype: DType) -> PResult<Self> {
        Self::load_with_ops(path, device, dtype, Ops::TRAINING)
    }

    fn load_with_ops(path: &Path, device: &Device, dtype: DType, ops: Ops) -> PResult<Self> {
        if !path.exists() {
            return Err(model_err(
                path,
                "does not exist (expected a diffusers folder or a .safetensors checkpoint)",
            ));
        }
        if path.is_dir() {
            Self::diffusers_with_ops(path, device, dtype, ops)
        } else {
            Self::single_file_with_ops(path, device, dtype, ops)
        }
    }

    /// Load a single-file checkpoint with the original LDM key names (SD 1.x, 2.x, XL; the
    /// architecture detected from the keys). The CLIP tokenizer is read from `tokenizer/` (and
    /// `tokenizer_2/`) beside the file.
    pub fn load_single_file(path: &Path, device: &Device, dtype: DType) -> PResult<Self> {
        Self::single_file_with_ops(path, device, dtype, Ops::INFERENCE)
    }

    fn single_file_with_ops(path: &Path, device: &Device, dtype: DType, ops: Ops) -> PResult<Self> {
        let file = SingleFile::open(path)?;
        let cfg = &file.cfg;
        let unet = UNet::new(file.unet.var_builder(dtype, device), cfg.unet.clone(), ops)
            .map_err(|e| model_err(path, e))?;
        let vae = Vae::new(file.vae.var_builder(vae_dtype()?, device), cfg.vae.clone())
            .map_err(|e| model_err(path, e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut text = Vec::new();
        for (i, (w, with_projection, openclip)) in file.text.iter().enumerate() {
            let model = ClipTextModel::new(
                w.var_builder(DType::F32, device),
                cfg.text[i].clone(),
                *with_projection,
                ops,
            )
            .map_err(|e| model_err(path, e))?;
            let tk_dir = [
                dir.join(if i == 0 { "tokenizer" } else { "tokenizer_2" }),
                dir.join("tokenizer"),
            ]
            .into_iter()
            .find(|d| d.join("vocab.json").exists() || d.join("tokenizer.json").exists())
            .ok_or_else(|| {
                model_err(
                    path,
                    format!(
                        "no CLIP tokenizer: put CLIP's vocab.json and merges.txt into {}",
                        dir.join("tokenizer").display()
                    ),
                )
            })?;
            let mut tok = ClipTokenizer::from_dir(&tk_dir).map_err(|e| model_err(&tk_dir, e))?;
            if *openclip && tk_dir.ends_with("tokenizer") {
                tok.pad = 0; // OpenCLIP pads with "!"
            }
            text.push(TextStack { model, tok });
        }
        Ok(Self {
            family: cfg.family,
            name: path
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
            hash: file_hash(&[path.to_path_buf()])?,
            schedule: cfg.schedule.clone(),
            unet,
            vae,
            text,
            embeddings: Vec::new(),
            lora_hashes: Vec::new(),
            weight_bytes: file.all.loaded_bytes(),
            device: device.clone(),
            dtype,
        })
    }

    /// A model of `family`'s real geometry with seeded random weights, the UNet in `dtype`, the VAE
    /// in `vae_dtype`, the text encoders in f32: benchmarks of the real shapes with no checkpoint.
    /// Tokenizers come from `tokenizers` (`tokenizer/`, and `tokenizer_2/` for SDXL, as
    /// [`make_tiny`] writes them).
    pub fn random(
        family: Family,
        tokenizers: &Path,
        device: &Device,
        (dtype, vae_dtype): (DType, DType),
        seed: u64,
    ) -> PResult<Self> {
        use crate::models::shapes::RandomWeights;
        let err = |e: candle_core::Error| model_err(tokenizers, e);
        let cfg = SingleFileConfig::standard(family, 4);
        let unet = UNet::new(
            RandomWeights::unrecorded(seed)
                .var_builder(device)
                .set_dtype(dtype),
            cfg.unet.clone(),
            Ops::INFERENCE,
        )
        .map_err(err)?;
        let vae = Vae::new(
            RandomWeights::unrecorded(seed + 1)
                .var_builder(device)
                .set_dtype(vae_dtype),
            cfg.vae.clone(),
        )
        .map_err(err)?;
        let mut text = Vec::new();
        for (i, tc) in cfg.text.iter().enumerate() {
            let model = ClipTextModel::new(
                RandomWeights::unrecorded(seed + 2 + i as u64).var_builder(device),
                tc.clone(),
                family == Family::Sdxl && i == 1,
                Ops::INFERENCE,
            )
            .map_err(err)?;
            let dir = tokenizers.join(if i == 0 { "tokenizer" } else { "tokenizer_2" });
            let tok = ClipTokenizer::from_dir(&dir).map_err(|e| model_err(&dir, e))?;
            text.push(TextStack { model, tok });
        }
        Ok(Self {
            family,
            name: format!("random-{family:?}").to_lowercase(),
            hash: format!("{seed:010x}"),
            schedule: cfg.schedule,
            unet,
            vae,
            text,
            embeddings: Vec::new(),
            lora_hashes: Vec::new(),
            weight_bytes: 0,
            device: device.clone(),
            dtype,
        })
    }

    /// Load a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
    /// `tokenizer/`, and for SDXL `text_encoder_2/`, `tokenizer_2/`).
    pub fn load_diffusers(dir: &Path, device: &Device, dtype: DType) -> PResult<Self> {
        Self::diffusers_with_ops(dir, device, dtype, Ops::INFERENCE)
    }

    fn diffusers_with_ops(dir: &Path, device: &Device, dtype: DType, ops: Ops) -> PResult<Self> {
        if !dir.join("model_index.json").exists() {
            return Err(model_err(
                dir,
                "not a diffusers folder: expected model_index.json with unet/, vae/, text_encoder/, tokenizer/",
            ));
        }
        let index: serde_json::Value = read_json(&dir.join("model_index.json"))?;
        let class = index["_class_name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let sdxl = class.contains("XL") || dir.join("text_encoder_2").exists();
        let unet_cfg: UNetConfig = read_json(&dir.join("unet/config.json"))?;
        let vae_cfg: VaeConfig = read_json(&dir.join("vae/config.json"))?;
        let te_cfg: ClipConfig = read_json(&dir.join("text_encoder/config.json"))?;
        let schedule: ScheduleConfig = {
            let p = dir.join("scheduler/scheduler_config.json");
            if p.exists() {
                read_json(&p)?
            } else {
                ScheduleConfig::default()
            }
        };
        let unet_files = component_weights(&dir.join("unet"))?;
        let hash = file_hash(&unet_files)?;
        let unet_w = SafetensorsWeights::open(&unet_files)?;
        let unet = UNet::new(unet_w.var_builder(dtype, device), unet_cfg, ops)
            .map_err(|e| model_err(&dir.join("unet"), e))?;
        // The VAE runs in f32 (SD's VAE overflows in f16).
        let vae_w = SafetensorsWeights::open(&component_weights(&dir.join("vae"))?)?;
        let vae = Vae::new(vae_w.var_builder(vae_dtype()?, device), vae_cfg)
            .map_err(|e| model_err(&dir.join("vae"), e))?;
        let mut weight_bytes = unet_w.loaded_bytes() + vae_w.loaded_bytes();
        let family = Family::of_diffusers(sdxl, &te_cfg);
        let mut text = Vec::new();
        let encoders: &[(&str, &str, bool)] = if sdxl {
            &[
                ("text_encoder", "tokenizer", false),
                ("text_encoder_2", "tokenizer_2", true),
            ]
        } else {
            &[("text_encoder", "tokenizer", false)]
        };
        for (te, tk, proj) in encoders {
            let cfg: ClipConfig = read_json(&dir.join(te).join("config.json"))?;
            let w = SafetensorsWeights::open(&component_weights(&dir.join(te))?)?;
            let model = ClipTextModel::new(w.var_builder(DType::F32, device), cfg, *proj, ops)
                .map_err(|e| model_err(&dir.join(te), e))?;
            weight_bytes += w.loaded_bytes();
            let tok =
                ClipTokenizer::from_dir(&dir.join(tk)).map_err(|e| model_err(&dir.join(tk), e))?;
            text.push(TextStack { model, tok });
        }
        Ok(Self {
            family,
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
            hash,
            schedule,
            unet,
            vae,
            text,
            embeddings: Vec::new(),
            lora_hashes: Vec::new(),
            weight_bytes,
            device: device.clone(),
            dtype,
        })
    }
}

/// A single-file checkpoint (original LDM key names; SD 1.x, 2.x, XL detected from the keys) seen
/// as diffusers components: each one's weights under the diffusers names, for either engine.
pub(crate) struct SingleFile {
    pub cfg: SingleFileConfig,
    pub unet: SafetensorsWeights,
    pub vae: SafetensorsWeights,
    /// Each text encoder's weights, whether it has a projection (SDXL's second), whether it is
    /// OpenCLIP's layout.
    pub text: Vec<(SafetensorsWeights, bool, bool)>,
    /// The file as opened (counts the bytes every component loads).
    pub all: SafetensorsWeights,
}

impl SingleFile {
    pub fn open(path: &Path) -> PResult<Self> {
        use crate::models::ldm;
        if path.extension().is_none_or(|e| e != "safetensors") {
            return Err(model_err(path, "expected a .safetensors checkpoint or a diffusers folder (.ckpt pickles are not loaded: convert them to safetensors)"));
        }
        let w = SafetensorsWeights::open(&[path.to_path_buf()])?;
        let meta = crate::models::load::read_metadata(path)?;
        let sidecar = std::fs::read_to_string(path.with_extension("json")).ok();
        let cfg = single_file_config(path, &meta, |n| w.shape_of(n), sidecar.as_deref())?;
        let prefixes = match cfg.family {
            Family::Sd1 => &ldm::SD1,
            Family::Sd2 => &ldm::SD2,
            Family::Sdxl => &ldm::SDXL,
        };
        let names = |build: &dyn Fn(
            &crate::models::shapes::ShapeRecorder,
        ) -> candle_core::Result<()>|
         -> PResult<Vec<String>> {
            let rec = crate::models::shapes::ShapeRecorder::default();
            build(&rec)?;
            Ok(rec.shapes().into_keys().collect())
        };
        let mapped = |names: Vec<String>, f: &dyn Fn(&str) -> Option<ldm::Source>| {
            ldm::map_names(names, f)
                .map(|m| w.with_map(m))
                .map_err(|e| model_err(path, e))
        };
        let uc = cfg.unet.clone();
        let unet = mapped(
            names(&|r| UNet::new(r.var_builder(), uc.clone(), Ops::INFERENCE).map(|_| ()))?,
            &|n| {
                ldm::unet_name(n, &cfg.unet)
                    .map(|s| ldm::Source::Rename(format!("{}{s}", prefixes.unet)))
            },
        )?;
        let vc = cfg.vae.clone();
        let levels = cfg.vae.block_out_channels.len();
        let vae = mapped(
            names(&|r| Vae::new(r.var_builder(), vc.clone()).map(|_| ()))?,
            &|n| {
                ldm::vae_name(n, levels)
                    .map(|s| ldm::Source::Rename(format!("{}{s}", prefixes.vae)))
            },
        )?;
        let mut text = Vec::new();
        for (i, ((prefix, openclip), tc)) in prefixes.text.iter().zip(&cfg.text).enumerate() {
            let with_projection = cfg.family == Family::Sdxl && i == 1;
            let c = tc.clone();
            let encoder = mapped(
                names(&|r| {
                    ClipTextModel::new(r.var_builder(), c.clone(), with_projection, Ops::INFERENCE)
                        .map(|_| ())
                })?,
                &|n| {
                    if *openclip {
                        ldm::openclip_source(n, prefix)
                    } else {
                        Some(ldm::hf_clip_source(n, prefix))
                    }
                },
            )?;
            text.push((encoder, with_projection, *openclip));
        }
        Ok(Self {
            cfg,
            unet,
            vae,
            text,
            all: w,
        })
    }
}
