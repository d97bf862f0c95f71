//! atelier's contracts: every message that crosses the bus, every artifact reference, every subject name.
//!
//! Architecture invariant: this crate does no I/O. It is data, names and pure validation; the runtime
//! (`atelier-kit`), the services and the gateway all depend on it and on nothing else for their
//! vocabulary. A message type lives here if and only if it is published on NATS, stored in a JetStream
//! KV bucket, or crosses the HTTP API.
//!
//! Versioning: every message carries `schema_version` ([`SCHEMA_VERSION`]); subjects carry the API
//! version (`atelier.v1.…`). A breaking change to a message adds a new subject version, never edits v1.

pub mod artifact;
pub mod asyncapi;
pub mod augment;
pub mod dataset;
pub mod embedding;
pub mod generate;
pub mod http;
pub mod images;
pub mod jobs;
pub mod retrieval;
pub mod samplers;
pub mod schema;
pub mod subjects;
pub mod train;
pub mod typed;
pub mod upscale;

pub use artifact::{ArtifactKey, ArtifactRef, KeyError};
pub use augment::{AugmentOutput, AugmentSpec};
pub use dataset::{
    CaptionBackend, CaptionOutput, CaptionRecord, CaptionScores, CaptionSource, CaptionSpec,
    DatasetManifest, DatasetRow, DatasetVersionOutput, EvalCaptionsSpec, FilterSpec, QualityPolicy,
};
pub use generate::{GenerateKind, GenerateSpec, GeneratedImage, ImagesOutput};
pub use jobs::{
    ChecksumOutput, ChecksumSpec, DeadLetter, ErrorInfo, GpuMemory, JobDone, JobFailed, JobId,
    JobOutput, JobProgress, JobRecord, JobRequest, JobSpec, JobState, Priority, Progress,
    QueuePlace, WorkerReport,
};
pub use retrieval::{
    CurateOutput, CurateSpec, IndexManifest, IndexOutput, IndexSpec, RowFilter, SearchHit,
    SearchReply, SearchRequest, SearchResponse, Space,
};
pub use subjects::Service;
pub use train::{
    DreamBoothSpec, LossPoint, NetworkSpec, TrainData, TrainImage, TrainOutput, TrainSample,
    TrainSpec,
};

/// The message schema version this build reads and writes.
pub const SCHEMA_VERSION: u32 = 1;

/// The API version used in subjects and HTTP paths.
pub const API_VERSION: &str = "v1";
