//! The CLIP text transformer (transformers' `CLIPTextModel`, and `CLIPTextModelWithProjection`
//! for SDXL's second encoder) on libtorch.

use tch::{Kind, Tensor};

pub use crate::models::config::{Activation, ClipConfig};

use super::nn::{attention, LayerNorm, Linear};
use super::weights::Weights;
use super::{msg, Result};

#[derive(Debug, Clone)]
struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Layer {
    fn new(w: &Weights, c: &ClipConfig) -> Result<Self> {
        let (d, eps) = (c.hidden_size, c.layer_norm_eps);
        Ok(Self {
            ln1: LayerNorm::new(&w.pp("layer_norm1"), d, eps)?,
            q: Linear::new(&w.pp("self_attn.q_proj"), d, d, true)?,
            k: Linear::new(&w.pp("self_attn.k_proj"), d, d, true)?,
            v: Linear::new(&w.pp("self_attn.v_proj"), d, d, true)?,
            out: Linear::new(&w.pp("self_attn.out_proj"), d, d, true)?,
            ln2: LayerNorm::new(&w.pp("layer_norm2"), d, eps)?,
            fc1: Linear::new(&w.pp("mlp.fc1"), d, c.intermediate_size, true)?,
            fc2: Linear::new(&w.pp("mlp.fc2"), c.intermediate_size, d, true)?,
        })
    }

    fn forward(&self, x: &Tensor, heads: usize, act: Activation) -> Tensor {
        let h = self.ln1.forward(x);
        let a = attention(
            &self.q.forward(&h),
            &self.k.forward(&h),
            &self.v.forward(&h),
            heads,
            true,
        );
        let x = self.out.forward(&a) + x;
        let h = self.fc1.forward(&self.ln2.forward(&x));
        let h = match act {
            Activation::QuickGelu => &h * (&h * 1.702).sigmoid(),
            Activation::Gelu => h.gelu("none"),
        };
        self.fc2.forward(&h) + x
    }
}

/// Every layer's output, the final normed states and the pooled (projected) embedding.
pub struct ClipOutput {
    pub last: Tensor,
    /// The embeddings, then each layer's output.
    pub hidden: Vec<Tensor>,
    pub pooled: Tensor,
}

/// The text transformer.
#[derive(Debug)]
pub struct ClipTextModel {
    pub config: ClipConfig,
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    projection: Option<Linear>,
}

impl Clone for ClipTextModel {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            token_embedding: self.token_embedding.shallow_clone(),
            position_embedding: self.position_embedding.shallow_clone(),
            layers: self.layers.clone(),
            final_ln: self.final_ln.clone(),
            projection: self.projection.clone(),
        }
    }
}

impl ClipTextModel {
    pub fn new(w: &Weights, config: ClipConfig, with_projection: bool) -> Result<Self> {
        let d = config.hidden_size;
        let tm = if with_projection {
            w.pp("text_model")
        } else {
            w.clone()
        };
        let emb = tm.pp("embeddings");
        Ok(Self {
            token_embedding: emb
                .pp("token_embedding")
                .get(&[config.vocab_size, d], "weight")?,
            position_embedding: emb
                .pp("position_embedding")
                .get(&[config.max_position_embeddings, d], "weight")?,
            layers: (0..config.num_hidden_layers)
                .map(|i| Layer::new(&tm.pp(format!("encoder.layers.{i}")), &config))
                .collect::<Result<_>>()?,
            final_ln: LayerNorm::new(&tm.pp("final_layer_norm"), d, config.layer_norm_eps)?,
            projection: with_projection
                .then(|| Linear::new(&w.pp("text_projection"), d, config.projection_dim, false))
                .transpose()?,
            config,
        })
    }

    /// The device its weights are on.
    pub fn device(&self) -> tch::Device {
        self.token_embedding.device()
    }

    /// Rows of the token-embedding table for `ids` [n, D] (no gradient).
    pub fn token_rows(&self, ids: &[i64]) -> Tensor {
        let idx = Tensor::from_slice(ids).to_device(self.token_embedding.device());
        self.token_embedding.index_select(0, &idx).detach()
    }

    /// Encode token ids [B, T] (any integer kind).
    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput> {
        self.forward_with(ids, &[])
    }

    /// [`ClipTextModel::forward`] with some token embeddings replaced (textual inversion):
    /// `(position, vector [D])` for sequence 0 of the batch.
    pub fn forward_with(&self, ids: &Tensor, overrides: &[(usize, Tensor)]) -> Result<ClipOutput> {
        let ids = ids
            .to_kind(Kind::Int64)
            .to_device(self.token_embedding.device());
        let (b, t) = match ids.size()[..] {
            [b, t] => (b, t),
            ref s => {
                return Err(msg(format!(
                    "token ids of shape {s:?}, expected [batch, tokens]"
                )))
            }
        };
        if b == 0 || t == 0 {
            return Err(msg("no token ids to encode"));
        }
        if t as usize > self.config.max_position_embeddings {
            return Err(msg(format!(
                "{t} tokens; this text encoder takes at most {}",
                self.config.max_position_embeddings
            )));
        }
        let vocab = self.config.vocab_size as i64;
        let (lo, hi) = (ids.min().int64_value(&[]), ids.max().int64_value(&[]));
        if lo < 0 || hi >= vocab {
            return Err(msg(format!(
                "token id {} outside this text encoder's vocabulary of {vocab}",
                if lo < 0 { lo } else { hi }
            )));
        }
        let mut tok = Tensor::embedding(&self.token_embedding, &ids, -1, false, false);
        if !overrides.is_empty() {
            let d = tok.size()[2];
            let rows: Vec<Tensor> = (0..t)
                .map(|i| match overrides.iter().find(|(p, _)| *p as i64 == i) {
                    Some((_, v)) => v.to_kind(tok.kind()).to_device(tok.device()).view([d]),
                    None => tok.get(0).get(i),
                })
                .collect();
            let first = Tensor::stack(&rows, 0).unsqueeze(0);
            tok = if b > 1 {
                Tensor::cat(&[first, tok.narrow(0, 1, b - 1)], 0)
            } else {
                first
            };
        }
        let mut x = tok + self.position_embedding.narrow(0, 0, t).unsqueeze(0);
        let mut hidden = vec![x.shallow_clone()];
        for l in &self.layers {
            x = l.forward(&x, self.config.num_attention_heads, self.config.hidden_act);
            hidden.push(x.shallow_clone());
        }
        let last = self.final_ln.forward(&x);
        let eos = self.eos_positions(&ids, b, t)?;
        let d = last.size()[2];
        let pooled = last
            .gather(1, &eos.view([b, 1, 1]).expand([b, 1, d], false), false)
            .squeeze_dim(1);
        let pooled = match &self.projection {
            Some(p) => p.forward(&pooled),
            None => pooled,
        };
        Ok(ClipOutput {
            last,
            hidden,
            pooled,
        })
    }

    /// Each row's first end-of-text token (the last position when there is none).
    fn eos_positions(&self, ids: &Tensor, b: i64, t: i64) -> Result<Tensor> {
        let flat: Vec<i64> = Vec::<i64>::try_from(ids.flatten(0, -1).to_device(tch::Device::Cpu))?;
        let eos = i64::from(self.config.eos_token_id);
        let pos: Vec<i64> = flat
            .chunks(t as usize)
            .map(|row| {
                row.iter()
                    .position(|&id| id == eos)
                    .unwrap_or(row.len() - 1) as i64
            })
            .collect();
        debug_assert_eq!(pos.len() as i64, b);
        Ok(Tensor::from_slice(&pos).to_device(ids.device()))
    }

    /// The states a diffusion model is conditioned on: the last layer (normed) for `clip_skip`
    /// 1, else the output `clip_skip` layers from the end, normed as A1111 does.
    pub fn conditioning(&self, out: &ClipOutput, clip_skip: usize) -> Tensor {
        if clip_skip <= 1 {
            return out.last.shallow_clone();
        }
        let i = out.hidden.len().saturating_sub(clip_skip).max(1);
        self.final_ln.forward(&out.hidden[i])
    }

    /// The raw penultimate layer output (SDXL conditions on it without the final norm).
    pub fn penultimate(out: &ClipOutput) -> Tensor {
        out.hidden[out.hidden.len() - 2].shallow_clone()
    }

    /// Every projection, with its transformers path (LoRA targets).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let prefix = if self.projection.is_some() {
            "text_model."
        } else {
            ""
        };
        let mut v = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("{prefix}encoder.layers.{i}");
            v.push((format!("{p}.self_attn.q_proj"), &mut l.q));
            v.push((format!("{p}.self_attn.k_proj"), &mut l.k));
            v.push((format!("{p}.self_attn.v_proj"), &mut l.v));
            v.push((format!("{p}.self_attn.out_proj"), &mut l.out));
            v.push((format!("{p}.mlp.fc1"), &mut l.fc1));
            v.push((format!("{p}.mlp.fc2"), &mut l.fc2));
        }
        v
    }
}
