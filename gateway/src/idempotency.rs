//! `Idempotency-Key` on the routes that create a job: a client that did not hear the answer
//! (a timeout, a dropped connection) sends the same request with the same key again and gets the
//! job the first attempt created instead of a second one.
//!
//! Per caller and key, a 24-hour entry in JetStream holds the body's SHA-256 and a job id chosen
//! before the handler runs; the handler's [`crate::api::queue`] creates the job under that id
//! ([`preset_job_id`]). A repeat with the same body answers the job's record (200, header
//! `Idempotency-Replayed: true`); with another body, 422 `idempotency_key_reused`. If the first
//! attempt is still being accepted, a repeat gets 409 `idempotency_in_progress` with
//! `Retry-After`; if it died between reserving the key and recording the job (30 s on), the repeat
//! runs the handler again under the same id. A refused attempt (4xx) releases its key, so a
//! corrected body can use it; one that failed on the server's side (5xx) keeps the key's job id —
//! its job may be recorded all the same — and a repeat settles it at once under that id.

use std::cell::Cell;

use async_nats::jetstream::kv;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::api::AppState;
use crate::auth::Caller;
use crate::error::ApiError;
use atelier_contracts::JobId;

pub const HEADER: &str = "idempotency-key";
const MAX_KEY_LEN: usize = 255;

#[derive(Serialize, Deserialize)]
struct Entry {
    body_sha256: String,
    job: JobId,
    /// When the first attempt reserved the key.
    since: chrono::DateTime<chrono::Utc>,
    /// An attempt ended with a server error: the job may or may not be recorded, and a repeat
    /// settles it under the same id at once.
    #[serde(default)]
    abandoned: bool,
}

/// A reserved key whose job is not recorded after this long belongs to an attempt that died: a
/// repeat takes it over. Younger, the first attempt may still be recording it: a repeat waits.
const TAKE_OVER_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

tokio::task_local! {
    static PRESET: Cell<Option<JobId>>;
}

/// The job id an idempotent request reserved, taken once by the handler's first enqueue.
pub fn preset_job_id() -> Option<JobId> {
    PRESET.try_with(Cell::take).ok().flatten()
}

/// The middleware of the routes that create a job (after authentication, so the key is the
/// caller's own).
pub async fn middleware(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let key = req.headers().get(HEADER).cloned();
    let caller = req.extensions().get::<Caller>().map(|c| c.name.clone());
    match (key, caller) {
        (Some(key), Some(caller)) => match idempotent(&app, &caller, &key, req, next).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        },
        _ => next.run(req).await,
    }
}

fn entry_key(caller: &str, key: &str) -> String {
    let h = Sha256::digest(format!("{caller}\n{key}").as_bytes());
    h.iter().map(|b| format!("{b:02x}")).collect()
}

async fn idempotent(
    app: &AppState,
    caller: &str,
    key: &HeaderValue,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
        .ok_or_else(|| {
            ApiError::bad_request(
                "bad_idempotency_key",
                format!("{HEADER} must be 1 to {MAX_KEY_LEN} visible ASCII characters"),
            )
        })?;
    crate::api::bus_ready(app)?;
    let (parts, body) = req.into_parts();
    let bytes = crate::api::read_body(&parts.headers, body, app.limits.json).await?;
    let body_sha256: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let kv_key = entry_key(caller, key);
    let entry = match reserve(&app.idempotency, &kv_key, &body_sha256).await? {
        Reserved::New(entry) => entry,
        Reserved::Existing(entry) if entry.body_sha256 != body_sha256 => {
            return Err(ApiError::unprocessable(
                "idempotency_key_reused",
                format!("{HEADER} {key:?} was used with another request body in the last 24 hours; use a new key for a new request"),
            ));
        }
        Reserved::Existing(entry) => match replay(app, entry.job).await? {
            Some(r) => return Ok(r),
            None if !entry.abandoned && chrono::Utc::now() - entry.since < TAKE_OVER_AFTER => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "idempotency_in_progress",
                    "a request with this Idempotency-Key is still being accepted; retry",
                )
                .with_retry_after(1));
            }
            // Abandoned, or reserved long ago and never recorded: run again under the same id.
            None => entry,
        },
    };
    let req = Request::from_parts(parts, Body::from(bytes));
    let resp = PRESET
        .scope(Cell::new(Some(entry.job)), next.run(req))
        .await;
    settle(app, &kv_key, resp.status(), entry).await;
    Ok(resp)
}

/// After the handler: a refusal (4xx, decided before anything is recorded) releases the key; a
/// server error keeps it bound to the job id — the job may have been recorded even though the
/// attempt failed (an acknowledgement lost to a NATS restart), and a second id would make a
/// second job — and marks it abandoned, so a repeat takes over at once.
async fn settle(app: &AppState, kv_key: &str, status: StatusCode, entry: Entry) {
    if status.is_client_error() {
        if let Err(e) = app.idempotency.delete(kv_key).await {
            tracing::warn!(error = %e, "releasing an idempotency key");
        }
    } else if status.is_server_error() {
        let entry = Entry {
            abandoned: true,
            ..entry
        };
        let value = serde_json::to_vec(&entry).unwrap_or_default();
        if let Err(e) = app.idempotency.put(kv_key, value.into()).await {
            // A repeat takes over after TAKE_OVER_AFTER instead.
            tracing::warn!(error = %e, "marking an idempotency key's attempt abandoned");
        }
    }
}

/// The recorded job, answered as a replay.
async fn replay(app: &AppState, job: JobId) -> Result<Option<Response>, ApiError> {
    Ok(app.states.get(job).await?.map(|(record, _)| {
        let mut r = (StatusCode::OK, Json(record)).into_response();
        r.headers_mut()
            .insert("idempotency-replayed", HeaderValue::from_static("true"));
        r
    }))
}

enum Reserved {
    New(Entry),
    Existing(Entry),
}

/// Creates the entry, or reads the one a first attempt made.
async fn reserve(store: &kv::Store, key: &str, body_sha256: &str) -> Result<Reserved, ApiError> {
    let unavailable = |e: String| ApiError::unavailable(format!("idempotency keys: {e}"));
    for _ in 0..3 {
        if let Some(v) = store
            .get(key)
            .await
            .map_err(|e| unavailable(e.to_string()))?
        {
            let entry: Entry =
                serde_json::from_slice(&v).map_err(|e| unavailable(e.to_string()))?;
            return Ok(Reserved::Existing(entry));
        }
        let entry = Entry {
            body_sha256: body_sha256.to_string(),
            job: JobId::new(),
            since: chrono::Utc::now(),
            abandoned: false,
        };
        let value = serde_json::to_vec(&entry).map_err(|e| unavailable(e.to_string()))?;
        match store.create(key, value.into()).await {
            Ok(_) => return Ok(Reserved::New(entry)),
            // Another attempt created it first (or a deleted entry's tombstone is in the way).
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
            Err(e) => return Err(unavailable(e.to_string())),
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "idempotency_conflict",
        "the same Idempotency-Key is being used by a concurrent request; retry",
    ))
}
