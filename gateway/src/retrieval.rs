//! Retrieval routes: search (`GET /v1/search`, `POST /v1/search` with an image), indexing
//! (`POST /v1/datasets/{name}/index`, a job) and curation (`POST /v1/datasets/{name}/curate`,
//! a job the route waits for). Queries travel as NATS request/reply to a retrieval-indexer.

use std::time::Duration;

use atelier_contracts::dataset::Tier;
use atelier_contracts::typed::SEARCH;
use atelier_contracts::{
    ArtifactKey, CurateOutput, CurateSpec, IndexSpec, JobOutput, JobRecord, JobSpec, JobState,
    RowFilter, SearchReply, SearchRequest, SearchResponse, Space,
};
use atelier_kit::bus::AskError;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use utoipa::IntoParams;

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

/// How long a query may take (a cold replica loads the index first).
const QUERY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the curate route waits for its job before answering 202.
const CURATE_WAIT: Duration = Duration::from_secs(120);

/// Query parameters of the search routes. Lists are comma-separated.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SearchParams {
    pub dataset: String,
    /// `clip_image` (default), `clip_text` or `caption`.
    pub space: Option<String>,
    pub text: Option<String>,
    /// A record of the dataset: its 16-hex id or sha256.
    pub image_id: Option<String>,
    /// 1 to 1000 (default 10).
    pub k: Option<String>,
    /// Rows carrying every one of these tags.
    pub tags: Option<String>,
    /// Rows of these tiers (`gold`, `silver`, `bronze`).
    pub tier: Option<String>,
    pub source: Option<String>,
    pub min_width: Option<String>,
    pub max_width: Option<String>,
    pub min_height: Option<String>,
    pub max_height: Option<String>,
}

fn list(v: &Option<String>) -> Vec<String> {
    v.as_deref()
        .map(|s| {
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

fn number(name: &str, v: &Option<String>) -> Result<Option<u32>, ApiError> {
    v.as_deref()
        .map(|s| {
            s.trim().parse::<u32>().map_err(|_| {
                ApiError::unprocessable(
                    "invalid_query",
                    format!("{name} {s:?}: expected a non-negative integer"),
                )
            })
        })
        .transpose()
}

impl SearchParams {
    fn request(&self) -> Result<SearchRequest, ApiError> {
        let space = match self.space.as_deref() {
            None | Some("") => None,
            Some(s) => Some(Space::parse(s).ok_or_else(|| {
                ApiError::unprocessable(
                    "unknown_space",
                    format!("space {s:?}: expected clip_image, clip_text or caption"),
                )
            })?),
        };
        let tier = list(&self.tier)
            .iter()
            .map(|t| {
                serde_json::from_value::<Tier>(serde_json::Value::String(t.clone())).map_err(|_| {
                    ApiError::unprocessable(
                        "invalid_query",
                        format!("tier {t:?}: expected gold, silver or bronze"),
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(SearchRequest {
            dataset: self.dataset.clone(),
            space,
            text: self.text.clone(),
            image_id: self.image_id.clone(),
            image_key: None,
            k: number("k", &self.k)?.unwrap_or(10),
            filter: RowFilter {
                tags: list(&self.tags),
                tier,
                source: list(&self.source),
                min_width: number("min_width", &self.min_width)?,
                max_width: number("max_width", &self.max_width)?,
                min_height: number("min_height", &self.min_height)?,
                max_height: number("max_height", &self.max_height)?,
            },
        })
    }
}

/// Sends a query to a retrieval-indexer and maps its reply.
pub async fn ask(app: &AppState, req: &SearchRequest) -> Result<SearchResponse, ApiError> {
    req.check()
        .map_err(|e| ApiError::unprocessable("invalid_query", e))?;
    let reply = app
        .bus
        .ask(SEARCH, req, QUERY_TIMEOUT)
        .await
        .map_err(|e| match e {
            AskError::Timeout => {
                ApiError::unavailable("the retrieval-indexer did not answer in time")
            }
            AskError::NoAnswer(e) => ApiError::unavailable(format!(
                "no retrieval-indexer answered ({e}); start one (`atelier up` runs it)"
            )),
            AskError::Reply(e) => {
                ApiError::unavailable(format!("unreadable reply from the indexer: {e}"))
            }
        })?;
    match reply {
        SearchReply::Ok(r) => Ok(r),
        SearchReply::Error(e) => Err(match e.code.as_str() {
            "not_found" => ApiError::not_found("not_found", e.message),
            "record_not_found" => ApiError::not_found("record_not_found", e.message),
            "bad_image" => ApiError::unprocessable("bad_image", e.message),
            "invalid_query" => ApiError::unprocessable("invalid_query", e.message),
            // The space exists but this deployment's indexer cannot embed queries for it.
            "model_unavailable" => {
                ApiError::new(StatusCode::CONFLICT, "model_unavailable", e.message)
            }
            _ => ApiError::unavailable(e.message),
        }),
    }
}

/// Search a dataset's index by text or by one of its records: text→image (default space
/// `clip_image`), image→image (`image_id`), image→text (`space=clip_text`), caption→caption
/// (`space=caption`). Results carry the cosine score and the record's metadata.
#[utoipa::path(
    get, path = "/v1/search", tag = "retrieval",
    params(SearchParams),
    responses(
        (status = 200, body = SearchResponse),
        (status = 404, description = "Unknown dataset, index, space or record", body = atelier_contracts::http::ApiErrorBody),
        (status = 422, description = "Invalid query", body = atelier_contracts::http::ApiErrorBody),
        (status = 503, description = "No retrieval-indexer answered", body = atelier_contracts::http::ApiErrorBody),
    ),
    security(("bearer" = ["artifacts:read"]))
)]
pub async fn search(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SearchResponse>, ApiError> {
    caller.require(Scope::ArtifactsRead)?;
    let Query(params) =
        params.map_err(|e| ApiError::unprocessable("invalid_query", e.body_text()))?;
    let req = params.request()?;
    Ok(Json(ask(&app, &req).await?))
}

/// Search with an uploaded image (the body: image bytes, any format the ingest service reads);
/// the same query parameters as `GET /v1/search` (`text` and `image_id` left out).
#[utoipa::path(
    post, path = "/v1/search", tag = "retrieval",
    params(SearchParams),
    request_body(content = crate::api::Binary, content_type = "application/octet-stream",
        description = "The query image's bytes (PNG, JPEG, WebP, GIF, …; any Content-Type)"),
    responses(
        (status = 200, body = SearchResponse),
        (status = 404, body = atelier_contracts::http::ApiErrorBody),
        (status = 422, description = "Invalid query or an image that does not decode", body = atelier_contracts::http::ApiErrorBody),
        (status = 503, body = atelier_contracts::http::ApiErrorBody),
    ),
    security(("bearer" = ["artifacts:read"]))
)]
pub async fn search_image(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<SearchParams>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<SearchResponse>, ApiError> {
    caller.require(Scope::ArtifactsRead)?;
    let Query(params) =
        params.map_err(|e| ApiError::unprocessable("invalid_query", e.body_text()))?;
    if params.text.is_some() || params.image_id.is_some() {
        return Err(ApiError::unprocessable(
            "invalid_query",
            "POST /v1/search takes the image as its body; use GET /v1/search for text or image_id",
        ));
    }
    let mut req = params.request()?;
    let limit = app.limits.upload.min(MAX_QUERY_IMAGE_BYTES);
    let bytes = crate::api::read_body(&headers, body, limit).await?;
    if bytes.is_empty() {
        return Err(ApiError::unprocessable(
            "bad_image",
            "the body is empty: send the image's bytes",
        ));
    }
    if let Err(e) = image::guess_format(&bytes) {
        return Err(ApiError::unprocessable(
            "bad_image",
            format!("the body is not an image: {e}"),
        ));
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream")
        .to_owned();
    // The query image lives for this request only: a key of its own, removed once answered.
    let key = ArtifactKey::parse(&format!("queries/{}", atelier_contracts::JobId::new()))
        .map_err(|e| ApiError::unavailable(format!("query key: {e}")))?;
    app.store.put_at(&key, bytes, &content_type).await?;
    req.image_key = Some(key.to_string());
    let answer = ask(&app, &req).await;
    if let Err(e) = app.store.delete(&key).await {
        tracing::warn!(%key, error = %e, "removing a search query image");
    }
    Ok(Json(answer?))
}

/// Largest query image `POST /v1/search` takes, bytes.
const MAX_QUERY_IMAGE_BYTES: u64 = 32 << 20;

/// A JSON body whose `dataset` comes from the path.
fn with_dataset(body: &[u8], name: &str) -> Result<serde_json::Value, ApiError> {
    let mut v: serde_json::Value = if body.iter().all(u8::is_ascii_whitespace) {
        serde_json::json!({})
    } else {
        serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request("invalid_json", format!("body is not valid JSON: {e}"))
        })?
    };
    let obj = v
        .as_object_mut()
        .ok_or_else(|| ApiError::bad_request("invalid_json", "body must be a JSON object"))?;
    match obj.get("dataset") {
        Some(d) if d != name => {
            return Err(ApiError::unprocessable(
                "invalid_job",
                format!("body names dataset {d}, the path {name:?}"),
            ))
        }
        _ => {}
    }
    obj.insert("dataset".into(), name.into());
    Ok(v)
}

/// Reads a JSON body for dataset `name` (from the path) into a spec, checks it and queues it.
pub(crate) async fn queue_for<T: serde::de::DeserializeOwned>(
    app: &AppState,
    caller: &Caller,
    name: &str,
    headers: HeaderMap,
    body: Body,
    job: impl FnOnce(T) -> JobSpec,
) -> Result<JobRecord, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let body = crate::api::read_body(&headers, body, app.limits.json).await?;
    let spec: T = serde_json::from_value(with_dataset(&body, name)?)
        .map_err(|e| ApiError::unprocessable("invalid_job", format!("invalid request: {e}")))?;
    let spec = job(spec);
    crate::api::validate(&spec)?;
    crate::api::queue(app, caller, spec).await
}

/// Embed a dataset version's kept rows into its index (incremental; default: the latest
/// version, every space the indexer has a model for). Body: `{"version": N, "spaces": [...]}`
/// or empty.
#[utoipa::path(
    post, path = "/v1/datasets/{name}/index", tag = "retrieval",
    params(("name" = String, Path)),
    request_body = IndexSpec,
    responses(
        (status = 202, description = "Queued", body = JobRecord),
        (status = 422, body = atelier_contracts::http::ApiErrorBody),
    ),
    security(("bearer" = ["jobs:write"]))
)]
pub async fn index(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<JobRecord>), ApiError> {
    let record = queue_for(&app, &caller, &name, headers, body, JobSpec::Index).await?;
    Ok((StatusCode::ACCEPTED, Json(record)))
}

/// Curate a new version from a version (default: the latest): semantic queries with score
/// thresholds, caption keywords (all/any/none), metadata predicates, near-duplicate removal, a
/// seeded limit. Waits for the job: 201 with the new version, 422 when nothing matched (no
/// version is written), 202 with the job when it runs longer than two minutes.
#[utoipa::path(
    post, path = "/v1/datasets/{name}/curate", tag = "retrieval",
    params(("name" = String, Path)),
    request_body = CurateSpec,
    responses(
        (status = 201, description = "The new version", body = CurateOutput),
        (status = 202, description = "Still running", body = JobRecord),
        (status = 422, description = "Invalid spec, no index, or nothing matched", body = atelier_contracts::http::ApiErrorBody),
    ),
    security(("bearer" = ["jobs:write"]))
)]
pub async fn curate(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let record = queue_for(&app, &caller, &name, headers, body, |s: CurateSpec| {
        JobSpec::Curate(Box::new(s))
    })
    .await?;
    let Some(output) = wait_for_output(&app, &record, "curate", "curation_failed").await? else {
        return Ok((StatusCode::ACCEPTED, Json(record)).into_response());
    };
    match output {
        JobOutput::Curated(out) if out.version.is_none() => Err(ApiError::unprocessable(
            "empty_curation",
            out.note
                .unwrap_or_else(|| "the curation matched nothing".into()),
        )),
        JobOutput::Curated(out) => Ok((StatusCode::CREATED, Json(out)).into_response()),
        other => Err(ApiError::unavailable(format!(
            "the curate job returned {:?} output",
            std::mem::discriminant(&other)
        ))),
    }
}

/// Waits up to two minutes for a job this route queued: its output when it succeeded, `None`
/// when it is still running (the route answers 202 with the record); a failed or cancelled job
/// is an error naming its code (503 for `*unavailable`, else 422).
pub(crate) async fn wait_for_output(
    app: &AppState,
    record: &JobRecord,
    what: &str,
    failed_code: &'static str,
) -> Result<Option<JobOutput>, ApiError> {
    let deadline = tokio::time::Instant::now() + CURATE_WAIT;
    loop {
        if let Some((r, _)) = app.states.get(record.id).await? {
            match r.state {
                JobState::Succeeded => {
                    return r.output.map(Some).ok_or_else(|| {
                        ApiError::unavailable(format!("the {what} job succeeded without output"))
                    })
                }
                JobState::Failed => {
                    let e = r.error.unwrap_or(atelier_contracts::ErrorInfo {
                        code: "failed".into(),
                        message: format!("the {what} job failed"),
                    });
                    let status = if e.code.ends_with("unavailable") {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::UNPROCESSABLE_ENTITY
                    };
                    return Err(ApiError::new(
                        status,
                        failed_code,
                        format!("{}: {}", e.code, e.message),
                    ));
                }
                JobState::Cancelled => {
                    return Err(ApiError::unprocessable(
                        "cancelled",
                        format!("the {what} job was cancelled"),
                    ))
                }
                JobState::Queued | JobState::Running => {}
            }
        }
        if tokio::time::Instant::now() > deadline || app.shutdown.is_cancelled() {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
