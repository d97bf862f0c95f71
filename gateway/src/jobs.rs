//! `GET /v1/jobs`: the caller's jobs (every key's for an `admin` key), newest first, filtered by
//! kind, state and submission time, a page at a time with a cursor.

use std::collections::HashMap;

use atelier_contracts::http::{ApiErrorBody, JobPage};
use atelier_contracts::{JobId, JobState};
use atelier_kit::joblist::{self, JobFilter};
use axum::extract::{Query, State};
use axum::{Extension, Json};

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;

fn bad(message: String) -> ApiError {
    ApiError::unprocessable("invalid_query", message)
}

/// The filter and page size a query asks for.
fn filter_of(q: &HashMap<String, String>, caller: &Caller) -> Result<(JobFilter, usize), ApiError> {
    let known = ["kind", "state", "since", "cursor", "limit", "owner"];
    if let Some(k) = q.keys().find(|k| !known.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown parameter {k:?}; known: {}",
            known.join(", ")
        )));
    }
    let state = match q.get("state") {
        Some(s) => Some(
            serde_json::from_value::<JobState>(serde_json::Value::String(s.clone())).map_err(
                |_| {
                    bad(format!(
                        "state {s:?} is not one of queued, running, succeeded, failed, cancelled"
                    ))
                },
            )?,
        ),
        None => None,
    };
    let since = match q.get("since") {
        Some(s) => Some(
            chrono::DateTime::parse_from_rfc3339(s)
                .map_err(|e| bad(format!("since {s:?} is not an RFC 3339 time: {e}")))?
                .with_timezone(&chrono::Utc),
        ),
        None => None,
    };
    let before = match q.get("cursor") {
        Some(c) => {
            Some(JobId::parse(c).ok_or_else(|| bad(format!("cursor {c:?} is not a job id")))?)
        }
        None => None,
    };
    let limit = match q.get("limit") {
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| bad(format!("limit must be 1..={MAX_LIMIT} (got {l:?})")))?,
        None => DEFAULT_LIMIT,
    };
    let owner = match (q.get("owner"), caller.is_admin()) {
        (Some(o), true) => Some(o.clone()),
        (Some(_), false) => {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "forbidden",
                "only an admin key lists other keys' jobs (owner=)",
            ))
        }
        (None, true) => None,
        (None, false) => Some(caller.name.clone()),
    };
    let filter = JobFilter {
        owner,
        kind: q.get("kind").cloned(),
        state,
        since,
        before,
    };
    Ok((filter, limit))
}

/// The caller's jobs, newest first (an `admin` key sees every key's, or one key's with `owner`).
#[utoipa::path(
    get, path = "/v1/jobs", tag = "jobs", operation_id = "list_jobs",
    params(
        ("kind" = Option<String>, Query, description = "Job kind, e.g. txt2img, caption"),
        ("state" = Option<String>, Query, description = "queued, running, succeeded, failed or cancelled"),
        ("since" = Option<String>, Query, description = "Submitted at or after (RFC 3339)"),
        ("cursor" = Option<String>, Query, description = "The previous page's next_cursor"),
        ("limit" = Option<usize>, Query, description = "Jobs per page, 1..=500 (default 50)"),
        ("owner" = Option<String>, Query, description = "Admin keys only: this key name's jobs"),
    ),
    responses((status = 200, body = JobPage), (status = 422, body = ApiErrorBody)),
    security(("bearer" = ["jobs:read"]))
)]
pub async fn list(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<JobPage>, ApiError> {
    caller.require(Scope::JobsRead)?;
    crate::api::bus_ready(&app)?;
    let (filter, limit) = filter_of(&q, &caller)?;
    let (jobs, more) = joblist::page(&app.states, &filter, limit).await?;
    let next_cursor = if more {
        jobs.last().map(|r| r.id)
    } else {
        None
    };
    Ok(Json(JobPage { jobs, next_cursor }))
}
