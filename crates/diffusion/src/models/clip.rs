//! CLIP text encoders (transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` layout): SD1's
//! ViT-L/14, SD2's OpenCLIP ViT-H, SDXL's ViT-L + OpenCLIP ViT-bigG.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use serde::{Deserialize, Serialize};

use super::nn::{attention, LayerNorm, Linear, Ops};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    Gelu,
}

/// `text_encoder/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub eos_token_id: u32,
}

impl Default for ClipConfig {
    /// SD 1.x's ViT-L/14 text tower.
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}

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

/// What one text-encoder pass returns.
#[derive(Debug, Clone)]
pub struct ClipOutput {
    /// The last layer's states after the final layer norm [B, T, D].
    pub last: Tensor,
    /// Every layer's output before the final norm, `hidden[0]` the embeddings.
    pub hidden: Vec<Tensor>,
    /// The final-normed state at each sequence's first end-of-text token [B, D], projected when
    /// the model has a projection.
    pub pooled: Tensor,
}

/// The text transformer.
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    pub config: ClipConfig,
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    projection: Option<Linear>,
    ops: Ops,
}

impl ClipTextModel {
    /// `with_projection`: `CLIPTextModelWithProjection` (SDXL's second encoder), whose weights
    /// live under `text_model.` beside `text_projection`.
    pub fn new(
        vb: VarBuilder,
        config: ClipConfig,
        with_projection: bool,
        ops: Ops,
    ) -> Result<Self> {
        let d = config.hidden_size;
        let tm = if with_projection {
            vb.pp("text_model")
        } else {
            vb.clone()
        };
        let emb = tm.pp("embeddings");
        let token_embedding = Embedding::new(
            emb.pp("token_embedding")
                .get((config.vocab_size, d), "weight")?,
            d,
        );
        let position_embedding = emb
            .pp("position_embedding")
            .get((config.max_position_embeddings, d), "weight")?;
        let eps = config.layer_norm_eps;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let l = tm.pp(format!("encoder.layers.{i}"));
                Ok(Layer {
                    ln1: LayerNorm::new(&l.pp("layer_norm1"), d, eps, ops)?,
                    q: Linear::new(&l.pp("self_attn.q_proj"), d, d, true)?,
                    k: Linear::new(&l.pp("self_attn.k_proj"), d, d, true)?,
                    v: Linear::new(&l.pp("self_attn.v_proj"), d, d, true)?,
                    out: Linear::new(&l.pp("self_attn.out_proj"), d, d, true)?,
                    ln2: LayerNorm::new(&l.pp("layer_norm2"), d, eps, ops)?,
                    fc1: Linear::new(&l.pp("mlp.fc1"), d, config.intermediate_size, true)?,
                    fc2: Linear::new(&l.pp("mlp.fc2"), config.intermediate_size, d, true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let final_ln = LayerNorm::new(&tm.pp("final_layer_norm"), d, eps, ops)?;
        let projection = if with_projection {
            Some(Linear::new(
                &vb.pp("text_projection"),
                d,
                config.projection_dim,
                false,
            )?)
        } else {
            None
        };
        Ok(Self {
            config,
            token_embedding,
            position_embedding,
            layers,
            final_ln,
            projection,
            ops,
        })
    }

    fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
        let m: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Tensor::from_vec(m, (1, 1, t, t), device)
    }

    /// Encode token ids [B, T] (T ≤ max positions).
    pub fn forward(&self, ids: &Tensor) -> Result<ClipOutput> {
        self.forward_with(ids, &[])
    }

    /// The device its weights are on.
    pub fn device(&self) -> &Device {
        self.token_embedding.embeddings().device()
    }

    /// [`ClipTextModel::forward`] with some token embeddings replaced (textual inversion):
    /// `(position, vector [D])` for sequence 0 of the batch.
    pub fn forward_with(&self, ids: &Tensor, overrides: &[(usize, Tensor)]) -> Result<ClipOutput> {
        let (b, t) = ids.dims2()?;
        let pos = self.position_embedding.narrow(0, 0, t)?;
        let mut tok = self.token_embedding.forward(ids)?;
        for (p, v) in overrides {
            let d = tok.dim(2)?;
            let v = v.to_dtype(tok.dtype())?.reshape((1, 1, d))?;
            tok = tok.slice_assign(&[0..1, *p..*p + 1, 0..d], &v)?;
        }
        let mut x = tok.broadcast_add(&pos)?;
        let mask = Self::causal_mask(t, ids.device())?;
        let heads = self.config.num_attention_heads;
        let mut hidden = vec![x.clone()];
        for l in &self.layers {
            let h = l.ln1.forward(&x)?;
            let a = attention(
                &l.q.forward(&h)?,
                &l.k.forward(&h)?,
                &l.v.forward(&h)?,
                heads,
                Some(&mask),
                self.ops,
            )?;
            x = (l.out.forward(&a)? + x)?;
            let h = l.fc1.forward(&l.ln2.forward(&x)?)?;
            let h = match self.config.hidden_act {
                Activation::QuickGelu => (&h * candle_nn::ops::sigmoid(&h.affine(1.702, 0.0)?)?)?,
                Activation::Gelu => h.gelu_erf()?,
            };
            x = (l.fc2.forward(&h)? + x)?;
            hidden.push(x.clone());
        }
        let last = self.final_ln.forward(&x)?;
        // The first end-of-text token of each sequence.
        let eos: Vec<u32> = ids
            .to_dtype(DType::U32)?
            .to_vec2::<u32>()?
            .iter()
            .map(|row| {
                row.iter()
                    .position(|&id| id == self.config.eos_token_id)
                    .unwrap_or(row.len() - 1) as u32
            })
            .collect();
        let idx = Tensor::from_vec(eos, b, ids.device())?;
        let pooled = last
            .gather(
                &idx.reshape((b, 1, 1))?
                    .broadcast_as((b, 1, last.dim(D::Minus1)?))?
                    .contiguous()?,
                1,
            )?
            .squeeze(1)?;
        let pooled = match &self.projection {
            Some(p) => p.forward(&pooled)?,
            None => pooled,
        };
        Ok(ClipOutput {
            last,
            hidden,
            pooled,
        })
    }

    /// The states a diffusion model is conditioned on: the last layer (normed) for `clip_skip`
    /// 1, else the output `clip_skip` layers from the end, normed as A1111 does.
    pub fn conditioning(&self, out: &ClipOutput, clip_skip: usize) -> Result<Tensor> {
        if clip_skip <= 1 {
            return Ok(out.last.clone());
        }
        let i = out.hidden.len().saturating_sub(clip_skip).max(1);
        self.final_ln.forward(&out.hidden[i])
    }

    /// The raw penultimate layer output (SDXL conditions on it without the final norm).
    pub fn penultimate(out: &ClipOutput) -> Tensor {
        out.hidden[out.hidden.len() - 2].clone()
    }

    /// Every projection, with its transformers path (for LoRA injection).
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
