//! The Files and Batches API on the loopback server, as OpenAI specifies them: `POST /v1/files`
//! (multipart, `purpose=batch`; at most 50,000 request lines and 200 MB), `POST /v1/batches`
//! (validated, then `in_progress`, then `completed` with an output file and, for requests that
//! failed, an error file), `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`,
//! `GET /v1/files/{id}/content`. Each request line is answered as `/v1/chat/completions` would
//! answer it, with the same fault injection.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::{authorized, completion, every, openai_error, Inner};

const MAX_LINES: usize = 50_000;
const MAX_FILE_BYTES: usize = 200 * 1000 * 1000;

#[derive(Default)]
pub struct Store(Mutex<State_>);

#[derive(Default)]
struct State_ {
    files: HashMap<String, bytes::Bytes>,
    batches: HashMap<String, serde_json::Value>,
    next: u64,
}

impl Store {
    fn with<T>(&self, f: impl FnOnce(&mut State_) -> T) -> T {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn add_file(&self, bytes: bytes::Bytes) -> String {
        self.with(|s| {
            s.next += 1;
            let id = format!("file-{}", s.next);
            s.files.insert(id.clone(), bytes);
            id
        })
    }
}

pub(super) fn routes() -> Router<Arc<Inner>> {
    Router::new()
        .route(
            "/v1/files",
            post(upload).layer(axum::extract::DefaultBodyLimit::max(
                MAX_FILE_BYTES + (1 << 20),
            )),
        )
        .route("/v1/files/{id}/content", get(content))
        .route("/v1/batches", post(create).get(list))
        .route("/v1/batches/{id}", get(batch))
        .route("/v1/batches/{id}/cancel", post(cancel))
}

fn bad(message: &str) -> Response {
    openai_error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

async fn upload(State(s): State<Arc<Inner>>, headers: HeaderMap, mut form: Multipart) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    let (mut purpose, mut file) = (None, None);
    while let Ok(Some(field)) = form.next_field().await {
        match field.name() {
            Some("purpose") => purpose = field.text().await.ok(),
            Some("file") => file = field.bytes().await.ok(),
            _ => {}
        }
    }
    let Some(file) = file else {
        return bad("'file' is a required property");
    };
    if purpose.as_deref() != Some("batch") {
        return bad("only purpose=batch is supported here");
    }
    if file.len() > MAX_FILE_BYTES {
        return bad("the file is larger than 200 MB");
    }
    let bytes = file.len();
    let id = s.batches.add_file(file);
    Json(serde_json::json!({
        "id": id, "object": "file", "bytes": bytes, "purpose": "batch",
        "created_at": chrono::Utc::now().timestamp(), "filename": "input.jsonl",
    }))
    .into_response()
}

async fn content(
    State(s): State<Arc<Inner>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    match s.batches.with(|st| st.files.get(&id).cloned()) {
        Some(b) => (StatusCode::OK, b).into_response(),
        None => openai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "No such File object",
        ),
    }
}

async fn batch(
    State(s): State<Arc<Inner>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    match s.batches.with(|st| st.batches.get(&id).cloned()) {
        Some(b) => Json(b).into_response(),
        None => openai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "No such batch",
        ),
    }
}

/// Every batch, newest first (one page).
async fn list(State(s): State<Arc<Inner>>, headers: HeaderMap) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    let mut data: Vec<serde_json::Value> =
        s.batches.with(|st| st.batches.values().cloned().collect());
    data.sort_by_key(|b| {
        std::cmp::Reverse(
            b["id"]
                .as_str()
                .and_then(|i| i.strip_prefix("batch_")?.parse::<u64>().ok()),
        )
    });
    Json(serde_json::json!({"object": "list", "data": data, "has_more": false})).into_response()
}

async fn cancel(
    State(s): State<Arc<Inner>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    let b = s.batches.with(|st| {
        let b = st.batches.get_mut(&id)?;
        if !matches!(
            b["status"].as_str(),
            Some("completed" | "failed" | "expired")
        ) {
            b["status"] = "cancelled".into();
        }
        Some(b.clone())
    });
    match b {
        Some(b) => Json(b).into_response(),
        None => openai_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "No such batch",
        ),
    }
}

async fn create(
    State(s): State<Arc<Inner>>,
    headers: HeaderMap,
    Json(req): Json<serde_json::Value>,
) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    if req["endpoint"] != "/v1/chat/completions" || req["completion_window"] != "24h" {
        return bad("endpoint must be /v1/chat/completions and completion_window 24h");
    }
    let Some(input) = req["input_file_id"].as_str() else {
        return bad("'input_file_id' is a required property");
    };
    let Some(file) = s.batches.with(|st| st.files.get(input).cloned()) else {
        return bad("No such File object");
    };
    let (lines, problem) = validate(&file);
    s.stats.batches.fetch_add(1, Ordering::Relaxed);
    let id = s.batches.with(|st| {
        st.next += 1;
        let id = format!("batch_{}", st.next);
        let b = serde_json::json!({
            "id": id, "object": "batch", "endpoint": "/v1/chat/completions",
            "input_file_id": input, "completion_window": "24h",
            "status": if problem.is_some() { "failed" } else { "validating" },
            "errors": problem.map(|m| serde_json::json!({"object": "list", "data": [{"code": "invalid_request", "message": m}]})),
            "output_file_id": null, "error_file_id": null,
            "created_at": chrono::Utc::now().timestamp(),
            "request_counts": {"total": lines.len(), "completed": 0, "failed": 0},
        });
        st.batches.insert(id.clone(), b);
        id
    });
    let answer = s.batches.with(|st| st.batches[&id].clone());
    if answer["status"] == "validating" {
        tokio::spawn(run(s.clone(), id, lines));
    }
    Json(answer).into_response()
}

/// The request lines of an input file, or why it is not a valid one.
fn validate(file: &[u8]) -> (Vec<serde_json::Value>, Option<String>) {
    let mut lines = Vec::new();
    let mut ids = HashSet::new();
    for (i, l) in String::from_utf8_lossy(file).lines().enumerate() {
        if l.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = match serde_json::from_str(l) {
            Ok(v) => v,
            Err(e) => return (vec![], Some(format!("line {}: invalid JSON: {e}", i + 1))),
        };
        let id = v["custom_id"].as_str().unwrap_or_default().to_owned();
        if id.is_empty() || !ids.insert(id) {
            return (
                vec![],
                Some(format!("line {}: custom_id missing or repeated", i + 1)),
            );
        }
        if v["method"] != "POST" || v["url"] != "/v1/chat/completions" {
            return (
                vec![],
                Some(format!("line {}: must POST /v1/chat/completions", i + 1)),
            );
        }
        lines.push(v);
    }
    if lines.is_empty() || lines.len() > MAX_LINES {
        return (
            vec![],
            Some(format!("a batch holds 1 to {MAX_LINES} requests")),
        );
    }
    (lines, None)
}

/// Works a batch off after the configured latency; stops if it is cancelled.
async fn run(s: Arc<Inner>, id: String, lines: Vec<serde_json::Value>) {
    let set = |status: &str| {
        s.batches.with(|st| {
            if let Some(b) = st.batches.get_mut(&id) {
                b["status"] = status.into();
            }
        })
    };
    set("in_progress");
    let (mut output, mut errors, mut ok, mut failed) = (Vec::new(), Vec::new(), 0, 0);
    for line in lines {
        tokio::time::sleep(s.config.faults.latency).await;
        let cancelled = s
            .batches
            .with(|st| st.batches[&id]["status"] == "cancelled");
        if cancelled {
            return;
        }
        let n = s.stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
        let custom_id = line["custom_id"].clone();
        let answer = if every(s.config.faults.server_error_every, n) {
            s.stats.server_errors.fetch_add(1, Ordering::Relaxed);
            Err((
                500,
                "The server had an error while processing your request.".to_owned(),
            ))
        } else {
            completion(&s, n, &line["body"]).map_err(|m| (400, m))
        };
        let (target, status, body) = match answer {
            Ok(body) => {
                s.stats.ok.fetch_add(1, Ordering::Relaxed);
                ok += 1;
                (&mut output, 200, body)
            }
            Err((status, message)) => {
                failed += 1;
                let body =
                    serde_json::json!({"error": {"message": message, "type": "server_error"}});
                (&mut errors, status, body)
            }
        };
        let l = serde_json::json!({
            "id": format!("batch_req_{n}"), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": format!("req_{n}"), "body": body},
            "error": null,
        });
        target.extend(serde_json::to_vec(&l).unwrap_or_default());
        target.push(b'\n');
        s.batches.with(|st| {
            if let Some(b) = st.batches.get_mut(&id) {
                b["request_counts"]["completed"] = ok.into();
                b["request_counts"]["failed"] = failed.into();
            }
        });
    }
    let out = (!output.is_empty()).then(|| s.batches.add_file(output.into()));
    let err = (!errors.is_empty()).then(|| s.batches.add_file(errors.into()));
    s.batches.with(|st| {
        if let Some(b) = st.batches.get_mut(&id) {
            if b["status"] != "cancelled" {
                b["status"] = "completed".into();
                b["output_file_id"] = out.into();
                b["error_file_id"] = err.into();
            }
        }
    });
}
