//! Images announced to atelier, by upload or by an external system.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Published by external systems on `atelier.v1.images.ingested` after they put images into the
/// bucket atelier reads. Example:
///
/// ```json
/// {"schema_version":1,"dataset":"cats","images":[
///   {"key":"incoming/cat-001.jpg","source":"s3://cam/cat-001.jpg","license":"CC-BY-4.0"}]}
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ImagesIngested {
    pub schema_version: u32,
    /// Dataset the images belong to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    pub images: Vec<IngestedImage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct IngestedImage {
    /// Object-store key where the image bytes are.
    pub key: String,
    /// SHA-256 claimed by the publisher; verified against the bytes when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Where the image came from (path or URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    /// Any user fields, kept verbatim.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// The value stored under the image's sha256 in the `atelier_images` KV bucket. The same bytes
/// announced twice give one record with two sources.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ImageRecord {
    pub schema_version: u32,
    pub sha256: String,
    /// Content-addressed key of the bytes.
    pub key: String,
    pub size: u64,
    pub content_type: String,
    pub datasets: Vec<String>,
    pub sources: Vec<ImageSource>,
    /// `jpeg`, `png`, `webp`, `bmp`, `tiff` or `gif`; absent when the bytes are not a usable
    /// image (then `flag` says why).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Width after the EXIF orientation is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    /// Height after the EXIF orientation is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// The EXIF orientation (1–8) that was applied; 1 when the image had none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exif_orientation: Option<u8>,
    /// 64-bit DCT perceptual hash as 16 hex digits; near-duplicates are a small Hamming distance apart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phash: Option<String>,
    /// Set when the record is flagged, with the reasons: the claimed sha256 did not match the bytes,
    /// the bytes are corrupt or truncated, not an image, or a decompression bomb.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
    pub first_seen: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ImageSource {
    /// Key the image was announced under.
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}
