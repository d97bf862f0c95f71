//! JSON Schemas of every message, for `contracts/schemas/` (kept current by a test).

use schemars::{schema_for, Schema};

use crate::{dataset, http, images, jobs, retrieval};

/// `(file stem, schema)` for every message type, in a stable order.
pub fn all() -> Vec<(&'static str, Schema)> {
    vec![
        ("JobRequest", schema_for!(jobs::JobRequest)),
        ("JobProgress", schema_for!(jobs::JobProgress)),
        ("JobDone", schema_for!(jobs::JobDone)),
        ("JobFailed", schema_for!(jobs::JobFailed)),
        ("DeadLetter", schema_for!(jobs::DeadLetter)),
        ("JobRecord", schema_for!(jobs::JobRecord)),
        ("ImagesIngested", schema_for!(images::ImagesIngested)),
        ("ImageRecord", schema_for!(images::ImageRecord)),
        ("CaptionRecord", schema_for!(dataset::CaptionRecord)),
        ("ModelVerdict", schema_for!(dataset::ModelVerdict)),
        ("DatasetManifest", schema_for!(dataset::DatasetManifest)),
        ("DatasetRow", schema_for!(dataset::DatasetRow)),
        ("IndexManifest", schema_for!(retrieval::IndexManifest)),
        ("SearchRequest", schema_for!(retrieval::SearchRequest)),
        ("SearchReply", schema_for!(retrieval::SearchReply)),
        ("SubmitJob", schema_for!(http::SubmitJob)),
        ("ApiErrorBody", schema_for!(http::ApiErrorBody)),
        ("UploadResponse", schema_for!(http::UploadResponse)),
    ]
}

/// Pretty JSON with a trailing newline, as written to `contracts/schemas/<stem>.json`.
pub fn render(schema: &Schema) -> String {
    let mut s = serde_json::to_string_pretty(schema).expect("a schema is plain JSON");
    s.push('\n');
    s
}
