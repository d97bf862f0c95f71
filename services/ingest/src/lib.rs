//! The ingest service: records images announced on `atelier.v1.images.ingested`.
//!
//! Consumes stream `ATELIER_IMAGES` (durable `ingest-workers`), produces [`ImageRecord`]s in the
//! `atelier_images` KV bucket, keyed by the SHA-256 of the bytes. For each announced image it reads
//! the object, hashes it (the claim in the event is checked, never trusted), decodes it
//! ([`analyze`]: format, dimensions after EXIF orientation, perceptual hash, behind a
//! decompression-bomb guard), copies it to its content address, and merges the announcement into
//! the record: the same bytes announced twice, under any keys, give one record with every source
//! listed. Bytes that are corrupt, truncated, not an image, a bomb, or whose claimed digest is
//! wrong give a record flagged with the reason — never a crash or a lost event. A missing object is
//! retried (the announcing system may still be writing it) and, after `max_deliver`, the event is
//! dead-lettered with the reason. Malformed events are dead-lettered at once.

use std::sync::Arc;

use atelier_contracts::images::{ImageRecord, ImageSource, ImagesIngested, IngestedImage};
use atelier_contracts::subjects::{IMAGES_INGESTED, IMAGES_STREAM};
use atelier_contracts::typed::IMAGES;
use atelier_contracts::{ArtifactKey, ErrorInfo, Service, SCHEMA_VERSION};
use atelier_kit::config::WorkerArgs;
use atelier_kit::consumer::{self, ConsumerSpec, Delivery, Outcome, Processor};
use atelier_kit::kv::{Kv, WriteError};
use atelier_kit::service::Runtime;
use atelier_kit::store::StoreError;
use atelier_kit::Store;
use futures::StreamExt as _;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// The consumer of `atelier.v1.images.ingested`.
pub mod analyze;
pub mod complete;
pub mod samples;

pub fn consumer_spec(args: WorkerArgs) -> ConsumerSpec {
    ConsumerSpec {
        service: Service::Ingest,
        lanes: vec![atelier_kit::consumer::Lane {
            stream: IMAGES_STREAM.into(),
            durable: Service::Ingest.consumer(),
            filter_subject: IMAGES_INGESTED.into(),
        }],
        batch_size: 1,
        args,
    }
}

/// Images of one event recorded at once.
const RECORD_CONCURRENCY: usize = 16;

/// Objects larger than this are recorded (digested, flagged `too_large`) but not decoded.
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

pub struct Ingest {
    store: Store,
    images: Kv<ImageRecord>,
    max_pixels: u64,
}

impl Ingest {
    /// `max_pixels`: the decompression-bomb guard ([`analyze::DEFAULT_MAX_PIXELS`] by default).
    pub async fn new(rt: &Runtime, max_pixels: u64) -> anyhow::Result<Self> {
        Ok(Self {
            store: rt.store.clone(),
            images: rt.bus.bucket(IMAGES).await?,
            max_pixels,
        })
    }

    /// Consumes until `shutdown`, then drains.
    pub async fn run(
        rt: Runtime,
        args: WorkerArgs,
        max_pixels: u64,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let this = Arc::new(Self::new(&rt, max_pixels).await?);
        consumer::run(
            rt.bus.clone(),
            consumer_spec(args),
            this,
            rt.metrics.clone(),
            shutdown,
        )
        .await
    }

    /// Verifies one announced image and merges it into its record.
    pub async fn record(
        &self,
        dataset: Option<&str>,
        image: &IngestedImage,
    ) -> Result<ImageRecord, Outcome> {
        let dead = |code: &str, message: String| Outcome::DeadLetter {
            reason: ErrorInfo {
                code: code.into(),
                message,
            },
            job_id: None,
        };
        let key = ArtifactKey::parse(&image.key).map_err(|e| {
            dead(
                "bad_artifact_key",
                format!("image key {:?}: {e}", image.key),
            )
        })?;
        let retry = |code: &str, message: String| {
            Outcome::Retry(ErrorInfo {
                code: code.into(),
                message,
            })
        };
        let size = match self.store.head(&key).await {
            Ok(Some(meta)) => meta.size,
            Ok(None) => {
                return Err(retry(
                    "artifact_not_found",
                    format!("no object at {} (yet)", image.key),
                ))
            }
            Err(e) => return Err(retry("store_unavailable", e.to_string())),
        };
        let (found, analysis) = if size <= MAX_IMAGE_BYTES {
            let bytes = match self.store.get_bytes(&key).await {
                Ok(b) => b,
                Err(StoreError::NotFound(_)) => {
                    return Err(retry(
                        "artifact_not_found",
                        format!("no object at {} (yet)", image.key),
                    ))
                }
                Err(e) => return Err(retry("store_unavailable", e.to_string())),
            };
            let found = atelier_contracts::ArtifactRef {
                key: image.key.clone(),
                sha256: hex::encode(Sha256::digest(&bytes)),
                size: bytes.len() as u64,
                content_type: guess_content_type(&image.key).to_owned(),
            };
            let max_pixels = self.max_pixels;
            let analysis = tokio::task::spawn_blocking(move || {
                analyze::analyze(&bytes, max_pixels).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| retry("internal", format!("image analysis task: {e}")))?;
            (found, analysis)
        } else {
            let found = self
                .store
                .digest(&key)
                .await
                .map_err(|e| retry("store_unavailable", e.to_string()))?;
            (
                found,
                Err(format!(
                    "too_large: {size} bytes exceeds the limit of {MAX_IMAGE_BYTES}"
                )),
            )
        };
        let mut flags = Vec::new();
        if let Some(claimed) = image
            .sha256
            .as_deref()
            .filter(|c| !c.eq_ignore_ascii_case(&found.sha256))
        {
            flags.push(format!(
                "sha256_mismatch: announced {claimed}, bytes are {}",
                found.sha256
            ));
        }
        if let Err(reason) = &analysis {
            flags.push(reason.clone());
        }
        let flag = (!flags.is_empty()).then(|| flags.join("; "));
        let (content_key, _) = self
            .store
            .copy_to_content_address(&key, &found.sha256)
            .await
            .map_err(|e| retry("store_unavailable", e.to_string()))?;
        let content_type = match &analysis {
            Ok(info) => analyze::content_type(&info.format).to_owned(),
            Err(_) => found.content_type.clone(),
        };
        let info = analysis.ok();
        let source = ImageSource {
            key: image.key.clone(),
            source: image.source.clone(),
            license: image.license.clone(),
            metadata: image.metadata.clone(),
        };
        let now = chrono::Utc::now();
        for _ in 0..32 {
            let existing = self.images.entry(&found.sha256).await.map_err(|e| {
                Outcome::Retry(ErrorInfo {
                    code: "bus_unavailable".into(),
                    message: e.to_string(),
                })
            })?;
            let (mut record, revision) = match existing {
                Some(e) => (
                    e.value.unwrap_or_else(|_| {
                        fresh(&found, &content_key, &content_type, info.as_ref(), now)
                    }),
                    Some(e.revision),
                ),
                None => (
                    fresh(&found, &content_key, &content_type, info.as_ref(), now),
                    None,
                ),
            };
            if !record.sources.contains(&source) {
                record.sources.push(source.clone());
            }
            if let Some(d) = dataset {
                if !record.datasets.iter().any(|x| x == d) {
                    record.datasets.push(d.to_owned());
                }
            }
            if flag.is_some() && record.flag.is_none() {
                record.flag = flag.clone();
            }
            record.updated_at = now;
            match self.images.write(&found.sha256, &record, revision).await {
                Ok(_) => return Ok(record),
                Err(WriteError::Conflict(_)) => {}
                Err(WriteError::Other(e)) => {
                    return Err(Outcome::Retry(ErrorInfo {
                        code: "bus_unavailable".into(),
                        message: format!("{e:#}"),
                    }))
                }
            }
            // Lost a race with another replica: read again and merge again.
        }
        Err(Outcome::Retry(ErrorInfo {
            code: "contended".into(),
            message: "image record kept changing".into(),
        }))
    }
}

fn fresh(
    found: &atelier_contracts::ArtifactRef,
    key: &ArtifactKey,
    content_type: &str,
    info: Option<&analyze::ImageInfo>,
    now: chrono::DateTime<chrono::Utc>,
) -> ImageRecord {
    ImageRecord {
        schema_version: SCHEMA_VERSION,
        sha256: found.sha256.clone(),
        key: key.to_string(),
        size: found.size,
        content_type: content_type.to_owned(),
        datasets: Vec::new(),
        sources: Vec::new(),
        format: info.map(|i| i.format.clone()),
        width: info.map(|i| i.width),
        height: info.map(|i| i.height),
        exif_orientation: info.map(|i| i.exif_orientation),
        phash: info.map(|i| i.phash.clone()),
        flag: None,
        first_seen: now,
        updated_at: now,
    }
}

/// Content type from a key's extension (the bytes are decoded by the dataset side).
pub fn guess_content_type(key: &str) -> &'static str {
    let ext = key
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "jpg" | "jpeg" => "image/jpeg",
        "png" => "image/png",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "tif" | "tiff" => "image/tiff",
        _ => "application/octet-stream",
    }
}

impl Processor for Ingest {
    async fn process(&self, batch: Vec<Arc<Delivery>>) -> Vec<Outcome> {
        let mut outcomes = Vec::with_capacity(batch.len());
        for d in &batch {
            outcomes.push(self.process_one(d).await);
        }
        outcomes
    }
}

impl Ingest {
    async fn process_one(&self, d: &Delivery) -> Outcome {
        let event: ImagesIngested = match serde_json::from_slice(d.payload()) {
            Ok(e) => e,
            Err(e) => {
                return Outcome::DeadLetter {
                    reason: ErrorInfo {
                        code: "undecodable".into(),
                        message: format!("not an ImagesIngested event: {e}"),
                    },
                    job_id: None,
                }
            }
        };
        if event.schema_version != SCHEMA_VERSION {
            return Outcome::DeadLetter {
                reason: ErrorInfo {
                    code: "unsupported_schema_version".into(),
                    message: format!(
                        "schema_version {} is not supported (expected {SCHEMA_VERSION})",
                        event.schema_version
                    ),
                },
                job_id: None,
            };
        }
        // Images of one event are recorded concurrently (decoding runs on blocking threads); the
        // same bytes twice in one event merge through the record's compare-and-set.
        let (dataset, images) = (event.dataset.as_deref(), &event.images);
        let mut results = futures::stream::iter(0..images.len())
            .map(|i| async move {
                let image = &images[i];
                let r = self.record(dataset, image).await;
                if let Ok(r) = &r {
                    tracing::info!(sha256 = %r.sha256, key = %image.key, sources = r.sources.len(), "image recorded");
                }
                r
            })
            .buffer_unordered(RECORD_CONCURRENCY);
        let mut first_error = None;
        while let Some(r) = results.next().await {
            if let Err(outcome) = r {
                first_error.get_or_insert(outcome);
            }
        }
        first_error.unwrap_or(Outcome::Ack)
    }
}

/// The ingest service's settings (flags and `ATELIER_*` variables; docs/configuration.md).
#[derive(clap::Args, Debug, Clone)]
#[group(id = "ingest")]
pub struct Config {
    /// Decompression-bomb guard: images with more pixels are recorded, flagged, not decoded.
    #[arg(long = "max-image-pixels", env = "ATELIER_MAX_IMAGE_PIXELS", default_value_t = analyze::DEFAULT_MAX_PIXELS)]
    pub max_image_pixels: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_image_pixels: analyze::DEFAULT_MAX_PIXELS,
        }
    }
}

/// Runs the ingest service: the `atelier-ingest` binary and `atelier up` both call this.
pub async fn serve(config: Config, launch: atelier_kit::service::Launch) -> anyhow::Result<()> {
    Ingest::run(
        launch.rt,
        launch.worker,
        config.max_image_pixels,
        launch.shutdown,
    )
    .await
}
