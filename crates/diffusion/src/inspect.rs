//! What a model file is, read from headers and configs only (no weights): the family and
//! variant of a checkpoint, the format, rank and base of a LoRA, the size and base of a
//! textual-inversion embedding. The registry listing (`atelier models list`) prints these, so a
//! user sees an SDXL LoRA beside an SD 1.5 checkpoint before a job fails on it.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;

use crate::models::config::ClipConfig;
use crate::models::config::UNetConfig;
use crate::models::load::{read_header, Header};
use crate::pipeline::{single_file_config, Family};
use crate::schedulers::{PredictionType, ScheduleConfig};

/// A checkpoint's architecture.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointInfo {
    pub family: Family,
    /// A 9-channel inpainting UNet.
    pub inpainting: bool,
    pub prediction: PredictionType,
}

/// How a LoRA file names its layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraFormat {
    /// kohya sd-scripts / A1111 (`lora_unet_*`, `lora_te_*`, `.alpha`).
    Kohya,
    /// diffusers / peft (`unet.*`, `text_encoder.*`, `lora_A` / `lora_down`).
    Diffusers,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoraInfo {
    pub format: LoraFormat,
    /// The largest rank of its layers.
    pub rank: usize,
    pub unet_layers: usize,
    pub text_layers: usize,
    /// The family its cross-attention widths belong to (768 → SD 1.x, 1024 → SD 2.x,
    /// 2048 → SDXL); `None` when it adapts no cross-attention key or value.
    pub base: Option<Family>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmbeddingInfo {
    /// Tokens the embedding takes in a prompt.
    pub vectors: usize,
    /// The width of each text encoder's part (SDXL files hold two: CLIP-L and OpenCLIP-G).
    pub dims: Vec<usize>,
    pub base: Option<Family>,
}

/// A diffusers folder or a single-file checkpoint.
pub fn checkpoint(path: &Path) -> Result<CheckpointInfo, String> {
    if path.is_dir() {
        let json = |rel: &str| -> Result<serde_json::Value, String> {
            let p = path.join(rel);
            let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
        };
        let scheduler = path.join("scheduler/scheduler_config.json");
        let schedule = if scheduler.exists() {
            Some(json("scheduler/scheduler_config.json")?)
        } else {
            None
        };
        return checkpoint_from_configs(
            &json("model_index.json")?,
            &json("text_encoder/config.json")?,
            &json("unet/config.json")?,
            schedule.as_ref(),
            path.join("text_encoder_2").exists(),
        )
        .map_err(|e| format!("{}: {e}", path.display()));
    }
    let header = read_header(path).map_err(|e| e.to_string())?;
    let sidecar = std::fs::read_to_string(path.with_extension("json")).ok();
    checkpoint_from_header(path, &header, sidecar.as_deref())
}

/// A diffusers folder from its configs: `model_index.json`, `text_encoder/config.json`,
/// `unet/config.json`, the optional `scheduler/scheduler_config.json`, and whether a second
/// text encoder is there.
pub fn checkpoint_from_configs(
    index: &serde_json::Value,
    text_encoder: &serde_json::Value,
    unet: &serde_json::Value,
    scheduler: Option<&serde_json::Value>,
    text_encoder_2: bool,
) -> Result<CheckpointInfo, String> {
    let sdxl = index["_class_name"]
        .as_str()
        .unwrap_or_default()
        .contains("XL")
        || text_encoder_2;
    let te: ClipConfig = serde_json::from_value(text_encoder.clone())
        .map_err(|e| format!("text_encoder/config.json: {e}"))?;
    let unet: UNetConfig =
        serde_json::from_value(unet.clone()).map_err(|e| format!("unet/config.json: {e}"))?;
    let schedule: ScheduleConfig = match scheduler {
        Some(v) => {
            serde_json::from_value(v.clone()).map_err(|e| format!("scheduler_config.json: {e}"))?
        }
        None => ScheduleConfig::default(),
    };
    Ok(CheckpointInfo {
        family: Family::of_diffusers(sdxl, &te),
        inpainting: unet.in_channels == 9,
        prediction: schedule.prediction_type,
    })
}

/// A single-file checkpoint from its header and the text of its `NAME.json` sidecar, if any;
/// `path` names it in errors.
pub fn checkpoint_from_header(
    path: &Path,
    header: &Header,
    sidecar: Option<&str>,
) -> Result<CheckpointInfo, String> {
    let cfg = single_file_config(path, &header.metadata, |n| header.shape_of(n), sidecar)
        .map_err(|e| e.to_string())?;
    Ok(CheckpointInfo {
        family: cfg.family,
        inpainting: cfg.unet.in_channels == 9,
        prediction: cfg.schedule.prediction_type,
    })
}

fn family_of_width(width: usize) -> Option<Family> {
    match width {
        768 => Some(Family::Sd1),
        1024 => Some(Family::Sd2),
        2048 => Some(Family::Sdxl),
        _ => None,
    }
}

/// A LoRA `.safetensors` file (kohya/A1111 or diffusers/peft names).
pub fn lora(path: &Path) -> Result<LoraInfo, String> {
    let header = read_header(path).map_err(|e| e.to_string())?;
    lora_from_header(&header).map_err(|e| format!("{}: {e}", path.display()))
}

/// A LoRA from its safetensors header.
pub fn lora_from_header(header: &Header) -> Result<LoraInfo, String> {
    let mut format = None;
    let mut rank = 0;
    let mut unet = BTreeSet::new();
    let mut text = BTreeSet::new();
    let mut widths = BTreeSet::new();
    for (name, (shape, _)) in &header.tensors {
        let Some(module) = [".lora_down.weight", ".lora_A.weight", "_lora.down.weight"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
        else {
            continue;
        };
        let (is_unet, kohya) = if module.starts_with("lora_unet_") {
            (true, true)
        } else if module.starts_with("lora_te") {
            (false, true)
        } else if module.starts_with("unet.") {
            (true, false)
        } else if module.starts_with("text_encoder") {
            (false, false)
        } else {
            continue;
        };
        format.get_or_insert(if kohya {
            LoraFormat::Kohya
        } else {
            LoraFormat::Diffusers
        });
        rank = rank.max(shape.first().copied().unwrap_or(0));
        if is_unet {
            unet.insert(module);
            // Cross-attention keys and values read the text encoder's hidden states: their
            // input width says which model the LoRA was trained on.
            let cross = ["attn2_to_k", "attn2_to_v", "attn2.to_k", "attn2.to_v"];
            if cross.iter().any(|c| module.contains(c)) {
                if let Some(w) = shape.get(1) {
                    widths.insert(*w);
                }
            }
        } else {
            text.insert(module);
        }
    }
    let Some(format) = format else {
        return Err(
            "no LoRA layers (expected kohya lora_unet_/lora_te_ or diffusers unet./text_encoder. keys)"
                .into(),
        );
    };
    let base = match widths.iter().next() {
        Some(w) if widths.len() == 1 => family_of_width(*w),
        _ => None,
    };
    Ok(LoraInfo {
        format,
        rank,
        unet_layers: unet.len(),
        text_layers: text.len(),
        base,
    })
}

/// A textual-inversion embedding (`.safetensors` or `.pt`).
pub fn embedding(path: &Path) -> Result<EmbeddingInfo, String> {
    let e = crate::conditioning::Embedding::load(path)?;
    let dims: Vec<usize> = e
        .vectors
        .iter()
        .map(|v| v.dims().last().copied().unwrap_or(0))
        .collect();
    let base = match dims.as_slice() {
        [768, 1280] => Some(Family::Sdxl),
        [w] => family_of_width(*w),
        _ => None,
    };
    Ok(EmbeddingInfo {
        vectors: e.len(),
        dims,
        base,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use std::collections::BTreeMap;

    fn zeros(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, DType::F32, &Device::Cpu).expect("tensor")
    }

    #[test]
    fn kohya_lora_of_sdxl_is_recognised_from_its_header() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.safetensors");
        let k = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k";
        let q = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
        let t = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj";
        let mut m = BTreeMap::new();
        m.insert(format!("{k}.lora_down.weight"), zeros(&[8, 2048]));
        m.insert(format!("{k}.lora_up.weight"), zeros(&[640, 8]));
        m.insert(format!("{k}.alpha"), zeros(&[]));
        m.insert(format!("{q}.lora_down.weight"), zeros(&[4, 640]));
        m.insert(format!("{q}.lora_up.weight"), zeros(&[640, 4]));
        m.insert(format!("{t}.lora_down.weight"), zeros(&[4, 1280]));
        m.insert(format!("{t}.lora_up.weight"), zeros(&[1280, 4]));
        crate::models::load::save(&m, &p).expect("save");
        let info = lora(&p).expect("lora");
        assert_eq!(
            info,
            LoraInfo {
                format: LoraFormat::Kohya,
                rank: 8,
                unet_layers: 2,
                text_layers: 1,
                base: Some(Family::Sdxl),
            }
        );
    }

    #[test]
    fn diffusers_lora_of_sd1_and_a_file_without_layers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("y.safetensors");
        let k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v";
        let mut m = BTreeMap::new();
        m.insert(format!("{k}.lora_A.weight"), zeros(&[16, 768]));
        m.insert(format!("{k}.lora_B.weight"), zeros(&[320, 16]));
        crate::models::load::save(&m, &p).expect("save");
        let info = lora(&p).expect("lora");
        assert_eq!(info.format, LoraFormat::Diffusers);
        assert_eq!((info.rank, info.unet_layers, info.text_layers), (16, 1, 0));
        assert_eq!(info.base, Some(Family::Sd1));

        let other = dir.path().join("z.safetensors");
        let mut m = BTreeMap::new();
        m.insert("model.weight".to_string(), zeros(&[2, 2]));
        crate::models::load::save(&m, &other).expect("save");
        let e = lora(&other).expect_err("not a LoRA");
        assert!(e.contains("no LoRA layers"), "{e}");
        std::fs::write(
            dir.path().join("bad.safetensors"),
            b"\x05\0\0\0\0\0\0\0{oops",
        )
        .expect("write");
        assert!(lora(&dir.path().join("bad.safetensors")).is_err());
    }

    #[test]
    fn checkpoints_in_both_layouts_and_from_bare_ldm_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (family, inpainting) in [(Family::Sd1, true), (Family::Sdxl, false)] {
            let folder = dir.path().join(format!("{family:?}"));
            crate::pipeline::make_tiny_with(&folder, family, 3, inpainting).expect("tiny");
            let single = dir.path().join(format!("{family:?}.safetensors"));
            crate::pipeline::write_single_file(&folder, &single).expect("single file");
            let want = CheckpointInfo {
                family,
                inpainting,
                prediction: PredictionType::Epsilon,
            };
            assert_eq!(checkpoint(&folder).expect("folder"), want);
            assert_eq!(checkpoint(&single).expect("single"), want);
        }
        // A distributed checkpoint: no atelier metadata, the family from its keys, the UNet's
        // input width from its first convolution, v-prediction from a sidecar.
        let p = dir.path().join("sd2-inpaint.safetensors");
        let mut m = BTreeMap::new();
        m.insert(
            "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight".to_string(),
            zeros(&[3, 1]),
        );
        m.insert(
            "model.diffusion_model.input_blocks.0.0.weight".to_string(),
            zeros(&[4, 9, 1, 1]),
        );
        crate::models::load::save(&m, &p).expect("save");
        std::fs::write(
            p.with_extension("json"),
            r#"{"prediction_type": "v_prediction"}"#,
        )
        .expect("sidecar");
        assert_eq!(
            checkpoint(&p).expect("ldm"),
            CheckpointInfo {
                family: Family::Sd2,
                inpainting: true,
                prediction: PredictionType::VPrediction,
            }
        );
        let unknown = dir.path().join("unknown.safetensors");
        let mut m = BTreeMap::new();
        m.insert("model.weight".to_string(), zeros(&[1]));
        crate::models::load::save(&m, &unknown).expect("save");
        let e = checkpoint(&unknown).expect_err("unknown layout");
        assert!(e.contains("unknown checkpoint layout"), "{e}");
    }

    #[test]
    fn embeddings_name_their_base_by_width() {
        let dir = tempfile::tempdir().expect("tempdir");
        let xl = dir.path().join("xl.safetensors");
        let mut m = BTreeMap::new();
        m.insert("clip_l".to_string(), zeros(&[3, 768]));
        m.insert("clip_g".to_string(), zeros(&[3, 1280]));
        crate::models::load::save(&m, &xl).expect("save");
        let info = embedding(&xl).expect("embedding");
        assert_eq!(
            info,
            EmbeddingInfo {
                vectors: 3,
                dims: vec![768, 1280],
                base: Some(Family::Sdxl),
            }
        );
        let sd2 = dir.path().join("sd2.safetensors");
        let mut m = BTreeMap::new();
        m.insert("emb_params".to_string(), zeros(&[2, 1024]));
        crate::models::load::save(&m, &sd2).expect("save");
        assert_eq!(embedding(&sd2).expect("embedding").base, Some(Family::Sd2));
    }
}
