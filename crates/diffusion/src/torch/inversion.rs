//! Textual inversion on libtorch: an embedding's vectors (one [n, D] matrix per text encoder)
//! as the only trainable tensors, spliced into the token embeddings where its name occurs in a
//! caption, so the gradients of the denoising loss flow through the frozen text encoders to
//! them alone. Files in A1111's safetensors layouts (`emb_params`; SDXL `clip_l` + `clip_g`).

use std::collections::HashMap;

use tch::{Kind, Tensor};

use super::clip::ClipTextModel;
use super::weights::{from_candle, to_candle};
use super::{msg, Result};
use crate::conditioning::{chunks_with, framed, Embedding};
use crate::pipeline::{Family, StableDiffusion};

/// An embedding being trained.
pub struct TrainableEmbedding {
    pub name: String,
    /// One [n, D] matrix per text encoder, requiring gradients.
    pub vectors: Vec<Tensor>,
    /// Optimizer steps it has been trained (kept in its file).
    pub step: u32,
}

impl TrainableEmbedding {
    /// `n` vectors per encoder from `init_text`'s token embeddings, as A1111 spreads them: vector
    /// i is the row of token ⌊i·k/n⌋ of the text's first k ≤ n tokens; zeros for an empty text.
    pub fn from_text(
        model: &StableDiffusion,
        name: &str,
        init_text: &str,
        n: usize,
    ) -> Result<Self> {
        let nets = model.torch();
        let mut vectors = Vec::new();
        for (i, te) in nets.text.iter().enumerate() {
            let tok = model
                .tokenizer(i)
                .ok_or_else(|| msg(format!("no tokenizer for text encoder {}", i + 1)))?;
            let ids: Vec<i64> = match init_text.is_empty() {
                true => Vec::new(),
                false => tok
                    .encode(init_text)
                    .map_err(|e| msg(e.to_string()))?
                    .into_iter()
                    .take(n)
                    .map(i64::from)
                    .collect(),
            };
            let d = te.config.hidden_size as i64;
            let dev = te.device();
            let m = if ids.is_empty() {
                Tensor::zeros([n as i64, d], (Kind::Float, dev))
            } else {
                let rows = te.token_rows(&ids);
                let k = ids.len();
                let pick: Vec<i64> = (0..n).map(|i| (i * k / n) as i64).collect();
                rows.index_select(0, &Tensor::from_slice(&pick).to_device(dev))
            };
            vectors.push(m.to_kind(Kind::Float).detach().set_requires_grad(true));
        }
        Ok(Self {
            name: name.to_string(),
            vectors,
            step: 0,
        })
    }

    /// An embedding file (any layout [`Embedding`] reads), checked against `model`'s encoders.
    pub fn from_file(model: &StableDiffusion, name: &str, bytes: &[u8]) -> Result<Self> {
        let e = Embedding::from_safetensors(name, bytes).map_err(msg)?;
        let nets = model.torch();
        if e.vectors.len() != nets.text.len() {
            return Err(msg(format!(
                "embedding {name} has vectors for {} text encoder(s), this model has {}",
                e.vectors.len(),
                nets.text.len()
            )));
        }
        let mut vectors = Vec::new();
        for (v, te) in e.vectors.iter().zip(&nets.text) {
            let t = from_candle(v)?.to_kind(Kind::Float).to_device(te.device());
            let width = t.size().get(1).copied().unwrap_or(0);
            if width != te.config.hidden_size as i64 {
                return Err(msg(format!(
                    "embedding {name} is {width} wide; this model's text encoder is {}",
                    te.config.hidden_size
                )));
            }
            vectors.push(t.detach().set_requires_grad(true));
        }
        let step = safetensors::SafeTensors::read_metadata(bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().as_ref()?.get("step")?.parse().ok())
            .unwrap_or(0);
        Ok(Self {
            name: name.to_string(),
            vectors,
            step,
        })
    }

    /// Rows (tokens) the embedding takes.
    pub fn len(&self) -> usize {
        self.vectors.first().map_or(0, |v| v.size()[0] as usize)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tensors' names in checkpoints: `vectors.<encoder>`.
    pub fn var_names(&self) -> Vec<String> {
        (0..self.vectors.len())
            .map(|i| format!("vectors.{i}"))
            .collect()
    }

    /// The file A1111 and atelier load: `emb_params` (SD 1/2) or `clip_l` + `clip_g` (SDXL), in
    /// f32, with `step` and the base model in its metadata.
    pub fn file(&self, family: Family, step: u32, base: (&str, &str)) -> Result<Vec<u8>> {
        let (base_name, base_hash) = base;
        let keys: &[&str] = match family {
            Family::Sdxl => &["clip_l", "clip_g"],
            _ => &["emb_params"],
        };
        if keys.len() != self.vectors.len() {
            return Err(msg(
                "the embedding does not match the model's text encoders",
            ));
        }
        let mut tensors = HashMap::new();
        for (k, v) in keys.iter().zip(&self.vectors) {
            tensors.insert(k.to_string(), to_candle(&v.detach().to_kind(Kind::Float))?);
        }
        let meta = HashMap::from([
            ("name".to_string(), self.name.clone()),
            ("step".to_string(), step.to_string()),
            ("sd_checkpoint".to_string(), base_hash.to_string()),
            ("sd_checkpoint_name".to_string(), base_name.to_string()),
        ]);
        crate::train::serialize(&tensors, &meta).map_err(msg)
    }
}

/// A caption's conditioning as training sees it (see `train::encode_caption`), with `embedding`'s
/// vectors in place of its name: gradients reach the vectors through every text encoder.
pub fn encode_caption_with(
    model: &StableDiffusion,
    caption: &str,
    embedding: Option<&TrainableEmbedding>,
) -> Result<(Tensor, Option<Tensor>)> {
    let nets = model.torch();
    let sdxl = nets.family == Family::Sdxl;
    // Only the name and row count matter for where the vectors go.
    let placeholder: Vec<Embedding> = embedding
        .map(|e| -> Result<Embedding> {
            let rows = candle_core::Tensor::zeros(
                (e.len(), 1),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )?;
            Ok(Embedding {
                name: e.name.clone(),
                vectors: vec![rows],
            })
        })
        .transpose()?
        .into_iter()
        .collect();
    let mut states = Vec::new();
    let mut pooled = None;
    for (i, te) in nets.text.iter().enumerate() {
        let tok = model
            .tokenizer(i)
            .ok_or_else(|| msg(format!("no tokenizer for text encoder {}", i + 1)))?;
        let first = chunks_with(tok, caption, &placeholder)
            .map_err(msg)?
            .into_iter()
            .next()
            .ok_or_else(|| msg("no tokens"))?;
        let overrides: Vec<(usize, Tensor)> = match embedding {
            None => Vec::new(),
            Some(e) => first
                .vectors
                .iter()
                .enumerate()
                .filter_map(|(p, v)| v.map(|(_, row)| (p + 1, e.vectors[i].get(row as i64))))
                .collect(),
        };
        let (ids, weights) = framed(tok, &first);
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let out = te.forward_with(&Tensor::from_slice(&ids).view([1, -1]), &overrides)?;
        let z = if sdxl {
            ClipTextModel::penultimate(&out)
        } else {
            out.last.shallow_clone()
        };
        states.push(super::train::weighted(&z, &weights));
        if sdxl && i == 1 {
            pooled = Some(out.pooled);
        }
    }
    Ok((Tensor::cat(&states, 2), pooled))
}
