//! `export` jobs: a dataset version written into the object store by [`atelier_export`], under a
//! prefix named by the version, format and options, so the same request run again — or the job
//! redelivered after its worker died — resumes: shards already there are kept.

use std::sync::atomic::{AtomicUsize, Ordering};

use atelier_contracts::dataset::{ExportOutput, ExportSpec, DEFAULT_EXPORT_SHARD_SIZE};
use atelier_contracts::{ArtifactKey, JobOutput};
use atelier_kit::store::Store;
use atelier_kit::{JobCtx, JobError};
use sha2::{Digest, Sha256};

use crate::QualityFilter;

/// Images from the store.
struct StoreImages<'a>(&'a Store);

impl atelier_export::Images for StoreImages<'_> {
    async fn get(&self, key: &str) -> anyhow::Result<bytes::Bytes> {
        Ok(self.0.get_bytes(&ArtifactKey::parse(key)?).await?)
    }
}

/// Files under `prefix` in the store.
struct StoreSink<'a> {
    store: &'a Store,
    prefix: String,
    written: &'a AtomicUsize,
}

impl StoreSink<'_> {
    fn key(&self, rel: &str) -> anyhow::Result<ArtifactKey> {
        Ok(ArtifactKey::parse(&format!("{}/{rel}", self.prefix))?)
    }
}

impl atelier_export::Sink for StoreSink<'_> {
    async fn exists(&self, rel: &str) -> anyhow::Result<bool> {
        Ok(self.store.head(&self.key(rel)?).await?.is_some())
    }

    async fn put(&self, rel: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let content_type = match rel.rsplit('.').next() {
            Some("tar") => "application/x-tar",
            Some("parquet") => "application/vnd.apache.parquet",
            Some("json") => "application/json",
            Some("jsonl") => "application/x-ndjson",
            Some("md") => "text/markdown",
            Some("png") => "image/png",
            Some("jpg") => "image/jpeg",
            _ => "application/octet-stream",
        };
        self.store
            .put_at(&self.key(rel)?, bytes.into(), content_type)
            .await?;
        self.written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The export's prefix: the same for the same version, format, tiers and shard size.
fn prefix(spec: &ExportSpec, version: u32, shard_size: u32) -> String {
    let mut h = Sha256::new();
    h.update(serde_json::to_vec(&(&spec.tiers, shard_size)).unwrap_or_default());
    format!(
        "exports/{}/v{version}/{}-{}",
        spec.dataset,
        spec.format.name(),
        hex::encode(&h.finalize()[..4])
    )
}

impl QualityFilter {
    pub(crate) async fn export(
        &self,
        ctx: &JobCtx,
        spec: ExportSpec,
    ) -> Result<JobOutput, JobError> {
        spec.check()
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        let manifest = atelier_kit::datasets::manifest(ctx, &spec.dataset, spec.version).await?;
        let shard_size = spec.shard_size.unwrap_or(DEFAULT_EXPORT_SHARD_SIZE);
        let prefix = prefix(&spec, manifest.version, shard_size);
        // The rows stream from a copy of the data file on local disk.
        let staging = tempfile::tempdir()
            .map_err(|e| JobError::retryable("disk", format!("a temporary folder: {e}")))?;
        let data = staging.path().join("data.jsonl");
        let key = ArtifactKey::parse(&manifest.data.key)
            .map_err(|e| JobError::permanent("bad_artifact_key", e.to_string()))?;
        ctx.store().download(&key, &data).await?;
        let written = AtomicUsize::new(0);
        let sink = StoreSink {
            store: ctx.store(),
            prefix: prefix.clone(),
            written: &written,
        };
        let opts = atelier_export::Options {
            format: spec.format,
            tiers: spec.tiers.clone(),
            shard_size: shard_size as usize,
        };
        let images = StoreImages(ctx.store());
        let export = atelier_export::export(&manifest, &data, &images, &sink, &opts);
        let report = with_progress(ctx, &written, export)
            .await
            .map_err(|e| JobError::retryable("export_failed", format!("{e:#}")))?;
        tracing::info!(job = %ctx.id, %prefix, written = report.shards_written,
            skipped = report.shards_skipped, "export done");
        Ok(JobOutput::Exported(ExportOutput {
            dataset: spec.dataset,
            version: manifest.version,
            format: spec.format,
            prefix,
            splits: report
                .splits
                .into_iter()
                .map(|(k, v)| (k, v as u64))
                .collect(),
            files: report.files as u64,
            shards_written: report.shards_written as u64,
            shards_skipped: report.shards_skipped as u64,
            transcoded: report.transcoded as u64,
            bytes_written: report.bytes_written,
        }))
    }
}

/// Runs `work`, reporting the files written every few seconds (an export of a million images runs
/// for a long time; the record shows it moving).
async fn with_progress<T>(
    ctx: &JobCtx,
    written: &AtomicUsize,
    work: impl std::future::Future<Output = T>,
) -> T {
    let mut work = std::pin::pin!(work);
    let every = std::time::Duration::from_secs(3);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = tokio::time::sleep(every) => {
                let n = written.load(Ordering::Relaxed);
                // The fraction is unknown until the end; the message says how far it got.
                ctx.progress(0.0, Some(format!("{n} files written"))).await;
            }
        }
    }
}
