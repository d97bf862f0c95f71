//! Loading FLUX and SD 3 models: diffusers folders (`model_index.json`, `transformer/`, `vae/`,
//! `text_encoder*/`, `tokenizer*/`, `scheduler/`) and single files (see `single_file`), whose
//! missing parts (always the tokenizers; the text encoders and VAE where the file has none) come
//! from a diffusers folder named by the file's `NAME.json` sidecar: `{"components": "FOLDER"}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use atelier_modelkit::t5_tokenizer::T5Tokenizer;
use tch::Kind;

use super::single_file::{self as sf, family_of};
use super::{Denoiser, FlowFamily, FlowModel};
use crate::models::config::{ClipConfig, VaeConfig};
use crate::models::load::{component_weights, read_header, Header, SafetensorsWeights};
use crate::pipeline::load::{file_hash, model_err, read_json};
use crate::pipeline::{PipelineError, Placement, SingleFileConfig};
use crate::schedulers::flow_match::FlowMatchConfig;
use crate::tokenizer::ClipTokenizer;
use crate::torch::clip::ClipTextModel;
use crate::torch::flux::{FluxConfig, FluxTransformer};
use crate::torch::mmdit::{Sd3Config, Sd3Transformer};
use crate::torch::t5::{T5Config, T5Encoder};
use crate::torch::vae::Vae;
use crate::torch::weights::{source, Recorder, Source, Weights};

type PResult<T> = Result<T, PipelineError>;

/// The family of a FLUX / SD 3 diffusers folder or single file, if it is one.
pub fn is_flow_folder(path: &Path) -> Option<FlowFamily> {
    if path.is_file() {
        return read_header(path)
            .ok()
            .and_then(|h| family_of(&h).map(|(f, _)| f));
    }
    let v: serde_json::Value = read_json(&path.join("transformer/config.json")).ok()?;
    match v["_class_name"].as_str()? {
        "FluxTransformer2DModel" => Some(FlowFamily::Flux),
        "SD3Transformer2DModel" => Some(FlowFamily::Sd3),
        _ => None,
    }
}

#[derive(Clone)]
enum DenoiserConfig {
    Flux(FluxConfig),
    Sd3(Sd3Config),
}

/// A component's weights: a source and the prefix of its names there.
type Src = (Arc<dyn Source>, String);

/// Where each component comes from, before the networks are built.
struct Parts {
    family: FlowFamily,
    name: String,
    hashed: Vec<PathBuf>,
    transformer: (Src, DenoiserConfig),
    vae: (Src, VaeConfig),
    /// (weights, config, projected) per CLIP encoder, in pipeline order.
    clip: Vec<(Src, ClipConfig, bool)>,
    t5: Option<(Src, T5Config)>,
    clip_tokenizers: Vec<PathBuf>,
    t5_tokenizer: Option<PathBuf>,
    scheduler: FlowMatchConfig,
    counters: Vec<SafetensorsWeights>,
}

fn open(dir: &Path, counters: &mut Vec<SafetensorsWeights>) -> PResult<Src> {
    let files = component_weights(dir).map_err(|e| model_err(dir, e))?;
    let st = SafetensorsWeights::open(&files).map_err(|e| model_err(dir, e))?;
    counters.push(st.clone());
    Ok((source(st), String::new()))
}

/// The CLIP encoders, T5 and tokenizers of a family, and which folder holds each.
fn names(
    family: FlowFamily,
) -> (
    &'static [(&'static str, &'static str, bool)],
    &'static str,
    &'static str,
) {
    match family {
        FlowFamily::Flux => (
            &[("text_encoder", "tokenizer", false)],
            "text_encoder_2",
            "tokenizer_2",
        ),
        FlowFamily::Sd3 => (
            &[
                ("text_encoder", "tokenizer", true),
                ("text_encoder_2", "tokenizer_2", true),
            ],
            "text_encoder_3",
            "tokenizer_3",
        ),
    }
}

fn folder(dir: &Path, family: FlowFamily) -> PResult<Parts> {
    let mut counters = Vec::new();
    let tpath = dir.join("transformer/config.json");
    let tcfg: serde_json::Value = read_json(&tpath)?;
    let parse = |e: serde_json::Error| model_err(&tpath, e);
    let config = match family {
        FlowFamily::Flux => DenoiserConfig::Flux(serde_json::from_value(tcfg).map_err(parse)?),
        FlowFamily::Sd3 => DenoiserConfig::Sd3(serde_json::from_value(tcfg).map_err(parse)?),
    };
    let hashed = component_weights(&dir.join("transformer")).map_err(|e| model_err(dir, e))?;
    let transformer = (open(&dir.join("transformer"), &mut counters)?, config);
    let vae = (
        open(&dir.join("vae"), &mut counters)?,
        read_json(&dir.join("vae/config.json"))?,
    );
    let (encoders, t5_dir, t5_tok) = names(family);
    let mut clip = Vec::new();
    for (te, _, proj) in encoders {
        clip.push((
            open(&dir.join(te), &mut counters)?,
            read_json(&dir.join(te).join("config.json"))?,
            *proj,
        ));
    }
    let t5 = match dir.join(t5_dir).join("config.json") {
        p if p.exists() => {
            let v: serde_json::Value = read_json(&p)?;
            let cfg = T5Config::from_json(&v).map_err(|e| model_err(&p, e))?;
            Some((open(&dir.join(t5_dir), &mut counters)?, cfg))
        }
        _ => None,
    };
    Ok(Parts {
        family,
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
        hashed,
        transformer,
        vae,
        clip,
        t5_tokenizer: t5.as_ref().map(|_| dir.join(t5_tok)),
        t5,
        clip_tokenizers: encoders.iter().map(|(_, tk, _)| dir.join(tk)).collect(),
        scheduler: scheduler(dir, family, None)?,
        counters,
    })
}

/// The folder's scheduler config, else the family's published one.
fn scheduler(dir: &Path, family: FlowFamily, guidance: Option<bool>) -> PResult<FlowMatchConfig> {
    let p = dir.join("scheduler/scheduler_config.json");
    if p.exists() {
        return FlowMatchConfig::from_value(read_json(&p)?).map_err(|e| model_err(&p, e));
    }
    Ok(match (family, guidance) {
        // FLUX.1-dev: resolution-dependent shift; schnell: none.
        (FlowFamily::Flux, Some(true) | None) => FlowMatchConfig {
            shift: 3.0,
            use_dynamic_shifting: true,
            ..FlowMatchConfig::default()
        },
        (FlowFamily::Flux, Some(false)) => FlowMatchConfig::default(),
        (FlowFamily::Sd3, _) => FlowMatchConfig {
            shift: 3.0,
            ..FlowMatchConfig::default()
        },
    })
}

fn t5_config(h: &Header, p: &str) -> Option<T5Config> {
    let d = |n: &str, i: usize| {
        h.shape_of(&format!("{p}{n}"))
            .and_then(|s| s.get(i).copied())
    };
    let bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight";
    let heads = d(bias, 1)?;
    Some(T5Config {
        vocab_size: d("shared.weight", 0).or_else(|| d("encoder.embed_tokens.weight", 0))?,
        d_model: d("encoder.final_layer_norm.weight", 0)?,
        d_kv: d("encoder.block.0.layer.0.SelfAttention.q.weight", 0)? / heads,
        d_ff: d("encoder.block.0.layer.1.DenseReluDense.wi_0.weight", 0)?,
        num_heads: heads,
        num_layers: (0..)
            .take_while(|i| {
                h.shape_of(&format!(
                    "{p}encoder.block.{i}.layer.0.SelfAttention.q.weight"
                ))
                .is_some()
            })
            .count(),
        buckets: d(bias, 0)?,
        max_distance: 128,
        eps: 1e-6,
    })
}

/// The names of every parameter of a model built by `build`.
fn param_names<T>(
    build: impl FnOnce(&Weights) -> crate::torch::Result<T>,
) -> Result<Vec<String>, String> {
    let rec = Recorder::default();
    build(&rec.weights()).map_err(|e| e.to_string())?;
    Ok(rec.shapes().into_keys().collect())
}

fn single_file(path: &Path) -> PResult<Parts> {
    let err = |e: String| model_err(path, e);
    let h = read_header(path).map_err(|e| model_err(path, e))?;
    let (family, prefix) =
        family_of(&h).ok_or_else(|| err("not a FLUX or SD 3 checkpoint".into()))?;
    let st = SafetensorsWeights::open(&[path.to_path_buf()]).map_err(|e| model_err(path, e))?;
    let components = components_dir(path)?;
    let need = |what: &str| -> PResult<PathBuf> {
        components.clone().ok_or_else(|| {
            err(format!(
                "the file has no {what}: name a diffusers folder of the same family that has it in {} as {{\"components\": \"FOLDER\"}}",
                path.with_extension("json").display()
            ))
        })
    };
    let mut counters = vec![st.clone()];
    let (config, map) = match family {
        FlowFamily::Flux => {
            let mut c = sf::flux_config(&h, prefix).map_err(err)?;
            if let Some(v) = components
                .as_ref()
                .map(|d| d.join("transformer/config.json"))
                .filter(|p| p.exists())
                .map(|p| read_json::<serde_json::Value>(&p))
                .transpose()?
            {
                if let Ok(axes) = serde_json::from_value::<Vec<usize>>(v["axes_dims_rope"].clone())
                {
                    c.axes_dims_rope = axes;
                }
            }
            if c.axes_dims_rope.iter().sum::<usize>() != c.attention_head_dim {
                return Err(err(format!(
                    "heads of {} channels are not FLUX.1's 128, so its RoPE axes are unknown: name a folder with the model's transformer/config.json in {} as {{\"components\": \"FOLDER\"}}",
                    c.attention_head_dim,
                    path.with_extension("json").display()
                )));
            }
            let (c2, dim) = (c.clone(), c.inner_dim());
            let names = param_names(|w| FluxTransformer::new(w, c2)).map_err(err)?;
            (
                DenoiserConfig::Flux(c),
                sf::map(names, prefix, |n| sf::flux_source(n, dim)).map_err(err)?,
            )
        }
        FlowFamily::Sd3 => {
            let c = sf::sd3_config(&h, prefix).map_err(err)?;
            let (c2, last) = (c.clone(), c.num_layers.saturating_sub(1));
            let names = param_names(|w| Sd3Transformer::new(w, c2)).map_err(err)?;
            (
                DenoiserConfig::Sd3(c),
                sf::map(names, prefix, |n| sf::sd3_source(n, last)).map_err(err)?,
            )
        }
    };
    let guidance = matches!(&config, DenoiserConfig::Flux(c) if c.guidance_embeds);
    let transformer = ((source(st.with_map(map)), String::new()), config);
    let vae = match ["vae.", "first_stage_model."]
        .into_iter()
        .find(|p| h.shape_of(&format!("{p}decoder.conv_in.weight")).is_some())
    {
        Some(p) => {
            let (scale, shift) = match family {
                FlowFamily::Flux => (0.3611, 0.1159),
                FlowFamily::Sd3 => (1.5305, 0.0609),
            };
            let cfg = match components
                .as_ref()
                .map(|d| d.join("vae/config.json"))
                .filter(|p| p.exists())
            {
                Some(c) => read_json(&c)?,
                None => vae_config(&h, p, scale, shift),
            };
            let (c2, levels) = (cfg.clone(), cfg.block_out_channels.len());
            let names = param_names(|w| Vae::new(w, c2)).map_err(err)?;
            let map = crate::models::ldm::map_names(names, |n| {
                crate::models::ldm::vae_name(n, levels)
                    .map(|s| crate::models::ldm::Source::Rename(format!("{p}{s}")))
            })
            .map_err(err)?;
            ((source(st.with_map(map)), String::new()), cfg)
        }
        None => {
            let dir = need("VAE")?.join("vae");
            (
                open(&dir, &mut counters)?,
                read_json(&dir.join("config.json"))?,
            )
        }
    };
    let (encoders, t5_dir, t5_tok) = names(family);
    let stored = ["clip_l", "clip_g"];
    let mut clip = Vec::new();
    for (i, (te, _, proj)) in encoders.iter().enumerate() {
        let p = format!("text_encoders.{}.transformer.", stored[i]);
        if h.shape_of(&format!("{p}text_model.embeddings.token_embedding.weight"))
            .is_some()
        {
            let cfg = match components
                .as_ref()
                .map(|d| d.join(te).join("config.json"))
                .filter(|p| p.exists())
            {
                Some(c) => read_json(&c)?,
                None => {
                    SingleFileConfig::standard(crate::pipeline::Family::Sdxl, 4).text[i].clone()
                }
            };
            let prefix = if *proj {
                p.trim_end_matches('.').to_string()
            } else {
                format!("{p}text_model")
            };
            clip.push(((source(st.clone()), prefix), cfg, *proj));
        } else {
            let dir = need("CLIP text encoders")?.join(te);
            clip.push((
                open(&dir, &mut counters)?,
                read_json(&dir.join("config.json"))?,
                *proj,
            ));
        }
    }
    let t5p = "text_encoders.t5xxl.transformer.";
    let t5_json = components
        .as_ref()
        .map(|c| c.join(t5_dir).join("config.json"))
        .filter(|p| p.exists());
    let t5 = match t5_config(&h, t5p) {
        Some(inferred) => {
            // max_distance is not in the weights: the components folder's config says it.
            let cfg = match &t5_json {
                Some(p) => T5Config::from_json(&read_json::<serde_json::Value>(p)?)
                    .map_err(|e| model_err(p, e))?,
                None => inferred,
            };
            Some((
                (source(st.clone()), t5p.trim_end_matches('.').to_string()),
                cfg,
            ))
        }
        None => match components
            .as_ref()
            .map(|c| c.join(t5_dir))
            .filter(|d| d.join("config.json").exists())
        {
            Some(d) => {
                let v: serde_json::Value = read_json(&d.join("config.json"))?;
                Some((
                    open(&d, &mut counters)?,
                    T5Config::from_json(&v).map_err(|e| model_err(&d, e))?,
                ))
            }
            None => None,
        },
    };
    let tokens = need("tokenizers (single files never carry them)")?;
    Ok(Parts {
        family,
        name: path
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into()),
        hashed: vec![path.to_path_buf()],
        transformer,
        vae,
        clip,
        t5_tokenizer: t5.as_ref().map(|_| tokens.join(t5_tok)),
        t5,
        clip_tokenizers: encoders.iter().map(|(_, tk, _)| tokens.join(tk)).collect(),
        scheduler: scheduler(&tokens, family, Some(guidance))?,
        counters,
    })
}

/// A bundled VAE's config from its shapes (LDM names under `p`), with the family's scaling and
/// shift and the usual 32 norm groups.
fn vae_config(h: &Header, p: &str, scale: f64, shift: f64) -> VaeConfig {
    let shape = |n: String| h.shape_of(&format!("{p}{n}"));
    let levels = (0..)
        .take_while(|i| shape(format!("encoder.down.{i}.block.0.conv1.weight")).is_some())
        .count();
    let d = VaeConfig::default();
    VaeConfig {
        latent_channels: shape("decoder.conv_in.weight".into())
            .and_then(|s| s.get(1).copied())
            .unwrap_or(16),
        block_out_channels: (0..levels)
            .filter_map(|i| {
                shape(format!("encoder.down.{i}.block.0.conv1.weight"))
                    .and_then(|s| s.first().copied())
            })
            .collect(),
        layers_per_block: (0..)
            .take_while(|j| shape(format!("encoder.down.0.block.{j}.conv1.weight")).is_some())
            .count()
            .max(1),
        scaling_factor: scale,
        shift_factor: Some(shift),
        use_quant_conv: shape("quant_conv.weight".into()).is_some(),
        use_post_quant_conv: shape("post_quant_conv.weight".into()).is_some(),
        ..d
    }
}

/// The folder the `NAME.json` sidecar names (relative to the file's folder), if any.
fn components_dir(path: &Path) -> PResult<Option<PathBuf>> {
    let side = path.with_extension("json");
    if !side.exists() {
        return Ok(None);
    }
    let v: serde_json::Value = read_json(&side)?;
    let Some(c) = v["components"].as_str() else {
        return Ok(None);
    };
    let dir = path.parent().unwrap_or(Path::new(".")).join(c);
    if !dir.is_dir() {
        return Err(model_err(
            &side,
            format!("components: {} is not a folder", dir.display()),
        ));
    }
    Ok(Some(dir))
}

fn weights((src, prefix): &Src, kind: Kind, placement: Placement) -> Weights {
    let w = Weights::new(src.clone(), kind, placement.device);
    match prefix.is_empty() {
        true => w,
        false => w.pp(prefix),
    }
}

impl FlowModel {
    /// A FLUX or SD 3 diffusers folder or single file: the transformer in `placement.kind` on its
    /// device, the VAE and text encoders in f32 (as the UNet families load them).
    pub fn load(path: &Path, placement: Placement) -> PResult<Self> {
        let family = is_flow_folder(path).ok_or_else(|| {
            model_err(path, "not a FLUX or SD 3 model: a diffusers folder whose transformer/config.json names FluxTransformer2DModel or SD3Transformer2DModel, or a single file with their keys")
        })?;
        let parts = match path.is_file() {
            true => single_file(path)?,
            false => folder(path, family)?,
        };
        assemble(parts, placement)
    }
}

fn assemble(p: Parts, placement: Placement) -> PResult<FlowModel> {
    // FLUX and SD 3.5 were trained in bf16; f16's narrower range overflows their activations,
    // so a GPU placement's f16 becomes bf16 for these families.
    let placement = match placement.kind {
        Kind::Half => Placement {
            kind: Kind::BFloat16,
            ..placement
        },
        _ => placement,
    };
    let at = |what: &str| {
        let label = format!("{}: {what}", p.name);
        move |e: crate::torch::Error| model_err(Path::new(&label), e)
    };
    let tw = weights(&p.transformer.0, placement.kind, placement);
    let denoiser = match p.transformer.1.clone() {
        DenoiserConfig::Flux(c) => {
            Denoiser::Flux(FluxTransformer::new(&tw, c).map_err(at("transformer"))?)
        }
        DenoiserConfig::Sd3(c) => {
            Denoiser::Sd3(Sd3Transformer::new(&tw, c).map_err(at("transformer"))?)
        }
    };
    let vae =
        Vae::new(&weights(&p.vae.0, Kind::Float, placement), p.vae.1.clone()).map_err(at("vae"))?;
    let mut clip = Vec::new();
    for (src, cfg, proj) in &p.clip {
        clip.push(
            ClipTextModel::new(&weights(src, Kind::Float, placement), cfg.clone(), *proj)
                .map_err(at("text encoder"))?,
        );
    }
    let t5 = match &p.t5 {
        Some((src, cfg)) => Some(
            T5Encoder::new(&weights(src, Kind::Float, placement), cfg.clone()).map_err(at("T5"))?,
        ),
        None if p.family == FlowFamily::Flux => {
            return Err(model_err(
                Path::new(&p.name),
                "FLUX needs its T5 encoder: the model has none",
            ))
        }
        None => None,
    };
    let clip_tokenizers = p
        .clip_tokenizers
        .iter()
        .map(|d| ClipTokenizer::from_dir(d).map_err(|e| model_err(d, e)))
        .collect::<PResult<Vec<_>>>()?;
    let t5_tokenizer = match &p.t5_tokenizer {
        Some(d) => Some(T5Tokenizer::from_dir(d).map_err(|e| model_err(d, e))?),
        None => None,
    };
    Ok(FlowModel {
        family: p.family,
        hash: file_hash(&p.hashed)?,
        name: p.name,
        scheduler: p.scheduler,
        denoiser,
        vae,
        clip,
        t5,
        clip_tokenizers,
        t5_tokenizer,
        lora_hashes: Vec::new(),
        weight_bytes: p.counters.iter().map(|c| c.loaded_bytes()).sum(),
    })
}
