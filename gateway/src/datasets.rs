//! Dataset routes: announce images (`POST /v1/images`) and read dataset versions.
//!
//! - `POST /v1/images`                           announce stored images → 202
//! - `GET  /v1/datasets`                         every dataset with its versions
//! - `GET  /v1/datasets/{name}/versions/{v}`     one version's manifest (`latest` allowed)

use std::collections::BTreeMap;

use atelier_contracts::dataset::{check_dataset_name, DatasetManifest};
use atelier_contracts::http::{DatasetSummary, MAX_IMAGES_PER_ANNOUNCE};
use atelier_contracts::images::ImagesIngested;
use atelier_contracts::{subjects, ArtifactKey, SCHEMA_VERSION};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Announced {
    pub announced: usize,
}

/// Announce images already in the store (e.g. from `POST /v1/uploads`) for ingest into a
/// dataset; the ingest service records them (`GET /v1/images/{sha256}`).
#[utoipa::path(
    post, path = "/v1/images", tag = "datasets",
    request_body = ImagesIngested,
    responses(
        (status = 202, description = "Published for ingest", body = Announced),
        (status = 422, description = "Invalid announcement", body = atelier_contracts::http::ApiErrorBody),
    ),
    security(("bearer" = ["artifacts:write"]))
)]
pub async fn announce(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Announced>), ApiError> {
    caller.require(Scope::ArtifactsWrite)?;
    let ev: ImagesIngested = serde_json::from_slice(&body)
        .map_err(|e| ApiError::unprocessable("invalid_announcement", e.to_string()))?;
    if ev.schema_version != SCHEMA_VERSION {
        return Err(ApiError::unprocessable(
            "unsupported_schema_version",
            format!("schema_version must be {SCHEMA_VERSION}"),
        ));
    }
    if let Some(d) = &ev.dataset {
        check_dataset_name(d).map_err(|e| ApiError::unprocessable("invalid_dataset", e))?;
    }
    if ev.images.is_empty() || ev.images.len() > MAX_IMAGES_PER_ANNOUNCE {
        return Err(ApiError::unprocessable(
            "invalid_announcement",
            format!(
                "images: {} given; announce 1 to {MAX_IMAGES_PER_ANNOUNCE} per request",
                ev.images.len()
            ),
        ));
    }
    for (i, img) in ev.images.iter().enumerate() {
        ArtifactKey::parse(&img.key).map_err(|e| {
            ApiError::unprocessable(
                "bad_artifact_key",
                format!("images[{i}].key {:?}: {e}", img.key),
            )
        })?;
    }
    app.bus
        .publish_json(subjects::IMAGES_INGESTED.into(), None, &ev)
        .await
        .map_err(|e| ApiError::unavailable(format!("{e:#}")))?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Announced {
            announced: ev.images.len(),
        }),
    ))
}

async fn manifests(app: &AppState, prefix: &str) -> Result<Vec<DatasetManifest>, ApiError> {
    let kv = app
        .bus
        .datasets_kv()
        .await
        .map_err(|e| ApiError::unavailable(format!("{e:#}")))?;
    let mut all: Vec<DatasetManifest> = atelier_kit::bus::kv_values(&kv, prefix)
        .await
        .map_err(|e| ApiError::unavailable(format!("{e:#}")))?
        .into_iter()
        .map(|(_, m)| m)
        .collect();
    all.sort_by(|a: &DatasetManifest, b| (&a.dataset, a.version).cmp(&(&b.dataset, b.version)));
    Ok(all)
}

/// Every dataset that has versions.
#[utoipa::path(
    get, path = "/v1/datasets", tag = "datasets",
    responses((status = 200, body = Vec<DatasetSummary>)),
    security(("bearer" = ["artifacts:read"]))
)]
pub async fn list(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<DatasetSummary>>, ApiError> {
    caller.require(Scope::ArtifactsRead)?;
    let mut by: BTreeMap<String, Vec<DatasetManifest>> = BTreeMap::new();
    for m in manifests(&app, "").await? {
        by.entry(m.dataset.clone()).or_default().push(m);
    }
    Ok(Json(
        by.into_iter()
            .filter_map(|(dataset, ms)| {
                let versions = ms.iter().map(|m| m.version).collect();
                let latest = ms.into_iter().last()?;
                Some(DatasetSummary {
                    dataset,
                    versions,
                    latest,
                })
            })
            .collect(),
    ))
}

/// One version's manifest; `latest` names the newest.
#[utoipa::path(
    get, path = "/v1/datasets/{name}/versions/{version}", tag = "datasets",
    params(("name" = String, Path), ("version" = String, Path, description = "A number, or `latest`")),
    responses(
        (status = 200, body = DatasetManifest),
        (status = 400, body = atelier_contracts::http::ApiErrorBody),
        (status = 404, body = atelier_contracts::http::ApiErrorBody),
    ),
    security(("bearer" = ["artifacts:read"]))
)]
pub async fn version(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<DatasetManifest>, ApiError> {
    caller.require(Scope::ArtifactsRead)?;
    find_version(&app, &name, &version).await.map(Json)
}

/// Version `version` (a number or `latest`) of dataset `name`.
pub(crate) async fn find_version(
    app: &AppState,
    name: &str,
    version: &str,
) -> Result<DatasetManifest, ApiError> {
    check_dataset_name(name).map_err(|e| ApiError::bad_request("invalid_dataset", e))?;
    let wanted: Option<u32> = match version {
        "latest" => None,
        v => Some(v.parse().map_err(|_| {
            ApiError::bad_request(
                "invalid_version",
                format!("version {v:?}: expected a number or `latest`"),
            )
        })?),
    };
    let ms = manifests(app, &format!("{name}.")).await?;
    let found = match wanted {
        None => ms.into_iter().last(),
        Some(v) => ms.into_iter().find(|m| m.version == v),
    };
    found.ok_or_else(|| {
        ApiError::not_found(
            "version_not_found",
            match wanted {
                None => format!(
                    "dataset {name:?} has no versions yet; run `atelier filter --dataset {name}`"
                ),
                Some(v) => format!("dataset {name:?} has no version {v}"),
            },
        )
    })
}

/// Export a version (default: the latest) into the object store as a job on the quality filter:
/// `{"format": "webdataset" | "parquet" | "jsonl" | "llava", "version": N, "tiers": [...],
/// "shard_size": N}`. Shards are written as they fill, so memory does not grow with the dataset;
/// the same request sent again resumes an interrupted export. The job's output names the prefix
/// (`GET /v1/artifacts/<prefix>/README.md`, the Hub dataset card).
#[utoipa::path(
    post, path = "/v1/datasets/{name}/exports", tag = "datasets",
    params(("name" = String, Path)),
    request_body = atelier_contracts::dataset::ExportSpec,
    responses(
        (status = 202, description = "Queued; the output is an `exported` ExportOutput", body = atelier_contracts::JobRecord),
        (status = 422, body = atelier_contracts::http::ApiErrorBody),
    ),
    security(("bearer" = ["jobs:write"]))
)]
pub async fn export(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<(StatusCode, Json<atelier_contracts::JobRecord>), ApiError> {
    let record = crate::retrieval::queue_for(
        &app,
        &caller,
        &name,
        headers,
        body,
        atelier_contracts::JobSpec::Export,
    )
    .await?;
    Ok((StatusCode::ACCEPTED, Json(record)))
}
