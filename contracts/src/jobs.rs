//! Jobs: what is asked ([`JobRequest`]), what a worker reports ([`JobProgress`], [`JobDone`],
//! [`JobFailed`], [`DeadLetter`]) and what the job-state bucket holds ([`JobRecord`]).
//!
//! A job kind is a variant of [`JobSpec`] (tagged by `kind`); each kind belongs to exactly one
//! [`Service`]. Later services add their variants here, beside their output in [`JobOutput`].

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::{
    ArtifactRef, AugmentOutput, AugmentSpec, CaptionOutput, CaptionScores, CaptionSpec,
    CurateOutput, CurateSpec, DatasetVersionOutput, EvalCaptionsSpec, FilterSpec, GenerateSpec,
    ImagesOutput, IndexOutput, IndexSpec, Service, TrainOutput, TrainSpec,
};

/// A job's id: a UUIDv7, so ids sort by submission time.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    JsonSchema,
    ToSchema,
)]
#[serde(transparent)]
#[schema(value_type = String, format = Uuid)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
    pub fn parse(s: &str) -> Option<Self> {
        Uuid::parse_str(s).ok().map(Self)
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// What a job asks for. The `kind` tag selects the service that runs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum JobSpec {
    /// Read an artifact, verify it, and store a digest report as a result artifact.
    Checksum(ChecksumSpec),
    /// Generate images from a prompt (sampler service).
    Txt2img(GenerateSpec),
    /// Generate images from a prompt and a starting image (inpainter service).
    Img2img(GenerateSpec),
    /// Repaint the masked region of an image (inpainter service).
    Inpaint(GenerateSpec),
    /// Caption a dataset's images (captioner service).
    Caption(CaptionSpec),
    /// Check a dataset's images and captions and write a new dataset version (quality-filter).
    Filter(FilterSpec),
    /// Score a version's captions against another caption source (quality-filter).
    EvalCaptions(EvalCaptionsSpec),
    /// Train a LoRA (optionally DreamBooth with prior preservation) (trainer service).
    Train(Box<TrainSpec>),
    /// Embed a dataset version's kept rows into its search index (retrieval-indexer).
    Index(IndexSpec),
    /// Choose rows of a version into a new version (retrieval-indexer).
    Curate(Box<CurateSpec>),
    /// Seeded image variants, caption paraphrases and hard negatives into a new version (augmenter).
    Augment(Box<AugmentSpec>),
    /// Export a version into the object store, shard by shard (quality-filter).
    Export(crate::dataset::ExportSpec),
    /// Upscale images with A1111's built-in upscalers (augmenter).
    Upscale(crate::upscale::UpscaleSpec),
    /// Caption one image and answer it (captioner).
    Interrogate(crate::dataset::InterrogateSpec),
    /// Create a textual-inversion embedding from an initial text (trainer).
    CreateEmbedding(crate::embedding::CreateEmbeddingSpec),
}

impl JobSpec {
    /// Every `kind` tag this build knows.
    pub const KINDS: &'static [&'static str] = &[
        "checksum",
        "txt2img",
        "img2img",
        "inpaint",
        "caption",
        "filter",
        "eval_captions",
        "train",
        "index",
        "curate",
        "augment",
        "export",
        "upscale",
        "interrogate",
        "create_embedding",
    ];

    pub fn service(&self) -> Service {
        match self {
            JobSpec::Checksum(_) => Service::Checksum,
            JobSpec::Txt2img(_) => Service::Sampler,
            JobSpec::Img2img(_) | JobSpec::Inpaint(_) => Service::Inpainter,
            JobSpec::Caption(_) | JobSpec::Interrogate(_) => Service::Captioner,
            JobSpec::Filter(_) | JobSpec::EvalCaptions(_) | JobSpec::Export(_) => {
                Service::QualityFilter
            }
            JobSpec::Train(_) | JobSpec::CreateEmbedding(_) => Service::Trainer,
            JobSpec::Index(_) | JobSpec::Curate(_) => Service::RetrievalIndexer,
            // Upscaler models run where the engine is.
            JobSpec::Upscale(u) if u.uses_models() => Service::Sampler,
            JobSpec::Augment(_) | JobSpec::Upscale(_) => Service::Augmenter,
        }
    }
    pub fn kind(&self) -> &'static str {
        match self {
            JobSpec::Checksum(_) => "checksum",
            JobSpec::Txt2img(_) => "txt2img",
            JobSpec::Img2img(_) => "img2img",
            JobSpec::Inpaint(_) => "inpaint",
            JobSpec::Caption(_) => "caption",
            JobSpec::Filter(_) => "filter",
            JobSpec::EvalCaptions(_) => "eval_captions",
            JobSpec::Train(_) => "train",
            JobSpec::Index(_) => "index",
            JobSpec::Curate(_) => "curate",
            JobSpec::Augment(_) => "augment",
            JobSpec::Export(_) => "export",
            JobSpec::Upscale(_) => "upscale",
            JobSpec::Interrogate(_) => "interrogate",
            JobSpec::CreateEmbedding(_) => "create_embedding",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChecksumSpec {
    /// Key of the artifact to digest.
    pub input: String,
    /// When set, the job fails (without retry) unless the artifact's SHA-256 matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_sha256: Option<String>,
}

/// The result of a job, by kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JobOutput {
    Checksum(ChecksumOutput),
    /// Generated images (txt2img, img2img, inpaint).
    Images(ImagesOutput),
    /// What a caption job did.
    Captions(CaptionOutput),
    /// The dataset version a filter job wrote.
    DatasetVersion(DatasetVersionOutput),
    /// Caption scores of an eval_captions job.
    CaptionScores(CaptionScores),
    /// The LoRA (or textual-inversion embedding) a training job wrote.
    Trained(TrainOutput),
    /// What an index job embedded and removed.
    Indexed(IndexOutput),
    /// The version a curate job wrote (or why none).
    Curated(CurateOutput),
    /// The version an augment job wrote.
    Augmented(AugmentOutput),
    /// Where an export job wrote a version.
    Exported(crate::dataset::ExportOutput),
    /// The images an upscale job made.
    Upscaled(crate::upscale::UpscaleOutput),
    /// The caption an interrogate job made.
    Interrogated(crate::dataset::InterrogateOutput),
    /// The embedding a create_embedding job made.
    Embedding(crate::embedding::EmbeddingOutput),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ChecksumOutput {
    /// The digested artifact, as found in the store.
    pub input: ArtifactRef,
    /// The digest report (JSON), stored content-addressed.
    pub report: ArtifactRef,
}

/// Published on `atelier.v1.<service>.request`; one message per job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct JobRequest {
    pub schema_version: u32,
    pub id: JobId,
    pub submitted_at: DateTime<Utc>,
    /// API key name (or `anonymous`) that submitted the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
    /// Which of the service's queues the job waits in (`normal` when absent).
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
    pub spec: JobSpec,
}

/// A job's queue: workers take every `high` job before any `normal` one and every `normal` one
/// before any `low` one; within a queue, jobs run in the order they were queued. A steady stream
/// of `high` jobs starves the others, by design.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    High,
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// In the order workers take them.
    pub const ORDER: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn name(self) -> &'static str {
        match self {
            Priority::High => "high",
            Priority::Normal => "normal",
            Priority::Low => "low",
        }
    }
    pub fn parse(s: &str) -> Option<Priority> {
        Priority::ORDER.into_iter().find(|p| p.name() == s)
    }
    pub fn is_normal(&self) -> bool {
        *self == Priority::Normal
    }
}

/// Where a queued job stands, computed when the record is read (never stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct QueuePlace {
    /// Jobs that will be handed to a worker before this one: every job waiting in a queue of
    /// higher priority, and those queued earlier in its own. 0 = next.
    pub position: u64,
    /// Jobs of the service a worker holds now.
    pub running: u64,
    /// Worker slots of the service that reported in the last minute (replicas × concurrency).
    pub slots: u64,
    /// Estimated seconds until the job starts: (position + running) ÷ slots × the mean run time
    /// of the service's recent jobs. Absent while no worker of the service is up or none has
    /// finished a job yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
}

/// A job's lifecycle: queued → running → succeeded | failed | cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct Progress {
    /// 0.0 ..= 1.0
    pub fraction: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Artifact key of a preview image (generation jobs with `preview_every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
}

/// A machine-readable code plus a sentence for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct ErrorInfo {
    pub code: String,
    pub message: String,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The value stored under the job id in the `atelier_jobs` KV bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct JobRecord {
    pub schema_version: u32,
    pub id: JobId,
    pub kind: String,
    pub service: Service,
    pub state: JobState,
    pub spec: JobSpec,
    /// The API key name that submitted it (`service:job` for jobs a job queued). Listing and
    /// cancelling are limited to it (or an `admin` key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_by: Option<String>,
    #[serde(default, skip_serializing_if = "Priority::is_normal")]
    pub priority: Priority,
    /// While queued, the job's place in the queue (filled in by the gateway when it answers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueuePlace>,
    /// How many times a worker has started this job (redeliveries after crashes count).
    pub attempts: u64,
    /// Attempts that ended with their worker's death (killed, out of memory, cut off from the
    /// bus) rather than with an outcome. A job interrupted too often fails `worker_died`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interrupted: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<JobOutput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// The worker instance that last ran the job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl JobRecord {
    pub fn queued(request: &JobRequest) -> Self {
        Self {
            schema_version: crate::SCHEMA_VERSION,
            id: request.id,
            kind: request.spec.kind().to_owned(),
            service: request.spec.service(),
            state: JobState::Queued,
            spec: request.spec.clone(),
            submitted_by: request.submitted_by.clone(),
            priority: request.priority,
            queue: None,
            attempts: 0,
            interrupted: 0,
            progress: None,
            output: None,
            error: None,
            worker: None,
            created_at: request.submitted_at,
            updated_at: request.submitted_at,
        }
    }
}

/// What one worker process says of itself, every few seconds, in the workers bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct WorkerReport {
    pub service: Service,
    pub instance: String,
    /// Jobs it runs at once (`--concurrency`).
    pub slots: u64,
    /// Jobs it holds now.
    pub running: u64,
    /// Mean run time of its recent jobs (an exponentially weighted mean), once it has run one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_run_s: Option<f64>,
    /// Its process's resident memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
    /// The GPUs its machine has (from `nvidia-smi`), with their memory.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuMemory>,
    pub at: DateTime<Utc>,
}

/// One GPU's memory as its driver reports it (bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct GpuMemory {
    pub index: u32,
    /// The driver's unique id (the same GPU seen by two workers has one).
    pub uuid: String,
    pub name: String,
    pub total: u64,
    pub used: u64,
    pub free: u64,
}

/// Published on `atelier.v1.<service>.progress`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct JobProgress {
    pub schema_version: u32,
    pub id: JobId,
    pub service: Service,
    pub progress: Progress,
    pub at: DateTime<Utc>,
}

/// Published once per job on `atelier.v1.<service>.done` (deduplicated by `Nats-Msg-Id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct JobDone {
    pub schema_version: u32,
    pub id: JobId,
    pub service: Service,
    pub output: JobOutput,
    pub attempts: u64,
    pub duration_ms: u64,
    pub finished_at: DateTime<Utc>,
}

/// Published once per job on `atelier.v1.<service>.failed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct JobFailed {
    pub schema_version: u32,
    pub id: JobId,
    pub service: Service,
    pub error: ErrorInfo,
    pub attempts: u64,
    pub finished_at: DateTime<Utc>,
}

/// Published on `atelier.v1.dlq.<service>` when a message can not be processed: it could not be
/// decoded, or it failed `deliveries` times (the consumer's `max_deliver`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct DeadLetter {
    pub schema_version: u32,
    pub service: Service,
    /// Subject the message arrived on.
    pub subject: String,
    /// Sequence of the message in its request stream.
    pub stream_sequence: u64,
    pub deliveries: u64,
    /// Set when the payload decoded far enough to find it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<JobId>,
    pub reason: ErrorInfo,
    /// The original payload, lossily decoded as UTF-8 (capped at 64 KiB).
    pub payload: String,
    pub at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_ids_are_v7_and_sort_by_time() {
        let a = JobId::new();
        let b = JobId::new();
        assert_eq!(a.0.get_version_num(), 7);
        assert!(a < b);
        assert_eq!(JobId::parse(&a.to_string()), Some(a));
    }

    #[test]
    fn spec_wire_format_is_tagged_by_kind() {
        let spec: JobSpec =
            serde_json::from_str(r#"{"kind":"checksum","input":"uploads/a.png"}"#).unwrap();
        assert_eq!(spec.service(), Service::Checksum);
        assert!(serde_json::from_str::<JobSpec>(r#"{"kind":"teleport","input":"x"}"#).is_err());
        assert!(
            serde_json::from_str::<JobSpec>(r#"{"kind":"checksum","input":"x","bogus":1}"#)
                .is_err()
        );
    }
}
