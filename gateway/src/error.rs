//! The gateway's one error type. Every non-2xx answer is `{"error":{"code","message"}}`, made here.

use atelier_contracts::http::ApiErrorBody;
use atelier_contracts::ErrorInfo;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn unprocessable(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, code, message)
    }
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
    pub fn too_large(limit: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }
}

/// An image the request carries that cannot be decoded within the limits: 413 for a limit
/// (bytes, pixels, the decode budget), 422 for bytes that are not an image.
pub fn decode_error(field: &str, e: &atelier_decode::DecodeError) -> ApiError {
    let status = if e.is_limit() {
        StatusCode::PAYLOAD_TOO_LARGE
    } else {
        StatusCode::UNPROCESSABLE_ENTITY
    };
    ApiError::new(status, e.code(), format!("{field}: {e}"))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, code = self.code, message = %self.message, "request failed");
        }
        let body = ApiErrorBody {
            error: ErrorInfo {
                code: self.code.into(),
                // The server's paths (a model folder, the local store) stay in the log.
                message: atelier_kit::redact::paths(&self.message),
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                resp.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

impl From<atelier_kit::store::StoreError> for ApiError {
    fn from(e: atelier_kit::store::StoreError) -> Self {
        use atelier_kit::store::StoreError as E;
        match &e {
            E::NotFound(_) => ApiError::not_found("artifact_not_found", e.to_string()),
            E::BadKey(_) => ApiError::bad_request("bad_artifact_key", e.to_string()),
            E::TooLarge { limit } => ApiError::too_large(*limit),
            E::Body(_) => ApiError::bad_request("bad_body", e.to_string()),
            E::Backend { op, attempts, .. } => {
                // The backend's own message can name server paths (a local store's directory):
                // logged here, summarised for the client.
                tracing::warn!(error = %e, "object store");
                ApiError::unavailable(format!(
                    "the object store did not answer ({op}, {attempts} attempt(s)); retry shortly"
                ))
                .with_retry_after(2)
            }
        }
    }
}

impl From<atelier_kit::jobstate::StateError> for ApiError {
    fn from(e: atelier_kit::jobstate::StateError) -> Self {
        use atelier_kit::jobstate::StateError as E;
        match &e {
            E::Missing(_) => ApiError::not_found("job_not_found", e.to_string()),
            _ => ApiError::unavailable(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_failures_do_not_show_server_paths() {
        let source = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: "Unable to open file /var/lib/atelier/objects/sha256/ab/cd: Permission denied"
                .into(),
        };
        let e = ApiError::from(atelier_kit::store::StoreError::Backend {
            op: "get",
            attempts: 3,
            elapsed: std::time::Duration::from_secs(1),
            source,
        });
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(!e.message.contains("/var/lib"), "{}", e.message);
        assert!(e.message.contains("get"), "{}", e.message);
    }
}
