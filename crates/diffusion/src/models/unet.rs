//! The Stable Diffusion UNet (diffusers' `UNet2DConditionModel` layout): SD 1.x/2.x, SDXL (added
//! text/time conditioning) and 9-channel inpainting variants, from one config.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use super::nn::{
    attention, timestep_embedding, upsample_nearest, Conv2d, GroupNorm, LayerNorm, Linear, Ops,
};

/// A number or one per block (diffusers accepts both for several fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.get(i).or(v.last()).copied().unwrap_or(1),
        }
    }
}

/// `unet/config.json`, the fields that shape the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub layers_per_block: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub cross_attention_dim: usize,
    /// Heads per block, under its historical (misleading) name; `num_attention_heads` wins.
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    pub transformer_layers_per_block: PerBlock,
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Attention scores in f32 under f16/bf16 (diffusers' name; SD 2.1 sets it).
    pub upcast_attention: bool,
}

impl Default for UNetConfig {
    /// Stable Diffusion 1.5.
    fn default() -> Self {
        Self {
            sample_size: 64,
            in_channels: 4,
            out_channels: 4,
            layers_per_block: 2,
            block_out_channels: vec![320, 640, 1280, 1280],
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            cross_attention_dim: 768,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            transformer_layers_per_block: PerBlock::One(1),
            use_linear_projection: false,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            upcast_attention: false,
        }
    }
}

impl UNetConfig {
    pub fn heads(&self, block: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(block)
    }

    /// SDXL-style added conditioning (pooled text embeds + time ids).
    pub fn is_sdxl(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    pub(crate) fn check(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(candle_core::Error::Msg(format!(
                "unet config: {} block_out_channels, {} down blocks, {} up blocks (they must agree)",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(
                t.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                return Err(candle_core::Error::Msg(format!(
                    "unet config: unsupported block type {t}"
                )));
            }
        }
        Ok(())
    }
}

/// A residual block conditioned on the time embedding.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(
        vb: &VarBuilder,
        in_ch: usize,
        out_ch: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(&vb.pp("norm1"), groups, in_ch, eps)?,
            conv1: Conv2d::new(&vb.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: match temb {
                Some(t) => Some(Linear::new(&vb.pp("time_emb_proj"), t, out_ch, true)?),
                None => None,
            },
            norm2: GroupNorm::new(&vb.pp("norm2"), groups, out_ch, eps)?,
            conv2: Conv2d::new(&vb.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: if in_ch != out_ch {
                Some(Conv2d::new(
                    &vb.pp("conv_shortcut"),
                    in_ch,
                    out_ch,
                    1,
                    1,
                    0,
                )?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&t.silu()?)?;
            h = h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        skip + h
    }
}

/// Multi-head attention with diffusers' names (to_q, to_k, to_v, to_out.0).
#[derive(Debug, Clone)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    heads: usize,
    ops: Ops,
}

impl Attention {
    pub fn new(
        vb: &VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
        ops: Ops,
    ) -> Result<Self> {
        Ok(Self {
            to_q: Linear::new(&vb.pp("to_q"), dim, dim, false)?,
            to_k: Linear::new(&vb.pp("to_k"), context_dim, dim, false)?,
            to_v: Linear::new(&vb.pp("to_v"), context_dim, dim, false)?,
            to_out: Linear::new(&vb.pp("to_out.0"), dim, dim, true)?,
            heads,
            ops,
        })
    }

    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let ctx = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(ctx)?;
        let v = self.to_v.forward(ctx)?;
        self.to_out
            .forward(&attention(&q, &k, &v, self.heads, None, self.ops)?)
    }
}

/// Self-attention, cross-attention and a GEGLU feed-forward, pre-norm.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff_proj: Linear,
    pub ff_out: Linear,
}

impl TransformerBlock {
    fn new(
        vb: &VarBuilder,
        dim: usize,
        context_dim: usize,
        heads: usize,
        ops: Ops,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&vb.pp("norm1"), dim, 1e-5, ops)?,
            attn1: Attention::new(&vb.pp("attn1"), dim, dim, heads, ops)?,
            norm2: LayerNorm::new(&vb.pp("norm2"), dim, 1e-5, ops)?,
            attn2: Attention::new(&vb.pp("attn2"), dim, context_dim, heads, ops)?,
            norm3: LayerNorm::new(&vb.pp("norm3"), dim, 1e-5, ops)?,
            ff_proj: Linear::new(&vb.pp("ff.net.0.proj"), dim, dim * 8, true)?,
            ff_out: Linear::new(&vb.pp("ff.net.2"), dim * 4, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        let h = self.ff_proj.forward(&self.norm3.forward(&x)?)?;
        let half = h.dim(D::Minus1)? / 2;
        let (a, gate) = (
            h.narrow(D::Minus1, 0, half)?,
            h.narrow(D::Minus1, half, half)?,
        );
        let h = (a * gate.gelu_erf()?)?;
        self.ff_out.forward(&h)? + x
    }
}

/// A layer LoRA can adapt.
pub enum Target<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv2d),
}

impl ResnetBlock {
    fn targets<'a>(&'a mut self, p: &str, v: &mut Vec<(String, Target<'a>)>) {
        v.push((format!("{p}.conv1"), Target::Conv(&mut self.conv1)));
        v.push((format!("{p}.conv2"), Target::Conv(&mut self.conv2)));
        if let Some(c) = &mut self.conv_shortcut {
            v.push((format!("{p}.conv_shortcut"), Target::Conv(c)));
        }
        if let Some(l) = &mut self.time_emb_proj {
            v.push((format!("{p}.time_emb_proj"), Target::Linear(l)));
        }
    }
}

impl SpatialTransformer {
    fn targets<'a>(&'a mut self, p: &str, v: &mut Vec<(String, Target<'a>)>) {
        for (name, proj) in [
            ("proj_in", &mut self.proj_in),
            ("proj_out", &mut self.proj_out),
        ] {
            let t = match proj {
                Proj::Conv(c) => Target::Conv(c),
                Proj::Linear(l) => Target::Linear(l),
            };
            v.push((format!("{p}.{name}"), t));
        }
        for (k, b) in self.blocks.iter_mut().enumerate() {
            let q = format!("{p}.transformer_blocks.{k}");
            for (an, a) in [("attn1", &mut b.attn1), ("attn2", &mut b.attn2)] {
                v.push((format!("{q}.{an}.to_q"), Target::Linear(&mut a.to_q)));
                v.push((format!("{q}.{an}.to_k"), Target::Linear(&mut a.to_k)));
                v.push((format!("{q}.{an}.to_v"), Target::Linear(&mut a.to_v)));
                v.push((format!("{q}.{an}.to_out.0"), Target::Linear(&mut a.to_out)));
            }
            v.push((format!("{q}.ff.net.0.proj"), Target::Linear(&mut b.ff_proj)));
            v.push((format!("{q}.ff.net.2"), Target::Linear(&mut b.ff_out)));
        }
    }
}

#[derive(Debug, Clone)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel`: group-norm, projection in, transformer blocks, projection out.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Proj,
    pub blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    fn new(
        vb: &VarBuilder,
        ch: usize,
        cfg: &UNetConfig,
        heads: usize,
        layers: usize,
        ops: Ops,
    ) -> Result<Self> {
        let proj = |name: &str| -> Result<Proj> {
            Ok(if cfg.use_linear_projection {
                Proj::Linear(Linear::new(&vb.pp(name), ch, ch, true)?)
            } else {
                Proj::Conv(Conv2d::new(&vb.pp(name), ch, ch, 1, 1, 0)?)
            })
        };
        Ok(Self {
            norm: GroupNorm::new(&vb.pp("norm"), cfg.norm_num_groups, ch, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..layers)
                .map(|i| {
                    TransformerBlock::new(
                        &vb.pp(format!("transformer_blocks.{i}")),
                        ch,
                        cfg.cross_attention_dim,
                        heads,
                        ops,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let mut t = match &self.proj_in {
            Proj::Conv(conv) => conv
                .forward(&n)?
                .permute((0, 2, 3, 1))?
                .reshape((b, h * w, c))?,
            Proj::Linear(l) => l.forward(&n.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)?,
        };
        for block in &self.blocks {
            t = block.forward(&t, context)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&t.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?)?,
            Proj::Linear(l) => l
                .forward(&t)?
                .reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?,
        };
        out + x
    }
}

#[derive(Debug, Clone)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<SpatialTransformer>,
    downsample: Option<Conv2d>,
}

#[derive(Debug, Clone)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<SpatialTransformer>,
    upsample: Option<Conv2d>,
}

/// The UNet.
#[derive(Debug, Clone)]
pub struct UNet {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_1: Linear,
    time_2: Linear,
    add_1: Option<Linear>,
    add_2: Option<Linear>,
    pub down: Vec<DownBlock>,
    pub mid_resnets: Vec<ResnetBlock>,
    pub mid_attention: SpatialTransformer,
    pub up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

/// SDXL's added conditioning: pooled text embeddings [B, 1280] and time ids [B, 6].
#[derive(Debug, Clone)]
pub struct AddedCond {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

impl UNet {
    pub fn new(vb: VarBuilder, config: UNetConfig, ops: Ops) -> Result<Self> {
        config.check()?;
        let ops = if config.upcast_attention {
            ops.upcast()
        } else {
            ops
        };
        let cfg = &config;
        let ch = &cfg.block_out_channels;
        let temb = ch[0] * 4;
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let n = ch.len();
        let (add_1, add_2) = if cfg.is_sdxl() {
            let input = cfg.projection_class_embeddings_input_dim.unwrap_or(2816);
            (
                Some(Linear::new(
                    &vb.pp("add_embedding.linear_1"),
                    input,
                    temb,
                    true,
                )?),
                Some(Linear::new(
                    &vb.pp("add_embedding.linear_2"),
                    temb,
                    temb,
                    true,
                )?),
            )
        } else {
            (None, None)
        };
        let mut down = Vec::with_capacity(n);
        let mut out_ch = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = ch[i];
            let vbb = vb.pp(format!("down_blocks.{i}"));
            let cross = kind == "CrossAttnDownBlock2D";
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..cfg.layers_per_block {
                let r_in = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock::new(
                    &vbb.pp(format!("resnets.{j}")),
                    r_in,
                    out_ch,
                    Some(temb),
                    g,
                    eps,
                )?);
                if cross {
                    attentions.push(SpatialTransformer::new(
                        &vbb.pp(format!("attentions.{j}")),
                        out_ch,
                        cfg,
                        cfg.heads(i),
                        cfg.transformer_layers_per_block.get(i),
                        ops,
                    )?);
                }
            }
            let downsample = if i + 1 < n {
                Some(Conv2d::new(
                    &vbb.pp("downsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    3,
                    2,
                    1,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
        }
        let last = ch[n - 1];
        let mid = vb.pp("mid_block");
        let mid_resnets = vec![
            ResnetBlock::new(&mid.pp("resnets.0"), last, last, Some(temb), g, eps)?,
            ResnetBlock::new(&mid.pp("resnets.1"), last, last, Some(temb), g, eps)?,
        ];
        let mid_attention = SpatialTransformer::new(
            &mid.pp("attentions.0"),
            last,
            cfg,
            cfg.heads(n - 1),
            cfg.transformer_layers_per_block.get(n - 1),
            ops,
        )?;
        let rev: Vec<usize> = ch.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut prev_out = rev[0];
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let block = n - 1 - i; // the matching down block's index
            let vbb = vb.pp(format!("up_blocks.{i}"));
            let cross = kind == "CrossAttnUpBlock2D";
            let layers = cfg.layers_per_block + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j == layers - 1 { in_c } else { out_c };
                let r_in = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock::new(
                    &vbb.pp(format!("resnets.{j}")),
                    r_in + skip,
                    out_c,
                    Some(temb),
                    g,
                    eps,
                )?);
                if cross {
                    attentions.push(SpatialTransformer::new(
                        &vbb.pp(format!("attentions.{j}")),
                        out_c,
                        cfg,
                        cfg.heads(block),
                        cfg.transformer_layers_per_block.get(block),
                        ops,
                    )?);
                }
            }
            let upsample = if i + 1 < n {
                Some(Conv2d::new(
                    &vbb.pp("upsamplers.0.conv"),
                    out_c,
                    out_c,
                    3,
                    1,
                    1,
                )?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
            prev_out = out_c;
        }
        Ok(Self {
            conv_in: Conv2d::new(&vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            time_1: Linear::new(&vb.pp("time_embedding.linear_1"), ch[0], temb, true)?,
            time_2: Linear::new(&vb.pp("time_embedding.linear_2"), temb, temb, true)?,
            add_1,
            add_2,
            down,
            mid_resnets,
            mid_attention,
            up,
            norm_out: GroupNorm::new(&vb.pp("conv_norm_out"), g, ch[0], eps)?,
            conv_out: Conv2d::new(&vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// Predict noise (or v) for latents `x` [B, C, H, W] at timesteps `t` [B] (one per sample)
    /// given text `context` [B, 77k, D] (and SDXL's added conditioning).
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let dtype = x.dtype();
        let ch0 = self.config.block_out_channels[0];
        let t = if t.rank() == 0 {
            t.broadcast_as(x.dim(0)?)?.contiguous()?
        } else {
            t.clone()
        };
        let temb = timestep_embedding(&t, ch0)?.to_dtype(dtype)?;
        let mut emb = self.time_2.forward(&self.time_1.forward(&temb)?.silu()?)?;
        if let (Some(a1), Some(a2)) = (&self.add_1, &self.add_2) {
            let added = added.ok_or_else(|| {
                candle_core::Error::Msg(
                    "an SDXL UNet needs pooled text embeddings and time ids".into(),
                )
            })?;
            let dim = self.config.addition_time_embed_dim.unwrap_or(256);
            let b = added.time_ids.dim(0)?;
            let ids = added.time_ids.flatten_all()?;
            let time = timestep_embedding(&ids, dim)?
                .reshape((b, ()))?
                .to_dtype(dtype)?;
            let cond = Tensor::cat(&[added.text_embeds.to_dtype(dtype)?, time], 1)?;
            emb = (emb + a2.forward(&a1.forward(&cond)?.silu()?)?)?;
        }
        let mut h = self.conv_in.forward(x)?;
        let mut skips = vec![h.clone()];
        for block in &self.down {
            for (j, r) in block.resnets.iter().enumerate() {
                h = r.forward(&h, Some(&emb))?;
                if let Some(a) = block.attentions.get(j) {
                    h = a.forward(&h, context)?;
                }
                skips.push(h.clone());
            }
            if let Some(d) = &block.downsample {
                h = d.forward(&h)?;
                skips.push(h.clone());
            }
        }
        h = self.mid_resnets[0].forward(&h, Some(&emb))?;
        h = self.mid_attention.forward(&h, context)?;
        h = self.mid_resnets[1].forward(&h, Some(&emb))?;
        for block in &self.up {
            for (j, r) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    candle_core::Error::Msg("unet: skip connections out of step".into())
                })?;
                h = r.forward(&Tensor::cat(&[&h, &skip], 1)?, Some(&emb))?;
                if let Some(a) = block.attentions.get(j) {
                    h = a.forward(&h, context)?;
                }
            }
            if let Some(u) = &block.upsample {
                let (th, tw) = match skips.last() {
                    Some(s) => (s.dim(2)?, s.dim(3)?),
                    None => (h.dim(2)? * 2, h.dim(3)? * 2),
                };
                h = u.forward(&upsample_nearest(&h, th, tw)?)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }

    /// Every linear and convolution layer with its diffusers path (LoRA injection points).
    pub fn targets_mut(&mut self) -> Vec<(String, Target<'_>)> {
        let mut v: Vec<(String, Target<'_>)> = vec![
            ("conv_in".into(), Target::Conv(&mut self.conv_in)),
            ("conv_out".into(), Target::Conv(&mut self.conv_out)),
            (
                "time_embedding.linear_1".into(),
                Target::Linear(&mut self.time_1),
            ),
            (
                "time_embedding.linear_2".into(),
                Target::Linear(&mut self.time_2),
            ),
        ];
        if let Some(l) = &mut self.add_1 {
            v.push(("add_embedding.linear_1".into(), Target::Linear(l)));
        }
        if let Some(l) = &mut self.add_2 {
            v.push(("add_embedding.linear_2".into(), Target::Linear(l)));
        }
        for (i, b) in self.down.iter_mut().enumerate() {
            let p = format!("down_blocks.{i}");
            for (j, r) in b.resnets.iter_mut().enumerate() {
                r.targets(&format!("{p}.resnets.{j}"), &mut v);
            }
            for (j, a) in b.attentions.iter_mut().enumerate() {
                a.targets(&format!("{p}.attentions.{j}"), &mut v);
            }
            if let Some(c) = &mut b.downsample {
                v.push((format!("{p}.downsamplers.0.conv"), Target::Conv(c)));
            }
        }
        for (j, r) in self.mid_resnets.iter_mut().enumerate() {
            r.targets(&format!("mid_block.resnets.{j}"), &mut v);
        }
        self.mid_attention.targets("mid_block.attentions.0", &mut v);
        for (i, b) in self.up.iter_mut().enumerate() {
            let p = format!("up_blocks.{i}");
            for (j, r) in b.resnets.iter_mut().enumerate() {
                r.targets(&format!("{p}.resnets.{j}"), &mut v);
            }
            for (j, a) in b.attentions.iter_mut().enumerate() {
                a.targets(&format!("{p}.attentions.{j}"), &mut v);
            }
            if let Some(c) = &mut b.upsample {
                v.push((format!("{p}.upsamplers.0.conv"), Target::Conv(c)));
            }
        }
        v
    }
}
