//! Subject and stream names: one scheme for every service.
//!
//! ```text
//! atelier.v1.<service>.request    work queue: one message per job (stream ATELIER_REQ_<SERVICE>)
//! atelier.v1.<service>.request.high / .request.low
//!                                 the high- and low-priority queues (ATELIER_REQ_<SERVICE>_HIGH/_LOW)
//! atelier.v1.<service>.progress   events: progress of a running job  (stream ATELIER_EVENTS)
//! atelier.v1.<service>.done       events: a job's result              (stream ATELIER_EVENTS)
//! atelier.v1.<service>.failed     events: a job's final failure       (stream ATELIER_EVENTS)
//! atelier.v1.dlq.<service>        dead letters after max_deliver      (stream ATELIER_DLQ)
//! atelier.v1.images.ingested      external systems announce images    (stream ATELIER_IMAGES)
//! ```

use crate::Priority;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Every service that consumes jobs from the bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Service {
    /// Verifies and digests stored artifacts (the spine's own job kind).
    Checksum,
    /// Records images announced by uploads or by `atelier.v1.images.ingested`.
    Ingest,
    Captioner,
    QualityFilter,
    RetrievalIndexer,
    Augmenter,
    Trainer,
    Sampler,
    Inpainter,
}

impl Service {
    pub const ALL: [Service; 9] = [
        Service::Checksum,
        Service::Ingest,
        Service::Captioner,
        Service::QualityFilter,
        Service::RetrievalIndexer,
        Service::Augmenter,
        Service::Trainer,
        Service::Sampler,
        Service::Inpainter,
    ];

    /// The subject token and process name, e.g. `quality-filter`.
    pub fn name(self) -> &'static str {
        match self {
            Service::Checksum => "checksum",
            Service::Ingest => "ingest",
            Service::Captioner => "captioner",
            Service::QualityFilter => "quality-filter",
            Service::RetrievalIndexer => "retrieval-indexer",
            Service::Augmenter => "augmenter",
            Service::Trainer => "trainer",
            Service::Sampler => "sampler",
            Service::Inpainter => "inpainter",
        }
    }

    pub fn parse(name: &str) -> Option<Service> {
        Service::ALL.into_iter().find(|s| s.name() == name)
    }

    /// Whether the service runs models on an accelerator (GPU images, batched fetch).
    pub fn is_gpu(self) -> bool {
        matches!(
            self,
            Service::Captioner
                | Service::RetrievalIndexer
                | Service::Trainer
                | Service::Sampler
                | Service::Inpainter
        )
    }

    fn upper(self) -> String {
        self.name().replace('-', "_").to_ascii_uppercase()
    }

    /// The `normal` queue's subject (what external systems publish to by default).
    pub fn request_subject(self) -> String {
        format!("atelier.v1.{}.request", self.name())
    }
    /// The subject of the queue for `priority`: `….request`, `….request.high`, `….request.low`.
    pub fn request_subject_for(self, priority: Priority) -> String {
        match priority {
            Priority::Normal => self.request_subject(),
            p => format!("atelier.v1.{}.request.{}", self.name(), p.name()),
        }
    }
    pub fn progress_subject(self) -> String {
        format!("atelier.v1.{}.progress", self.name())
    }
    pub fn done_subject(self) -> String {
        format!("atelier.v1.{}.done", self.name())
    }
    pub fn failed_subject(self) -> String {
        format!("atelier.v1.{}.failed", self.name())
    }
    pub fn dead_letter_subject(self) -> String {
        format!("atelier.v1.dlq.{}", self.name())
    }
    /// The work-queue stream holding this service's requests.
    pub fn request_stream(self) -> String {
        format!("ATELIER_REQ_{}", self.upper())
    }
    /// The work-queue stream of one priority's queue (one stream each, so a job's sequence
    /// counts only the jobs of its own queue).
    pub fn request_stream_for(self, priority: Priority) -> String {
        match priority {
            Priority::Normal => self.request_stream(),
            p => format!(
                "{}_{}",
                self.request_stream(),
                p.name().to_ascii_uppercase()
            ),
        }
    }
    /// The durable pull consumer that all replicas of the service share (competing consumers).
    pub fn consumer(self) -> String {
        format!("{}-workers", self.name())
    }
    /// The durable of one priority's queue.
    pub fn consumer_for(self, priority: Priority) -> String {
        match priority {
            Priority::Normal => self.consumer(),
            p => format!("{}-workers-{}", self.name(), p.name()),
        }
    }
}

impl std::fmt::Display for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The queue a request subject belongs to (`normal` for anything but `….request.high/low`).
pub fn priority_of(subject: &str) -> Priority {
    Priority::ORDER
        .into_iter()
        .find(|p| !p.is_normal() && subject.ends_with(&format!(".request.{}", p.name())))
        .unwrap_or_default()
}

/// External systems publish here to announce images they put into the bucket.
pub const IMAGES_INGESTED: &str = "atelier.v1.images.ingested";
/// Stream holding `atelier.v1.images.ingested` events.
pub const IMAGES_STREAM: &str = "ATELIER_IMAGES";
/// Stream holding every service's progress/done/failed events.
pub const EVENTS_STREAM: &str = "ATELIER_EVENTS";
/// Subjects of [`EVENTS_STREAM`]: listed per service, without wildcards, so no two streams'
/// subjects overlap (JetStream refuses overlapping streams).
pub fn events_subjects() -> Vec<String> {
    Service::ALL
        .into_iter()
        .flat_map(|s| [s.progress_subject(), s.done_subject(), s.failed_subject()])
        .collect()
}
/// Stream holding dead letters.
pub const DLQ_STREAM: &str = "ATELIER_DLQ";
/// Subjects of [`DLQ_STREAM`].
pub fn dlq_subjects() -> Vec<String> {
    Service::ALL
        .into_iter()
        .map(Service::dead_letter_subject)
        .collect()
}
/// KV bucket holding one [`crate::JobRecord`] per job id.
pub const JOBS_BUCKET: &str = "atelier_jobs";
/// KV bucket holding one [`crate::images::ImageRecord`] per image sha256.
pub const IMAGES_BUCKET: &str = "atelier_images";
/// KV bucket holding one [`crate::CaptionRecord`] per `<image sha256>.<caption source id>`.
pub const CAPTIONS_BUCKET: &str = "atelier_captions";
/// KV bucket holding one [`crate::DatasetManifest`] per `<dataset>.<version>`.
pub const DATASETS_BUCKET: &str = "atelier_datasets";
/// KV bucket holding one [`crate::retrieval::IndexManifest`] per dataset.
pub const INDEXES_BUCKET: &str = "atelier_indexes";
/// KV bucket holding one [`crate::dataset::ModelVerdict`] per model and image (NSFW) or image and
/// caption (CLIP score): what the quality filter's models said, reused by later filter jobs.
pub const VERDICTS_BUCKET: &str = "atelier_verdicts";
/// KV bucket of submissions not yet known to be on the bus (the publish outbox): one
/// `JobRequest` per job id while it is being queued; entries left behind are republished.
pub const OUTBOX_BUCKET: &str = "atelier_outbox";
/// KV bucket the gateway keeps `Idempotency-Key`s in (24 h): per caller and key, the hash of the
/// request body and the job it created.
pub const IDEMPOTENCY_BUCKET: &str = "atelier_idempotency";
/// KV bucket where each worker process reports, per service, its slots, the jobs it holds and
/// its recent mean run time ([`crate::WorkerReport`] per `<service>.<instance>`; entries expire a
/// minute after their last report), from which the gateway estimates a queued job's ETA.
pub const WORKERS_BUCKET: &str = "atelier_workers";
/// KV bucket of job webhooks (a week): per job id, the callback URL and its delivery log
/// ([`crate::http::WebhookLog`]).
pub const WEBHOOKS_BUCKET: &str = "atelier_webhooks";
/// KV bucket of what each caption run has spent ([`crate::dataset::RunSpend`] per run id), shared
/// by its shards on every replica (a week).
pub const SPEND_BUCKET: &str = "atelier_spend";
/// KV bucket of rate budgets shared by the replicas calling one endpoint
/// ([`crate::dataset::RateBudget`] per endpoint).
pub const LIMITS_BUCKET: &str = "atelier_limits";
/// KV bucket of the Batch API batches each caption job created
/// ([`crate::dataset::CaptionBatches`] per job id; a month).
pub const BATCHES_BUCKET: &str = "atelier_batches";
/// Core NATS request/reply (no stream): a [`crate::retrieval::SearchRequest`] answered by a
/// retrieval-indexer replica (queue group [`RETRIEVAL_QUERY_GROUP`]) with a
/// [`crate::retrieval::SearchReply`].
pub const RETRIEVAL_QUERY: &str = "atelier.v1.retrieval.query";
pub const RETRIEVAL_QUERY_GROUP: &str = "retrieval-indexer";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_subjects_follow_the_scheme() {
        for s in Service::ALL {
            assert_eq!(Service::parse(s.name()), Some(s));
            assert_eq!(
                s.request_subject(),
                format!("atelier.v1.{}.request", s.name())
            );
            assert!(!s.request_stream().contains(['.', '-', ' ', '*', '>']));
        }
        assert_eq!(
            Service::QualityFilter.request_stream(),
            "ATELIER_REQ_QUALITY_FILTER"
        );
        assert_eq!(Service::parse("nope"), None);
    }

    #[test]
    fn serde_name_matches_subject_token() {
        for s in Service::ALL {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
    }
}
