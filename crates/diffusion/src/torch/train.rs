//! LoRA training on libtorch: trainable adapters in kohya's layout attached to a model's UNet (and
//! text encoders), the denoising objective, AdamW with its state open for checkpoints, and
//! gradient clipping. libtorch's autograd computes the gradients; the base weights never require
//! them, so gradients (and the memory they cost) exist for the adapters alone.

use std::collections::HashMap;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::{Kind, Tensor};

use super::clip::ClipTextModel;
use super::lora::{unet_targets, Target};
use super::nn::{Adapter, Conv2d, Linear};
use super::unet::{AddedCond, UNet};
use super::weights::{from_candle, to_candle};
use super::{msg, Result, TorchModels};
use crate::pipeline::Family;
use crate::schedulers::{NoiseSchedule, PredictionType};
use crate::train::{AdamWParams, Group, LoraConfig, Objective, UnetTargets};

/// One trainable adapter: down [r, in(, k, k)] initialised as PyTorch's Linear/Conv does, up
/// [out, r(, 1, 1)] zero, so a fresh network changes nothing.
pub struct TrainableLayer {
    /// kohya's module name, e.g. `lora_unet_down_blocks_0_attentions_0_proj_in`.
    pub key: String,
    pub group: Group,
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: f64,
}

/// The adapters attached to a model.
pub struct LoraNetwork {
    pub layers: Vec<TrainableLayer>,
}

/// PyTorch's default init (kaiming_uniform with a = √5): U(-1/√fan_in, 1/√fan_in), drawn from
/// `rng` (so a seed fixes a network on any device), f32 on `device`, requiring gradients.
fn kaiming_uniform(shape: &[i64], rng: &mut ChaCha8Rng, device: tch::Device) -> Tensor {
    let fan_in: i64 = shape[1..].iter().product();
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    let n: i64 = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|_| rng.gen_range(-bound..bound) as f32)
        .collect();
    Tensor::from_slice(&data)
        .view(shape)
        .to_device(device)
        .set_requires_grad(true)
}

fn zeros(shape: &[i64], device: tch::Device) -> Tensor {
    Tensor::zeros(shape, (Kind::Float, device)).set_requires_grad(true)
}

fn attach(
    adapters: &mut Vec<Adapter>,
    key: String,
    group: Group,
    (down, up): (Tensor, Tensor),
    rank: i64,
    alpha: f64,
) -> TrainableLayer {
    adapters.push(Adapter {
        down: down.shallow_clone(),
        up: up.shallow_clone(),
        scale: alpha / rank as f64,
    });
    TrainableLayer {
        key,
        group,
        down,
        up,
        alpha,
    }
}

fn linear_layer(
    key: String,
    group: Group,
    l: &mut Linear,
    (rank, alpha): (i64, f64),
    rng: &mut ChaCha8Rng,
) -> TrainableLayer {
    let dev = l.weight.device();
    let down = kaiming_uniform(&[rank, l.in_dim()], rng, dev);
    let up = zeros(&[l.out_dim(), rank], dev);
    attach(&mut l.adapters, key, group, (down, up), rank, alpha)
}

fn conv_layer(
    key: String,
    c: &mut Conv2d,
    (rank, alpha): (i64, f64),
    rng: &mut ChaCha8Rng,
) -> TrainableLayer {
    let (dev, s) = (c.weight.device(), c.weight.size());
    let down = kaiming_uniform(&[rank, s[1], s[2], s[3]], rng, dev);
    let up = zeros(&[s[0], rank, 1, 1], dev);
    attach(&mut c.adapters, key, Group::Unet, (down, up), rank, alpha)
}

fn is_attention_projection(path: &str) -> bool {
    [".to_q", ".to_k", ".to_v", ".to_out.0"]
        .iter()
        .any(|s| path.ends_with(s))
}

/// kohya's module key of a UNet layer: SDXL LoRAs carry LDM names (as kohya's sdxl scripts write
/// them), SD 1.x/2.x diffusers names.
fn unet_key(path: &str, family: Family, unet: &crate::models::config::UNetConfig) -> String {
    let name = if family == Family::Sdxl {
        crate::models::ldm::unet_name(&format!("{path}.weight"), unet)
            .map(|n| n.trim_end_matches(".weight").to_string())
            .unwrap_or_else(|| path.to_string())
    } else {
        path.to_string()
    };
    format!("lora_unet_{}", name.replace('.', "_"))
}

impl LoraNetwork {
    /// Fresh adapters on `models` (which keep them as run-time adapters), as `cfg` says; `seed`
    /// fixes the down-projections' initial values.
    pub fn attach(models: &mut TorchModels, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        let texts = models.text.iter_mut().collect();
        Self::attach_parts(&mut models.unet, texts, models.family, cfg, seed)
    }

    /// [`LoraNetwork::attach`] on a UNet and the text encoders of a model of `family`.
    pub fn attach_parts(
        unet: &mut UNet,
        texts: Vec<&mut ClipTextModel>,
        family: Family,
        cfg: &LoraConfig,
        seed: u64,
    ) -> Result<Self> {
        if cfg.rank == 0 {
            return Err(msg("LoRA rank must be at least 1"));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let ucfg = unet.config.clone();
        let main = (cfg.rank as i64, cfg.alpha);
        let transformer = cfg.unet_targets == UnetTargets::Transformer;
        let mut layers = Vec::new();
        for (path, target) in unet_targets(unet) {
            let in_transformer = path.contains(".attentions.");
            let in_conv_module = path.contains(".resnets.")
                || path.contains(".downsamplers.")
                || path.contains(".upsamplers.");
            let key = unet_key(&path, family, &ucfg);
            match target {
                // Linears of the attention blocks (all, or the attention projections only).
                Target::Linear(l)
                    if in_transformer && (transformer || is_attention_projection(&path)) =>
                {
                    layers.push(linear_layer(key, Group::Unet, l, main, &mut rng))
                }
                // proj_in / proj_out as 1×1 convolutions (SD 1.x).
                Target::Conv(c) if in_transformer && transformer => {
                    layers.push(conv_layer(key, c, main, &mut rng))
                }
                // With conv_dim, kohya also adapts the ResNet/resampler modules: their linears
                // and 1×1 convolutions at network_dim, 3×3 convolutions at conv_dim.
                Target::Linear(l) if in_conv_module && cfg.conv_rank.is_some() => {
                    layers.push(linear_layer(key, Group::Unet, l, main, &mut rng))
                }
                Target::Conv(c) if in_conv_module => match cfg.conv_rank {
                    Some(r) if c.weight.size()[2] > 1 => {
                        layers.push(conv_layer(key, c, (r as i64, cfg.conv_alpha), &mut rng))
                    }
                    Some(_) => layers.push(conv_layer(key, c, main, &mut rng)),
                    None => {}
                },
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
                    layers.push(linear_layer(key, Group::Text, l, main, &mut rng));
                }
            }
        }
        if layers.is_empty() {
            return Err(msg("no layer of this model matches the LoRA targets"));
        }
        Ok(Self { layers })
    }

    /// Number of trainable numbers.
    pub fn parameter_count(&self) -> usize {
        self.layers
            .iter()
            .map(|l| l.down.numel() + l.up.numel())
            .sum()
    }

    /// Every trainable tensor with its learning-rate group, in a fixed order.
    pub fn vars(&self) -> Vec<(&Tensor, Group)> {
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
    pub fn tensors(
        &self,
        dtype: candle_core::DType,
    ) -> Result<HashMap<String, candle_core::Tensor>> {
        let mut out = HashMap::new();
        for l in &self.layers {
            let cpu = |t: &Tensor| Ok::<_, super::Error>(to_candle(t)?.to_dtype(dtype)?);
            out.insert(format!("{}.lora_down.weight", l.key), cpu(&l.down)?);
            out.insert(format!("{}.lora_up.weight", l.key), cpu(&l.up)?);
            let alpha = candle_core::Tensor::new(l.alpha as f32, &candle_core::Device::Cpu)?;
            out.insert(format!("{}.alpha", l.key), alpha.to_dtype(dtype)?);
        }
        Ok(out)
    }

    /// Write the network to a `.safetensors` file with `metadata` in its header.
    pub fn save(
        &self,
        path: &Path,
        dtype: candle_core::DType,
        metadata: &HashMap<String, String>,
    ) -> Result<()> {
        let bytes = crate::train::serialize(&self.tensors(dtype)?, metadata).map_err(msg)?;
        std::fs::write(path, bytes).map_err(|e| msg(format!("{}: {e}", path.display())))
    }

    /// Set the weights from tensors named as [`LoraNetwork::var_names`] (a checkpoint).
    pub fn load_weights(&self, tensors: &HashMap<String, candle_core::Tensor>) -> Result<()> {
        let vars: Vec<&Tensor> = self.vars().into_iter().map(|(v, _)| v).collect();
        load_named(&self.var_names(), &vars, tensors)
    }

    /// Clears every adapter's accumulated gradient.
    pub fn zero_grad(&self) {
        zero_grads(self.vars().into_iter().map(|(v, _)| v));
    }

    /// Every adapter's accumulated gradient (zeros where none flowed), in [`Self::vars`] order.
    pub fn grads(&self) -> Vec<Tensor> {
        grads_of(self.vars().into_iter().map(|(v, _)| v))
    }
}

/// Sets each of `vars` to the checkpoint tensor of its name in `names`.
pub fn load_named(
    names: &[String],
    vars: &[&Tensor],
    tensors: &HashMap<String, candle_core::Tensor>,
) -> Result<()> {
    for (name, var) in names.iter().zip(vars) {
        let t = tensors
            .get(name)
            .ok_or_else(|| msg(format!("checkpoint lacks {name}")))?;
        set(var, &from_candle(t)?, name)?;
    }
    Ok(())
}

/// Clears the accumulated gradients of `vars`.
pub fn zero_grads<'a>(vars: impl IntoIterator<Item = &'a Tensor>) {
    for v in vars {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// The accumulated gradients of `vars` (zeros where none flowed), in order.
pub fn grads_of<'a>(vars: impl IntoIterator<Item = &'a Tensor>) -> Vec<Tensor> {
    vars.into_iter()
        .map(|v| {
            let g = v.grad();
            if g.defined() {
                g.detach().copy()
            } else {
                v.zeros_like()
            }
        })
        .collect()
}

/// Overwrite `var`'s values (same shape) without recording the write.
fn set(var: &Tensor, values: &Tensor, name: &str) -> Result<()> {
    if values.size() != var.size() {
        return Err(msg(format!(
            "{name}: checkpoint has shape {:?}, the network {:?}",
            values.size(),
            var.size()
        )));
    }
    let mut v = var.shallow_clone();
    tch::no_grad(|| v.f_copy_(&values.to_device(var.device()).to_kind(var.kind())))?;
    Ok(())
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

/// One batch noised for the objective: the UNet's input, timesteps, target and loss weights.
struct Noised {
    noisy: Tensor,
    t: Tensor,
    target: Tensor,
    weights: Tensor,
}

impl Objective {
    /// The batch's loss: per-sample mean squared error against the target, weighted, averaged.
    /// `rng` draws timesteps and noise (seed it per step for reproducible, resumable runs).
    pub fn loss(
        &self,
        unet: &UNet,
        schedule: &NoiseSchedule,
        batch: &Batch,
        rng: &mut ChaCha8Rng,
    ) -> Result<Tensor> {
        let n = self.noised(schedule, batch, rng)?;
        let pred = unet.forward(&n.noisy, &n.t, &batch.context, batch.added.as_ref())?;
        Ok(weighted_mse(&pred, &n))
    }

    /// [`Objective::loss`] × `scale`, and its backward pass, with the UNet checkpointed layer by
    /// layer ([`UNet::backward_checkpointed`]): the gradients [`Objective::loss`]'s backward
    /// pass would give, for the memory of one layer's intermediates. Returns the (unscaled) loss.
    pub fn backward_checkpointed(
        &self,
        unet: &UNet,
        schedule: &NoiseSchedule,
        batch: &Batch,
        rng: &mut ChaCha8Rng,
        scale: f64,
    ) -> Result<f64> {
        let n = self.noised(schedule, batch, rng)?;
        let scaled = unet.backward_checkpointed(
            &n.noisy,
            &n.t,
            &batch.context,
            batch.added.as_ref(),
            |pred| Ok(weighted_mse(pred, &n) * scale),
        )?;
        Ok(scaled / scale)
    }

    /// Draws timesteps and noise for `batch` and noises it.
    fn noised(
        &self,
        schedule: &NoiseSchedule,
        batch: &Batch,
        rng: &mut ChaCha8Rng,
    ) -> Result<Noised> {
        let x0 = &batch.latents;
        let size = x0.size();
        let (b, dev) = (size[0], x0.device());
        let lo = self.min_timestep.min(schedule.len().saturating_sub(1));
        let hi = self.max_timestep.clamp(lo + 1, schedule.len());
        let ts: Vec<i64> = (0..b).map(|_| rng.gen_range(lo..hi) as i64).collect();
        let draws = |n: i64, rng: &mut ChaCha8Rng| -> Vec<f32> {
            (0..n).map(|_| StandardNormal.sample(rng)).collect()
        };
        let drawn = |shape: &[i64], rng: &mut ChaCha8Rng| {
            Tensor::from_slice(&draws(shape.iter().product(), rng))
                .view(shape)
                .to_device(dev)
        };
        let mut noise = drawn(&size, rng);
        if self.noise_offset != 0.0 {
            noise += drawn(&[b, size[1], 1, 1], rng) * self.noise_offset;
        }
        let per = |f: &dyn Fn(f64) -> f64| {
            let v: Vec<f32> = ts
                .iter()
                .map(|&t| f(schedule.alpha_cumprod(t)) as f32)
                .collect();
            Tensor::from_slice(&v).to_device(dev).view([b, 1, 1, 1])
        };
        let (sa, s1a) = (per(&|a| a.sqrt()), per(&|a| (1.0 - a).sqrt()));
        let noisy = x0 * &sa + &noise * &s1a;
        let target = match self.prediction {
            PredictionType::Epsilon => noise,
            PredictionType::VPrediction => &noise * &sa - x0 * &s1a,
            other => {
                return Err(msg(format!(
                    "training for {other:?} prediction is not supported"
                )))
            }
        };
        let steps: Vec<f32> = ts.iter().map(|&t| t as f32).collect();
        let weights: Vec<f32> = ts
            .iter()
            .zip(&batch.weights)
            .map(|(&t, &w)| (self.snr_weight(schedule, t) * w as f64) as f32)
            .collect();
        Ok(Noised {
            noisy,
            t: Tensor::from_slice(&steps).to_device(dev),
            target,
            weights: Tensor::from_slice(&weights).to_device(dev),
        })
    }
}

/// The per-sample mean squared error of `pred` against the target, weighted, averaged.
fn weighted_mse(pred: &Tensor, n: &Noised) -> Tensor {
    let b = n.target.size()[0];
    let per_sample = (pred.to_kind(Kind::Float) - &n.target)
        .square()
        .reshape([b, -1])
        .mean_dim(&[1i64][..], false, Kind::Float);
    (per_sample * &n.weights).mean(Kind::Float)
}

/// A caption's conditioning as LoRA training sees it: its first 75 tokens framed to 77 (kohya's
/// default `max_token_length`), through every text encoder with gradients where they have
/// adapters: [1, 77, D] (SDXL: both encoders' penultimate states side by side) and SDXL's pooled
/// embedding. Emphasis weights apply as in generation.
pub fn encode_caption(
    model: &crate::pipeline::StableDiffusion,
    caption: &str,
) -> Result<(Tensor, Option<Tensor>)> {
    super::inversion::encode_caption_with(model, caption, None)
}

/// Token states scaled by their weights, the original mean restored (A1111's emphasis).
pub(crate) fn weighted(z: &Tensor, weights: &[f32]) -> Tensor {
    if weights.iter().all(|&w| w == 1.0) {
        return z.shallow_clone();
    }
    let before = z.mean(Kind::Float);
    let w = Tensor::from_slice(weights)
        .to_device(z.device())
        .view([1, -1, 1]);
    let scaled = z * w;
    let after = scaled.mean(Kind::Float);
    if after.double_value(&[]) == 0.0 {
        return scaled;
    }
    &scaled * (before / after)
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
    pub fn new(params: AdamWParams, vars: &[&Tensor]) -> Self {
        let zeros = || vars.iter().map(|v| v.zeros_like().detach()).collect();
        Self {
            params,
            step: 0,
            m: zeros(),
            v: zeros(),
        }
    }

    /// One update of every var with its gradient and learning rate.
    pub fn step(&mut self, vars: &[&Tensor], grads: &[Tensor], lrs: &[f64]) -> Result<()> {
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - p.beta1.powi(t), 1.0 - p.beta2.powi(t));
        tch::no_grad(|| {
            for (i, var) in vars.iter().enumerate() {
                let (g, lr) = (&grads[i], lrs[i]);
                let m = &self.m[i] * p.beta1 + g * (1.0 - p.beta1);
                let v = &self.v[i] * p.beta2 + g.square() * (1.0 - p.beta2);
                let update = (&m / bc1) / ((&v / bc2).sqrt() + p.eps);
                let next = *var * (1.0 - lr * p.weight_decay) - update * lr;
                var.shallow_clone().f_copy_(&next)?;
                self.m[i] = m;
                self.v[i] = v;
            }
            Ok(())
        })
    }
}

/// Scale `grads` so their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> f64 {
    let total: f64 = grads
        .iter()
        .map(|g| g.square().sum(Kind::Double).double_value(&[]))
        .sum();
    let norm = total.sqrt();
    if norm > max_norm && norm > 0.0 {
        let k = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            *g = &*g * k;
        }
    }
    norm
}
