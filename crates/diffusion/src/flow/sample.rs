//! Flow-matching txt2img for the transformer families: each image's latents from its own seed
//! (torch's CPU generator by default, as the UNet families draw them) or given, then Euler (or
//! Heun) steps along the predicted velocity over the model's shifted sigmas, then the VAE.
//!
//! FLUX packs 2×2 latent patches into tokens, places them by (0, row, column) ids, and takes the
//! guidance as an input (FLUX-dev; none for schnell). SD 3 runs classifier-free guidance: the
//! negative prompt's prediction, then the positive's, mixed by the CFG scale above 1.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::cond::Conditioning;
use super::generate::unit_to_rgb;
use super::{Denoiser, FlowModel};
use crate::noise::{Generator, RandnSource};
use crate::pipeline::PipelineError;
use crate::schedulers::flow_match::Spacing;
use crate::torch::flux::{image_ids, pack, unpack, FluxInput};

type PResult<T> = Result<T, PipelineError>;

/// Live previews: every how many steps, and where each decoded image goes.
pub type Previews<'a> = (usize, &'a mut dyn FnMut(usize, image::RgbImage));

/// The longest T5 prompt the pipelines accept (diffusers' limit).
pub const MAX_SEQUENCE_LENGTH: usize = 512;

/// The flow-matching samplers: diffusers' `FlowMatchEulerDiscreteScheduler` and
/// `FlowMatchHeunDiscreteScheduler` (a second model call per step, the mean of both slopes; the
/// last step, to σ = 0, is Euler's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowSampler {
    #[default]
    Euler,
    Heun,
}

impl FlowSampler {
    /// A1111's name (`Euler`, `Heun`), ours, or diffusers' flow-matching label.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "Euler" | "euler" | "Euler (flow matching)" | "flow_euler" => Some(Self::Euler),
            "Heun" | "heun" | "Heun (flow matching)" | "flow_heun" => Some(Self::Heun),
            _ => None,
        }
    }

    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Euler => "Euler",
            Self::Heun => "Heun",
        }
    }
}

/// A txt2img request to a transformer-family model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowRequest {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    pub steps: usize,
    /// Classifier-free guidance (SD 3; ignored by FLUX, which has none).
    pub cfg_scale: f64,
    /// FLUX-dev's embedded guidance (ignored by SD 3 and by FLUX models without it).
    pub guidance: f64,
    pub width: usize,
    pub height: usize,
    pub seed: u64,
    pub batch_size: usize,
    /// T5 tokens read from the prompt (FLUX-dev 512, schnell 256, SD 3 256 by default).
    pub max_sequence_length: usize,
    /// A fixed sigma shift in place of the model's own (its `shift`, or dynamic shifting).
    #[serde(default)]
    pub shift: Option<f64>,
    #[serde(default)]
    pub noise: RandnSource,
    #[serde(default)]
    pub sampler: FlowSampler,
}

fn bad(m: impl Into<String>) -> PipelineError {
    PipelineError::BadRequest(m.into())
}

fn compute(e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Compute(e.to_string())
}

impl FlowRequest {
    pub fn validate(&self) -> PResult<()> {
        if self.steps == 0 || self.steps > crate::pipeline::MAX_STEPS {
            return Err(bad(format!(
                "steps must be within 1..={}",
                crate::pipeline::MAX_STEPS
            )));
        }
        if self.width == 0 || self.height == 0 {
            return Err(bad("width and height must be positive"));
        }
        if self.width * self.height > crate::pipeline::MAX_PIXELS {
            return Err(bad(format!(
                "{}×{} is over the pixel limit",
                self.width, self.height
            )));
        }
        if !(1..=MAX_SEQUENCE_LENGTH).contains(&self.max_sequence_length) {
            return Err(bad(format!(
                "max_sequence_length must be within 1..={MAX_SEQUENCE_LENGTH}"
            )));
        }
        for (name, v) in [("cfg_scale", self.cfg_scale), ("guidance", self.guidance)] {
            if !v.is_finite() || !(0.0..=100.0).contains(&v) {
                return Err(bad(format!("{name} must be within 0..=100")));
            }
        }
        if self.shift.is_some_and(|s| !s.is_finite() || s <= 0.0) {
            return Err(bad("shift must be a positive number"));
        }
        if self.batch_size == 0 || self.batch_size > 16 {
            return Err(bad("batch_size must be within 1..=16"));
        }
        Ok(())
    }
}

impl FlowModel {
    /// Images [B, H, W, 3] in [0, 1] (f32, CPU); `latents` [B, 16, H/8, W/8] replace the seeds'
    /// noise. `progress(step, steps)` returns false to cancel.
    pub fn txt2img_pixels(
        &self,
        req: &FlowRequest,
        latents: Option<&Tensor>,
        progress: impl FnMut(usize, usize) -> bool,
    ) -> PResult<Tensor> {
        self.txt2img_observed(req, latents, progress, None)
    }

    /// [`Self::txt2img_pixels`], and with `previews` (every, send) the first image's latents so
    /// far decoded every `every` steps.
    pub fn txt2img_observed(
        &self,
        req: &FlowRequest,
        latents: Option<&Tensor>,
        mut progress: impl FnMut(usize, usize) -> bool,
        mut previews: Option<Previews>,
    ) -> PResult<Tensor> {
        req.validate()?;
        let unit = 2 * self.vae_scale();
        if req.width % unit != 0 || req.height % unit != 0 {
            return Err(bad(format!(
                "width and height must be multiples of {unit} for this model (2×2 latent patches; got {}x{})",
                req.width, req.height
            )));
        }
        let pos = self.encode(&req.prompt, req.max_sequence_length)?;
        let neg = match (&self.denoiser, req.cfg_scale > 1.0) {
            (Denoiser::Sd3(_), true) => {
                Some(self.encode(&req.negative_prompt, req.max_sequence_length)?)
            }
            _ => None,
        };
        let s = self.vae_scale() as i64;
        let (h, w) = (req.height as i64 / s, req.width as i64 / s);
        let total = req.steps * req.batch_size;
        let mut images = Vec::with_capacity(req.batch_size);
        for i in 0..req.batch_size {
            let x = match latents {
                Some(l) => l.narrow(0, i as i64, 1).to_kind(Kind::Float),
                None => {
                    let n = (16 * h * w) as usize;
                    let v = Generator::new(req.noise, req.seed.wrapping_add(i as u64)).randn_f32(n);
                    Tensor::from_slice(&v).view([1, 16, h, w])
                }
            };
            let done = i * req.steps;
            let mut cb = |k: usize, z: &Tensor| {
                let due = |every: usize| i == 0 && every > 0 && k % every == 0 && k < req.steps;
                if let Some((_, send)) = previews.as_mut().filter(|(e, _)| due(*e)) {
                    if let Ok(img) = self.decode(z).and_then(|p| unit_to_rgb(&p.get(0))) {
                        send(k, img);
                    }
                }
                progress(done + k, total)
            };
            let z = crate::torch::guard(|| {
                Ok(tch::no_grad(|| {
                    self.denoise(req, x, &pos, neg.as_ref(), &mut cb)
                }))
            })
            .map_err(compute)??;
            images.push(self.decode(&z)?);
        }
        Ok(Tensor::cat(&images, 0))
    }

    /// Latents [1, 16, h, w] to pixels [1, H, W, 3] in [0, 1].
    pub fn decode(&self, z: &Tensor) -> PResult<Tensor> {
        let img = crate::torch::guard(|| {
            Ok(tch::no_grad(|| {
                self.vae.decode(&z.to_device(self.vae.device()))
            }))
        })
        .map_err(compute)?;
        Ok((img / 2.0 + 0.5)
            .clamp(0.0, 1.0)
            .permute([0, 2, 3, 1])
            .to_device(tch::Device::Cpu))
    }

    /// The sigmas of this request for latents of `tokens` image tokens.
    pub fn sigmas(&self, req: &FlowRequest, tokens: usize) -> Vec<f64> {
        let mut sched = self.scheduler.clone();
        if let Some(shift) = req.shift {
            sched.shift = shift;
            sched.use_dynamic_shifting = false;
        }
        let spacing = match self.denoiser {
            Denoiser::Flux(_) => Spacing::Flux,
            Denoiser::Sd3(_) => Spacing::Training,
        };
        sched.sigmas(req.steps, spacing, tokens, None)
    }

    fn denoise(
        &self,
        req: &FlowRequest,
        x: Tensor,
        pos: &Conditioning,
        neg: Option<&Conditioning>,
        progress: &mut dyn FnMut(usize, &Tensor) -> bool,
    ) -> PResult<Tensor> {
        let (h, w) = (x.size()[2], x.size()[3]);
        match &self.denoiser {
            Denoiser::Flux(f) => {
                let packed = pack(&x);
                let sigmas = self.sigmas(req, packed.size()[1] as usize);
                let velocity = flux_velocity(f, req, pos, (h, w));
                let mut unpacked = |k: usize, x: &Tensor| progress(k, &unpack(x, h, w));
                let z = walk(req, packed, &sigmas, &velocity, &mut unpacked)?;
                Ok(unpack(&z, h, w))
            }
            Denoiser::Sd3(m) => {
                let p = m.config.patch_size as i64;
                let sigmas = self.sigmas(req, ((h / p) * (w / p)) as usize);
                let velocity = |x: &Tensor, sigma: f64| sd3_velocity(m, req, x, sigma, (pos, neg));
                walk(req, x, &sigmas, &velocity, progress)
            }
        }
    }
}

/// The sampler's steps over `sigmas` from `x`.
fn walk(
    req: &FlowRequest,
    mut x: Tensor,
    sigmas: &[f64],
    velocity: &dyn Fn(&Tensor, f64) -> PResult<Tensor>,
    progress: &mut dyn FnMut(usize, &Tensor) -> bool,
) -> PResult<Tensor> {
    for k in 0..req.steps {
        x = advance(req.sampler, &x, (sigmas[k], sigmas[k + 1]), velocity)?;
        if !progress(k + 1, &x) {
            return Err(PipelineError::Cancelled);
        }
    }
    Ok(x)
}

/// FLUX's velocity of packed latents at σ: the timestep as the pipeline passes it (t / 1000),
/// ids (0, row, column) for the patches and zeros for the text, the embedded guidance.
fn flux_velocity<'a>(
    f: &'a crate::torch::flux::FluxTransformer,
    req: &FlowRequest,
    pos: &'a Conditioning,
    (h, w): (i64, i64),
) -> impl Fn(&Tensor, f64) -> PResult<Tensor> + 'a {
    let img_ids = image_ids(h, w);
    let txt_ids = Tensor::zeros([pos.context.size()[1], 3], (Kind::Float, tch::Device::Cpu));
    let g = f
        .config
        .guidance_embeds
        .then(|| Tensor::from_slice(&[req.guidance as f32]));
    move |x: &Tensor, sigma: f64| {
        let t = Tensor::from_slice(&[(sigma as f32 * 1000.0) / 1000.0]);
        Ok(f.forward(&FluxInput {
            hidden: x,
            context: &pos.context,
            pooled: &pos.pooled,
            timestep: &t,
            guidance: g.as_ref(),
            img_ids: &img_ids,
            txt_ids: &txt_ids,
        }))
    }
}

/// SD 3's velocity at σ (timestep σ·1000): with a negative prompt, both in one batch (negative
/// first) mixed by the CFG scale.
fn sd3_velocity(
    m: &crate::torch::mmdit::Sd3Transformer,
    req: &FlowRequest,
    x: &Tensor,
    sigma: f64,
    (pos, neg): (&Conditioning, Option<&Conditioning>),
) -> PResult<Tensor> {
    let t = Tensor::from_slice(&[sigma as f32 * 1000.0]);
    let Some(n) = neg else {
        return m.forward(x, &t, &pos.context, &pos.pooled).map_err(compute);
    };
    let both =
        |a: &Tensor, b: &Tensor| Tensor::cat(&[a.to_device(b.device()), b.shallow_clone()], 0);
    let out = m
        .forward(
            &Tensor::cat(&[x, x], 0),
            &t.repeat([2]),
            &both(&n.context, &pos.context),
            &both(&n.pooled, &pos.pooled),
        )
        .map_err(compute)?
        .to_device(tch::Device::Cpu);
    let (u, c) = (out.narrow(0, 0, 1), out.narrow(0, 1, 1));
    Ok(&u + (c - &u) * req.cfg_scale)
}

/// One step from σ to σ_next: Euler's, or Heun's (the slopes at σ and at the Euler step's end,
/// averaged; Euler's when σ_next is 0, as diffusers' last step).
fn advance(
    sampler: FlowSampler,
    x: &Tensor,
    (sigma, next): (f64, f64),
    velocity: &dyn Fn(&Tensor, f64) -> PResult<Tensor>,
) -> PResult<Tensor> {
    let v = velocity(x, sigma)?;
    let euler = step(x, &v, sigma, next);
    if sampler == FlowSampler::Euler || next == 0.0 {
        return Ok(euler);
    }
    let v2 = velocity(&euler, next)?;
    let f32v = |t: &Tensor| t.to_device(x.device()).to_kind(Kind::Float);
    Ok(step(x, &((f32v(&v) + f32v(&v2)) * 0.5), sigma, next))
}

/// One Euler step along the velocity, in f32 as diffusers takes it.
fn step(x: &Tensor, v: &Tensor, sigma: f64, next: f64) -> Tensor {
    let dt = (next as f32 - sigma as f32) as f64;
    x + v.to_device(x.device()).to_kind(Kind::Float) * dt
}
