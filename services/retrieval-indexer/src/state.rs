//! A dataset's index in memory: its manifest (from KV `atelier_indexes`), its rows and one HNSW
//! graph per space, loaded from the store and cached per KV revision, so every replica answers
//! from the same files and picks up a new index on its next query.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use atelier_ann::{AnnError, AnnIndex, AnnParams};

use crate::segment;
use atelier_contracts::retrieval::AnnParamsRecord;
use atelier_contracts::{ArtifactKey, DatasetRow, IndexManifest, Space};
use atelier_kit::kv::Kv;
use atelier_kit::Store;

/// A record's key in every index: the first 8 bytes of its sha256, big-endian.
pub fn key_of(sha256: &str) -> Option<u64> {
    u64::from_str_radix(sha256.get(..16)?, 16).ok()
}

pub fn params_of(p: AnnParamsRecord) -> AnnParams {
    AnnParams {
        m: p.m as usize,
        ef_construction: p.ef_construction as usize,
        ef_search: p.ef_search as usize,
    }
}

pub fn record_of(p: AnnParams) -> AnnParamsRecord {
    AnnParamsRecord {
        m: p.m as u32,
        ef_construction: p.ef_construction as u32,
        ef_search: p.ef_search as u32,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Corrupt(String),
}

pub struct LoadedIndex {
    pub manifest: IndexManifest,
    pub revision: u64,
    pub rows: HashMap<u64, DatasetRow>,
    pub spaces: BTreeMap<Space, AnnIndex>,
}

impl LoadedIndex {
    /// A row by its 16-hex image id or its sha256.
    pub fn row(&self, id: &str) -> Option<(u64, &DatasetRow)> {
        let key = key_of(id)?;
        let row = self.rows.get(&key)?;
        (row.image_id == id || row.sha256 == id).then_some((key, row))
    }
}

fn unavailable(e: impl std::fmt::Display) -> LoadError {
    LoadError::Unavailable(e.to_string())
}

/// The current manifest of `dataset`'s index and its KV revision, if it has one.
pub async fn current(
    indexes: &Kv<IndexManifest>,
    dataset: &str,
) -> Result<Option<(IndexManifest, u64)>, LoadError> {
    let Some(entry) = indexes.entry(dataset).await.map_err(unavailable)? else {
        return Ok(None);
    };
    let m = entry
        .value
        .map_err(|e| LoadError::Corrupt(format!("index manifest of {dataset}: {e}")))?;
    Ok(Some((m, entry.revision)))
}

pub async fn fetch(store: &Store, key: &str) -> Result<bytes::Bytes, LoadError> {
    let key = ArtifactKey::parse(key).map_err(|e| LoadError::Corrupt(e.to_string()))?;
    store.get_bytes(&key).await.map_err(unavailable)
}

pub fn parse_rows(data: &[u8]) -> Result<Vec<DatasetRow>, LoadError> {
    let text = std::str::from_utf8(data).map_err(|e| LoadError::Corrupt(e.to_string()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(|e| LoadError::Corrupt(e.to_string())))
        .collect()
}

/// Loads one space's graph. A graph in an older format (USearch's, before atelier-ann had its
/// own graph) is rebuilt from the space's embedding segments, keeping the keys in `live` (the
/// manifest's rows): nothing is embedded again.
pub async fn load_graph(
    store: &Store,
    manifest: &IndexManifest,
    space: Space,
    live: &HashSet<u64>,
) -> Result<Option<AnnIndex>, LoadError> {
    let Some(s) = manifest.spaces.get(&space) else {
        return Ok(None);
    };
    let bytes = fetch(store, &s.graph.key).await?;
    let (dim, params) = (s.dim as usize, params_of(manifest.params));
    let loaded = tokio::task::spawn_blocking(move || AnnIndex::from_bytes(&bytes, dim, params))
        .await
        .map_err(unavailable)?;
    let index = match loaded {
        Ok(index) => index,
        Err(AnnError::Format(why)) => {
            tracing::warn!(%space, dataset = %manifest.dataset, %why, "rebuilding the graph from its embedding segments");
            let mut vectors = HashMap::new();
            for seg in &s.segments {
                let bytes = fetch(store, &seg.key).await?;
                segment::decode_into(&bytes, dim, &mut vectors)
                    .map_err(|e| LoadError::Corrupt(format!("segment of space {space}: {e}")))?;
            }
            vectors.retain(|k, _| live.contains(k));
            tokio::task::spawn_blocking(move || {
                let index = AnnIndex::new(dim, params)?;
                let mut items: Vec<(u64, &[f32])> =
                    vectors.iter().map(|(k, v)| (*k, v.as_slice())).collect();
                items.sort_by_key(|(k, _)| *k);
                index.insert_many(&items).map(|()| index)
            })
            .await
            .map_err(unavailable)?
            .map_err(|e| LoadError::Corrupt(format!("graph of space {space}: {e}")))?
        }
        Err(e) => return Err(LoadError::Corrupt(format!("graph of space {space}: {e}"))),
    };
    Ok(Some(index))
}

pub async fn load(
    store: &Store,
    manifest: IndexManifest,
    revision: u64,
) -> Result<LoadedIndex, LoadError> {
    let rows = parse_rows(&fetch(store, &manifest.rows.key).await?)?;
    let rows: HashMap<u64, DatasetRow> = rows
        .into_iter()
        .filter_map(|r| Some((key_of(&r.sha256)?, r)))
        .collect();
    let live: HashSet<u64> = rows.keys().copied().collect();
    let mut spaces = BTreeMap::new();
    for space in manifest.spaces.keys().copied().collect::<Vec<_>>() {
        if let Some(g) = load_graph(store, &manifest, space, &live).await? {
            spaces.insert(space, g);
        }
    }
    Ok(LoadedIndex {
        manifest,
        revision,
        rows,
        spaces,
    })
}

/// Loaded indexes by dataset, each replaced when the KV revision moves.
#[derive(Clone, Default)]
pub struct Cache {
    inner: Arc<Mutex<HashMap<String, Arc<LoadedIndex>>>>,
    /// Serialises loads so concurrent queries for a new revision load it once.
    loading: Arc<tokio::sync::Mutex<()>>,
}

impl Cache {
    /// The current index of `dataset`; `None` when it has none.
    pub async fn get(
        &self,
        indexes: &Kv<IndexManifest>,
        store: &Store,
        dataset: &str,
    ) -> Result<Option<Arc<LoadedIndex>>, LoadError> {
        let Some((manifest, revision)) = current(indexes, dataset).await? else {
            return Ok(None);
        };
        let cached = |inner: &Mutex<HashMap<String, Arc<LoadedIndex>>>| {
            inner
                .lock()
                .ok()
                .and_then(|m| m.get(dataset).cloned())
                .filter(|l| l.revision == revision)
        };
        if let Some(l) = cached(&self.inner) {
            return Ok(Some(l));
        }
        let _guard = self.loading.lock().await;
        if let Some(l) = cached(&self.inner) {
            return Ok(Some(l));
        }
        let loaded = Arc::new(load(store, manifest, revision).await?);
        if let Ok(mut m) = self.inner.lock() {
            m.insert(dataset.to_owned(), loaded.clone());
        }
        Ok(Some(loaded))
    }
}
