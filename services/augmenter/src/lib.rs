//! The augmenter service: `augment` jobs turn a dataset version into a new version with seeded
//! image variants, caption paraphrases and hard negatives.
//!
//! Each variant draws from its own ChaCha8 stream seeded by sha256(seed ‖ parent sha256 ‖
//! variant), so variants do not depend on which other rows are in the job, on the order
//! workers fetch images in, or on how many replicas share the work: the same spec on the same
//! version gives byte-identical images. A variant row records its parent record and the steps
//! applied ([`Step`]), enough to rebuild it from the parent.

pub mod captions;
pub mod ops;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use atelier_contracts::augment::{
    Augmentation, CaptionChange, FlipDirection, HardNegative, NegativeKind, OutputFormat,
    Paraphrase, Paraphrased, Step,
};
use atelier_contracts::dataset::{Decision, VersionCounts};
use atelier_contracts::{
    ArtifactKey, AugmentOutput, AugmentSpec, DatasetManifest, DatasetRow, JobOutput, JobSpec,
    SearchReply, SearchRequest, Service, Space,
};
use atelier_kit::bus::AskError;
use atelier_kit::store::StoreError;
use atelier_kit::{Handler, JobCtx, JobError};
use atelier_openai as openai;
use futures::{StreamExt, TryStreamExt};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

/// Rows whose images are fetched, transformed and stored together.
pub const BATCH: usize = 16;
/// How long a neighbour query may wait for the retrieval-indexer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The job handler; shared by every job a worker runs.
#[derive(Clone, Default)]
pub struct Augmenter {
    /// The OpenAI-compatible endpoint for `openai` paraphrases, when configured.
    pub openai: Option<Arc<openai::Client>>,
}

/// The generator of one purpose (`image`, `caption`, `negatives`) of one variant of one record.
pub fn variant_rng(seed: &str, sha256: &str, variant: u32, purpose: &str) -> ChaCha8Rng {
    let mut h = Sha256::new();
    for part in [seed.as_bytes(), sha256.as_bytes(), purpose.as_bytes()] {
        h.update(part);
        h.update([0]);
    }
    h.update(variant.to_le_bytes());
    ChaCha8Rng::from_seed(h.finalize().into())
}

/// One variant's image: the steps planned from the parent's size and the encoded result.
pub struct Rendered {
    pub steps: Vec<Step>,
    pub bytes: Vec<u8>,
    pub width: u32,
    pub height: u32,
}

/// Renders variant `variant` of a decoded parent image (pure and deterministic).
pub fn render(
    spec: &AugmentSpec,
    parent_sha256: &str,
    img: &image::RgbImage,
    variant: u32,
) -> Result<Rendered, ops::OpError> {
    let mut rng = variant_rng(&spec.seed, parent_sha256, variant, "image");
    let steps = ops::plan(&spec.transforms, img.width(), img.height(), &mut rng);
    let out = ops::apply_all(img.clone(), &steps)?;
    let bytes = match spec.output.format {
        OutputFormat::Jpeg => ops::encode_jpeg(&out, spec.output.quality)?,
        OutputFormat::Png => ops::encode_png(&out)?,
    };
    Ok(Rendered {
        steps,
        bytes,
        width: out.width(),
        height: out.height(),
    })
}

/// The caption-edit negatives of `caption` (one per kind that applies), seeded per record.
pub fn edit_negatives(spec: &AugmentSpec, row: &DatasetRow) -> Vec<HardNegative> {
    let (Some(n), Some(caption)) = (&spec.captions.hard_negatives, row.caption.as_deref()) else {
        return Vec::new();
    };
    let mut rng = variant_rng(&spec.seed, &row.sha256, 0, "negatives");
    n.edits
        .iter()
        .filter_map(|kind| {
            captions::negative(caption, *kind, &mut rng).map(|text| HardNegative {
                text,
                kind: *kind,
                image_id: None,
                score: None,
            })
        })
        .collect()
}

fn words(text: &str) -> u32 {
    text.split_whitespace().count() as u32
}

impl Handler for Augmenter {
    fn service(&self) -> Service {
        Service::Augmenter
    }

    async fn handle(&self, ctx: &JobCtx, spec: JobSpec) -> Result<JobOutput, JobError> {
        match spec {
            JobSpec::Augment(spec) => self.augment(ctx, *spec).await,
            JobSpec::Upscale(spec) => {
                atelier_upscale::run(ctx, spec, Arc::new(atelier_upscale::NoModels)).await
            }
            other => Err(JobError::permanent(
                "wrong_service",
                format!("the augmenter does not run {} jobs", other.kind()),
            )),
        }
    }
}

/// The output of a version this job already wrote (a redelivery).
fn output_of(
    manifest: &DatasetManifest,
    manifest_ref: atelier_contracts::ArtifactRef,
    rows: &[DatasetRow],
) -> AugmentOutput {
    let parents: HashSet<&str> = rows
        .iter()
        .filter_map(|r| r.augmentation.as_ref().map(|a| a.parent.as_str()))
        .chain(
            rows.iter()
                .filter(|r| !r.paraphrases.is_empty())
                .map(|r| r.sha256.as_str()),
        )
        .collect();
    AugmentOutput {
        dataset: manifest.dataset.clone(),
        parent: manifest.parent.unwrap_or(0),
        version: manifest.version,
        manifest: manifest_ref,
        augmented_rows: parents.len() as u64,
        variants: rows
            .iter()
            .map(|r| u64::from(r.augmentation.is_some()) + r.paraphrases.len() as u64)
            .sum(),
        negatives: rows
            .iter()
            .filter(|r| r.augmentation.is_none())
            .map(|r| r.negatives.len() as u64)
            .sum(),
        skipped: Vec::new(),
        counts: manifest.counts.clone(),
    }
}

impl Augmenter {
    async fn augment(&self, ctx: &JobCtx, spec: AugmentSpec) -> Result<JobOutput, JobError> {
        spec.check()
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        if let Some(m) = atelier_kit::datasets::versions(ctx, &spec.dataset)
            .await?
            .into_iter()
            .find(|m| m.job == ctx.id)
        {
            let (_, rows) =
                atelier_kit::datasets::load_version(ctx, &spec.dataset, Some(m.version)).await?;
            let (manifest_ref, _) = ctx.store().put_json(&m).await?;
            return Ok(JobOutput::Augmented(output_of(&m, manifest_ref, &rows)));
        }
        let llm = if spec.captions.paraphrase == Paraphrase::Openai {
            let client = self.openai.clone().ok_or_else(|| {
                JobError::permanent(
                    "no_llm",
                    "this augmenter has no OpenAI-compatible endpoint: start it with --openai-base-url URL (and ATELIER_OPENAI_API_KEY), or use paraphrase \"rules\"",
                )
            })?;
            if let Some(why) = client.unusable() {
                return Err(JobError::permanent("no_llm", why));
            }
            Some(client)
        } else {
            None
        };
        let (parent, mut rows) =
            atelier_kit::datasets::load_version(ctx, &spec.dataset, spec.version).await?;
        let chosen: Vec<usize> = (0..rows.len())
            .filter(|&i| {
                let r = &rows[i];
                (r.decision == Decision::Accept
                    || (spec.include_flagged && r.decision == Decision::Flag))
                    && spec.filter.matches(r)
            })
            .collect();
        if chosen.is_empty() {
            return Err(JobError::permanent(
                "nothing_to_augment",
                format!(
                    "no kept row of {} version {} passes the filter; no version was written",
                    spec.dataset, parent.version
                ),
            ));
        }
        ctx.progress(0.0, format!("augmenting {} rows", chosen.len()))
            .await;

        // Hard negatives: caption edits, then neighbours' captions from the index.
        let mut negatives = 0u64;
        let mut notes: Vec<String> = Vec::new();
        if let Some(n) = &spec.captions.hard_negatives {
            for &i in &chosen {
                rows[i].negatives = edit_negatives(&spec, &rows[i]);
            }
            if n.neighbours > 0 {
                let queries: Vec<_> = chosen
                    .iter()
                    .map(|&i| {
                        let row = rows[i].clone();
                        let dataset = spec.dataset.clone();
                        let k = n.neighbours;
                        async move { neighbour_negatives(ctx, &dataset, &row, k).await }
                    })
                    .collect();
                let found: Vec<Option<Vec<HardNegative>>> = futures::stream::iter(queries)
                    .buffered(8)
                    .try_collect()
                    .await?;
                let mut unindexed = 0;
                for (&i, more) in chosen.iter().zip(found) {
                    match more {
                        Some(more) => rows[i].negatives.extend(more),
                        None => unindexed += 1,
                    }
                }
                if unindexed > 0 {
                    notes.push(format!(
                        "{unindexed} rows are not in the caption index, so they got no neighbour negatives: run `atelier index --dataset {} --version {}` first",
                        spec.dataset, parent.version
                    ));
                }
            }
            negatives = chosen.iter().map(|&i| rows[i].negatives.len() as u64).sum();
        }

        let mut variants: Vec<DatasetRow> = Vec::new();
        let mut skipped: Vec<String> = notes;
        let mut augmented_rows = 0u64;
        if spec.makes_variants() && spec.transforms.is_empty() {
            // Caption-only: paraphrases attached to the original rows.
            for (n, &i) in chosen.iter().enumerate() {
                let Some(caption) = rows[i].caption.clone() else {
                    continue;
                };
                let mut seen: HashSet<String> = HashSet::from([caption.clone()]);
                for v in 0..spec.variants {
                    let (text, change) =
                        caption_variant(&spec, llm.as_deref(), &rows[i], &caption, v).await?;
                    if seen.insert(text.clone()) {
                        rows[i].paraphrases.push(Paraphrased { text, change });
                    }
                }
                augmented_rows += u64::from(!rows[i].paraphrases.is_empty());
                if n % 64 == 63 {
                    ctx.progress(n as f32 / chosen.len() as f32, None).await;
                }
            }
        } else if spec.makes_variants() {
            let mut seen: HashSet<String> = rows.iter().map(|r| r.sha256.clone()).collect();
            let spec_arc = Arc::new(spec.clone());
            for (b, batch) in chosen.chunks(BATCH).enumerate() {
                if ctx.is_cancelled() {
                    return Err(JobError::permanent("cancelled", "the job was cancelled"));
                }
                let fetches: Vec<_> = batch
                    .iter()
                    .map(|&i| {
                        let row = rows[i].clone();
                        async move { fetch(ctx, &row).await }
                    })
                    .collect();
                let images: Vec<Option<bytes::Bytes>> = futures::stream::iter(fetches)
                    .buffered(4)
                    .try_collect()
                    .await?;
                for (&i, bytes) in batch.iter().zip(images) {
                    let row = &rows[i];
                    let Some(bytes) = bytes else {
                        skipped.push(format!("{}: its image is not in the store", row.image_id));
                        continue;
                    };
                    let (s, sha) = (spec_arc.clone(), row.sha256.clone());
                    let rendered = tokio::task::spawn_blocking(move || {
                        let img =
                            atelier_decode::decode(&bytes, &atelier_decode::Limits::default())
                                .map_err(|e| format!("the image does not decode: {e}"))?
                                .to_rgb8();
                        (0..s.variants)
                            .map(|v| render(&s, &sha, &img, v).map_err(|e| e.to_string()))
                            .collect::<Result<Vec<Rendered>, String>>()
                    })
                    .await
                    .map_err(|e| JobError::retryable("panicked", e.to_string()))?;
                    let rendered = match rendered {
                        Ok(r) => r,
                        Err(e) => {
                            skipped.push(format!("{}: {e}", row.image_id));
                            continue;
                        }
                    };
                    let mut made = 0;
                    for (v, r) in rendered.into_iter().enumerate() {
                        let v = v as u32;
                        let content_type = match spec.output.format {
                            OutputFormat::Jpeg => "image/jpeg",
                            OutputFormat::Png => "image/png",
                        };
                        let (art, _) = ctx.store().put_bytes(r.bytes.into(), content_type).await?;
                        if !seen.insert(art.sha256.clone()) {
                            skipped.push(format!(
                                "{} variant {v}: the same image as another row",
                                row.image_id
                            ));
                            continue;
                        }
                        let (caption, change) = match row.caption.as_deref() {
                            Some(c) if spec.captions.paraphrase != Paraphrase::Keep => {
                                let (t, ch) =
                                    caption_variant(&spec, llm.as_deref(), row, c, v).await?;
                                (Some(t), ch)
                            }
                            _ => (row.caption.clone(), CaptionChange::Kept),
                        };
                        // A mirrored image gets a mirrored caption ("left" is now "right").
                        let mut mirrored = Vec::new();
                        let mut caption = caption;
                        for d in [FlipDirection::Horizontal, FlipDirection::Vertical] {
                            let flips = r
                                .steps
                                .iter()
                                .filter(
                                    |s| matches!(s, Step::Flip { direction } if *direction == d),
                                )
                                .count();
                            if flips % 2 == 1 {
                                let swapped = caption.as_deref().and_then(|c| {
                                    captions::mirror(c, d == FlipDirection::Horizontal)
                                });
                                if let Some(t) = swapped {
                                    caption = Some(t);
                                    mirrored.push(d);
                                }
                            }
                        }
                        let mut out = row.clone();
                        out.image_id = art.sha256[..16].to_owned();
                        out.image_key = art.key.clone();
                        out.sha256 = art.sha256.clone();
                        out.format = Some(
                            match spec.output.format {
                                OutputFormat::Jpeg => "jpeg",
                                OutputFormat::Png => "png",
                            }
                            .to_owned(),
                        );
                        out.width = Some(r.width);
                        out.height = Some(r.height);
                        out.words = caption.as_deref().map_or(0, words);
                        out.caption = caption;
                        // A score of the parent's pixels says nothing of a crop or a new caption.
                        out.clip_score = None;
                        out.paraphrases = Vec::new();
                        out.augmentation = Some(Augmentation {
                            parent: row.sha256.clone(),
                            parent_image_id: row.image_id.clone(),
                            variant: v,
                            steps: r.steps,
                            caption: change,
                            mirrored,
                        });
                        variants.push(out);
                        made += 1;
                    }
                    augmented_rows += u64::from(made > 0);
                }
                let done = ((b + 1) * BATCH).min(chosen.len());
                ctx.progress(
                    done as f32 / chosen.len() as f32,
                    format!("{done}/{} rows augmented", chosen.len()),
                )
                .await;
            }
        }
        let variant_count =
            variants.len() as u64 + rows.iter().map(|r| r.paraphrases.len() as u64).sum::<u64>();
        let mut out_rows: Vec<DatasetRow> = if spec.keep_originals {
            rows
        } else {
            Vec::new()
        };
        out_rows.extend(variants);
        if out_rows.is_empty() {
            return Err(JobError::permanent(
                "nothing_augmented",
                format!(
                    "no variant could be made ({}); no version was written",
                    skipped
                        .first()
                        .map_or("no row had an image", String::as_str)
                ),
            ));
        }
        out_rows.sort_by(|a, b| a.sha256.cmp(&b.sha256));
        let counts = VersionCounts::of_rows(&out_rows);
        let data = atelier_kit::datasets::put_rows(ctx, &out_rows).await?;
        let (manifest, manifest_ref) =
            atelier_kit::datasets::publish_version(ctx, &spec.dataset, |version| DatasetManifest {
                augmentation: Some(Box::new(spec.clone())),
                ..DatasetManifest::derived(
                    &parent,
                    version,
                    ctx.id,
                    chrono::Utc::now(),
                    counts.clone(),
                    data.clone(),
                    spec.note.clone(),
                )
            })
            .await?;
        tracing::info!(job = %ctx.id, dataset = %spec.dataset, parent = parent.version,
            version = manifest.version, variants = variant_count, skipped = skipped.len(),
            "augmented version written");
        Ok(JobOutput::Augmented(AugmentOutput {
            dataset: spec.dataset,
            parent: parent.version,
            version: manifest.version,
            manifest: manifest_ref,
            augmented_rows,
            variants: variant_count,
            negatives,
            skipped,
            counts,
        }))
    }
}

/// A row's image bytes; `None` when the object is gone (the row is skipped, not the job).
async fn fetch(ctx: &JobCtx, row: &DatasetRow) -> Result<Option<bytes::Bytes>, JobError> {
    if row.format.is_none() {
        return Ok(None);
    }
    let key = ArtifactKey::parse(&row.image_key)
        .map_err(|e| JobError::permanent("bad_artifact_key", e.to_string()))?;
    match ctx.store().get_bytes(&key).await {
        Ok(b) => Ok(Some(b)),
        Err(StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Variant `v`'s caption: the rules on a seeded stream, or the LLM.
async fn caption_variant(
    spec: &AugmentSpec,
    llm: Option<&openai::Client>,
    row: &DatasetRow,
    caption: &str,
    v: u32,
) -> Result<(String, CaptionChange), JobError> {
    match (spec.captions.paraphrase, llm) {
        (Paraphrase::Openai, Some(client)) => {
            let model = spec
                .captions
                .model
                .clone()
                .unwrap_or_else(|| client.default_model().to_owned());
            let req = openai::Request {
                model: model.clone(),
                prompt: format!(
                    "Paraphrase this image caption. Keep every fact (objects, colours, counts, positions, text in the image); change the wording and the sentence structure. Reply with the paraphrase only.\n\nCaption: {caption}"
                ),
                max_tokens: (words(caption) * 3 + 32).min(1024),
                temperature: 0.9,
            };
            let got = client.complete(&req).await.map_err(|e| match e {
                openai::CaptionError::Refused { .. } | openai::CaptionError::Config(_) => {
                    JobError::permanent("llm_refused", e.to_string())
                }
                openai::CaptionError::GaveUp { .. } => {
                    JobError::retryable("llm_unavailable", e.to_string())
                }
            })?;
            let text = got.text.trim().trim_matches('"').trim().to_owned();
            if text.is_empty() {
                return Ok((caption.to_owned(), CaptionChange::Kept));
            }
            Ok((text, CaptionChange::Openai { model }))
        }
        (Paraphrase::Rules, _) => {
            let mut rng = variant_rng(&spec.seed, &row.sha256, v, "caption");
            let (text, edits) = captions::paraphrase(caption, &mut rng);
            Ok((text, CaptionChange::Rules { edits }))
        }
        _ => Ok((caption.to_owned(), CaptionChange::Kept)),
    }
}

/// Captions of the nearest other rows in the dataset's `caption` index; `None` when the index
/// does not hold this row (indexed before it was added, or a variant of an earlier job).
async fn neighbour_negatives(
    ctx: &JobCtx,
    dataset: &str,
    row: &DatasetRow,
    n: u32,
) -> Result<Option<Vec<HardNegative>>, JobError> {
    let Some(own) = row
        .caption
        .as_deref()
        .map(str::trim)
        .filter(|c| !c.is_empty())
    else {
        return Ok(Some(Vec::new()));
    };
    let req = SearchRequest {
        dataset: dataset.to_owned(),
        space: Some(Space::Caption),
        text: None,
        image_id: Some(row.image_id.clone()),
        image_key: None,
        // Room for neighbours whose caption is the same as this one.
        k: (n * 2 + 4).min(atelier_contracts::retrieval::MAX_K),
        filter: Default::default(),
    };
    let reply = ctx
        .ask(atelier_contracts::typed::SEARCH, &req, QUERY_TIMEOUT)
        .await
        .map_err(|e| match e {
            AskError::Timeout => JobError::retryable(
                "index_unavailable",
                "the retrieval-indexer did not answer in time",
            ),
            AskError::NoAnswer(e) => JobError::retryable(
                "index_unavailable",
                format!("no retrieval-indexer answered the neighbour query ({e})"),
            ),
            AskError::Reply(e) => JobError::retryable("index_unavailable", e),
        })?;
    let found = match reply {
        SearchReply::Ok(r) => r.results,
        SearchReply::Error(e) if e.code == "record_not_found" => return Ok(None),
        SearchReply::Error(e) if e.code == "not_found" || e.code == "invalid_query" => {
            return Err(JobError::permanent(
                "no_index",
                format!(
                    "neighbour negatives need the caption index: {} (run `atelier index --dataset {dataset}`)",
                    e.message
                ),
            ))
        }
        SearchReply::Error(e) => return Err(JobError::retryable("index_unavailable", e.message)),
    };
    let own_l = own.to_lowercase();
    Ok(Some(
        found
            .into_iter()
            .filter(|h| h.sha256 != row.sha256)
            .filter_map(|h| {
                let c = h.caption?.trim().to_owned();
                (!c.is_empty() && c.to_lowercase() != own_l).then_some(HardNegative {
                    text: c,
                    kind: NegativeKind::Neighbour,
                    image_id: Some(h.image_id),
                    score: Some(h.score),
                })
            })
            .take(n as usize)
            .collect(),
    ))
}

/// Runs the augmenter; `openai` paraphrases go to the captioner's endpoint settings. The
/// `atelier-augmenter` binary and `atelier up` both call this.
pub async fn serve(
    openai: atelier_openai::OpenAiArgs,
    launch: atelier_kit::service::Launch,
) -> anyhow::Result<()> {
    let client = atelier_openai::Client::new(openai)?;
    launch
        .run(Augmenter {
            openai: Some(std::sync::Arc::new(client)),
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> AugmentSpec {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn variants_do_not_depend_on_other_rows_or_order() {
        let s = spec(serde_json::json!({
            "dataset": "d", "variants": 3, "seed": "s1",
            "transforms": [{"op": "random_crop"}, {"op": "resize", "size": 32}, {"op": "flip"}]
        }));
        let img =
            image::RgbImage::from_fn(80, 60, |x, y| image::Rgb([x as u8 * 3, y as u8 * 4, 9]));
        let a: Vec<Vec<u8>> = (0..3)
            .map(|v| render(&s, "aa", &img, v).unwrap().bytes)
            .collect();
        let b: Vec<Vec<u8>> = (0..3)
            .rev()
            .map(|v| render(&s, "aa", &img, v).unwrap().bytes)
            .collect();
        assert_eq!(a, b.into_iter().rev().collect::<Vec<_>>());
        assert_ne!(a[0], a[1], "variants differ");
        assert_ne!(
            a[0],
            render(&s, "bb", &img, 0).unwrap().bytes,
            "records differ"
        );
        let r = render(&s, "aa", &img, 0).unwrap();
        assert_eq!((r.width, r.height), (32, 32));
        let other = spec(serde_json::json!({
            "dataset": "d", "variants": 3, "seed": "s2",
            "transforms": [{"op": "random_crop"}, {"op": "resize", "size": 32}, {"op": "flip"}]
        }));
        assert_ne!(
            a[0],
            render(&other, "aa", &img, 0).unwrap().bytes,
            "seeds differ"
        );
    }
}
