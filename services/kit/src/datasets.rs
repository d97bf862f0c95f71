//! Reading dataset versions (written by the quality-filter) for the services that consume them.

use atelier_contracts::{ArtifactKey, DatasetManifest, DatasetRow};

use crate::bus::kv_values;
use crate::{JobCtx, JobError};

/// A version's manifest and rows: version `version` of `dataset`, or its latest when `None`.
pub async fn load_version(
    ctx: &JobCtx,
    dataset: &str,
    version: Option<u32>,
) -> Result<(DatasetManifest, Vec<DatasetRow>), JobError> {
    let kv_err = |e: anyhow::Error| JobError::retryable("kv_unavailable", format!("{e:#}"));
    let datasets = ctx.bus.datasets_kv().await.map_err(kv_err)?;
    let versions: Vec<(String, DatasetManifest)> = kv_values(&datasets, &format!("{dataset}."))
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
    let key = ArtifactKey::parse(&manifest.data.key)
        .map_err(|e| JobError::permanent("bad_artifact_key", e.to_string()))?;
    let data = ctx.store.get_bytes(&key).await?;
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
