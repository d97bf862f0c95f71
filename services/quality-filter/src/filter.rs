//! `filter` jobs: a dataset's images and captions → an immutable dataset version.

use std::collections::{BTreeMap, HashMap};

use crate::models::{kv_err, QualityFilter};
use crate::policy::{assess, Input};
use atelier_contracts::dataset::{CaptionRecord, DatasetManifest, DatasetVersionOutput};
use atelier_contracts::{JobOutput, SCHEMA_VERSION};
use atelier_kit::{JobCtx, JobError};

impl QualityFilter {
    pub(crate) async fn filter(
        &self,
        ctx: &JobCtx,
        spec: atelier_contracts::FilterSpec,
    ) -> Result<JobOutput, JobError> {
        spec.check()
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        self.require_nsfw(&spec.policy)?;
        let datasets = ctx.bucket(atelier_contracts::typed::DATASETS).await?;
        let prefix = format!("{}.", spec.dataset);
        let versions: Vec<(String, DatasetManifest)> =
            datasets.values(&prefix).await.map_err(kv_err)?;
        // A redelivered job whose version was already written returns it.
        if let Some((_, m)) = versions.iter().find(|(_, m)| m.job == ctx.id) {
            let (manifest, _) = ctx.store().put_json(m).await?;
            return Ok(JobOutput::DatasetVersion(DatasetVersionOutput {
                dataset: m.dataset.clone(),
                version: m.version,
                manifest,
                counts: m.counts.clone(),
            }));
        }
        let images_kv = ctx.bucket(atelier_contracts::typed::IMAGES).await?;
        let images = images_kv.of_dataset(&spec.dataset).await.map_err(kv_err)?;
        if images.is_empty() {
            return Err(JobError::permanent(
                "unknown_dataset",
                format!(
                    "dataset {:?} has no images; add some with `atelier ingest DIR --dataset {}`",
                    spec.dataset, spec.dataset
                ),
            ));
        }
        ctx.progress(0.1, Some(format!("{} images", images.len())))
            .await;
        let captions_kv = ctx.bucket(atelier_contracts::typed::CAPTIONS).await?;
        let mut by_image: HashMap<String, Vec<CaptionRecord>> = HashMap::new();
        for (_, c) in captions_kv.values("").await.map_err(kv_err)? {
            by_image.entry(c.image_sha256.clone()).or_default().push(c);
        }
        if let Some(sid) = &spec.caption_source {
            let known = images.iter().any(|i| {
                by_image
                    .get(&i.sha256)
                    .is_some_and(|cs| cs.iter().any(|c| &c.source_id == sid))
            });
            if !known {
                return Err(JobError::permanent(
                    "unknown_caption_source",
                    format!(
                        "no image of dataset {:?} has a caption from source {sid}; run a caption job first (its output names the source id)",
                        spec.dataset
                    ),
                ));
            }
        }
        let chosen: Vec<Option<&CaptionRecord>> = images
            .iter()
            .map(|i| {
                let cs = by_image.get(&i.sha256)?;
                match &spec.caption_source {
                    Some(sid) => cs.iter().find(|c| &c.source_id == sid),
                    None => cs.iter().max_by_key(|c| c.created_at),
                }
            })
            .collect();
        let nsfw = self.nsfw_scores(ctx, &images).await?;
        let clip = self.clip_scores(ctx, &images, &chosen).await?;
        let inputs: Vec<Input<'_>> = images
            .iter()
            .zip(&chosen)
            .zip(nsfw.iter().zip(&clip))
            .map(|((image, caption), (nsfw, clip_score))| Input {
                image,
                caption: *caption,
                nsfw: *nsfw,
                clip_score: *clip_score,
            })
            .collect();
        let (rows, counts) = assess(&inputs, &spec.policy, &spec.split);
        let caption_sources: BTreeMap<_, _> = chosen
            .iter()
            .flatten()
            .map(|c| (c.source_id.clone(), c.source.clone()))
            .collect();
        let data = atelier_kit::datasets::put_rows(ctx, &rows).await?;
        ctx.progress(0.8, Some("data written".to_owned())).await;
        let (manifest, manifest_ref) =
            atelier_kit::datasets::publish_version(ctx, &spec.dataset, |version| DatasetManifest {
                schema_version: SCHEMA_VERSION,
                dataset: spec.dataset.clone(),
                version,
                parent: (version > 1).then_some(version - 1),
                created_at: chrono::Utc::now(),
                job: ctx.id,
                policy: spec.policy.clone(),
                split: spec.split.clone(),
                caption_sources: caption_sources.clone(),
                counts: counts.clone(),
                data: data.clone(),
                note: spec.note.clone(),
                curation: None,
                augmentation: None,
            })
            .await?;
        tracing::info!(job = %ctx.id, dataset = %spec.dataset, version = manifest.version,
            rows = counts.rows, accepted = counts.accepted, flagged = counts.flagged,
            rejected = counts.rejected, "dataset version written");
        Ok(JobOutput::DatasetVersion(DatasetVersionOutput {
            dataset: spec.dataset.clone(),
            version: manifest.version,
            manifest: manifest_ref,
            counts,
        }))
    }
}
