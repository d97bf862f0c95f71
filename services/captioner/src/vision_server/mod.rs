//! A loopback server that speaks the OpenAI chat-completions wire format and captions images with
//! [`crate::scene::describe`]. The demo captions through it when no real endpoint is configured;
//! the tests and benchmarks use its fault injection (429 with `Retry-After`, 500, slow and
//! truncated responses) to exercise the client the way a real endpoint under load would.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;

mod batches;

/// Which requests fail, by their 1-based arrival number `n` (0 disables each).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Every k-th request gets 429 with `Retry-After: retry_after_s`.
    pub rate_limit_every: u64,
    pub retry_after_s: f64,
    /// Every k-th request gets 500.
    pub server_error_every: u64,
    /// Every k-th request's body is cut in half (status 200, unreadable JSON).
    pub truncate_every: u64,
    /// Every k-th request answers only after `slow_delay`.
    pub slow_every: u64,
    pub slow_delay: Duration,
    /// Every request waits this long first.
    pub latency: Duration,
    /// Every request fails with 500 (an endpoint that is down).
    pub fail_all: bool,
    /// Requests per minute the server accepts (a sliding 60-second window; 0: no limit);
    /// over it, 429 with `Retry-After` until the oldest request in the window leaves it.
    pub rpm_limit: u32,
}

#[derive(Debug, Clone, Default)]
pub struct ServerConfig {
    /// When set, requests must carry `Authorization: Bearer <key>` (else 401).
    pub api_key: Option<String>,
    pub faults: Faults,
    /// The model name reported back when a request names none.
    pub model: String,
}

/// What the server has seen.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub ok: AtomicU64,
    pub rate_limited: AtomicU64,
    pub server_errors: AtomicU64,
    pub truncated: AtomicU64,
    pub slow: AtomicU64,
    pub unauthorized: AtomicU64,
    pub bad_requests: AtomicU64,
    /// Batch API batches created.
    pub batches: AtomicU64,
}

struct Inner {
    config: ServerConfig,
    stats: Arc<Stats>,
    batches: batches::Store,
    /// Arrival times of the accepted requests of the last minute (`rpm_limit`).
    window: std::sync::Mutex<std::collections::VecDeque<std::time::Instant>>,
}

impl Inner {
    /// Admits a request under `rpm_limit`, or says how long until one would be admitted.
    fn admit(&self) -> Result<(), Duration> {
        let limit = self.config.faults.rpm_limit as usize;
        if limit == 0 {
            return Ok(());
        }
        let now = std::time::Instant::now();
        let minute = Duration::from_secs(60);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        while w.front().is_some_and(|t| now.duration_since(*t) >= minute) {
            w.pop_front();
        }
        if w.len() >= limit {
            let oldest = w.front().copied().unwrap_or(now);
            return Err(minute.saturating_sub(now.duration_since(oldest)));
        }
        w.push_back(now);
        Ok(())
    }
}

/// A running server: its base URL (…/v1) and counters.
pub struct VisionServer {
    pub addr: SocketAddr,
    pub stats: Arc<Stats>,
    task: tokio::task::JoinHandle<()>,
}

impl VisionServer {
    /// Binds 127.0.0.1 on a free port and serves until dropped.
    pub async fn start(config: ServerConfig) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        Self::serve(listener, config)
    }

    pub fn serve(listener: tokio::net::TcpListener, config: ServerConfig) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let stats = Arc::new(Stats::default());
        let app = router(config, stats.clone());
        let task = tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "vision server stopped");
            }
        });
        Ok(Self { addr, stats, task })
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for VisionServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn router(config: ServerConfig, stats: Arc<Stats>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(completions))
        .route("/v1/models", get(models))
        .merge(batches::routes())
        .with_state(Arc::new(Inner {
            config,
            stats,
            batches: Default::default(),
            window: Default::default(),
        }))
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
}

fn openai_error(status: StatusCode, kind: &str, message: &str) -> Response {
    (
        status,
        Json(serde_json::json!({"error": {"message": message, "type": kind, "code": null}})),
    )
        .into_response()
}

async fn models(State(s): State<Arc<Inner>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({"object": "list", "data": [
        {"id": s.config.model, "object": "model", "owned_by": "atelier"}]}))
}

fn every(k: u64, n: u64) -> bool {
    k > 0 && n.is_multiple_of(k)
}

async fn completions(
    State(s): State<Arc<Inner>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let stats = &s.stats;
    let n = stats.requests.fetch_add(1, Ordering::Relaxed) + 1;
    let f = &s.config.faults;
    if !f.latency.is_zero() {
        tokio::time::sleep(f.latency).await;
    }
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    let over = s.admit().err();
    if over.is_some() || every(f.rate_limit_every, n) {
        let retry_after_s = over.map_or(f.retry_after_s, |d| d.as_secs_f64());
        stats.rate_limited.fetch_add(1, Ordering::Relaxed);
        let mut r = openai_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "Rate limit reached for requests per min. Please try again later.",
        );
        let h = r.headers_mut();
        if let Ok(v) = format!("{}", retry_after_s.ceil() as u64).parse() {
            h.insert("retry-after", v);
        }
        if let Ok(v) = format!("{}", (retry_after_s * 1000.0) as u64).parse() {
            h.insert("retry-after-ms", v);
        }
        return r;
    }
    if f.fail_all || every(f.server_error_every, n) {
        stats.server_errors.fetch_add(1, Ordering::Relaxed);
        return openai_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "The server had an error while processing your request.",
        );
    }
    if every(f.slow_every, n) {
        stats.slow.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(f.slow_delay).await;
    }
    let req: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return openai_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                &format!("We could not parse the JSON body of your request: {e}"),
            );
        }
    };
    let body = match completion(&s, n, &req) {
        Ok(b) => b,
        Err(m) => {
            stats.bad_requests.fetch_add(1, Ordering::Relaxed);
            return openai_error(StatusCode::BAD_REQUEST, "invalid_request_error", &m);
        }
    };
    let mut bytes = serde_json::to_vec(&body).unwrap_or_default();
    if every(f.truncate_every, n) {
        stats.truncated.fetch_add(1, Ordering::Relaxed);
        bytes.truncate(bytes.len() / 2);
    } else {
        stats.ok.fetch_add(1, Ordering::Relaxed);
    }
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        bytes,
    )
        .into_response()
}

/// A 401 when the server wants a key and the request does not carry it.
fn authorized(s: &Inner, headers: &HeaderMap) -> Option<Response> {
    let key = s.config.api_key.as_ref()?;
    let ok = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {key}"));
    if ok {
        return None;
    }
    s.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
    Some(openai_error(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "Incorrect API key provided.",
    ))
}

/// The chat completion the server answers `req` (request number `n`) with.
fn completion(s: &Inner, n: u64, req: &serde_json::Value) -> Result<serde_json::Value, String> {
    let (prompt, image) = parse_request(req)?;
    let caption = crate::scene::describe(&image.to_rgb8());
    let max_tokens = req
        .get("max_tokens")
        .or_else(|| req.get("max_completion_tokens"))
        .and_then(|v| v.as_u64())
        .unwrap_or(u64::MAX);
    // One token per word, as a stand-in for a tokenizer.
    let words: Vec<&str> = caption.split_whitespace().collect();
    let (text, finish) = if words.len() as u64 > max_tokens {
        (words[..max_tokens as usize].join(" "), "length")
    } else {
        (caption.clone(), "stop")
    };
    let completion_tokens = text.split_whitespace().count() as u64;
    let prompt_tokens = 85 + prompt.split_whitespace().count() as u64;
    let model = req
        .get("model")
        .and_then(|m| m.as_str())
        .unwrap_or(&s.config.model)
        .to_owned();
    Ok(serde_json::json!({
        "id": format!("chatcmpl-atelier-{n}"),
        "object": "chat.completion",
        "created": chrono::Utc::now().timestamp(),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }))
}

/// The text prompt and the decoded image of a chat-completions vision request.
fn parse_request(req: &serde_json::Value) -> Result<(String, image::DynamicImage), String> {
    let messages = req
        .get("messages")
        .and_then(|m| m.as_array())
        .ok_or("'messages' is a required property")?;
    let mut prompt = String::new();
    let mut url = None;
    for m in messages {
        match m.get("content") {
            Some(serde_json::Value::String(s)) => prompt.push_str(s),
            Some(serde_json::Value::Array(parts)) => {
                for p in parts {
                    match p.get("type").and_then(|t| t.as_str()) {
                        Some("text") => {
                            prompt.push_str(p.get("text").and_then(|t| t.as_str()).unwrap_or(""))
                        }
                        Some("image_url") => {
                            url = p
                                .get("image_url")
                                .and_then(|u| u.get("url"))
                                .and_then(|u| u.as_str())
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    let url = url.ok_or("this model needs an image: no image_url part in the messages")?;
    let data = url
        .strip_prefix("data:")
        .and_then(|u| u.split_once(";base64,"))
        .map(|(_, d)| d)
        .ok_or("only base64 data URLs are supported here")?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| format!("invalid base64 image data: {e}"))?;
    let img = atelier_decode::decode(&bytes, &atelier_decode::Limits::default())
        .map_err(|e| format!("You uploaded an unsupported image. {e}"))?
        .into_image();
    Ok((prompt, img))
}
