//! The KL autoencoder (diffusers' `AutoencoderKL`) on libtorch: encoder to latent moments,
//! decoder to pixels in [-1, 1].

use tch::{Kind, Tensor};

pub use crate::models::config::VaeConfig;

use super::nn::{attention, upsample_nearest, Conv2d, GroupNorm, Linear};
use super::unet::ResnetBlock;
use super::weights::Weights;
use super::{msg, Result};

/// Single-head self-attention over the pixels of the middle block.
#[derive(Debug, Clone)]
struct VaeAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl VaeAttention {
    fn new(w: &Weights, ch: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(&w.pp("group_norm"), groups, ch, 1e-6)?,
            q: Linear::new(&w.pp("to_q"), ch, ch, true)?,
            k: Linear::new(&w.pp("to_k"), ch, ch, true)?,
            v: Linear::new(&w.pp("to_v"), ch, ch, true)?,
            out: Linear::new(&w.pp("to_out.0"), ch, ch, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let s = x.size();
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        let t = self.norm.forward(x).reshape([b, c, h * w]).transpose(1, 2);
        let a = attention(
            &self.q.forward(&t),
            &self.k.forward(&t),
            &self.v.forward(&t),
            1,
            false,
        );
        self.out.forward(&a).transpose(1, 2).reshape([b, c, h, w]) + x
    }
}

#[derive(Debug, Clone)]
struct Mid {
    r0: ResnetBlock,
    attn: VaeAttention,
    r1: ResnetBlock,
}

impl Mid {
    fn new(w: &Weights, ch: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            r0: ResnetBlock::new(&w.pp("resnets.0"), ch, ch, None, groups, 1e-6)?,
            attn: VaeAttention::new(&w.pp("attentions.0"), ch, groups)?,
            r1: ResnetBlock::new(&w.pp("resnets.1"), ch, ch, None, groups, 1e-6)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        let h = self.attn.forward(&self.r0.forward(x, None));
        self.r1.forward(&h, None)
    }
}

type Stage = (Vec<ResnetBlock>, Option<Conv2d>);

/// The autoencoder.
#[derive(Debug, Clone)]
pub struct Vae {
    pub config: VaeConfig,
    enc_in: Conv2d,
    enc_down: Vec<Stage>,
    enc_mid: Mid,
    enc_norm: GroupNorm,
    enc_out: Conv2d,
    quant: Option<Conv2d>,
    post_quant: Option<Conv2d>,
    dec_in: Conv2d,
    dec_mid: Mid,
    dec_up: Vec<Stage>,
    dec_norm: GroupNorm,
    dec_out: Conv2d,
}

fn resnets(w: &Weights, n: usize, in_c: usize, out_c: usize, g: usize) -> Result<Vec<ResnetBlock>> {
    (0..n)
        .map(|j| {
            let r_in = if j == 0 { in_c } else { out_c };
            ResnetBlock::new(&w.pp(format!("resnets.{j}")), r_in, out_c, None, g, 1e-6)
        })
        .collect()
}

impl Vae {
    pub fn new(w: &Weights, config: VaeConfig) -> Result<Self> {
        let ch = config.block_out_channels.clone();
        let n = ch.len();
        if n == 0 {
            return Err(msg("vae config: no block_out_channels"));
        }
        let (g, lat, layers) = (
            config.norm_num_groups,
            config.latent_channels,
            config.layers_per_block,
        );
        let enc = w.pp("encoder");
        let enc_down = (0..n)
            .map(|i| {
                let b = enc.pp(format!("down_blocks.{i}"));
                let down = (i + 1 < n)
                    .then(|| Conv2d::new(&b.pp("downsamplers.0.conv"), ch[i], ch[i], 3, 2, 0))
                    .transpose()?;
                Ok((
                    resnets(&b, layers, ch[i.saturating_sub(1)], ch[i], g)?,
                    down,
                ))
            })
            .collect::<Result<Vec<Stage>>>()?;
        let last = ch[n - 1];
        let dec = w.pp("decoder");
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let dec_up = (0..n)
            .map(|i| {
                let b = dec.pp(format!("up_blocks.{i}"));
                let up = (i + 1 < n)
                    .then(|| Conv2d::new(&b.pp("upsamplers.0.conv"), rev[i], rev[i], 3, 1, 1))
                    .transpose()?;
                Ok((
                    resnets(&b, layers + 1, rev[i.saturating_sub(1)], rev[i], g)?,
                    up,
                ))
            })
            .collect::<Result<Vec<Stage>>>()?;
        Ok(Self {
            enc_in: Conv2d::new(&enc.pp("conv_in"), config.in_channels, ch[0], 3, 1, 1)?,
            enc_down,
            enc_mid: Mid::new(&enc.pp("mid_block"), last, g)?,
            enc_norm: GroupNorm::new(&enc.pp("conv_norm_out"), g, last, 1e-6)?,
            enc_out: Conv2d::new(&enc.pp("conv_out"), last, 2 * lat, 3, 1, 1)?,
            quant: config
                .use_quant_conv
                .then(|| Conv2d::new(&w.pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0))
                .transpose()?,
            post_quant: config
                .use_post_quant_conv
                .then(|| Conv2d::new(&w.pp("post_quant_conv"), lat, lat, 1, 1, 0))
                .transpose()?,
            dec_in: Conv2d::new(&dec.pp("conv_in"), lat, last, 3, 1, 1)?,
            dec_mid: Mid::new(&dec.pp("mid_block"), last, g)?,
            dec_up,
            dec_norm: GroupNorm::new(&dec.pp("conv_norm_out"), g, ch[0], 1e-6)?,
            dec_out: Conv2d::new(&dec.pp("conv_out"), ch[0], config.out_channels, 3, 1, 1)?,
            config,
        })
    }

    pub fn device(&self) -> tch::Device {
        self.dec_in.weight.device()
    }

    pub fn kind(&self) -> Kind {
        self.dec_in.weight.kind()
    }

    fn shift(&self) -> f64 {
        self.config.shift_factor.unwrap_or(0.0)
    }

    /// The latent distribution's mean and log-variance (unscaled), in f32.
    pub fn encode_moments(&self, x: &Tensor) -> (Tensor, Tensor) {
        let mut h = self.enc_in.forward(&x.to_kind(self.kind()));
        for (resnets, down) in &self.enc_down {
            for r in resnets {
                h = r.forward(&h, None);
            }
            if let Some(d) = down {
                h = d.forward(&h.constant_pad_nd([0, 1, 0, 1]));
            }
        }
        h = self.enc_mid.forward(&h);
        let h = self.enc_out.forward(&self.enc_norm.forward_silu(&h));
        let m = match &self.quant {
            Some(q) => q.forward(&h),
            None => h,
        }
        .to_kind(Kind::Float);
        let parts = m.chunk(2, 1);
        (parts[0].shallow_clone(), parts[1].clamp(-30.0, 20.0))
    }

    /// Scaled (and shifted) latents (the mean) of images in [-1, 1].
    pub fn encode(&self, x: &Tensor) -> Tensor {
        (self.encode_moments(x).0 - self.shift()) * self.config.scaling_factor
    }

    /// Pixels in [-1, 1] (f32) of scaled latents.
    pub fn decode(&self, z: &Tensor) -> Tensor {
        let z = (z / self.config.scaling_factor + self.shift()).to_kind(self.kind());
        let z = match &self.post_quant {
            Some(p) => p.forward(&z),
            None => z,
        };
        let mut h = self.dec_in.forward(&z);
        h = self.dec_mid.forward(&h);
        for (resnets, up) in &self.dec_up {
            for r in resnets {
                h = r.forward(&h, None);
            }
            if let Some(u) = up {
                let s = h.size();
                h = u.forward(&upsample_nearest(&h, s[2] as usize * 2, s[3] as usize * 2));
            }
        }
        self.dec_out
            .forward(&self.dec_norm.forward_silu(&h))
            .to_kind(Kind::Float)
    }
}
