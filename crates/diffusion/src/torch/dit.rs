//! The layers the diffusion transformers (FLUX.1, SD 3 / 3.5) share, named as diffusers names
//! them: adaptive layer norms driven by the conditioning vector, the tanh-GELU feed-forward,
//! RMS norms on queries and keys, the timestep + pooled-text embedding.

use tch::{Kind, Tensor};

use super::nn::{timestep_embedding, Linear};
use super::weights::Weights;
use super::Result;

/// Layer norm over the last dimension without learned scale or bias (eps 1e-6).
pub fn plain_norm(x: &Tensor) -> Tensor {
    let d = *x.size().last().unwrap_or(&1);
    x.layer_norm([d], None::<Tensor>, None::<Tensor>, 1e-6, true)
}

/// x · (1 + scale) + shift, with scale and shift [B, D] broadcast over the tokens.
pub fn modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Tensor {
    x * (scale.unsqueeze(1) + 1.0) + shift.unsqueeze(1)
}

/// A learned projection of the conditioning vector cut into `n` vectors of the model's width:
/// diffusers' AdaLayerNormZero (6), its Single variant (3), SD 3.5's ZeroX (9) and
/// AdaLayerNormContinuous (2: scale, then shift).
#[derive(Debug, Clone)]
pub struct AdaNorm {
    pub linear: Linear,
    n: usize,
}

impl AdaNorm {
    pub fn new(w: &Weights, dim: usize, n: usize) -> Result<Self> {
        Ok(Self {
            linear: Linear::new(&w.pp("linear"), dim, n * dim, true)?,
            n,
        })
    }

    /// The `n` vectors [B, D] of the conditioning `emb` [B, D].
    pub fn chunks(&self, emb: &Tensor) -> Vec<Tensor> {
        self.linear.forward(&emb.silu()).chunk(self.n as i64, 1)
    }

    /// AdaLayerNormContinuous: the plain norm of `x`, scaled and shifted by the conditioning.
    pub fn continuous(&self, x: &Tensor, emb: &Tensor) -> Tensor {
        let c = self.chunks(emb);
        modulate(&plain_norm(x), &c[1], &c[0])
    }
}

/// diffusers' FeedForward with `gelu-approximate`: Linear, tanh GELU, Linear (`net.0.proj`,
/// `net.2`).
#[derive(Debug, Clone)]
pub struct FeedForward {
    pub up: Linear,
    pub down: Linear,
}

impl FeedForward {
    pub fn new(w: &Weights, dim: usize) -> Result<Self> {
        Ok(Self {
            up: Linear::new(&w.pp("net.0.proj"), dim, 4 * dim, true)?,
            down: Linear::new(&w.pp("net.2"), 4 * dim, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.down.forward(&self.up.forward(x).gelu("tanh"))
    }
}

/// RMS norm with a learned scale over the last dimension (diffusers' RMSNorm: the mean square in
/// f32).
#[derive(Debug)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl Clone for RmsNorm {
    fn clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            eps: self.eps,
        }
    }
}

impl RmsNorm {
    pub fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[dim], "weight")?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(Kind::Float);
        let var = xf.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        ((xf * (var + self.eps).rsqrt()).to_kind(kind)) * &self.weight
    }
}

/// diffusers' TimestepEmbedding: Linear, SiLU, Linear from the 256 sinusoidal channels.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub l1: Linear,
    pub l2: Linear,
}

impl Mlp {
    pub fn new(w: &Weights, input: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            l1: Linear::new(&w.pp("linear_1"), input, dim, true)?,
            l2: Linear::new(&w.pp("linear_2"), dim, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.l2.forward(&self.l1.forward(x).silu())
    }
}

/// The conditioning vector `temb`: timestep (and FLUX-dev's guidance) through their embedders
/// plus the pooled text embedding through its projection (`time_text_embed`).
#[derive(Debug, Clone)]
pub struct TimeTextEmbed {
    pub timestep: Mlp,
    pub guidance: Option<Mlp>,
    pub text: Mlp,
}

impl TimeTextEmbed {
    pub fn new(w: &Weights, dim: usize, pooled: usize, guidance: bool) -> Result<Self> {
        Ok(Self {
            timestep: Mlp::new(&w.pp("timestep_embedder"), 256, dim)?,
            guidance: guidance
                .then(|| Mlp::new(&w.pp("guidance_embedder"), 256, dim))
                .transpose()?,
            text: Mlp::new(&w.pp("text_embedder"), pooled, dim)?,
        })
    }

    /// `t` and `guidance` [B] on the model's scale (×1000 for FLUX), `pooled` [B, P].
    pub fn forward(&self, t: &Tensor, guidance: Option<&Tensor>, pooled: &Tensor) -> Tensor {
        let kind = pooled.kind();
        let mut emb = self
            .timestep
            .forward(&timestep_embedding(t, 256).to_kind(kind));
        if let (Some(g), Some(m)) = (guidance, &self.guidance) {
            emb += m.forward(&timestep_embedding(g, 256).to_kind(kind));
        }
        emb + self.text.forward(pooled)
    }
}

/// An attention's query, key and value projections, with RMS norms on queries and keys where
/// the model has them (FLUX always, SD 3.5 by `qk_norm`); `names` are the five modules' names
/// (`to_q`, `to_k`, `to_v`, `norm_q`, `norm_k` or the text side's `add_*`).
#[derive(Debug, Clone)]
pub struct Qkv {
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    norms: Option<(RmsNorm, RmsNorm)>,
}

impl Qkv {
    pub fn new(
        w: &Weights,
        dim: usize,
        head_dim: usize,
        names: [&str; 5],
        qk_norm: bool,
    ) -> Result<Self> {
        let norms = match qk_norm {
            true => Some((
                RmsNorm::new(&w.pp(names[3]), head_dim, 1e-6)?,
                RmsNorm::new(&w.pp(names[4]), head_dim, 1e-6)?,
            )),
            false => None,
        };
        Ok(Self {
            q: Linear::new(&w.pp(names[0]), dim, dim, true)?,
            k: Linear::new(&w.pp(names[1]), dim, dim, true)?,
            v: Linear::new(&w.pp(names[2]), dim, dim, true)?,
            norms,
        })
    }

    /// Queries, keys and values [B, heads, N, d] of `x`.
    pub fn project(&self, x: &Tensor, n: usize) -> (Tensor, Tensor, Tensor) {
        let (q, k) = (heads(&self.q.forward(x), n), heads(&self.k.forward(x), n));
        let (q, k) = match &self.norms {
            Some((nq, nk)) => (nq.forward(&q), nk.forward(&k)),
            None => (q, k),
        };
        (q, k, heads(&self.v.forward(x), n))
    }

    /// The three projections under `prefix.<name>` (for LoRAs).
    pub fn linears<'a>(
        &'a mut self,
        prefix: &str,
        names: [&str; 5],
        out: &mut Vec<(String, &'a mut Linear)>,
    ) {
        out.push((format!("{prefix}.{}", names[0]), &mut self.q));
        out.push((format!("{prefix}.{}", names[1]), &mut self.k));
        out.push((format!("{prefix}.{}", names[2]), &mut self.v));
    }
}

/// The five module names of an image-side and a text-side joint attention.
pub const IMG: [&str; 5] = ["to_q", "to_k", "to_v", "norm_q", "norm_k"];
pub const TXT: [&str; 5] = [
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "norm_added_q",
    "norm_added_k",
];

/// [B, N, heads·d] → [B, heads, N, d].
pub fn heads(x: &Tensor, n: usize) -> Tensor {
    let s = x.size();
    x.view([s[0], s[1], n as i64, s[2] / n as i64])
        .transpose(1, 2)
}

/// Scaled dot-product attention of [B, heads, N, d] queries, keys and values → [B, N, heads·d].
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let s = q.size();
    Tensor::scaled_dot_product_attention(q, k, v, None::<Tensor>, 0.0, false, None, false)
        .transpose(1, 2)
        .reshape([s[0], s[2], s[1] * s[3]])
}
