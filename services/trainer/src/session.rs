//! One training run on a loaded model, free of any I/O: prepared examples in, optimizer steps,
//! checkpoints as bytes, the LoRA file as bytes. The service wraps it with the bus and the store;
//! tests and the bench drive it directly.
//!
//! Reproducibility: every random draw of optimizer step `s` (batch order, captions, flips,
//! timesteps, noise) comes from streams keyed by (seed, s), so a run resumed from a checkpoint at
//! step `s` continues exactly as the uninterrupted run would have.

use std::collections::HashMap;

use atelier_contracts::embedding::LearnRate;
use atelier_contracts::{LossPoint, TrainSpec};
use atelier_diffusion::pipeline::{Family, StableDiffusion};
use atelier_diffusion::schedulers::{NoiseSchedule, PredictionType};
use atelier_diffusion::torch as engine;
use atelier_diffusion::torch::inversion::{encode_caption_with, TrainableEmbedding};
use atelier_diffusion::torch::train::encode_caption;
use atelier_diffusion::torch::weights::{from_candle, to_candle};
use atelier_diffusion::train::{
    clip_grad_norm, stream, AdamW, AdamWParams, Batch, Group, LoraConfig, LoraNetwork, LrSchedule,
    Objective, UnetTargets,
};
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use sha2::{Digest, Sha256};

use crate::data::{epoch_batches, escape_caption, fit_to, Bucketing, CaptionOps};
use crate::params::Params;

const PURPOSE_ORDER: u64 = 1;
const PURPOSE_STEP: u64 = 2;
const PURPOSE_INIT: u64 = 3;
const PURPOSE_EVAL: u64 = 4;

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Bad input found once the model or the data is known.
    #[error("{0}")]
    Invalid(String),
    #[error("compute: {0}")]
    Compute(#[from] candle_core::Error),
    #[error("compute: {0}")]
    Torch(#[from] engine::Error),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
}

/// An image ready to train: its latents (and its mirror's, for flip_aug) on the model's device,
/// in f32, caption and weight.
pub struct Example {
    pub latents: engine::Tensor,
    pub flipped: Option<engine::Tensor>,
    pub bucket: (u32, u32),
    pub caption: String,
    /// 1 for training images, the prior-loss weight for DreamBooth class images.
    pub weight: f32,
    pub repeats: u32,
    /// Counts toward kohya's ss_num_reg_images rather than ss_num_train_images.
    pub is_class: bool,
}

/// An image to prepare.
pub struct Source {
    pub image: image::RgbImage,
    pub caption: String,
    pub weight: f32,
    pub repeats: u32,
    pub is_class: bool,
}

/// Bucket, crop and VAE-encode every image once (kohya's cache_latents).
pub fn prepare(
    model: &StableDiffusion,
    spec: &TrainSpec,
    sources: Vec<Source>,
) -> Result<Vec<Example>, TrainError> {
    let bucketing = Bucketing {
        resolution: spec.resolution,
        enabled: spec.enable_bucket,
        min: spec.min_bucket_reso,
        max: spec.max_bucket_reso,
        no_upscale: spec.bucket_no_upscale,
    };
    let f = model.vae_scale() as u32;
    let device = model.torch().vae.device();
    let mut out = Vec::with_capacity(sources.len());
    for s in sources {
        let (w, h) = bucketing.bucket_for(s.image.width(), s.image.height());
        if w % f != 0 || h % f != 0 {
            return Err(TrainError::Invalid(format!(
                "bucket {w}x{h} is not a multiple of this model's VAE factor {f}"
            )));
        }
        let img = fit_to(&s.image, w, h);
        let encode = |img: &image::RgbImage| -> Result<engine::Tensor, TrainError> {
            let z = model
                .encode_image(img, w as usize, h as usize)
                .map_err(|e| TrainError::Invalid(e.to_string()))?;
            Ok(from_candle(&z)?.to_device(device))
        };
        let latents = encode(&img)?;
        let flipped = if spec.flip_aug {
            Some(encode(&image::imageops::flip_horizontal(&img))?)
        } else {
            None
        };
        out.push(Example {
            latents,
            flipped,
            bucket: (w, h),
            caption: s.caption,
            weight: s.weight,
            repeats: s.repeats.max(1),
            is_class: s.is_class,
        });
    }
    if out.is_empty() {
        return Err(TrainError::Invalid("no training images".into()));
    }
    Ok(out)
}

/// A training run in memory.
pub struct Session {
    model: StableDiffusion,
    params: Params,
    /// Textual inversion's learning-rate schedule (A1111's), when training an embedding.
    learn_rate: Option<LearnRate>,
    optimizer: AdamW,
    objective: Objective,
    schedule: NoiseSchedule,
    lr_schedule: LrSchedule,
    spec: TrainSpec,
    examples: Vec<Example>,
    captions: CaptionOps,
    batches_per_epoch: usize,
    epoch_cache: Option<(usize, Vec<Vec<usize>>)>,
    text_cache: HashMap<String, (engine::Tensor, Option<engine::Tensor>)>,
    /// Optimizer steps done.
    pub step: u32,
    pub history: Vec<LossPoint>,
    pub started_at: chrono::DateTime<chrono::Utc>,
}

impl Session {
    /// A fresh run on `model` (loaded on libtorch).
    pub fn new(
        model: StableDiffusion,
        spec: &TrainSpec,
        examples: Vec<Example>,
    ) -> Result<Self, TrainError> {
        Self::starting_from(model, spec, examples, None)
    }

    /// A fresh run; for textual inversion, continuing the embedding file `embedding` (its
    /// vectors and step) when given, else one made from the spec's `init_text`.
    pub fn starting_from(
        mut model: StableDiffusion,
        spec: &TrainSpec,
        examples: Vec<Example>,
        embedding: Option<&[u8]>,
    ) -> Result<Self, TrainError> {
        spec.check().map_err(TrainError::Invalid)?;
        if examples.is_empty() {
            return Err(TrainError::Invalid("no training images".into()));
        }
        let (params, learn_rate) = match &spec.embedding {
            None => (Params::Lora(Self::attach(&mut model, spec)?), None),
            Some(e) => {
                let emb = match embedding {
                    Some(bytes) => TrainableEmbedding::from_file(&model, &spec.output_name, bytes)?,
                    None => TrainableEmbedding::from_text(
                        &model,
                        &spec.output_name,
                        &e.init_text,
                        e.num_vectors as usize,
                    )?,
                };
                let lr = LearnRate::parse(&e.learn_rate, spec.max_train_steps)
                    .map_err(TrainError::Invalid)?;
                (Params::Embedding(emb), Some(lr))
            }
        };
        let step = params.embedding().map_or(0, |e| e.step);
        if learn_rate.is_some() && step >= spec.max_train_steps {
            return Err(TrainError::Invalid(format!(
                "embedding {} is already trained to step {step}: ask for more steps than that",
                spec.output_name
            )));
        }
        let vars: Vec<_> = params.vars().into_iter().map(|(v, _)| v).collect();
        let optimizer = AdamW::new(
            AdamWParams {
                beta1: spec.adam_beta1,
                beta2: spec.adam_beta2,
                eps: spec.adam_epsilon,
                // A1111 trains embeddings without weight decay.
                weight_decay: if learn_rate.is_some() {
                    0.0
                } else {
                    spec.weight_decay
                },
            },
            &vars,
        );
        let prediction = match spec.prediction_type.as_deref() {
            Some("v_prediction") => PredictionType::VPrediction,
            Some(_) => PredictionType::Epsilon,
            None => model.schedule.prediction_type,
        };
        let schedule = NoiseSchedule::new(model.schedule.clone());
        let objective = Objective {
            prediction,
            min_snr_gamma: spec.min_snr_gamma,
            noise_offset: spec.noise_offset,
            min_timestep: 0,
            max_timestep: schedule.len(),
        };
        let lr_schedule = LrSchedule::parse(&spec.lr_scheduler).ok_or_else(|| {
            TrainError::Invalid(format!("unknown lr_scheduler {:?}", spec.lr_scheduler))
        })?;
        let buckets: Vec<(u32, u32)> = examples.iter().map(|e| e.bucket).collect();
        let repeats: Vec<u32> = examples.iter().map(|e| e.repeats).collect();
        let batches_per_epoch = epoch_batches(
            &buckets,
            &repeats,
            spec.batch_size as usize,
            &mut stream(spec.seed, PURPOSE_ORDER, 0),
        )
        .len();
        Ok(Self {
            model,
            params,
            learn_rate,
            optimizer,
            objective,
            schedule,
            lr_schedule,
            spec: spec.clone(),
            examples,
            captions: CaptionOps {
                dropout: spec.caption_dropout_rate,
                tag_dropout: spec.caption_tag_dropout_rate,
                shuffle: spec.shuffle_caption,
                keep_tokens: spec.keep_tokens as usize,
            },
            batches_per_epoch,
            epoch_cache: None,
            text_cache: HashMap::new(),
            step,
            history: Vec::new(),
            started_at: chrono::Utc::now(),
        })
    }

    /// Adapters on `model`'s UNet (and text encoders) as the spec's `network` says.
    fn attach(model: &mut StableDiffusion, spec: &TrainSpec) -> Result<LoraNetwork, TrainError> {
        let n = &spec.network;
        let cfg = LoraConfig {
            rank: n.rank as usize,
            alpha: n.alpha,
            conv_rank: n.conv_rank.map(|r| r as usize),
            conv_alpha: n.conv_alpha,
            unet_targets: if n.targets == "attention" {
                UnetTargets::Attention
            } else {
                UnetTargets::Transformer
            },
            text_encoder: n.train_text_encoder,
        };
        let init_seed = stream(spec.seed, PURPOSE_INIT, 0).gen::<u64>();
        Ok(LoraNetwork::attach(model.torch_mut(), &cfg, init_seed)?)
    }

    /// The LoRA network, when the run trains one.
    pub fn network(&self) -> Option<&LoraNetwork> {
        self.params.lora()
    }

    /// The embedding, when the run trains one.
    pub fn embedding(&self) -> Option<&TrainableEmbedding> {
        self.params.embedding()
    }

    /// The model with the adapters attached (what the LoRA currently does).
    pub fn model(&self) -> &StableDiffusion {
        &self.model
    }

    pub fn done(&self) -> bool {
        self.step >= self.spec.max_train_steps
    }

    pub fn epochs(&self) -> u32 {
        let micro =
            self.spec.max_train_steps as usize * self.spec.gradient_accumulation_steps as usize;
        micro.div_ceil(self.batches_per_epoch.max(1)) as u32
    }

    /// The learning rate of `group` at optimizer step `step`.
    pub fn lr(&self, group: Group, step: u32) -> f64 {
        if let Some(lr) = &self.learn_rate {
            return lr.at(step);
        }
        let base = match group {
            Group::Unet => self.spec.unet_lr,
            Group::Text => self.spec.text_encoder_lr,
        };
        base * self.lr_schedule.factor(
            step as usize,
            self.spec.lr_warmup_steps as usize,
            self.spec.max_train_steps as usize,
            self.spec.lr_scheduler_num_cycles as usize,
        )
    }

    fn batch_indices(&mut self, micro: usize) -> Vec<usize> {
        let per = self.batches_per_epoch.max(1);
        let (epoch, i) = (micro / per, micro % per);
        if self.epoch_cache.as_ref().map(|c| c.0) != Some(epoch) {
            let buckets: Vec<(u32, u32)> = self.examples.iter().map(|e| e.bucket).collect();
            let repeats: Vec<u32> = self.examples.iter().map(|e| e.repeats).collect();
            let b = epoch_batches(
                &buckets,
                &repeats,
                self.spec.batch_size as usize,
                &mut stream(self.spec.seed, PURPOSE_ORDER, epoch as u64),
            );
            self.epoch_cache = Some((epoch, b));
        }
        self.epoch_cache
            .as_ref()
            .and_then(|c| c.1.get(i).cloned())
            .unwrap_or_default()
    }

    /// The caption an example trains with: for textual inversion, template `pick` of the spec's
    /// with the embedding's name and the caption as its file words; the caption itself otherwise.
    fn templated(&self, caption: String, pick: usize) -> String {
        match &self.spec.embedding {
            Some(e) => e.prompt(pick, &self.spec.output_name, &caption),
            None => caption,
        }
    }

    fn encode_text(
        &mut self,
        caption: &str,
    ) -> Result<(engine::Tensor, Option<engine::Tensor>), TrainError> {
        let text = escape_caption(caption);
        if let Some(e) = self.params.embedding() {
            return Ok(encode_caption_with(&self.model, &text, Some(e))?);
        }
        if self.spec.network.train_text_encoder {
            return Ok(encode_caption(&self.model, &text)?);
        }
        if let Some((c, p)) = self.text_cache.get(&text) {
            return Ok((c.shallow_clone(), p.as_ref().map(|p| p.shallow_clone())));
        }
        let (c, p) = engine::no_grad(|| encode_caption(&self.model, &text))?;
        let entry = (c.shallow_clone(), p.as_ref().map(|p| p.shallow_clone()));
        self.text_cache.insert(text, entry);
        Ok((c, p))
    }

    /// SDXL's added conditioning for `pooled` embeddings of images of `sizes` (original size,
    /// crop (0, 0), target size, as kohya's bucketed images).
    fn added(
        &self,
        pooled: Vec<engine::Tensor>,
        sizes: &[(u32, u32)],
    ) -> Option<engine::unet::AddedCond> {
        if self.model.family != Family::Sdxl || pooled.len() != sizes.len() || sizes.is_empty() {
            return None;
        }
        let ids: Vec<f32> = sizes
            .iter()
            .flat_map(|&(w, h)| [h, w, 0, 0, h, w].map(|v| v as f32))
            .collect();
        let text_embeds = engine::Tensor::cat(&pooled, 0);
        let time_ids = engine::Tensor::from_slice(&ids)
            .view([sizes.len() as i64, 6])
            .to_device(text_embeds.device());
        Some(engine::unet::AddedCond {
            text_embeds,
            time_ids,
        })
    }

    fn batch(
        &mut self,
        micro: usize,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> Result<Batch, TrainError> {
        let idx = self.batch_indices(micro);
        let mut lat = Vec::with_capacity(idx.len());
        let mut ctx = Vec::with_capacity(idx.len());
        let mut pooled = Vec::new();
        let mut weights = Vec::with_capacity(idx.len());
        let mut sizes = Vec::new();
        for i in idx {
            let caption = self.captions.apply(&self.examples[i].caption, rng);
            let caption = self.templated(caption, rng.gen::<u32>() as usize);
            let e = &self.examples[i];
            let flip = e.flipped.is_some() && rng.gen::<bool>();
            lat.push(match (&e.flipped, flip) {
                (Some(f), true) => f.shallow_clone(),
                _ => e.latents.shallow_clone(),
            });
            weights.push(e.weight);
            let bucket = e.bucket;
            let (c, p) = self.encode_text(&caption)?;
            ctx.push(c);
            if let Some(p) = p {
                pooled.push(p);
                sizes.push(bucket);
            }
        }
        Ok(Batch {
            latents: engine::Tensor::cat(&lat, 0),
            context: engine::Tensor::cat(&ctx, 0),
            added: self.added(pooled, &sizes),
            weights,
        })
    }

    fn unet(&self) -> &engine::unet::UNet {
        &self.model.torch().unet
    }

    fn loss(
        &self,
        batch: &Batch,
        rng: &mut rand_chacha::ChaCha8Rng,
    ) -> Result<engine::Tensor, TrainError> {
        let unet = self.unet();
        Ok(engine::guard(|| {
            self.objective.loss(unet, &self.schedule, batch, rng)
        })?)
    }

    /// The batch's loss, with the gradients of `scale` × the loss accumulated in the adapters
    /// (the UNet checkpointed layer by layer when the spec asks for it).
    fn backward(
        &self,
        batch: &Batch,
        rng: &mut rand_chacha::ChaCha8Rng,
        scale: f64,
    ) -> Result<f64, TrainError> {
        let unet = self.unet();
        if self.spec.gradient_checkpointing {
            return Ok(engine::guard(|| {
                self.objective
                    .backward_checkpointed(unet, &self.schedule, batch, rng, scale)
            })?);
        }
        let loss = self.loss(batch, rng)?;
        let value = loss.double_value(&[]);
        engine::guard(|| Ok((loss * scale).f_backward()?))?;
        Ok(value)
    }

    /// One optimizer step (gradient_accumulation_steps micro-batches); its loss point.
    pub fn train_step(&mut self) -> Result<LossPoint, TrainError> {
        let accum = self.spec.gradient_accumulation_steps.max(1) as usize;
        let step = self.step;
        self.params.zero_grad();
        let mut loss_sum = 0.0;
        for k in 0..accum {
            let micro = step as usize * accum + k;
            let mut rng = stream(self.spec.seed, PURPOSE_STEP, micro as u64);
            let batch = self.batch(micro, &mut rng)?;
            let l = self.backward(&batch, &mut rng, 1.0 / accum as f64)?;
            if !l.is_finite() {
                return Err(TrainError::Invalid(format!(
                    "loss is {l} at step {step}: lower the learning rate or check the data"
                )));
            }
            loss_sum += l;
        }
        let mut grads = self.params.grads();
        self.params.zero_grad();
        if self.spec.max_grad_norm > 0.0 {
            clip_grad_norm(&mut grads, self.spec.max_grad_norm);
        }
        let (vars, groups): (Vec<&engine::Tensor>, Vec<Group>) =
            self.params.vars().into_iter().unzip();
        let lrs: Vec<f64> = groups.iter().map(|g| self.lr(*g, step)).collect();
        self.optimizer.step(&vars, &grads, &lrs)?;
        self.step += 1;
        let point = LossPoint {
            step: self.step,
            loss: loss_sum / accum as f64,
            lr: self.lr(Group::Unet, step),
        };
        self.history.push(point.clone());
        Ok(point)
    }

    /// The loss over every example once (caption as written, no flip), each at timesteps and
    /// noise drawn from `seed`: comparable across steps and runs, nothing trained.
    pub fn eval_loss(&mut self, seed: u64) -> Result<f64, TrainError> {
        let mut total = 0.0;
        for i in 0..self.examples.len() {
            let mut rng = stream(seed, PURPOSE_EVAL, i as u64);
            let caption = self.templated(self.examples[i].caption.clone(), 0);
            let l = engine::no_grad(|| -> Result<f64, TrainError> {
                let (context, pooled) = self.encode_text(&caption)?;
                let e = &self.examples[i];
                let bucket = e.bucket;
                let batch = Batch {
                    latents: e.latents.shallow_clone(),
                    context,
                    added: self.added(pooled.into_iter().collect(), &[bucket]),
                    weights: vec![e.weight],
                };
                Ok(self.loss(&batch, &mut rng)?.double_value(&[]))
            })?;
            total += l;
        }
        Ok(total / self.examples.len().max(1) as f64)
    }

    /// The gradients one micro-batch gives every trainable tensor (for checks), by name.
    pub fn gradients(&mut self) -> Result<Vec<(String, Tensor)>, TrainError> {
        let micro = self.step as usize * self.spec.gradient_accumulation_steps.max(1) as usize;
        let mut rng = stream(self.spec.seed, PURPOSE_STEP, micro as u64);
        let batch = self.batch(micro, &mut rng)?;
        self.params.zero_grad();
        self.backward(&batch, &mut rng, 1.0)?;
        let grads = self.params.grads();
        self.params.zero_grad();
        self.params
            .var_names()
            .into_iter()
            .zip(grads)
            .map(|(name, g)| Ok((name, to_candle(&g)?)))
            .collect()
    }

    /// A resumable checkpoint: LoRA weights, AdamW moments and step count, loss history and the
    /// spec's hash; the random state is (seed, step) itself.
    pub fn checkpoint(&self) -> Result<Vec<u8>, TrainError> {
        let mut tensors = HashMap::new();
        for (name, (v, _)) in self.params.var_names().into_iter().zip(self.params.vars()) {
            tensors.insert(name, to_candle(v)?);
        }
        for (i, name) in self.params.var_names().into_iter().enumerate() {
            tensors.insert(
                format!("optimizer.m.{name}"),
                to_candle(&self.optimizer.m[i])?,
            );
            tensors.insert(
                format!("optimizer.v.{name}"),
                to_candle(&self.optimizer.v[i])?,
            );
        }
        let state = serde_json::json!({
            "step": self.step,
            "optimizer_step": self.optimizer.step,
            "seed": self.spec.seed,
            "spec_sha256": spec_hash(&self.spec),
            "history": self.history,
            "started_at": self.started_at,
        });
        let meta = HashMap::from([("atelier_checkpoint".to_string(), state.to_string())]);
        atelier_diffusion::train::serialize(&tensors, &meta).map_err(TrainError::Checkpoint)
    }

    /// Continue from a checkpoint of the same spec.
    pub fn restore(&mut self, bytes: &[u8]) -> Result<(), TrainError> {
        let bad = |m: String| TrainError::Checkpoint(m);
        let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
        let state: serde_json::Value = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("atelier_checkpoint"))
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| bad("not an atelier checkpoint".into()))?;
        if state["spec_sha256"].as_str() != Some(spec_hash(&self.spec).as_str()) {
            return Err(bad(
                "the checkpoint was written for another training spec".into()
            ));
        }
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)?;
            tensors.insert(name, t);
        }
        self.params.load_weights(&tensors)?;
        for (i, name) in self.params.var_names().into_iter().enumerate() {
            let get = |k: String| {
                tensors
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| bad(format!("checkpoint lacks {k}")))
            };
            let dev = self.optimizer.m[i].device();
            self.optimizer.m[i] = from_candle(&get(format!("optimizer.m.{name}"))?)?.to_device(dev);
            self.optimizer.v[i] = from_candle(&get(format!("optimizer.v.{name}"))?)?.to_device(dev);
        }
        self.step = state["step"].as_u64().unwrap_or(0) as u32;
        self.optimizer.step = state["optimizer_step"].as_u64().unwrap_or(0) as usize;
        self.history = serde_json::from_value(state["history"].clone()).unwrap_or_default();
        if let Some(t) = state["started_at"]
            .as_str()
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        {
            self.started_at = t.with_timezone(&chrono::Utc);
        }
        Ok(())
    }

    /// The file the run makes: the LoRA (kohya's layout and `ss_*` metadata, plus A1111's hashes
    /// of the file) or the embedding (A1111's layout, with its step).
    pub fn output_file(&self, base_name: &str, base_hash: &str) -> Result<Vec<u8>, TrainError> {
        match &self.params {
            Params::Lora(n) => self.lora_file(n, base_name, base_hash),
            Params::Embedding(e) => {
                Ok(e.file(self.model.family, self.step, (base_name, base_hash))?)
            }
        }
    }

    fn lora_file(
        &self,
        network: &LoraNetwork,
        base_name: &str,
        base_hash: &str,
    ) -> Result<Vec<u8>, TrainError> {
        let dtype = if self.spec.save_fp16 {
            DType::F16
        } else {
            DType::F32
        };
        let tensors = network.tensors(dtype)?;
        let mut meta = self.metadata(base_name, base_hash);
        // sshs_*: A1111's hashes of the file's tensor data, computed on the file as written
        // without them.
        let plain =
            atelier_diffusion::train::serialize(&tensors, &meta).map_err(TrainError::Checkpoint)?;
        let (model_hash, legacy) = lora_hashes(&plain);
        meta.insert("sshs_model_hash".into(), model_hash);
        meta.insert("sshs_legacy_hash".into(), legacy);
        atelier_diffusion::train::serialize(&tensors, &meta).map_err(TrainError::Checkpoint)
    }

    fn metadata(&self, base_name: &str, base_hash: &str) -> HashMap<String, String> {
        let s = &self.spec;
        let n = &s.network;
        let train_images = self.examples.iter().filter(|e| !e.is_class).count();
        let reg_images = self.examples.iter().filter(|e| e.is_class).count();
        let mut tags: HashMap<String, u64> = HashMap::new();
        for e in self.examples.iter().filter(|e| !e.is_class) {
            for t in e
                .caption
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
            {
                *tags.entry(t.to_string()).or_default() += 1;
            }
        }
        let base_version = match self.model.family {
            Family::Sd1 => "sd_v1",
            Family::Sd2 => "sd_v2",
            Family::Sdxl => "sdxl_base_v1-0",
        };
        let mut args = serde_json::Map::new();
        if let Some(c) = n.conv_rank {
            args.insert("conv_dim".into(), c.to_string().into());
            args.insert("conv_alpha".into(), n.conv_alpha.to_string().into());
        }
        let now = chrono::Utc::now().timestamp().to_string();
        let pairs: Vec<(&str, String)> = vec![
            ("ss_session_id", format!("{}", s.seed)),
            (
                "ss_training_started_at",
                self.started_at.timestamp().to_string(),
            ),
            ("ss_training_finished_at", now),
            ("ss_output_name", s.output_name.clone()),
            ("ss_learning_rate", s.unet_lr.to_string()),
            ("ss_unet_lr", s.unet_lr.to_string()),
            (
                "ss_text_encoder_lr",
                if n.train_text_encoder {
                    s.text_encoder_lr.to_string()
                } else {
                    "None".into()
                },
            ),
            ("ss_network_module", "networks.lora".into()),
            ("ss_network_dim", n.rank.to_string()),
            ("ss_network_alpha", n.alpha.to_string()),
            (
                "ss_network_args",
                serde_json::Value::Object(args).to_string(),
            ),
            (
                "ss_network_train_unet_only",
                (!n.train_text_encoder).to_string(),
            ),
            ("ss_num_train_images", train_images.to_string()),
            ("ss_num_reg_images", reg_images.to_string()),
            (
                "ss_num_batches_per_epoch",
                self.batches_per_epoch.to_string(),
            ),
            ("ss_num_epochs", self.epochs().to_string()),
            ("ss_epoch", self.epochs().to_string()),
            ("ss_steps", self.step.to_string()),
            ("ss_max_train_steps", s.max_train_steps.to_string()),
            ("ss_batch_size_per_device", s.batch_size.to_string()),
            (
                "ss_total_batch_size",
                (s.batch_size * s.gradient_accumulation_steps).to_string(),
            ),
            (
                "ss_gradient_checkpointing",
                s.gradient_checkpointing.to_string(),
            ),
            (
                "ss_gradient_accumulation_steps",
                s.gradient_accumulation_steps.to_string(),
            ),
            ("ss_lr_warmup_steps", s.lr_warmup_steps.to_string()),
            ("ss_lr_scheduler", s.lr_scheduler.clone()),
            (
                "ss_optimizer",
                format!(
                    "torch.optim.adamw.AdamW(weight_decay={},betas=({}, {}),eps={})",
                    s.weight_decay, s.adam_beta1, s.adam_beta2, s.adam_epsilon
                ),
            ),
            ("ss_max_grad_norm", s.max_grad_norm.to_string()),
            ("ss_seed", s.seed.to_string()),
            (
                "ss_resolution",
                format!("({}, {})", s.resolution, s.resolution),
            ),
            ("ss_enable_bucket", s.enable_bucket.to_string()),
            ("ss_min_bucket_reso", s.min_bucket_reso.to_string()),
            ("ss_max_bucket_reso", s.max_bucket_reso.to_string()),
            ("ss_bucket_no_upscale", s.bucket_no_upscale.to_string()),
            ("ss_cache_latents", "True".into()),
            (
                "ss_caption_dropout_rate",
                s.caption_dropout_rate.to_string(),
            ),
            (
                "ss_caption_tag_dropout_rate",
                s.caption_tag_dropout_rate.to_string(),
            ),
            ("ss_shuffle_caption", s.shuffle_caption.to_string()),
            ("ss_keep_tokens", s.keep_tokens.to_string()),
            ("ss_flip_aug", s.flip_aug.to_string()),
            ("ss_noise_offset", s.noise_offset.to_string()),
            (
                "ss_min_snr_gamma",
                s.min_snr_gamma.map_or("None".into(), |g| g.to_string()),
            ),
            (
                "ss_prior_loss_weight",
                s.dreambooth
                    .as_ref()
                    .map_or(1.0, |d| d.prior_loss_weight)
                    .to_string(),
            ),
            ("ss_v2", (self.model.family == Family::Sd2).to_string()),
            (
                "ss_v_parameterization",
                (self.objective.prediction == PredictionType::VPrediction).to_string(),
            ),
            ("ss_base_model_version", base_version.into()),
            ("ss_sd_model_name", base_name.into()),
            ("ss_sd_model_hash", base_hash.into()),
            ("ss_new_sd_model_hash", base_hash.into()),
            ("ss_clip_skip", "None".into()),
            ("ss_mixed_precision", "no".into()),
            (
                "ss_tag_frequency",
                serde_json::json!({ s.output_name.clone(): tags }).to_string(),
            ),
            ("ss_training_comment", "trained by atelier".into()),
            ("modelspec.sai_model_spec", "1.0.0".into()),
            (
                "modelspec.architecture",
                format!(
                    "{}/lora",
                    match self.model.family {
                        Family::Sd1 => "stable-diffusion-v1",
                        Family::Sd2 => "stable-diffusion-v2-512",
                        Family::Sdxl => "stable-diffusion-xl-v1-base",
                    }
                ),
            ),
            (
                "modelspec.implementation",
                "https://github.com/kohya-ss/sd-scripts".into(),
            ),
            ("modelspec.title", s.output_name.clone()),
            (
                "modelspec.resolution",
                format!("{}x{}", s.resolution, s.resolution),
            ),
        ];
        pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    }
}

/// A stable hash of a spec (what a checkpoint may be resumed into).
pub fn spec_hash(spec: &TrainSpec) -> String {
    hex::encode(Sha256::digest(serde_json::to_vec(spec).unwrap_or_default()))
}

pub use atelier_diffusion::lora::file_hashes as lora_hashes;
