//! Loading FLUX and SD 3 diffusers folders: `model_index.json`, `transformer/`, `vae/`,
//! `text_encoder*/`, `tokenizer*/`, `scheduler/`.

use std::path::{Path, PathBuf};

use atelier_modelkit::t5_tokenizer::T5Tokenizer;
use tch::Kind;

use super::{Denoiser, FlowFamily, FlowModel};
use crate::models::config::{ClipConfig, VaeConfig};
use crate::models::load::{component_weights, SafetensorsWeights};
use crate::pipeline::load::{file_hash, model_err, read_json};
use crate::pipeline::{PipelineError, Placement};
use crate::schedulers::flow_match::FlowMatchConfig;
use crate::tokenizer::ClipTokenizer;
use crate::torch::clip::ClipTextModel;
use crate::torch::flux::{FluxConfig, FluxTransformer};
use crate::torch::mmdit::{Sd3Config, Sd3Transformer};
use crate::torch::t5::T5Encoder;
use crate::torch::vae::Vae;
use crate::torch::weights::Weights;

type PResult<T> = Result<T, PipelineError>;

/// The family of a diffusers folder whose denoiser is a transformer, if it is one.
pub fn is_flow_folder(dir: &Path) -> Option<FlowFamily> {
    let v: serde_json::Value = read_json(&dir.join("transformer/config.json")).ok()?;
    match v["_class_name"].as_str()? {
        "FluxTransformer2DModel" => Some(FlowFamily::Flux),
        "SD3Transformer2DModel" => Some(FlowFamily::Sd3),
        _ => None,
    }
}

fn weights(
    dir: &Path,
    component: &str,
    kind: Kind,
    placement: Placement,
) -> PResult<(Weights, SafetensorsWeights, Vec<PathBuf>)> {
    let d = dir.join(component);
    let files = component_weights(&d).map_err(|e| model_err(&d, e))?;
    let st = SafetensorsWeights::open(&files).map_err(|e| model_err(&d, e))?;
    Ok((
        Weights::from_backend(st.clone(), kind, placement.device),
        st,
        files,
    ))
}

fn at<'a>(dir: &'a Path, what: &str) -> impl Fn(crate::torch::Error) -> PipelineError + 'a {
    let what = what.to_string();
    move |e| model_err(&dir.join(&what), e)
}

impl FlowModel {
    /// A FLUX or SD 3 diffusers folder: the transformer in `placement.kind` on its device, the
    /// VAE and text encoders in f32 (as the UNet families load them).
    pub fn load(dir: &Path, placement: Placement) -> PResult<Self> {
        let family = is_flow_folder(dir).ok_or_else(|| {
            model_err(dir, "not a FLUX or SD 3 diffusers folder: transformer/config.json names neither FluxTransformer2DModel nor SD3Transformer2DModel")
        })?;
        let mut bytes = Vec::new();
        let (tw, tst, files) = weights(dir, "transformer", placement.kind, placement)?;
        bytes.push(tst);
        let tcfg: serde_json::Value = read_json(&dir.join("transformer/config.json"))?;
        let parse = |e: serde_json::Error| model_err(&dir.join("transformer/config.json"), e);
        let denoiser = match family {
            FlowFamily::Flux => Denoiser::Flux(
                FluxTransformer::new(
                    &tw,
                    serde_json::from_value::<FluxConfig>(tcfg).map_err(parse)?,
                )
                .map_err(at(dir, "transformer"))?,
            ),
            FlowFamily::Sd3 => Denoiser::Sd3(
                Sd3Transformer::new(
                    &tw,
                    serde_json::from_value::<Sd3Config>(tcfg).map_err(parse)?,
                )
                .map_err(at(dir, "transformer"))?,
            ),
        };
        let (vw, vst, _) = weights(dir, "vae", Kind::Float, placement)?;
        bytes.push(vst);
        let vcfg: VaeConfig = read_json(&dir.join("vae/config.json"))?;
        let vae = Vae::new(&vw, vcfg).map_err(at(dir, "vae"))?;
        let encoders: &[(&str, &str, bool)] = match family {
            FlowFamily::Flux => &[("text_encoder", "tokenizer", false)],
            FlowFamily::Sd3 => &[
                ("text_encoder", "tokenizer", true),
                ("text_encoder_2", "tokenizer_2", true),
            ],
        };
        let (mut clip, mut clip_tokenizers) = (Vec::new(), Vec::new());
        for (te, tk, proj) in encoders {
            let (w, st, _) = weights(dir, te, Kind::Float, placement)?;
            bytes.push(st);
            let cfg: ClipConfig = read_json(&dir.join(te).join("config.json"))?;
            clip.push(ClipTextModel::new(&w, cfg, *proj).map_err(at(dir, te))?);
            let tdir = dir.join(tk);
            clip_tokenizers.push(ClipTokenizer::from_dir(&tdir).map_err(|e| model_err(&tdir, e))?);
        }
        let (t5_dir, t5_tok) = match family {
            FlowFamily::Flux => ("text_encoder_2", "tokenizer_2"),
            FlowFamily::Sd3 => ("text_encoder_3", "tokenizer_3"),
        };
        let (t5, t5_tokenizer) = if dir.join(t5_dir).join("config.json").exists() {
            let enc =
                T5Encoder::load(&dir.join(t5_dir), placement.device).map_err(at(dir, t5_dir))?;
            let tdir = dir.join(t5_tok);
            (
                Some(enc),
                Some(T5Tokenizer::from_dir(&tdir).map_err(|e| model_err(&tdir, e))?),
            )
        } else if family == FlowFamily::Flux {
            return Err(model_err(
                dir,
                format!("FLUX needs its T5 encoder: {t5_dir}/ is missing"),
            ));
        } else {
            (None, None)
        };
        let sp = dir.join("scheduler/scheduler_config.json");
        let scheduler = match sp.exists() {
            true => FlowMatchConfig::from_value(read_json(&sp)?).map_err(|e| model_err(&sp, e))?,
            false => FlowMatchConfig::default(),
        };
        Ok(Self {
            family,
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into()),
            hash: file_hash(&files)?,
            scheduler,
            denoiser,
            vae,
            clip,
            t5,
            clip_tokenizers,
            t5_tokenizer,
            lora_hashes: Vec::new(),
            weight_bytes: bytes.iter().map(|b| b.loaded_bytes()).sum(),
        })
    }
}
