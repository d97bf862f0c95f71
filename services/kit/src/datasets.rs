//! Reading dataset versions (written by the quality-filter) for the services that consume them.

use atelier_contracts::{ArtifactKey, ArtifactRef, DatasetManifest, DatasetRow};

use crate::kv::WriteError;
use crate::{JobCtx, JobError};

/// A version's manifest and rows: version `version` of `dataset`, or its latest when `None`.
pub async fn load_version(
    ctx: &JobCtx,
    dataset: &str,
    version: Option<u32>,
) -> Result<(DatasetManifest, Vec<DatasetRow>), JobError> {
    let manifest = manifest(ctx, dataset, version).await?;
    let key = ArtifactKey::parse(&manifest.data.key)
        .map_err(|e| JobError::permanent("bad_artifact_key", e.to_string()))?;
    let data = ctx.store().get_bytes(&key).await?;
    let text = std::str::from_utf8(&data)
        .map_err(|e| JobError::permanent("corrupt_version", e.to_string()))?;
    let rows: Vec<DatasetRow> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .map_err(|e| JobError::permanent("corrupt_version", e.to_string()))?;
    Ok((manifest, rows))
}

/// Version `version` of `dataset`'s manifest, or its latest when `None`.
pub async fn manifest(
    ctx: &JobCtx,
    dataset: &str,
    version: Option<u32>,
) -> Result<DatasetManifest, JobError> {
    let kv_err = |e: anyhow::Error| JobError::retryable("kv_unavailable", format!("{e:#}"));
    let datasets = ctx.bucket(atelier_contracts::typed::DATASETS).await?;
    let versions: Vec<(String, DatasetManifest)> = datasets
        .values(&format!("{dataset}."))
        .await
        .map_err(kv_err)?;
    let manifest = versions
        .into_iter()
        .map(|(_, m)| m)
        .filter(|m| m.dataset == dataset && version.is_none_or(|v| m.version == v))
        .max_by_key(|m| m.version)
        .ok_or_else(|| {
            JobError::permanent(
                "version_not_found",
                format!(
                    "dataset {dataset:?} has no version {}: run `atelier filter --dataset {dataset}` to write one",
                    version.map_or("yet".to_owned(), |v| v.to_string())
                ),
            )
        })?;
    Ok(manifest)
}

/// Every version of `dataset`, by version number.
pub async fn versions(ctx: &JobCtx, dataset: &str) -> Result<Vec<DatasetManifest>, JobError> {
    let kv_err = |e: anyhow::Error| JobError::retryable("kv_unavailable", format!("{e:#}"));
    let datasets = ctx.bucket(atelier_contracts::typed::DATASETS).await?;
    let mut out: Vec<DatasetManifest> = datasets
        .values(&format!("{dataset}."))
        .await
        .map_err(kv_err)?
        .into_iter()
        .map(|(_, m): (String, DatasetManifest)| m)
        .filter(|m| m.dataset == dataset)
        .collect();
    out.sort_by_key(|m| m.version);
    Ok(out)
}

/// Stores `rows` as a version's JSONL data file (content-addressed).
pub async fn put_rows(ctx: &JobCtx, rows: &[DatasetRow]) -> Result<ArtifactRef, JobError> {
    let mut data = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut data, r)
            .map_err(|e| JobError::permanent("internal", e.to_string()))?;
        data.push(b'\n');
    }
    let (data, _) = ctx
        .store()
        .put_bytes(data.into(), "application/x-ndjson")
        .await?;
    Ok(data)
}

/// Publishes a new version of `dataset`: the next free number after the latest, taken by KV
/// create so two jobs never get the same one. `manifest` builds the manifest for a number.
/// Returns the manifest written and its content-addressed copy.
pub async fn publish_version(
    ctx: &JobCtx,
    dataset: &str,
    manifest: impl Fn(u32) -> DatasetManifest,
) -> Result<(DatasetManifest, ArtifactRef), JobError> {
    let kv_err = |e: anyhow::Error| JobError::retryable("kv_unavailable", format!("{e:#}"));
    let datasets = ctx.bucket(atelier_contracts::typed::DATASETS).await?;
    let latest = versions(ctx, dataset).await?.last().map(|m| m.version);
    let mut version = latest.unwrap_or(0) + 1;
    loop {
        let m = manifest(version);
        match datasets
            .write(&format!("{dataset}.{version}"), &m, None)
            .await
        {
            Ok(_) => {
                let (manifest_ref, _) = ctx.store().put_json(&m).await?;
                return Ok((m, manifest_ref));
            }
            Err(WriteError::Conflict(_)) => {
                // Another job took this number first.
                version += 1;
            }
            Err(WriteError::Other(e)) => return Err(kv_err(e)),
        }
    }
}
