//! A1111's textual-inversion routes on the trainer. `create/embedding` runs a `create_embedding`
//! job on the current model (`sd_model_checkpoint`); `train/embedding` a training job with
//! `embedding` set, continuing the embedding from its step. A1111's `data_root` is a folder on its
//! server; here it names a dataset (`NAME` or `NAME@VERSION`), whose captions are the file words.
//! `template_filename` is one of A1111's stock template names or a file in
//! `<models>/textual_inversion_templates`. Both answer when the job has ended, as A1111 does.

use atelier_contracts::embedding::{CreateEmbeddingSpec, EmbeddingTrainSpec};
use atelier_contracts::{JobOutput, JobSpec, TrainData, TrainSpec};
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

/// Job error codes that mean the request was at fault.
const USER_CODES: &[&str] = &[
    "invalid_job",
    "unknown_model",
    "embedding_exists",
    "version_not_found",
    "empty_dataset",
    "bad_image",
    "unknown_sampler",
];

/// `POST /sdapi/v1/create/embedding`'s body (A1111's `create_embedding` arguments).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEmbeddingRequest {
    pub name: String,
    #[serde(default = "one")]
    pub num_vectors_per_token: u32,
    #[serde(default)]
    pub overwrite_old: bool,
    #[serde(default = "star")]
    pub init_text: String,
}

fn one() -> u32 {
    1
}
fn star() -> String {
    "*".into()
}

/// Creates a textual-inversion embedding from `init_text` on the current model.
#[utoipa::path(post, path = "/sdapi/v1/create/embedding", tag = "a1111",
    operation_id = "create_embedding_sdapi_v1_create_embedding_post",
    request_body = CreateEmbeddingRequest,
    responses((status = 200, description = "{info: \"create embedding filename: …\"}"), (status = 422, body = atelier_contracts::http::ApiErrorBody)),
    security(("bearer" = ["jobs:write"])))]
pub async fn create_embedding(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let req: CreateEmbeddingRequest = crate::a1111::json_body(&app, &headers, body).await?;
    let spec = CreateEmbeddingSpec {
        base_model: crate::a1111::current_model(&app).await?,
        name: req.name,
        num_vectors: req.num_vectors_per_token,
        init_text: req.init_text,
        overwrite: req.overwrite_old,
    };
    spec.check()
        .map_err(|e| ApiError::unprocessable("invalid_embedding", e))?;
    let out = crate::a1111::run_one(
        &app,
        &caller,
        JobSpec::CreateEmbedding(spec),
        "create_embedding_failed",
        USER_CODES,
    )
    .await?;
    match out {
        JobOutput::Embedding(e) => Ok(Json(
            json!({"info": format!("create embedding filename: {}", e.published_as)}),
        )),
        _ => Err(ApiError::unavailable(
            "the create_embedding job made no embedding",
        )),
    }
}

/// `POST /sdapi/v1/train/embedding`'s body (A1111's `train_embedding` arguments).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainEmbeddingRequest {
    #[serde(default)]
    pub id_task: Option<String>,
    pub embedding_name: String,
    /// A rate (`0.005`) or A1111's schedule (`0.05:10, 0.02:20, 0.01`); a number is accepted.
    #[serde(default = "d_rate")]
    pub learn_rate: Value,
    #[serde(default = "one")]
    pub batch_size: u32,
    #[serde(default = "one")]
    pub gradient_step: u32,
    /// A dataset: `NAME` (its latest version) or `NAME@VERSION`.
    pub data_root: String,
    /// Accepted; the loss curve and checkpoints are the job's artifacts (`GET /v1/jobs/{id}`).
    #[serde(default)]
    pub log_directory: Option<String>,
    #[serde(default = "d_side")]
    pub training_width: u32,
    #[serde(default = "d_side")]
    pub training_height: u32,
    /// Train at each image's own size (aspect-ratio buckets).
    #[serde(default)]
    pub varsize: bool,
    #[serde(default = "d_steps")]
    pub steps: u32,
    /// `disabled`, `norm` (by `clip_grad_value`); `value` is not taken.
    #[serde(default = "d_clip")]
    pub clip_grad_mode: String,
    #[serde(default = "d_clip_value")]
    pub clip_grad_value: Value,
    #[serde(default)]
    pub shuffle_tags: bool,
    #[serde(default)]
    pub tag_drop_out: f64,
    /// `once` or `deterministic` (latents encoded once); `random` is not taken.
    #[serde(default = "d_sampling")]
    pub latent_sampling_method: String,
    /// Alpha-weighted loss: not taken (`true` is refused).
    #[serde(default)]
    pub use_weight: bool,
    /// Render a preview every N steps (0: none).
    #[serde(default)]
    pub create_image_every: u32,
    /// Save a resumable checkpoint every N steps.
    #[serde(default)]
    pub save_embedding_every: u32,
    #[serde(default = "d_template")]
    pub template_filename: String,
    #[serde(default)]
    pub save_image_with_stored_embedding: Option<bool>,
    /// Preview with the `preview_*` settings instead of the embedding's name alone.
    #[serde(default)]
    pub preview_from_txt2img: bool,
    #[serde(default)]
    pub preview_prompt: String,
    #[serde(default)]
    pub preview_negative_prompt: String,
    #[serde(default)]
    pub preview_steps: Option<u32>,
    #[serde(default)]
    pub preview_sampler_name: Option<String>,
    #[serde(default)]
    pub preview_sampler_index: Option<Value>,
    #[serde(default)]
    pub preview_cfg_scale: Option<f64>,
    #[serde(default)]
    pub preview_seed: Option<i64>,
    #[serde(default)]
    pub preview_width: Option<u32>,
    #[serde(default)]
    pub preview_height: Option<u32>,
}

fn d_rate() -> Value {
    json!("0.005")
}
fn d_side() -> u32 {
    512
}
fn d_steps() -> u32 {
    100_000
}
fn d_clip() -> String {
    "disabled".into()
}
fn d_clip_value() -> Value {
    json!("0.1")
}
fn d_sampling() -> String {
    "once".into()
}
fn d_template() -> String {
    "style_filewords.txt".into()
}

/// Trains a textual-inversion embedding on a dataset (the trainer), continuing it from its step.
#[utoipa::path(post, path = "/sdapi/v1/train/embedding", tag = "a1111",
    operation_id = "train_embedding_sdapi_v1_train_embedding_post",
    request_body = TrainEmbeddingRequest,
    responses((status = 200, description = "{info: \"train embedding complete: filename: … error: None\"}"), (status = 422, body = atelier_contracts::http::ApiErrorBody)),
    security(("bearer" = ["jobs:write"])))]
pub async fn train_embedding(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let req: TrainEmbeddingRequest = crate::a1111::json_body(&app, &headers, body).await?;
    let templates = crate::a1111_templates::lines(&app, &req.template_filename)?;
    let base = crate::a1111::current_model(&app).await?;
    let spec = train_spec(&req, &base, templates)?;
    let out = crate::a1111::run_one(
        &app,
        &caller,
        JobSpec::Train(Box::new(spec)),
        "train_embedding_failed",
        USER_CODES,
    )
    .await?;
    match out {
        JobOutput::Trained(t) => Ok(Json(json!({"info": format!(
            "train embedding complete: filename: {} error: None", t.published_as)}))),
        _ => Err(ApiError::unavailable("the training job made no embedding")),
    }
}

fn refuse(field: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError::unprocessable("unsupported_parameter", format!("{field}: {why}"))
}

/// A number or a string holding one (A1111's UI sends strings).
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    }
}

/// The training job an A1111 request asks for.
fn train_spec(
    req: &TrainEmbeddingRequest,
    base: &str,
    templates: Vec<String>,
) -> Result<TrainSpec, ApiError> {
    let (dataset, version) = match req.data_root.rsplit_once('@') {
        Some((d, v)) => (
            d.to_string(),
            Some(v.parse::<u32>().map_err(|_| {
                refuse(
                    "data_root",
                    format!("{v:?} is not a version number (write NAME@3)"),
                )
            })?),
        ),
        None => (req.data_root.trim().to_string(), None),
    };
    atelier_contracts::embedding::check_embedding_name(&req.embedding_name)
        .map_err(|e| refuse("embedding_name", e))?;
    if req.training_width != req.training_height && !req.varsize {
        return Err(refuse(
            "training_width",
            "atelier trains at a square resolution: make training_width and training_height equal, or set varsize",
        ));
    }
    if req.use_weight {
        return Err(refuse("use_weight", "alpha-weighted loss is not supported"));
    }
    if !["once", "deterministic"].contains(&req.latent_sampling_method.as_str()) {
        return Err(refuse(
            "latent_sampling_method",
            format!(
                "{:?}: atelier encodes latents once (once, deterministic)",
                req.latent_sampling_method
            ),
        ));
    }
    let max_grad_norm = match req.clip_grad_mode.as_str() {
        "disabled" => 0.0,
        "norm" => text_of(&req.clip_grad_value)
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite() && *v > 0.0)
            .ok_or_else(|| refuse("clip_grad_value", "must be a positive number"))?,
        other => {
            return Err(refuse(
                "clip_grad_mode",
                format!("{other:?}: use disabled or norm (clipping by value is not supported)"),
            ))
        }
    };
    let mut s = TrainSpec::new(
        base,
        &req.embedding_name,
        TrainData::Dataset {
            dataset,
            version,
            splits: vec!["train".into()],
            include_flagged: false,
        },
    );
    s.embedding = Some(EmbeddingTrainSpec {
        learn_rate: text_of(&req.learn_rate),
        templates,
        ..Default::default()
    });
    s.resolution = req.training_width.max(req.training_height);
    s.enable_bucket = req.varsize;
    s.batch_size = req.batch_size;
    s.gradient_accumulation_steps = req.gradient_step;
    s.max_train_steps = req.steps;
    s.max_grad_norm = max_grad_norm;
    s.shuffle_caption = req.shuffle_tags;
    s.caption_tag_dropout_rate = req.tag_drop_out;
    if req.save_embedding_every > 0 {
        s.checkpoint_every = req.save_embedding_every;
    }
    if req.create_image_every > 0 {
        s.sample_every = req.create_image_every;
        s.sample_prompts = vec![
            match req.preview_from_txt2img && !req.preview_prompt.is_empty() {
                true => req.preview_prompt.clone(),
                false => "[name]".into(),
            },
        ];
        if req.preview_from_txt2img {
            if let Some(n) = &req.preview_sampler_name {
                s.sample_sampler = n.clone();
            }
            if let Some(n) = req.preview_steps {
                s.sample_steps = n;
            }
        }
    }
    s.check()
        .map_err(|e| ApiError::unprocessable("invalid_job", e))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(extra: Value) -> TrainEmbeddingRequest {
        let mut v = json!({"embedding_name": "tok", "data_root": "shapes", "steps": 20,
            "training_width": 64, "training_height": 64});
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a1111_fields_map_to_the_training_job() {
        let r = req(
            json!({"learn_rate": 0.01, "gradient_step": 2, "clip_grad_mode": "norm",
            "clip_grad_value": "0.5", "shuffle_tags": true, "tag_drop_out": 0.1,
            "data_root": "shapes@3", "save_embedding_every": 5}),
        );
        let s = train_spec(&r, "tiny", vec!["[name], [filewords]".into()]).unwrap();
        assert_eq!(s.base_model, "tiny");
        assert_eq!(s.output_name, "tok");
        assert_eq!(
            s.data,
            TrainData::Dataset {
                dataset: "shapes".into(),
                version: Some(3),
                splits: vec!["train".into()],
                include_flagged: false
            }
        );
        let e = s.embedding.as_ref().unwrap();
        assert_eq!(e.learn_rate, "0.01");
        assert_eq!(e.templates, ["[name], [filewords]"]);
        assert_eq!(
            (
                s.resolution,
                s.max_train_steps,
                s.gradient_accumulation_steps
            ),
            (64, 20, 2)
        );
        assert_eq!(s.max_grad_norm, 0.5);
        assert!(s.shuffle_caption);
        assert_eq!(s.caption_tag_dropout_rate, 0.1);
        assert_eq!(s.checkpoint_every, 5);
        assert!(!s.enable_bucket);
        // Clipping is off unless asked for, as in A1111.
        let s = train_spec(&req(json!({})), "tiny", vec!["[filewords]".into()]).unwrap();
        assert_eq!(s.max_grad_norm, 0.0);
    }

    #[test]
    fn what_atelier_does_not_take_is_refused_by_name() {
        for (extra, field) in [
            (json!({"use_weight": true}), "use_weight"),
            (
                json!({"latent_sampling_method": "random"}),
                "latent_sampling_method",
            ),
            (json!({"clip_grad_mode": "value"}), "clip_grad_mode"),
            (json!({"training_width": 128}), "training_width"),
            (json!({"data_root": "shapes@x"}), "data_root"),
            (json!({"learn_rate": "fast"}), "learn_rate"),
            (json!({"embedding_name": "../x"}), "embedding_name"),
        ] {
            let e = train_spec(&req(extra), "tiny", vec!["[filewords]".into()]).unwrap_err();
            assert!(e.message.contains(field), "{} lacks {field}", e.message);
        }
        let bad = json!({"embedding_name": "t", "data_root": "d", "hypernetwork_name": "x"});
        assert!(serde_json::from_value::<TrainEmbeddingRequest>(bad).is_err());
    }
}
