//! Loading models: diffusers folders, single-file checkpoints (A1111's and ComfyUI's), and
//! random weights of a real geometry for benchmarks.

use std::path::{Path, PathBuf};

use atelier_modelkit::shapes::RandomWeights;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::nets::Nets;
use super::{vae_kind, Family, PResult, PipelineError, Placement, StableDiffusion};
use crate::models::config::{Activation, ClipConfig, PerBlock, UNetConfig, VaeConfig};
use crate::models::load::{component_weights, SafetensorsWeights};
use crate::schedulers::{ScheduleConfig, SchedulerConfig};
use crate::tokenizer::ClipTokenizer;
use crate::torch::weights::{source, Weights};
use crate::torch::{self, TorchModels};

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

pub(crate) fn model_err(dir: &Path, e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Model {
        path: dir.display().to_string(),
        reason: e.to_string(),
    }
}

pub(crate) fn file_hash(paths: &[PathBuf]) -> PResult<String> {
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
        } else if text_encoder.hidden_act == Activation::Gelu {
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
            hidden_act: Activation::Gelu,
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

/// One component's weights: a safetensors loader, or seeded random values.
type Src = std::sync::Arc<dyn torch::weights::Source>;

/// A checkpoint opened (a diffusers folder, a single file, or random weights of a family's
/// geometry): its configs and each component's weights, before the networks are built.
pub(crate) struct Checkpoint {
    pub family: Family,
    /// The scheduler config file's keys (the model's noise schedule; samplers read their options
    /// from it).
    pub scheduler: SchedulerConfig,
    name: String,
    unet: (Src, UNetConfig),
    vae: (Src, VaeConfig),
    /// Each text encoder's weights and config, and whether it has a projection (SDXL's second).
    text: Vec<(Src, ClipConfig, bool)>,
    /// Where each encoder's tokenizer is looked for, in order, and whether it is OpenCLIP's.
    tokenizers: Vec<(Vec<PathBuf>, bool)>,
    /// The files A1111's short hash covers (none: a seed's hash).
    hashed: Vec<PathBuf>,
    seed: u64,
    /// Handles that count the bytes loaded.
    counters: Vec<SafetensorsWeights>,
    /// An empty negative prompt conditions on zeros (diffusers' `force_zeros_for_empty_prompt`,
    /// SDXL's default; A1111 zeros an empty SDXL negative too).
    zero_empty_negative: bool,
}

impl Checkpoint {
    /// A diffusers folder, or a single `.safetensors` checkpoint.
    pub fn open(path: &Path) -> PResult<Self> {
        if !path.exists() {
            return Err(model_err(
                path,
                "does not exist (expected a diffusers folder or a .safetensors checkpoint)",
            ));
        }
        if path.is_dir() {
            Self::diffusers(path)
        } else {
            Self::single_file(path)
        }
    }

    /// A single-file checkpoint with the original LDM key names (SD 1.x, 2.x, XL; the
    /// architecture detected from the keys); tokenizers from `tokenizer/` (and `tokenizer_2/`)
    /// beside it.
    pub fn single_file(path: &Path) -> PResult<Self> {
        let file = SingleFile::open(path)?;
        let cfg = file.cfg;
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut text = Vec::new();
        let mut tokenizers = Vec::new();
        for (i, ((w, proj, openclip), c)) in file.text.into_iter().zip(cfg.text).enumerate() {
            text.push((source(w), c, proj));
            let own = dir.join(if i == 0 { "tokenizer" } else { "tokenizer_2" });
            tokenizers.push((vec![own, dir.join("tokenizer")], openclip));
        }
        Ok(Self {
            family: cfg.family,
            scheduler: SchedulerConfig::of_schedule(&cfg.schedule),
            name: path
                .file_stem()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
            unet: (source(file.unet), cfg.unet),
            vae: (source(file.vae), cfg.vae),
            text,
            tokenizers,
            hashed: vec![path.to_path_buf()],
            seed: 0,
            counters: vec![file.all],
            zero_empty_negative: cfg.family == Family::Sdxl,
        })
    }

    /// The same model with the VAE of a separate file (A1111's `sd_vae`): a `.safetensors` VAE
    /// in the original LDM names (`encoder.down.0.block.0.conv1.weight`, what A1111's VAE folder
    /// holds, with or without `first_stage_model.`) or in diffusers' (`AutoencoderKL`). Its
    /// geometry must be the checkpoint's; the file joins what A1111's `VAE hash` covers.
    pub fn with_vae(mut self, path: &Path) -> PResult<Self> {
        use crate::models::ldm;
        if path.extension().is_none_or(|e| e != "safetensors") {
            return Err(model_err(path, "expected a .safetensors VAE"));
        }
        let w = SafetensorsWeights::open(&[path.to_path_buf()])?;
        let prefix = ["", "first_stage_model.", "vae."]
            .into_iter()
            .find(|p| w.contains(&format!("{p}encoder.down.0.block.0.conv1.weight")));
        let weights = match prefix {
            Some(prefix) => {
                let rec = torch::weights::Recorder::default();
                let vc = self.vae.1.clone();
                torch::vae::Vae::new(&rec.weights(), vc).map_err(|e| model_err(path, e))?;
                let names: Vec<String> = rec.shapes().into_keys().collect();
                let levels = self.vae.1.block_out_channels.len();
                let map = ldm::map_names(names, |n: &str| {
                    ldm::vae_name(n, levels).map(|s| ldm::Source::Rename(format!("{prefix}{s}")))
                })
                .map_err(|e| model_err(path, e))?;
                w.with_map(map)
            }
            None if w.contains("encoder.down_blocks.0.resnets.0.conv1.weight") => w.clone(),
            None => {
                return Err(model_err(
                    path,
                    "not a VAE: expected encoder.down.0.block.0.conv1.weight (LDM) or encoder.down_blocks.0.resnets.0.conv1.weight (diffusers)",
                ))
            }
        };
        self.vae.0 = source(weights);
        self.counters.push(w);
        Ok(self)
    }

    /// A diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
    /// and for SDXL `text_encoder_2/`, `tokenizer_2/`).
    pub fn diffusers(dir: &Path) -> PResult<Self> {
        if !dir.join("model_index.json").exists() {
            return Err(model_err(
                dir,
                "not a diffusers folder: expected model_index.json with unet/, vae/, text_encoder/, tokenizer/",
            ));
        }
        let index: serde_json::Value = read_json(&dir.join("model_index.json"))?;
        let class = index["_class_name"].as_str().unwrap_or_default();
        let sdxl = class.contains("XL") || dir.join("text_encoder_2").exists();
        let scheduler = {
            let p = dir.join("scheduler/scheduler_config.json");
            if p.exists() {
                let v: serde_json::Value = read_json(&p)?;
                SchedulerConfig::from_value(v).map_err(|e| model_err(&p, e))?
            } else {
                SchedulerConfig::of_schedule(&ScheduleConfig::default())
            }
        };
        let open = |c: &str| SafetensorsWeights::open(&component_weights(&dir.join(c))?);
        let unet_files = component_weights(&dir.join("unet"))?;
        let (unet, vae) = (SafetensorsWeights::open(&unet_files)?, open("vae")?);
        let mut counters = vec![unet.clone(), vae.clone()];
        let encoders: &[(&str, &str, bool)] = if sdxl {
            &[
                ("text_encoder", "tokenizer", false),
                ("text_encoder_2", "tokenizer_2", true),
            ]
        } else {
            &[("text_encoder", "tokenizer", false)]
        };
        let mut text = Vec::new();
        for (te, _, proj) in encoders {
            let w = open(te)?;
            counters.push(w.clone());
            text.push((
                source(w),
                read_json(&dir.join(te).join("config.json"))?,
                *proj,
            ));
        }
        Ok(Self {
            family: Family::of_diffusers(sdxl, &text[0].1),
            scheduler,
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
            unet: (source(unet), read_json(&dir.join("unet/config.json"))?),
            vae: (source(vae), read_json(&dir.join("vae/config.json"))?),
            text,
            tokenizers: encoders
                .iter()
                .map(|(_, tk, _)| (vec![dir.join(tk)], false))
                .collect(),
            hashed: unet_files,
            seed: 0,
            counters,
            zero_empty_negative: sdxl
                && index["force_zeros_for_empty_prompt"]
                    .as_bool()
                    .unwrap_or(true),
        })
    }

    /// `family`'s real geometry with seeded random weights (the UNet from `seed`, the VAE from
    /// `seed + 1`, text encoder i from `seed + 2 + i`); tokenizers from `tokenizers/tokenizer`
    /// (and `tokenizer_2`).
    pub fn random(family: Family, tokenizers: &Path, seed: u64) -> Self {
        let cfg = SingleFileConfig::standard(family, 4);
        let random = |s: u64| source(RandomWeights::unrecorded(s));
        Self {
            family,
            scheduler: SchedulerConfig::of_schedule(&cfg.schedule),
            name: format!("random-{family:?}").to_lowercase(),
            unet: (random(seed), cfg.unet),
            vae: (random(seed + 1), cfg.vae),
            text: cfg
                .text
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    (
                        random(seed + 2 + i as u64),
                        c,
                        family == Family::Sdxl && i == 1,
                    )
                })
                .collect(),
            tokenizers: ["tokenizer", "tokenizer_2"]
                .iter()
                .take(if family == Family::Sdxl { 2 } else { 1 })
                .map(|t| (vec![tokenizers.join(t)], false))
                .collect(),
            hashed: Vec::new(),
            seed,
            counters: Vec::new(),
            zero_empty_negative: family == Family::Sdxl,
        }
    }

    /// The networks on libtorch: the UNet in `placement.kind`, the VAE in `vae_kind`, the text
    /// encoders in f32.
    pub fn torch(&self, placement: Placement, vae_kind: tch::Kind) -> torch::Result<TorchModels> {
        let at =
            |what: &str, e: torch::Error| torch::Error::Msg(format!("{}: {what}: {e}", self.name));
        let dev = placement.device;
        let unet = torch::unet::UNet::new(
            &Weights::new(self.unet.0.clone(), placement.kind, dev),
            self.unet.1.clone(),
        )
        .map_err(|e| at("unet", e))?;
        let vae = torch::vae::Vae::new(
            &Weights::new(self.vae.0.clone(), vae_kind, dev),
            self.vae.1.clone(),
        )
        .map_err(|e| at("vae", e))?;
        let text = self
            .text
            .iter()
            .map(|(w, c, proj)| {
                torch::clip::ClipTextModel::new(
                    &Weights::new(w.clone(), tch::Kind::Float, dev),
                    c.clone(),
                    *proj,
                )
                .map_err(|e| at("text encoder", e))
            })
            .collect::<torch::Result<_>>()?;
        Ok(TorchModels {
            family: self.family,
            unet,
            vae,
            text,
        })
    }

    fn tokenizers(&self) -> PResult<Vec<ClipTokenizer>> {
        let mut out = Vec::new();
        for (dirs, openclip) in &self.tokenizers {
            let Some(dir) = dirs
                .iter()
                .find(|d| d.join("vocab.json").exists() || d.join("tokenizer.json").exists())
            else {
                let want = dirs
                    .first()
                    .map(|d| d.display().to_string())
                    .unwrap_or_default();
                return Err(model_err(
                    Path::new(&self.name),
                    format!("no CLIP tokenizer: put CLIP's vocab.json and merges.txt into {want}"),
                ));
            };
            let mut tok = ClipTokenizer::from_dir(dir).map_err(|e| model_err(dir, e))?;
            if *openclip && dir.ends_with("tokenizer") {
                tok.pad = 0; // OpenCLIP pads with "!"
            }
            out.push(tok);
        }
        Ok(out)
    }

    /// The model around `nets`.
    fn assemble(self, nets: Nets) -> PResult<StableDiffusion> {
        let hash = if self.hashed.is_empty() {
            format!("{:010x}", self.seed)
        } else {
            file_hash(&self.hashed)?
        };
        let schedule = self
            .scheduler
            .schedule()
            .map_err(|e| model_err(Path::new(&self.name), e))?;
        Ok(StableDiffusion {
            family: self.family,
            tokenizers: self.tokenizers()?,
            name: self.name,
            hash,
            schedule,
            scheduler: self.scheduler,
            nets,
            embeddings: Vec::new(),
            lora_hashes: Vec::new(),
            vae_file: None,
            zero_empty_negative: self.zero_empty_negative,
            weight_bytes: self.counters.iter().map(|c| c.loaded_bytes()).sum(),
        })
    }
}

impl StableDiffusion {
    /// Load a model onto libtorch: a diffusers folder, or a single `.safetensors` checkpoint
    /// (A1111's and ComfyUI's LDM layout; the tokenizers in `tokenizer/`, `tokenizer_2/` beside
    /// it).
    pub fn load(path: &Path, placement: Placement) -> PResult<Self> {
        Self::on_torch(Checkpoint::open(path)?, placement)
    }

    /// Load a model (as [`StableDiffusion::load`]) with the VAE of a separate file
    /// ([`Checkpoint::with_vae`]).
    pub fn load_with_vae(path: &Path, vae: &Path, placement: Placement) -> PResult<Self> {
        let mut model = Self::on_torch(Checkpoint::open(path)?.with_vae(vae)?, placement)?;
        let name = vae
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        model.vae_file = Some((name, file_hash(&[vae.to_path_buf()])?));
        Ok(model)
    }

    /// Load a diffusers folder onto libtorch.
    pub fn load_diffusers(dir: &Path, placement: Placement) -> PResult<Self> {
        Self::on_torch(Checkpoint::diffusers(dir)?, placement)
    }

    /// Load a single-file checkpoint onto libtorch.
    pub fn load_single_file(path: &Path, placement: Placement) -> PResult<Self> {
        Self::on_torch(Checkpoint::single_file(path)?, placement)
    }

    /// A model of `family`'s real geometry with seeded random weights on libtorch (the VAE in
    /// `vae_kind`): benchmarks of the real shapes with no checkpoint. Tokenizers come from
    /// `tokenizers` (`tokenizer/`, and `tokenizer_2/` for SDXL, as [`make_tiny`] writes them).
    ///
    /// [`make_tiny`]: super::make_tiny
    pub fn random(
        family: Family,
        tokenizers: &Path,
        placement: Placement,
        vae_kind: tch::Kind,
        seed: u64,
    ) -> PResult<Self> {
        let ckpt = Checkpoint::random(family, tokenizers, seed);
        let nets = ckpt.torch(placement, vae_kind)?;
        ckpt.assemble(Nets(nets))
    }

    fn on_torch(ckpt: Checkpoint, placement: Placement) -> PResult<Self> {
        let nets = ckpt
            .torch(placement, vae_kind()?)
            .map_err(|e| model_err(Path::new(&ckpt.name), e))?;
        ckpt.assemble(Nets(nets))
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
        let names = |build: &dyn Fn(&torch::weights::Weights) -> torch::Result<()>| {
            let rec = torch::weights::Recorder::default();
            build(&rec.weights()).map_err(|e| model_err(path, e))?;
            Ok::<_, PipelineError>(rec.shapes().into_keys().collect::<Vec<_>>())
        };
        let mapped = |names: Vec<String>, f: &dyn Fn(&str) -> Option<ldm::Source>| {
            ldm::map_names(names, f)
                .map(|m| w.with_map(m))
                .map_err(|e| model_err(path, e))
        };
        let uc = cfg.unet.clone();
        let unet = mapped(
            names(&|w| torch::unet::UNet::new(w, uc.clone()).map(|_| ()))?,
            &|n| {
                ldm::unet_name(n, &cfg.unet)
                    .map(|s| ldm::Source::Rename(format!("{}{s}", prefixes.unet)))
            },
        )?;
        let vc = cfg.vae.clone();
        let levels = cfg.vae.block_out_channels.len();
        let vae = mapped(
            names(&|w| torch::vae::Vae::new(w, vc.clone()).map(|_| ()))?,
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
                names(&|w| {
                    torch::clip::ClipTextModel::new(w, c.clone(), with_projection).map(|_| ())
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
