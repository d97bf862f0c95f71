//! LoRA training on a loaded [`StableDiffusion`]: trainable adapters in kohya's layout, the
//! denoising objective (epsilon or v targets, min-SNR-γ weighting, noise offset, per-sample
//! weights for prior preservation), AdamW with its state exposed for checkpoints, learning-rate
//! schedules and gradient clipping.
//!
//! The base weights stay plain tensors; only the adapters are [`Var`]s, so gradients (and the
//! memory they cost) exist for the LoRA alone. The model must come from
//! [`StableDiffusion::load_for_training`]: its ops record gradients everywhere.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::models::clip::ClipTextModel;
use crate::models::nn::{Conv2d, Linear};
use crate::models::unet::{AddedCond, Target, UNet};
use crate::pipeline::{Family, StableDiffusion};
use crate::schedulers::{NoiseSchedule, PredictionType};

/// Which UNet layers get a LoRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnetTargets {
    /// The attention projections only (to_q, to_k, to_v, to_out.0).
    Attention,
    /// Every linear (and 1×1 projection) of the transformer blocks: kohya's default.
    Transformer,
}

/// The shape of a LoRA network.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// network_dim.
    pub rank: usize,
    /// network_alpha: the adapter's output is scaled by alpha / rank.
    pub alpha: f64,
    /// conv_dim: also adapt the ResNet and resampling 3×3 convolutions (LoCon).
    pub conv_rank: Option<usize>,
    pub conv_alpha: f64,
    pub unet_targets: UnetTargets,
    /// Adapt the text encoder(s) too.
    pub text_encoder: bool,
}

/// Which learning rate a layer trains with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Group {
    Unet,
    Text,
}

/// One trainable adapter: down [r, in(, k, k)] initialised as PyTorch's Linear/Conv does, up
/// [out, r(, 1, 1)] zero, so a fresh network changes nothing.
pub struct TrainableLayer {
    /// kohya's module name, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`.
    pub key: String,
    pub group: Group,
    pub down: Var,
    pub up: Var,
    pub alpha: f64,
}

/// The adapters attached to a model.
pub struct LoraNetwork {
    pub layers: Vec<TrainableLayer>,
}

fn kaiming_uniform(shape: &[usize], rng: &mut ChaCha8Rng, device: &Device) -> Result<Tensor> {
    // PyTorch's default init (kaiming_uniform with a = √5): U(-1/√fan_in, 1/√fan_in).
    let fan_in: usize = shape[1..].iter().product();
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| rng.gen_range(-bound..bound) as f32)
        .collect();
    Tensor::from_vec(data, shape, device)
}

fn linear_layer(
    key: String,
    group: Group,
    l: &mut Linear,
    rank: usize,
    alpha: f64,
    rng: &mut ChaCha8Rng,
) -> Result<TrainableLayer> {
    let dev = l.weight.device().clone();
    let down = Var::from_tensor(&kaiming_uniform(&[rank, l.in_dim()], rng, &dev)?)?;
    let up = Var::zeros((l.out_dim(), rank), DType::F32, &dev)?;
    l.adapters.push((
        down.as_tensor().clone(),
        up.as_tensor().clone(),
        alpha / rank as f64,
    ));
    Ok(TrainableLayer {
        key,
        group,
        down,
        up,
        alpha,
    })
}

fn conv_layer(
    key: String,
    c: &mut Conv2d,
    rank: usize,
    alpha: f64,
    rng: &mut ChaCha8Rng,
) -> Result<TrainableLayer> {
    let dev = c.weight.device().clone();
    let (out, inp, k, _) = c.weight.dims4()?;
    let down = Var::from_tensor(&kaiming_uniform(&[rank, inp, k, k], rng, &dev)?)?;
    let up = Var::zeros((out, rank, 1, 1), DType::F32, &dev)?;
    c.adapters.push((
        down.as_tensor().clone(),
        up.as_tensor().clone(),
        alpha / rank as f64,
    ));
    Ok(TrainableLayer {
        key,
        group: Group::Unet,
        down,
        up,
        alpha,
    })
}

fn is_attention_projection(path: &str) -> bool {
    [".to_q", ".to_k", ".to_v", ".to_out.0"]
        .iter()
        .any(|s| path.ends_with(s))
}

impl LoraNetwork {
    /// Attach fresh adapters to `model` (which keeps them as run-time adapters); `seed` fixes the
    /// down-projections' initial values.
    pub fn attach(model: &mut StableDiffusion, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        let family = model.family;
        let nets = model.candle_mut().ok_or_else(|| {
            candle_core::Error::Msg(
                "train a model loaded with StableDiffusion::load_for_training".into(),
            )
        })?;
        let texts = nets.text.iter_mut().collect();
        Self::attach_parts(&mut nets.unet, texts, family, cfg, seed)
    }

    /// [`LoraNetwork::attach`] on a UNet and text encoders of a model of `family`.
    pub fn attach_parts(
        unet: &mut UNet,
        texts: Vec<&mut ClipTextModel>,
        family: Family,
        cfg: &LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        if cfg.rank == 0 {
            candle_core::bail!("LoRA rank must be at least 1");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ucfg = unet.config.clone();
        let mut layers = Vec::new();
        for (path, target) in unet.targets_mut() {
            let in_transformer = path.contains(".attentions.");
            let in_conv_module = path.contains(".resnets.")
                || path.contains(".downsamplers.")
                || path.contains(".upsamplers.");
            // SDXL LoRAs carry LDM names (as kohya's sdxl scripts write them); SD 1.x/2.x
            // diffusers names.
            let name = if family == Family::Sdxl {
                crate::models::ldm::unet_name(&format!("{path}.weight"), &ucfg)
                    .map(|n| n.trim_end_matches(".weight").to_string())
                    .unwrap_or_else(|| path.clone())
            } else {
                path.clone()
            };
            let key = format!("lora_unet_{}", name.replace('.', "_"));
            let transformer = cfg.unet_targets == UnetTargets::Transformer;
            match target {
                // Linears of the attention blocks (all, or the attention projections only).
                Target::Linear(l)
                    if in_transformer && (transformer || is_attention_projection(&path)) =>
                {
                    layers.push(linear_layer(
                        key,
                        Group::Unet,
                        l,
                        cfg.rank,
                        cfg.alpha,
                        &mut rng,
                    )?)
                }
                // proj_in / proj_out as 1×1 convolutions (SD 1.x).
                Target::Conv(c) if in_transformer && transformer => {
                    layers.push(conv_layer(key, c, cfg.rank, cfg.alpha, &mut rng)?)
                }
                // With conv_dim, kohya also adapts the ResNet/resampler modules: their linears
                // and 1×1 convolutions at network_dim, 3×3 convolutions at conv_dim.
                Target::Linear(l) if in_conv_module && cfg.conv_rank.is_some() => layers.push(
                    linear_layer(key, Group::Unet, l, cfg.rank, cfg.alpha, &mut rng)?,
                ),
                Target::Conv(c) if in_conv_module => {
                    let k = c.weight.dim(2)?;
                    match cfg.conv_rank {
                        Some(r) if k > 1 => {
                            layers.push(conv_layer(key, c, r, cfg.conv_alpha, &mut rng)?)
                        }
                        Some(_) => layers.push(conv_layer(key, c, cfg.rank, cfg.alpha, &mut rng)?),
                        None => {}
                    }
                }
                _ => {}
            }
        }
        if cfg.text_encoder {
            let n = texts.len();
            for (i, te) in texts.into_iter().enumerate() {
                let prefix = match (n, i) {
                    (1, _) => "lora_te_".to_string(),
                    (_, i) => format!("lora_te{}_", i + 1),
                };
                for (path, l) in te.linears_mut() {
                    let p = path.strip_prefix("text_model.").unwrap_or(&path);
                    let key = format!("{prefix}text_model_{}", p.replace('.', "_"));
                    layers.push(linear_layer(
                        key,
                        Group::Text,
                        l,
                        cfg.rank,
                        cfg.alpha,
                        &mut rng,
                    )?);
                }
            }
        }
        if layers.is_empty() {
            candle_core::bail!("no layer of this model matches the LoRA targets");
        }
        Ok(Self { layers })
    }

    /// Number of trainable numbers.
    pub fn parameter_count(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.down.elem_count() + l.up.elem_count())
            .sum()
    }

    /// Every trainable tensor with its learning-rate group, in a fixed order.
    pub fn vars(&self) -> Vec<(&Var, Group)> {
        self.layers
            .iter()
            .flat_map(|l| [(&l.down, l.group), (&l.up, l.group)])
            .collect()
    }

    /// The tensor names of [`LoraNetwork::vars`], in the same order.
    pub fn var_names(&self) -> Vec<String> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    format!("{}.lora_down.weight", l.key),
                    format!("{}.lora_up.weight", l.key),
                ]
            })
            .collect()
    }

    /// The network in kohya's layout: `<module>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
    /// in `dtype` (alpha stays a scalar of that dtype, as kohya writes it).
    pub fn tensors(&self, dtype: DType) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for l in &self.layers {
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(dtype);
            out.insert(
                format!("{}.lora_down.weight", l.key),
                cpu(l.down.as_tensor())?,
            );
            out.insert(format!("{}.lora_up.weight", l.key), cpu(l.up.as_tensor())?);
            out.insert(
                format!("{}.alpha", l.key),
                Tensor::new(l.alpha as f32, &Device::Cpu)?.to_dtype(dtype)?,
            );
        }
        Ok(out)
    }

    /// Write the network to a `.safetensors` file with `metadata` in its header.
    pub fn save(
        &self,
        path: &Path,
        dtype: DType,
        metadata: &HashMap<String, String>,
    ) -> std::result::Result<(), String> {
        let tensors = self.tensors(dtype).map_err(|e| e.to_string())?;
        let bytes = serialize(&tensors, metadata)?;
        std::fs::write(path, bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Set the weights from tensors named as [`LoraNetwork::var_names`] (a checkpoint).
    pub fn load_weights(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        for (name, (var, _)) in self.var_names().iter().zip(self.vars()) {
            let t = tensors
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("checkpoint lacks {name}")))?;
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "{name}: checkpoint has shape {:?}, the network {:?}",
                    t.dims(),
                    var.dims()
                );
            }
            var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }
}

/// A safetensors file's bytes, tensors sorted by name, with `metadata`.
pub fn serialize(
    tensors: &HashMap<String, Tensor>,
    metadata: &HashMap<String, String>,
) -> std::result::Result<Vec<u8>, String> {
    let mut data: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    data.sort_by_key(|(k, _)| *k);
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    safetensors::serialize(data, meta).map_err(|e| e.to_string())
}

/// One batch, ready for the UNet.
pub struct Batch {
    /// Scaled latents [B, 4, h, w], f32.
    pub latents: Tensor,
    /// Text conditioning [B, 77k, D].
    pub context: Tensor,
    /// SDXL's pooled text embedding and size/crop ids.
    pub added: Option<AddedCond>,
    /// Per-sample loss weights (1 for training images, the prior-loss weight for class images).
    pub weights: Vec<f32>,
}

/// The denoising objective.
#[derive(Debug, Clone)]
pub struct Objective {
    pub prediction: PredictionType,
    /// min-SNR-γ loss weighting (Hang et al. 2023); None turns it off.
    pub min_snr_gamma: Option<f64>,
    /// Adds offset·N(0,1) per sample and channel to the noise (darker darks, brighter lights).
    pub noise_offset: f64,
    /// Timesteps are drawn uniformly from [min, max).
    pub min_timestep: usize,
    pub max_timestep: usize,
}

impl Objective {
    /// The batch's loss: per-sample mean squared error against the target, weighted, averaged.
    /// `rng` draws timesteps and noise (seed it per step for reproducible, resumable runs).
    pub fn loss(
        &self,
        model: &StableDiffusion,
        schedule: &NoiseSchedule,
        batch: &Batch,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        let nets = model.candle().ok_or_else(|| {
            candle_core::Error::Msg(
                "train a model loaded with StableDiffusion::load_for_training".into(),
            )
        })?;
        self.unet_loss(&nets.unet, model.dtype(), schedule, batch, rng)
    }

    /// [`Objective::loss`] for a bare UNet computing in `dtype`.
    pub fn unet_loss(
        &self,
        unet: &UNet,
        dtype: DType,
        schedule: &NoiseSchedule,
        batch: &Batch,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        let x0 = &batch.latents;
        let (b, c, h, w) = x0.dims4()?;
        let dev = x0.device();
        let lo = self.min_timestep.min(schedule.len().saturating_sub(1));
        let hi = self.max_timestep.clamp(lo + 1, schedule.len());
        let ts: Vec<i64> = (0..b).map(|_| rng.gen_range(lo..hi) as i64).collect();
        let draws = |n: usize, rng: &mut ChaCha8Rng| -> Vec<f32> {
            (0..n).map(|_| StandardNormal.sample(rng)).collect()
        };
        let mut noise = Tensor::from_vec(draws(b * c * h * w, rng), (b, c, h, w), dev)?;
        if self.noise_offset != 0.0 {
            let off = Tensor::from_vec(draws(b * c, rng), (b, c, 1, 1), dev)?;
            noise = noise.broadcast_add(&off.affine(self.noise_offset, 0.0)?)?;
        }
        let per = |f: &dyn Fn(f64) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = ts
                .iter()
                .map(|&t| f(schedule.alpha_cumprod(t)) as f32)
                .collect();
            Tensor::from_vec(v, (b, 1, 1, 1), dev)
        };
        let sa = per(&|a| a.sqrt())?;
        let s1a = per(&|a| (1.0 - a).sqrt())?;
        let noisy = (x0.broadcast_mul(&sa)? + noise.broadcast_mul(&s1a)?)?;
        let target = match self.prediction {
            PredictionType::Epsilon => noise.clone(),
            PredictionType::VPrediction => (noise.broadcast_mul(&sa)? - x0.broadcast_mul(&s1a)?)?,
            other => candle_core::bail!("training for {other:?} prediction is not supported"),
        };
        let t = Tensor::from_vec(ts.iter().map(|&t| t as f32).collect::<Vec<_>>(), b, dev)?;
        let pred = unet.forward(
            &noisy.to_dtype(dtype)?,
            &t,
            &batch.context.to_dtype(dtype)?,
            batch.added.as_ref(),
        )?;
        let err = (pred.to_dtype(DType::F32)? - target)?.sqr()?;
        let per_sample = err.reshape((b, ()))?.mean(D::Minus1)?;
        let weights: Vec<f32> = ts
            .iter()
            .zip(&batch.weights)
            .map(|(&t, &wgt)| {
                let snr_w = match self.min_snr_gamma {
                    None => 1.0,
                    Some(g) => {
                        let snr = schedule.snr(t);
                        match self.prediction {
                            PredictionType::VPrediction => snr.min(g) / (snr + 1.0),
                            _ => snr.min(g) / snr,
                        }
                    }
                };
                (snr_w * wgt as f64) as f32
            })
            .collect();
        let weights = Tensor::from_vec(weights, b, dev)?;
        (per_sample * weights)?.mean_all()
    }
}

/// AdamW's hyper-parameters (PyTorch's names and defaults, weight decay as kohya's 0.01).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// AdamW (decoupled weight decay, bias-corrected moments), with its state open for checkpoints.
pub struct AdamW {
    pub params: AdamWParams,
    /// Optimizer steps taken.
    pub step: usize,
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    pub fn new(params: AdamWParams, vars: &[&Var]) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            params,
            step: 0,
            m: vars.iter().map(|v| zeros(v)).collect::<Result<_>>()?,
            v: vars.iter().map(|v| zeros(v)).collect::<Result<_>>()?,
        })
    }

    /// One update of every var with its gradient and learning rate.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lrs: &[f64]) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        for (i, var) in vars.iter().enumerate() {
            let g = &grads[i];
            let lr = lrs[i];
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let mhat = (&m / bc1)?;
            let vhat = (&v / bc2)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            let update = (mhat / (vhat.sqrt()? + p.eps)?)?;
            var.set(&(decayed - (update * lr)?)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Scale `grads` so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads.iter() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}

/// Learning-rate schedules (diffusers' `get_scheduler` names and shapes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
    CosineWithRestarts,
}

impl LrSchedule {
    pub const NAMES: [&'static str; 5] = [
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "cosine_with_restarts" => Self::CosineWithRestarts,
            _ => return None,
        })
    }

    /// The multiplier of the base rate at optimizer step `step` (0-based) of `total`.
    pub fn factor(self, step: usize, warmup: usize, total: usize, cycles: usize) -> f64 {
        if self == Self::Constant {
            return 1.0;
        }
        if step < warmup {
            return step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / total.saturating_sub(warmup).max(1) as f64;
        match self {
            Self::Constant | Self::ConstantWithWarmup => 1.0,
            Self::Linear => (1.0 - progress).max(0.0),
            Self::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
            Self::CosineWithRestarts => {
                if progress >= 1.0 {
                    0.0
                } else {
                    let c = (cycles.max(1) as f64 * progress) % 1.0;
                    (0.5 * (1.0 + (std::f64::consts::PI * c).cos())).max(0.0)
                }
            }
        }
    }
}

/// A reproducible random stream for (seed, purpose, index): a run resumed at step n draws what an
/// uninterrupted run drew at step n.
pub fn stream(seed: u64, purpose: u64, index: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(purpose);
    rng.set_word_pos((index as u128) << 32);
    rng
}
