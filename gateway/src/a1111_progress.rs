//! A1111's `progress`, `interrupt` and `skip` over the A1111 requests in flight, read from the
//! job records on the bus (so a job on any worker replica is seen): step and total from the
//! worker's reports, an ETA from the time so far, the live preview as `current_image`.
//! `interrupt` cancels every one of them and `skip` the oldest unfinished; the waiting requests
//! then answer with the images finished so far (and a cancelled image's last preview).

use atelier_contracts::{JobId, JobRecord, JobState};
use axum::extract::State;
use axum::{Extension, Json};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

fn active(app: &AppState) -> Vec<JobId> {
    app.a1111
        .active
        .lock()
        .map(|a| a.clone())
        .unwrap_or_default()
}

/// `(done, total)` from a worker's "step 3/20" report (which may say more after the numbers).
fn steps(r: &JobRecord) -> Option<(u64, u64)> {
    let msg = r.progress.as_ref()?.message.as_deref()?;
    let (done, rest) = msg.strip_prefix("step ")?.split_once('/')?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Some((done.trim().parse().ok()?, digits.parse().ok()?))
}

/// Progress of the A1111 requests in flight.
#[utoipa::path(get, path = "/sdapi/v1/progress", tag = "a1111", operation_id = "progressapi_sdapi_v1_progress_get",
    responses((status = 200, description = "{progress, eta_relative, state, current_image, textinfo}")), security(("bearer" = ["jobs:read"])))]
pub async fn progress(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    let ids = active(&app);
    let records: Vec<JobRecord> = app
        .states
        .get_many(&ids)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let fraction = |r: &JobRecord| match r.state {
        s if s.is_terminal() => 1.0,
        _ => r.progress.as_ref().map_or(0.0, |p| p.fraction as f64),
    };
    let progress = match records.len() {
        0 => 0.0,
        n => records.iter().map(fraction).sum::<f64>() / n as f64,
    };
    let current = records.iter().find(|r| !r.state.is_terminal());
    let (step, total) = current.and_then(steps).unwrap_or((0, 0));
    let started = records.iter().map(|r| r.created_at).min();
    let elapsed = started.map_or(0.0, |t| {
        (chrono::Utc::now() - t).num_milliseconds() as f64 / 1e3
    });
    let eta = if progress > 0.0 {
        elapsed / progress - elapsed
    } else {
        0.0
    };
    // The live preview (requests made with show_progress_every_n_steps), base64 as A1111 sends it.
    let preview = current.and_then(|r| r.progress.as_ref()?.preview.clone());
    let current_image = match preview.and_then(|k| atelier_contracts::ArtifactKey::parse(&k).ok()) {
        Some(key) => app
            .store
            .get_bytes(&key)
            .await
            .ok()
            .map(|b| base64::engine::general_purpose::STANDARD.encode(&b)),
        None => None,
    };
    let done = records.iter().filter(|r| r.state.is_terminal()).count();
    Ok(Json(json!({
        "progress": progress,
        "eta_relative": eta.max(0.0),
        "state": {"skipped": false, "interrupted": records.iter().any(|r| r.state == JobState::Cancelled),
                  "job": current.map(|r| r.id.to_string()).unwrap_or_default(),
                  "job_count": records.len(), "job_timestamp": started.map(|t| t.format("%Y%m%d%H%M%S").to_string()).unwrap_or_default(),
                  "job_no": done, "sampling_step": step, "sampling_steps": total},
        "current_image": current_image,
        "textinfo": current.and_then(|r| r.progress.as_ref()?.message.clone()),
    })))
}

async fn cancel(app: &AppState, id: JobId) -> Result<(), ApiError> {
    app.states.cancel(id).await?;
    Ok(())
}

/// Stop the A1111 requests in flight (between sampling steps); they answer with what was made.
#[utoipa::path(post, path = "/sdapi/v1/interrupt", tag = "a1111", operation_id = "interruptapi_sdapi_v1_interrupt_post",
    responses((status = 200, description = "{}")), security(("bearer" = ["jobs:write"])))]
pub async fn interrupt(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsWrite)?;
    for id in active(&app) {
        cancel(&app, id).await?;
    }
    Ok(Json(json!({})))
}

/// Skip the image being made: the oldest unfinished job of the requests in flight stops, the
/// others go on.
#[utoipa::path(post, path = "/sdapi/v1/skip", tag = "a1111", operation_id = "skip_sdapi_v1_skip_post",
    responses((status = 200, description = "null")), security(("bearer" = ["jobs:write"])))]
pub async fn skip(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let ids = active(&app);
    let records = app.states.get_many(&ids).await?;
    if let Some(r) = records
        .into_iter()
        .flatten()
        .find(|r| !r.state.is_terminal())
    {
        cancel(&app, r.id).await?;
    }
    Ok(Json(Value::Null))
}
