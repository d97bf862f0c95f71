//! The VAE (diffusers' `AutoencoderKL`): pixels ↔ latents, scaled by 0.18215 (SD 1/2) or 0.13025
//! (SDXL).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::nn::{attention, upsample_nearest, Conv2d, GroupNorm, Linear, Ops};
use super::unet::ResnetBlock;

/// `vae/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub sample_size: usize,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            sample_size: 512,
        }
    }
}

/// The VAE's single-head spatial self-attention (mid blocks).
#[derive(Debug, Clone)]
struct VaeAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl VaeAttention {
    fn new(vb: &VarBuilder, ch: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(&vb.pp("group_norm"), groups, ch, 1e-6)?,
            q: Linear::new(&vb.pp("to_q"), ch, ch, true)?,
            k: Linear::new(&vb.pp("to_k"), ch, ch, true)?,
            v: Linear::new(&vb.pp("to_v"), ch, ch, true)?,
            out: Linear::new(&vb.pp("to_out.0"), ch, ch, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let a = attention(
            &self.q.forward(&t)?,
            &self.k.forward(&t)?,
            &self.v.forward(&t)?,
            1,
            None,
            // One 512-wide head over every pixel: scores stay in f32 whatever the VAE's dtype.
            Ops::INFERENCE.upcast(),
        )?;
        let y = self
            .out
            .forward(&a)?
            .transpose(1, 2)?
            .reshape((b, c, h, w))?;
        y + x
    }
}

#[derive(Debug, Clone)]
struct Mid {
    r0: ResnetBlock,
    attn: VaeAttention,
    r1: ResnetBlock,
}

impl Mid {
    fn new(vb: &VarBuilder, ch: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            r0: ResnetBlock::new(&vb.pp("resnets.0"), ch, ch, None, groups, 1e-6)?,
            attn: VaeAttention::new(&vb.pp("attentions.0"), ch, groups)?,
            r1: ResnetBlock::new(&vb.pp("resnets.1"), ch, ch, None, groups, 1e-6)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.r0.forward(x, None)?;
        let h = self.attn.forward(&h)?;
        self.r1.forward(&h, None)
    }
}

/// The autoencoder.
#[derive(Debug, Clone)]
pub struct Vae {
    pub config: VaeConfig,
    enc_in: Conv2d,
    enc_down: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    enc_mid: Mid,
    enc_norm: GroupNorm,
    enc_out: Conv2d,
    quant: Conv2d,
    post_quant: Conv2d,
    dec_in: Conv2d,
    dec_mid: Mid,
    dec_up: Vec<(Vec<ResnetBlock>, Option<Conv2d>)>,
    dec_norm: GroupNorm,
    dec_out: Conv2d,
}

impl Vae {
    pub fn new(vb: VarBuilder, config: VaeConfig) -> Result<Self> {
        let ch = config.block_out_channels.clone();
        let n = ch.len();
        if n == 0 {
            return Err(candle_core::Error::Msg(
                "vae config: no block_out_channels".into(),
            ));
        }
        let g = config.norm_num_groups;
        let lat = config.latent_channels;
        let enc = vb.pp("encoder");
        let mut enc_down = Vec::new();
        let mut out_c = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let in_c = out_c;
            out_c = c;
            let b = enc.pp(format!("down_blocks.{i}"));
            let resnets = (0..config.layers_per_block)
                .map(|j| {
                    ResnetBlock::new(
                        &b.pp(format!("resnets.{j}")),
                        if j == 0 { in_c } else { out_c },
                        out_c,
                        None,
                        g,
                        1e-6,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let down = if i + 1 < n {
                Some(Conv2d::new(
                    &b.pp("downsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    2,
                    0,
                )?)
            } else {
                None
            };
            enc_down.push((resnets, down));
        }
        let last = ch[n - 1];
        let dec = vb.pp("decoder");
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut dec_up = Vec::new();
        let mut prev = rev[0];
        for (i, &out_c) in rev.iter().enumerate() {
            let b = dec.pp(format!("up_blocks.{i}"));
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| {
                    ResnetBlock::new(
                        &b.pp(format!("resnets.{j}")),
                        if j == 0 { prev } else { out_c },
                        out_c,
                        None,
                        g,
                        1e-6,
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let up = if i + 1 < n {
                Some(Conv2d::new(
                    &b.pp("upsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            dec_up.push((resnets, up));
            prev = out_c;
        }
        Ok(Self {
            enc_in: Conv2d::new(&enc.pp("conv_in"), config.in_channels, ch[0], 3, 1, 1)?,
            enc_down,
            enc_mid: Mid::new(&enc.pp("mid_block"), last, g)?,
            enc_norm: GroupNorm::new(&enc.pp("conv_norm_out"), g, last, 1e-6)?,
            enc_out: Conv2d::new(&enc.pp("conv_out"), last, 2 * lat, 3, 1, 1)?,
            quant: Conv2d::new(&vb.pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0)?,
            post_quant: Conv2d::new(&vb.pp("post_quant_conv"), lat, lat, 1, 1, 0)?,
            dec_in: Conv2d::new(&dec.pp("conv_in"), lat, last, 3, 1, 1)?,
            dec_mid: Mid::new(&dec.pp("mid_block"), last, g)?,
            dec_up,
            dec_norm: GroupNorm::new(&dec.pp("conv_norm_out"), g, ch[0], 1e-6)?,
            dec_out: Conv2d::new(&dec.pp("conv_out"), ch[0], config.out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// Pixels in [-1, 1] [B, 3, H, W] → the latent distribution's mean and log-variance.
    pub fn encode_moments(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut h = self.enc_in.forward(&x.to_dtype(self.dtype())?)?;
        for (resnets, down) in &self.enc_down {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                // Asymmetric padding (right and bottom) before the stride-2 convolution.
                h = d.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?;
            }
        }
        h = self.enc_mid.forward(&h)?;
        let h = self.enc_out.forward(&self.enc_norm.forward_silu(&h)?)?;
        let m = self.quant.forward(&h)?.to_dtype(DType::F32)?;
        let lat = self.config.latent_channels;
        Ok((
            m.narrow(1, 0, lat)?,
            m.narrow(1, lat, lat)?.clamp(-30.0, 20.0)?,
        ))
    }

    /// Pixels → scaled latents, the distribution's mean (deterministic, as img2img uses).
    pub fn encode(&self, x: &Tensor) -> Result<Tensor> {
        let (mean, _) = self.encode_moments(x)?;
        mean.affine(self.config.scaling_factor, 0.0)
    }

    /// Scaled latents → pixels in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = z
            .affine(1.0 / self.config.scaling_factor, 0.0)?
            .to_dtype(self.dtype())?;
        let mut h = self.dec_in.forward(&self.post_quant.forward(&z)?)?;
        h = self.dec_mid.forward(&h)?;
        for (resnets, up) in &self.dec_up {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = up {
                let (hh, ww) = (h.dim(2)? * 2, h.dim(3)? * 2);
                h = u.forward(&upsample_nearest(&h, hh, ww)?)?;
            }
        }
        self.dec_out
            .forward(&self.dec_norm.forward_silu(&h)?)?
            .to_dtype(DType::F32)
    }

    /// The dtype the VAE computes in (its weights'); inputs are converted to it, and results
    /// come back in f32.
    pub fn dtype(&self) -> DType {
        self.post_quant.weight.dtype()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::nn::max_abs_diff;
    use crate::models::shapes::RandomWeights;
    use candle_core::Device;

    #[test]
    fn half_precision_vae_matches_f32_and_answers_in_f32() {
        let dev = Device::Cpu;
        let cfg = VaeConfig {
            block_out_channels: vec![16, 32],
            layers_per_block: 1,
            norm_num_groups: 8,
            ..VaeConfig::default()
        };
        let w = RandomWeights::new(5);
        let make = |dtype| Vae::new(w.var_builder(&dev).set_dtype(dtype), cfg.clone()).unwrap();
        let reference = make(DType::F32);
        let z = Tensor::randn(0f32, 1.0, (1, 4, 8, 8), &dev).unwrap();
        let px = Tensor::randn(0f32, 0.5, (1, 3, 16, 16), &dev).unwrap();
        let want = reference.decode(&z).unwrap();
        let want_lat = reference.encode(&px).unwrap();
        // (candle's CPU matmul has no bf16; the GPU bench measures that one.)
        let (dtype, tol) = (DType::F16, 2e-2f32);
        {
            let vae = make(dtype);
            assert_eq!(vae.dtype(), dtype);
            let got = vae.decode(&z).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            assert_eq!(got.dims(), want.dims());
            let d = max_abs_diff(&got, &want).unwrap();
            assert!(d < tol, "{dtype:?} decode: {d}");
            let lat = vae.encode(&px).unwrap();
            assert_eq!(lat.dtype(), DType::F32);
            let d = max_abs_diff(&lat, &want_lat).unwrap();
            assert!(d < tol, "{dtype:?} encode: {d}");
        }
    }
}
