//! Curation: rows of a dataset version chosen into a new, immutable version by semantic queries,
//! caption keywords, metadata predicates, near-duplicate removal and a seeded limit.
//!
//! Determinism: semantic scores are exact (the query against each row's stored vector), dedup
//! walks the rows in sha256 order against the neighbours the recorded graph returns, and the
//! limit keeps the rows with the smallest sha256(seed ‖ row sha256). So the same spec on the same
//! version and index gives the same rows.

use std::collections::{BTreeMap, HashSet};

use atelier_contracts::dataset::Decision;
use atelier_contracts::retrieval::{Combine, Curation, Keywords};
use atelier_contracts::typed::INDEXES;
use atelier_contracts::{CurateOutput, CurateSpec, DatasetManifest, DatasetRow, JobOutput, Space};
use atelier_kit::{JobCtx, JobError};
use sha2::{Digest, Sha256};

use crate::state::{key_of, LoadedIndex};
use crate::{load_err, Indexer};

/// Neighbours looked at per row when removing near-duplicates.
pub const DEDUP_NEIGHBOURS: usize = 16;

/// Lower-case words of `text` (letters and digits; everything else separates).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether the word sequence `phrase` occurs in `hay`.
fn contains_phrase(hay: &[String], phrase: &[String]) -> bool {
    !phrase.is_empty() && hay.windows(phrase.len()).any(|w| w == phrase)
}

/// Whether a caption satisfies the keyword predicates.
pub fn keywords_match(k: &Keywords, caption: Option<&str>) -> bool {
    if k.all.is_empty() && k.any.is_empty() && k.none.is_empty() {
        return true;
    }
    let hay = words(caption.unwrap_or(""));
    let has = |kw: &String| contains_phrase(&hay, &words(kw));
    k.all.iter().all(has) && (k.any.is_empty() || k.any.iter().any(has)) && !k.none.iter().any(has)
}

/// Rows passing the decision, metadata and keyword predicates, in sha256 order.
pub fn prefilter<'a>(spec: &CurateSpec, rows: &'a [DatasetRow]) -> Vec<&'a DatasetRow> {
    let mut out: Vec<&DatasetRow> = rows
        .iter()
        .filter(|r| {
            r.decision == Decision::Accept || (spec.include_flagged && r.decision == Decision::Flag)
        })
        .filter(|r| spec.filter.matches(r))
        .filter(|r| keywords_match(&spec.keywords, r.caption.as_deref()))
        .collect();
    out.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    out
}

/// The rows with the smallest sha256(seed ‖ sha256), at most `limit`, back in sha256 order.
pub fn draw<'a>(rows: Vec<&'a DatasetRow>, limit: usize, seed: &str) -> Vec<&'a DatasetRow> {
    if rows.len() <= limit {
        return rows;
    }
    let mut keyed: Vec<([u8; 32], &DatasetRow)> = rows
        .into_iter()
        .map(|r| {
            let mut h = Sha256::new();
            h.update(seed.as_bytes());
            h.update([0]);
            h.update(r.sha256.as_bytes());
            (h.finalize().into(), r)
        })
        .collect();
    keyed.sort_by_key(|k| k.0);
    let mut out: Vec<&DatasetRow> = keyed.into_iter().take(limit).map(|(_, r)| r).collect();
    out.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    out
}

pub async fn run(indexer: &Indexer, ctx: &JobCtx, spec: CurateSpec) -> Result<JobOutput, JobError> {
    spec.check()
        .map_err(|e| JobError::permanent("invalid_job", e))?;
    let versions = atelier_kit::datasets::versions(ctx, &spec.dataset).await?;
    if let Some(m) = versions.iter().find(|m| m.job == ctx.id) {
        // A redelivery of a job that already wrote its version.
        let (manifest, _) = ctx.store().put_json(m).await?;
        let c = m.curation.as_ref();
        return Ok(JobOutput::Curated(CurateOutput {
            dataset: m.dataset.clone(),
            parent: m.parent.unwrap_or(0),
            version: Some(m.version),
            manifest: Some(manifest),
            matched: m.counts.rows,
            duplicates_removed: c.map_or(0, |c| c.duplicates_removed),
            counts: m.counts.clone(),
            note: m.note.clone(),
        }));
    }
    let (parent, rows) =
        atelier_kit::datasets::load_version(ctx, &spec.dataset, spec.version).await?;
    let mut chosen = prefilter(&spec, &rows);
    let needs_index = !spec.queries.is_empty() || spec.dedup.is_some();
    let index = if needs_index {
        Some(
            indexer
                .cache
                .get(&ctx.bucket(INDEXES).await?, ctx.store(), &spec.dataset)
                .await
                .map_err(load_err)?
                .ok_or_else(|| {
                    JobError::permanent(
                        "no_index",
                        format!(
                            "semantic queries and dedup need the dataset's index: run `atelier index --dataset {} --version {}` first",
                            spec.dataset, parent.version
                        ),
                    )
                })?,
        )
    } else {
        None
    };
    let mut graphs = BTreeMap::new();
    if let Some(index) = &index {
        let mut used: Vec<Space> = spec.queries.iter().map(|q| q.space).collect();
        used.extend(spec.dedup.as_ref().map(|d| d.space));
        for space in used {
            let Some(s) = index.manifest.spaces.get(&space) else {
                return Err(JobError::permanent(
                    "unknown_space",
                    format!("the index of {} has no space {space}", spec.dataset),
                ));
            };
            graphs.insert(space, s.graph.key.clone());
            let missing = chosen
                .iter()
                .filter(|r| key_of(&r.sha256).is_none_or(|k| !index.spaces[&space].contains(k)))
                .filter(|r| {
                    !space.is_text() || r.caption.as_deref().is_some_and(|c| !c.trim().is_empty())
                })
                .count();
            if missing > 0 {
                return Err(JobError::permanent(
                    "index_stale",
                    format!(
                        "{missing} rows of version {} are not in space {space} of the index (it holds version {}): run `atelier index --dataset {} --version {}`",
                        parent.version, index.manifest.version, spec.dataset, parent.version
                    ),
                ));
            }
        }
    }
    if let Some(index) = &index {
        if !spec.queries.is_empty() {
            chosen = semantic(indexer, index, &spec, chosen).await?;
        }
    }
    let matched = chosen.len() as u64;
    let mut duplicates_removed = 0;
    if let (Some(index), Some(d)) = (&index, &spec.dedup) {
        let before = chosen.len();
        chosen = dedup(index, d.space, d.threshold, chosen);
        duplicates_removed = (before - chosen.len()) as u64;
    }
    if let Some(limit) = spec.limit {
        chosen = draw(chosen, limit as usize, &spec.seed);
    }
    let picked: Vec<DatasetRow> = chosen.into_iter().cloned().collect();
    let counts = atelier_contracts::dataset::VersionCounts::of_rows(&picked);
    if picked.is_empty() {
        return Ok(JobOutput::Curated(CurateOutput {
            dataset: spec.dataset.clone(),
            parent: parent.version,
            version: None,
            manifest: None,
            matched,
            duplicates_removed,
            counts,
            note: Some(format!(
                "the curation matched no row of version {}; no version was written",
                parent.version
            )),
        }));
    }
    let data = atelier_kit::datasets::put_rows(ctx, &picked).await?;
    let curation = Curation {
        spec: spec.clone(),
        graphs,
        duplicates_removed,
    };
    let (manifest, manifest_ref) =
        atelier_kit::datasets::publish_version(ctx, &spec.dataset, |version| DatasetManifest {
            curation: Some(curation.clone()),
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
        version = manifest.version, rows = counts.rows, "curated version written");
    Ok(JobOutput::Curated(CurateOutput {
        dataset: spec.dataset,
        parent: parent.version,
        version: Some(manifest.version),
        manifest: Some(manifest_ref),
        matched,
        duplicates_removed,
        counts,
        note: None,
    }))
}

/// Rows meeting the semantic queries (any or all), scored exactly against their stored vectors.
async fn semantic<'a>(
    indexer: &Indexer,
    index: &LoadedIndex,
    spec: &CurateSpec,
    rows: Vec<&'a DatasetRow>,
) -> Result<Vec<&'a DatasetRow>, JobError> {
    let mut pass: Vec<usize> = vec![0; rows.len()];
    for q in &spec.queries {
        indexer
            .models
            .check(q.space, &index.manifest.spaces[&q.space].model)
            .map_err(|e| JobError::permanent("model_mismatch", e))?;
        let models = indexer.models.clone();
        let (space, text) = (q.space, q.text.clone());
        let v = tokio::task::spawn_blocking(move || models.embed_texts(space, &[&text]))
            .await
            .map_err(|e| JobError::retryable("panicked", e.to_string()))?
            .map_err(|e| JobError::retryable("compute_failed", e))?;
        let qv = atelier_ann::normalised(&v[0])
            .map_err(|e| JobError::permanent("compute_failed", e.to_string()))?;
        let graph = &index.spaces[&q.space];
        for (i, r) in rows.iter().enumerate() {
            let score = key_of(&r.sha256)
                .and_then(|k| graph.get(k))
                .map(|rv| atelier_ann::dot(&qv, &rv));
            if score.is_some_and(|s| s >= q.min_score) {
                pass[i] += 1;
            }
        }
    }
    let need = match spec.combine {
        Combine::Any => 1,
        Combine::All => spec.queries.len(),
    };
    Ok(rows
        .into_iter()
        .zip(pass)
        .filter(|(_, p)| *p >= need)
        .map(|(r, _)| r)
        .collect())
}

/// Walks `rows` (sha256 order) and drops a row when a row kept before it is a neighbour with
/// cosine ≥ `threshold`.
pub fn dedup<'a>(
    index: &LoadedIndex,
    space: Space,
    threshold: f32,
    rows: Vec<&'a DatasetRow>,
) -> Vec<&'a DatasetRow> {
    let graph = &index.spaces[&space];
    let candidates: HashSet<u64> = rows.iter().filter_map(|r| key_of(&r.sha256)).collect();
    let mut kept: HashSet<u64> = HashSet::new();
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(k) = key_of(&r.sha256) else {
            continue;
        };
        let Some(v) = graph.get(k) else {
            // Not embedded in this space (no caption): nothing to compare; kept.
            out.push(r);
            continue;
        };
        let near = graph
            .search_filtered(&v, DEDUP_NEIGHBOURS, |n| n != k && candidates.contains(&n))
            .unwrap_or_default();
        let dup = near
            .iter()
            .any(|h| h.score >= threshold && kept.contains(&h.key));
        if !dup {
            kept.insert(k);
            out.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(sha: &str, caption: &str, decision: Decision) -> DatasetRow {
        serde_json::from_value(serde_json::json!({
            "image_id": &sha[..16], "image_key": "k", "sha256": sha, "words": 1, "signals": [],
            "decision": decision, "caption": caption, "tags": ["t"]
        }))
        .unwrap()
    }

    #[test]
    fn keywords_are_whole_words_and_phrases() {
        let k = |all: &[&str], any: &[&str], none: &[&str]| Keywords {
            all: all.iter().map(|s| s.to_string()).collect(),
            any: any.iter().map(|s| s.to_string()).collect(),
            none: none.iter().map(|s| s.to_string()).collect(),
        };
        let c = Some("A red Circle, beside a blue square.");
        assert!(keywords_match(&k(&["red circle"], &[], &[]), c));
        assert!(!keywords_match(&k(&["circle red"], &[], &[]), c));
        assert!(
            !keywords_match(&k(&["re"], &[], &[]), c),
            "not a substring match"
        );
        assert!(keywords_match(&k(&[], &["green", "BLUE"], &[]), c));
        assert!(!keywords_match(&k(&[], &["green"], &[]), c));
        assert!(!keywords_match(&k(&[], &[], &["square"]), c));
        assert!(!keywords_match(&k(&["red"], &[], &[]), None));
        assert!(keywords_match(&k(&[], &[], &[]), None));
    }

    #[test]
    fn prefilter_and_draw_are_deterministic() {
        let rows: Vec<DatasetRow> = (0..40)
            .map(|i| {
                let sha = format!("{:064x}", (i * 7919 + 13) % 1000);
                let d = match i % 4 {
                    0 => Decision::Flag,
                    1 => Decision::Reject,
                    _ => Decision::Accept,
                };
                row(&sha, if i % 2 == 0 { "a red cat" } else { "a dog" }, d)
            })
            .collect();
        let spec: CurateSpec = serde_json::from_value(serde_json::json!({
            "dataset": "d", "keywords": {"any": ["cat", "dog"]}
        }))
        .unwrap();
        let a = prefilter(&spec, &rows);
        assert_eq!(a.len(), 20, "accepted only");
        assert!(a.windows(2).all(|w| w[0].sha256 < w[1].sha256));
        let flagged = CurateSpec {
            include_flagged: true,
            ..spec.clone()
        };
        assert_eq!(prefilter(&flagged, &rows).len(), 30);
        let x = draw(a.clone(), 5, "s1");
        assert_eq!(x.len(), 5);
        assert_eq!(x, draw(a.clone(), 5, "s1"));
        assert_ne!(x, draw(a.clone(), 5, "s2"));
        assert!(x.windows(2).all(|w| w[0].sha256 < w[1].sha256));
        assert_eq!(draw(a.clone(), 100, "s").len(), 20);
    }
}
