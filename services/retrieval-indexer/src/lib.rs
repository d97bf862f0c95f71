//! The retrieval-indexer service.
//!
//! Consumes `index` jobs (embed a dataset version's kept rows into its search spaces) and
//! `curate` jobs (a new dataset version chosen by semantic queries, caption keywords, metadata
//! and near-duplicate removal), and answers queries on `atelier.v1.retrieval.query`
//! ([`query::serve`]). A dataset's index is a manifest in KV `atelier_indexes` naming
//! content-addressed files: the indexed rows, one HNSW graph per space and the embedding
//! segments, so any replica loads it and a restarted indexer resumes without re-embedding.

pub mod curate;
pub mod models;
pub mod query;
pub mod segment;
pub mod state;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use atelier_ann::{AnnIndex, AnnParams};
use atelier_contracts::retrieval::{SpaceCounts, SpaceIndex};
use atelier_contracts::typed::INDEXES;
use atelier_contracts::{
    dataset::Decision, ArtifactKey, ArtifactRef, IndexManifest, IndexOutput, IndexSpec, JobOutput,
    JobSpec, Service, Space, SCHEMA_VERSION,
};
use atelier_kit::kv::WriteError;
use atelier_kit::{Handler, JobCtx, JobError};

pub use models::Models;
use state::{key_of, LoadError};

/// Records embedded per forward pass.
pub const EMBED_BATCH: usize = 32;
/// Segments a space may accumulate before an index job merges them into one.
pub const MAX_SEGMENTS: usize = 8;

#[derive(Clone)]
pub struct Indexer {
    pub models: Models,
    pub params: AnnParams,
    pub cache: state::Cache,
}

impl Indexer {
    pub fn new(models: Models) -> Self {
        Self {
            models,
            params: AnnParams::default(),
            cache: state::Cache::default(),
        }
    }
}

fn kv_err(e: impl std::fmt::Display) -> JobError {
    JobError::retryable("kv_unavailable", e.to_string())
}

pub(crate) fn load_err(e: LoadError) -> JobError {
    match e {
        LoadError::Unavailable(m) => JobError::retryable("store_unavailable", m),
        LoadError::Corrupt(m) => JobError::permanent("corrupt_index", m),
    }
}

fn blocking_err(e: tokio::task::JoinError) -> JobError {
    JobError::retryable("panicked", e.to_string())
}

impl Handler for Indexer {
    fn service(&self) -> Service {
        Service::RetrievalIndexer
    }

    async fn handle(&self, ctx: &JobCtx, spec: JobSpec) -> Result<JobOutput, JobError> {
        match spec {
            JobSpec::Index(spec) => self.index(ctx, spec).await,
            JobSpec::Curate(spec) => curate::run(self, ctx, *spec).await,
            other => Err(JobError::permanent(
                "wrong_service",
                format!("the retrieval-indexer does not run {} jobs", other.kind()),
            )),
        }
    }
}

/// What a row contributes to a space: its image key (image space) or caption (text spaces).
fn input_of(space: Space, row: &atelier_contracts::DatasetRow) -> Option<String> {
    if space.is_text() {
        row.caption
            .as_ref()
            .map(|c| c.trim().to_owned())
            .filter(|c| !c.is_empty())
    } else {
        row.format.as_ref().map(|_| row.image_key.clone())
    }
}

impl Indexer {
    async fn index(&self, ctx: &JobCtx, spec: IndexSpec) -> Result<JobOutput, JobError> {
        spec.check()
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        let (version, rows) =
            atelier_kit::datasets::load_version(ctx, &spec.dataset, spec.version).await?;
        let indexes = ctx.bucket(INDEXES).await?;
        let existing = state::current(&indexes, &spec.dataset)
            .await
            .map_err(load_err)?;
        if let Some((m, _)) = &existing {
            if m.job == ctx.id {
                // A redelivery of a job that already wrote its manifest.
                return Ok(JobOutput::Indexed(IndexOutput {
                    dataset: m.dataset.clone(),
                    version: m.version,
                    spaces: m
                        .spaces
                        .iter()
                        .map(|(s, i)| {
                            (
                                *s,
                                SpaceCounts {
                                    count: i.count,
                                    ..Default::default()
                                },
                            )
                        })
                        .collect(),
                }));
            }
        }
        let mut spaces: BTreeSet<Space> = if spec.spaces.is_empty() {
            self.models.spaces().into_iter().collect()
        } else {
            spec.spaces.iter().copied().collect()
        };
        if let Some((m, _)) = &existing {
            spaces.extend(m.spaces.keys().copied());
        }
        if spaces.is_empty() {
            return Err(JobError::permanent(
                "no_models",
                "this worker has no embedding model: start the retrieval-indexer with --clip-model DIR and/or the MiniLM folder (scripts/bootstrap installs it)",
            ));
        }
        for s in &spaces {
            self.models
                .id(*s)
                .map_err(|e| JobError::permanent("model_unavailable", e))?;
        }
        let kept: Vec<_> = rows
            .into_iter()
            .filter(|r| r.decision != Decision::Reject)
            .filter(|r| key_of(&r.sha256).is_some())
            .collect();
        let live: HashSet<u64> = kept.iter().filter_map(|r| key_of(&r.sha256)).collect();
        let prev_keys: HashSet<u64> = match &existing {
            Some((m, _)) => state::parse_rows(
                &state::fetch(ctx.store(), &m.rows.key)
                    .await
                    .map_err(load_err)?,
            )
            .map_err(load_err)?
            .iter()
            .filter_map(|r| key_of(&r.sha256))
            .collect(),
            None => HashSet::new(),
        };
        let params = existing
            .as_ref()
            .map(|(m, _)| state::params_of(m.params))
            .unwrap_or(self.params);
        let mut out_spaces = BTreeMap::new();
        let mut counts = BTreeMap::new();
        let n_spaces = spaces.len();
        for (si, space) in spaces.into_iter().enumerate() {
            let model = self
                .models
                .id(space)
                .map_err(|e| JobError::permanent("model_unavailable", e))?;
            let prior = existing
                .as_ref()
                .and_then(|(m, _)| m.spaces.get(&space).map(|s| (m, s)))
                .filter(|(_, s)| s.model == model);
            let (graph, mut segments) = match prior {
                Some((m, s)) => (
                    state::load_graph(ctx.store(), m, space, &prev_keys)
                        .await
                        .map_err(load_err)?,
                    s.segments.clone(),
                ),
                None => (None, Vec::new()),
            };
            let mut c = SpaceCounts::default();
            let graph = match graph {
                Some(g) => g,
                None => {
                    let models = self.models.clone();
                    let dim = tokio::task::spawn_blocking(move || {
                        models.embed_texts(space, &["a"]).map(|v| v[0].len())
                    })
                    .await
                    .map_err(blocking_err)?
                    .map_err(|e| JobError::permanent("model_unavailable", e))?;
                    AnnIndex::new(dim, params)
                        .map_err(|e| JobError::permanent("internal", e.to_string()))?
                }
            };
            for k in prev_keys.difference(&live) {
                if graph
                    .remove(*k)
                    .map_err(|e| JobError::permanent("internal", e.to_string()))?
                {
                    c.removed += 1;
                }
            }
            // Deleted slots stay in the graph until it is rebuilt; once they outnumber the live
            // entries, walks pay for them, so the graph is rebuilt from its own vectors.
            let graph = if graph.deleted() > graph.len().max(64) {
                tokio::task::spawn_blocking(move || graph.compacted())
                    .await
                    .map_err(blocking_err)?
                    .map_err(|e| JobError::permanent("internal", e.to_string()))?
            } else {
                graph
            };
            let todo: Vec<(u64, String)> = kept
                .iter()
                .filter_map(|r| {
                    let k = key_of(&r.sha256)?;
                    (!graph.contains(k)).then_some((k, input_of(space, r)?))
                })
                .collect();
            c.skipped = kept.iter().filter(|r| input_of(space, r).is_none()).count() as u64;
            let mut embedded: Vec<(u64, Vec<f32>)> = Vec::with_capacity(todo.len());
            for (bi, batch) in todo.chunks(EMBED_BATCH).enumerate() {
                if ctx.is_cancelled() {
                    return Err(JobError::permanent("cancelled", "index job cancelled"));
                }
                let (vectors, skipped) = self.embed_batch(ctx, space, batch).await?;
                c.skipped += skipped;
                embedded.extend(vectors);
                let done = ((bi + 1) * EMBED_BATCH).min(todo.len());
                ctx.progress(
                    (si as f32 + done as f32 / todo.len().max(1) as f32) / n_spaces as f32 * 0.9,
                    Some(format!("{space}: embedded {done} of {}", todo.len())),
                )
                .await;
            }
            let items: Vec<(u64, &[f32])> =
                embedded.iter().map(|(k, v)| (*k, v.as_slice())).collect();
            graph
                .insert_many(&items)
                .map_err(|e| JobError::permanent("internal", e.to_string()))?;
            c.embedded = embedded.len() as u64;
            if !embedded.is_empty() {
                let bytes = segment::encode(graph.dim(), &embedded);
                let (r, _) = ctx
                    .store()
                    .put_bytes(bytes.into(), "application/octet-stream")
                    .await?;
                segments.push(r);
            }
            if segments.len() > MAX_SEGMENTS {
                segments = vec![
                    self.merge_segments(ctx, &segments, graph.dim(), &live)
                        .await?,
                ];
            }
            let bytes = graph
                .to_bytes()
                .map_err(|e| JobError::permanent("internal", e.to_string()))?;
            let (graph_ref, _) = ctx
                .store()
                .put_bytes(bytes.into(), "application/octet-stream")
                .await?;
            c.count = graph.len() as u64;
            out_spaces.insert(
                space,
                SpaceIndex {
                    model,
                    dim: graph.dim() as u32,
                    count: c.count,
                    graph: graph_ref,
                    segments,
                },
            );
            counts.insert(space, c);
        }
        let rows_ref = atelier_kit::datasets::put_rows(ctx, &kept).await?;
        let manifest = IndexManifest {
            schema_version: SCHEMA_VERSION,
            dataset: spec.dataset.clone(),
            version: version.version,
            updated_at: chrono::Utc::now(),
            job: ctx.id,
            params: state::record_of(params),
            rows: rows_ref,
            spaces: out_spaces,
        };
        let revision = existing.as_ref().map(|(_, r)| *r);
        match indexes.write(&spec.dataset, &manifest, revision).await {
            Ok(_) => {}
            // Another index job of this dataset finished first: start again from its manifest.
            Err(WriteError::Conflict(e)) => {
                return Err(JobError::retryable(
                    "index_conflict",
                    format!(
                    "the index of {} changed while this job ran ({e}); retrying from the new one",
                    spec.dataset
                ),
                ))
            }
            Err(WriteError::Other(e)) => return Err(kv_err(e)),
        }
        tracing::info!(job = %ctx.id, dataset = %spec.dataset, version = version.version,
            spaces = ?counts, "index written");
        Ok(JobOutput::Indexed(IndexOutput {
            dataset: spec.dataset,
            version: version.version,
            spaces: counts,
        }))
    }

    /// Embeddings of one batch in `space`; inputs that do not decode are skipped (and counted).
    async fn embed_batch(
        &self,
        ctx: &JobCtx,
        space: Space,
        batch: &[(u64, String)],
    ) -> Result<(Vec<(u64, Vec<f32>)>, u64), JobError> {
        let models = self.models.clone();
        if space.is_text() {
            let batch = batch.to_vec();
            let vectors = tokio::task::spawn_blocking(move || {
                let texts: Vec<&str> = batch.iter().map(|(_, t)| t.as_str()).collect();
                models
                    .embed_texts(space, &texts)
                    .map(|v| batch.iter().map(|(k, _)| *k).zip(v).collect::<Vec<_>>())
            })
            .await
            .map_err(blocking_err)?
            .map_err(|e| JobError::retryable("compute_failed", e))?;
            return Ok((vectors, 0));
        }
        // Fetch the batch's images concurrently (in order).
        use futures::{StreamExt, TryStreamExt};
        let fetched: Vec<(u64, bytes::Bytes)> = futures::stream::iter(batch.iter().cloned())
            .map(|(k, image_key)| async move {
                let key = ArtifactKey::parse(&image_key)
                    .map_err(|e| JobError::permanent("bad_artifact_key", e.to_string()))?;
                Ok::<_, JobError>((k, ctx.store().get_bytes(&key).await?))
            })
            .buffered(8)
            .try_collect()
            .await?;
        tokio::task::spawn_blocking(move || {
            let mut keys = Vec::new();
            let mut images = Vec::new();
            let mut skipped = 0;
            for (k, bytes) in fetched {
                match atelier_decode::decode(&bytes, &atelier_decode::Limits::default()) {
                    Ok(img) => {
                        let img = img.into_image();
                        keys.push(k);
                        images.push(img);
                    }
                    Err(_) => skipped += 1,
                }
            }
            models
                .embed_images(&images)
                .map(|v| (keys.into_iter().zip(v).collect::<Vec<_>>(), skipped))
        })
        .await
        .map_err(blocking_err)?
        .map_err(|e| JobError::retryable("compute_failed", e))
    }

    /// One segment holding the live vectors of `segments`.
    async fn merge_segments(
        &self,
        ctx: &JobCtx,
        segments: &[ArtifactRef],
        dim: usize,
        live: &HashSet<u64>,
    ) -> Result<ArtifactRef, JobError> {
        let mut all: HashMap<u64, Vec<f32>> = HashMap::new();
        for s in segments {
            let bytes = state::fetch(ctx.store(), &s.key).await.map_err(load_err)?;
            segment::decode_into(&bytes, dim, &mut all)
                .map_err(|e| JobError::permanent("corrupt_index", e))?;
        }
        let mut items: Vec<(u64, Vec<f32>)> =
            all.into_iter().filter(|(k, _)| live.contains(k)).collect();
        items.sort_by_key(|(k, _)| *k);
        let (r, _) = ctx
            .store()
            .put_bytes(
                segment::encode(dim, &items).into(),
                "application/octet-stream",
            )
            .await?;
        Ok(r)
    }
}

/// Runs the retrieval indexer — index and curate jobs, and search queries — on `models` (the
/// quality filter's CLIP and MiniLM settings). The `atelier-retrieval-indexer` binary and
/// `atelier up` both call this.
pub async fn serve(
    models: atelier_embed::ModelDirs,
    launch: atelier_kit::service::Launch,
) -> anyhow::Result<()> {
    models.check().map_err(anyhow::Error::msg)?;
    let indexer = Indexer::new(Models::new(models.clip(), models.minilm()));
    let queries = tokio::spawn(query::serve(
        indexer.clone(),
        launch.rt.bus.clone(),
        launch.rt.store.clone(),
        launch.shutdown.clone(),
    ));
    launch.run(indexer).await?;
    queries.await?
}
