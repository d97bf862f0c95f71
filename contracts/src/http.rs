//! Bodies of the gateway's HTTP API (`/v1/...`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::dataset::DatasetManifest;
use crate::JobSpec;

/// `POST /v1/jobs` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitJob {
    /// Must equal the gateway's schema version (currently 1).
    pub schema_version: u32,
    pub spec: JobSpec,
}

/// Every non-2xx answer of the gateway: `{"error":{"code":"…","message":"…"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ApiErrorBody {
    pub error: crate::ErrorInfo,
}

/// `POST /v1/uploads` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct UploadResponse {
    pub artifact: crate::ArtifactRef,
    /// False when the same bytes were already stored (nothing was written).
    pub created: bool,
}

/// Images per `POST /v1/images` (one bus message each, under NATS's 1 MB payload limit).
pub const MAX_IMAGES_PER_ANNOUNCE: usize = 1000;

/// One dataset in `GET /v1/datasets`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DatasetSummary {
    pub dataset: String,
    /// Version numbers, oldest first.
    pub versions: Vec<u32>,
    pub latest: DatasetManifest,
}

/// `GET /v1/jobs` answer: newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct JobPage {
    pub jobs: Vec<crate::JobRecord>,
    /// Pass as `cursor` for the next (older) page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<crate::JobId>,
}

/// A job's webhook: where its end is announced, and every delivery attempt
/// (`GET /v1/jobs/{id}/webhook`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct WebhookLog {
    pub url: String,
    /// `pending` until a delivery succeeds (`delivered`) or the attempts run out (`gave_up`).
    pub state: WebhookState,
    #[serde(default)]
    pub attempts: Vec<WebhookAttempt>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum WebhookState {
    Pending,
    Delivered,
    GaveUp,
}

/// One POST to a webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct WebhookAttempt {
    pub at: chrono::DateTime<chrono::Utc>,
    /// `done` or `failed`.
    pub event: String,
    /// The receiver's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why the attempt failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
