//! The HTTP API (axum). Routes, one line each:
//!
//! - `POST   /v1/uploads`              artifact bytes in (streamed, content-addressed) → 201/200
//! - `GET    /v1/artifacts/{key}`      artifact bytes out (streamed)
//! - `POST   /v1/jobs`                 submit a job → 202 with its record
//! - `GET    /v1/jobs/{id}`            the job's record
//! - `DELETE /v1/jobs/{id}`            cancel (reaches a running worker within a second)
//! - `GET    /v1/jobs/{id}/events`     Server-Sent Events: every change of the record until it ends
//! - `GET    /v1/images/{sha256}`      an ingested image's record
//! - `POST   /v1/images`, `GET /v1/datasets…`  announce images, read dataset versions ([`crate::datasets`])
//! - `GET    /v1/datasets/{name}/versions/{version}/rows`, `/v1/thumbnails/{key}`  the gallery's rows
//!   and thumbnails ([`crate::dataset_rows`]); `…/versions/{version}/changes?against=N` what changed
//!   row by row ([`crate::dataset_changes`])
//! - `GET|POST /v1/search`, `POST /v1/datasets/{name}/index|curate`  retrieval ([`crate::retrieval`])
//! - `POST /v1/datasets/{name}/augment`  augmentation ([`crate::augment`])
//! - `POST /v1/datasets/{name}/exports`  a version exported into the object store ([`crate::datasets`])
//! - `POST   /v1/train/lora|dreambooth`  training ([`crate::train`])
//! - `GET    /healthz`, `/metrics`, `/openapi.json` (no auth)
//! - `GET    /`, `/ui/app.js`, `/ui/app.css`  the web UI's files ([`crate::ui`]; no auth, no data)
//!
//! Every `/v1` route needs `Authorization: Bearer <key>` with the route's scope ([`crate::auth`]).
//! Errors are JSON `{"error":{"code","message"}}` ([`ApiError`]), made in one place.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use atelier_contracts::http::{ApiErrorBody, SubmitJob, UploadResponse};
use atelier_contracts::images::ImageRecord;
use atelier_contracts::{
    artifact::is_sha256_hex, ArtifactKey, JobId, JobRecord, JobRequest, JobSpec, JobState,
    SCHEMA_VERSION,
};
use atelier_kit::jobstate::JobStates;
use atelier_kit::telemetry::{Health, HttpLabels, Metrics};
use atelier_kit::{Bus, Store};
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;

use crate::auth::{self, Auth, Caller, Scope};
use crate::error::ApiError;

#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// `POST /v1/jobs` bodies.
    pub json: u64,
    /// `POST /v1/uploads` bodies.
    pub upload: u64,
    /// A1111 request bodies (JSON carrying base64 images).
    pub a1111: u64,
}

/// Everything handlers share.
#[derive(Clone)]
pub struct AppState {
    pub bus: Bus,
    pub store: Store,
    pub states: JobStates,
    pub images: kv::Store,
    /// `Idempotency-Key` entries (see [`crate::idempotency`]).
    pub idempotency: kv::Store,
    pub metrics: Arc<Metrics>,
    pub limits: BodyLimits,
    /// Ends open event streams when the gateway shuts down.
    pub shutdown: CancellationToken,
    /// State of the AUTOMATIC1111-compatible routes (default model, jobs in flight, registry).
    pub a1111: Arc<crate::a1111::A1111State>,
    /// Job webhooks and their delivery logs (see [`crate::webhooks`]).
    pub webhooks: kv::Store,
    /// Signs webhooks; none: the gateway refuses `Atelier-Webhook`.
    pub webhook_secret: Option<Arc<str>>,
    /// Per API key name, the webhook of the jobs it creates without one of their own.
    pub key_webhooks: Arc<std::collections::HashMap<String, String>>,
}

impl AppState {
    pub async fn new(
        bus: Bus,
        store: Store,
        metrics: Arc<Metrics>,
        limits: BodyLimits,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Self> {
        let states = JobStates::new(bus.jobs_kv().await?);
        let images = bus.images_kv().await?;
        let idempotency = bus.idempotency_kv().await?;
        let webhooks = bus.webhooks_kv().await?;
        Ok(Self {
            bus,
            store,
            states,
            images,
            idempotency,
            metrics,
            limits,
            shutdown,
            a1111: Arc::default(),
            webhooks,
            webhook_secret: None,
            key_webhooks: Default::default(),
        })
    }

    /// Point the A1111 routes at a model registry (`/sdapi/v1/sd-models`, model checks).
    pub fn with_models(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.a1111 = Arc::new(crate::a1111::A1111State::new(dir));
        self
    }
}

/// The whole HTTP surface.
pub fn router(app: AppState, auth: Arc<Auth>) -> Router {
    // The routes that create a job, which honour `Idempotency-Key`.
    let creating = Router::new()
        .route("/v1/jobs", post(submit_job))
        .route("/v1/txt2img", post(txt2img))
        .route("/v1/img2img", post(img2img))
        .route("/v1/inpaint", post(inpaint))
        .route("/v1/train/lora", post(crate::train::lora))
        .route("/v1/train/dreambooth", post(crate::train::dreambooth))
        .route("/v1/datasets/{name}/index", post(crate::retrieval::index))
        .route("/v1/datasets/{name}/curate", post(crate::retrieval::curate))
        .route("/v1/datasets/{name}/augment", post(crate::augment::augment))
        .route("/v1/datasets/{name}/exports", post(crate::datasets::export))
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            crate::idempotency::middleware,
        ))
        .route_layer(middleware::from_fn_with_state(
            app.clone(),
            crate::webhooks::middleware,
        ))
        .route_layer(middleware::from_fn(crate::priority::middleware));
    let v1 = Router::new()
        .merge(creating)
        .route("/v1/jobs", get(crate::jobs::list))
        .route("/v1/jobs/{id}", get(get_job).delete(cancel_job))
        .route("/v1/jobs/{id}/events", get(job_events))
        .route("/v1/jobs/{id}/webhook", get(crate::webhooks::get_log))
        .route("/v1/uploads", post(upload))
        .route(
            "/sdapi/v1/txt2img",
            post(crate::a1111::txt2img)
                .route_layer(middleware::from_fn(crate::priority::middleware)),
        )
        .route(
            "/sdapi/v1/img2img",
            post(crate::a1111::img2img)
                .route_layer(middleware::from_fn(crate::priority::middleware)),
        )
        .route("/sdapi/v1/samplers", get(crate::a1111::samplers))
        .route("/sdapi/v1/sd-models", get(crate::a1111::sd_models))
        .route(
            "/sdapi/v1/options",
            get(crate::a1111::get_options).post(crate::a1111::set_options),
        )
        .route("/sdapi/v1/progress", get(crate::a1111_progress::progress))
        .route(
            "/sdapi/v1/interrupt",
            post(crate::a1111_progress::interrupt),
        )
        .route("/sdapi/v1/skip", post(crate::a1111_progress::skip))
        .route(
            "/sdapi/v1/schedulers",
            get(crate::a1111_catalog::schedulers),
        )
        .route("/sdapi/v1/upscalers", get(crate::a1111_catalog::upscalers))
        .route(
            "/sdapi/v1/latent-upscale-modes",
            get(crate::a1111_catalog::latent_upscale_modes),
        )
        .route("/sdapi/v1/sd-vae", get(crate::a1111_catalog::sd_vae))
        .route(
            "/sdapi/v1/hypernetworks",
            get(crate::a1111_catalog::hypernetworks),
        )
        .route(
            "/sdapi/v1/face-restorers",
            get(crate::a1111_catalog::face_restorers),
        )
        .route(
            "/sdapi/v1/realesrgan-models",
            get(crate::a1111_catalog::realesrgan_models),
        )
        .route(
            "/sdapi/v1/prompt-styles",
            get(crate::a1111_catalog::prompt_styles),
        )
        .route(
            "/sdapi/v1/script-info",
            get(crate::a1111_catalog::script_info),
        )
        .route(
            "/sdapi/v1/extensions",
            get(crate::a1111_catalog::extensions),
        )
        .route("/sdapi/v1/scripts", get(crate::a1111_catalog::scripts))
        .route(
            "/sdapi/v1/embeddings",
            get(crate::a1111_catalog::embeddings),
        )
        .route("/sdapi/v1/loras", get(crate::a1111_catalog::loras))
        .route("/sdapi/v1/memory", get(crate::a1111_catalog::memory))
        .route("/sdapi/v1/cmd-flags", get(crate::a1111_catalog::cmd_flags))
        .route(
            "/sdapi/v1/refresh-checkpoints",
            post(crate::a1111_catalog::refresh_checkpoints),
        )
        .route(
            "/sdapi/v1/refresh-vae",
            post(crate::a1111_catalog::refresh_vae),
        )
        .route(
            "/sdapi/v1/refresh-embeddings",
            post(crate::a1111_catalog::refresh_embeddings),
        )
        .route(
            "/sdapi/v1/refresh-loras",
            post(crate::a1111_catalog::refresh_loras),
        )
        .route(
            "/sdapi/v1/create/hypernetwork",
            post(crate::a1111_catalog::create_hypernetwork),
        )
        .route(
            "/sdapi/v1/train/hypernetwork",
            post(crate::a1111_catalog::train_hypernetwork),
        )
        .route(
            "/sdapi/v1/create/embedding",
            post(crate::a1111_embedding::create_embedding),
        )
        .route(
            "/sdapi/v1/train/embedding",
            post(crate::a1111_embedding::train_embedding),
        )
        .route(
            "/sdapi/v1/unload-checkpoint",
            post(crate::a1111_catalog::unload_checkpoint),
        )
        .route(
            "/sdapi/v1/reload-checkpoint",
            post(crate::a1111_catalog::reload_checkpoint),
        )
        .route("/sdapi/v1/png-info", post(crate::a1111_catalog::png_info))
        .route(
            "/sdapi/v1/interrogate",
            post(crate::a1111_interrogate::interrogate),
        )
        .route(
            "/sdapi/v1/extra-single-image",
            post(crate::a1111_extras::extra_single_image),
        )
        .route(
            "/sdapi/v1/extra-batch-images",
            post(crate::a1111_extras::extra_batch_images),
        )
        .route("/v1/artifacts/{*key}", get(get_artifact))
        .route("/v1/images/{sha256}", get(get_image))
        .route("/v1/images", post(crate::datasets::announce))
        .route("/v1/datasets", get(crate::datasets::list))
        .route(
            "/v1/search",
            get(crate::retrieval::search).post(crate::retrieval::search_image),
        )
        .route(
            "/v1/datasets/{name}/versions/{version}",
            get(crate::datasets::version),
        )
        .route(
            "/v1/datasets/{name}/versions/{version}/rows",
            get(crate::dataset_rows::rows),
        )
        .route(
            "/v1/datasets/{name}/versions/{version}/changes",
            get(crate::dataset_changes::changes),
        )
        .route("/v1/thumbnails/{*key}", get(crate::dataset_rows::thumbnail))
        .route_layer(middleware::from_fn_with_state(auth, auth::middleware));
    Router::new()
        .merge(v1)
        .merge(crate::ui::routes())
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi_json))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            app.metrics.clone(),
            count_requests,
        ))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            panic_response,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(app)
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the gateway hit a bug; it has been logged",
    )
    .into_response()
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(
        "no_such_route",
        format!(
            "no route for {} {}; see /openapi.json",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn count_requests(State(metrics): State<Arc<Metrics>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().to_string();
    let resp = next.run(req).await;
    metrics
        .http_requests
        .get_or_create(&HttpLabels {
            method,
            route,
            status: resp.status().as_u16(),
        })
        .inc();
    resp
}

/// 413 at once when the declared `Content-Length` is over `limit` (bodies without one are
/// counted as they stream).
fn check_declared_length(headers: &HeaderMap, limit: u64) -> Result<(), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit => Err(ApiError::too_large(limit)),
        _ => Ok(()),
    }
}

/// Reads a body up to `limit` bytes, answering 413 past it.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<bytes::Bytes, ApiError> {
    check_declared_length(headers, limit)?;
    axum::body::to_bytes(body, limit as usize)
        .await
        .map_err(|e| {
            if e.to_string().contains("length limit") {
                ApiError::too_large(limit)
            } else {
                ApiError::bad_request("bad_body", format!("reading the request body failed: {e}"))
            }
        })
}

/// Turns a body into a [`JobSpec`], with a precise error for each way it can be wrong.
pub fn parse_submission(body: &[u8]) -> Result<JobSpec, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
        ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}"))
    })?;
    let obj = value.as_object().ok_or_else(|| {
        ApiError::bad_request(
            "invalid_json",
            "body must be a JSON object: {\"schema_version\":1,\"spec\":{...}}",
        )
    })?;
    match obj.get("schema_version").and_then(|v| v.as_u64()) {
        Some(v) if v == SCHEMA_VERSION as u64 => {}
        Some(v) => {
            return Err(ApiError::unprocessable(
                "unsupported_schema_version",
                format!(
                    "schema_version {v} is not supported; this gateway speaks {SCHEMA_VERSION}"
                ),
            ))
        }
        None => {
            return Err(ApiError::unprocessable(
                "missing_schema_version",
                format!("the body needs \"schema_version\": {SCHEMA_VERSION}"),
            ))
        }
    }
    let kind = obj
        .get("spec")
        .and_then(|s| s.get("kind"))
        .and_then(|k| k.as_str());
    match kind {
        Some(k) if JobSpec::KINDS.contains(&k) => {}
        Some(k) => {
            return Err(ApiError::unprocessable(
                "unknown_job_kind",
                format!(
                    "unknown job kind {k:?}; known kinds: {}",
                    JobSpec::KINDS.join(", ")
                ),
            ))
        }
        None => {
            return Err(ApiError::unprocessable(
                "invalid_job",
                "spec.kind is missing",
            ))
        }
    }
    let submit: SubmitJob = serde_json::from_value(value)
        .map_err(|e| ApiError::unprocessable("invalid_job", format!("invalid job: {e}")))?;
    validate(&submit.spec)?;
    Ok(submit.spec)
}

pub(crate) fn validate(spec: &JobSpec) -> Result<(), ApiError> {
    match spec {
        JobSpec::Txt2img(g) => validate_generate(g, atelier_contracts::GenerateKind::Txt2Img)?,
        JobSpec::Img2img(g) => validate_generate(g, atelier_contracts::GenerateKind::Img2Img)?,
        JobSpec::Inpaint(g) => validate_generate(g, atelier_contracts::GenerateKind::Inpaint)?,
        JobSpec::Caption(c) => c
            .check()
            .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?,
        JobSpec::Filter(f) => f
            .check()
            .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?,
        JobSpec::EvalCaptions(e) => e
            .check()
            .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?,
        JobSpec::Index(i) => i
            .check()
            .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?,
        JobSpec::Curate(c) => c
            .check()
            .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?,
        JobSpec::Augment(a) => a
            .check()
            .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?,
        JobSpec::Export(x) => x
            .check()
            .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?,
        JobSpec::Interrogate(i) => i
            .check()
            .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?,
        JobSpec::Upscale(u) => u
            .check()
            .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?,
        JobSpec::CreateEmbedding(c) => c
            .check()
            .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?,
        JobSpec::Train(t) => {
            t.check()
                .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?;
            let mut samplers = vec![("sample_sampler", &t.sample_sampler)];
            if let Some(db) = &t.dreambooth {
                samplers.push(("dreambooth.class_sampler", &db.class_sampler));
            }
            for (field, name) in samplers {
                if atelier_contracts::samplers::SamplerKind::parse(name).is_none() {
                    return Err(ApiError::unprocessable(
                        "unknown_sampler",
                        format!("spec.{field}: unknown sampler {name:?}"),
                    ));
                }
            }
        }
        JobSpec::Checksum(c) => {
            ArtifactKey::parse(&c.input).map_err(|e| {
                ApiError::unprocessable(
                    "bad_artifact_key",
                    format!("spec.input {:?}: {e}", c.input),
                )
            })?;
            if let Some(h) = &c.expected_sha256 {
                if !is_sha256_hex(&h.to_ascii_lowercase()) {
                    return Err(ApiError::unprocessable(
                        "invalid_job",
                        "spec.expected_sha256 must be 64 hex characters",
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A generation request's limits, sampler name and artifact keys, before any model work.
pub fn validate_generate(
    g: &atelier_contracts::GenerateSpec,
    kind: atelier_contracts::GenerateKind,
) -> Result<(), ApiError> {
    g.check(kind)
        .map_err(|e| ApiError::unprocessable("invalid_job", format!("spec: {e}")))?;
    if atelier_contracts::samplers::SamplerKind::parse(&g.sampler).is_none() {
        let known: Vec<&str> = atelier_contracts::samplers::SamplerKind::ALL
            .iter()
            .map(|k| k.name())
            .collect();
        return Err(ApiError::unprocessable(
            "unknown_sampler",
            format!(
                "unknown sampler {:?}; known: {}",
                g.sampler,
                known.join(", ")
            ),
        ));
    }
    for (field, key) in [("init_image", &g.init_image), ("mask", &g.mask)] {
        if let Some(k) = key {
            ArtifactKey::parse(k).map_err(|e| {
                ApiError::unprocessable("bad_artifact_key", format!("spec.{field} {k:?}: {e}"))
            })?;
        }
    }
    Ok(())
}

fn parse_job_id(raw: &str) -> Result<JobId, ApiError> {
    JobId::parse(raw).ok_or_else(|| {
        ApiError::bad_request("bad_job_id", format!("{raw:?} is not a job id (a UUID)"))
    })
}

/// Submit a job.
#[utoipa::path(
    post, path = "/v1/jobs", tag = "jobs",
    request_body = SubmitJob,
    responses(
        (status = 202, description = "Queued", body = JobRecord),
        (status = 400, description = "Malformed JSON", body = ApiErrorBody),
        (status = 413, description = "Body too large", body = ApiErrorBody),
        (status = 422, description = "Unknown kind, unsupported schema version or invalid spec", body = ApiErrorBody),
        (status = 503, description = "Bus unavailable", body = ApiErrorBody),
    ),
    security(("bearer" = ["jobs:write"]))
)]
pub async fn submit_job(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    caller.require(Scope::JobsWrite)?;
    let body = read_body(&headers, body, app.limits.json).await?;
    let spec = parse_submission(&body)?;
    let record = queue(&app, &caller, spec).await?;
    Ok((StatusCode::ACCEPTED, Json(record)))
}

/// Seconds a client is told to wait (`Retry-After`) while the bus is down.
const BUS_RETRY_AFTER_S: u64 = 2;

/// A 503 with `Retry-After` at once while the gateway has no connection to NATS, instead of
/// waiting out a request timeout; nothing is recorded or queued.
pub(crate) fn bus_ready(app: &AppState) -> Result<(), ApiError> {
    match app.bus.client.connection_state() {
        async_nats::connection::State::Connected => Ok(()),
        _ => Err(ApiError::unavailable(
            "the message bus (NATS) is not reachable; nothing was queued, retry shortly",
        )
        .with_retry_after(BUS_RETRY_AFTER_S)),
    }
}

/// Record and publish a validated job for `caller`.
pub(crate) async fn queue(
    app: &AppState,
    caller: &Caller,
    spec: JobSpec,
) -> Result<JobRecord, ApiError> {
    bus_ready(app)?;
    let request = JobRequest {
        schema_version: SCHEMA_VERSION,
        id: crate::idempotency::preset_job_id().unwrap_or_default(),
        submitted_at: chrono::Utc::now(),
        submitted_by: Some(caller.name.clone()),
        priority: crate::priority::current(),
        spec,
    };
    let key_hook = || app.key_webhooks.get(&caller.name).cloned();
    if let Some(url) = crate::webhooks::take_url().or_else(key_hook) {
        crate::webhooks::register(app, request.id, url).await?;
    }
    let record = atelier_kit::worker::enqueue(&app.bus, &app.states, &request)
        .await
        .map_err(|e| match e {
            atelier_kit::worker::EnqueueError::State(s) => ApiError::from(s),
            atelier_kit::worker::EnqueueError::Bus(e) => {
                ApiError::unavailable(format!("could not queue the job: {e:#}"))
            }
            too_large @ atelier_kit::worker::EnqueueError::TooLarge { .. } => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "request_too_large",
                too_large.to_string(),
            ),
        })?;
    tracing::info!(job = %record.id, kind = %record.kind, by = %caller.name, "job submitted");
    Ok(record)
}

async fn submit_generate(
    app: AppState,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
    kind: atelier_contracts::GenerateKind,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    caller.require(Scope::JobsWrite)?;
    let body = read_body(&headers, body, app.limits.json).await?;
    let g: atelier_contracts::GenerateSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::unprocessable("invalid_job", format!("invalid request: {e}")))?;
    let record = enqueue_generate(&app, &caller, g, kind).await?;
    Ok((StatusCode::ACCEPTED, Json(record)))
}

/// Validate and queue a generation job.
pub async fn enqueue_generate(
    app: &AppState,
    caller: &Caller,
    g: atelier_contracts::GenerateSpec,
    kind: atelier_contracts::GenerateKind,
) -> Result<JobRecord, ApiError> {
    validate_generate(&g, kind)?;
    let spec = match kind {
        atelier_contracts::GenerateKind::Txt2Img => JobSpec::Txt2img(g),
        atelier_contracts::GenerateKind::Img2Img => JobSpec::Img2img(g),
        atelier_contracts::GenerateKind::Inpaint => JobSpec::Inpaint(g),
    };
    queue(app, caller, spec).await
}

/// Generate images from a prompt (an async job on the sampler service; follow it at
/// `/v1/jobs/{id}/events`, fetch the PNGs from `/v1/artifacts/...`).
#[utoipa::path(
    post, path = "/v1/txt2img", tag = "generation",
    request_body = atelier_contracts::GenerateSpec,
    responses((status = 202, body = JobRecord), (status = 422, body = ApiErrorBody)),
    security(("bearer" = ["jobs:write"]))
)]
pub async fn txt2img(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    submit_generate(
        app,
        caller,
        headers,
        body,
        atelier_contracts::GenerateKind::Txt2Img,
    )
    .await
}

/// Generate from a prompt and an uploaded starting image (`init_image`, `strength`).
#[utoipa::path(
    post, path = "/v1/img2img", tag = "generation",
    request_body = atelier_contracts::GenerateSpec,
    responses((status = 202, body = JobRecord), (status = 422, body = ApiErrorBody)),
    security(("bearer" = ["jobs:write"]))
)]
pub async fn img2img(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    submit_generate(
        app,
        caller,
        headers,
        body,
        atelier_contracts::GenerateKind::Img2Img,
    )
    .await
}

/// Repaint the white region of an uploaded `mask` over an uploaded `init_image`.
#[utoipa::path(
    post, path = "/v1/inpaint", tag = "generation",
    request_body = atelier_contracts::GenerateSpec,
    responses((status = 202, body = JobRecord), (status = 422, body = ApiErrorBody)),
    security(("bearer" = ["jobs:write"]))
)]
pub async fn inpaint(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    submit_generate(
        app,
        caller,
        headers,
        body,
        atelier_contracts::GenerateKind::Inpaint,
    )
    .await
}

/// A job's record.
#[utoipa::path(
    get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id (UUIDv7)")),
    responses(
        (status = 200, body = JobRecord),
        (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody),
    ),
    security(("bearer" = ["jobs:read"]))
)]
pub async fn get_job(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, ApiError> {
    caller.require(Scope::JobsRead)?;
    bus_ready(&app)?;
    let id = parse_job_id(&id)?;
    match app.states.get(id).await? {
        Some((r, _)) => Ok(Json(with_place(&app, r).await)),
        None => Err(ApiError::not_found("job_not_found", format!("no job {id}"))),
    }
}

/// A queued job's record with its place in the queue (left out if it cannot be worked out now:
/// the record is still worth answering with).
pub(crate) async fn with_place(app: &AppState, mut record: JobRecord) -> JobRecord {
    match atelier_kit::queue::place(&app.bus, &record).await {
        Ok(place) => record.queue = place,
        Err(e) => tracing::debug!(job = %record.id, error = %format!("{e:#}"), "no queue place"),
    }
    record
}

/// Cancel a job. Queued jobs never start; running ones see the cancellation within a second.
#[utoipa::path(
    delete, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "Cancelled (or already cancelled)", body = JobRecord),
        (status = 403, description = "Submitted by another key (admin keys may cancel any)", body = ApiErrorBody),
        (status = 404, body = ApiErrorBody),
        (status = 409, description = "Already succeeded or failed", body = ApiErrorBody),
    ),
    security(("bearer" = ["jobs:write"]))
)]
pub async fn cancel_job(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<JobRecord>, ApiError> {
    caller.require(Scope::JobsWrite)?;
    bus_ready(&app)?;
    let id = parse_job_id(&id)?;
    match app.states.get(id).await? {
        None => return Err(ApiError::not_found("job_not_found", format!("no job {id}"))),
        Some((r, _)) if !caller.owns(&r) => {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "job {id} was submitted by another key; only it or an admin key may cancel it"
                ),
            ))
        }
        Some(_) => {}
    }
    let record = app.states.cancel(id).await?;
    match record.state {
        JobState::Cancelled => Ok(Json(record)),
        s => Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_finished",
            format!(
                "job {id} already {}",
                serde_json::to_value(s)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default()
            ),
        )),
    }
}

/// Server-Sent Events: one `job` event (data: the JobRecord) per change, ending after a terminal
/// state.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/events", tag = "jobs",
    params(("id" = String, Path, description = "Job id")),
    responses(
        (status = 200, description = "text/event-stream of `job` events whose data is a JobRecord", content_type = "text/event-stream", body = JobRecord),
        (status = 404, body = ApiErrorBody),
    ),
    security(("bearer" = ["jobs:read"]))
)]
pub async fn job_events(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    caller.require(Scope::JobsRead)?;
    bus_ready(&app)?;
    let id = parse_job_id(&id)?;
    if app.states.get(id).await?.is_none() {
        return Err(ApiError::not_found("job_not_found", format!("no job {id}")));
    }
    let watch = app.states.watch(id).await?;
    let shutdown = app.shutdown.clone();
    let stream = async_stream::stream! {
        let mut watch = std::pin::pin!(watch.take_until(shutdown.cancelled_owned()));
        // While the job is queued, its record is sent again with a new `queue` place whenever the
        // place changes (looked at every QUEUE_EVERY).
        let mut queued: Option<JobRecord> = None;
        loop {
            let item = tokio::select! {
                item = watch.next() => item,
                _ = tokio::time::sleep(QUEUE_EVERY), if queued.is_some() => {
                    let Some(last) = queued.take() else { continue };
                    let before = last.queue.clone();
                    let record = with_place(&app, last).await;
                    if record.queue != before {
                        yield Ok(job_event(&record));
                    }
                    queued = Some(record);
                    continue;
                }
            };
            match item {
                Some(Ok(record)) => {
                    let record = with_place(&app, record).await;
                    let done = record.state.is_terminal();
                    yield Ok(job_event(&record));
                    queued = (record.state == JobState::Queued).then_some(record);
                    if done {
                        break;
                    }
                }
                Some(Err(e)) => {
                    yield Ok(Event::default().event("error").data(e.to_string()));
                    break;
                }
                None => break,
            }
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// How often an event stream looks at a queued job's place.
const QUEUE_EVERY: Duration = Duration::from_secs(2);

fn job_event(record: &JobRecord) -> Event {
    Event::default()
        .event("job")
        .id(record.updated_at.to_rfc3339())
        .json_data(record)
        .unwrap_or_else(|_| Event::default().comment("unencodable"))
}

/// Upload an artifact (any bytes; `Content-Type` is recorded). Stored content-addressed: the same
/// bytes twice give one object.
#[utoipa::path(
    post, path = "/v1/uploads", tag = "artifacts",
    request_body(content = Binary, content_type = "application/octet-stream", description = "The bytes"),
    responses(
        (status = 201, description = "Stored", body = UploadResponse),
        (status = 200, description = "Already stored", body = UploadResponse),
        (status = 413, body = ApiErrorBody),
    ),
    security(("bearer" = ["artifacts:write"]))
)]
pub async fn upload(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<UploadResponse>), ApiError> {
    caller.require(Scope::ArtifactsWrite)?;
    let limit = app.limits.upload;
    check_declared_length(&headers, limit)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() < 128)
        .unwrap_or("application/octet-stream")
        .to_owned();
    let (artifact, created) = app
        .store
        .put_stream(body.into_data_stream(), &content_type, limit)
        .await?;
    tracing::info!(key = %artifact.key, size = artifact.size, created, "upload stored");
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(UploadResponse { artifact, created })))
}

/// Download an artifact, streamed.
#[utoipa::path(
    get, path = "/v1/artifacts/{key}", tag = "artifacts",
    params(("key" = String, Path, description = "Artifact key, e.g. sha256/ab/ab12…; relative, no `..`")),
    responses(
        (status = 200, description = "The bytes", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 400, description = "Invalid key", body = ApiErrorBody),
        (status = 404, body = ApiErrorBody),
    ),
    security(("bearer" = ["artifacts:read"]))
)]
pub async fn get_artifact(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::ArtifactsRead)?;
    let key = ArtifactKey::parse(&key)
        .map_err(|e| ApiError::bad_request("bad_artifact_key", format!("{key:?}: {e}")))?;
    let got = app.store.get(&key).await?;
    let size = got.meta.size;
    let content_type = atelier_kit::store::content_type_of(&got)
        .unwrap_or_else(|| "application/octet-stream".into());
    let mut resp = Body::from_stream(got.into_stream()).into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&content_type) {
        h.insert(header::CONTENT_TYPE, v);
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    Ok(resp)
}

/// An ingested image's record (by the SHA-256 of its bytes).
#[utoipa::path(
    get, path = "/v1/images/{sha256}", tag = "images",
    params(("sha256" = String, Path, description = "64 hex characters")),
    responses((status = 200, body = ImageRecord), (status = 400, body = ApiErrorBody), (status = 404, body = ApiErrorBody)),
    security(("bearer" = ["artifacts:read"]))
)]
pub async fn get_image(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(sha256): Path<String>,
) -> Result<Json<ImageRecord>, ApiError> {
    caller.require(Scope::ArtifactsRead)?;
    let sha = sha256.to_ascii_lowercase();
    if !is_sha256_hex(&sha) {
        return Err(ApiError::bad_request(
            "bad_sha256",
            format!("{sha256:?} is not 64 hex characters"),
        ));
    }
    let entry = app
        .images
        .entry(&sha)
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    match entry {
        Some(e) if e.operation == kv::Operation::Put => {
            serde_json::from_slice(&e.value).map(Json).map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "corrupt_record",
                    e.to_string(),
                )
            })
        }
        _ => Err(ApiError::not_found(
            "image_not_found",
            format!("no image {sha}"),
        )),
    }
}

/// Ready when NATS and the object store answer.
#[utoipa::path(
    get, path = "/healthz", tag = "ops",
    responses((status = 200, description = "Ready"), (status = 503, description = "NATS or the store does not answer"))
)]
pub async fn healthz(State(app): State<AppState>) -> Response {
    let health = Health {
        bus: app.bus.clone(),
        store: app.store.clone(),
        metrics: app.metrics.clone(),
    };
    let (nats, store) = health.check().await;
    let ok = nats && store;
    let body = serde_json::json!({ "status": if ok { "ok" } else { "unavailable" }, "nats": nats, "store": store });
    (
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(body),
    )
        .into_response()
}

/// Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(app): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "ops", responses((status = 200, description = "OpenAPI 3.1", content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    Json(openapi_document()).into_response()
}

/// A request body of raw bytes, as OpenAPI writes one (`string`, `binary`).
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct Binary(#[allow(dead_code)] Vec<u8>);

/// The document `/openapi.json` serves (unions shaped for client generators).
pub fn openapi_document() -> serde_json::Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    crate::openapi_unions::hoist(&mut doc);
    doc
}

struct BearerAuth;
impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from `atelier keygen`"))
                    .build(),
            ),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "atelier gateway", description = "Captioned-dataset and diffusion-model factory: HTTP API."),
    paths(submit_job, txt2img, img2img, inpaint,
        crate::a1111::txt2img, crate::a1111::img2img, crate::a1111::samplers, crate::a1111::sd_models,
        crate::a1111::get_options, crate::a1111::set_options, crate::a1111_progress::progress, crate::a1111_progress::interrupt, crate::a1111_progress::skip,
        crate::a1111_catalog::schedulers, crate::a1111_catalog::upscalers, crate::a1111_catalog::latent_upscale_modes, crate::a1111_catalog::sd_vae, crate::a1111_catalog::hypernetworks, crate::a1111_catalog::face_restorers, crate::a1111_catalog::realesrgan_models, crate::a1111_catalog::prompt_styles, crate::a1111_catalog::script_info, crate::a1111_catalog::extensions, crate::a1111_catalog::scripts, crate::a1111_catalog::embeddings, crate::a1111_catalog::loras, crate::a1111_catalog::memory, crate::a1111_catalog::cmd_flags, crate::a1111_catalog::refresh_checkpoints, crate::a1111_catalog::refresh_vae, crate::a1111_catalog::refresh_embeddings, crate::a1111_catalog::refresh_loras, crate::a1111_catalog::create_hypernetwork, crate::a1111_catalog::train_hypernetwork, crate::a1111_embedding::create_embedding, crate::a1111_embedding::train_embedding, crate::a1111_catalog::unload_checkpoint, crate::a1111_catalog::reload_checkpoint, crate::a1111_catalog::png_info, crate::a1111_interrogate::interrogate, crate::a1111_extras::extra_single_image, crate::a1111_extras::extra_batch_images,
        crate::jobs::list, get_job, cancel_job, job_events, crate::webhooks::get_log, upload, get_artifact, get_image,
        crate::datasets::announce, crate::datasets::list, crate::datasets::version,
        crate::dataset_rows::rows, crate::dataset_rows::thumbnail, crate::dataset_changes::changes,
        crate::train::lora, crate::train::dreambooth,
        crate::retrieval::search, crate::retrieval::search_image, crate::retrieval::index,
        crate::retrieval::curate, crate::augment::augment, crate::datasets::export,
        healthz, metrics, openapi_json),
    modifiers(&BearerAuth),
    tags((name = "jobs"), (name = "generation"), (name = "a1111"), (name = "artifacts"), (name = "images"), (name = "datasets"), (name = "training"), (name = "retrieval"), (name = "ops"))
)]
pub struct ApiDoc;

/// `(method, path)` of every route [`router`] serves, as written in the OpenAPI document.
pub const ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/jobs"),
    ("get", "/v1/jobs"),
    ("get", "/v1/jobs/{id}"),
    ("delete", "/v1/jobs/{id}"),
    ("get", "/v1/jobs/{id}/events"),
    ("get", "/v1/jobs/{id}/webhook"),
    ("post", "/v1/txt2img"),
    ("post", "/v1/img2img"),
    ("post", "/v1/inpaint"),
    ("post", "/v1/uploads"),
    ("post", "/sdapi/v1/txt2img"),
    ("post", "/sdapi/v1/img2img"),
    ("get", "/sdapi/v1/samplers"),
    ("get", "/sdapi/v1/sd-models"),
    ("get", "/sdapi/v1/options"),
    ("post", "/sdapi/v1/options"),
    ("get", "/sdapi/v1/progress"),
    ("post", "/sdapi/v1/interrupt"),
    ("post", "/sdapi/v1/skip"),
    ("get", "/sdapi/v1/schedulers"),
    ("get", "/sdapi/v1/upscalers"),
    ("get", "/sdapi/v1/latent-upscale-modes"),
    ("get", "/sdapi/v1/sd-vae"),
    ("get", "/sdapi/v1/hypernetworks"),
    ("get", "/sdapi/v1/face-restorers"),
    ("get", "/sdapi/v1/realesrgan-models"),
    ("get", "/sdapi/v1/prompt-styles"),
    ("get", "/sdapi/v1/script-info"),
    ("get", "/sdapi/v1/extensions"),
    ("get", "/sdapi/v1/scripts"),
    ("get", "/sdapi/v1/embeddings"),
    ("get", "/sdapi/v1/loras"),
    ("get", "/sdapi/v1/memory"),
    ("get", "/sdapi/v1/cmd-flags"),
    ("post", "/sdapi/v1/refresh-checkpoints"),
    ("post", "/sdapi/v1/refresh-vae"),
    ("post", "/sdapi/v1/refresh-embeddings"),
    ("post", "/sdapi/v1/refresh-loras"),
    ("post", "/sdapi/v1/create/hypernetwork"),
    ("post", "/sdapi/v1/train/hypernetwork"),
    ("post", "/sdapi/v1/create/embedding"),
    ("post", "/sdapi/v1/train/embedding"),
    ("post", "/sdapi/v1/unload-checkpoint"),
    ("post", "/sdapi/v1/reload-checkpoint"),
    ("post", "/sdapi/v1/png-info"),
    ("post", "/sdapi/v1/interrogate"),
    ("post", "/sdapi/v1/extra-single-image"),
    ("post", "/sdapi/v1/extra-batch-images"),
    ("get", "/v1/artifacts/{key}"),
    ("get", "/v1/images/{sha256}"),
    ("post", "/v1/images"),
    ("get", "/v1/datasets"),
    ("get", "/v1/datasets/{name}/versions/{version}"),
    ("get", "/v1/datasets/{name}/versions/{version}/rows"),
    ("get", "/v1/datasets/{name}/versions/{version}/changes"),
    ("get", "/v1/thumbnails/{key}"),
    ("post", "/v1/train/lora"),
    ("post", "/v1/train/dreambooth"),
    ("get", "/v1/search"),
    ("post", "/v1/search"),
    ("post", "/v1/datasets/{name}/index"),
    ("post", "/v1/datasets/{name}/curate"),
    ("post", "/v1/datasets/{name}/augment"),
    ("post", "/v1/datasets/{name}/exports"),
    ("get", "/healthz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_documents_every_route_and_nothing_else() {
        let doc = serde_json::to_value(ApiDoc::openapi()).unwrap();
        let paths = doc["paths"].as_object().unwrap();
        let mut documented = Vec::new();
        for (path, ops) in paths {
            for method in ops.as_object().unwrap().keys() {
                if ["get", "post", "delete", "put", "patch"].contains(&method.as_str()) {
                    documented.push((method.clone(), path.clone()));
                }
            }
        }
        documented.sort();
        let mut expected: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        expected.sort();
        assert_eq!(documented, expected);
        assert!(doc["components"]["schemas"]["JobRecord"].is_object());
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }

    #[test]
    fn submissions_fail_with_precise_codes() {
        let code = |b: &str| parse_submission(b.as_bytes()).unwrap_err().code;
        assert_eq!(code("{not json"), "invalid_json");
        assert_eq!(code("[]"), "invalid_json");
        assert_eq!(
            code(r#"{"spec":{"kind":"checksum","input":"a"}}"#),
            "missing_schema_version"
        );
        assert_eq!(
            code(r#"{"schema_version":99,"spec":{"kind":"checksum","input":"a"}}"#),
            "unsupported_schema_version"
        );
        assert_eq!(
            code(r#"{"schema_version":1,"spec":{"kind":"teleport"}}"#),
            "unknown_job_kind"
        );
        assert_eq!(
            code(r#"{"schema_version":1,"spec":{"kind":"checksum"}}"#),
            "invalid_job"
        );
        assert_eq!(
            code(r#"{"schema_version":1,"spec":{"kind":"checksum","input":"../etc/passwd"}}"#),
            "bad_artifact_key"
        );
        let ok = parse_submission(
            br#"{"schema_version":1,"spec":{"kind":"checksum","input":"sha256/ab/x"}}"#,
        )
        .unwrap();
        assert_eq!(ok.kind(), "checksum");
    }
}
