//! `Atelier-Priority: high | normal | low` on the routes that create jobs: the queue the job
//! waits in (see [`Priority`]). Absent → `normal`; anything else → 422.

use axum::extract::Request;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use atelier_contracts::Priority;

use crate::error::ApiError;

pub const HEADER: &str = "atelier-priority";

tokio::task_local! {
    static PRIORITY: Priority;
}

/// The priority the request being handled asked for.
pub fn current() -> Priority {
    PRIORITY.try_with(|p| *p).unwrap_or_default()
}

pub async fn middleware(req: Request, next: Next) -> Response {
    let Some(value) = req.headers().get(HEADER) else {
        return next.run(req).await;
    };
    let parsed = value
        .to_str()
        .ok()
        .map(|v| v.trim().to_ascii_lowercase())
        .and_then(|v| Priority::parse(&v));
    match parsed {
        Some(p) => PRIORITY.scope(p, next.run(req)).await,
        None => ApiError::unprocessable(
            "invalid_priority",
            format!(
                "Atelier-Priority: {:?} is not one of high, normal, low",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )
        .into_response(),
    }
}
