//! The `blip` backend: local BLIP captioning (Salesforce's `BlipForConditionalGeneration`, as
//! Hugging Face saves it: `config.json`, `model.safetensors`, `tokenizer.json`) on
//! candle-transformers, greedy decoding, batched.
//!
//! [`make_tiny`] writes a random-weight model folder of the same layout for tests and the demo
//! (real weights cannot be downloaded here).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::blip;
use serde_json::{json, Value};
use tokenizers::Tokenizer;

/// OpenAI CLIP's normalisation, which BLIP's image processor uses.
const MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// A loaded BLIP captioner.
pub struct Blip {
    model: blip::BlipForConditionalGeneration,
    tokenizer: Tokenizer,
    image_size: usize,
    max_positions: usize,
    bos: u32,
    sep: u32,
    device: Device,
}

/// One generated caption.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub text: String,
    /// `stop` (the model ended it) or `length` (cut at max_tokens).
    pub finish_reason: &'static str,
    pub tokens: u64,
}

fn config_with_defaults(mut v: Value) -> Result<blip::Config, String> {
    let vision_hidden = v["vision_config"]["hidden_size"].as_u64().unwrap_or(768);
    let defaults_text = json!({
        "vocab_size": 30524, "hidden_size": 768, "encoder_hidden_size": vision_hidden,
        "intermediate_size": 3072, "projection_dim": 768, "num_hidden_layers": 12,
        "num_attention_heads": 12, "max_position_embeddings": 512, "hidden_act": "gelu",
        "layer_norm_eps": 1e-12, "is_decoder": true
    });
    let defaults_vision = json!({
        "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512,
        "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 384,
        "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-5
    });
    for (section, defaults) in [
        ("text_config", defaults_text),
        ("vision_config", defaults_vision),
    ] {
        if !v[section].is_object() {
            v[section] = json!({});
        }
        if let (Some(obj), Some(d)) = (v[section].as_object_mut(), defaults.as_object()) {
            for (k, dv) in d {
                obj.entry(k.clone()).or_insert(dv.clone());
            }
        }
    }
    for (k, d) in [("projection_dim", 512), ("image_text_hidden_size", 256)] {
        if v.get(k).is_none() {
            v[k] = json!(d);
        }
    }
    serde_json::from_value(v).map_err(|e| format!("config.json is not a BLIP config: {e}"))
}

impl Blip {
    /// Load a model folder (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, String> {
        let at = |f: &str| dir.join(f);
        let read = |f: &str| {
            std::fs::read_to_string(at(f)).map_err(|e| format!("{}: {e}", at(f).display()))
        };
        let raw: Value = serde_json::from_str(&read("config.json")?)
            .map_err(|e| format!("{}: {e}", at("config.json").display()))?;
        let bos = raw["text_config"]["bos_token_id"].as_u64();
        let sep = raw["text_config"]["sep_token_id"].as_u64();
        let cfg = config_with_defaults(raw)?;
        let tokenizer = Tokenizer::from_file(at("tokenizer.json"))
            .map_err(|e| format!("{}: {e}", at("tokenizer.json").display()))?;
        let id = |t: &str| tokenizer.token_to_id(t);
        let bos = bos
            .map(|b| b as u32)
            .or_else(|| id("[DEC]"))
            .ok_or("no bos_token_id in config.json and no [DEC] token in tokenizer.json")?;
        let sep = sep
            .map(|s| s as u32)
            .or_else(|| id("[SEP]"))
            .ok_or("no sep_token_id in config.json and no [SEP] token in tokenizer.json")?;
        let weights = at("model.safetensors");
        // SAFETY: the file is memory-mapped read-only; nothing here writes to it.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| format!("{}: {e}", weights.display()))?;
        let model = blip::BlipForConditionalGeneration::new(&cfg, vb)
            .map_err(|e| format!("{}: not a BLIP captioning model: {e}", weights.display()))?;
        Ok(Self {
            model,
            tokenizer,
            image_size: cfg.vision_config.image_size,
            max_positions: cfg.text_config.max_position_embeddings,
            bos,
            sep,
            device: device.clone(),
        })
    }

    /// [B, 3, S, S] normalised pixels.
    fn pixels(&self, images: &[image::DynamicImage]) -> candle_core::Result<Tensor> {
        let s = self.image_size as u32;
        let mut all = Vec::with_capacity(images.len() * 3 * (s * s) as usize);
        for img in images {
            let rgb = image::imageops::resize(
                &img.to_rgb8(),
                s,
                s,
                image::imageops::FilterType::CatmullRom,
            );
            for c in 0..3 {
                all.extend(
                    rgb.pixels()
                        .map(|p| (p.0[c] as f32 / 255.0 - MEAN[c]) / STD[c]),
                );
            }
        }
        Tensor::from_vec(all, (images.len(), 3, s as usize, s as usize), &self.device)
    }

    /// Caption `images` together, greedily, each continuing `prompt` (empty: unconditional) for
    /// at most `max_tokens` tokens. The same image gives the same caption alone or in a batch.
    /// Pixels are resized to the model's square input with bicubic filtering, as BLIP's processor.
    pub fn caption(
        &mut self,
        images: &[image::DynamicImage],
        prompt: &str,
        max_tokens: usize,
    ) -> Result<Vec<Generated>, String> {
        let e = |err: candle_core::Error| err.to_string();
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let b = images.len();
        let mut start = vec![self.bos];
        if !prompt.trim().is_empty() {
            let enc = self
                .tokenizer
                .encode(prompt.trim(), false)
                .map_err(|err| format!("tokenizing the prompt: {err}"))?;
            start.extend(enc.get_ids());
        }
        let budget = self.max_positions.saturating_sub(start.len());
        let max_tokens = max_tokens.min(budget);
        // The vision encoder (most of BLIP's work) runs on the whole batch; candle's text decoder
        // takes one sequence at a time, so each caption is decoded on its own image states.
        let pixels = self.pixels(images).map_err(e)?;
        let embeds = self.model.vision_model().forward(&pixels).map_err(e)?;
        let mut out: Vec<Vec<u32>> = Vec::with_capacity(b);
        let mut done = Vec::with_capacity(b);
        for i in 0..b {
            let states = embeds.narrow(0, i, 1).map_err(e)?;
            self.model.reset_kv_cache();
            let mut ids: Vec<u32> = Vec::new();
            let mut input = start.clone();
            let mut finished = false;
            for _ in 0..max_tokens {
                let t = Tensor::new(input.as_slice(), &self.device)
                    .and_then(|t| t.unsqueeze(0))
                    .map_err(e)?;
                let logits = self.model.text_decoder().forward(&t, &states).map_err(e)?;
                let last = logits.i((0, input.len() - 1)).map_err(e)?;
                let next = last
                    .argmax(candle_core::D::Minus1)
                    .and_then(|t| t.to_scalar::<u32>())
                    .map_err(e)?;
                if next == self.sep {
                    finished = true;
                    break;
                }
                ids.push(next);
                input = vec![next];
            }
            out.push(ids);
            done.push(finished);
        }
        self.model.reset_kv_cache();
        let mut result = Vec::with_capacity(b);
        for (ids, finished) in out.into_iter().zip(done) {
            let text = self
                .tokenizer
                .decode(&ids, true)
                .map_err(|err| format!("decoding: {err}"))?;
            let text = if prompt.trim().is_empty() {
                text
            } else {
                format!("{} {}", prompt.trim(), text).trim().to_string()
            };
            result.push(Generated {
                text: text.trim().to_string(),
                finish_reason: if finished { "stop" } else { "length" },
                tokens: ids.len() as u64,
            });
        }
        Ok(result)
    }
}

/// Write a tiny random-weight BLIP folder (HF layout) with a small WordPiece vocabulary.
pub fn make_tiny(dir: &Path, seed: u64) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "[DEC]",
        "a",
        "an",
        "the",
        "red",
        "blue",
        "green",
        "yellow",
        "circle",
        "square",
        "triangle",
        "on",
        "with",
        "and",
        "of",
        "picture",
        "photo",
        "background",
        "white",
        "black",
        "small",
        "large",
        ".",
        ",",
    ];
    let vocab_txt = dir.join("vocab.txt");
    std::fs::write(&vocab_txt, words.join("\n") + "\n").map_err(|e| e.to_string())?;
    let wp = tokenizers::models::wordpiece::WordPiece::from_file(&vocab_txt.to_string_lossy())
        .unk_token("[UNK]".into())
        .build()
        .map_err(|e| e.to_string())?;
    let mut tok = Tokenizer::new(wp);
    tok.with_normalizer(Some(
        tokenizers::normalizers::bert::BertNormalizer::default(),
    ))
    .map_err(|e| e.to_string())?;
    tok.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::bert::BertPreTokenizer));
    tok.with_decoder(Some(tokenizers::decoders::wordpiece::WordPiece::default()));
    tok.save(dir.join("tokenizer.json"), false)
        .map_err(|e| e.to_string())?;
    let config = json!({
        "architectures": ["BlipForConditionalGeneration"],
        "model_type": "blip",
        "projection_dim": 32,
        "image_text_hidden_size": 32,
        "text_config": {
            "vocab_size": words.len(), "hidden_size": 32, "encoder_hidden_size": 32,
            "intermediate_size": 37, "projection_dim": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 64, "hidden_act": "gelu",
            "layer_norm_eps": 1e-12, "is_decoder": true, "bos_token_id": 5, "sep_token_id": 3,
            "pad_token_id": 0
        },
        "vision_config": {
            "hidden_size": 32, "intermediate_size": 37, "projection_dim": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 32, "patch_size": 8,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5
        }
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let cfg = config_with_defaults(config)?;
    let weights = atelier_modelkit::shapes::RandomWeights::new(seed);
    blip::BlipForConditionalGeneration::new(&cfg, weights.var_builder(&Device::Cpu))
        .map_err(|e| e.to_string())?;
    let tensors: HashMap<String, Tensor> = weights.tensors().into_iter().collect();
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors"))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scene(seed: u64) -> image::DynamicImage {
        let bytes = atelier_ingest_free_scene(seed);
        image::DynamicImage::ImageRgb8(bytes)
    }

    fn atelier_ingest_free_scene(seed: u64) -> image::RgbImage {
        image::RgbImage::from_fn(48, 40, |x, y| {
            image::Rgb([
                ((x * 5 + seed as u32 * 40) % 256) as u8,
                ((y * 7 + seed as u32 * 90) % 256) as u8,
                ((x + y) * 3 % 256) as u8,
            ])
        })
    }

    #[test]
    fn tiny_model_loads_and_captions_batched_as_alone() {
        let dir = tempfile::tempdir().unwrap();
        make_tiny(dir.path(), 3).unwrap();
        let mut m = Blip::load(dir.path(), &Device::Cpu).unwrap();
        let imgs: Vec<_> = (0..3).map(scene).collect();
        let batch = m.caption(&imgs, "", 12).unwrap();
        assert_eq!(batch.len(), 3);
        for (i, img) in imgs.iter().enumerate() {
            let alone = m.caption(std::slice::from_ref(img), "", 12).unwrap();
            assert_eq!(
                alone[0], batch[i],
                "image {i} captioned differently in a batch"
            );
            assert!(batch[i].tokens <= 12);
        }
        // A prompt is continued, and kept at the front.
        let p = m.caption(&imgs[..1], "a picture of", 5).unwrap();
        assert!(p[0].text.starts_with("a picture of"), "{:?}", p[0]);
        // Random weights still give deterministic output.
        assert_eq!(m.caption(&imgs, "", 12).unwrap(), batch);
    }

    #[test]
    fn a_folder_that_is_not_blip_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let e = Blip::load(dir.path(), &Device::Cpu).err().unwrap();
        assert!(e.contains("config.json"), "{e}");
        make_tiny(dir.path(), 1).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), b"not weights").unwrap();
        let e = Blip::load(dir.path(), &Device::Cpu).err().unwrap();
        assert!(e.contains("model.safetensors"), "{e}");
    }
}
