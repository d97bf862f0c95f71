//! The quality-filter service: turns a dataset's image records and captions into an immutable
//! dataset version.
//!
//! Consumes `filter` jobs on `atelier.v1.quality-filter.request`; reads `atelier_images` and
//! `atelier_captions`; writes the version's JSONL data file and manifest to the store
//! (content-addressed) and the manifest under `<dataset>.<version>` in `atelier_datasets`.
//! [`assess`] is the pure part: per record, the checks that failed ([`Signal`]s, each with a
//! reason and the policy's severity), a decision, a tier and a split.

pub mod dups;
pub mod nsfw;
pub mod text;
pub mod verdicts;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, OnceLock};

use atelier_contracts::dataset::{
    CaptionRecord, DatasetManifest, DatasetRow, DatasetVersionOutput, Decision, ModelVerdict,
    QualityPolicy, Severity, Signal, Split, SplitSpec, Tier, VersionCounts,
};
use atelier_contracts::images::ImageRecord;
use atelier_contracts::{JobOutput, JobSpec, Service, SCHEMA_VERSION};
use atelier_kit::bus::{dataset_images, kv_get_many, kv_put_many, kv_values};
use atelier_kit::{Handler, JobCtx, JobError};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

/// One image with the caption chosen for it, the NSFW detector's verdict and the CLIP score
/// of the pair when they ran.
pub struct Input<'a> {
    pub image: &'a ImageRecord,
    pub caption: Option<&'a CaptionRecord>,
    pub nsfw: Option<NsfwScore>,
    pub clip_score: Option<f32>,
}

/// The strongest explicit-class confidence (0 and no label when none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NsfwScore {
    pub score: f32,
    pub label: Option<&'static str>,
}

/// The split of an image: a hash of (seed, sha256) mapped to [0, 1) against the fractions, so
/// an image keeps its split in every version (no train/test leakage between versions) and each
/// tier is split in the same proportions in expectation.
pub fn split_of(split: &SplitSpec, sha256: &str) -> Split {
    let h = Sha256::new()
        .chain_update(split.seed.as_bytes())
        .chain_update([0])
        .chain_update(sha256.as_bytes())
        .finalize();
    let u =
        u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]) as f64 / 2f64.powi(64);
    if u < f64::from(split.val) {
        Split::Val
    } else if u < f64::from(split.val) + f64::from(split.test) {
        Split::Test
    } else {
        Split::Train
    }
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
    (m, v.sqrt())
}

/// Every check, the decision and the tier for each input (in input order), with the counts.
pub fn assess(
    inputs: &[Input<'_>],
    policy: &QualityPolicy,
    split: &SplitSpec,
) -> (Vec<DatasetRow>, VersionCounts) {
    let phashes: Vec<Option<u64>> = inputs
        .iter()
        .map(|i| {
            i.image
                .phash
                .as_deref()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .filter(|_| i.image.flag.is_none())
        })
        .collect();
    let dups = if policy.duplicate_max_bits >= 0 {
        dups::earlier_near_duplicates(&phashes, policy.duplicate_max_bits as u32)
    } else {
        vec![None; inputs.len()]
    };
    let word_counts: Vec<u32> = inputs
        .iter()
        .map(|i| {
            i.caption
                .map_or(0, |c| text::words(&c.caption).len() as u32)
        })
        .collect();
    let with_caption: Vec<f64> = inputs
        .iter()
        .zip(&word_counts)
        .filter(|(i, _)| i.caption.is_some_and(|c| !c.caption.trim().is_empty()))
        .map(|(_, &w)| f64::from(w))
        .collect();
    let (mean, sd) = mean_sd(&with_caption);

    let rows: Vec<DatasetRow> = inputs
        .par_iter()
        .enumerate()
        .map(|(k, input)| {
            let img = input.image;
            let mut signals: Vec<Signal> = Vec::new();
            let mut fail = |name: &str, reason: String| {
                let severity = policy.severity_of(name);
                if severity != Severity::Ignore {
                    signals.push(Signal {
                        name: name.into(),
                        reason,
                        severity,
                    });
                }
            };
            // Image.
            match (&img.flag, img.width, img.height) {
                (Some(flag), _, _) => fail("undecodable", flag.clone()),
                (None, Some(w), Some(h)) => {
                    let (short, long) = (w.min(h), w.max(h));
                    if short < policy.min_side {
                        fail(
                            "small",
                            format!("{w}x{h}: shorter side below {}", policy.min_side),
                        );
                    }
                    if short > 0 && long as f32 / short as f32 > policy.max_aspect {
                        fail(
                            "aspect",
                            format!(
                                "{w}x{h}: aspect {:.2} above {}",
                                long as f32 / short as f32,
                                policy.max_aspect
                            ),
                        );
                    }
                }
                _ => fail("undecodable", "no decoded size recorded".into()),
            }
            if let Some(j) = dups[k] {
                fail(
                    "duplicate",
                    format!(
                        "perceptual hash within {} bits of {}",
                        policy.duplicate_max_bits,
                        inputs[j].image.sha256
                    ),
                );
            }
            if let Some(n) = input.nsfw {
                if n.score >= policy.nsfw_threshold {
                    fail(
                        "nsfw",
                        format!(
                            "{} detected at {:.2} (threshold {})",
                            n.label.unwrap_or("explicit content"),
                            n.score,
                            policy.nsfw_threshold
                        ),
                    );
                }
            }
            if let Some(c) = input.clip_score {
                if policy.min_clip_score > 0.0 && c < policy.min_clip_score {
                    fail(
                        "clip_score",
                        format!(
                            "CLIP score {c:.1} of image and caption is below {}",
                            policy.min_clip_score
                        ),
                    );
                }
            }
            // Caption.
            let words = word_counts[k];
            let mut language = None;
            match input.caption {
                None => fail("no_caption", "no caption from the chosen source".into()),
                Some(c) if c.caption.trim().is_empty() => {
                    fail("empty", "the caption is empty".into())
                }
                Some(c) => {
                    let t = c.caption.as_str();
                    if words < policy.min_words {
                        fail(
                            "short",
                            format!("{words} words, below {}", policy.min_words),
                        );
                    }
                    if policy.max_words > 0 && words > policy.max_words {
                        fail(
                            "long",
                            format!("{words} words, above {}", policy.max_words),
                        );
                    }
                    if let Some(r) = text::truncated(t, c.finish_reason.as_deref()) {
                        fail("truncated", r);
                    }
                    if let Some(r) = text::repetition(t, policy.max_repeated_fraction) {
                        fail("repetition", r);
                    }
                    if let Some(r) = text::refusal(t) {
                        fail("refusal", r);
                    }
                    language = text::language(t);
                    if !policy.languages.is_empty() {
                        match language {
                            Some(l) if policy.languages.iter().any(|a| a == l) => {}
                            Some(l) => fail(
                                "language",
                                format!("{l}, not one of {}", policy.languages.join(", ")),
                            ),
                            // Too short or mixed to tell: not held against it.
                            None => {}
                        }
                    }
                    if policy.length_outlier_z > 0.0 && sd > 0.0 {
                        let z = (f64::from(words) - mean) / sd;
                        if z.abs() > f64::from(policy.length_outlier_z) {
                            fail(
                                "length_outlier",
                                format!(
                                    "{words} words, {z:+.1} standard deviations from the mean {mean:.1}"
                                ),
                            );
                        }
                    }
                }
            }
            let decision = if signals.iter().any(|s| s.severity == Severity::Reject) {
                Decision::Reject
            } else if signals.is_empty() {
                Decision::Accept
            } else {
                Decision::Flag
            };
            let tier = match decision {
                Decision::Reject => None,
                Decision::Flag => Some(Tier::Bronze),
                Decision::Accept if words >= policy.gold_min_words => Some(Tier::Gold),
                Decision::Accept => Some(Tier::Silver),
            };
            let split = tier.map(|_| split_of(split, &img.sha256));
            let first = img.sources.first();
            let tags = first
                .and_then(|s| s.metadata.get("tags"))
                .and_then(|t| t.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            DatasetRow {
                image_id: img.sha256.chars().take(16).collect(),
                image_key: img.key.clone(),
                sha256: img.sha256.clone(),
                format: img.format.clone(),
                width: img.width,
                height: img.height,
                caption: input.caption.map(|c| c.caption.clone()),
                caption_source: input.caption.map(|c| c.source.clone()),
                language: language.map(str::to_owned),
                nsfw: input.nsfw.map(|n| n.score),
                clip_score: input.clip_score,
                words,
                signals,
                decision,
                tier,
                split,
                tags,
                source: first.and_then(|s| s.source.clone()),
                license: first.and_then(|s| s.license.clone()),
                metadata: first.map(|s| s.metadata.clone()).unwrap_or_default(),
                augmentation: None,
                negatives: Vec::new(),
                paraphrases: Vec::new(),
            }
        })
        .collect();
    let counts = VersionCounts::of_rows(&rows);
    (rows, counts)
}

/// Runs filter and eval_captions jobs.
#[derive(Clone, Default)]
pub struct QualityFilter {
    /// METEOR 1.5's jar for eval_captions (left out when absent).
    pub meteor_jar: Option<std::path::PathBuf>,
    /// The MiniLM folder for eval_captions' SemSim (left out when absent).
    pub minilm: Option<std::path::PathBuf>,
    /// The NSFW detector (`320n.onnx`) and ONNX Runtime's library; filter jobs run it on every
    /// decodable image when both are set.
    pub nsfw_model: Option<std::path::PathBuf>,
    pub onnxruntime: Option<std::path::PathBuf>,
    detector: Arc<OnceLock<Result<Loaded<nsfw::NsfwDetector>, String>>>,
    /// A CLIP model folder: filter jobs score every captioned image with it when set.
    pub clip_model: Option<std::path::PathBuf>,
    clip: Arc<OnceLock<Result<Loaded<atelier_embed::clip::ClipEncoder>, String>>>,
}

/// A model loaded once per process, with its id in `atelier_verdicts` keys
/// ([`verdicts::model_id`]).
pub struct Loaded<T> {
    pub model: Arc<T>,
    pub id: String,
}

impl<T> Clone for Loaded<T> {
    fn clone(&self) -> Self {
        Self {
            model: self.model.clone(),
            id: self.id.clone(),
        }
    }
}

/// `ATELIER_NO_NSFW` set to `1` or `true`.
fn nsfw_disabled() -> bool {
    std::env::var("ATELIER_NO_NSFW").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"))
}

impl QualityFilter {
    /// With the METEOR jar, MiniLM weights and NSFW detector found where `scripts/bootstrap`
    /// installs them (or `ATELIER_METEOR_JAR`, `ATELIER_MINILM_DIR`, `ATELIER_NSFW_MODEL` and
    /// `ORT_DYLIB_PATH`); `ATELIER_NO_NSFW=1` leaves the detector out.
    pub fn discover() -> Self {
        Self {
            meteor_jar: atelier_caption_eval::meteor::find_jar(),
            minilm: atelier_embed::find_minilm(),
            nsfw_model: nsfw::find_model().filter(|_| !nsfw_disabled()),
            onnxruntime: nsfw::find_onnxruntime(),
            detector: Arc::default(),
            clip_model: atelier_embed::clip::find_clip(),
            clip: Arc::default(),
        }
    }

    /// The CLIP model, loaded once; `None` when not configured.
    fn clip(&self) -> Result<Option<Loaded<atelier_embed::clip::ClipEncoder>>, JobError> {
        let Some(dir) = &self.clip_model else {
            return Ok(None);
        };
        self.clip
            .get_or_init(|| {
                let model = atelier_embed::clip::ClipEncoder::load(dir, &candle_core::Device::Cpu)
                    .map_err(|e| e.to_string())?;
                // What the encoder reads: its config, weights and tokenizer files.
                let files: Vec<std::path::PathBuf> = [
                    "config.json",
                    "model.safetensors",
                    "tokenizer.json",
                    "vocab.json",
                    "merges.txt",
                ]
                .iter()
                .map(|f| dir.join(f))
                .filter(|p| p.is_file())
                .collect();
                let files: Vec<&std::path::Path> = files.iter().map(|p| p.as_path()).collect();
                let id = verdicts::model_id(verdicts::CLIP_TAG, &files)
                    .map_err(|e| format!("reading the CLIP model in {}: {e}", dir.display()))?;
                Ok(Loaded {
                    model: Arc::new(model),
                    id,
                })
            })
            .clone()
            .map(Some)
            .map_err(|e| JobError::permanent("clip_unavailable", e))
    }

    /// The CLIP score of each decodable image with its chosen caption (in order): kept scores from
    /// `atelier_verdicts`, the rest computed in batches and kept; all `None` without a CLIP model.
    async fn clip_scores(
        &self,
        ctx: &JobCtx,
        images: &[ImageRecord],
        captions: &[Option<&CaptionRecord>],
    ) -> Result<Vec<Option<f32>>, JobError> {
        let mut out = vec![None; images.len()];
        let Some(clip) = self.clip()? else {
            return Ok(out);
        };
        let todo: Vec<(usize, String)> = images
            .iter()
            .zip(captions)
            .enumerate()
            .filter(|(_, (img, c))| img.flag.is_none() && img.format.is_some() && c.is_some())
            .filter_map(|(i, (_, c))| {
                let text = (*c)?.caption.trim().to_string();
                (!text.is_empty()).then_some((i, text))
            })
            .collect();
        let kept_kv = ctx.bus.verdicts_kv().await.map_err(kv_err)?;
        let total = todo.len();
        let keyed = todo
            .into_iter()
            .map(|(i, text)| {
                let key = verdicts::clip_key(&clip.id, &images[i].sha256, &text);
                (key, (i, text))
            })
            .collect();
        let mut missing = Vec::new();
        for (key, (i, text), kept) in read_kept(&kept_kv, keyed).await? {
            match kept {
                Some(v) => out[i] = Some(v.score),
                None => missing.push((i, text, key)),
            }
        }
        let reused = total - missing.len();
        for (done, chunk) in missing.chunks(32).enumerate() {
            let mut decoded = Vec::with_capacity(chunk.len());
            for (i, text, key) in chunk {
                let bytes = ctx.store.get_bytes(&artifact_key(&images[*i])?).await?;
                decoded.push((*i, text.clone(), key.clone(), bytes));
            }
            let c = clip.model.clone();
            let scored = tokio::task::spawn_blocking(move || {
                let mut idx = Vec::new();
                let mut imgs = Vec::new();
                let mut texts = Vec::new();
                for (i, text, key, bytes) in decoded {
                    if let Ok(img) = image::load_from_memory(&bytes) {
                        idx.push((i, key));
                        imgs.push(img);
                        texts.push(text);
                    }
                }
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                c.scores(&imgs, &refs)
                    .map(|s| idx.into_iter().zip(s).collect::<Vec<_>>())
            })
            .await
            .map_err(|e| JobError::retryable("panicked", e.to_string()))?
            .map_err(|e| JobError::retryable("compute_failed", e.to_string()))?;
            let mut fresh = Vec::with_capacity(scored.len());
            for ((i, key), score) in scored {
                out[i] = Some(score);
                fresh.push((key, verdict(score, None)));
            }
            keep(&kept_kv, &fresh).await;
            let n = ((done + 1) * 32).min(missing.len());
            ctx.progress(
                0.6 + 0.2 * (reused + n) as f32 / total.max(1) as f32,
                Some(format!(
                    "CLIP scores: {n} of {} computed, {reused} kept from earlier jobs",
                    missing.len()
                )),
            )
            .await;
        }
        tracing::info!(job = %ctx.id, computed = missing.len(), reused, "CLIP scores");
        Ok(out)
    }

    /// The NSFW detector, loaded once (its model id from the model file); `None` when not
    /// configured.
    fn detector(&self) -> Result<Option<Loaded<nsfw::NsfwDetector>>, JobError> {
        let (Some(model), Some(lib)) = (&self.nsfw_model, &self.onnxruntime) else {
            return Ok(None);
        };
        self.detector
            .get_or_init(|| {
                let detector = nsfw::NsfwDetector::load(model, lib)?;
                let id = verdicts::model_id(verdicts::NSFW_TAG, &[model])
                    .map_err(|e| format!("reading {}: {e}", model.display()))?;
                Ok(Loaded {
                    model: Arc::new(detector),
                    id,
                })
            })
            .clone()
            .map(Some)
            .map_err(|e| JobError::permanent("nsfw_detector_unavailable", e))
    }

    /// The NSFW verdict per image (in order): kept verdicts from `atelier_verdicts`, the detector
    /// on the rest (their verdicts kept); all `None` without a detector.
    async fn nsfw_scores(
        &self,
        ctx: &JobCtx,
        images: &[ImageRecord],
    ) -> Result<Vec<Option<NsfwScore>>, JobError> {
        let mut out = vec![None; images.len()];
        let Some(detector) = self.detector()? else {
            return Ok(out);
        };
        let todo: Vec<usize> = (0..images.len())
            .filter(|&i| images[i].flag.is_none() && images[i].format.is_some())
            .collect();
        let kept_kv = ctx.bus.verdicts_kv().await.map_err(kv_err)?;
        let total = todo.len();
        let keyed = todo
            .into_iter()
            .map(|i| (verdicts::nsfw_key(&detector.id, &images[i].sha256), i))
            .collect();
        let mut missing = Vec::new();
        for (key, i, kept) in read_kept(&kept_kv, keyed).await? {
            // A label this build does not know (another detector's classes) is not reused.
            match kept.and_then(|v| nsfw_score(&v)) {
                Some(score) => out[i] = Some(score),
                None => missing.push((i, key)),
            }
        }
        let reused = total - missing.len();
        for (done, chunk) in missing.chunks(64).enumerate() {
            let mut fresh = Vec::with_capacity(chunk.len());
            for (i, key) in chunk {
                let img = &images[*i];
                let bytes = ctx.store.get_bytes(&artifact_key(img)?).await?;
                let d = detector.model.clone();
                let found = tokio::task::spawn_blocking(move || {
                    let decoded = image::load_from_memory(&bytes).map_err(|e| e.to_string())?;
                    d.detect(&decoded)
                })
                .await
                .map_err(|e| JobError::retryable("panicked", e.to_string()))?;
                match found {
                    Ok(found) => {
                        let score = match nsfw::explicit(&found) {
                            Some(e) => NsfwScore {
                                score: e.score,
                                label: Some(e.label),
                            },
                            None => NsfwScore {
                                score: 0.0,
                                label: None,
                            },
                        };
                        out[*i] = Some(score);
                        fresh.push((
                            key.clone(),
                            verdict(score.score, score.label.map(str::to_owned)),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(image = %img.sha256, error = %e, "NSFW detector failed on an image");
                    }
                }
            }
            keep(&kept_kv, &fresh).await;
            let n = ((done + 1) * 64).min(missing.len());
            ctx.progress(
                0.1 + 0.5 * (reused + n) as f32 / total.max(1) as f32,
                Some(format!(
                    "NSFW detector: {n} of {} run, {reused} verdicts kept from earlier jobs",
                    missing.len()
                )),
            )
            .await;
        }
        tracing::info!(job = %ctx.id, detected = missing.len(), reused, "NSFW verdicts");
        Ok(out)
    }
}

fn artifact_key(img: &ImageRecord) -> Result<atelier_contracts::ArtifactKey, JobError> {
    atelier_contracts::ArtifactKey::parse(&img.key)
        .map_err(|e| JobError::permanent("bad_artifact_key", e.to_string()))
}

fn verdict(score: f32, label: Option<String>) -> ModelVerdict {
    ModelVerdict {
        schema_version: SCHEMA_VERSION,
        score,
        label,
    }
}

/// Each item with the verdict kept under its key, if any.
async fn read_kept<T>(
    kv: &async_nats::jetstream::kv::Store,
    keyed: Vec<(String, T)>,
) -> Result<Vec<(String, T, Option<ModelVerdict>)>, JobError> {
    let keys: Vec<String> = keyed.iter().map(|(k, _)| k.clone()).collect();
    let kept: Vec<Option<ModelVerdict>> = kv_get_many(kv, &keys).await.map_err(kv_err)?;
    Ok(keyed
        .into_iter()
        .zip(kept)
        .map(|((key, item), kept)| (key, item, kept))
        .collect())
}

/// A kept NSFW verdict as this build's detector labels it; `None` for an unknown label.
fn nsfw_score(v: &ModelVerdict) -> Option<NsfwScore> {
    let label = match &v.label {
        Some(l) => Some(*nsfw::LABELS.iter().find(|k| *k == l)?),
        None => None,
    };
    Some(NsfwScore {
        score: v.score,
        label,
    })
}

/// Keeps fresh verdicts for later jobs; a failure costs only their reuse, so it is logged, not
/// raised.
async fn keep(kv: &async_nats::jetstream::kv::Store, fresh: &[(String, ModelVerdict)]) {
    if let Err(e) = kv_put_many(kv, fresh).await {
        tracing::warn!(error = %format!("{e:#}"), "could not keep model verdicts; later filter jobs will compute them again");
    }
}

fn kv_err(e: impl std::fmt::Display) -> JobError {
    JobError::retryable("kv_unavailable", format!("{e:#}"))
}

impl Handler for QualityFilter {
    fn service(&self) -> Service {
        Service::QualityFilter
    }

    async fn handle(&self, ctx: &JobCtx, spec: JobSpec) -> Result<JobOutput, JobError> {
        match spec {
            JobSpec::Filter(spec) => self.filter(ctx, spec).await,
            JobSpec::EvalCaptions(spec) => self.eval_captions(ctx, spec).await,
            other => Err(JobError::permanent(
                "wrong_service",
                format!("the quality filter does not run {} jobs", other.kind()),
            )),
        }
    }
}

impl QualityFilter {
    async fn filter(
        &self,
        ctx: &JobCtx,
        spec: atelier_contracts::FilterSpec,
    ) -> Result<JobOutput, JobError> {
        spec.check()
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        let datasets = ctx.bus.datasets_kv().await.map_err(kv_err)?;
        let prefix = format!("{}.", spec.dataset);
        let versions: Vec<(String, DatasetManifest)> =
            kv_values(&datasets, &prefix).await.map_err(kv_err)?;
        // A redelivered job whose version was already written returns it.
        if let Some((_, m)) = versions.iter().find(|(_, m)| m.job == ctx.id) {
            let (manifest, _) = ctx.store.put_json(m).await?;
            return Ok(JobOutput::DatasetVersion(DatasetVersionOutput {
                dataset: m.dataset.clone(),
                version: m.version,
                manifest,
                counts: m.counts.clone(),
            }));
        }
        let images_kv = ctx.bus.images_kv().await.map_err(kv_err)?;
        let images = dataset_images(&images_kv, &spec.dataset)
            .await
            .map_err(kv_err)?;
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
        let captions_kv = ctx.bus.captions_kv().await.map_err(kv_err)?;
        let mut by_image: HashMap<String, Vec<CaptionRecord>> = HashMap::new();
        for (_, c) in kv_values::<CaptionRecord>(&captions_kv, "")
            .await
            .map_err(kv_err)?
        {
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

impl QualityFilter {
    async fn eval_captions(
        &self,
        ctx: &JobCtx,
        spec: atelier_contracts::EvalCaptionsSpec,
    ) -> Result<JobOutput, JobError> {
        spec.check()
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        let (manifest, rows) =
            atelier_kit::datasets::load_version(ctx, &spec.dataset, spec.version).await?;
        let captions_kv = ctx.bus.captions_kv().await.map_err(kv_err)?;
        let mut refs = BTreeMap::new();
        let mut cands = BTreeMap::new();
        let mut missing = 0u64;
        for r in rows
            .iter()
            .filter(|r| spec.include_rejected || r.decision != Decision::Reject)
        {
            let Some(cand) = r.caption.as_ref().filter(|c| !c.trim().is_empty()) else {
                continue;
            };
            let reference = captions_kv
                .get(format!("{}.{}", r.sha256, spec.references))
                .await
                .map_err(kv_err)?
                .and_then(|v| serde_json::from_slice::<CaptionRecord>(&v).ok())
                .filter(|c| !c.caption.trim().is_empty());
            match reference {
                Some(c) => {
                    refs.insert(r.image_id.clone(), vec![c.caption]);
                    cands.insert(r.image_id.clone(), cand.clone());
                }
                None => missing += 1,
            }
        }
        if cands.is_empty() {
            return Err(JobError::permanent(
                "no_references",
                format!(
                    "no image of {} v{} has a caption from source {} to compare with",
                    spec.dataset, manifest.version, spec.references
                ),
            ));
        }
        ctx.progress(0.3, Some(format!("scoring {} images", cands.len())))
            .await;
        let images = cands.len() as u64;
        let (meteor_jar, minilm) = (self.meteor_jar.clone(), self.minilm.clone());
        let (scores, notes) = tokio::task::spawn_blocking(move || {
            let mut notes = Vec::new();
            let scored = match meteor_jar.as_deref() {
                Some(jar) => match atelier_caption_eval::meteor::Meteor::start(jar) {
                    Ok(mut m) => atelier_caption_eval::evaluate_with_meteor(&refs, &cands, &mut m),
                    Err(e) => {
                        notes.push(format!("METEOR left out: {e}"));
                        atelier_caption_eval::evaluate(&refs, &cands)
                    }
                },
                None => {
                    notes.push("METEOR left out: this worker has no meteor-1.5.jar".to_owned());
                    atelier_caption_eval::evaluate(&refs, &cands)
                }
            };
            let mut scores =
                scored.map_err(|e| JobError::permanent("eval_failed", e.to_string()))?;
            match minilm.as_deref() {
                Some(dir) => {
                    match atelier_embed::SentenceEncoder::load(dir, &candle_core::Device::Cpu) {
                        Ok(enc) => {
                            atelier_caption_eval::add_semsim(&mut scores, &refs, &cands, &enc)
                                .map_err(|e| JobError::retryable("eval_failed", e.to_string()))?
                        }
                        Err(e) => notes.push(format!("SemSim left out: {e}")),
                    }
                }
                None => notes.push("SemSim left out: this worker has no MiniLM weights".to_owned()),
            }
            Ok::<_, JobError>((scores, notes))
        })
        .await
        .map_err(|e| JobError::retryable("panicked", e.to_string()))??;
        let (per_image, _) = ctx.store.put_json(&scores.per_image).await?;
        Ok(JobOutput::CaptionScores(atelier_contracts::CaptionScores {
            dataset: spec.dataset,
            version: manifest.version,
            references: spec.references,
            images,
            missing_references: missing,
            corpus: scores.corpus,
            per_image,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        }))
    }
}

/// The quality filter's settings (flags and `ATELIER_*` variables; docs/guide.md, "Configuration").
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "quality_filter")]
pub struct Config {
    /// METEOR 1.5's jar for eval_captions jobs (default: ATELIER_METEOR_JAR, else pycocoevalcap's
    /// in .tools/).
    #[arg(long, env = "ATELIER_METEOR_JAR")]
    pub meteor_jar: Option<std::path::PathBuf>,
    /// NudeNet's 320n.onnx for the `nsfw` signal (default: ATELIER_NSFW_MODEL, else nudenet's in
    /// .tools/); ONNX Runtime's library comes from ORT_DYLIB_PATH or the onnxruntime wheel in .tools/.
    #[arg(long, env = "ATELIER_NSFW_MODEL")]
    pub nsfw_model: Option<std::path::PathBuf>,
    /// Do not run the NSFW detector.
    #[arg(long, env = "ATELIER_NO_NSFW")]
    pub no_nsfw: bool,
    /// CLIP (the `clip_score` signal; none without it) and MiniLM (eval_captions' SemSim).
    #[command(flatten)]
    pub models: atelier_embed::ModelDirs,
}

impl Config {
    /// The handler: what is configured, else what `scripts/bootstrap` installed.
    pub fn filter(&self) -> QualityFilter {
        let mut handler = QualityFilter::discover();
        if self.meteor_jar.is_some() {
            handler.meteor_jar = self.meteor_jar.clone();
        }
        handler.minilm = self.models.minilm();
        if self.nsfw_model.is_some() {
            handler.nsfw_model = self.nsfw_model.clone();
        }
        if self.no_nsfw {
            handler.nsfw_model = None;
        }
        handler.clip_model = self.models.clip();
        handler
    }
}

/// Runs the quality filter: the `atelier-quality-filter` binary and `atelier up` both call this.
pub async fn serve(config: Config, launch: atelier_kit::service::Launch) -> anyhow::Result<()> {
    launch.run(config.filter()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_contracts::dataset::CaptionSource;
    use atelier_contracts::JobId;

    fn image(n: u8, w: u32, h: u32, phash: u64) -> ImageRecord {
        let sha = format!("{:02x}", n).repeat(32);
        ImageRecord {
            schema_version: 1,
            sha256: sha.clone(),
            key: format!("sha256/{}/{sha}", &sha[..2]),
            size: 100,
            content_type: "image/png".into(),
            datasets: vec!["d".into()],
            sources: vec![],
            format: Some("png".into()),
            width: Some(w),
            height: Some(h),
            exif_orientation: Some(1),
            phash: Some(format!("{phash:016x}")),
            flag: None,
            first_seen: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        }
    }

    fn caption(img: &ImageRecord, text: &str, finish: &str) -> CaptionRecord {
        CaptionRecord {
            schema_version: 1,
            image_sha256: img.sha256.clone(),
            source_id: "0123456789abcdef".into(),
            source: CaptionSource {
                backend: "openai".into(),
                model: "m".into(),
                prompt: "p".into(),
            },
            caption: text.into(),
            finish_reason: Some(finish.into()),
            usage: Default::default(),
            job: JobId::new(),
            created_at: chrono::Utc::now(),
        }
    }

    const GOOD: &str = "The image shows a red circle and a blue rectangle on a white background.";

    #[test]
    fn signals_decisions_tiers_and_splits() {
        let mut corrupt = image(7, 0, 0, 0);
        corrupt.flag = Some("corrupt: truncated PNG".into());
        corrupt.width = None;
        let imgs = [
            image(1, 128, 128, 0x0f0f_0f0f_0f0f_0f0f),
            image(2, 128, 128, 0x0f0f_0f0f_0f0f_0f0e), // 1 bit from #1
            image(3, 32, 128, 0xffff_0000_ffff_0000),  // small and elongated
            image(4, 128, 96, 0x1234_5678_9abc_def0),
            image(5, 128, 96, 0x0fed_cba9_8765_4321),
            image(6, 128, 96, 0x5555_aaaa_5555_aaaa),
            corrupt,
            image(8, 128, 96, 0x3333_cccc_3333_cccc),
        ];
        let caps = [
            Some(caption(&imgs[0], GOOD, "stop")),
            Some(caption(&imgs[1], GOOD, "stop")),
            Some(caption(&imgs[2], GOOD, "stop")),
            Some(caption(&imgs[3], "I'm sorry, but I can't help with that request.", "stop")),
            Some(caption(
                &imgs[4],
                "The image shows a red circle and a blue rectangle on a white background and the circle is",
                "length",
            )),
            Some(caption(&imgs[5], "Red circle.", "stop")),
            None,
            None,
        ];
        let inputs: Vec<Input<'_>> = imgs
            .iter()
            .zip(&caps)
            .map(|(image, c)| Input {
                image,
                caption: c.as_ref(),
                nsfw: None,
                clip_score: None,
            })
            .collect();
        let policy = QualityPolicy::default();
        let (rows, counts) = assess(&inputs, &policy, &SplitSpec::default());
        let names =
            |i: usize| -> Vec<&str> { rows[i].signals.iter().map(|s| s.name.as_str()).collect() };
        assert!(names(0).is_empty(), "{:?}", rows[0].signals);
        assert_eq!(
            (rows[0].decision, rows[0].tier),
            (Decision::Accept, Some(Tier::Gold))
        );
        assert_eq!(names(1), ["duplicate"]);
        assert!(rows[1].signals[0].reason.contains(&imgs[0].sha256));
        assert_eq!(rows[1].decision, Decision::Reject);
        assert_eq!(rows[1].tier, None);
        assert_eq!(rows[1].split, None);
        assert_eq!(names(2), ["small", "aspect"]);
        assert_eq!(names(3), ["refusal"]);
        assert_eq!(names(4), ["truncated"]);
        assert_eq!(
            (rows[4].decision, rows[4].tier),
            (Decision::Flag, Some(Tier::Bronze))
        );
        assert_eq!(names(5), ["short"]);
        assert_eq!(names(6), ["undecodable", "no_caption"]);
        assert_eq!(names(7), ["no_caption"]);
        assert_eq!(rows[0].language.as_deref(), Some("eng"));
        assert_eq!(counts.rows, 8);
        assert_eq!(
            (counts.accepted, counts.flagged, counts.rejected),
            (1, 2, 5)
        );
        assert_eq!(counts.signals["no_caption"], 2);
        assert_eq!(counts.tiers.values().sum::<u64>(), 3);
        assert_eq!(counts.splits.values().sum::<u64>(), 3);

        // A policy can lower a signal to a flag or ignore it.
        let mut lenient = policy.clone();
        lenient.severity.insert("refusal".into(), Severity::Flag);
        lenient.severity.insert("short".into(), Severity::Ignore);
        let (rows2, _) = assess(&inputs, &lenient, &SplitSpec::default());
        assert_eq!(rows2[3].decision, Decision::Flag);
        assert_eq!(rows2[5].decision, Decision::Accept);
        assert_eq!(rows2[5].tier, Some(Tier::Silver));
    }

    #[test]
    fn nsfw_verdicts_become_a_signal_at_the_threshold() {
        let imgs = [
            image(1, 128, 128, 1),
            image(2, 128, 128, u64::MAX),
            image(3, 128, 128, 0x00ff_00ff_00ff_00ff),
        ];
        let caps: Vec<CaptionRecord> = imgs.iter().map(|i| caption(i, GOOD, "stop")).collect();
        let verdicts = [
            Some(NsfwScore {
                score: 0.81,
                label: Some("BUTTOCKS_EXPOSED"),
            }),
            Some(NsfwScore {
                score: 0.0,
                label: None,
            }),
            None,
        ];
        let inputs: Vec<Input<'_>> = (0..3)
            .map(|k| Input {
                image: &imgs[k],
                caption: Some(&caps[k]),
                nsfw: verdicts[k],
                clip_score: None,
            })
            .collect();
        let (rows, counts) = assess(&inputs, &QualityPolicy::default(), &SplitSpec::default());
        assert_eq!(rows[0].decision, Decision::Reject);
        assert_eq!(rows[0].signals[0].name, "nsfw");
        assert!(rows[0].signals[0]
            .reason
            .contains("BUTTOCKS_EXPOSED detected at 0.81"));
        assert_eq!(rows[0].nsfw, Some(0.81));
        assert_eq!(
            (rows[1].decision, rows[1].nsfw),
            (Decision::Accept, Some(0.0))
        );
        assert_eq!((rows[2].decision, rows[2].nsfw), (Decision::Accept, None));
        assert_eq!(counts.signals["nsfw"], 1);
        let lenient = QualityPolicy {
            nsfw_threshold: 0.9,
            ..Default::default()
        };
        assert_eq!(
            assess(&inputs, &lenient, &SplitSpec::default()).0[0].decision,
            Decision::Accept
        );
    }

    #[test]
    fn low_clip_scores_are_flagged_at_the_threshold() {
        let imgs = [
            image(1, 128, 128, 1),
            image(2, 128, 128, u64::MAX),
            image(3, 128, 128, 0x00ff_00ff_00ff_00ff),
        ];
        let caps: Vec<CaptionRecord> = imgs.iter().map(|i| caption(i, GOOD, "stop")).collect();
        let scores = [Some(12.5), Some(31.0), None];
        let inputs: Vec<Input<'_>> = (0..3)
            .map(|k| Input {
                image: &imgs[k],
                caption: Some(&caps[k]),
                nsfw: None,
                clip_score: scores[k],
            })
            .collect();
        let (rows, counts) = assess(&inputs, &QualityPolicy::default(), &SplitSpec::default());
        assert_eq!(rows[0].decision, Decision::Flag);
        assert_eq!(rows[0].signals[0].name, "clip_score");
        assert!(
            rows[0].signals[0].reason.contains("12.5"),
            "{:?}",
            rows[0].signals
        );
        assert_eq!(rows[0].clip_score, Some(12.5));
        assert_eq!(
            (rows[1].decision, rows[1].clip_score),
            (Decision::Accept, Some(31.0))
        );
        assert_eq!(
            (rows[2].decision, rows[2].clip_score),
            (Decision::Accept, None)
        );
        assert_eq!(counts.signals["clip_score"], 1);
        let off = QualityPolicy {
            min_clip_score: 0.0,
            ..Default::default()
        };
        assert_eq!(
            assess(&inputs, &off, &SplitSpec::default()).0[0].decision,
            Decision::Accept
        );
    }

    #[test]
    fn splits_are_stable_and_follow_the_fractions() {
        let spec = SplitSpec {
            val: 0.1,
            test: 0.2,
            seed: "s".into(),
        };
        let shas: Vec<String> = (0..5000u32).map(|i| format!("{i:064x}")).collect();
        let splits: Vec<Split> = shas.iter().map(|s| split_of(&spec, s)).collect();
        let share = |k: Split| splits.iter().filter(|&&s| s == k).count() as f64 / 5000.0;
        assert!((share(Split::Val) - 0.1).abs() < 0.02);
        assert!((share(Split::Test) - 0.2).abs() < 0.02);
        // The same image keeps its split; another seed reshuffles.
        assert_eq!(split_of(&spec, &shas[17]), splits[17]);
        let other = SplitSpec {
            seed: "t".into(),
            ..spec.clone()
        };
        let moved = shas
            .iter()
            .zip(&splits)
            .filter(|(s, k)| split_of(&other, s) != **k)
            .count();
        assert!(moved > 1000);
    }
}
