//! AUTOMATIC1111-compatible routes, so existing A1111 clients work unchanged: `/sdapi/v1/txt2img`
//! and `/sdapi/v1/img2img` wait for their jobs and answer with base64 PNGs, `parameters` and
//! `info` as A1111 does; samplers, models, options, progress and interrupt too. Unlike A1111,
//! concurrent requests (and the `n_iter` batches of one request) run in parallel across workers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use atelier_contracts::generate::{InpaintFill, RandnSource, ResizeMode};
use atelier_contracts::samplers::SamplerKind;
use atelier_contracts::{GenerateKind, GenerateSpec, JobId, JobOutput, JobRecord, JobState};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::api::{enqueue_generate, AppState};
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

/// Default model, jobs in flight and the registry the A1111 routes see.
#[derive(Default)]
pub struct A1111State {
    models: Option<PathBuf>,
    default_model: RwLock<Option<String>>,
    pub(crate) settings: RwLock<Settings>,
    pub(crate) active: Mutex<Vec<JobId>>,
}

/// The A1111 options that change how images are made, as `POST /sdapi/v1/options` set them.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// `sd_vae`: a separate VAE file under `<models>/vae` (none: "Automatic", the model's own).
    vae: Option<String>,
    /// `show_progress_every_n_steps`: a live preview every n steps (0: none), which
    /// `/progress` shows as `current_image` and an interrupt returns for the unfinished image.
    preview_every: u32,
    /// `CLIP_stop_at_last_layers`: A1111's clip skip.
    clip_skip: u32,
    /// `randn_source`: "CPU", or "NV" (A1111's "GPU" on an NVIDIA card draws what NV draws).
    randn_source: RandnSource,
    /// `eta_noise_seed_delta`.
    ensd: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            vae: None,
            preview_every: 0,
            clip_skip: 1,
            randn_source: RandnSource::Cpu,
            ensd: 0,
        }
    }
}

impl Settings {
    /// These settings with A1111 option values from `opts` applied, or why one is invalid.
    fn with(mut self, opts: &HashMap<String, Value>) -> Result<Self, ApiError> {
        let bad = |name: &str, want: &str| {
            ApiError::unprocessable("invalid_option", format!("{name} must be {want}"))
        };
        if let Some(v) = opts.get("CLIP_stop_at_last_layers") {
            self.clip_skip = v
                .as_u64()
                .filter(|n| (1..=12).contains(n))
                .ok_or_else(|| bad("CLIP_stop_at_last_layers", "an integer 1..=12"))?
                as u32;
        }
        if let Some(v) = opts.get("randn_source") {
            self.randn_source = match v.as_str() {
                Some("CPU") | Some("cpu") => RandnSource::Cpu,
                Some("NV") | Some("nv") | Some("GPU") | Some("gpu") => RandnSource::Nv,
                _ => return Err(bad("randn_source", "\"CPU\", \"GPU\" or \"NV\"")),
            };
        }
        if let Some(v) = opts.get("show_progress_every_n_steps") {
            // A1111: -1 is every step, 0 none.
            self.preview_every = match v.as_i64() {
                Some(-1) => 1,
                Some(n) if (0..=1000).contains(&n) => n as u32,
                _ => return Err(bad("show_progress_every_n_steps", "an integer -1..=1000")),
            };
        }
        if let Some(v) = opts.get("sd_vae") {
            self.vae = match v.as_str() {
                Some("Automatic") | Some("None") | Some("") => None,
                Some(name) => Some(name.to_owned()),
                None => {
                    return Err(bad(
                        "sd_vae",
                        "a string (\"Automatic\", \"None\" or a VAE file name)",
                    ))
                }
            };
        }
        if let Some(v) = opts.get("eta_noise_seed_delta") {
            self.ensd = v
                .as_u64()
                .ok_or_else(|| bad("eta_noise_seed_delta", "a non-negative integer"))?;
        }
        Ok(self)
    }

    fn randn_source_name(&self) -> &'static str {
        match self.randn_source {
            RandnSource::Cpu => "CPU",
            RandnSource::Nv => "NV",
        }
    }
}

impl A1111State {
    pub fn new(models: Option<PathBuf>) -> Self {
        Self {
            models,
            ..Default::default()
        }
    }

    /// The local model folder (the registry's root), if the gateway has one.
    pub(crate) fn models_dir(&self) -> Option<&std::path::Path> {
        self.models.as_deref()
    }

    pub(crate) fn registry(&self) -> Option<atelier_registry::Registry> {
        self.models.as_ref().map(atelier_registry::Registry::new)
    }

    /// The local registry's checkpoints, then the object store's (`models/`) whose names the
    /// registry does not have; a store that cannot be listed adds nothing (and is logged).
    async fn checkpoints(&self, store: &atelier_kit::Store) -> Vec<atelier_registry::Entry> {
        let mut out: Vec<_> = self
            .registry()
            .map(|r| {
                r.list()
                    .into_iter()
                    .filter(|e| e.kind.is_checkpoint())
                    .collect()
            })
            .unwrap_or_default();
        match atelier_registry::store::list(store).await {
            Ok(listed) => {
                for e in listed.into_iter().filter(|e| e.kind.is_checkpoint()) {
                    if !out.iter().any(|l| l.name == e.name) {
                        out.push(e);
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing models/ in the object store"),
        }
        out
    }
}

fn d_steps() -> u32 {
    20
}
fn d_cfg() -> f64 {
    7.0
}
fn d_side() -> u32 {
    512
}
fn d_one() -> u32 {
    1
}
fn d_hr_scale() -> f64 {
    2.0
}
fn d_true() -> bool {
    true
}
fn d_seed() -> i64 {
    -1
}
fn strength_or_default<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or_else(d_strength))
}

fn d_strength() -> f64 {
    0.75
}
fn d_blur() -> f32 {
    4.0
}

/// A1111's txt2img request: the fields atelier uses. Other A1111 fields are accepted at values
/// that would not change the image and refused (422, naming them) otherwise; see
/// `a1111_params`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Txt2ImgRequest {
    #[serde(default)]
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    /// -1 picks one at random.
    #[serde(default = "d_seed")]
    pub seed: i64,
    #[serde(default)]
    pub sampler_name: Option<String>,
    #[serde(default)]
    pub sampler_index: Option<String>,
    /// A1111 1.9+: "Karras", "Automatic", ...
    #[serde(default)]
    pub scheduler: Option<String>,
    #[serde(default = "d_one")]
    pub batch_size: u32,
    /// Batches; atelier runs them in parallel.
    #[serde(default = "d_one")]
    pub n_iter: u32,
    #[serde(default = "d_steps")]
    pub steps: u32,
    #[serde(default = "d_cfg")]
    pub cfg_scale: f64,
    #[serde(default = "d_side")]
    pub width: u32,
    #[serde(default = "d_side")]
    pub height: u32,
    /// Variation seed; -1 picks one at random (used when `subseed_strength` is not 0).
    #[serde(default = "d_seed")]
    pub subseed: i64,
    #[serde(default)]
    pub subseed_strength: f64,
    /// `sd_model_checkpoint`, `CLIP_stop_at_last_layers`, `randn_source`,
    /// `eta_noise_seed_delta`.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub override_settings: Option<HashMap<String, Value>>,
    /// Hires fix: a second pass at `hr_scale` × the size (or `hr_resize_x`/`hr_resize_y`).
    #[serde(default)]
    pub enable_hr: bool,
    #[serde(default = "d_hr_scale")]
    pub hr_scale: f64,
    #[serde(default)]
    pub hr_upscaler: Option<String>,
    #[serde(default)]
    pub hr_second_pass_steps: u32,
    #[serde(default)]
    pub hr_resize_x: u32,
    #[serde(default)]
    pub hr_resize_y: u32,
    #[serde(default)]
    pub hr_prompt: Option<String>,
    #[serde(default)]
    pub hr_negative_prompt: Option<String>,
    /// txt2img: the hires pass's denoising strength.
    #[serde(default)]
    pub denoising_strength: Option<f64>,
    /// false: answer without the images (they stay in the object store, named in `info`).
    #[serde(default = "d_true")]
    pub send_images: bool,
    /// An infotext (A1111's `parameters` text) whose fields fill those the request leaves out.
    #[serde(default)]
    pub infotext: Option<String>,
    /// FLUX.1-dev's embedded guidance (Forge's name; default 3.5).
    #[serde(default)]
    pub distilled_cfg_scale: Option<f64>,
    /// FLUX / SD 3: T5 tokens read from the prompt (default 512 for FLUX-dev, else 256).
    #[serde(default)]
    pub max_sequence_length: Option<u32>,
    /// FLUX / SD 3: a fixed flow-matching shift in place of the model's scheduler config.
    #[serde(default)]
    pub shift: Option<f64>,
}

/// A1111's img2img request: txt2img's fields plus the images.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Img2ImgRequest {
    #[serde(flatten)]
    pub base: Txt2ImgRequest,
    /// Base64 images (a `data:` prefix is accepted); the first is used.
    #[serde(default)]
    pub init_images: Vec<String>,
    /// Base64 mask: white is repainted.
    #[serde(default)]
    pub mask: Option<String>,
    /// (Documented as the hires field it shadows is: a number, or null for the default 0.75.)
    #[serde(default = "d_strength", deserialize_with = "strength_or_default")]
    #[schema(value_type = Option<f64>)]
    pub denoising_strength: f64,
    #[serde(default = "d_blur")]
    pub mask_blur: f32,
    #[serde(default)]
    pub inpainting_mask_invert: u8,
    /// Masked content: 0 fill (A1111's default), 1 original, 2 latent noise, 3 latent nothing.
    #[serde(default)]
    pub inpainting_fill: i64,
    /// Only masked (A1111's default, true): generate the mask's box at width×height and paste
    /// it back.
    #[serde(default = "d_true", deserialize_with = "bool_or_number")]
    pub inpaint_full_res: bool,
    #[serde(default)]
    pub inpaint_full_res_padding: u32,
    /// 0 just resize, 1 crop and resize, 2 resize and fill.
    #[serde(default)]
    pub resize_mode: i64,
}

/// A1111 clients send flags as booleans or as 0/1.
fn bool_or_number<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    match Value::deserialize(d)? {
        Value::Bool(b) => Ok(b),
        Value::Number(n) => Ok(n.as_f64().is_some_and(|f| f != 0.0)),
        Value::Null => Ok(true),
        other => Err(serde::de::Error::custom(format!(
            "expected a boolean, got {other}"
        ))),
    }
}

/// A1111's answer: base64 PNGs, the request, and `info` (a JSON string).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageResponse {
    pub images: Vec<String>,
    #[schema(value_type = Object)]
    pub parameters: Value,
    pub info: String,
}

fn sampler_of(req: &Txt2ImgRequest) -> Result<SamplerKind, ApiError> {
    let name = req
        .sampler_name
        .clone()
        .or_else(|| req.sampler_index.clone())
        .unwrap_or_else(|| "Euler a".into());
    let scheduler = req.scheduler.as_deref().map(str::to_ascii_lowercase);
    let karras = match scheduler.as_deref() {
        None | Some("") | Some("automatic") => false,
        Some("karras") => true,
        Some(other) => {
            return Err(ApiError::unprocessable(
                "unknown_scheduler",
                format!("unknown scheduler {other:?}; GET /sdapi/v1/schedulers lists them"),
            ))
        }
    };
    let found = if karras {
        SamplerKind::parse(&format!("{name} Karras")).or_else(|| SamplerKind::parse(&name))
    } else {
        SamplerKind::parse(&name)
    };
    found.ok_or_else(|| {
        ApiError::unprocessable(
            "unknown_sampler",
            format!("unknown sampler {name:?}; GET /sdapi/v1/samplers lists them"),
        )
    })
}

/// "name [hash]" or "name.safetensors" → the registry name.
fn model_name(title: &str) -> String {
    let t = title.split(" [").next().unwrap_or(title).trim();
    t.strip_suffix(".safetensors").unwrap_or(t).to_string()
}

async fn model_of(app: &AppState, req: &Txt2ImgRequest) -> Result<String, ApiError> {
    if let Some(m) = req
        .override_settings
        .as_ref()
        .and_then(|o| o.get("sd_model_checkpoint"))
        .and_then(|v| v.as_str())
    {
        return Ok(model_name(m));
    }
    current_model(app).await
}

/// The model A1111 routes use when a request names none: the `sd_model_checkpoint` option, else
/// the first checkpoint listed.
pub(crate) async fn current_model(app: &AppState) -> Result<String, ApiError> {
    if let Some(m) = app.a1111.default_model.read().ok().and_then(|g| g.clone()) {
        return Ok(m);
    }
    app.a1111
        .checkpoints(&app.store)
        .await
        .into_iter()
        .next()
        .map(|e| e.name)
        .ok_or_else(|| {
            ApiError::unprocessable(
                "no_model",
                "no model chosen: set override_settings.sd_model_checkpoint or POST /sdapi/v1/options",
            )
        })
}

/// The image's bytes and header. Pixels are decoded by the worker (under its decode budget); the
/// gateway reads only the header, checked against the decode limits.
pub(crate) fn decode_b64_image(
    field: &str,
    s: &str,
) -> Result<(Vec<u8>, atelier_decode::Header), ApiError> {
    let data = s.split_once(";base64,").map_or(s, |(_, d)| d).trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| {
            ApiError::unprocessable("malformed_base64", format!("{field}: not base64: {e}"))
        })?;
    let header = atelier_decode::header(&bytes, &atelier_decode::Limits::default())
        .map_err(|e| crate::error::decode_error(field, &e))?;
    Ok((bytes, header))
}

async fn spec_of(app: &AppState, req: &Txt2ImgRequest) -> Result<GenerateSpec, ApiError> {
    let sampler = sampler_of(req)?;
    let saved = app
        .a1111
        .settings
        .read()
        .map(|s| s.clone())
        .unwrap_or_default();
    let settings = match &req.override_settings {
        Some(o) => saved.with(o)?,
        None => saved,
    };
    if req.n_iter == 0 || req.n_iter > 16 {
        return Err(ApiError::unprocessable(
            "invalid_job",
            format!("n_iter must be 1..=16 (got {})", req.n_iter),
        ));
    }
    Ok(GenerateSpec {
        model: model_of(app, req).await?,
        vae: settings.vae.clone(),
        prompt: req.prompt.clone(),
        negative_prompt: req.negative_prompt.clone(),
        steps: req.steps,
        cfg_scale: req.cfg_scale,
        seed: None,
        width: req.width,
        height: req.height,
        batch_size: req.batch_size,
        sampler: sampler.name().to_string(),
        clip_skip: settings.clip_skip,
        randn_source: settings.randn_source,
        subseed: None,
        subseed_strength: req.subseed_strength,
        eta_noise_seed_delta: settings.ensd,
        init_image: None,
        strength: 0.75,
        mask: None,
        mask_blur: 4.0,
        mask_invert: false,
        preview_every: settings.preview_every,
        inpaint_fill: InpaintFill::Original,
        inpaint_only_masked: false,
        inpaint_padding: 0,
        hires: req
            .enable_hr
            .then(|| atelier_contracts::generate::HiresSpec {
                scale: req.hr_scale,
                width: req.hr_resize_x,
                height: req.hr_resize_y,
                upscaler: req
                    .hr_upscaler
                    .clone()
                    .filter(|u| !u.is_empty())
                    .unwrap_or_else(|| "Latent".into()),
                steps: req.hr_second_pass_steps,
                denoising_strength: req.denoising_strength.unwrap_or(0.7),
                prompt: req.hr_prompt.clone().filter(|p| !p.is_empty()),
                negative_prompt: req.hr_negative_prompt.clone().filter(|p| !p.is_empty()),
            }),
        resize_mode: ResizeMode::JustResize,
        guidance: req.distilled_cfg_scale,
        max_sequence_length: req.max_sequence_length,
        shift: req.shift,
    })
}

/// Queue `n_iter` jobs (seeds continuing across batches), wait for all, answer as A1111.
async fn run(
    app: &AppState,
    caller: &Caller,
    spec: GenerateSpec,
    kind: GenerateKind,
    req: &Txt2ImgRequest,
    parameters: Value,
) -> Result<Json<ImageResponse>, ApiError> {
    let pick = |s: i64| {
        if s < 0 {
            rand::random::<u32>() as u64
        } else {
            s as u64
        }
    };
    let (seed, subseed) = (pick(req.seed), pick(req.subseed));
    let mut ids = Vec::new();
    for i in 0..req.n_iter as u64 {
        let mut s = spec.clone();
        s.seed = Some(seed + i * spec.batch_size as u64);
        s.subseed = Some(subseed + i * spec.batch_size as u64);
        let record = enqueue_generate(app, caller, s, kind).await?;
        ids.push(record.id);
    }
    if let Ok(mut a) = app.a1111.active.lock() {
        a.extend(ids.iter().copied());
    }
    let result = wait_all(app, &ids).await;
    if let Ok(mut a) = app.a1111.active.lock() {
        a.retain(|id| !ids.contains(id));
    }
    let records = result?;
    let mut images = Vec::new();
    let mut seeds = Vec::new();
    let mut infotexts = Vec::new();
    let mut hash = String::new();
    for r in &records {
        match (&r.state, &r.output) {
            (JobState::Succeeded, Some(JobOutput::Images(out))) => {
                hash.clone_from(&out.model_hash);
                for img in &out.images {
                    seeds.push(img.seed);
                    infotexts.push(out.parameters.replace(
                        &format!("Seed: {}", out.images[0].seed),
                        &format!("Seed: {}", img.seed),
                    ));
                    if !req.send_images {
                        continue;
                    }
                    let key = atelier_contracts::ArtifactKey::parse(&img.image.key)
                        .map_err(|e| ApiError::unavailable(format!("bad artifact key: {e}")))?;
                    let bytes = app.store.get_bytes(&key).await.map_err(ApiError::from)?;
                    images.push(base64::engine::general_purpose::STANDARD.encode(&bytes));
                }
            }
            // Interrupted or skipped: its image as far as it got (the last live preview), if
            // previews were on; the finished images of the other jobs are answered as usual.
            (JobState::Cancelled, _) => {
                let preview = r.progress.as_ref().and_then(|p| p.preview.as_deref());
                let key = preview.and_then(|k| atelier_contracts::ArtifactKey::parse(k).ok());
                if let (Some(key), true) = (key, req.send_images) {
                    let bytes = app.store.get_bytes(&key).await.map_err(ApiError::from)?;
                    images.push(base64::engine::general_purpose::STANDARD.encode(&bytes));
                }
            }
            (_, _) => {
                let e = r.error.clone();
                let (code, msg) = e.map(|e| (e.code, e.message)).unwrap_or_default();
                let status = if matches!(
                    code.as_str(),
                    "unknown_model"
                        | "unknown_vae"
                        | "unknown_lora"
                        | "invalid_job"
                        | "bad_image"
                        | "unknown_sampler"
                ) {
                    StatusCode::UNPROCESSABLE_ENTITY
                } else {
                    StatusCode::INTERNAL_SERVER_ERROR
                };
                return Err(ApiError::new(
                    status,
                    "generation_failed",
                    format!("job {} failed ({code}): {msg}", r.id),
                ));
            }
        }
    }
    let info = json!({
        "prompt": spec.prompt,
        "all_prompts": vec![spec.prompt.clone(); seeds.len()],
        "negative_prompt": spec.negative_prompt,
        "all_negative_prompts": vec![spec.negative_prompt.clone(); seeds.len()],
        "seed": seeds.first().copied().unwrap_or(seed),
        "all_seeds": seeds,
        "subseed": subseed,
        "all_subseeds": (0..seeds.len() as u64).map(|i| subseed + i).collect::<Vec<_>>(),
        "subseed_strength": spec.subseed_strength,
        "width": spec.width,
        "height": spec.height,
        "sampler_name": SamplerKind::parse(&spec.sampler).and_then(|k| k.a1111_name()).unwrap_or(&spec.sampler),
        "cfg_scale": spec.cfg_scale,
        "steps": spec.steps,
        "batch_size": spec.batch_size,
        "clip_skip": spec.clip_skip,
        "sd_model_name": spec.model,
        "sd_model_hash": hash,
        "denoising_strength": if kind == GenerateKind::Txt2Img { Value::Null } else { json!(spec.strength) },
        "infotexts": infotexts,
        "job_ids": ids.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
    });
    Ok(Json(ImageResponse {
        images,
        parameters,
        info: info.to_string(),
    }))
}

pub(crate) async fn wait_all(app: &AppState, ids: &[JobId]) -> Result<Vec<JobRecord>, ApiError> {
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        let mut done = Vec::new();
        for id in ids {
            if let Some((r, _)) = app.states.get(*id).await? {
                if r.state.is_terminal() {
                    done.push(r);
                }
            }
        }
        if done.len() == ids.len() {
            return Ok(done);
        }
        if app.shutdown.is_cancelled() {
            return Err(ApiError::unavailable(
                "the gateway is shutting down; the jobs continue (see /v1/jobs)",
            ));
        }
        if Instant::now() > deadline {
            return Err(ApiError::unavailable(
                "the jobs did not finish within an hour; follow them at /v1/jobs",
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Queues one job for an A1111 route and waits for it: its output when it succeeded, else an
/// error named `failed_code` carrying the job's code and message — 422 for the job codes that
/// mean the request was at fault (`user_codes`), 500 for the rest.
pub(crate) async fn run_one(
    app: &AppState,
    caller: &Caller,
    spec: atelier_contracts::JobSpec,
    failed_code: &'static str,
    user_codes: &[&str],
) -> Result<JobOutput, ApiError> {
    let kind = spec.kind();
    let record = crate::api::queue(app, caller, spec).await?;
    let r = wait_all(app, &[record.id])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::unavailable(format!("the {kind} job's record is gone")))?;
    match (r.state, r.output) {
        (JobState::Succeeded, Some(out)) => Ok(out),
        (state, _) => {
            let (code, msg) = r.error.map(|e| (e.code, e.message)).unwrap_or_default();
            let status = match user_codes.contains(&code.as_str()) {
                true => StatusCode::UNPROCESSABLE_ENTITY,
                false => StatusCode::INTERNAL_SERVER_ERROR,
            };
            Err(ApiError::new(
                status,
                failed_code,
                format!("{kind} job {} ended {state:?} ({code}): {msg}", r.id),
            ))
        }
    }
}

/// An A1111 generation request: its `infotext` applied, every field checked (a field atelier
/// would not honour is a 422 naming it), then read.
async fn generation_body<T: serde::de::DeserializeOwned>(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
    img2img: bool,
) -> Result<T, ApiError> {
    let mut map: serde_json::Map<String, Value> = json_body(app, headers, body).await?;
    crate::a1111_params::apply_infotext(&mut map, img2img);
    crate::a1111_params::check(&map)?;
    serde_json::from_value(Value::Object(map))
        .map_err(|e| ApiError::unprocessable("invalid_json", format!("invalid request: {e}")))
}

pub(crate) async fn json_body<T: serde::de::DeserializeOwned>(
    app: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<T, ApiError> {
    let bytes = crate::api::read_body(headers, body, app.limits.a1111).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::unprocessable("invalid_json", format!("invalid request: {e}")))
}

/// A1111's txt2img: waits for the images.
#[utoipa::path(post, path = "/sdapi/v1/txt2img", tag = "a1111", operation_id = "text2imgapi_sdapi_v1_txt2img_post", request_body = Txt2ImgRequest,
    responses((status = 200, body = ImageResponse), (status = 422, body = atelier_contracts::http::ApiErrorBody)),
    security(("bearer" = ["jobs:write"])))]
pub async fn txt2img(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ImageResponse>, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let req: Txt2ImgRequest = generation_body(&app, &headers, body, false).await?;
    let spec = spec_of(&app, &req).await?;
    let params = serde_json::to_value(&req).unwrap_or(Value::Null);
    run(&app, &caller, spec, GenerateKind::Txt2Img, &req, params).await
}

/// A1111's img2img (inpainting when a mask is given): waits for the images.
#[utoipa::path(post, path = "/sdapi/v1/img2img", tag = "a1111", operation_id = "img2imgapi_sdapi_v1_img2img_post", request_body = Img2ImgRequest,
    responses((status = 200, body = ImageResponse), (status = 422, body = atelier_contracts::http::ApiErrorBody)),
    security(("bearer" = ["jobs:write"])))]
pub async fn img2img(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<ImageResponse>, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let req: Img2ImgRequest = generation_body(&app, &headers, body, true).await?;
    let mut spec = spec_of(&app, &req.base).await?;
    let first = req.init_images.first().ok_or_else(|| {
        ApiError::unprocessable("invalid_job", "init_images needs one base64 image")
    })?;
    let (init_bytes, init) = decode_b64_image("init_images[0]", first)?;
    let mask = match &req.mask {
        Some(m) => {
            let (bytes, img) = decode_b64_image("mask", m)?;
            if (img.width, img.height) != (init.width, init.height) {
                return Err(ApiError::unprocessable(
                    "mask_size_mismatch",
                    format!(
                        "the mask is {}x{} but the image is {}x{}",
                        img.width, img.height, init.width, init.height
                    ),
                ));
            }
            Some(bytes)
        }
        None => None,
    };
    spec.strength = req.denoising_strength;
    spec.mask_blur = req.mask_blur;
    spec.mask_invert = req.inpainting_mask_invert != 0;
    spec.inpaint_fill = InpaintFill::from_a1111(req.inpainting_fill).ok_or_else(|| {
        ApiError::unprocessable(
            "invalid_job",
            format!("inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing), not {}", req.inpainting_fill),
        )
    })?;
    spec.inpaint_only_masked = req.inpaint_full_res;
    spec.resize_mode = ResizeMode::from_a1111(req.resize_mode).ok_or_else(|| {
        ApiError::unprocessable(
            "unsupported_parameter",
            format!("resize_mode: 0 (just resize), 1 (crop and resize), 2 (resize and fill) or 3 (just resize, latent upscale), not {}", req.resize_mode),
        )
    })?;
    spec.inpaint_padding = req.inpaint_full_res_padding;
    // Check everything before storing anything.
    let kind = if mask.is_some() {
        GenerateKind::Inpaint
    } else {
        GenerateKind::Img2Img
    };
    let mut probe = spec.clone();
    probe.init_image = Some("sha256/00/".to_string() + &"0".repeat(64));
    probe.mask = mask
        .as_ref()
        .map(|_| "sha256/00/".to_string() + &"0".repeat(64));
    crate::api::validate_generate(&probe, kind)?;
    let (init_ref, _) = app
        .store
        .put_bytes(init_bytes.into(), "image/png")
        .await
        .map_err(ApiError::from)?;
    spec.init_image = Some(init_ref.key);
    if let Some(m) = mask {
        let (mref, _) = app
            .store
            .put_bytes(m.into(), "image/png")
            .await
            .map_err(ApiError::from)?;
        spec.mask = Some(mref.key);
    }
    let mut params = serde_json::to_value(&req.base).unwrap_or(Value::Null);
    params["denoising_strength"] = json!(req.denoising_strength);
    run(&app, &caller, spec, kind, &req.base, params).await
}

/// The samplers, by A1111's names (our names as aliases).
#[utoipa::path(get, path = "/sdapi/v1/samplers", tag = "a1111", operation_id = "get_samplers_sdapi_v1_samplers_get",
    responses((status = 200, description = "[{name, aliases, options}]")), security(("bearer" = ["jobs:read"])))]
pub async fn samplers(Extension(caller): Extension<Caller>) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    let list: Vec<Value> = SamplerKind::ALL
        .iter()
        .map(|k| json!({"name": k.a1111_name().unwrap_or(k.name()), "aliases": [k.name()], "options": {}}))
        .collect();
    Ok(Json(Value::Array(list)))
}

/// The registry's checkpoints.
#[utoipa::path(get, path = "/sdapi/v1/sd-models", tag = "a1111", operation_id = "get_sd_models_sdapi_v1_sd_models_get",
    responses((status = 200, description = "[{title, model_name, hash, sha256, filename, config}]")), security(("bearer" = ["jobs:read"])))]
pub async fn sd_models(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    let entries = app.a1111.checkpoints(&app.store).await;
    let list = tokio::task::spawn_blocking(move || entries.iter().map(sd_model).collect())
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("hashing checkpoints: {e}"),
            )
        })?;
    Ok(Json(Value::Array(list)))
}

/// One checkpoint as A1111 lists it: `hash` is the short hash infotexts carry as `Model hash`
/// (the first 10 hex digits of `sha256`); the title carries it in brackets. Checkpoints only in
/// the object store are not hashed until a worker has fetched them (`null`).
fn sd_model(e: &atelier_registry::Entry) -> Value {
    let sha = match e.path.exists() {
        true => atelier_registry::hash::sha256(&e.path)
            .map_err(|err| tracing::warn!(model = %e.name, error = %err, "hashing a checkpoint"))
            .ok(),
        false => None,
    };
    let short = sha.as_deref().map(atelier_registry::hash::short);
    let title = match short {
        Some(h) => format!("{} [{h}]", e.name),
        None => e.name.clone(),
    };
    // `family` is atelier's: flux / sd3 (flow matching, Euler) or unet; A1111 clients ignore it.
    let family = match e.path.exists() {
        true => Some(atelier_registry::family(&e.path)),
        false => None,
    };
    json!({"title": title, "model_name": e.name, "hash": short, "sha256": sha, "filename": e.path, "config": null, "family": family})
}

/// The options A1111 clients read: the current model, clip skip, output format.
#[utoipa::path(get, path = "/sdapi/v1/options", tag = "a1111", operation_id = "get_config_sdapi_v1_options_get",
    responses((status = 200, description = "{sd_model_checkpoint, ...}")), security(("bearer" = ["jobs:read"])))]
pub async fn get_options(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    let current = app.a1111.default_model.read().ok().and_then(|g| g.clone());
    let current = match current {
        Some(c) => Some(c),
        None => app
            .a1111
            .checkpoints(&app.store)
            .await
            .into_iter()
            .next()
            .map(|e| e.name),
    };
    let s = app
        .a1111
        .settings
        .read()
        .map(|s| s.clone())
        .unwrap_or_default();
    Ok(Json(json!({
        "sd_model_checkpoint": current,
        "show_progress_every_n_steps": s.preview_every,
        "CLIP_stop_at_last_layers": s.clip_skip,
        "randn_source": s.randn_source_name(),
        "eta_noise_seed_delta": s.ensd,
        "sd_vae": s.vae.as_deref().unwrap_or("Automatic"),
        "samples_format": "png",
    })))
}

/// Set the default model (`sd_model_checkpoint`), clip skip (`CLIP_stop_at_last_layers`), the
/// noise source (`randn_source`: CPU, or NV, which A1111's GPU also means) and
/// `eta_noise_seed_delta`; other options are accepted and ignored.
#[utoipa::path(post, path = "/sdapi/v1/options", tag = "a1111", operation_id = "set_config_sdapi_v1_options_post",
    responses((status = 200, description = "null"), (status = 422, body = atelier_contracts::http::ApiErrorBody)), security(("bearer" = ["jobs:write"])))]
pub async fn set_options(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let opts: HashMap<String, Value> = json_body(&app, &headers, body).await?;
    let saved = app
        .a1111
        .settings
        .read()
        .map(|s| s.clone())
        .unwrap_or_default();
    let settings = saved.with(&opts)?;
    if let (Some(name), Some(reg)) = (&settings.vae, app.a1111.registry()) {
        reg.vae(name)
            .map_err(|e| ApiError::unprocessable("unknown_vae", e))?;
    }
    if let Some(v) = opts.get("sd_model_checkpoint") {
        let title = v.as_str().ok_or_else(|| {
            ApiError::unprocessable("invalid_json", "sd_model_checkpoint must be a string")
        })?;
        let name = model_name(title);
        if let Some(reg) = app.a1111.registry() {
            if let Err(e) = reg.checkpoint(&name) {
                let in_store = app
                    .a1111
                    .checkpoints(&app.store)
                    .await
                    .iter()
                    .any(|c| c.name == name);
                if !in_store {
                    return Err(ApiError::unprocessable(
                        "unknown_model",
                        format!("{e}; nor models/{name}.safetensors or models/{name}/ in the object store"),
                    ));
                }
            }
        }
        if let Ok(mut g) = app.a1111.default_model.write() {
            *g = Some(name);
        }
    }
    if let Ok(mut g) = app.a1111.settings.write() {
        *g = settings;
    }
    Ok(Json(Value::Null))
}
