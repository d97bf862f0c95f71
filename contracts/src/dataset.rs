//! The dataset side: caption jobs and the captions they store, quality policies, and immutable
//! dataset versions (a manifest plus a JSONL data file in the object store).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{ArtifactRef, JobId};

/// ShareGPT4V's captioning prompt, the default for the `openai` backend.
pub const SHAREGPT4V_PROMPT: &str = "Analyze the image in a comprehensive and detailed manner.";

/// A dataset name: 1–64 of `A-Z a-z 0-9 _ -` (it is part of KV keys and object keys).
pub fn check_dataset_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "dataset name {name:?} must be 1 to 64 characters of A-Z, a-z, 0-9, '_' and '-'"
        ))
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

// ---------------------------------------------------------------------------------------------
// Captions

/// Caption every usable image of a dataset (or the listed ones) with one backend. Images that
/// already have a caption from the same backend, model and prompt are skipped, so a re-run costs
/// nothing and a failed run resumes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CaptionSpec {
    pub dataset: String,
    /// Image sha256s to caption; empty means every usable image of the dataset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    #[serde(default)]
    pub backend: CaptionBackend,
    /// Images per shard. A request covering more becomes a run: shard jobs of this many images
    /// on the captioner's subject, taken by any number of replicas, and this job aggregating
    /// them. Default [`DEFAULT_SHARD_SIZE`]; 1 to [`MAX_SHARD_SIZE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_size: Option<u32>,
    /// Stops the run once it has spent this much (every caption already paid for is kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spend_cap: Option<SpendCap>,
    /// Set by a run on each of its shards; never by a client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardOf>,
}

pub const DEFAULT_SHARD_SIZE: u32 = 1000;
pub const MAX_SHARD_SIZE: u32 = 5000;

/// A run's spending limit: tokens (prompt + completion), or US dollars at the worker's price for
/// the model (`ATELIER_OPENAI_PRICES`). A run that reaches either ends `budget_exhausted`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SpendCap {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usd: Option<f64>,
}

/// Which run a shard belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ShardOf {
    pub run: JobId,
    pub index: u32,
    pub count: u32,
}

/// A rate budget shared by every replica calling one endpoint: two token buckets (requests and
/// tokens per minute) refilling continuously, and a pause the endpoint asked for (429 with
/// `Retry-After`). Times are Unix milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct RateBudget {
    pub requests: f64,
    pub tokens: f64,
    pub at_ms: i64,
    #[serde(default)]
    pub paused_until_ms: i64,
    /// Requests in flight: (lease id, expiry), each given back when its request ends or dropped
    /// when it expires (its replica died).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub leases: Vec<(u64, i64)>,
}

/// The Batch API batches a caption job created (`atelier_batches`, keyed by the job's id), so
/// an attempt after a restart follows them instead of creating (and paying for) them again.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct CaptionBatches {
    pub batches: Vec<SubmittedBatch>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct SubmittedBatch {
    /// The endpoint's batch id; empty while it is being created on `input_file_id` (a job that
    /// died then finds it by its file instead of creating another).
    pub id: String,
    pub input_file_id: String,
    /// The images it captions (sha256; each request's `custom_id`).
    pub images: Vec<String>,
    /// Its output has been read into caption records.
    #[serde(default)]
    pub read: bool,
}

/// A shard of a run that failed; its images are captioned by a re-run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ShardFailure {
    pub index: u32,
    pub job: JobId,
    pub error: crate::ErrorInfo,
}

/// What a run has spent so far, shared by its shards through the `atelier_spend` bucket
/// (key: the run's id).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct RunSpend {
    pub usage: TokenUsage,
    pub usd: f64,
    pub captioned: u64,
}

/// Which captioner, and its per-job settings. Endpoints, keys and rate budgets are the worker's
/// configuration (`--openai-base-url`, `ATELIER_OPENAI_API_KEY`, …), never a job's, so a job can
/// not send a worker's key elsewhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(tag = "backend", rename_all = "snake_case", deny_unknown_fields)]
pub enum CaptionBackend {
    /// An OpenAI-compatible chat-completions vision endpoint (GPT-4V/4o, vLLM, Ollama, LM Studio).
    Openai {
        /// The model name sent to the endpoint; the worker's default when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        /// Default: ShareGPT4V's "Analyze the image in a comprehensive and detailed manner."
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompt: Option<String>,
        #[serde(default = "default_max_tokens")]
        max_tokens: u32,
        #[serde(default = "default_temperature")]
        temperature: f32,
        /// Images are downscaled so their longer side is at most this before sending.
        #[serde(default = "default_image_max_side")]
        image_max_side: u32,
        /// Through the endpoint's Batch API (Files + Batches: half the price, results within
        /// 24 hours) instead of one request per image.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        batch: bool,
    },
    /// Local BLIP captioning (Hugging Face `BlipForConditionalGeneration` folders) on the worker.
    Blip {
        /// A model folder's name in the worker's BLIP directory (`--blip-models`).
        model: String,
        /// Text each caption continues (BLIP's conditional captioning, e.g. "a picture of");
        /// unconditional when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompt: Option<String>,
        #[serde(default = "default_blip_tokens")]
        max_tokens: u32,
        /// Images through the vision encoder at once.
        #[serde(default = "default_blip_batch")]
        batch_size: u32,
    },
}

fn default_blip_tokens() -> u32 {
    40
}
fn default_blip_batch() -> u32 {
    8
}

fn default_max_tokens() -> u32 {
    300
}
fn default_temperature() -> f32 {
    0.2
}
fn default_image_max_side() -> u32 {
    768
}

impl Default for CaptionBackend {
    fn default() -> Self {
        CaptionBackend::Openai {
            model: None,
            prompt: None,
            max_tokens: default_max_tokens(),
            temperature: default_temperature(),
            image_max_side: default_image_max_side(),
            batch: false,
        }
    }
}

impl CaptionSpec {
    /// Checks what can be checked without I/O.
    pub fn check(&self) -> Result<(), String> {
        check_dataset_name(&self.dataset)?;
        if let Some(n) = self.shard_size {
            if !(1..=MAX_SHARD_SIZE).contains(&n) {
                return Err(format!("shard_size {n}: must be 1 to {MAX_SHARD_SIZE}"));
            }
        }
        if let Some(cap) = &self.spend_cap {
            if cap.tokens.is_none() && cap.usd.is_none() {
                return Err("spend_cap: give tokens, usd or both".into());
            }
            if cap.usd.is_some_and(|u| !(u.is_finite() && u > 0.0)) {
                return Err("spend_cap.usd: must be a positive amount".into());
            }
            if cap.tokens == Some(0) {
                return Err("spend_cap.tokens: must be positive".into());
            }
            if matches!(self.backend, CaptionBackend::Blip { .. }) {
                return Err(
                    "spend_cap: only the openai backend spends; leave it out for blip".into(),
                );
            }
        }
        if let Some(bad) = self.images.iter().find(|s| !is_sha256_hex(s)) {
            return Err(format!(
                "images: {bad:?} is not a sha256 (64 lower-case hex digits)"
            ));
        }
        match &self.backend {
            CaptionBackend::Openai {
                prompt,
                max_tokens,
                temperature,
                image_max_side,
                ..
            } => {
                if prompt.as_deref().is_some_and(|p| p.trim().is_empty()) {
                    return Err("prompt: empty; leave it out for the default".into());
                }
                if !(1..=8192).contains(max_tokens) {
                    return Err(format!("max_tokens {max_tokens}: must be 1 to 8192"));
                }
                if !(0.0..=2.0).contains(temperature) {
                    return Err(format!("temperature {temperature}: must be 0 to 2"));
                }
                if !(32..=4096).contains(image_max_side) {
                    return Err(format!(
                        "image_max_side {image_max_side}: must be 32 to 4096"
                    ));
                }
            }
            CaptionBackend::Blip {
                model,
                prompt,
                max_tokens,
                batch_size,
            } => {
                if model.is_empty()
                    || model.len() > 200
                    || model.contains(['/', '\\', '\0'])
                    || model.starts_with('.')
                {
                    return Err(format!(
                        "model {model:?}: name a model folder in the worker's BLIP directory"
                    ));
                }
                if prompt.as_deref().is_some_and(|p| p.trim().is_empty()) {
                    return Err("prompt: empty; leave it out for unconditional captions".into());
                }
                if !(1..=512).contains(max_tokens) {
                    return Err(format!("max_tokens {max_tokens}: must be 1 to 512"));
                }
                if !(1..=64).contains(batch_size) {
                    return Err(format!("batch_size {batch_size}: must be 1 to 64"));
                }
            }
        }
        Ok(())
    }
}

/// Caption one image and answer the caption (A1111's `interrogate`): nothing is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InterrogateSpec {
    /// Artifact key of the image.
    pub image: String,
    pub backend: CaptionBackend,
}

impl InterrogateSpec {
    pub fn check(&self) -> Result<(), String> {
        crate::ArtifactKey::parse(&self.image)
            .map(drop)
            .map_err(|e| format!("image {:?}: {e}", self.image))
    }
}

/// The caption an `interrogate` job made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct InterrogateOutput {
    pub caption: String,
    pub source: CaptionSource,
    #[serde(default)]
    pub usage: TokenUsage,
}

/// Where a caption came from. Captions are unique per (image, backend, model, prompt).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct CaptionSource {
    pub backend: String,
    pub model: String,
    pub prompt: String,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
pub struct TokenUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl TokenUsage {
    pub fn add(&mut self, other: TokenUsage) {
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
    }
}

/// The value stored under `<image sha256>.<source id>` in the `atelier_captions` KV bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct CaptionRecord {
    pub schema_version: u32,
    pub image_sha256: String,
    /// 16 hex digits naming the (backend, model, prompt) triple.
    pub source_id: String,
    pub source: CaptionSource,
    pub caption: String,
    /// As the backend reported it: `stop`, `length` (cut at max_tokens), ….
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    pub usage: TokenUsage,
    pub job: JobId,
    pub created_at: DateTime<Utc>,
}

/// A model's verdict on an image (or an image and its caption), kept in KV `atelier_verdicts` so
/// that a later filter job with another policy does not run the model again. Keys name the model
/// and the content, never the dataset: `nsfw.<model id>.<image sha256>` for the NSFW detector,
/// `clip.<model id>.<sha256 of image sha256, NUL, caption>` for CLIP scores. A model id is 16 hex
/// digits of the sha256 of the model's files and of how its input is prepared, so a new model or
/// new preprocessing starts a fresh set of keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ModelVerdict {
    pub schema_version: u32,
    /// NSFW: the strongest explicit-class confidence (0 when none); CLIP: 100 · max(cos, 0).
    pub score: f32,
    /// NSFW: the explicit class behind `score`, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct CaptionFailure {
    pub image_sha256: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct CaptionOutput {
    pub dataset: String,
    pub source_id: String,
    pub source: CaptionSource,
    /// Usable images considered.
    pub images: u64,
    /// Captioned by this job.
    pub captioned: u64,
    /// Already had a caption from this source (skipped, at no cost).
    pub already_captioned: u64,
    /// Images whose record is flagged (corrupt, bomb, …) and so were not sent.
    pub unusable: u64,
    /// Images the backend failed on after retries; a re-run tries them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<CaptionFailure>,
    /// Tokens spent by this job.
    pub usage: TokenUsage,
    /// Images the backend failed on in all (`failed` lists at most [`MAX_LISTED_FAILURES`]).
    #[serde(default)]
    pub failed_total: u64,
    /// Money spent, at the worker's price for the model, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_usd: Option<f64>,
    /// A run's shard jobs, in order (empty when the job captioned its images itself).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<JobId>,
    /// Shards that failed; their images are captioned by a re-run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_shards: Vec<ShardFailure>,
}

/// The most failures a caption output lists (a record must fit in one bus message).
pub const MAX_LISTED_FAILURES: usize = 1000;

// ---------------------------------------------------------------------------------------------
// Exports

/// A dataset version's export format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// Hugging Face image folders: `<split>/<shard>/metadata.jsonl` + images
    /// (`load_dataset("imagefolder")`).
    Jsonl,
    /// WebDataset tar shards as img2dataset writes them: `<split>/<shard>.tar` with one image
    /// key for every sample (key.jpg or key.png), key.txt, key.json.
    Webdataset,
    /// LLaVA / ShareGPT4V conversation JSON per split and shard, images under `images/`.
    Llava,
    /// Parquet shards as the Hub lays them out (`data/<split>-00000-of-0000N.parquet`), images
    /// embedded as `{bytes, path}` and marked as the `Image` feature.
    Parquet,
}

impl ExportFormat {
    pub fn name(self) -> &'static str {
        match self {
            ExportFormat::Jsonl => "jsonl",
            ExportFormat::Webdataset => "webdataset",
            ExportFormat::Llava => "llava",
            ExportFormat::Parquet => "parquet",
        }
    }
}

/// Export a dataset version into the object store, under
/// `exports/<dataset>/v<version>/<format>-<options hash>/`, shard by shard: the same request run
/// again (or a redelivered job) resumes, keeping the shards already written. The export ends with
/// the Hub dataset card (`README.md`) and `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    pub dataset: String,
    /// Default: the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    pub format: ExportFormat,
    /// Kept rows of these tiers (default all three).
    #[serde(default = "all_tiers")]
    pub tiers: Vec<Tier>,
    /// Rows per shard (default 1,000; 1 to 100,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_size: Option<u32>,
}

fn all_tiers() -> Vec<Tier> {
    vec![Tier::Gold, Tier::Silver, Tier::Bronze]
}

pub const DEFAULT_EXPORT_SHARD_SIZE: u32 = 1000;

impl ExportSpec {
    pub fn check(&self) -> Result<(), String> {
        check_dataset_name(&self.dataset)?;
        if self.tiers.is_empty() {
            return Err("tiers: name at least one of gold, silver, bronze".into());
        }
        if let Some(n) = self.shard_size.filter(|n| !(1..=100_000).contains(n)) {
            return Err(format!("shard_size {n}: must be 1 to 100000"));
        }
        Ok(())
    }
}

/// Where an export job wrote a version, and what it found already written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ExportOutput {
    pub dataset: String,
    pub version: u32,
    pub format: ExportFormat,
    /// Object-store prefix of the export's files (`GET /v1/artifacts/<prefix>/README.md`).
    pub prefix: String,
    /// Rows per split.
    pub splits: BTreeMap<String, u64>,
    pub files: u64,
    pub shards_written: u64,
    /// Shards found complete from an earlier run (resumed).
    pub shards_skipped: u64,
    /// WebDataset images re-encoded as PNG so every sample has one image key.
    pub transcoded: u64,
    pub bytes_written: u64,
}

// ---------------------------------------------------------------------------------------------
// Quality policy

/// What a failed check does to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Reject,
    Flag,
    Ignore,
}

/// Thresholds and the severity of each signal; read from a TOML file by `atelier filter
/// --policy FILE`. Every field has a default, so `{}` is a valid policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct QualityPolicy {
    /// Images whose shorter side is below this fail `small`.
    pub min_side: u32,
    /// Images whose long/short side ratio is above this fail `aspect`.
    pub max_aspect: f32,
    /// Perceptual hashes at most this many bits apart are near-duplicates; the first by
    /// sha256 order is kept, the others fail `duplicate`. Negative disables the check.
    pub duplicate_max_bits: i32,
    /// Captions with fewer words fail `short`.
    pub min_words: u32,
    /// Captions with more words fail `long`; 0 disables.
    pub max_words: u32,
    /// A caption whose most repeated word 3-gram covers more than this fraction of its 3-grams,
    /// or that repeats a sentence, fails `repetition`.
    pub max_repeated_fraction: f32,
    /// Allowed caption languages (ISO 639-3, e.g. `eng`); empty allows any.
    pub languages: Vec<String>,
    /// Word counts more than this many standard deviations from the dataset's mean fail
    /// `length_outlier`; 0 disables.
    pub length_outlier_z: f32,
    /// Accepted records with at least this many caption words and no flags are `gold`.
    pub gold_min_words: u32,
    /// An explicit detection at or above this confidence fails `nsfw` (when the worker has the
    /// NSFW detector).
    pub nsfw_threshold: f32,
    /// Image–caption pairs whose CLIP score (100 · max(cos, 0)) is below this fail `clip_score`
    /// (when the worker has a CLIP model); 0 disables.
    pub min_clip_score: f32,
    /// Severity per signal name (`undecodable`, `small`, `aspect`, `duplicate`, `no_caption`,
    /// `empty`, `short`, `long`, `truncated`, `repetition`, `refusal`, `language`,
    /// `length_outlier`, `nsfw`, `clip_score`); signals not listed use their default.
    pub severity: BTreeMap<String, Severity>,
}

impl Default for QualityPolicy {
    fn default() -> Self {
        Self {
            min_side: 64,
            max_aspect: 3.0,
            duplicate_max_bits: 4,
            min_words: 3,
            max_words: 0,
            max_repeated_fraction: 0.3,
            languages: vec!["eng".into()],
            length_outlier_z: 4.0,
            gold_min_words: 8,
            nsfw_threshold: 0.5,
            min_clip_score: 18.0,
            severity: BTreeMap::new(),
        }
    }
}

/// Every signal the quality filter computes, with its default severity.
pub const SIGNALS: &[(&str, Severity)] = &[
    ("undecodable", Severity::Reject),
    ("small", Severity::Reject),
    ("aspect", Severity::Flag),
    ("duplicate", Severity::Reject),
    ("no_caption", Severity::Reject),
    ("empty", Severity::Reject),
    ("short", Severity::Flag),
    ("long", Severity::Flag),
    ("truncated", Severity::Flag),
    ("repetition", Severity::Reject),
    ("refusal", Severity::Reject),
    ("language", Severity::Flag),
    ("length_outlier", Severity::Flag),
    ("nsfw", Severity::Reject),
    ("clip_score", Severity::Flag),
];

impl QualityPolicy {
    pub fn severity_of(&self, signal: &str) -> Severity {
        self.severity.get(signal).copied().unwrap_or_else(|| {
            SIGNALS
                .iter()
                .find(|(n, _)| *n == signal)
                .map(|(_, s)| *s)
                .unwrap_or(Severity::Flag)
        })
    }

    pub fn check(&self) -> Result<(), String> {
        if let Some(k) = self
            .severity
            .keys()
            .find(|k| !SIGNALS.iter().any(|(n, _)| n == k))
        {
            let names: Vec<&str> = SIGNALS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "severity: unknown signal {k:?}; known: {}",
                names.join(", ")
            ));
        }
        if self.max_aspect.is_nan() || self.max_aspect < 1.0 {
            return Err(format!(
                "max_aspect {}: must be at least 1",
                self.max_aspect
            ));
        }
        if !(0.0..=1.0).contains(&self.max_repeated_fraction) {
            return Err(format!(
                "max_repeated_fraction {}: must be 0 to 1",
                self.max_repeated_fraction
            ));
        }
        if self.length_outlier_z.is_nan() || self.length_outlier_z < 0.0 {
            return Err("length_outlier_z: must be 0 (off) or positive".into());
        }
        if !(0.0..=1.0).contains(&self.nsfw_threshold) {
            return Err(format!(
                "nsfw_threshold {}: must be 0 to 1",
                self.nsfw_threshold
            ));
        }
        if !(0.0..=100.0).contains(&self.min_clip_score) {
            return Err(format!(
                "min_clip_score {}: must be 0 to 100 (0 disables)",
                self.min_clip_score
            ));
        }
        if self.max_words != 0 && self.max_words < self.min_words {
            return Err(format!(
                "max_words {} is below min_words {}",
                self.max_words, self.min_words
            ));
        }
        if let Some(l) = self
            .languages
            .iter()
            .find(|l| l.len() != 3 || !l.bytes().all(|b| b.is_ascii_lowercase()))
        {
            return Err(format!(
                "languages: {l:?} is not an ISO 639-3 code (three lower-case letters, e.g. \"eng\")"
            ));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Dataset versions

/// Build a new immutable version of a dataset: every image with its caption from one source,
/// quality signals, a decision and tier under `policy`, and a deterministic split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    pub dataset: String,
    /// The caption source id (16 hex digits, from a caption job's output). When absent, each
    /// image's most recent caption is used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_source: Option<String>,
    #[serde(default)]
    pub policy: QualityPolicy,
    #[serde(default)]
    pub split: SplitSpec,
    /// A note kept in the manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl FilterSpec {
    pub fn check(&self) -> Result<(), String> {
        check_dataset_name(&self.dataset)?;
        if let Some(s) = &self.caption_source {
            if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("caption_source {s:?}: expected 16 hex digits"));
            }
        }
        self.policy.check()?;
        self.split.check()
    }
}

/// Fractions of each tier that go to validation and test; the rest is train. Assignment is by
/// a hash of (seed, image sha256), so it is stable across versions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SplitSpec {
    pub val: f32,
    pub test: f32,
    pub seed: String,
}

impl Default for SplitSpec {
    fn default() -> Self {
        Self {
            val: 0.05,
            test: 0.05,
            seed: "atelier".into(),
        }
    }
}

impl SplitSpec {
    pub fn check(&self) -> Result<(), String> {
        if !(self.val >= 0.0 && self.test >= 0.0 && self.val + self.test < 1.0) {
            return Err(format!(
                "split: val {} and test {} must be non-negative and sum below 1",
                self.val, self.test
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Accept,
    Flag,
    Reject,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Gold,
    Silver,
    Bronze,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Val,
    Test,
}

/// A failed check: the signal's name and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct Signal {
    pub name: String,
    pub reason: String,
    pub severity: Severity,
}

/// One line of a version's `data.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct DatasetRow {
    /// The image's id in exports: the first 16 hex digits of its sha256.
    pub image_id: String,
    pub image_key: String,
    pub sha256: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_source: Option<CaptionSource>,
    /// Detected caption language (ISO 639-3) when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// The NSFW detector's strongest explicit-class confidence (0 when none), when it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nsfw: Option<f32>,
    /// CLIP score of the image and its caption (100 · max(cos, 0)), when the worker has CLIP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_score: Option<f32>,
    pub words: u32,
    /// Every check that did not pass.
    pub signals: Vec<Signal>,
    pub decision: Decision,
    /// Absent for rejected rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<Tier>,
    /// Absent for rejected rows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Where the image came from (the first source) and its license.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub license: Option<String>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Set on variant rows an augment job made: the parent record and the steps applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmentation: Option<crate::augment::Augmentation>,
    /// Hard negative captions for contrastive training (augment jobs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub negatives: Vec<crate::augment::HardNegative>,
    /// Paraphrases of `caption` (caption-only augment jobs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paraphrases: Vec<crate::augment::Paraphrased>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct VersionCounts {
    pub rows: u64,
    pub accepted: u64,
    pub flagged: u64,
    pub rejected: u64,
    /// Per tier, of the kept (accepted and flagged) rows.
    pub tiers: BTreeMap<String, u64>,
    /// Per split, of the kept rows.
    pub splits: BTreeMap<String, u64>,
    /// How many rows failed each signal.
    pub signals: BTreeMap<String, u64>,
}

/// A version's manifest: stored content-addressed, and under `<dataset>.<version>` in the
/// `atelier_datasets` KV bucket. Versions are immutable; `parent` is the version before.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct DatasetManifest {
    pub schema_version: u32,
    pub dataset: String,
    pub version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<u32>,
    pub created_at: DateTime<Utc>,
    pub job: JobId,
    pub policy: QualityPolicy,
    pub split: SplitSpec,
    /// Caption sources used, by source id.
    pub caption_sources: BTreeMap<String, CaptionSource>,
    pub counts: VersionCounts,
    /// The JSONL data file (one [`DatasetRow`] per line, sorted by sha256).
    pub data: ArtifactRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Set on versions a curate job chose from `parent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub curation: Option<crate::retrieval::Curation>,
    /// Set on versions an augment job made from `parent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmentation: Option<Box<crate::augment::AugmentSpec>>,
}

impl DatasetManifest {
    /// A version made from `parent` (curation, augmentation): the parent's policy, split and
    /// caption sources, these rows; `curation` and `augmentation` left for the caller to set.
    pub fn derived(
        parent: &DatasetManifest,
        version: u32,
        job: JobId,
        created_at: DateTime<Utc>,
        counts: VersionCounts,
        data: ArtifactRef,
        note: Option<String>,
    ) -> Self {
        DatasetManifest {
            schema_version: crate::SCHEMA_VERSION,
            dataset: parent.dataset.clone(),
            version,
            parent: Some(parent.version),
            created_at,
            job,
            policy: parent.policy.clone(),
            split: parent.split.clone(),
            caption_sources: parent.caption_sources.clone(),
            counts,
            data,
            note,
            curation: None,
            augmentation: None,
        }
    }
}

impl VersionCounts {
    /// The counts of a version holding `rows`.
    pub fn of_rows(rows: &[DatasetRow]) -> Self {
        let mut c = VersionCounts {
            rows: rows.len() as u64,
            ..Default::default()
        };
        for r in rows {
            match r.decision {
                Decision::Accept => c.accepted += 1,
                Decision::Flag => c.flagged += 1,
                Decision::Reject => c.rejected += 1,
            }
            if r.decision != Decision::Reject {
                if let Some(t) = r.tier {
                    *c.tiers.entry(tier_name(t).to_owned()).or_default() += 1;
                }
                if let Some(s) = r.split {
                    *c.splits.entry(split_name(s).to_owned()).or_default() += 1;
                }
            }
            for s in &r.signals {
                *c.signals.entry(s.name.clone()).or_default() += 1;
            }
        }
        c
    }
}

fn tier_name(t: Tier) -> &'static str {
    match t {
        Tier::Gold => "gold",
        Tier::Silver => "silver",
        Tier::Bronze => "bronze",
    }
}

fn split_name(s: Split) -> &'static str {
    match s {
        Split::Train => "train",
        Split::Val => "val",
        Split::Test => "test",
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct DatasetVersionOutput {
    pub dataset: String,
    pub version: u32,
    pub manifest: ArtifactRef,
    pub counts: VersionCounts,
}

/// Score a dataset version's captions against another caption source (e.g. a new captioner
/// against the captions a stronger model wrote), with caption evaluation's metrics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalCaptionsSpec {
    pub dataset: String,
    /// Default: the latest version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// The caption source id (16 hex digits) whose captions are the references; or give
    /// `references_file`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub references: String,
    /// An uploaded file of human references (`POST /v1/uploads`): JSONL of `{"image_id",
    /// "caption"}` (or `"captions": [...]`) lines, or CSV with `image_id,caption` columns; ids
    /// are a row's `image_id` or its image's sha256.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub references_file: Option<String>,
    /// Score rejected rows too (default: only the kept ones).
    #[serde(default)]
    pub include_rejected: bool,
}

impl EvalCaptionsSpec {
    pub fn check(&self) -> Result<(), String> {
        check_dataset_name(&self.dataset)?;
        match (&self.references_file, self.references.is_empty()) {
            (Some(_), false) => {
                return Err(
                    "give references (a caption source) or references_file, not both".into(),
                )
            }
            (Some(key), true) => {
                return crate::ArtifactKey::parse(key)
                    .map(drop)
                    .map_err(|e| format!("references_file {key:?}: {e}"))
            }
            (None, _) => {}
        }
        if self.references.len() != 16 || !self.references.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "references {:?}: expected a caption source id (16 hex digits), or give references_file",
                self.references
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct CaptionScores {
    pub dataset: String,
    pub version: u32,
    pub references: String,
    /// Images scored.
    pub images: u64,
    /// Images left out because the reference source has no caption for them.
    pub missing_references: u64,
    /// pycocoevalcap's names: `Bleu_1`..`Bleu_4`, `ROUGE_L`, `CIDEr`, and `METEOR` / `SemSim`
    /// when the worker has the METEOR jar / the MiniLM weights.
    pub corpus: BTreeMap<String, f64>,
    /// Per-image scores by metric (JSON), content-addressed.
    pub per_image: ArtifactRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_specs_are_checked() {
        assert!(check_dataset_name("cats_2024-v1").is_ok());
        for bad in ["", "a.b", "a b", "ä", &"x".repeat(65)] {
            assert!(check_dataset_name(bad).is_err(), "{bad}");
        }
        let spec: CaptionSpec = serde_json::from_str(r#"{"dataset":"d"}"#).unwrap();
        assert!(spec.check().is_ok());
        assert_eq!(spec.backend, CaptionBackend::default());
        let bad: CaptionSpec = serde_json::from_str(
            r#"{"dataset":"d","backend":{"backend":"openai","max_tokens":0}}"#,
        )
        .unwrap();
        assert!(bad.check().unwrap_err().contains("max_tokens"));
        let bad: CaptionSpec = serde_json::from_str(r#"{"dataset":"d","images":["ABC"]}"#).unwrap();
        assert!(bad.check().unwrap_err().contains("sha256"));
    }

    #[test]
    fn policies_default_and_reject_unknown_signals() {
        let p: QualityPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(p, QualityPolicy::default());
        assert_eq!(p.severity_of("refusal"), Severity::Reject);
        let mut p = p;
        p.severity.insert("refusal".into(), Severity::Flag);
        assert_eq!(p.severity_of("refusal"), Severity::Flag);
        p.severity.insert("blurry".into(), Severity::Flag);
        assert!(p.check().unwrap_err().contains("blurry"));
        let bad = QualityPolicy {
            languages: vec!["en".into()],
            ..Default::default()
        };
        assert!(bad.check().unwrap_err().contains("639-3"));
        assert!(SplitSpec {
            val: 0.6,
            test: 0.5,
            ..Default::default()
        }
        .check()
        .is_err());
    }
}
