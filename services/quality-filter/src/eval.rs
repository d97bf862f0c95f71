//! `eval_captions` jobs: caption metrics (BLEU, METEOR, ROUGE-L, CIDEr, SemSim) as
//! pycocoevalcap computes them.

use std::collections::BTreeMap;

use crate::models::{kv_err, QualityFilter};
use atelier_contracts::dataset::Decision;
use atelier_contracts::JobOutput;
use atelier_kit::{JobCtx, JobError};

/// The human references in an uploaded JSONL or CSV file, by image id (or sha256).
async fn human_references(
    ctx: &JobCtx,
    key: &str,
) -> Result<BTreeMap<String, Vec<String>>, JobError> {
    let k = atelier_contracts::ArtifactKey::parse(key)
        .map_err(|e| JobError::permanent("bad_artifact_key", e.to_string()))?;
    let bytes = ctx.store().get_bytes(&k).await?;
    let text = std::str::from_utf8(&bytes).map_err(|e| {
        JobError::permanent(
            "invalid_references",
            format!("{key} is not UTF-8 text: {e}"),
        )
    })?;
    atelier_caption_eval::jsonl::any_references(key, text)
        .map_err(|e| JobError::permanent("invalid_references", e.to_string()))
}

impl QualityFilter {
    pub(crate) async fn eval_captions(
        &self,
        ctx: &JobCtx,
        spec: atelier_contracts::EvalCaptionsSpec,
    ) -> Result<JobOutput, JobError> {
        spec.check()
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        let (manifest, rows) =
            atelier_kit::datasets::load_version(ctx, &spec.dataset, spec.version).await?;
        let human = match &spec.references_file {
            Some(key) => Some(human_references(ctx, key).await?),
            None => None,
        };
        let captions_kv = ctx.bucket(atelier_contracts::typed::CAPTIONS).await?;
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
            let reference: Option<Vec<String>> = match &human {
                Some(h) => h.get(&r.image_id).or_else(|| h.get(&r.sha256)).cloned(),
                None => captions_kv
                    .get(&format!("{}.{}", r.sha256, spec.references))
                    .await
                    .map_err(kv_err)?
                    .map(|c| vec![c.caption]),
            };
            match reference.filter(|cs| cs.iter().any(|c| !c.trim().is_empty())) {
                Some(cs) => {
                    refs.insert(r.image_id.clone(), cs);
                    cands.insert(r.image_id.clone(), cand.clone());
                }
                None => missing += 1,
            }
        }
        let references = spec
            .references_file
            .clone()
            .unwrap_or_else(|| spec.references.clone());
        if cands.is_empty() {
            return Err(JobError::permanent(
                "no_references",
                format!(
                    "no image of {} v{} has a reference in {references} to compare with (references are matched by image_id or sha256)",
                    spec.dataset, manifest.version
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
        let (per_image, _) = ctx.store().put_json(&scores.per_image).await?;
        Ok(JobOutput::CaptionScores(atelier_contracts::CaptionScores {
            dataset: spec.dataset,
            version: manifest.version,
            references,
            images,
            missing_references: missing,
            corpus: scores.corpus,
            per_image,
            note: (!notes.is_empty()).then(|| notes.join("; ")),
        }))
    }
}
