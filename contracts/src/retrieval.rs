//! The retrieval side: `index` jobs (embed a dataset version's kept rows into search spaces),
//! queries over NATS request/reply ([`SearchRequest`] on [`RETRIEVAL_QUERY`](crate::subjects::RETRIEVAL_QUERY)),
//! and `curate` jobs (a new dataset version chosen by semantic queries, keywords and metadata).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::dataset::{check_dataset_name, DatasetRow, Tier, VersionCounts};
use crate::{ArtifactRef, JobId};

/// An embedding space. `clip_image` holds CLIP image embeddings (text→image and image→image
/// queries), `clip_text` CLIP text embeddings of the captions (image→text), `caption` MiniLM
/// sentence embeddings of the captions (caption→caption, near-duplicate captions).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
    ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    ClipImage,
    ClipText,
    Caption,
}

impl Space {
    pub const ALL: [Space; 3] = [Space::ClipImage, Space::ClipText, Space::Caption];
    pub fn name(self) -> &'static str {
        match self {
            Space::ClipImage => "clip_image",
            Space::ClipText => "clip_text",
            Space::Caption => "caption",
        }
    }
    pub fn parse(s: &str) -> Option<Space> {
        Space::ALL.into_iter().find(|x| x.name() == s)
    }
    /// Whether the space embeds captions (text) rather than pixels.
    pub fn is_text(self) -> bool {
        !matches!(self, Space::ClipImage)
    }
}

impl std::fmt::Display for Space {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Embed a dataset version's kept (accepted and flagged) rows into search spaces. Incremental:
/// rows already in the dataset's index keep their embeddings, rows gone from the version leave it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct IndexSpec {
    pub dataset: String,
    /// Default: the latest version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Default: every space the worker has a model for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub spaces: Vec<Space>,
}

impl IndexSpec {
    pub fn check(&self) -> Result<(), String> {
        check_dataset_name(&self.dataset)
    }
}

/// HNSW parameters of a dataset's indexes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct AnnParamsRecord {
    pub m: u32,
    pub ef_construction: u32,
    pub ef_search: u32,
}

/// One space of a dataset's index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct SpaceIndex {
    /// The embedding model (folder name and the sha256 prefix of its weights).
    pub model: String,
    pub dim: u32,
    pub count: u64,
    /// The HNSW graph with its vectors (atelier-ann's `ATLHNSW2` bytes, half floats; the older
    /// `ATLHNSW1`, with `f32` vectors, is read too), content-addressed. A graph in another format
    /// (older releases stored USearch's) is rebuilt from `segments`.
    pub graph: ArtifactRef,
    /// Embedding segments (`ATLVEC1` files: key, vector per record), oldest first; a later
    /// segment's vector for a key wins. A record's key is the first 8 bytes of its sha256, big-endian.
    pub segments: Vec<ArtifactRef>,
}

/// A dataset's index: the value under `<dataset>` in KV bucket `atelier_indexes`, replaced by
/// compare-and-set. Every file it names is content-addressed, so a replica loads it as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct IndexManifest {
    pub schema_version: u32,
    pub dataset: String,
    /// The dataset version whose kept rows are indexed.
    pub version: u32,
    pub updated_at: DateTime<Utc>,
    pub job: JobId,
    pub params: AnnParamsRecord,
    /// The indexed rows (JSONL of [`DatasetRow`]), for filters and result metadata.
    pub rows: ArtifactRef,
    pub spaces: BTreeMap<Space, SpaceIndex>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct SpaceCounts {
    pub count: u64,
    /// Records embedded by this job (new to the index).
    pub embedded: u64,
    /// Records removed because the version no longer keeps them.
    pub removed: u64,
    /// Records whose image or caption could not be embedded (left out of this space).
    pub skipped: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct IndexOutput {
    pub dataset: String,
    pub version: u32,
    pub spaces: BTreeMap<Space, SpaceCounts>,
}

/// Metadata predicates, shared by search and curation. Every given predicate must hold.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RowFilter {
    /// The row carries every one of these tags.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The row's tier is one of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tier: Vec<Tier>,
    /// The row's source is one of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub source: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_width: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_height: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_height: Option<u32>,
}

impl RowFilter {
    pub fn is_empty(&self) -> bool {
        *self == RowFilter::default()
    }
    pub fn check(&self) -> Result<(), String> {
        for (lo, hi, what) in [
            (self.min_width, self.max_width, "width"),
            (self.min_height, self.max_height, "height"),
        ] {
            if let (Some(lo), Some(hi)) = (lo, hi) {
                if lo > hi {
                    return Err(format!("min_{what} {lo} is above max_{what} {hi}"));
                }
            }
        }
        Ok(())
    }
    pub fn matches(&self, r: &DatasetRow) -> bool {
        let within = |v: Option<u32>, lo: Option<u32>, hi: Option<u32>| {
            lo.is_none_or(|lo| v.is_some_and(|v| v >= lo))
                && hi.is_none_or(|hi| v.is_some_and(|v| v <= hi))
        };
        self.tags.iter().all(|t| r.tags.contains(t))
            && (self.tier.is_empty() || r.tier.is_some_and(|t| self.tier.contains(&t)))
            && (self.source.is_empty()
                || r.source.as_ref().is_some_and(|s| self.source.contains(s)))
            && within(r.width, self.min_width, self.max_width)
            && within(r.height, self.min_height, self.max_height)
    }
}

/// Most results one query returns.
pub const MAX_K: u32 = 1000;

/// A query: exactly one of `text`, `image_id` (a record of the dataset, by its 16-hex id or its
/// sha256) or `image_key` (an uploaded image's artifact key).
///
/// The space defaults to `clip_image` (text→image, image→image); `clip_text` searches captions
/// by CLIP (image→text), `caption` by MiniLM (caption→caption: the query text, or the caption of
/// record `image_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    pub dataset: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space: Option<Space>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_key: Option<String>,
    #[serde(default = "default_k")]
    pub k: u32,
    #[serde(default, skip_serializing_if = "RowFilter::is_empty")]
    pub filter: RowFilter,
}

fn default_k() -> u32 {
    10
}

impl SearchRequest {
    pub fn check(&self) -> Result<(), String> {
        check_dataset_name(&self.dataset)?;
        if !(1..=MAX_K).contains(&self.k) {
            return Err(format!("k {}: must be 1 to {MAX_K}", self.k));
        }
        let given = [
            self.text.is_some(),
            self.image_id.is_some(),
            self.image_key.is_some(),
        ]
        .iter()
        .filter(|g| **g)
        .count();
        if given != 1 {
            return Err(
                "give exactly one of text, image_id or image (an uploaded image)".to_owned(),
            );
        }
        if let Some(t) = &self.text {
            if t.trim().is_empty() {
                return Err("text: the query is empty".to_owned());
            }
        }
        if self.image_key.is_some() && self.space == Some(Space::Caption) {
            return Err(
                "space caption compares captions: query it with text or an image_id".to_owned(),
            );
        }
        self.filter.check()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct SearchHit {
    pub image_id: String,
    pub sha256: String,
    pub image_key: String,
    /// Cosine similarity of the query and the record in the space searched.
    pub score: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct SearchResponse {
    pub dataset: String,
    /// The dataset version the index holds.
    pub version: u32,
    pub space: Space,
    pub results: Vec<SearchHit>,
}

/// The reply on `atelier.v1.retrieval.query`: `{"ok": ...}` or `{"error": {"code", "message"}}`.
/// Codes: `invalid_query`, `not_found` (dataset, index or space), `record_not_found` (an
/// `image_id` the index does not hold: not indexed yet, or of a later version), `bad_image`,
/// `model_unavailable` (the worker lacks the space's model, or has another than the index's),
/// `unavailable` (the store is down).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SearchReply {
    Ok(SearchResponse),
    Error(crate::ErrorInfo),
}

/// A semantic query of a curation: rows scoring at least `min_score` (cosine) in `space`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SemanticQuery {
    pub text: String,
    #[serde(default = "default_space")]
    pub space: Space,
    pub min_score: f32,
}

fn default_space() -> Space {
    Space::ClipImage
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Combine {
    /// A row is kept when any query matches it.
    #[default]
    Any,
    /// A row is kept when every query matches it.
    All,
}

/// Caption keywords (case-insensitive whole words or phrases).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Keywords {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub all: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub any: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub none: Vec<String>,
}

/// Near-duplicate removal: of rows whose embeddings in `space` have cosine ≥ `threshold`, the
/// first by sha256 stays.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Dedup {
    #[serde(default = "default_space")]
    pub space: Space,
    pub threshold: f32,
}

/// Most semantic queries one curation takes.
pub const MAX_CURATION_QUERIES: usize = 32;

/// Choose rows of a dataset version into a new, immutable version. The same spec on the same
/// version (and the same index) gives the same rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CurateSpec {
    pub dataset: String,
    /// The version curated from (the parent). Default: the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queries: Vec<SemanticQuery>,
    #[serde(default)]
    pub combine: Combine,
    #[serde(default)]
    pub keywords: Keywords,
    #[serde(default)]
    pub filter: RowFilter,
    /// Keep flagged rows too (default: accepted rows only).
    #[serde(default)]
    pub include_flagged: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dedup: Option<Dedup>,
    /// At most this many rows, drawn by `seed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(default = "default_seed")]
    pub seed: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn default_seed() -> String {
    "atelier".to_owned()
}

impl CurateSpec {
    pub fn check(&self) -> Result<(), String> {
        check_dataset_name(&self.dataset)?;
        if self.queries.len() > MAX_CURATION_QUERIES {
            return Err(format!(
                "queries: {} given, at most {MAX_CURATION_QUERIES}",
                self.queries.len()
            ));
        }
        for (i, q) in self.queries.iter().enumerate() {
            if q.text.trim().is_empty() {
                return Err(format!("queries[{i}].text is empty"));
            }
            if !(-1.0..=1.0).contains(&q.min_score) {
                return Err(format!(
                    "queries[{i}].min_score {}: a cosine, -1 to 1",
                    q.min_score
                ));
            }
        }
        for (what, words) in [
            ("all", &self.keywords.all),
            ("any", &self.keywords.any),
            ("none", &self.keywords.none),
        ] {
            if words.iter().any(|w| w.trim().is_empty()) {
                return Err(format!("keywords.{what} holds an empty keyword"));
            }
        }
        if let Some(d) = &self.dedup {
            if !(d.threshold > 0.0 && d.threshold <= 1.0) {
                return Err(format!(
                    "dedup.threshold {}: a cosine above 0, at most 1",
                    d.threshold
                ));
            }
        }
        if self.limit == Some(0) {
            return Err("limit 0 keeps nothing; leave it out for no limit".to_owned());
        }
        self.filter.check()
    }
}

/// How a curated version was made: stored in its manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct Curation {
    pub spec: CurateSpec,
    /// The index graphs the semantic queries and dedup used, by space (artifact keys).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub graphs: BTreeMap<Space, String>,
    /// Rows dropped as near-duplicates.
    pub duplicates_removed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct CurateOutput {
    pub dataset: String,
    pub parent: u32,
    /// The new version; absent when nothing matched (no empty version is written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<ArtifactRef>,
    /// Rows that passed every predicate, before dedup and limit.
    pub matched: u64,
    pub duplicates_removed: u64,
    pub counts: VersionCounts,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_specs_are_checked() {
        let q: SearchRequest = serde_json::from_str(r#"{"dataset":"d","text":"a cat"}"#).unwrap();
        assert_eq!(q.k, 10);
        assert!(q.check().is_ok());
        let bad: SearchRequest =
            serde_json::from_str(r#"{"dataset":"d","text":"a","k":0}"#).unwrap();
        assert!(bad.check().unwrap_err().contains("k 0"));
        let bad: SearchRequest = serde_json::from_str(r#"{"dataset":"d","text":"  "}"#).unwrap();
        assert!(bad.check().unwrap_err().contains("empty"));
        let bad: SearchRequest = serde_json::from_str(r#"{"dataset":"d"}"#).unwrap();
        assert!(bad.check().unwrap_err().contains("exactly one"));
        assert!(
            serde_json::from_str::<SearchRequest>(r#"{"dataset":"d","text":"a","colour":1}"#)
                .is_err()
        );
        let spec: CurateSpec = serde_json::from_str(
            r#"{"dataset":"d","queries":[{"text":"red","min_score":0.2}],"dedup":{"threshold":0.95}}"#,
        )
        .unwrap();
        assert!(spec.check().is_ok());
        assert_eq!(spec.queries[0].space, Space::ClipImage);
        let err = serde_json::from_str::<CurateSpec>(r#"{"dataset":"d","keywrods":{}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("keywrods"), "{err}");
        let bad: CurateSpec =
            serde_json::from_str(r#"{"dataset":"d","dedup":{"threshold":1.5}}"#).unwrap();
        assert!(bad.check().unwrap_err().contains("dedup.threshold"));
        let bad: CurateSpec =
            serde_json::from_str(r#"{"dataset":"d","filter":{"min_width":9,"max_width":3}}"#)
                .unwrap();
        assert!(bad.check().unwrap_err().contains("min_width"));
    }

    #[test]
    fn filters_match_rows() {
        let row: DatasetRow = serde_json::from_value(serde_json::json!({
            "image_id": "00", "image_key": "k", "sha256": "00", "width": 64, "height": 48,
            "words": 3, "signals": [], "decision": "accept", "tier": "gold", "split": "train",
            "tags": ["red", "cat"], "source": "upload"
        }))
        .unwrap();
        let f = |v: serde_json::Value| serde_json::from_value::<RowFilter>(v).unwrap();
        assert!(f(serde_json::json!({})).matches(&row));
        assert!(f(serde_json::json!({"tags": ["red"], "tier": ["gold", "silver"]})).matches(&row));
        assert!(!f(serde_json::json!({"tags": ["red", "dog"]})).matches(&row));
        assert!(!f(serde_json::json!({"tier": ["bronze"]})).matches(&row));
        assert!(f(serde_json::json!({"min_width": 64, "max_height": 48})).matches(&row));
        assert!(!f(serde_json::json!({"min_width": 65})).matches(&row));
        assert!(!f(serde_json::json!({"source": ["web"]})).matches(&row));
    }
}
