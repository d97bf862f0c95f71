//! CLIP image and text embeddings from a Hugging Face `CLIPModel` folder (`config.json`,
//! `model.safetensors`, `vocab.json` + `merges.txt`) on candle-transformers' CLIP, and the CLIP
//! score of an image and a caption: 100 · max(cos, 0), as torchmetrics' `CLIPScore` defines it.
//!
//! Images are resized (shorter side to the model's input, bicubic), centre-cropped and
//! normalised as CLIP's processor does; texts are CLIP-BPE tokenised, cut to 77 tokens with the
//! end token kept. [`make_tiny`] writes a random-weight folder of the same layout for tests.

use std::path::{Path, PathBuf};

use atelier_modelkit::tokenizer::ClipTokenizer;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::clip::{
    text_model::{Activation, ClipTextConfig},
    vision_model::ClipVisionConfig,
    ClipConfig, ClipModel,
};
use serde_json::{json, Value};

use crate::EmbedError;

const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];
/// CLIP's context length.
pub const CONTEXT: usize = 77;

/// The CLIP model folder for CLIP scores: `ATELIER_CLIP_MODEL` when it names a folder with a
/// `config.json`.
pub fn find_clip() -> Option<PathBuf> {
    let p = PathBuf::from(std::env::var_os("ATELIER_CLIP_MODEL")?);
    p.join("config.json").is_file().then_some(p)
}

/// A loaded CLIP.
pub struct ClipEncoder {
    model: ClipModel,
    tokenizer: ClipTokenizer,
    image_size: usize,
    device: Device,
}

fn load_err(path: &Path, message: impl std::fmt::Display) -> EmbedError {
    EmbedError::Load {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// candle's CLIP config from a Hugging Face `CLIPModel` config.json.
fn config(v: &Value, path: &Path) -> Result<ClipConfig, EmbedError> {
    let t = &v["text_config"];
    let i = &v["vision_config"];
    let num = |section: &Value, k: &str, d: u64| section[k].as_u64().unwrap_or(d) as usize;
    for (section, name) in [(t, "text_config"), (i, "vision_config")] {
        let act = section["hidden_act"].as_str().unwrap_or("quick_gelu");
        if act != "quick_gelu" {
            return Err(load_err(
                path,
                format!(
                    "{name}.hidden_act {act:?}: only quick_gelu CLIPs (OpenAI's) are supported"
                ),
            ));
        }
    }
    let projection = num(v, "projection_dim", 512);
    let image_size = num(i, "image_size", 224);
    Ok(ClipConfig {
        text_config: ClipTextConfig {
            vocab_size: num(t, "vocab_size", 49408),
            embed_dim: num(t, "hidden_size", 512),
            activation: Activation::QuickGelu,
            intermediate_size: num(t, "intermediate_size", 2048),
            max_position_embeddings: num(t, "max_position_embeddings", CONTEXT as u64),
            pad_with: None,
            num_hidden_layers: num(t, "num_hidden_layers", 12),
            num_attention_heads: num(t, "num_attention_heads", 8),
            projection_dim: projection,
        },
        vision_config: ClipVisionConfig {
            embed_dim: num(i, "hidden_size", 768),
            activation: Activation::QuickGelu,
            intermediate_size: num(i, "intermediate_size", 3072),
            num_hidden_layers: num(i, "num_hidden_layers", 12),
            num_attention_heads: num(i, "num_attention_heads", 12),
            projection_dim: projection,
            num_channels: num(i, "num_channels", 3),
            image_size,
            patch_size: num(i, "patch_size", 32),
        },
        logit_scale_init_value: v["logit_scale_init_value"].as_f64().unwrap_or(2.6592) as f32,
        image_size,
    })
}

fn l2(v: &Tensor) -> candle_core::Result<Vec<Vec<f32>>> {
    candle_transformers::models::clip::div_l2_norm(v)?.to_vec2::<f32>()
}

impl ClipEncoder {
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EmbedError> {
        let cfg_path = dir.join("config.json");
        let raw: Value = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path).map_err(|e| load_err(&cfg_path, e))?,
        )
        .map_err(|e| load_err(&cfg_path, e))?;
        let cfg = config(&raw, &cfg_path)?;
        let tokenizer = ClipTokenizer::from_dir(dir).map_err(|e| load_err(dir, e))?;
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is memory-mapped read-only; nothing here writes to it.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| load_err(&weights, e))?;
        let model = ClipModel::new(vb, &cfg)
            .map_err(|e| load_err(&weights, format!("not a CLIP model: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            image_size: cfg.image_size,
            device: device.clone(),
        })
    }

    /// L2-normalised image embeddings, one per image.
    pub fn embed_images(
        &self,
        images: &[image::DynamicImage],
    ) -> Result<Vec<Vec<f32>>, EmbedError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let s = self.image_size as u32;
        let mut data = Vec::with_capacity(images.len() * 3 * (s * s) as usize);
        for img in images {
            let (w, h) = (img.width().max(1), img.height().max(1));
            let scale = s as f64 / w.min(h) as f64;
            let (rw, rh) = (
                ((w as f64 * scale).round() as u32).max(s),
                ((h as f64 * scale).round() as u32).max(s),
            );
            let resized = image::imageops::resize(
                &img.to_rgb8(),
                rw,
                rh,
                image::imageops::FilterType::CatmullRom,
            );
            let crop =
                image::imageops::crop_imm(&resized, (rw - s) / 2, (rh - s) / 2, s, s).to_image();
            for c in 0..3 {
                data.extend(
                    crop.pixels()
                        .map(|p| (p.0[c] as f32 / 255.0 - MEAN[c]) / STD[c]),
                );
            }
        }
        let pixels = Tensor::from_vec(
            data,
            (images.len(), 3, s as usize, s as usize),
            &self.device,
        )?;
        Ok(l2(&self.model.get_image_features(&pixels)?)?)
    }

    /// L2-normalised text embeddings, one per text (cut to 77 tokens, the end token kept).
    pub fn embed_texts(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let t = &self.tokenizer;
        let mut ids = Vec::with_capacity(texts.len() * CONTEXT);
        for text in texts {
            let mut toks = t
                .encode(text)
                .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
            toks.truncate(CONTEXT - 2);
            let mut row = Vec::with_capacity(CONTEXT);
            row.push(t.bos);
            row.extend(toks);
            row.push(t.eos);
            row.resize(CONTEXT, t.pad);
            ids.extend(row);
        }
        let ids = Tensor::from_vec(ids, (texts.len(), CONTEXT), &self.device)?;
        Ok(l2(&self.model.get_text_features(&ids)?)?)
    }

    /// CLIP scores (100 · max(cos, 0)) of image i with text i.
    pub fn scores(
        &self,
        images: &[image::DynamicImage],
        texts: &[&str],
    ) -> Result<Vec<f32>, EmbedError> {
        let a = self.embed_images(images)?;
        let b = self.embed_texts(texts)?;
        Ok(a.iter()
            .zip(&b)
            .map(|(x, y)| 100.0 * crate::cosine(x, y).max(0.0))
            .collect())
    }
}

/// Write a tiny random-weight CLIP folder (Hugging Face layout, a small real BPE vocabulary).
pub fn make_tiny(dir: &Path, seed: u64) -> Result<(), EmbedError> {
    let io = |e: std::io::Error| load_err(dir, e);
    std::fs::create_dir_all(dir).map_err(io)?;
    let vocab = atelier_modelkit::tokenizer::write_tiny_vocab(
        dir,
        &[
            ("r", "e"),
            ("re", "d</w>"),
            ("b", "l"),
            ("bl", "u"),
            ("blu", "e</w>"),
        ],
    )
    .map_err(io)?;
    let v = json!({
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": 16,
        "logit_scale_init_value": 2.6592,
        "text_config": {"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 37,
            "max_position_embeddings": CONTEXT, "num_hidden_layers": 2, "num_attention_heads": 4,
            "hidden_act": "quick_gelu"},
        "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
            "num_attention_heads": 4, "image_size": 32, "patch_size": 8, "hidden_act": "quick_gelu"}
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&v).map_err(|e| load_err(dir, e))?,
    )
    .map_err(io)?;
    let cfg = config(&v, dir)?;
    let weights = atelier_modelkit::shapes::RandomWeights::new(seed);
    ClipModel::new(weights.var_builder(&Device::Cpu), &cfg)?;
    let tensors: std::collections::HashMap<String, Tensor> =
        weights.tensors().into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(c: [u8; 3], w: u32, h: u32) -> image::DynamicImage {
        image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([c[0] ^ (x as u8), c[1] ^ (y as u8), c[2]])
        }))
    }

    #[test]
    fn tiny_clip_embeds_and_scores_deterministically() {
        let dir = tempfile::tempdir().unwrap();
        make_tiny(dir.path(), 1).unwrap();
        let clip = ClipEncoder::load(dir.path(), &Device::Cpu).unwrap();
        let images = vec![img([200, 10, 10], 64, 48), img([10, 10, 200], 40, 90)];
        let a = clip.embed_images(&images).unwrap();
        assert_eq!(a.len(), 2);
        for v in &a {
            assert_eq!(v.len(), 16);
            let n: f32 = v.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4, "not normalised: {n}");
        }
        // Batched equals one at a time; texts likewise.
        let one = clip.embed_images(&images[1..]).unwrap();
        assert!(a[1].iter().zip(&one[0]).all(|(x, y)| (x - y).abs() < 1e-5));
        let t = clip.embed_texts(&["red", "a blue thing"]).unwrap();
        let t1 = clip.embed_texts(&["a blue thing"]).unwrap();
        assert!(t[1].iter().zip(&t1[0]).all(|(x, y)| (x - y).abs() < 1e-5));
        assert!(t[0] != t[1], "different texts embed differently");
        let s = clip.scores(&images, &["red", "blue"]).unwrap();
        assert!(s.iter().all(|x| (0.0..=100.0).contains(x)));
        assert_eq!(s, clip.scores(&images, &["red", "blue"]).unwrap());
        // Long captions are cut, not refused.
        let long = "red ".repeat(200);
        assert_eq!(clip.embed_texts(&[long.as_str()]).unwrap().len(), 1);
    }

    #[test]
    fn non_clip_folders_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ClipEncoder::load(dir.path(), &Device::Cpu).is_err());
        make_tiny(dir.path(), 2).unwrap();
        let mut v: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
                .unwrap();
        v["vision_config"]["hidden_act"] = json!("gelu");
        std::fs::write(dir.path().join("config.json"), v.to_string()).unwrap();
        let e = ClipEncoder::load(dir.path(), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("quick_gelu"), "{e}");
    }
}
