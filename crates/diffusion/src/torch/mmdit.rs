//! The SD 3 / 3.5 MMDiT (diffusers' `SD3Transformer2DModel`) on libtorch: 2×2 patches embedded
//! by a convolution plus the centre crop of a learned grid of position embeddings, joint
//! attention blocks over image and text tokens (image first), optional RMS norms on queries and
//! keys (SD 3.5), SD 3.5-Medium's dual-attention blocks (a second, image-only attention), the last
//! block's text side reduced to what attention needs.

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::dit::{modulate, plain_norm, sdpa, AdaNorm, FeedForward, Qkv, TimeTextEmbed, IMG, TXT};
use super::nn::{Conv2d, Linear};
use super::weights::Weights;
use super::{msg, Result};

/// `transformer/config.json` of an SD 3 / 3.5 folder.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Sd3Config {
    pub sample_size: usize,
    pub patch_size: usize,
    pub in_channels: usize,
    pub num_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub caption_projection_dim: usize,
    pub pooled_projection_dim: usize,
    pub out_channels: usize,
    pub pos_embed_max_size: usize,
    pub dual_attention_layers: Vec<usize>,
    pub qk_norm: Option<String>,
}

impl Default for Sd3Config {
    /// SD 3.5 Medium.
    fn default() -> Self {
        Self {
            sample_size: 128,
            patch_size: 2,
            in_channels: 16,
            num_layers: 24,
            attention_head_dim: 64,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            caption_projection_dim: 1536,
            pooled_projection_dim: 2048,
            out_channels: 16,
            pos_embed_max_size: 384,
            dual_attention_layers: (0..13).collect(),
            qk_norm: Some("rms_norm".into()),
        }
    }
}

impl Sd3Config {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    fn check(&self) -> Result<()> {
        if self.caption_projection_dim != self.inner_dim() {
            return Err(msg(format!(
                "SD3 transformer: caption_projection_dim {} differs from heads × head dim {}",
                self.caption_projection_dim,
                self.inner_dim()
            )));
        }
        match self.qk_norm.as_deref() {
            None | Some("rms_norm") => Ok(()),
            Some(other) => Err(msg(format!(
                "SD3 transformer qk_norm {other:?}: only rms_norm (or none) is supported"
            ))),
        }
    }
}

/// The text side of a block: full (norms, output projection, feed-forward) or, in the last
/// block, only what the joint attention reads.
#[derive(Debug, Clone)]
enum Context {
    Full {
        norm1: AdaNorm,
        to_add_out: Linear,
        ff: FeedForward,
    },
    PreOnly {
        norm1: AdaNorm,
    },
}

#[derive(Debug, Clone)]
struct JointBlock {
    norm1: AdaNorm,
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    attn2: Option<(Qkv, Linear)>,
    ff: FeedForward,
    context: Context,
}

impl JointBlock {
    fn new(w: &Weights, c: &Sd3Config, last: bool, dual: bool) -> Result<Self> {
        let (dim, hd) = (c.inner_dim(), c.attention_head_dim);
        let qk = c.qk_norm.is_some();
        let a = w.pp("attn");
        let context = if last {
            Context::PreOnly {
                norm1: AdaNorm::new(&w.pp("norm1_context"), dim, 2)?,
            }
        } else {
            Context::Full {
                norm1: AdaNorm::new(&w.pp("norm1_context"), dim, 6)?,
                to_add_out: Linear::new(&a.pp("to_add_out"), dim, dim, true)?,
                ff: FeedForward::new(&w.pp("ff_context"), dim)?,
            }
        };
        let attn2 = dual
            .then(|| {
                let a2 = w.pp("attn2");
                Ok::<_, super::Error>((
                    Qkv::new(&a2, dim, hd, IMG, qk)?,
                    Linear::new(&a2.pp("to_out.0"), dim, dim, true)?,
                ))
            })
            .transpose()?;
        Ok(Self {
            norm1: AdaNorm::new(&w.pp("norm1"), dim, if dual { 9 } else { 6 })?,
            img: Qkv::new(&a, dim, hd, IMG, qk)?,
            txt: Qkv::new(&a, dim, hd, TXT, qk)?,
            to_out: Linear::new(&a.pp("to_out.0"), dim, dim, true)?,
            attn2,
            ff: FeedForward::new(&w.pp("ff"), dim)?,
            context,
        })
    }

    /// (image, text) tokens after the block; no text tokens after the last.
    fn forward(&self, x: &Tensor, c: &Tensor, temb: &Tensor, n: usize) -> (Tensor, Option<Tensor>) {
        let m = self.norm1.chunks(temb);
        let normed = plain_norm(x);
        let nx = modulate(&normed, &m[0], &m[1]);
        let (ctx_mod, nc) = match &self.context {
            Context::Full { norm1, .. } => {
                let mc = norm1.chunks(temb);
                let nc = modulate(&plain_norm(c), &mc[0], &mc[1]);
                (Some(mc), nc)
            }
            Context::PreOnly { norm1 } => (None, norm1.continuous(c, temb)),
        };
        let (qi, ki, vi) = self.img.project(&nx, n);
        let (qt, kt, vt) = self.txt.project(&nc, n);
        let a = sdpa(
            &Tensor::cat(&[qi, qt], 2),
            &Tensor::cat(&[ki, kt], 2),
            &Tensor::cat(&[vi, vt], 2),
        );
        let xn = x.size()[1];
        let (ai, at) = (a.narrow(1, 0, xn), a.narrow(1, xn, a.size()[1] - xn));
        let mut x = x + self.to_out.forward(&ai) * m[2].unsqueeze(1);
        if let Some((p, out)) = &self.attn2 {
            let nx2 = modulate(&normed, &m[6], &m[7]);
            let (q, k, v) = p.project(&nx2, n);
            x += out.forward(&sdpa(&q, &k, &v)) * m[8].unsqueeze(1);
        }
        let ff = self.ff.forward(&modulate(&plain_norm(&x), &m[3], &m[4]));
        let x = &x + ff * m[5].unsqueeze(1);
        let c = match (&self.context, ctx_mod) {
            (Context::Full { to_add_out, ff, .. }, Some(mc)) => {
                let c = c + to_add_out.forward(&at) * mc[2].unsqueeze(1);
                let f = ff.forward(&modulate(&plain_norm(&c), &mc[3], &mc[4]));
                Some(&c + f * mc[5].unsqueeze(1))
            }
            _ => None,
        };
        (x, c)
    }

    fn linears<'a>(&'a mut self, p: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        let a = format!("{p}.attn");
        self.img.linears(&a, IMG, out);
        self.txt.linears(&a, TXT, out);
        out.push((format!("{a}.to_out.0"), &mut self.to_out));
        if let Some((proj, o)) = &mut self.attn2 {
            proj.linears(&format!("{p}.attn2"), IMG, out);
            out.push((format!("{p}.attn2.to_out.0"), o));
        }
        out.push((format!("{p}.ff.net.0.proj"), &mut self.ff.up));
        out.push((format!("{p}.ff.net.2"), &mut self.ff.down));
        out.push((format!("{p}.norm1.linear"), &mut self.norm1.linear));
        match &mut self.context {
            Context::Full {
                norm1,
                to_add_out,
                ff,
            } => {
                out.push((format!("{a}.to_add_out"), to_add_out));
                out.push((format!("{p}.ff_context.net.0.proj"), &mut ff.up));
                out.push((format!("{p}.ff_context.net.2"), &mut ff.down));
                out.push((format!("{p}.norm1_context.linear"), &mut norm1.linear));
            }
            Context::PreOnly { norm1 } => {
                out.push((format!("{p}.norm1_context.linear"), &mut norm1.linear));
            }
        }
    }
}

/// The MMDiT. Cloning shares the weights.
#[derive(Debug)]
pub struct Sd3Transformer {
    pub config: Sd3Config,
    patch: Conv2d,
    pos_embed: Tensor,
    context_embedder: Linear,
    time_text: TimeTextEmbed,
    blocks: Vec<JointBlock>,
    norm_out: AdaNorm,
    proj_out: Linear,
}

impl Clone for Sd3Transformer {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            patch: self.patch.clone(),
            pos_embed: self.pos_embed.shallow_clone(),
            context_embedder: self.context_embedder.clone(),
            time_text: self.time_text.clone(),
            blocks: self.blocks.clone(),
            norm_out: self.norm_out.clone(),
            proj_out: self.proj_out.clone(),
        }
    }
}

impl Sd3Transformer {
    pub fn new(w: &Weights, config: Sd3Config) -> Result<Self> {
        config.check()?;
        let (dim, p) = (config.inner_dim(), config.patch_size);
        let grid = config.pos_embed_max_size;
        let n = config.num_layers;
        Ok(Self {
            patch: Conv2d::new(&w.pp("pos_embed.proj"), config.in_channels, dim, p, p, 0)?,
            pos_embed: w.get(&[1, grid * grid, dim], "pos_embed.pos_embed")?,
            context_embedder: Linear::new(
                &w.pp("context_embedder"),
                config.joint_attention_dim,
                config.caption_projection_dim,
                true,
            )?,
            time_text: TimeTextEmbed::new(
                &w.pp("time_text_embed"),
                dim,
                config.pooled_projection_dim,
                false,
            )?,
            blocks: (0..n)
                .map(|i| {
                    let dual = config.dual_attention_layers.contains(&i);
                    JointBlock::new(
                        &w.pp(format!("transformer_blocks.{i}")),
                        &config,
                        i + 1 == n,
                        dual,
                    )
                })
                .collect::<Result<_>>()?,
            norm_out: AdaNorm::new(&w.pp("norm_out"), dim, 2)?,
            proj_out: Linear::new(&w.pp("proj_out"), dim, p * p * config.out_channels, true)?,
            config,
        })
    }

    pub fn device(&self) -> tch::Device {
        self.proj_out.weight.device()
    }

    pub fn kind(&self) -> Kind {
        self.proj_out.weight.kind()
    }

    /// The centre `h` × `w` patches of the learned position grid, [1, h·w, D].
    fn cropped_pos_embed(&self, h: i64, w: i64) -> Result<Tensor> {
        let max = self.config.pos_embed_max_size as i64;
        if h > max || w > max {
            return Err(msg(format!(
                "{}×{} latent patches exceed the model's position grid of {max}×{max}",
                h, w
            )));
        }
        let (top, left) = ((max - h) / 2, (max - w) / 2);
        let d = *self.pos_embed.size().last().unwrap_or(&0);
        Ok(self
            .pos_embed
            .reshape([1, max, max, d])
            .narrow(1, top, h)
            .narrow(2, left, w)
            .reshape([1, h * w, d]))
    }

    /// The velocity [B, 16, H, W] (f32) of latents [B, 16, H, W] at `timestep` [B] in [0, 1000],
    /// with joint conditioning [B, T, joint_dim] and pooled [B, P].
    pub fn forward(
        &self,
        latents: &Tensor,
        timestep: &Tensor,
        context: &Tensor,
        pooled: &Tensor,
    ) -> Result<Tensor> {
        let (dev, kind) = (self.device(), self.kind());
        let on = |t: &Tensor| t.to_device(dev).to_kind(kind);
        let s = latents.size();
        let p = self.config.patch_size as i64;
        let (b, h, w) = (s[0], s[2] / p, s[3] / p);
        if s[2] % p != 0 || s[3] % p != 0 {
            return Err(msg(format!(
                "latents of {}×{} are not whole {p}×{p} patches",
                s[2], s[3]
            )));
        }
        let x = self
            .patch
            .forward(&on(latents))
            .flatten(2, 3)
            .transpose(1, 2);
        let mut x = x + self.cropped_pos_embed(h, w)?.to_kind(kind);
        let temb = self.time_text.forward(&on(timestep), None, &on(pooled));
        let mut c = self.context_embedder.forward(&on(context));
        let n = self.config.num_attention_heads;
        for blk in &self.blocks {
            let (nx, nc) = blk.forward(&x, &c, &temb, n);
            x = nx;
            if let Some(nc) = nc {
                c = nc;
            }
        }
        let out = self.proj_out.forward(&self.norm_out.continuous(&x, &temb));
        let oc = self.config.out_channels as i64;
        Ok(out
            .reshape([b, h, w, p, p, oc])
            .permute([0, 5, 1, 3, 2, 4])
            .reshape([b, oc, h * p, w * p])
            .to_kind(Kind::Float))
    }

    /// Every linear layer under its diffusers name (for LoRAs).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = vec![
            ("context_embedder".to_string(), &mut self.context_embedder),
            ("proj_out".to_string(), &mut self.proj_out),
            ("norm_out.linear".to_string(), &mut self.norm_out.linear),
        ];
        let tt = &mut self.time_text;
        out.push((
            "time_text_embed.timestep_embedder.linear_1".into(),
            &mut tt.timestep.l1,
        ));
        out.push((
            "time_text_embed.timestep_embedder.linear_2".into(),
            &mut tt.timestep.l2,
        ));
        out.push((
            "time_text_embed.text_embedder.linear_1".into(),
            &mut tt.text.l1,
        ));
        out.push((
            "time_text_embed.text_embedder.linear_2".into(),
            &mut tt.text.l2,
        ));
        for (i, b) in self.blocks.iter_mut().enumerate() {
            b.linears(&format!("transformer_blocks.{i}"), &mut out);
        }
        out
    }
}
