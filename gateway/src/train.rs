//! Training routes: `POST /v1/train/lora` and `POST /v1/train/dreambooth` queue a `train` job
//! on the trainer service; its progress (step, loss, learning rate) streams from
//! `GET /v1/jobs/{id}/events` like any job's.

use atelier_contracts::{JobRecord, JobSpec, TrainSpec};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

async fn submit(
    app: AppState,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
    dreambooth: bool,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    caller.require(Scope::JobsWrite)?;
    let body = crate::api::read_body(&headers, body, app.limits.json).await?;
    let spec: TrainSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError::unprocessable("invalid_job", format!("invalid request: {e}")))?;
    match (dreambooth, spec.dreambooth.is_some()) {
        (true, false) => {
            return Err(ApiError::unprocessable(
                "invalid_job",
                "a DreamBooth request needs `dreambooth` (instance_prompt, class_prompt, prior_loss_weight, num_class_images)",
            ))
        }
        (false, true) => {
            return Err(ApiError::unprocessable(
                "invalid_job",
                "`dreambooth` belongs to POST /v1/train/dreambooth",
            ))
        }
        _ => {}
    }
    let spec = JobSpec::Train(Box::new(spec));
    crate::api::validate(&spec)?;
    let record = crate::api::queue(&app, &caller, spec).await?;
    Ok((StatusCode::ACCEPTED, Json(record)))
}

/// Train a LoRA on a dataset version or uploaded images (kohya's options and defaults). The
/// job's output names the LoRA file, its loss curve and sample images; the sampler finds the
/// LoRA as `<lora:output_name:1>`.
#[utoipa::path(
    post, path = "/v1/train/lora", tag = "training",
    request_body = TrainSpec,
    responses(
        (status = 202, description = "Queued", body = JobRecord),
        (status = 422, description = "Invalid request", body = atelier_contracts::http::ApiErrorBody),
    ),
    security(("bearer" = ["jobs:write"]))
)]
pub async fn lora(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    submit(app, caller, headers, body, false).await
}

/// DreamBooth (with a LoRA): instance images captioned by the instance prompt, and prior
/// preservation with class images the sampler generates from the base model (cached).
#[utoipa::path(
    post, path = "/v1/train/dreambooth", tag = "training",
    request_body = TrainSpec,
    responses(
        (status = 202, description = "Queued", body = JobRecord),
        (status = 422, description = "Invalid request", body = atelier_contracts::http::ApiErrorBody),
    ),
    security(("bearer" = ["jobs:write"]))
)]
pub async fn dreambooth(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    submit(app, caller, headers, body, true).await
}
