//! The models the filter runs (CLIP score, NSFW detector), loaded once per process, and the
//! verdicts they leave in `atelier_verdicts` so a rerun does not score an image twice.

use std::sync::{Arc, OnceLock};

use crate::policy::NsfwScore;
use crate::{nsfw, verdicts};
use atelier_contracts::dataset::{CaptionRecord, ModelVerdict};
use atelier_contracts::images::ImageRecord;
use atelier_contracts::SCHEMA_VERSION;
use atelier_kit::kv::Kv;
use atelier_kit::{JobCtx, JobError};

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
    /// The detector was turned off on purpose (`--no-nsfw`): filter jobs go on without the
    /// `nsfw` signal. Not off and not found, a job whose policy uses the signal fails.
    pub nsfw_off: bool,
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
            nsfw_off: nsfw_disabled(),
            detector: Arc::default(),
            clip_model: atelier_embed::clip::find_clip(),
            clip: Arc::default(),
        }
    }

    /// Says at start which models this worker runs, and what is off.
    pub fn log_models(&self) {
        let show = |p: &Option<std::path::PathBuf>| {
            p.as_ref()
                .map_or("not found".to_owned(), |p| p.display().to_string())
        };
        let nsfw = match (&self.nsfw_model, &self.onnxruntime, self.nsfw_off) {
            (_, _, true) => "off (--no-nsfw)".to_owned(),
            (Some(m), Some(_), _) => m.display().to_string(),
            _ => "not found: filter jobs whose policy uses `nsfw` fail (set ATELIER_NSFW_MODEL and ORT_DYLIB_PATH, run scripts/bootstrap, or ATELIER_NO_NSFW=1)".to_owned(),
        };
        tracing::info!(nsfw = %nsfw, clip = %show(&self.clip_model), minilm = %show(&self.minilm),
            meteor = %show(&self.meteor_jar), "quality filter models");
    }

    /// Fails a job whose policy uses the `nsfw` signal when the detector is neither available
    /// nor turned off on purpose.
    pub(crate) fn require_nsfw(
        &self,
        policy: &atelier_contracts::dataset::QualityPolicy,
    ) -> Result<(), JobError> {
        let available = self.nsfw_model.is_some() && self.onnxruntime.is_some();
        let used = policy.severity_of("nsfw") != atelier_contracts::dataset::Severity::Ignore;
        if available || self.nsfw_off || !used {
            return Ok(());
        }
        Err(JobError::permanent(
            "nsfw_unavailable",
            "the policy uses the nsfw signal but this quality filter has no NSFW detector: install it (scripts/bootstrap), point ATELIER_NSFW_MODEL and ORT_DYLIB_PATH at nudenet's 320n.onnx and libonnxruntime, start the worker with --no-nsfw (ATELIER_NO_NSFW=1) to go without it, or set the policy's nsfw severity to ignore",
        ))
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
    pub(crate) async fn clip_scores(
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
        let kept_kv = ctx.bucket(atelier_contracts::typed::VERDICTS).await?;
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
                let bytes = ctx.store().get_bytes(&artifact_key(&images[*i])?).await?;
                decoded.push((*i, text.clone(), key.clone(), bytes));
            }
            let c = clip.model.clone();
            let scored = tokio::task::spawn_blocking(move || {
                let mut idx = Vec::new();
                let mut imgs = Vec::new();
                let mut texts = Vec::new();
                for (i, text, key, bytes) in decoded {
                    if let Ok(img) =
                        atelier_decode::decode(&bytes, &atelier_decode::Limits::default())
                    {
                        idx.push((i, key));
                        imgs.push(img.into_image());
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
    pub(crate) async fn nsfw_scores(
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
        let kept_kv = ctx.bucket(atelier_contracts::typed::VERDICTS).await?;
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
                let bytes = ctx.store().get_bytes(&artifact_key(img)?).await?;
                let d = detector.model.clone();
                let found = tokio::task::spawn_blocking(move || {
                    let decoded =
                        atelier_decode::decode(&bytes, &atelier_decode::Limits::default())
                            .map_err(|e| e.to_string())?;
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
    kv: &Kv<ModelVerdict>,
    keyed: Vec<(String, T)>,
) -> Result<Vec<(String, T, Option<ModelVerdict>)>, JobError> {
    let keys: Vec<String> = keyed.iter().map(|(k, _)| k.clone()).collect();
    let kept: Vec<Option<ModelVerdict>> = kv.get_many(&keys).await.map_err(kv_err)?;
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
async fn keep(kv: &Kv<ModelVerdict>, fresh: &[(String, ModelVerdict)]) {
    if let Err(e) = kv.put_many(fresh).await {
        tracing::warn!(error = %format!("{e:#}"), "could not keep model verdicts; later filter jobs will compute them again");
    }
}

pub(crate) fn kv_err(e: impl std::fmt::Display) -> JobError {
    JobError::retryable("kv_unavailable", format!("{e:#}"))
}
