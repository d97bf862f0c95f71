//! The layers the models are made of, as libtorch's fused operators.

use tch::{Kind, Tensor};

use super::weights::Weights;
use super::Result;

/// A low-rank adapter beside a layer's weight: y += scale · (x downᵀ) upᵀ.
#[derive(Debug)]
pub struct Adapter {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// y = x Wᵀ + b (+ the adapters).
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub adapters: Vec<Adapter>,
}

impl Linear {
    pub fn new(w: &Weights, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[out_dim, in_dim], "weight")?,
            bias: if bias {
                Some(w.get(&[out_dim], "bias")?)
            } else {
                None
            },
            adapters: Vec::new(),
        })
    }

    pub fn in_dim(&self) -> i64 {
        self.weight.size()[1]
    }

    pub fn out_dim(&self) -> i64 {
        self.weight.size()[0]
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut y = x.linear(&self.weight, self.bias.as_ref());
        for a in &self.adapters {
            let h = x.to_kind(a.down.kind()).linear(&a.down, None::<Tensor>);
            y += (h.linear(&a.up, None::<Tensor>) * a.scale).to_kind(y.kind());
        }
        y
    }
}

/// A 2-D convolution with square kernels, stride and padding (+ LoCon adapters: down
/// [r, in, k, k] or [r, in, 1, 1], up [out, r, 1, 1]; a 1×1 down acts at the kernel's centre).
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Tensor,
    pub adapters: Vec<Adapter>,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    pub fn new(
        w: &Weights,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[out_ch, in_ch, kernel, kernel], "weight")?,
            bias: w.get(&[out_ch], "bias")?,
            adapters: Vec::new(),
            stride: stride as i64,
            padding: padding as i64,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (s, p) = (self.stride, self.padding);
        let mut y = x.conv2d(&self.weight, Some(&self.bias), [s, s], [p, p], [1, 1], 1);
        for a in &self.adapters {
            let pad = if a.down.size()[2] == 1 { 0 } else { p };
            let d = x.to_kind(a.down.kind()).conv2d(
                &a.down,
                None::<Tensor>,
                [s, s],
                [pad, pad],
                [1, 1],
                1,
            );
            let u = d.conv2d(&a.up, None::<Tensor>, [1, 1], [0, 0], [1, 1], 1) * a.scale;
            y += u.to_kind(y.kind());
        }
        y
    }
}

/// Group normalisation over channels (dim 1), optionally followed by SiLU.
#[derive(Debug)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: i64,
    eps: f64,
}

impl GroupNorm {
    pub fn new(w: &Weights, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[channels], "weight")?,
            bias: w.get(&[channels], "bias")?,
            groups: groups as i64,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }

    pub fn forward_silu(&self, x: &Tensor) -> Tensor {
        self.forward(x).silu()
    }
}

/// Layer normalisation over the last dimension.
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(w: &Weights, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: w.get(&[dim], "weight")?,
            bias: w.get(&[dim], "bias")?,
            dim: dim as i64,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        x.layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }
}

/// Multi-head attention of projections laid out [B, N, heads·d]: libtorch's
/// `scaled_dot_product_attention` (flash / memory-efficient kernels where the device has them).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Tensor {
    let split = |t: &Tensor| {
        let s = t.size();
        t.view([s[0], s[1], heads as i64, s[2] / heads as i64])
            .transpose(1, 2)
    };
    let (b, n, d) = (q.size()[0], q.size()[1], q.size()[2]);
    Tensor::scaled_dot_product_attention(
        &split(q),
        &split(k),
        &split(v),
        None::<Tensor>,
        0.0,
        causal,
        None,
        false,
    )
    .transpose(1, 2)
    .reshape([b, n, d])
}

/// Sinusoidal timestep embedding, cosines first (diffusers' `flip_sin_to_cos=True`, shift 0).
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Tensor {
    let half = (dim / 2) as i64;
    let freqs =
        (Tensor::arange(half, (Kind::Float, t.device())) * (-(10000f64.ln()) / half as f64)).exp();
    let args = t.to_kind(Kind::Float).reshape([-1, 1]) * freqs.unsqueeze(0);
    Tensor::cat(&[args.cos(), args.sin()], -1)
}

/// Nearest-neighbour upsampling to an exact size.
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Tensor {
    x.upsample_nearest2d([h as i64, w as i64], None, None)
}

// Cloning a layer shares its tensors (as candle's clones do): merging a LoRA into a clone assigns
// new weight tensors and leaves the original's alone.
impl Clone for Adapter {
    fn clone(&self) -> Self {
        Self {
            down: self.down.shallow_clone(),
            up: self.up.shallow_clone(),
            scale: self.scale,
        }
    }
}

impl Clone for Linear {
    fn clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            adapters: self.adapters.clone(),
        }
    }
}

impl Clone for Conv2d {
    fn clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            adapters: self.adapters.clone(),
            stride: self.stride,
            padding: self.padding,
        }
    }
}

impl Clone for GroupNorm {
    fn clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            ..*self
        }
    }
}

impl Clone for LayerNorm {
    fn clone(&self) -> Self {
        Self {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            ..*self
        }
    }
}
