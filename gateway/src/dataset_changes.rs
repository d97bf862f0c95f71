//! What changed between two versions of a dataset, row by row: both versions' rows are in sha256
//! order, so one pass over the two files side by side (by byte ranges, [`RowReader`]) finds the
//! rows only one has and the rows whose decision, caption, tier, split, signals or tags differ.
//! A page stops at its size or after 16 MiB read; its cursor holds both files' offsets.

use atelier_contracts::dataset::DatasetRow;
use atelier_contracts::ArtifactKey;
use axum::extract::{Path, Query, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::dataset_rows::{RowReader, MAX_SCAN};
use crate::error::ApiError;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ChangeQuery {
    /// The version to compare against (a number).
    pub against: u32,
    /// The previous page's `next_cursor`.
    pub cursor: Option<String>,
    /// Changes per page, 1..=200 (default 48).
    pub limit: Option<usize>,
}

/// One row's change: `added` (only in this version), `removed` (only in the other) or `changed`.
#[derive(Debug, Serialize, ToSchema)]
pub struct RowChange {
    pub change: String,
    /// The row as this version has it (`removed`: as the other had it).
    pub row: DatasetRow,
    /// For `changed`: the row as the other version has it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub before: Option<DatasetRow>,
    /// For `changed`: which fields differ.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ChangePage {
    pub version: u32,
    pub against: u32,
    pub changes: Vec<RowChange>,
    /// Where the next page starts; absent once both versions are read through.
    pub next_cursor: Option<String>,
}

/// Rows that differ between a version and another one.
#[utoipa::path(
    get, path = "/v1/datasets/{name}/versions/{version}/changes", tag = "datasets",
    params(("name" = String, Path), ("version" = String, Path, description = "A number, or `latest`"), ChangeQuery),
    responses((status = 200, body = ChangePage), (status = 404, body = atelier_contracts::http::ApiErrorBody),
        (status = 422, body = atelier_contracts::http::ApiErrorBody)),
    security(("bearer" = ["artifacts:read"]))
)]
pub async fn changes(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
    q: Result<Query<ChangeQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ChangePage>, ApiError> {
    caller.require(Scope::ArtifactsRead)?;
    let Query(q) = q.map_err(|e| {
        ApiError::unprocessable(
            "invalid_query",
            format!("{e} (against=N names the version to compare with)"),
        )
    })?;
    let limit = q.limit.unwrap_or(48);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::unprocessable(
            "invalid_limit",
            format!("limit must be 1..=200, not {limit}"),
        ));
    }
    let (from_a, from_b) = match q.cursor.as_deref() {
        None => (0, 0),
        Some(c) => c
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
            .ok_or_else(|| {
                ApiError::unprocessable(
                    "invalid_cursor",
                    format!("cursor {c:?}: use a page's next_cursor"),
                )
            })?,
    };
    let this = crate::datasets::find_version(&app, &name, &version).await?;
    let other = crate::datasets::find_version(&app, &name, &q.against.to_string()).await?;
    let reader =
        |m: &atelier_contracts::DatasetManifest, from: u64| -> Result<RowReader, ApiError> {
            let key = ArtifactKey::parse(&m.data.key)
                .map_err(|e| ApiError::unavailable(format!("the version's rows key: {e}")))?;
            Ok(RowReader::new(key, m.data.size, from))
        };
    let (mut a, mut b) = (reader(&this, from_a)?, reader(&other, from_b)?);
    let mut changes = Vec::new();
    while changes.len() < limit && a.read_from_start() + b.read_from_start() < MAX_SCAN {
        let sa = a.peek(&app).await?.map(|r| r.sha256.clone());
        let sb = b.peek(&app).await?.map(|r| r.sha256.clone());
        let change = match (sa, sb) {
            (None, None) => break,
            (Some(x), Some(y)) if x == y => {
                let (ra, rb) = (a.next(&app).await?, b.next(&app).await?);
                let (Some(ra), Some(rb)) = (ra, rb) else {
                    break;
                };
                let fields = differing(&ra, &rb);
                if fields.is_empty() {
                    continue;
                }
                Some(RowChange {
                    change: "changed".into(),
                    row: ra,
                    before: Some(rb),
                    fields,
                })
            }
            (Some(x), Some(y)) if x > y => only("removed", b.next(&app).await?),
            (None, Some(_)) => only("removed", b.next(&app).await?),
            _ => only("added", a.next(&app).await?),
        };
        let Some(change) = change else { break };
        changes.push(change);
    }
    let next_cursor = (a.cursor().is_some() || b.cursor().is_some())
        .then(|| format!("{}.{}", a.offset(), b.offset()));
    Ok(Json(ChangePage {
        version: this.version,
        against: other.version,
        changes,
        next_cursor,
    }))
}

/// A row only one version has.
fn only(change: &str, row: Option<DatasetRow>) -> Option<RowChange> {
    row.map(|row| RowChange {
        change: change.into(),
        row,
        before: None,
        fields: vec![],
    })
}

/// The fields people curate by that differ between two versions of one image's row.
fn differing(a: &DatasetRow, b: &DatasetRow) -> Vec<String> {
    let signals = |r: &DatasetRow| r.signals.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    [
        ("decision", a.decision != b.decision),
        ("caption", a.caption != b.caption),
        ("tier", a.tier != b.tier),
        ("split", a.split != b.split),
        ("signals", signals(a) != signals(b)),
        ("tags", a.tags != b.tags),
    ]
    .into_iter()
    .filter(|(_, d)| *d)
    .map(|(f, _)| f.to_string())
    .collect()
}
