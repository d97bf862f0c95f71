//! diffusers' `UNet2DConditionModel` on libtorch: SD 1.x/2.x, SDXL (added text/time
//! conditioning) and 9-channel inpainting variants, from diffusers' `unet/config.json`.

use tch::Tensor;

pub use crate::models::config::UNetConfig;

use super::nn::{
    attention, timestep_embedding, upsample_nearest, Conv2d, GroupNorm, LayerNorm, Linear,
};
use super::weights::Weights;
use super::{msg, Result};

/// A residual block conditioned on the time embedding.
#[derive(Debug, Clone)]
pub struct ResnetBlock {
    norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    pub fn new(
        w: &Weights,
        in_ch: usize,
        out_ch: usize,
        temb: Option<usize>,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(&w.pp("norm1"), groups, in_ch, eps)?,
            conv1: Conv2d::new(&w.pp("conv1"), in_ch, out_ch, 3, 1, 1)?,
            time_emb_proj: temb
                .map(|t| Linear::new(&w.pp("time_emb_proj"), t, out_ch, true))
                .transpose()?,
            norm2: GroupNorm::new(&w.pp("norm2"), groups, out_ch, eps)?,
            conv2: Conv2d::new(&w.pp("conv2"), out_ch, out_ch, 3, 1, 1)?,
            conv_shortcut: (in_ch != out_ch)
                .then(|| Conv2d::new(&w.pp("conv_shortcut"), in_ch, out_ch, 1, 1, 0))
                .transpose()?,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Tensor {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x));
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb) {
            h += proj.forward(&t.silu()).unsqueeze(-1).unsqueeze(-1);
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h));
        match &self.conv_shortcut {
            Some(c) => c.forward(x) + h,
            None => x + h,
        }
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
}

impl Attention {
    fn new(w: &Weights, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: Linear::new(&w.pp("to_q"), dim, dim, false)?,
            to_k: Linear::new(&w.pp("to_k"), context_dim, dim, false)?,
            to_v: Linear::new(&w.pp("to_v"), context_dim, dim, false)?,
            to_out: Linear::new(&w.pp("to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Tensor {
        let ctx = context.unwrap_or(x);
        let a = attention(
            &self.to_q.forward(x),
            &self.to_k.forward(ctx),
            &self.to_v.forward(ctx),
            self.heads,
            false,
        );
        self.to_out.forward(&a)
    }
}

/// Self-attention, cross-attention and a GEGLU feed-forward, pre-norm.
#[derive(Debug, Clone)]
pub struct TransformerBlock {
    norm1: LayerNorm,
    pub attn1: Attention,
    norm2: LayerNorm,
    pub attn2: Attention,
    norm3: LayerNorm,
    pub ff_proj: Linear,
    pub ff_out: Linear,
}

impl TransformerBlock {
    fn new(w: &Weights, dim: usize, context_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::new(&w.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(&w.pp("attn1"), dim, dim, heads)?,
            norm2: LayerNorm::new(&w.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(&w.pp("attn2"), dim, context_dim, heads)?,
            norm3: LayerNorm::new(&w.pp("norm3"), dim, 1e-5)?,
            ff_proj: Linear::new(&w.pp("ff.net.0.proj"), dim, dim * 8, true)?,
            ff_out: Linear::new(&w.pp("ff.net.2"), dim * 4, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let x = self.attn1.forward(&self.norm1.forward(x), None) + x;
        let x = self.attn2.forward(&self.norm2.forward(&x), Some(context)) + &x;
        let h = self.ff_proj.forward(&self.norm3.forward(&x));
        let parts = h.chunk(2, -1);
        self.ff_out.forward(&(&parts[0] * parts[1].gelu("none"))) + x
    }
}

/// A projection in or out of a spatial transformer: 1×1 convolution or linear (SD 2.x, SDXL).
#[derive(Debug, Clone)]
pub enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// diffusers' `Transformer2DModel`: group norm, projection in, transformer blocks, projection out.
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    pub proj_in: Proj,
    pub blocks: Vec<TransformerBlock>,
    pub proj_out: Proj,
}

impl SpatialTransformer {
    fn new(w: &Weights, ch: usize, cfg: &UNetConfig, heads: usize, layers: usize) -> Result<Self> {
        let proj = |name: &str| -> Result<Proj> {
            Ok(if cfg.use_linear_projection {
                Proj::Linear(Linear::new(&w.pp(name), ch, ch, true)?)
            } else {
                Proj::Conv(Conv2d::new(&w.pp(name), ch, ch, 1, 1, 0)?)
            })
        };
        Ok(Self {
            norm: GroupNorm::new(&w.pp("norm"), cfg.norm_num_groups, ch, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..layers)
                .map(|i| {
                    TransformerBlock::new(
                        &w.pp(format!("transformer_blocks.{i}")),
                        ch,
                        cfg.cross_attention_dim,
                        heads,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor) -> Tensor {
        let s = x.size();
        let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
        let n = self.norm.forward(x);
        let tokens = |t: Tensor| t.permute([0, 2, 3, 1]).reshape([b, h * w, c]);
        let mut t = match &self.proj_in {
            Proj::Conv(conv) => tokens(conv.forward(&n)),
            Proj::Linear(l) => l.forward(&tokens(n)),
        };
        for block in &self.blocks {
            t = block.forward(&t, context);
        }
        let image = |t: Tensor| t.reshape([b, h, w, c]).permute([0, 3, 1, 2]);
        let out = match &self.proj_out {
            Proj::Conv(conv) => conv.forward(&image(t)),
            Proj::Linear(l) => image(l.forward(&t)),
        };
        out + x
    }
}

/// Resnets (each followed by a spatial transformer in cross-attention blocks) and a resampler.
#[derive(Debug, Clone)]
pub struct Block {
    pub resnets: Vec<ResnetBlock>,
    pub attentions: Vec<SpatialTransformer>,
    pub sampler: Option<Conv2d>,
}

/// SDXL's added conditioning: pooled text embeddings [B, 1280] and time ids [B, 6].
pub struct AddedCond {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

/// The UNet.
#[derive(Debug, Clone)]
pub struct UNet {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub time_1: Linear,
    pub time_2: Linear,
    pub add_1: Option<Linear>,
    pub add_2: Option<Linear>,
    pub down: Vec<Block>,
    pub mid_resnets: Vec<ResnetBlock>,
    pub mid_attention: SpatialTransformer,
    pub up: Vec<Block>,
    pub(crate) norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl UNet {
    pub fn new(w: &Weights, config: UNetConfig) -> Result<Self> {
        config.check().map_err(super::msg)?;
        let cfg = &config;
        let ch = &cfg.block_out_channels;
        let temb = ch[0] * 4;
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let n = ch.len();
        let (add_1, add_2) = if cfg.is_sdxl() {
            let input = cfg.projection_class_embeddings_input_dim.unwrap_or(2816);
            (
                Some(Linear::new(
                    &w.pp("add_embedding.linear_1"),
                    input,
                    temb,
                    true,
                )?),
                Some(Linear::new(
                    &w.pp("add_embedding.linear_2"),
                    temb,
                    temb,
                    true,
                )?),
            )
        } else {
            (None, None)
        };
        let down = (0..n)
            .map(|i| down_block(&w.pp(format!("down_blocks.{i}")), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        let last = ch[n - 1];
        let mid = w.pp("mid_block");
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
        )?;
        let up = (0..n)
            .map(|i| up_block(&w.pp(format!("up_blocks.{i}")), cfg, i))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in: Conv2d::new(&w.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            time_1: Linear::new(&w.pp("time_embedding.linear_1"), ch[0], temb, true)?,
            time_2: Linear::new(&w.pp("time_embedding.linear_2"), temb, temb, true)?,
            add_1,
            add_2,
            down,
            mid_resnets,
            mid_attention,
            up,
            norm_out: GroupNorm::new(&w.pp("conv_norm_out"), g, ch[0], eps)?,
            conv_out: Conv2d::new(&w.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
            config,
        })
    }

    /// The time embedding (plus SDXL's added conditioning) for timesteps `t` [B].
    pub(crate) fn embedding(
        &self,
        t: &Tensor,
        added: Option<&AddedCond>,
        kind: tch::Kind,
    ) -> Result<Tensor> {
        let ch0 = self.config.block_out_channels[0];
        let temb = timestep_embedding(t, ch0).to_kind(kind);
        let mut emb = self.time_2.forward(&self.time_1.forward(&temb).silu());
        if let (Some(a1), Some(a2)) = (&self.add_1, &self.add_2) {
            let added = added
                .ok_or_else(|| msg("an SDXL UNet needs pooled text embeddings and time ids"))?;
            let dim = self.config.addition_time_embed_dim.unwrap_or(256);
            let b = added.time_ids.size()[0];
            let time = timestep_embedding(&added.time_ids.flatten(0, -1), dim)
                .reshape([b, -1])
                .to_kind(kind);
            let cond = Tensor::cat(&[added.text_embeds.to_kind(kind), time], 1);
            emb += a2.forward(&a1.forward(&cond).silu());
        }
        Ok(emb)
    }

    /// Predict noise (or v) for latents `x` [B, C, H, W] at timesteps `t` (one per sample, or a
    /// scalar) given text `context` [B, 77k, D] (and SDXL's added conditioning).
    pub fn forward(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let kind = self.conv_in.weight.kind();
        let (x, context) = (x.to_kind(kind), context.to_kind(kind));
        let b = x.size()[0];
        let t = if t.dim() == 0 {
            t.expand([b], false)
        } else {
            t.shallow_clone()
        };
        let emb = self.embedding(&t, added, kind)?;
        let mut h = self.conv_in.forward(&x);
        let mut skips = vec![h.shallow_clone()];
        for block in &self.down {
            for (j, r) in block.resnets.iter().enumerate() {
                h = r.forward(&h, Some(&emb));
                if let Some(a) = block.attentions.get(j) {
                    h = a.forward(&h, &context);
                }
                skips.push(h.shallow_clone());
            }
            if let Some(d) = &block.sampler {
                h = d.forward(&h);
                skips.push(h.shallow_clone());
            }
        }
        h = self.mid_resnets[0].forward(&h, Some(&emb));
        h = self.mid_attention.forward(&h, &context);
        h = self.mid_resnets[1].forward(&h, Some(&emb));
        for block in &self.up {
            for (j, r) in block.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| msg("unet: skip connections out of step"))?;
                h = r.forward(&Tensor::cat(&[&h, &skip], 1), Some(&emb));
                if let Some(a) = block.attentions.get(j) {
                    h = a.forward(&h, &context);
                }
            }
            if let Some(u) = &block.sampler {
                let (th, tw) = match skips.last() {
                    Some(s) => (s.size()[2], s.size()[3]),
                    None => (h.size()[2] * 2, h.size()[3] * 2),
                };
                h = u.forward(&upsample_nearest(&h, th as usize, tw as usize));
            }
        }
        Ok(self.conv_out.forward(&self.norm_out.forward_silu(&h)))
    }
}

fn down_block(w: &Weights, cfg: &UNetConfig, i: usize) -> Result<Block> {
    let ch = &cfg.block_out_channels;
    let (in_ch, out_ch) = (ch[i.saturating_sub(1)], ch[i]);
    let inputs: Vec<usize> = (0..cfg.layers_per_block)
        .map(|j| if j == 0 { in_ch } else { out_ch })
        .collect();
    let cross = cfg.down_block_types[i] == "CrossAttnDownBlock2D";
    let sampler = (i + 1 < ch.len()).then_some(("downsamplers.0.conv", 2));
    block(w, cfg, &inputs, out_ch, cross, i, sampler)
}

fn up_block(w: &Weights, cfg: &UNetConfig, i: usize) -> Result<Block> {
    let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
    let n = rev.len();
    let (out_c, in_c, prev_out) = (rev[i], rev[(i + 1).min(n - 1)], rev[i.saturating_sub(1)]);
    let layers = cfg.layers_per_block + 1;
    // Each resnet takes the previous output and a skip connection.
    let inputs: Vec<usize> = (0..layers)
        .map(|j| {
            let skip = if j == layers - 1 { in_c } else { out_c };
            (if j == 0 { prev_out } else { out_c }) + skip
        })
        .collect();
    let cross = cfg.up_block_types[i] == "CrossAttnUpBlock2D";
    let sampler = (i + 1 < n).then_some(("upsamplers.0.conv", 1));
    block(w, cfg, &inputs, out_c, cross, n - 1 - i, sampler)
}

/// A resnet per input width in `inputs` (each followed by a spatial transformer with level
/// `level`'s heads when `cross`), at `out` channels, then the resampler (name, stride).
fn block(
    w: &Weights,
    cfg: &UNetConfig,
    inputs: &[usize],
    out: usize,
    cross: bool,
    level: usize,
    sampler: Option<(&str, usize)>,
) -> Result<Block> {
    let temb = cfg.block_out_channels[0] * 4;
    let mut block = Block {
        resnets: Vec::new(),
        attentions: Vec::new(),
        sampler: None,
    };
    for (j, &r_in) in inputs.iter().enumerate() {
        block.resnets.push(ResnetBlock::new(
            &w.pp(format!("resnets.{j}")),
            r_in,
            out,
            Some(temb),
            cfg.norm_num_groups,
            cfg.norm_eps,
        )?);
        if cross {
            block.attentions.push(SpatialTransformer::new(
                &w.pp(format!("attentions.{j}")),
                out,
                cfg,
                cfg.heads(level),
                cfg.transformer_layers_per_block.get(level),
            )?);
        }
    }
    if let Some((name, stride)) = sampler {
        block.sampler = Some(Conv2d::new(&w.pp(name), out, out, 3, stride, 1)?);
    }
    Ok(block)
}
