//! Stable Diffusion pipelines on our models: load a diffusers folder, txt2img with CFG, any
//! sampler, A1111 prompts and seeds, PNGs carrying A1111's `parameters` text.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::conditioning::{self, Layer};
use crate::models::clip::{ClipConfig, ClipTextModel};
use crate::models::load::{component_weights, save, SafetensorsWeights};
use crate::models::nn::Ops;
use crate::models::shapes::RandomWeights;
use crate::models::unet::{AddedCond, PerBlock, UNet, UNetConfig};
use crate::models::vae::{Vae, VaeConfig};
use crate::noise::{NoiseSource, SeededNoise};
use crate::prompt::{schedule, text_at};
use crate::schedulers::{NoiseSchedule, SamplerKind, ScheduleConfig};
use crate::tokenizer::{write_tiny_vocab, ClipTokenizer};

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

type PResult<T> = std::result::Result<T, PipelineError>;

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

#[derive(Clone)]
struct TextStack {
    model: ClipTextModel,
    tok: ClipTokenizer,
}

/// The dtype loaded VAEs compute in: f32 unless `ATELIER_VAE_DTYPE` says `f16` or `bf16` (faster
/// on GPUs; SD 1.x/2.x decode well in f16, SDXL's VAE overflows f16 and wants bf16 or f32).
pub fn vae_dtype() -> PResult<DType> {
    match std::env::var("ATELIER_VAE_DTYPE").as_deref() {
        Err(_) | Ok("") | Ok("f32") => Ok(DType::F32),
        Ok("f16") => Ok(DType::F16),
        Ok("bf16") => Ok(DType::BF16),
        Ok(other) => Err(PipelineError::Model {
            path: "ATELIER_VAE_DTYPE".into(),
            reason: format!("the worker setting must be f32, f16 or bf16 (got {other:?})"),
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
    pub schedule: ScheduleConfig,
    unet: UNet,
    vae: Vae,
    text: Vec<TextStack>,
    embeddings: Vec<conditioning::Embedding>,
    /// (name, A1111 short hash) of the LoRAs applied, for the `parameters` text.
    lora_hashes: Vec<(String, String)>,
    weight_bytes: u64,
    device: Device,
    dtype: DType,
}

/// txt2img settings (A1111's names where it has them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Txt2Img {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    #[serde(default = "one")]
    pub batch_size: usize,
    pub sampler: SamplerKind,
    #[serde(default = "one")]
    pub clip_skip: usize,
}

fn one() -> usize {
    1
}

/// What txt2img requests must share to run in one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub sampler: SamplerKind,
    /// The CFG scale's bits (exact equality).
    pub cfg_bits: u64,
    pub clip_skip: usize,
}

impl BatchKey {
    pub fn of(r: &Txt2Img) -> Self {
        Self {
            width: r.width,
            height: r.height,
            steps: r.steps,
            sampler: r.sampler,
            cfg_bits: r.cfg_scale.to_bits(),
            clip_skip: r.clip_skip,
        }
    }
}

/// Limits checked before any model work.
pub const MAX_STEPS: usize = 150;
pub const MAX_PIXELS: usize = 2048 * 2048;

impl Txt2Img {
    /// A clear reason for any setting out of range.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(format!(
                "steps must be 1..={MAX_STEPS} (got {})",
                self.steps
            ));
        }
        if !(self.cfg_scale.is_finite() && (0.0..=30.0).contains(&self.cfg_scale)) {
            return Err(format!(
                "cfg_scale must be within 0..=30 (got {})",
                self.cfg_scale
            ));
        }
        if self.width == 0 || self.height == 0 || self.width % 8 != 0 || self.height % 8 != 0 {
            return Err(format!(
                "width and height must be positive multiples of 8 (got {}x{})",
                self.width, self.height
            ));
        }
        if self.width * self.height > MAX_PIXELS {
            return Err(format!(
                "{}x{} is over the pixel budget of {MAX_PIXELS} pixels",
                self.width, self.height
            ));
        }
        if self.batch_size == 0 || self.batch_size > 16 {
            return Err(format!(
                "batch_size must be 1..=16 (got {})",
                self.batch_size
            ));
        }
        if self.clip_skip == 0 || self.clip_skip > 12 {
            return Err(format!("clip_skip must be 1..=12 (got {})", self.clip_skip));
        }
        Ok(())
    }
}

/// One generated image.
#[derive(Debug, Clone)]
pub struct Generated {
    pub seed: u64,
    pub image: image::RgbImage,
    /// A1111's `parameters` text.
    pub parameters: String,
}

impl Generated {
    /// PNG bytes with the `parameters` text chunk (A1111, ComfyUI and civitai read it back).
    pub fn png(&self) -> PResult<Vec<u8>> {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, self.image.width(), self.image.height());
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            enc.add_text_chunk("parameters".into(), self.parameters.clone())
                .map_err(|e| PipelineError::Compute(e.to_string()))?;
            let mut w = enc
                .write_header()
                .map_err(|e| PipelineError::Compute(e.to_string()))?;
            w.write_image_data(self.image.as_raw())
                .map_err(|e| PipelineError::Compute(e.to_string()))?;
        }
        Ok(out)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(p: &Path) -> PResult<T> {
    let text = std::fs::read_to_string(p).map_err(|e| PipelineError::Model {
        path: p.display().to_string(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| PipelineError::Model {
        path: p.display().to_string(),
        reason: e.to_string(),
    })
}

fn model_err(dir: &Path, e: impl std::fmt::Display) -> PipelineError {
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

const META_KEY: &str = "atelier.config";

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
        let recorder_names = |build: &dyn Fn(
            &crate::models::shapes::ShapeRecorder,
        ) -> candle_core::Result<()>|
         -> PResult<Vec<String>> {
            let rec = crate::models::shapes::ShapeRecorder::default();
            build(&rec)?;
            Ok(rec.shapes().into_keys().collect())
        };
        let uc = cfg.unet.clone();
        let names = recorder_names(&|r| {
            UNet::new(r.var_builder(), uc.clone(), Ops::INFERENCE).map(|_| ())
        })?;
        let map = ldm::map_names(names, |n| {
            ldm::unet_name(n, &cfg.unet)
                .map(|s| ldm::Source::Rename(format!("{}{s}", prefixes.unet)))
        })
        .map_err(|e| model_err(path, e))?;
        let unet = UNet::new(
            w.with_map(map).var_builder(dtype, device),
            cfg.unet.clone(),
            ops,
        )
        .map_err(|e| model_err(path, e))?;
        let vc = cfg.vae.clone();
        let names = recorder_names(&|r| Vae::new(r.var_builder(), vc.clone()).map(|_| ()))?;
        let levels = cfg.vae.block_out_channels.len();
        let map = ldm::map_names(names, |n| {
            ldm::vae_name(n, levels).map(|s| ldm::Source::Rename(format!("{}{s}", prefixes.vae)))
        })
        .map_err(|e| model_err(path, e))?;
        let vae = Vae::new(
            w.with_map(map).var_builder(vae_dtype()?, device),
            cfg.vae.clone(),
        )
        .map_err(|e| model_err(path, e))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut text = Vec::new();
        for (i, ((prefix, openclip), tc)) in prefixes.text.iter().zip(&cfg.text).enumerate() {
            let with_projection = cfg.family == Family::Sdxl && i == 1;
            let c = tc.clone();
            let names = recorder_names(&|r| {
                ClipTextModel::new(r.var_builder(), c.clone(), with_projection, Ops::INFERENCE)
                    .map(|_| ())
            })?;
            let map = ldm::map_names(names, |n| {
                if *openclip {
                    ldm::openclip_source(n, prefix)
                } else {
                    Some(ldm::hf_clip_source(n, prefix))
                }
            })
            .map_err(|e| model_err(path, e))?;
            let model = ClipTextModel::new(
                w.with_map(map).var_builder(DType::F32, device),
                tc.clone(),
                with_projection,
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
            schedule: cfg.schedule,
            unet,
            vae,
            text,
            embeddings: Vec::new(),
            lora_hashes: Vec::new(),
            weight_bytes: w.loaded_bytes(),
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
        let mut text: Vec<&mut ClipTextModel> = m.text.iter_mut().map(|t| &mut t.model).collect();
        let applied = crate::lora::apply(file, weight, mode, &mut m.unet, &mut text)
            .map_err(PipelineError::BadRequest)?;
        Ok((m, applied))
    }

    /// This model recording that LoRA `name` (A1111's short hash `hash`) is applied: PNG
    /// parameters then carry `Lora hashes: "name: hash, ..."` as A1111 writes them.
    pub fn with_lora_hash(mut self, name: &str, hash: &str) -> Self {
        self.lora_hashes.push((name.to_owned(), hash.to_owned()));
        self
    }

    /// Pixels per latent cell (8 for real SD VAEs).
    pub fn vae_scale(&self) -> usize {
        1 << (self.vae.config.block_out_channels.len().saturating_sub(1))
    }

    /// One prompt's conditioning [1, 77k, D] and pooled embedding (SDXL), in the model's dtype.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        clip_skip: usize,
    ) -> PResult<(Tensor, Option<Tensor>)> {
        let bad = |e: String| PipelineError::BadRequest(format!("prompt: {e}"));
        let enc = |i: usize, layer: Layer| {
            conditioning::encode_with(
                &self.text[i].model,
                &self.text[i].tok,
                prompt,
                layer,
                &self.device,
                self.dtype,
                &self.embeddings,
                i,
            )
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

    /// The UNet and the text encoders, for attaching trainable adapters.
    pub fn parts_mut(&mut self) -> (&mut UNet, Vec<&mut ClipTextModel>) {
        (
            &mut self.unet,
            self.text.iter_mut().map(|t| &mut t.model).collect(),
        )
    }

    /// The UNet (its config, and its forward pass for training).
    pub fn unet(&self) -> &UNet {
        &self.unet
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The UNet's compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// This model with textual-inversion embeddings available to prompts by name.
    pub fn with_embeddings(&self, embeddings: Vec<conditioning::Embedding>) -> Self {
        let mut m = self.clone();
        m.embeddings.extend(embeddings);
        m
    }

    /// A1111's `parameters` text for image `i`'s seed.
    fn parameters(&self, req: &Txt2Img, seed: u64) -> String {
        let mut s = req.prompt.clone();
        if !req.negative_prompt.is_empty() {
            s.push_str(&format!("\nNegative prompt: {}", req.negative_prompt));
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model hash: {}, Model: {}",
            req.steps,
            req.sampler.a1111_name().unwrap_or(req.sampler.name()),
            req.cfg_scale,
            seed,
            req.width,
            req.height,
            self.hash,
            self.name
        ));
        if req.clip_skip > 1 {
            s.push_str(&format!(", Clip skip: {}", req.clip_skip));
        }
        if !self.lora_hashes.is_empty() {
            let list: Vec<String> = self
                .lora_hashes
                .iter()
                .map(|(n, h)| format!("{n}: {h}"))
                .collect();
            s.push_str(&format!(", Lora hashes: \"{}\"", list.join(", ")));
        }
        s.push_str(&format!(", Version: atelier {}", env!("CARGO_PKG_VERSION")));
        s
    }

    /// Generate `batch_size` images; image i uses seed + i, so it equals a single run with that
    /// seed. `on_step(done, total)` returns false to cancel between steps.
    pub fn txt2img(
        &self,
        req: &Txt2Img,
        on_step: impl FnMut(usize, usize) -> bool,
    ) -> PResult<Vec<Generated>> {
        self.generate(req, None, on_step, None)
    }

    /// Several txt2img requests through the same UNet passes: their images are stacked into one
    /// batch, each with its own prompt (and prompt-editing schedule), negative prompt, seeds and
    /// batch size, so the result per request is what [`txt2img`](Self::txt2img) gives alone (to
    /// float rounding). Requests must share the settings of [`BatchKey`]; requests whose encoded
    /// prompts differ in length (another 75-token chunk count) cannot share a context tensor and
    /// run one after another instead. `on_step(done, total)` counts the whole group's steps.
    pub fn txt2img_batch(
        &self,
        reqs: &[Txt2Img],
        mut on_step: impl FnMut(usize, usize) -> bool,
    ) -> PResult<Vec<Vec<Generated>>> {
        let Some(first) = reqs.first() else {
            return Ok(Vec::new());
        };
        let key = BatchKey::of(first);
        if let Some(r) = reqs.iter().find(|r| BatchKey::of(r) != key) {
            return Err(PipelineError::BadRequest(format!(
                "requests in one batch must share size, steps, sampler, CFG scale and clip skip: {:?} vs {:?}",
                key,
                BatchKey::of(r)
            )));
        }
        for r in reqs {
            r.validate().map_err(PipelineError::BadRequest)?;
        }
        let f = self.vae_scale();
        if first.width % f != 0
            || first.height % f != 0
            || reqs.len() == 1
            || self.unet.config.in_channels == 9
        {
            // One request, a size the single path rejects with its own message, or an
            // inpainting UNet (the single path builds its mask channels).
            return self.one_by_one(reqs, &mut on_step);
        }
        let strip = |p: &str| -> PResult<String> {
            crate::prompt::extract_extra_networks(p)
                .map(|(clean, _)| clean)
                .map_err(PipelineError::BadRequest)
        };
        let use_cfg = first.cfg_scale != 1.0;
        let (empty, _) = self.encode_prompt("", first.clip_skip)?;
        // Per request: its schedule and, per schedule entry, (uncond, cond, pooled pair) padded
        // to the same length within the request.
        struct Encoded {
            sched: Vec<crate::prompt::ScheduleEntry>,
            ctx: Vec<(Tensor, Tensor)>,
            pooled: Vec<Option<(Tensor, Tensor)>>,
        }
        let mut enc = Vec::with_capacity(reqs.len());
        for r in reqs {
            let prompt = strip(&r.prompt)?;
            let negative = strip(&r.negative_prompt)?;
            let sched = schedule(&prompt, r.steps);
            let (uncond, uncond_pooled) = self.encode_prompt(&negative, r.clip_skip)?;
            let mut ctx = Vec::new();
            let mut pooled = Vec::new();
            for e in &sched {
                let (c, p) = self.encode_prompt(&e.text, r.clip_skip)?;
                let (u, c) = if use_cfg {
                    conditioning::pad_to_same(uncond.clone(), c, &empty)?
                } else {
                    (uncond.clone(), c)
                };
                ctx.push((u, c));
                pooled.push(match (&uncond_pooled, p) {
                    (Some(u), Some(p)) => Some((u.clone(), p)),
                    _ => None,
                });
            }
            enc.push(Encoded { sched, ctx, pooled });
        }
        // One context tensor needs one sequence length across the group.
        let len = |t: &Tensor| t.dim(1).unwrap_or(0);
        let lens: std::collections::BTreeSet<usize> = enc
            .iter()
            .flat_map(|e| {
                e.ctx.iter().flat_map(|(u, c)| {
                    if use_cfg {
                        vec![len(u), len(c)]
                    } else {
                        vec![len(c)]
                    }
                })
            })
            .collect();
        if lens.len() > 1 {
            // Prompts of different lengths: the group runs one by one.
            return self.one_by_one(reqs, &mut on_step);
        }
        let (h, w) = (first.height / f, first.width / f);
        if h * w > MAX_PIXELS / 64 {
            return Err(PipelineError::BadRequest(format!(
                "{}x{} is over this model's latent budget",
                first.width, first.height
            )));
        }
        let ch = self.unet.config.in_channels.min(4);
        let schedule_cfg = NoiseSchedule::new(self.schedule.clone());
        let mut sampler = crate::schedulers::build(first.sampler, &schedule_cfg, first.steps)
            .map_err(|e| PipelineError::BadRequest(e.to_string()))?;
        let mut streams: Vec<SeededNoise> = reqs
            .iter()
            .flat_map(|r| {
                (0..r.batch_size).map(move |i| SeededNoise::new(r.seed.wrapping_add(i as u64)))
            })
            .collect();
        let b: usize = streams.len();
        let noise = streams
            .iter_mut()
            .map(|s| s.randn((1, ch, h, w), &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let noise = Tensor::cat(&noise, 0)?;
        let mut x = noise
            .affine(sampler.init_noise_sigma(), 0.0)?
            .to_dtype(self.dtype)?;
        let mut step_noise = BatchNoise { streams };
        let total = sampler.remaining();
        let time_ids = |n: usize| -> candle_core::Result<Tensor> {
            let ids = [first.height, first.width, 0, 0, first.height, first.width]
                .map(|v| v as f32)
                .to_vec();
            Tensor::from_vec(ids, (1, 6), &self.device)?.repeat((n, 1))
        };
        let mut done = 0;
        while !sampler.finished() {
            let step_no = sampler.step_index() + 1;
            // Each request's prompt at this step, stacked: [all unconds; all conds] with CFG.
            let (mut us, mut cs, mut pus, mut pcs) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for (r, e) in reqs.iter().zip(&enc) {
                let text = text_at(&e.sched, step_no).unwrap_or_default();
                let ci = e.sched.iter().position(|s| s.text == text).unwrap_or(0);
                let (u, c) = &e.ctx[ci];
                us.push(u.repeat((r.batch_size, 1, 1))?);
                cs.push(c.repeat((r.batch_size, 1, 1))?);
                if let Some((pu, pc)) = &e.pooled[ci] {
                    pus.push(pu.repeat((r.batch_size, 1))?);
                    pcs.push(pc.repeat((r.batch_size, 1))?);
                }
            }
            let pooled = pcs.len() == reqs.len();
            let t = sampler.timestep();
            let input = sampler.scale_model_input(&x)?;
            let eps = if use_cfg {
                let ctx = Tensor::cat(&[Tensor::cat(&us, 0)?, Tensor::cat(&cs, 0)?], 0)?;
                let add = if pooled {
                    Some(AddedCond {
                        text_embeds: Tensor::cat(
                            &[Tensor::cat(&pus, 0)?, Tensor::cat(&pcs, 0)?],
                            0,
                        )?,
                        time_ids: time_ids(2 * b)?,
                    })
                } else {
                    None
                };
                let xin = Tensor::cat(&[&input, &input], 0)?;
                let ts = Tensor::full(t as f32, 2 * b, &self.device)?;
                let out = self.unet.forward(&xin, &ts, &ctx, add.as_ref())?;
                let (ou, oc) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
                (&ou + (oc - &ou)?.affine(first.cfg_scale, 0.0)?)?
            } else {
                let ctx = Tensor::cat(&cs, 0)?;
                let add = if pooled {
                    Some(AddedCond {
                        text_embeds: Tensor::cat(&pcs, 0)?,
                        time_ids: time_ids(b)?,
                    })
                } else {
                    None
                };
                let ts = Tensor::full(t as f32, b, &self.device)?;
                self.unet.forward(&input, &ts, &ctx, add.as_ref())?
            };
            x = sampler.step(&eps, &x, &mut step_noise)?;
            done += 1;
            if !on_step(done, total) {
                return Err(PipelineError::Cancelled);
            }
        }
        let mut decoded = self.decode_rgb(&x, first.width, first.height)?.into_iter();
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            let mut images = Vec::with_capacity(r.batch_size);
            for i in 0..r.batch_size {
                let image = decoded.next().ok_or_else(|| {
                    PipelineError::Compute("the batch decoded fewer images than asked".into())
                })?;
                let seed = r.seed.wrapping_add(i as u64);
                images.push(Generated {
                    seed,
                    image,
                    parameters: self.parameters(r, seed),
                });
            }
            out.push(images);
        }
        Ok(out)
    }

    /// The requests of a group that cannot share a batch, one after another.
    fn one_by_one(
        &self,
        reqs: &[Txt2Img],
        on_step: &mut impl FnMut(usize, usize) -> bool,
    ) -> PResult<Vec<Vec<Generated>>> {
        reqs.iter()
            .map(|r| self.generate(r, None, &mut *on_step, None))
            .collect()
    }

    /// txt2img (`init` None) or img2img/inpaint, decoding the first image's current latents every
    /// `every` steps for `on_preview(step, image)` (A1111's live preview, full VAE decode).
    pub fn generate_with_previews(
        &self,
        req: &Txt2Img,
        init: Option<&Init>,
        on_step: impl FnMut(usize, usize) -> bool,
        every: usize,
        on_preview: &mut dyn FnMut(usize, image::RgbImage),
    ) -> PResult<Vec<Generated>> {
        if let Some(i) = init {
            i.validate().map_err(PipelineError::BadRequest)?;
        }
        self.generate(req, init, on_step, Some((every.max(1), on_preview)))
    }

    /// img2img and inpainting: start from `init` noised to the strength's timestep (pure noise at
    /// strength 1, which then equals txt2img from the same seed). With a mask, only the masked
    /// (white) region is repainted: regular models blend the unmasked region's re-noised
    /// latents back at every step; 9-channel inpainting models also see the mask and the masked
    /// image.
    pub fn img2img(
        &self,
        req: &Txt2Img,
        init: &Init,
        on_step: impl FnMut(usize, usize) -> bool,
    ) -> PResult<Vec<Generated>> {
        init.validate().map_err(PipelineError::BadRequest)?;
        self.generate(req, Some(init), on_step, None)
    }

    /// Pixels → scaled latents [1, 4, h, w] (the image resized to `width`×`height`).
    pub fn encode_image(
        &self,
        img: &image::RgbImage,
        width: usize,
        height: usize,
    ) -> PResult<Tensor> {
        let img = if img.dimensions() != (width as u32, height as u32) {
            image::imageops::resize(
                img,
                width as u32,
                height as u32,
                image::imageops::FilterType::Lanczos3,
            )
        } else {
            img.clone()
        };
        let t = Tensor::from_vec(img.into_raw(), (height, width, 3), &self.device)?
            .permute((2, 0, 1))?
            .to_dtype(DType::F32)?
            .affine(2.0 / 255.0, -1.0)?
            .unsqueeze(0)?;
        Ok(self.vae.encode(&t)?)
    }

    /// Latents [B, 4, h, w] → one RGB image per batch item (`width`×`height`).
    fn decode_rgb(&self, x: &Tensor, width: usize, height: usize) -> PResult<Vec<image::RgbImage>> {
        let pixels = self.vae.decode(&x.to_dtype(DType::F32)?)?;
        let pixels = ((pixels.clamp(-1.0, 1.0)? + 1.0)? * 127.5)?
            .round()?
            .to_dtype(DType::U8)?;
        (0..pixels.dim(0)?)
            .map(|i| {
                let raw = pixels
                    .get(i)?
                    .permute((1, 2, 0))?
                    .flatten_all()?
                    .to_vec1::<u8>()?;
                image::RgbImage::from_raw(width as u32, height as u32, raw).ok_or_else(|| {
                    PipelineError::Compute("decoded image has the wrong size".into())
                })
            })
            .collect()
    }

    /// The mask at latent resolution [1, 1, h, w], 1 where the image is repainted.
    fn latent_mask(
        &self,
        mask: &Mask,
        width: usize,
        height: usize,
        h: usize,
        w: usize,
    ) -> PResult<Tensor> {
        let m = mask.at(width as u32, height as u32, true);
        let small = image::imageops::resize(
            &m,
            w as u32,
            h as u32,
            image::imageops::FilterType::Triangle,
        );
        let v: Vec<f32> = small
            .into_raw()
            .into_iter()
            .map(|p| p as f32 / 255.0)
            .collect();
        Ok(Tensor::from_vec(v, (1, 1, h, w), &self.device)?)
    }

    fn generate(
        &self,
        req: &Txt2Img,
        init: Option<&Init>,
        mut on_step: impl FnMut(usize, usize) -> bool,
        mut preview: Option<(usize, &mut PreviewFn<'_>)>,
    ) -> PResult<Vec<Generated>> {
        req.validate().map_err(PipelineError::BadRequest)?;
        let f = self.vae_scale();
        if req.width % f != 0 || req.height % f != 0 {
            return Err(PipelineError::BadRequest(format!(
                "width and height must be multiples of {f} for this model"
            )));
        }
        let (h, w) = (req.height / f, req.width / f);
        if h * w > MAX_PIXELS / 64 {
            return Err(PipelineError::BadRequest(format!(
                "{}x{} is {} latent cells for this model, over its budget of {}",
                req.width,
                req.height,
                h * w,
                MAX_PIXELS / 64
            )));
        }
        let b = req.batch_size;
        let ch = self.unet.config.in_channels.min(4);
        // Per-step prompt texts (prompt editing), each encoded once.
        // Extra-network tags (<lora:…>) are applied by the caller (see `with_lora`); they are
        // not text for the encoder.
        let strip = |p: &str| -> PResult<String> {
            crate::prompt::extract_extra_networks(p)
                .map(|(clean, _)| clean)
                .map_err(PipelineError::BadRequest)
        };
        let prompt = strip(&req.prompt)?;
        let negative = strip(&req.negative_prompt)?;
        let sched = schedule(&prompt, req.steps);
        let mut conds = Vec::new();
        for e in &sched {
            conds.push(self.encode_prompt(&e.text, req.clip_skip)?);
        }
        let (uncond, uncond_pooled) = self.encode_prompt(&negative, req.clip_skip)?;
        let (empty, _) = self.encode_prompt("", req.clip_skip)?;
        let schedule_cfg = NoiseSchedule::new(self.schedule.clone());
        let mut sampler = crate::schedulers::build(req.sampler, &schedule_cfg, req.steps)
            .map_err(|e| PipelineError::BadRequest(e.to_string()))?;
        let mut streams: Vec<SeededNoise> = (0..b)
            .map(|i| SeededNoise::new(req.seed.wrapping_add(i as u64)))
            .collect();
        let noise = streams
            .iter_mut()
            .map(|s| s.randn((1, ch, h, w), &self.device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let noise = Tensor::cat(&noise, 0)?;
        let inpaint_model = self.unet.config.in_channels == 9;
        // (clean init latents, latent mask) for blending; (mask, masked-image latents) for
        // 9-channel models.
        let mut blend: Option<(Tensor, Tensor)> = None;
        let mut extra: Option<Tensor> = None;
        let x = match init {
            None => noise.affine(sampler.init_noise_sigma(), 0.0)?,
            Some(init) => {
                let lat = self
                    .encode_image(&init.image, req.width, req.height)?
                    .repeat((b, 1, 1, 1))?;
                if init.strength < 1.0 {
                    let begin = sampler.begin_index_for_strength(req.steps, init.strength);
                    sampler.set_begin_index(begin);
                }
                if sampler.finished() {
                    return Err(PipelineError::BadRequest(format!(
                        "strength {} over {} steps leaves no step to run: raise strength or steps",
                        init.strength, req.steps
                    )));
                }
                let x = if init.strength >= 1.0 {
                    noise.affine(sampler.init_noise_sigma(), 0.0)?
                } else {
                    sampler.add_noise(&lat, &noise)?
                };
                if let Some(mask) = &init.mask {
                    let m = self
                        .latent_mask(mask, req.width, req.height, h, w)?
                        .repeat((b, 1, 1, 1))?;
                    if inpaint_model {
                        // The masked image: repainted region set to 0 (mid grey) before encoding.
                        let pm = mask.at(req.width as u32, req.height as u32, false);
                        let mut masked = init.image.clone();
                        if masked.dimensions() != (req.width as u32, req.height as u32) {
                            masked = image::imageops::resize(
                                &masked,
                                req.width as u32,
                                req.height as u32,
                                image::imageops::FilterType::Lanczos3,
                            );
                        }
                        for (px, mp) in masked.pixels_mut().zip(pm.pixels()) {
                            if mp.0[0] >= 128 {
                                *px = image::Rgb([128, 128, 128]);
                            }
                        }
                        let ml = self
                            .encode_image(&masked, req.width, req.height)?
                            .repeat((b, 1, 1, 1))?;
                        extra = Some(Tensor::cat(&[m.clone(), ml], 1)?);
                    }
                    blend = Some((lat, m));
                }
                x
            }
        };
        if inpaint_model && extra.is_none() {
            // An inpainting model without a mask repaints everything.
            let m = Tensor::ones((b, 1, h, w), DType::F32, &self.device)?;
            let grey = image::RgbImage::from_pixel(
                req.width as u32,
                req.height as u32,
                image::Rgb([128, 128, 128]),
            );
            let ml = self
                .encode_image(&grey, req.width, req.height)?
                .repeat((b, 1, 1, 1))?;
            extra = Some(Tensor::cat(&[m, ml], 1)?);
        }
        let extra = match extra {
            Some(e) => Some(e.to_dtype(self.dtype)?),
            None => None,
        };
        let mut x = x.to_dtype(self.dtype)?;
        let mut step_noise = BatchNoise { streams };
        let total = sampler.remaining();
        let use_cfg = req.cfg_scale != 1.0;
        let time_ids = |n: usize| -> candle_core::Result<Tensor> {
            let ids = [req.height, req.width, 0, 0, req.height, req.width]
                .map(|v| v as f32)
                .to_vec();
            Tensor::from_vec(ids, (1, 6), &self.device)?.repeat((n, 1))
        };
        // Per prompt text: the UNet's context and added conditioning, built once (CFG: the
        // negative prompt's half first, padded to the same length).
        let prepared = conds
            .iter()
            .map(|(cond, pooled)| -> PResult<(Tensor, Option<AddedCond>)> {
                if use_cfg {
                    let (u, c) = conditioning::pad_to_same(uncond.clone(), cond.clone(), &empty)?;
                    let ctx = Tensor::cat(&[u.repeat((b, 1, 1))?, c.repeat((b, 1, 1))?], 0)?;
                    let add = match (&uncond_pooled, pooled) {
                        (Some(u), Some(c)) => Some(AddedCond {
                            text_embeds: Tensor::cat(&[u.repeat((b, 1))?, c.repeat((b, 1))?], 0)?,
                            time_ids: time_ids(2 * b)?,
                        }),
                        _ => None,
                    };
                    Ok((ctx, add))
                } else {
                    let add = match pooled {
                        Some(p) => Some(AddedCond {
                            text_embeds: p.repeat((b, 1))?,
                            time_ids: time_ids(b)?,
                        }),
                        None => None,
                    };
                    Ok((cond.repeat((b, 1, 1))?, add))
                }
            })
            .collect::<PResult<Vec<_>>>()?;
        let blend = match (blend, inpaint_model) {
            (Some((lat, m)), false) => {
                let m = m.to_dtype(x.dtype())?;
                let keep = (1.0 - &m)?;
                Some((lat, m, keep))
            }
            _ => None,
        };
        let mut done = 0;
        while !sampler.finished() {
            let step_no = sampler.step_index() + 1;
            let text = text_at(&sched, step_no).unwrap_or_default();
            let ci = sched.iter().position(|e| e.text == text).unwrap_or(0);
            let (ctx, add) = &prepared[ci];
            let t = sampler.timestep();
            let mut input = sampler.scale_model_input(&x)?;
            if let Some(e) = &extra {
                input = Tensor::cat(&[&input, e], 1)?;
            }
            let eps = if use_cfg {
                let xin = Tensor::cat(&[&input, &input], 0)?;
                let ts = Tensor::full(t as f32, 2 * b, &self.device)?;
                let out = self.unet.forward(&xin, &ts, ctx, add.as_ref())?;
                let (ou, oc) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
                (&ou + (oc - &ou)?.affine(req.cfg_scale, 0.0)?)?
            } else {
                let ts = Tensor::full(t as f32, b, &self.device)?;
                self.unet.forward(&input, &ts, ctx, add.as_ref())?
            };
            x = sampler.step(&eps, &x, &mut step_noise)?;
            if let Some((lat, m, keep)) = &blend {
                let orig = if sampler.finished() {
                    lat.clone()
                } else {
                    sampler.add_noise_at(lat, &noise, sampler.step_index())?
                };
                x = (x.broadcast_mul(m)? + orig.to_dtype(x.dtype())?.broadcast_mul(keep)?)?;
            }
            done += 1;
            if let Some((every, cb)) = preview.as_mut() {
                if done % *every == 0 && !sampler.finished() {
                    let p = self.decode_rgb(&x.narrow(0, 0, 1)?, req.width, req.height)?;
                    if let Some(img) = p.into_iter().next() {
                        cb(done, img);
                    }
                }
            }
            if !on_step(done, total) {
                return Err(PipelineError::Cancelled);
            }
        }
        let decoded = self.decode_rgb(&x, req.width, req.height)?;
        let mut images = Vec::with_capacity(b);
        for (i, image) in decoded.into_iter().enumerate() {
            let image = match init.and_then(|i| i.mask.as_ref().map(|m| (i, m))) {
                Some((init, mask)) => overlay(&image, &init.image, mask),
                None => image,
            };
            let seed = req.seed.wrapping_add(i as u64);
            images.push(Generated {
                seed,
                image,
                parameters: self.parameters(req, seed),
            });
        }
        Ok(images)
    }
}

/// Paste the original back where the (feathered) mask keeps it, as A1111 does, so the unmasked
/// region is the original's pixels exactly.
fn overlay(
    generated: &image::RgbImage,
    original: &image::RgbImage,
    mask: &Mask,
) -> image::RgbImage {
    let (w, h) = generated.dimensions();
    let orig = if original.dimensions() != (w, h) {
        image::imageops::resize(original, w, h, image::imageops::FilterType::Lanczos3)
    } else {
        original.clone()
    };
    let m = mask.at(w, h, true);
    let mut out = generated.clone();
    for ((o, g), (src, mp)) in out
        .pixels_mut()
        .zip(generated.pixels())
        .zip(orig.pixels().zip(m.pixels()))
    {
        let a = mp.0[0] as f32 / 255.0;
        for c in 0..3 {
            o.0[c] = (g.0[c] as f32 * a + src.0[c] as f32 * (1.0 - a)).round() as u8;
        }
    }
    out
}

/// The starting image of img2img / inpainting.
#[derive(Debug, Clone)]
pub struct Init {
    pub image: image::RgbImage,
    /// 0..=1: how much of the schedule runs (1 = from pure noise).
    pub strength: f64,
    pub mask: Option<Mask>,
}

/// An inpainting mask: white (≥ 128) is repainted.
#[derive(Debug, Clone)]
pub struct Mask {
    pub image: image::GrayImage,
    /// Gaussian feathering of the mask edge, in pixels (A1111's mask_blur).
    pub blur: f32,
    pub invert: bool,
}

impl Mask {
    /// The mask at `w`×`h` (nearest-neighbour), inverted if asked, feathered if `feathered`.
    fn at(&self, w: u32, h: u32, feathered: bool) -> image::GrayImage {
        let mut m = if self.image.dimensions() != (w, h) {
            image::imageops::resize(&self.image, w, h, image::imageops::FilterType::Nearest)
        } else {
            self.image.clone()
        };
        if self.invert {
            image::imageops::invert(&mut m);
        }
        if feathered && self.blur > 0.0 {
            m = image::imageops::blur(&m, self.blur);
        }
        m
    }
}

impl Init {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.strength.is_finite() && (0.0..=1.0).contains(&self.strength)) {
            return Err(format!(
                "strength must be within 0..=1 (got {})",
                self.strength
            ));
        }
        if let Some(m) = &self.mask {
            if m.image.dimensions() != self.image.dimensions() {
                return Err(format!(
                    "the mask is {}x{} but the image is {}x{}: they must be the same size",
                    m.image.width(),
                    m.image.height(),
                    self.image.width(),
                    self.image.height()
                ));
            }
            if !(m.blur.is_finite() && (0.0..=64.0).contains(&m.blur)) {
                return Err(format!("mask_blur must be within 0..=64 (got {})", m.blur));
            }
        }
        Ok(())
    }
}

/// Step noise drawn per image from its own seeded stream, so a batch equals its single runs.
struct BatchNoise {
    streams: Vec<SeededNoise>,
}

impl NoiseSource for BatchNoise {
    fn randn_like(&mut self, like: &Tensor) -> candle_core::Result<Tensor> {
        let dims = like.dims().to_vec();
        let mut one = dims.clone();
        one[0] = 1;
        let parts = self
            .streams
            .iter_mut()
            .map(|s| s.randn(one.clone(), like.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&parts, 0)?.to_dtype(like.dtype())
    }
}

/// Write a tiny random-weight model in diffusers' folder layout (SD 1.x shaped, or SDXL shaped
/// with two text encoders and added conditioning): for tests and the demo.
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
    let dev = Device::Cpu;
    let write_component = |name: &str,
                           config: serde_json::Value,
                           build: &dyn Fn(&RandomWeights) -> candle_core::Result<()>|
     -> PResult<()> {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).map_err(e)?;
        std::fs::write(
            d.join("config.json"),
            serde_json::to_string_pretty(&config).unwrap_or_default(),
        )
        .map_err(e)?;
        let weights = RandomWeights::new(seed ^ name.len() as u64 ^ 0x5eed);
        build(&weights)?;
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
        ClipTextModel::new(w.var_builder(&dev), clip.clone(), false, Ops::INFERENCE).map(|_| ())
    })?;
    if sdxl {
        let mut c2 = clip.clone();
        c2.hidden_act = crate::models::clip::Activation::Gelu;
        let te2 = serde_json::to_value(&c2).unwrap_or_default();
        write_component("text_encoder_2", te2, &|w| {
            ClipTextModel::new(w.var_builder(&dev), c2.clone(), true, Ops::INFERENCE).map(|_| ())
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
        &|w| UNet::new(w.var_builder(&dev), uc.clone(), Ops::INFERENCE).map(|_| ()),
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
        &|w| Vae::new(w.var_builder(&dev), vc.clone()).map(|_| ()),
    )?;
    let sched = dir.join("scheduler");
    std::fs::create_dir_all(&sched).map_err(e)?;
    std::fs::write(
        sched.join("scheduler_config.json"),
        serde_json::to_string_pretty(&ScheduleConfig::default()).unwrap_or_default(),
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

/// Convert a diffusers folder written by [`make_tiny`] (or any diffusers folder) into one
/// single-file checkpoint with the original LDM key names; its configs travel in the file's
/// metadata and the tokenizer folders are copied beside it.
pub fn write_single_file(diffusers: &Path, out: &Path) -> PResult<()> {
    use crate::models::ldm;
    let index: serde_json::Value = read_json(&diffusers.join("model_index.json"))?;
    let sdxl = index["_class_name"]
        .as_str()
        .unwrap_or_default()
        .contains("XL");
    let unet: UNetConfig = read_json(&diffusers.join("unet/config.json"))?;
    let vae: VaeConfig = read_json(&diffusers.join("vae/config.json"))?;
    let mut text = vec![read_json::<ClipConfig>(
        &diffusers.join("text_encoder/config.json"),
    )?];
    if sdxl {
        text.push(read_json(&diffusers.join("text_encoder_2/config.json"))?);
    }
    let family = Family::of_diffusers(sdxl, &text[0]);
    let prefixes = match family {
        Family::Sd1 => &ldm::SD1,
        Family::Sd2 => &ldm::SD2,
        Family::Sdxl => &ldm::SDXL,
    };
    let load = |dir: &Path| -> PResult<std::collections::BTreeMap<String, Tensor>> {
        let files = component_weights(dir)?;
        let mut all = std::collections::BTreeMap::new();
        for f in files {
            for (k, v) in candle_core::safetensors::load(&f, &Device::Cpu)? {
                all.insert(k, v);
            }
        }
        Ok(all)
    };
    let mut out_tensors = std::collections::BTreeMap::new();
    let t = load(&diffusers.join("unet"))?;
    let map = ldm::map_names(t.keys().cloned(), |n| {
        ldm::unet_name(n, &unet).map(|s| ldm::Source::Rename(format!("{}{s}", prefixes.unet)))
    })
    .map_err(|e| model_err(diffusers, e))?;
    out_tensors.extend(ldm::to_single_file(&t, &map)?);
    let t = load(&diffusers.join("vae"))?;
    let levels = vae.block_out_channels.len();
    let map = ldm::map_names(t.keys().cloned(), |n| {
        ldm::vae_name(n, levels).map(|s| ldm::Source::Rename(format!("{}{s}", prefixes.vae)))
    })
    .map_err(|e| model_err(diffusers, e))?;
    out_tensors.extend(ldm::to_single_file(&t, &map)?);
    for (i, (prefix, openclip)) in prefixes.text.iter().enumerate() {
        let dir = diffusers.join(if i == 0 {
            "text_encoder"
        } else {
            "text_encoder_2"
        });
        let t = load(&dir)?;
        let t: std::collections::BTreeMap<String, Tensor> = t
            .into_iter()
            .filter(|(k, _)| !k.ends_with("position_ids"))
            .collect();
        let map = ldm::map_names(t.keys().cloned(), |n| {
            if *openclip {
                ldm::openclip_source(n, prefix)
            } else {
                Some(ldm::hf_clip_source(n, prefix))
            }
        })
        .map_err(|e| model_err(&dir, e))?;
        out_tensors.extend(ldm::to_single_file(&t, &map)?);
    }
    let schedule: ScheduleConfig =
        read_json(&diffusers.join("scheduler/scheduler_config.json")).unwrap_or_default();
    let cfg = SingleFileConfig {
        family,
        unet,
        vae,
        text,
        schedule,
    };
    let mut meta = std::collections::HashMap::new();
    meta.insert(
        META_KEY.to_string(),
        serde_json::to_string(&cfg).map_err(|e| model_err(out, e))?,
    );
    meta.insert("format".to_string(), "pt".to_string());
    crate::models::load::save_with_metadata(&out_tensors, meta, out)?;
    let parent = out.parent().unwrap_or(Path::new("."));
    for tk in ["tokenizer", "tokenizer_2"] {
        let src = diffusers.join(tk);
        if src.is_dir() {
            let dst = parent.join(tk);
            std::fs::create_dir_all(&dst).map_err(|e| model_err(&dst, e))?;
            for entry in std::fs::read_dir(&src)
                .map_err(|e| model_err(&src, e))?
                .flatten()
            {
                std::fs::copy(entry.path(), dst.join(entry.file_name()))
                    .map_err(|e| model_err(&dst, e))?;
            }
        }
    }
    Ok(())
}
