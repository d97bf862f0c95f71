//! The FLUX.1 transformer (diffusers' `FluxTransformer2DModel`) on libtorch: packed 2×2 latent
//! patches and T5 states embedded to one width, double-stream blocks (separate weights for image
//! and text tokens, one joint attention), single-stream blocks (attention and MLP in parallel over
//! the joined sequence), rotary position embeddings over three id axes, a conditioning vector from
//! the timestep, FLUX-dev's embedded guidance and CLIP's pooled output.

use serde::Deserialize;
use tch::{Kind, Tensor};

use super::dit::{modulate, plain_norm, sdpa, AdaNorm, FeedForward, Qkv, TimeTextEmbed, IMG, TXT};
use super::nn::Linear;
use super::weights::Weights;
use super::{msg, Result};

/// `transformer/config.json` of a FLUX folder.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct FluxConfig {
    pub patch_size: usize,
    pub in_channels: usize,
    pub out_channels: Option<usize>,
    pub num_layers: usize,
    pub num_single_layers: usize,
    pub attention_head_dim: usize,
    pub num_attention_heads: usize,
    pub joint_attention_dim: usize,
    pub pooled_projection_dim: usize,
    pub guidance_embeds: bool,
    pub axes_dims_rope: Vec<usize>,
}

impl Default for FluxConfig {
    /// FLUX.1-dev.
    fn default() -> Self {
        Self {
            patch_size: 1,
            in_channels: 64,
            out_channels: None,
            num_layers: 19,
            num_single_layers: 38,
            attention_head_dim: 128,
            num_attention_heads: 24,
            joint_attention_dim: 4096,
            pooled_projection_dim: 768,
            guidance_embeds: true,
            axes_dims_rope: vec![16, 56, 56],
        }
    }
}

impl FluxConfig {
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    fn check(&self) -> Result<()> {
        if self.patch_size != 1 {
            return Err(msg(format!(
                "FLUX transformer with patch_size {}: only 1 (patches packed by the pipeline) is supported",
                self.patch_size
            )));
        }
        let rope: usize = self.axes_dims_rope.iter().sum();
        if rope != self.attention_head_dim || self.axes_dims_rope.iter().any(|d| d % 2 == 1) {
            return Err(msg(format!(
                "FLUX axes_dims_rope {:?} must be even and sum to attention_head_dim {}",
                self.axes_dims_rope, self.attention_head_dim
            )));
        }
        Ok(())
    }
}

/// Rotates pairs of channels (x0, x1) by the position's angles: (x0 cos − x1 sin, x1 cos + x0 sin).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let s = x.size();
    let pairs = x.reshape([s[0], s[1], s[2], s[3] / 2, 2]);
    let (re, im) = (pairs.select(-1, 0), pairs.select(-1, 1));
    let rotated = Tensor::stack(&[-im, re], -1).reshape(s.as_slice());
    let kind = x.kind();
    (x.to_kind(Kind::Float) * cos + rotated.to_kind(Kind::Float) * sin).to_kind(kind)
}

/// The rotary angles' cosines and sines [N, head_dim] of position ids [N, axes]: per axis,
/// frequencies θ^(−2i/dim) times the id (in f64, as diffusers), each repeated for its pair.
pub fn rope(ids: &Tensor, axes: &[usize], theta: f64) -> (Tensor, Tensor) {
    let ids = ids.to_kind(Kind::Double);
    let (mut cos, mut sin) = (Vec::new(), Vec::new());
    for (i, &dim) in axes.iter().enumerate() {
        let freqs = (Tensor::arange_start_step(0, dim as i64, 2, (Kind::Double, ids.device()))
            / dim as f64
            * theta.ln())
        .exp()
        .reciprocal();
        let angles = ids.select(1, i as i64).unsqueeze(1) * freqs.unsqueeze(0);
        cos.push(angles.cos().repeat_interleave_self_int(2, 1, None));
        sin.push(angles.sin().repeat_interleave_self_int(2, 1, None));
    }
    (
        Tensor::cat(&cos, -1).to_kind(Kind::Float),
        Tensor::cat(&sin, -1).to_kind(Kind::Float),
    )
}

#[derive(Debug, Clone)]
struct DoubleBlock {
    norm1: AdaNorm,
    norm1_context: AdaNorm,
    img: Qkv,
    txt: Qkv,
    to_out: Linear,
    to_add_out: Linear,
    ff: FeedForward,
    ff_context: FeedForward,
}

impl DoubleBlock {
    fn new(w: &Weights, dim: usize, head_dim: usize) -> Result<Self> {
        let a = w.pp("attn");
        Ok(Self {
            norm1: AdaNorm::new(&w.pp("norm1"), dim, 6)?,
            norm1_context: AdaNorm::new(&w.pp("norm1_context"), dim, 6)?,
            img: Qkv::new(&a, dim, head_dim, IMG, true)?,
            txt: Qkv::new(&a, dim, head_dim, TXT, true)?,
            to_out: Linear::new(&a.pp("to_out.0"), dim, dim, true)?,
            to_add_out: Linear::new(&a.pp("to_add_out"), dim, dim, true)?,
            ff: FeedForward::new(&w.pp("ff"), dim)?,
            ff_context: FeedForward::new(&w.pp("ff_context"), dim)?,
        })
    }

    /// (image, text) tokens after the block.
    fn forward(
        &self,
        x: &Tensor,
        c: &Tensor,
        temb: &Tensor,
        pe: &(Tensor, Tensor),
        n: usize,
    ) -> (Tensor, Tensor) {
        let m = self.norm1.chunks(temb);
        let mc = self.norm1_context.chunks(temb);
        let nx = modulate(&plain_norm(x), &m[0], &m[1]);
        let nc = modulate(&plain_norm(c), &mc[0], &mc[1]);
        let (qi, ki, vi) = self.img.project(&nx, n);
        let (qt, kt, vt) = self.txt.project(&nc, n);
        let q = apply_rope(&Tensor::cat(&[qt, qi], 2), &pe.0, &pe.1);
        let k = apply_rope(&Tensor::cat(&[kt, ki], 2), &pe.0, &pe.1);
        let a = sdpa(&q, &k, &Tensor::cat(&[vt, vi], 2));
        let t = c.size()[1];
        let (at, ai) = (a.narrow(1, 0, t), a.narrow(1, t, a.size()[1] - t));
        let x = x + self.to_out.forward(&ai) * m[2].unsqueeze(1);
        let ff = self.ff.forward(&modulate(&plain_norm(&x), &m[3], &m[4]));
        let x = &x + ff * m[5].unsqueeze(1);
        let c = c + self.to_add_out.forward(&at) * mc[2].unsqueeze(1);
        let ff = self
            .ff_context
            .forward(&modulate(&plain_norm(&c), &mc[3], &mc[4]));
        let c = &c + ff * mc[5].unsqueeze(1);
        (x, c)
    }

    fn linears<'a>(&'a mut self, p: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        let a = format!("{p}.attn");
        self.img.linears(&a, IMG, out);
        self.txt.linears(&a, TXT, out);
        out.push((format!("{a}.to_out.0"), &mut self.to_out));
        out.push((format!("{a}.to_add_out"), &mut self.to_add_out));
        for (name, ff) in [("ff", &mut self.ff), ("ff_context", &mut self.ff_context)] {
            out.push((format!("{p}.{name}.net.0.proj"), &mut ff.up));
            out.push((format!("{p}.{name}.net.2"), &mut ff.down));
        }
        out.push((format!("{p}.norm1.linear"), &mut self.norm1.linear));
        out.push((
            format!("{p}.norm1_context.linear"),
            &mut self.norm1_context.linear,
        ));
    }
}

#[derive(Debug, Clone)]
struct SingleBlock {
    norm: AdaNorm,
    attn: Qkv,
    proj_mlp: Linear,
    proj_out: Linear,
}

impl SingleBlock {
    fn new(w: &Weights, dim: usize, head_dim: usize) -> Result<Self> {
        Ok(Self {
            norm: AdaNorm::new(&w.pp("norm"), dim, 3)?,
            attn: Qkv::new(&w.pp("attn"), dim, head_dim, IMG, true)?,
            proj_mlp: Linear::new(&w.pp("proj_mlp"), dim, 4 * dim, true)?,
            proj_out: Linear::new(&w.pp("proj_out"), 5 * dim, dim, true)?,
        })
    }

    /// The joined (text, image) tokens after the block.
    fn forward(&self, x: &Tensor, temb: &Tensor, pe: &(Tensor, Tensor), n: usize) -> Tensor {
        let m = self.norm.chunks(temb);
        let nx = modulate(&plain_norm(x), &m[0], &m[1]);
        let mlp = self.proj_mlp.forward(&nx).gelu("tanh");
        let (q, k, v) = self.attn.project(&nx, n);
        let a = sdpa(
            &apply_rope(&q, &pe.0, &pe.1),
            &apply_rope(&k, &pe.0, &pe.1),
            &v,
        );
        x + self.proj_out.forward(&Tensor::cat(&[a, mlp], 2)) * m[2].unsqueeze(1)
    }

    fn linears<'a>(&'a mut self, p: &str, out: &mut Vec<(String, &'a mut Linear)>) {
        self.attn.linears(&format!("{p}.attn"), IMG, out);
        out.push((format!("{p}.proj_mlp"), &mut self.proj_mlp));
        out.push((format!("{p}.proj_out"), &mut self.proj_out));
        out.push((format!("{p}.norm.linear"), &mut self.norm.linear));
    }
}

/// The FLUX.1 transformer. Cloning shares the weights.
#[derive(Debug, Clone)]
pub struct FluxTransformer {
    pub config: FluxConfig,
    x_embedder: Linear,
    context_embedder: Linear,
    time_text: TimeTextEmbed,
    double: Vec<DoubleBlock>,
    single: Vec<SingleBlock>,
    norm_out: AdaNorm,
    proj_out: Linear,
}

/// One call's inputs: packed latents [B, N, 64], T5 states [B, T, joint_dim], pooled CLIP [B, P],
/// the sigma [B] in [0, 1], FLUX-dev's guidance [B], and the ids [N, 3] / [T, 3].
pub struct FluxInput<'a> {
    pub hidden: &'a Tensor,
    pub context: &'a Tensor,
    pub pooled: &'a Tensor,
    pub timestep: &'a Tensor,
    pub guidance: Option<&'a Tensor>,
    pub img_ids: &'a Tensor,
    pub txt_ids: &'a Tensor,
}

impl FluxTransformer {
    pub fn new(w: &Weights, config: FluxConfig) -> Result<Self> {
        config.check()?;
        let (dim, hd) = (config.inner_dim(), config.attention_head_dim);
        let out = config.out_channels.unwrap_or(config.in_channels);
        Ok(Self {
            x_embedder: Linear::new(&w.pp("x_embedder"), config.in_channels, dim, true)?,
            context_embedder: Linear::new(
                &w.pp("context_embedder"),
                config.joint_attention_dim,
                dim,
                true,
            )?,
            time_text: TimeTextEmbed::new(
                &w.pp("time_text_embed"),
                dim,
                config.pooled_projection_dim,
                config.guidance_embeds,
            )?,
            double: (0..config.num_layers)
                .map(|i| DoubleBlock::new(&w.pp(format!("transformer_blocks.{i}")), dim, hd))
                .collect::<Result<_>>()?,
            single: (0..config.num_single_layers)
                .map(|i| SingleBlock::new(&w.pp(format!("single_transformer_blocks.{i}")), dim, hd))
                .collect::<Result<_>>()?,
            norm_out: AdaNorm::new(&w.pp("norm_out"), dim, 2)?,
            proj_out: Linear::new(&w.pp("proj_out"), dim, out, true)?,
            config,
        })
    }

    pub fn device(&self) -> tch::Device {
        self.proj_out.weight.device()
    }

    pub fn kind(&self) -> Kind {
        self.proj_out.weight.kind()
    }

    /// The velocity [B, N, 64] (f32) the model predicts.
    pub fn forward(&self, i: &FluxInput) -> Tensor {
        let (dev, kind) = (self.device(), self.kind());
        let on = |t: &Tensor| t.to_device(dev).to_kind(kind);
        let n = self.config.num_attention_heads;
        let x = self.x_embedder.forward(&on(i.hidden));
        let t = on(i.timestep) * 1000.0;
        let g = i.guidance.map(|g| on(g) * 1000.0);
        let temb = self.time_text.forward(&t, g.as_ref(), &on(i.pooled));
        let c = self.context_embedder.forward(&on(i.context));
        let ids = Tensor::cat(&[i.txt_ids.to_device(dev), i.img_ids.to_device(dev)], 0);
        let (cos, sin) = rope(&ids, &self.config.axes_dims_rope, 10000.0);
        let pe = (cos.to_kind(Kind::Float), sin.to_kind(Kind::Float));
        let (mut x, mut c) = (x, c);
        for b in &self.double {
            (x, c) = b.forward(&x, &c, &temb, &pe, n);
        }
        let t_len = c.size()[1];
        let mut joint = Tensor::cat(&[c, x], 1);
        for b in &self.single {
            joint = b.forward(&joint, &temb, &pe, n);
        }
        let x = joint.narrow(1, t_len, joint.size()[1] - t_len);
        self.proj_out
            .forward(&self.norm_out.continuous(&x, &temb))
            .to_kind(Kind::Float)
    }

    /// Every linear layer under its diffusers name (for LoRAs).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = vec![
            ("x_embedder".to_string(), &mut self.x_embedder),
            ("context_embedder".to_string(), &mut self.context_embedder),
            ("proj_out".to_string(), &mut self.proj_out),
            ("norm_out.linear".to_string(), &mut self.norm_out.linear),
        ];
        let tt = &mut self.time_text;
        for (name, m) in [
            ("timestep_embedder", Some(&mut tt.timestep)),
            ("guidance_embedder", tt.guidance.as_mut()),
            ("text_embedder", Some(&mut tt.text)),
        ] {
            if let Some(m) = m {
                out.push((format!("time_text_embed.{name}.linear_1"), &mut m.l1));
                out.push((format!("time_text_embed.{name}.linear_2"), &mut m.l2));
            }
        }
        for (i, b) in self.double.iter_mut().enumerate() {
            b.linears(&format!("transformer_blocks.{i}"), &mut out);
        }
        for (i, b) in self.single.iter_mut().enumerate() {
            b.linears(&format!("single_transformer_blocks.{i}"), &mut out);
        }
        out
    }
}

/// diffusers' `_pack_latents`: [B, C, H, W] → [B, (H/2)(W/2), 4C], each 2×2 patch's channels
/// laid out (c, dy, dx).
pub fn pack(latents: &Tensor) -> Tensor {
    let s = latents.size();
    let (b, c, h, w) = (s[0], s[1], s[2], s[3]);
    latents
        .view([b, c, h / 2, 2, w / 2, 2])
        .permute([0, 2, 4, 1, 3, 5])
        .reshape([b, (h / 2) * (w / 2), c * 4])
}

/// The inverse of [`pack`] for latents of `h` × `w`.
pub fn unpack(x: &Tensor, h: i64, w: i64) -> Tensor {
    let s = x.size();
    let (b, c) = (s[0], s[2] / 4);
    x.view([b, h / 2, w / 2, c, 2, 2])
        .permute([0, 3, 1, 4, 2, 5])
        .reshape([b, c, h, w])
}

/// The ids [(h/2)(w/2), 3] of packed patches: (0, row, column).
pub fn image_ids(h: i64, w: i64) -> Tensor {
    let (ph, pw) = (h / 2, w / 2);
    let rows = Tensor::arange(ph, (Kind::Float, tch::Device::Cpu))
        .unsqueeze(1)
        .expand([ph, pw], false);
    let cols = Tensor::arange(pw, (Kind::Float, tch::Device::Cpu))
        .unsqueeze(0)
        .expand([ph, pw], false);
    Tensor::stack(&[rows.zeros_like(), rows, cols], -1).reshape([ph * pw, 3])
}
