//! Training jobs (trainer service): LoRA and DreamBooth-with-LoRA on a registry model, from a
//! dataset version or uploaded images, with kohya sd-scripts' options under kohya's names.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ArtifactRef;

/// Where the training images and captions come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum TrainData {
    /// A dataset version's rows (rejected rows never; flagged ones only when asked).
    Dataset {
        dataset: String,
        /// A version number; the latest when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        version: Option<u32>,
        /// Which splits train: `train` (default), `val` (or `validation`), `test`.
        #[serde(default = "d_splits")]
        splits: Vec<String>,
        /// Also train on rows the filter flagged (accepted rows always train).
        #[serde(default)]
        include_flagged: bool,
    },
    /// Uploaded images (artifact keys) with their captions, e.g. a kohya folder of
    /// `image.png` + `image.txt` uploaded by `atelier train`.
    Images { images: Vec<TrainImage> },
}

fn d_splits() -> Vec<String> {
    vec!["train".into()]
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainImage {
    /// Artifact key of the image.
    pub image: String,
    #[serde(default)]
    pub caption: String,
}

/// The LoRA network (kohya's `network_*` options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// network_dim.
    #[serde(default = "d_rank")]
    pub rank: i64,
    /// network_alpha (output scaled by alpha / rank).
    #[serde(default = "d_alpha")]
    pub alpha: f64,
    /// conv_dim: also adapt ResNet 3×3 convolutions (LoCon) at this rank.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conv_rank: Option<i64>,
    #[serde(default = "d_alpha")]
    pub conv_alpha: f64,
    /// `transformer` (every linear of the attention blocks, kohya's default) or `attention`
    /// (to_q, to_k, to_v, to_out only).
    #[serde(default = "d_targets")]
    pub targets: String,
    /// Also train the text encoder(s) (at `text_encoder_lr`).
    #[serde(default)]
    pub train_text_encoder: bool,
}

impl Default for NetworkSpec {
    fn default() -> Self {
        Self {
            rank: d_rank(),
            alpha: d_alpha(),
            conv_rank: None,
            conv_alpha: d_alpha(),
            targets: d_targets(),
            train_text_encoder: false,
        }
    }
}

fn d_rank() -> i64 {
    16
}
fn d_alpha() -> f64 {
    1.0
}
fn d_targets() -> String {
    "transformer".into()
}

/// DreamBooth: an instance prompt with its identifier token, and prior preservation with class
/// images the sampler generates from the base model (cached and reused by later runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DreamBoothSpec {
    /// Caption of every instance image, e.g. `a photo of sks dog`.
    pub instance_prompt: String,
    /// Prompt of the class images, e.g. `a photo of dog`.
    pub class_prompt: String,
    /// Weight of the prior-preservation loss.
    #[serde(default = "d_prior")]
    pub prior_loss_weight: f64,
    #[serde(default = "d_class_images")]
    pub num_class_images: u32,
    /// Sampler that generates the class images.
    #[serde(default = "d_class_sampler")]
    pub class_sampler: String,
    #[serde(default = "d_class_steps")]
    pub class_steps: u32,
}

fn d_prior() -> f64 {
    1.0
}
fn d_class_images() -> u32 {
    100
}
fn d_class_sampler() -> String {
    "euler_a".into()
}
fn d_class_steps() -> u32 {
    20
}

/// A training job. Defaults follow kohya's `train_network.py`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainSpec {
    /// Base model name in the registry.
    pub base_model: String,
    /// The LoRA's name: the sampler finds it as `<lora:NAME:1>` once the job succeeds.
    pub output_name: String,
    pub data: TrainData,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dreambooth: Option<DreamBoothSpec>,
    /// Textual inversion instead of a LoRA: `output_name` is the embedding, only its vectors
    /// train (`network`, `unet_lr` and `text_encoder_lr` do not apply).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedding: Option<crate::embedding::EmbeddingTrainSpec>,
    #[serde(default)]
    pub network: NetworkSpec,
    /// Training resolution (square side; a multiple of 64).
    #[serde(default = "d_resolution")]
    pub resolution: u32,
    /// Aspect-ratio bucketing (kohya's enable_bucket).
    #[serde(default = "d_true")]
    pub enable_bucket: bool,
    #[serde(default = "d_min_bucket")]
    pub min_bucket_reso: u32,
    #[serde(default = "d_max_bucket")]
    pub max_bucket_reso: u32,
    /// Never upscale an image to fit a bucket.
    #[serde(default)]
    pub bucket_no_upscale: bool,
    /// Times each image is seen per epoch.
    #[serde(default = "d_one")]
    pub repeats: u32,
    #[serde(default = "d_one")]
    pub batch_size: u32,
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: u32,
    /// Recompute the UNet's activations layer by layer in the backward pass instead of keeping
    /// them all (kohya's `gradient_checkpointing`): far less memory for one more forward pass.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Optimizer steps.
    #[serde(default = "d_steps")]
    pub max_train_steps: u32,
    /// UNet learning rate.
    #[serde(default = "d_lr")]
    pub unet_lr: f64,
    /// Text-encoder learning rate (when `network.train_text_encoder`).
    #[serde(default = "d_te_lr")]
    pub text_encoder_lr: f64,
    /// constant, constant_with_warmup, linear, cosine, cosine_with_restarts.
    #[serde(default = "d_scheduler")]
    pub lr_scheduler: String,
    #[serde(default)]
    pub lr_warmup_steps: u32,
    /// Restarts of cosine_with_restarts.
    #[serde(default = "d_one")]
    pub lr_scheduler_num_cycles: u32,
    #[serde(default = "d_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    /// Gradient clipping by global norm (0 turns it off).
    #[serde(default = "d_one_f")]
    pub max_grad_norm: f64,
    /// `epsilon` or `v_prediction`; the model's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prediction_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_snr_gamma: Option<f64>,
    #[serde(default)]
    pub noise_offset: f64,
    #[serde(default)]
    pub caption_dropout_rate: f64,
    #[serde(default)]
    pub caption_tag_dropout_rate: f64,
    #[serde(default)]
    pub shuffle_caption: bool,
    /// Leading comma-separated tags kept in place by shuffling and tag dropout.
    #[serde(default)]
    pub keep_tokens: u32,
    /// Random horizontal flips.
    #[serde(default)]
    pub flip_aug: bool,
    #[serde(default)]
    pub seed: u64,
    /// Save a resumable checkpoint every N optimizer steps.
    #[serde(default = "d_checkpoint")]
    pub checkpoint_every: u32,
    /// Render `sample_prompts` through the sampler every N steps (0: only at the end, when prompts
    /// are given).
    #[serde(default)]
    pub sample_every: u32,
    #[serde(default)]
    pub sample_prompts: Vec<String>,
    /// Sampler and steps for sample images.
    #[serde(default = "d_class_sampler")]
    pub sample_sampler: String,
    #[serde(default = "d_class_steps")]
    pub sample_steps: u32,
    /// Write the LoRA in f16 (kohya's save_precision fp16); f32 otherwise.
    #[serde(default = "d_true")]
    pub save_fp16: bool,
}

fn d_true() -> bool {
    true
}
fn d_resolution() -> u32 {
    512
}
fn d_min_bucket() -> u32 {
    256
}
fn d_max_bucket() -> u32 {
    1024
}
fn d_one() -> u32 {
    1
}
fn d_one_f() -> f64 {
    1.0
}
fn d_steps() -> u32 {
    1600
}
fn d_lr() -> f64 {
    1e-4
}
fn d_te_lr() -> f64 {
    5e-5
}
fn d_scheduler() -> String {
    "constant".into()
}
fn d_weight_decay() -> f64 {
    0.01
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}
fn d_checkpoint() -> u32 {
    100
}

/// Learning-rate schedule names the trainer knows.
pub const LR_SCHEDULERS: [&str; 5] = [
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
];

impl TrainSpec {
    /// A spec with kohya's defaults for everything but the model, name and data.
    pub fn new(base_model: &str, output_name: &str, data: TrainData) -> Self {
        serde_json::from_value(serde_json::json!({
            "base_model": base_model,
            "output_name": output_name,
            "data": data,
        }))
        .unwrap_or_else(|e| unreachable!("defaults deserialize: {e}"))
    }

    /// Everything that can be checked without the model or the data: a clear error before any
    /// model work.
    pub fn check(&self) -> Result<(), String> {
        if self.base_model.trim().is_empty() {
            return Err("base_model is empty: name a model in the registry".into());
        }
        check_output_name(&self.output_name)?;
        match &self.data {
            TrainData::Dataset {
                dataset, splits, ..
            } => {
                crate::dataset::check_dataset_name(dataset)?;
                if splits.is_empty() {
                    return Err("data.splits is empty: name at least one split (train)".into());
                }
                for s in splits {
                    if !["train", "val", "validation", "test"].contains(&s.as_str()) {
                        return Err(format!(
                            "data.splits: {s:?} is not a split (train, val, test)"
                        ));
                    }
                }
            }
            TrainData::Images { images } => {
                if images.is_empty() {
                    return Err("data.images is empty: give at least one image".into());
                }
                for i in images {
                    crate::ArtifactKey::parse(&i.image)
                        .map_err(|e| format!("data.images: {:?}: {e}", i.image))?;
                }
            }
        }
        let n = &self.network;
        if n.rank <= 0 {
            return Err(format!("network.rank must be at least 1 (got {})", n.rank));
        }
        if n.rank > 1024 {
            return Err(format!(
                "network.rank must be at most 1024 (got {})",
                n.rank
            ));
        }
        if !nonneg(n.alpha) {
            return Err(format!("network.alpha must be ≥ 0 (got {})", n.alpha));
        }
        if let Some(c) = n.conv_rank {
            if c <= 0 || c > 1024 {
                return Err(format!("network.conv_rank must be 1..=1024 (got {c})"));
            }
            if !nonneg(n.conv_alpha) {
                return Err(format!(
                    "network.conv_alpha must be ≥ 0 (got {})",
                    n.conv_alpha
                ));
            }
        }
        if !["transformer", "attention"].contains(&n.targets.as_str()) {
            return Err(format!(
                "network.targets must be transformer or attention (got {:?})",
                n.targets
            ));
        }
        let sixty_four = |name: &str, v: u32| {
            if v == 0 || !v.is_multiple_of(64) {
                Err(format!(
                    "{name} must be a positive multiple of 64 (got {v})"
                ))
            } else {
                Ok(())
            }
        };
        sixty_four("resolution", self.resolution)?;
        if self.resolution > 4096 {
            return Err(format!(
                "resolution must be at most 4096 (got {})",
                self.resolution
            ));
        }
        if self.enable_bucket {
            sixty_four("min_bucket_reso", self.min_bucket_reso)?;
            sixty_four("max_bucket_reso", self.max_bucket_reso)?;
            if self.min_bucket_reso > self.max_bucket_reso {
                return Err(format!(
                    "min_bucket_reso {} is above max_bucket_reso {}",
                    self.min_bucket_reso, self.max_bucket_reso
                ));
            }
        }
        let positive = |name: &str, v: u32| {
            if v == 0 {
                Err(format!("{name} must be at least 1"))
            } else {
                Ok(())
            }
        };
        positive("repeats", self.repeats)?;
        positive("batch_size", self.batch_size)?;
        positive(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
        )?;
        positive("max_train_steps", self.max_train_steps)?;
        positive("checkpoint_every", self.checkpoint_every)?;
        if self.batch_size > 64 {
            return Err(format!(
                "batch_size must be at most 64 (got {})",
                self.batch_size
            ));
        }
        let lr = |name: &str, v: f64| {
            if !is_positive(v) {
                Err(format!("{name} must be > 0 (got {v})"))
            } else {
                Ok(())
            }
        };
        lr("unet_lr", self.unet_lr)?;
        if n.train_text_encoder {
            lr("text_encoder_lr", self.text_encoder_lr)?;
        }
        if !LR_SCHEDULERS.contains(&self.lr_scheduler.as_str()) {
            return Err(format!(
                "lr_scheduler {:?} is not one of {}",
                self.lr_scheduler,
                LR_SCHEDULERS.join(", ")
            ));
        }
        let unit = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be in 0..=1 (got {v})"))
            }
        };
        unit("caption_dropout_rate", self.caption_dropout_rate)?;
        unit("caption_tag_dropout_rate", self.caption_tag_dropout_rate)?;
        if !(0.0..1.0).contains(&self.adam_beta1) || !(0.0..1.0).contains(&self.adam_beta2) {
            return Err("adam_beta1 and adam_beta2 must be in [0, 1)".into());
        }
        if !is_positive(self.adam_epsilon) || !nonneg(self.weight_decay) {
            return Err("adam_epsilon must be > 0 and weight_decay ≥ 0".into());
        }
        if !nonneg(self.max_grad_norm) {
            return Err("max_grad_norm must be ≥ 0 (0 turns clipping off)".into());
        }
        if let Some(p) = &self.prediction_type {
            if !["epsilon", "v_prediction"].contains(&p.as_str()) {
                return Err(format!(
                    "prediction_type must be epsilon or v_prediction (got {p:?})"
                ));
            }
        }
        if let Some(g) = self.min_snr_gamma {
            if !is_positive(g) {
                return Err(format!("min_snr_gamma must be > 0 (got {g})"));
            }
        }
        if !self.noise_offset.is_finite() || self.noise_offset < 0.0 {
            return Err("noise_offset must be ≥ 0".into());
        }
        if self.sample_steps == 0 || self.sample_steps > 150 {
            return Err("sample_steps must be 1..=150".into());
        }
        if let Some(e) = &self.embedding {
            if self.dreambooth.is_some() {
                return Err("embedding and dreambooth exclude each other: textual inversion trains from the data's captions".into());
            }
            crate::embedding::check_embedding_name(&self.output_name)?;
            e.check(self.max_train_steps)?;
        }
        if let Some(db) = &self.dreambooth {
            if db.instance_prompt.trim().is_empty() || db.class_prompt.trim().is_empty() {
                return Err(
                    "dreambooth needs instance_prompt (with its identifier) and class_prompt"
                        .into(),
                );
            }
            if !nonneg(db.prior_loss_weight) {
                return Err("dreambooth.prior_loss_weight must be ≥ 0".into());
            }
            if db.num_class_images > 10_000 {
                return Err("dreambooth.num_class_images must be at most 10000".into());
            }
            if db.class_steps == 0 || db.class_steps > 150 {
                return Err("dreambooth.class_steps must be 1..=150".into());
            }
        }
        Ok(())
    }
}

fn nonneg(v: f64) -> bool {
    v.is_finite() && v >= 0.0
}

fn is_positive(v: f64) -> bool {
    v.is_finite() && v > 0.0
}

/// A LoRA name: what `<lora:NAME>` refers to.
pub fn check_output_name(name: &str) -> Result<(), String> {
    check_file_stem("output_name", name)
}

/// A name that is a file's stem in a folder: 1-100 letters, digits, `-`, `_` or `.`, not
/// starting with `.`; errors name the field as `field`.
pub fn check_file_stem(field: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field} {name:?}: use 1-100 letters, digits, '-', '_' or '.', not starting with '.'"
        ))
    }
}

/// One row of the loss curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct LossPoint {
    pub step: u32,
    pub loss: f64,
    pub lr: f64,
}

/// What a training job produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct TrainOutput {
    pub output_name: String,
    /// The LoRA in kohya's layout (content-addressed); for textual inversion, the embedding.
    pub lora: ArtifactRef,
    /// The same file where samplers look for `<lora:NAME>` (`loras/NAME.safetensors`), or for
    /// an embedding's name in prompts (`embeddings/NAME.safetensors`).
    pub published_as: String,
    /// A1111's short hash of the file (`sshs_model_hash`'s first 12 hex digits; for an
    /// embedding the first 12 hex digits of the file's SHA-256).
    pub lora_hash: String,
    pub steps: u32,
    pub images: u32,
    #[serde(default)]
    pub class_images: u32,
    pub final_loss: f64,
    /// step,loss,lr as CSV.
    pub loss_csv: ArtifactRef,
    /// The loss curve as a PNG plot.
    pub loss_plot: ArtifactRef,
    /// Sample images rendered with the LoRA (artifact keys), by step.
    #[serde(default)]
    pub samples: Vec<TrainSample>,
    /// The step training resumed from, when a checkpoint was found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct TrainSample {
    pub step: u32,
    pub prompt: String,
    pub image: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> TrainSpec {
        TrainSpec::new(
            "tiny",
            "my-lora",
            TrainData::Images {
                images: vec![TrainImage {
                    image: "uploads/ab/cd".into(),
                    caption: "a red square".into(),
                }],
            },
        )
    }

    #[test]
    fn defaults_are_kohyas() {
        let s = spec();
        assert_eq!(s.network.rank, 16);
        assert_eq!(s.network.alpha, 1.0);
        assert_eq!(s.resolution, 512);
        assert_eq!(s.unet_lr, 1e-4);
        assert_eq!(s.lr_scheduler, "constant");
        assert!(s.check().is_ok());
    }

    #[test]
    fn bad_input_is_refused_with_the_fix() {
        type Edit = Box<dyn Fn(&mut TrainSpec)>;
        let cases: Vec<(Edit, &str)> = vec![
            (Box::new(|s| s.network.rank = 0), "network.rank"),
            (Box::new(|s| s.network.alpha = -1.0), "network.alpha"),
            (Box::new(|s| s.resolution = 500), "multiple of 64"),
            (Box::new(|s| s.unet_lr = 0.0), "unet_lr"),
            (Box::new(|s| s.unet_lr = -1e-4), "unet_lr"),
            (Box::new(|s| s.lr_scheduler = "step".into()), "lr_scheduler"),
            (Box::new(|s| s.output_name = "../x".into()), "output_name"),
            (Box::new(|s| s.base_model = " ".into()), "base_model"),
            (
                Box::new(|s| s.data = TrainData::Images { images: vec![] }),
                "empty",
            ),
            (Box::new(|s| s.max_train_steps = 0), "max_train_steps"),
            (
                Box::new(|s| s.caption_dropout_rate = 2.0),
                "caption_dropout",
            ),
        ];
        for (edit, needle) in cases {
            let mut s = spec();
            edit(&mut s);
            let e = s.check().expect_err(needle);
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        let v = serde_json::json!({"base_model": "m", "output_name": "o",
            "data": {"source": "images", "images": []}, "network_dim": 8});
        assert!(serde_json::from_value::<TrainSpec>(v).is_err());
    }
}
