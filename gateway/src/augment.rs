//! Augmentation: `POST /v1/datasets/{name}/augment`.

use atelier_contracts::{AugmentOutput, AugmentSpec, JobOutput, JobRecord, JobSpec};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use crate::api::AppState;
use crate::auth::Caller;
use crate::error::ApiError;

/// Augment a version (default: the latest) into a new version: seeded variants of each kept
/// row (a transform chain on the image: resize in img2dataset's modes, random crop, flip,
/// rotate, colour jitter, blur, JPEG quality), caption paraphrases (rules or the OpenAI-compatible
/// backend) and hard negatives (caption edits, neighbours' captions from the index). Waits for
/// the job: 201 with the new version, 202 with the job when it runs longer than two minutes.
#[utoipa::path(
    post, path = "/v1/datasets/{name}/augment", tag = "datasets",
    params(("name" = String, Path)),
    request_body = AugmentSpec,
    responses(
        (status = 201, description = "The new version", body = AugmentOutput),
        (status = 202, description = "Still running", body = JobRecord),
        (status = 422, description = "Invalid spec, unknown dataset, nothing to augment", body = atelier_contracts::http::ApiErrorBody),
    ),
    security(("bearer" = ["jobs:write"]))
)]
pub async fn augment(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let record = crate::retrieval::queue_for(&app, &caller, &name, headers, body, |s| {
        JobSpec::Augment(Box::new(s))
    })
    .await?;
    match crate::retrieval::wait_for_output(&app, &record, "augment", "augmentation_failed").await?
    {
        None => Ok((StatusCode::ACCEPTED, Json(record)).into_response()),
        Some(JobOutput::Augmented(out)) => Ok((StatusCode::CREATED, Json(out)).into_response()),
        Some(_) => Err(ApiError::unavailable(
            "the augment job returned another kind of output",
        )),
    }
}
