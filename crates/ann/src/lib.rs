//! Approximate nearest-neighbour search over unit-length embeddings.
//!
//! [`AnnIndex`] is an HNSW graph (Malkov & Yashunin) of our own, laid out as hnswlib lays it
//! out (`graph.rs`): inner product over L2-normalised `f32` vectors, so a score is the cosine
//! similarity. Keys are `u64`s the caller chooses (the retrieval indexer uses the first 8 bytes
//! of an image's sha256, so a key means the same record on every replica and in every version).
//! Inserts (from many threads at once) and deletes are incremental; searches never lock and run
//! beside inserts. The whole index round-trips through bytes ([`AnnIndex::to_bytes`],
//! [`AnnIndex::from_bytes`]) for the object store. [`exact_top_k`] is the brute-force reference
//! recall is measured against.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::{Mutex, RwLock};

mod graph;
mod kernels;
mod precision;

use graph::Graph;

#[derive(Debug, thiserror::Error)]
pub enum AnnError {
    #[error("vector has {got} dimensions; this index holds {expected}")]
    Dimensions { expected: usize, got: usize },
    #[error("vector is not finite or has zero length")]
    NotNormalisable,
    #[error("index bytes: {0}")]
    Corrupt(String),
    /// Bytes of another index format (older atelier releases stored USearch graphs); the caller
    /// can rebuild the graph from the vectors it keeps elsewhere.
    #[error("index bytes are not an atelier HNSW graph ({0})")]
    Format(String),
}

/// HNSW parameters, named as faiss and hnswlib name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnParams {
    /// Graph degree (`M`): links per node on the upper layers, twice that on the bottom layer.
    pub m: usize,
    /// Candidate list size while inserting (`efConstruction`).
    pub ef_construction: usize,
    /// Candidate list size while searching (`efSearch`); raised to `k` when smaller.
    pub ef_search: usize,
}

impl Default for AnnParams {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 128,
            ef_search: 64,
        }
    }
}

/// A match: the caller's key and the cosine similarity (inner product of unit vectors).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub key: u64,
    pub score: f32,
}

pub struct AnnIndex {
    dim: usize,
    params: AnnParams,
    /// Shared by searches and inserts; taken exclusively only to grow the slot arrays.
    graph: RwLock<Graph>,
    /// Live keys and their slots. Deleted slots stay in the graph (walked through, never
    /// returned) until the index is rebuilt.
    keys: Mutex<HashMap<u64, u32>>,
}

/// `v` scaled to unit length.
pub fn normalised(v: &[f32]) -> Result<Vec<f32>, AnnError> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if !n.is_finite() || n == 0.0 {
        return Err(AnnError::NotNormalisable);
    }
    Ok(v.iter().map(|x| x / n).collect())
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
fn lock<T>(l: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    l.lock().unwrap_or_else(|p| p.into_inner())
}

const MAGIC: &[u8; 8] = b"ATLHNSW2";
/// The first format: the same layout with `f32` vectors.
const MAGIC_F32: &[u8; 8] = b"ATLHNSW1";

impl AnnIndex {
    pub fn new(dim: usize, params: AnnParams) -> Result<Self, AnnError> {
        if dim == 0 {
            return Err(AnnError::Dimensions {
                expected: 1,
                got: 0,
            });
        }
        let graph = Graph::new(dim, params.m, params.ef_construction);
        Ok(Self {
            dim,
            params: AnnParams {
                m: graph.m,
                ef_construction: graph.ef_construction,
                ef_search: params.ef_search.max(1),
            },
            graph: RwLock::new(graph),
            keys: Mutex::new(HashMap::new()),
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn params(&self) -> AnnParams {
        self.params
    }
    /// Changes `efSearch` for later searches.
    pub fn set_ef_search(&mut self, ef: usize) {
        self.params.ef_search = ef.max(1);
    }

    pub fn len(&self) -> usize {
        lock(&self.keys).len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn contains(&self, key: u64) -> bool {
        lock(&self.keys).contains_key(&key)
    }
    /// Deleted entries still held by the graph (walked through by searches, never returned).
    pub fn deleted(&self) -> usize {
        read(&self.graph).dead()
    }

    /// `v` at unit length (borrowed when it already is: embedders hand out unit vectors).
    fn check<'a>(&self, v: &'a [f32]) -> Result<std::borrow::Cow<'a, [f32]>, AnnError> {
        if v.len() != self.dim {
            return Err(AnnError::Dimensions {
                expected: self.dim,
                got: v.len(),
            });
        }
        let n2 = v.iter().map(|x| x * x).sum::<f32>();
        if (n2 - 1.0).abs() < 1e-6 {
            return Ok(std::borrow::Cow::Borrowed(v));
        }
        normalised(v).map(std::borrow::Cow::Owned)
    }

    /// Room for `n` more vectors without growing the arrays while inserting.
    pub fn reserve(&self, n: usize) {
        let want = read(&self.graph).slots() + n;
        let mut g = write(&self.graph);
        if g.capacity() < want {
            g.grow(want);
        }
    }

    /// Inserts (or replaces) `key`. Safe to call from several threads at once, and beside
    /// searches.
    pub fn insert(&self, key: u64, v: &[f32]) -> Result<(), AnnError> {
        let v = self.check(v)?;
        loop {
            let g = read(&self.graph);
            let Some(id) = g.allocate() else {
                let cap = g.capacity();
                drop(g);
                let mut g = write(&self.graph);
                if g.capacity() == cap {
                    let more = (cap * 2).max(64);
                    g.grow(more);
                }
                continue;
            };
            let level = g.level_for(id);
            g.fill(id, key, &v, level, false);
            if let Some(old) = lock(&self.keys).insert(key, id) {
                g.mark_deleted(old);
            }
            g.link(id, &v);
            return Ok(());
        }
    }

    /// Inserts many vectors on the rayon pool.
    pub fn insert_many(&self, items: &[(u64, &[f32])]) -> Result<(), AnnError> {
        use rayon::prelude::*;
        self.reserve(items.len());
        items
            .par_iter()
            .try_for_each(|(key, v)| self.insert(*key, v))
    }

    /// A fresh graph of the live entries only (deleted slots dropped), built on the rayon pool
    /// in key order. Worth it once deletions outnumber live entries: walks slow down as they
    /// pass through more and more deleted slots.
    pub fn compacted(&self) -> Result<AnnIndex, AnnError> {
        let mut live: Vec<(u64, Vec<f32>)> = {
            let g = read(&self.graph);
            let keys = lock(&self.keys);
            keys.iter()
                .map(|(&k, &id)| {
                    let mut v = Vec::new();
                    g.restore(id, &mut v);
                    (k, v)
                })
                .collect()
        };
        live.sort_by_key(|(k, _)| *k);
        let out = AnnIndex::new(self.dim, self.params)?;
        let items: Vec<(u64, &[f32])> = live.iter().map(|(k, v)| (*k, v.as_slice())).collect();
        out.insert_many(&items)?;
        Ok(out)
    }

    /// The stored (unit-length; 18 significant bits a component) vector of `key`.
    pub fn get(&self, key: u64) -> Option<Vec<f32>> {
        let id = *lock(&self.keys).get(&key)?;
        let mut v = Vec::new();
        read(&self.graph).restore(id, &mut v);
        Some(v)
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&self, key: u64) -> Result<bool, AnnError> {
        let Some(id) = lock(&self.keys).remove(&key) else {
            return Ok(false);
        };
        read(&self.graph).mark_deleted(id);
        Ok(true)
    }

    /// The `k` nearest keys, best first.
    pub fn search(&self, q: &[f32], k: usize) -> Result<Vec<Hit>, AnnError> {
        let q = self.check(q)?;
        let g = read(&self.graph);
        let ef = self.params.ef_search.max(k);
        // No key reads on the way: a walk touches many slots, and each read may miss the cache.
        let found = match (k, g.dead()) {
            (0, _) => Vec::new(),
            (_, 0) => g.search(&q, k, ef, &|_| true),
            _ => g.search(&q, k, ef, &|id| !g.is_deleted(id)),
        };
        Ok(hits(&g, found))
    }

    /// The `k` nearest keys for which `keep` holds, best first.
    pub fn search_filtered(
        &self,
        q: &[f32],
        k: usize,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, AnnError> {
        let q = self.check(q)?;
        let g = read(&self.graph);
        let ef = self.params.ef_search.max(k);
        let found = match k {
            0 => Vec::new(),
            _ => g.search(&q, k, ef, &|id| !g.is_deleted(id) && keep(g.key(id))),
        };
        Ok(hits(&g, found))
    }

    /// The whole index (graph and vectors) as bytes: `ATLHNSW2`, then little-endian `dim`, `M`,
    /// `efConstruction`, slot count, entry slot and top level, then per slot its key, deleted
    /// mark, level, vector (its half floats, then the byte of each that rounding lost: see
    /// `precision.rs`) and one neighbour list per level (count, ids). (`ATLHNSW1`, which
    /// [`from_bytes`](Self::from_bytes) still reads, stored `f32` vectors instead.)
    pub fn to_bytes(&self) -> Result<Vec<u8>, AnnError> {
        let g = read(&self.graph);
        let n = g.slots();
        let mut out = Vec::with_capacity(64 + n * (self.dim * 3 + 48 + g.m0 * 4));
        out.extend_from_slice(MAGIC);
        for x in [self.dim, g.m, g.ef_construction] {
            out.extend_from_slice(&(x as u32).to_le_bytes());
        }
        out.extend_from_slice(&(n as u64).to_le_bytes());
        let (entry, top) = match g.entry() {
            Some((e, t)) if (e as usize) < n => (e, t as u32),
            _ => (u32::MAX, 0),
        };
        out.extend_from_slice(&entry.to_le_bytes());
        out.extend_from_slice(&top.to_le_bytes());
        let mut ids = Vec::new();
        for id in 0..n as u32 {
            out.extend_from_slice(&g.key(id).to_le_bytes());
            out.push(g.is_deleted(id) as u8);
            let level = g.level(id);
            out.push(level as u8);
            for x in g.half(id) {
                out.extend_from_slice(&x.to_le_bytes());
            }
            out.extend(g.codes(id).iter().map(|&c| c as u8));
            for l in 0..=level {
                ids.clear();
                g.neighbours(id, l, &mut ids);
                // A slot handed out after `n` was read may already be linked: leave it out.
                ids.retain(|&x| (x as usize) < n);
                out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
                for x in &ids {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
        Ok(out)
    }

    /// An index from [`to_bytes`](Self::to_bytes)' output; `dim` must be the one it was built
    /// with. `M` and `efConstruction` come from the bytes, `efSearch` from `params`.
    pub fn from_bytes(bytes: &[u8], dim: usize, params: AnnParams) -> Result<Self, AnnError> {
        let mut r = Reader { bytes, at: 0 };
        let width = match r.take(8).ok() {
            Some(m) if m == MAGIC.as_slice() => 3,
            Some(m) if m == MAGIC_F32.as_slice() => 4,
            _ => {
                return Err(AnnError::Format(format!(
                    "no {} header",
                    String::from_utf8_lossy(MAGIC)
                )))
            }
        };
        let stored_dim = r.u32()? as usize;
        if stored_dim != dim {
            return Err(AnnError::Corrupt(format!(
                "holds {stored_dim}-dimensional vectors, expected {dim}"
            )));
        }
        let (m, efc) = (r.u32()? as usize, r.u32()? as usize);
        if !(2..=4096).contains(&m) {
            return Err(AnnError::Corrupt(format!("M {m} out of range")));
        }
        let n = r.u64()?;
        // Every slot takes at least its key, marks, vector and one count.
        let min_slot = 8 + 2 + dim as u64 * width + 4;
        if n > u32::MAX as u64 || n.saturating_mul(min_slot) > (bytes.len() - r.at) as u64 {
            return Err(AnnError::Corrupt(format!("{n} slots cannot fit")));
        }
        let n = n as usize;
        let (entry, top) = (r.u32()?, r.u32()? as usize);
        let index = Self::new(
            dim,
            AnnParams {
                m,
                ef_construction: efc,
                ef_search: params.ef_search,
            },
        )?;
        {
            let mut g = write(&index.graph);
            g.grow(n.max(64));
            let mut keys = lock(&index.keys);
            let mut v = vec![0f32; dim];
            let mut ids = Vec::new();
            for id in 0..n as u32 {
                let Some(slot) = g.allocate() else {
                    return Err(AnnError::Corrupt("slot arrays".into()));
                };
                debug_assert_eq!(slot, id);
                let key = r.u64()?;
                let deleted = r.u8()? != 0;
                let level = r.u8()? as usize;
                if level > graph::MAX_LEVEL {
                    return Err(AnnError::Corrupt(format!("slot {id}: level {level}")));
                }
                if width == 4 {
                    for x in v.iter_mut() {
                        *x = r.f32()?;
                    }
                } else {
                    for x in v.iter_mut() {
                        *x = half::f16::from_bits(r.u16()?).to_f32();
                    }
                    for (x, &c) in v.iter_mut().zip(r.take(dim)?) {
                        // The half float plus what it lost (exactly `precision::join`).
                        let h = half::f16::from_f32(*x).to_bits();
                        *x = precision::join(h, c as i8);
                    }
                }
                g.fill(id, key, &v, level, deleted);
                for l in 0..=level {
                    let count = r.u32()? as usize;
                    let max = if l == 0 { g.m0 } else { g.m };
                    if count > max {
                        return Err(AnnError::Corrupt(format!(
                            "slot {id} has {count} neighbours on level {l} (at most {max})"
                        )));
                    }
                    ids.clear();
                    for _ in 0..count {
                        let x = r.u32()?;
                        if x as usize >= n {
                            return Err(AnnError::Corrupt(format!(
                                "slot {id} links to slot {x} of {n}"
                            )));
                        }
                        ids.push(x);
                    }
                    g.set_neighbours(id, l, &ids);
                }
                if !deleted && keys.insert(key, id).is_some() {
                    return Err(AnnError::Corrupt(format!("key {key} stored twice")));
                }
            }
            // A link to a slot of a lower level than the list's would walk into nothing.
            for id in 0..n as u32 {
                for l in 1..=g.level(id) {
                    ids.clear();
                    g.neighbours(id, l, &mut ids);
                    if let Some(&x) = ids.iter().find(|&&x| g.level(x) < l) {
                        return Err(AnnError::Corrupt(format!(
                            "slot {id} links on level {l} to slot {x} of level {}",
                            g.level(x)
                        )));
                    }
                }
            }
            if entry != u32::MAX {
                if entry as usize >= n || g.level(entry) != top {
                    return Err(AnnError::Corrupt(format!(
                        "entry slot {entry} at level {top}"
                    )));
                }
                g.set_entry(entry, top);
            } else if n > 0 {
                return Err(AnnError::Corrupt("slots but no entry point".into()));
            }
            if r.at != bytes.len() {
                return Err(AnnError::Corrupt(format!(
                    "{} bytes after the last slot",
                    bytes.len() - r.at
                )));
            }
        }
        Ok(index)
    }
}

fn hits(g: &Graph, found: Vec<graph::Near>) -> Vec<Hit> {
    found
        .into_iter()
        .map(|n| Hit {
            key: g.key(n.id),
            score: 1.0 - n.d,
        })
        .collect()
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], AnnError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(AnnError::Corrupt(format!(
                "truncated at byte {} of {}",
                self.at,
                self.bytes.len()
            )));
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, AnnError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, AnnError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, AnnError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn f32(&mut self) -> Result<f32, AnnError> {
        Ok(f32::from_bits(self.u32()?))
    }
    fn u64(&mut self) -> Result<u64, AnnError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
}

/// The exact `k` best of `vectors` (unit length) for `q` (unit length), best first; ties by key.
pub fn exact_top_k(q: &[f32], keys: &[u64], vectors: &[f32], k: usize) -> Vec<Hit> {
    let dim = q.len();
    let mut all: Vec<Hit> = keys
        .iter()
        .zip(vectors.chunks_exact(dim))
        .map(|(&key, v)| Hit {
            key,
            score: dot(q, v),
        })
        .collect();
    let by_score = |a: &Hit, b: &Hit| {
        b.score
            .partial_cmp(&a.score)
            .unwrap_or(Ordering::Equal)
            .then(a.key.cmp(&b.key))
    };
    if all.len() > k {
        all.select_nth_unstable_by(k, by_score);
        all.truncate(k);
        // Not `k` hits holding the whole corpus' allocation (19 MB at 1.2M records).
        all.shrink_to_fit();
    }
    all.sort_by(by_score);
    all
}

/// Recall@k of `found` against `truth`: the share of true neighbours found.
pub fn recall(found: &[Hit], truth: &[Hit]) -> f64 {
    if truth.is_empty() {
        return 1.0;
    }
    let hit = truth
        .iter()
        .filter(|t| found.iter().any(|f| f.key == t.key))
        .count();
    hit as f64 / truth.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_unit(rng: &mut impl Rng, n: usize, dim: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n * dim);
        for _ in 0..n {
            let v: Vec<f32> = (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            out.extend(normalised(&v).unwrap());
        }
        out
    }

    /// `ATLHNSW2` bytes rewritten in the first format, `ATLHNSW1` (the same with `f32` vectors).
    fn widened_to_v1(v2: &[u8], dim: usize) -> Vec<u8> {
        let word = |at: usize| u32::from_le_bytes(v2[at..at + 4].try_into().unwrap()) as usize;
        let mut out = b"ATLHNSW1".to_vec();
        out.extend_from_slice(&v2[8..36]);
        let n = u64::from_le_bytes(v2[20..28].try_into().unwrap());
        let mut at = 36;
        for _ in 0..n {
            out.extend_from_slice(&v2[at..at + 10]);
            let level = v2[at + 9] as usize;
            at += 10;
            let codes = &v2[at + 2 * dim..at + 3 * dim];
            for (h, &c) in v2[at..at + 2 * dim].chunks(2).zip(codes) {
                let x = precision::join(u16::from_le_bytes([h[0], h[1]]), c as i8);
                out.extend_from_slice(&x.to_le_bytes());
            }
            at += 3 * dim;
            for _ in 0..=level {
                let len = 4 + 4 * word(at);
                out.extend_from_slice(&v2[at..at + len]);
                at += len;
            }
        }
        assert_eq!(at, v2.len());
        out
    }

    #[test]
    fn finds_neighbours_deletes_and_round_trips() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let dim = 32;
        let n = 2000;
        let data = random_unit(&mut rng, n, dim);
        let keys: Vec<u64> = (0..n as u64).map(|i| i * 7919 + 3).collect();
        let index = AnnIndex::new(dim, AnnParams::default()).unwrap();
        let items: Vec<(u64, &[f32])> = keys.iter().copied().zip(data.chunks(dim)).collect();
        index.insert_many(&items).unwrap();
        assert_eq!(index.len(), n);

        // A stored vector finds itself first, with cosine 1.
        let hit = index.search(&data[dim * 5..dim * 6], 1).unwrap();
        assert_eq!(hit[0].key, keys[5]);
        assert!((hit[0].score - 1.0).abs() < 1e-4, "{:?}", hit[0]);

        let queries = random_unit(&mut rng, 50, dim);
        let mut total = 0.0;
        for q in queries.chunks(dim) {
            let truth = exact_top_k(q, &keys, &data, 10);
            let found = index.search(q, 10).unwrap();
            assert!(found.windows(2).all(|w| w[0].score >= w[1].score));
            // Scores are exact cosines to 2^-18 (the walk's half floats are re-ranked with
            // what they lost).
            for h in &found {
                let v = &data[keys.iter().position(|&k| k == h.key).unwrap() * dim..][..dim];
                assert!((h.score - dot(q, v)).abs() < 1e-5, "{h:?}");
            }
            total += recall(&found, &truth);
        }
        assert!(total / 50.0 > 0.9, "recall {}", total / 50.0);

        let stored = index.get(keys[5]).unwrap();
        assert!((dot(&stored, &data[dim * 5..dim * 6]) - 1.0).abs() < 1e-5);
        assert!(index.get(1).is_none());

        // Deletes: a removed key is never returned; re-inserting brings it back.
        assert!(index.remove(keys[5]).unwrap());
        assert!(!index.remove(keys[5]).unwrap());
        let hit = index.search(&data[dim * 5..dim * 6], 5).unwrap();
        assert!(hit.iter().all(|h| h.key != keys[5]));
        assert_eq!(index.len(), n - 1);

        // Filters hold.
        let odd = index
            .search_filtered(&data[dim * 8..dim * 9], 10, |k| k % 2 == 1)
            .unwrap();
        assert_eq!(odd.len(), 10);
        assert!(odd.iter().all(|h| h.key % 2 == 1));

        // Bytes round-trip: same answers; so do the first format's (f32 vectors).
        let bytes = index.to_bytes().unwrap();
        let back = AnnIndex::from_bytes(&bytes, dim, AnnParams::default()).unwrap();
        assert_eq!(back.len(), n - 1);
        let old = AnnIndex::from_bytes(&widened_to_v1(&bytes, dim), dim, AnnParams::default());
        let old = old.unwrap();
        for q in queries.chunks(dim).take(10) {
            assert_eq!(index.search(q, 10).unwrap(), back.search(q, 10).unwrap());
            assert_eq!(index.search(q, 10).unwrap(), old.search(q, 10).unwrap());
        }
        back.insert(keys[5], &data[dim * 5..dim * 6]).unwrap();
        assert_eq!(
            back.search(&data[dim * 5..dim * 6], 1).unwrap()[0].key,
            keys[5]
        );
        assert!(matches!(
            AnnIndex::from_bytes(&bytes, dim + 1, AnnParams::default()),
            Err(AnnError::Corrupt(_))
        ));
        assert!(AnnIndex::from_bytes(b"not an index", dim, AnnParams::default()).is_err());
    }

    #[test]
    fn inserts_and_searches_run_at_once_and_removals_stay_out() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let (n, dim) = (3000, 24);
        let data = random_unit(&mut rng, n, dim);
        let index = AnnIndex::new(dim, AnnParams::default()).unwrap();
        // Four writers (growing the arrays from 64 slots as they go) beside four readers.
        std::thread::scope(|s| {
            for t in 0..4 {
                let (index, data) = (&index, &data);
                s.spawn(move || {
                    for i in (t..n).step_by(4) {
                        index.insert(i as u64, &data[i * dim..][..dim]).unwrap();
                    }
                });
            }
            for t in 0..4 {
                let (index, data) = (&index, &data);
                s.spawn(move || {
                    for i in 0..300 {
                        let q = &data[((t * 300 + i) % n) * dim..][..dim];
                        let hits = index.search(q, 5).unwrap();
                        assert!(hits.windows(2).all(|w| w[0].score >= w[1].score));
                    }
                });
            }
        });
        assert_eq!(index.len(), n);
        let keys: Vec<u64> = (0..n as u64).collect();
        let mut total = 0.0;
        for q in data.chunks(dim).step_by(60) {
            total += recall(
                &index.search(q, 10).unwrap(),
                &exact_top_k(q, &keys, &data, 10),
            );
        }
        assert!(total / 50.0 > 0.9, "recall {}", total / 50.0);

        // Remove two thirds: searches still fill k from the live third and never return a
        // removed key; the graph keeps the removed slots to walk through.
        for k in (0..n as u64).filter(|k| k % 3 != 0) {
            assert!(index.remove(k).unwrap());
        }
        assert_eq!(index.len(), n / 3);
        assert_eq!(index.deleted(), n - n / 3);
        let live: Vec<u64> = (0..n as u64).filter(|k| k % 3 == 0).collect();
        let live_data: Vec<f32> = live
            .iter()
            .flat_map(|&k| data[k as usize * dim..][..dim].to_vec())
            .collect();
        let mut total = 0.0;
        for q in data.chunks(dim).step_by(60) {
            let found = index.search(q, 10).unwrap();
            assert_eq!(found.len(), 10);
            assert!(found.iter().all(|h| h.key % 3 == 0));
            total += recall(&found, &exact_top_k(q, &live, &live_data, 10));
        }
        assert!(
            total / 50.0 > 0.85,
            "recall after removals {}",
            total / 50.0
        );
        let back =
            AnnIndex::from_bytes(&index.to_bytes().unwrap(), dim, AnnParams::default()).unwrap();
        assert_eq!((back.len(), back.deleted()), (n / 3, n - n / 3));
        let small = index.compacted().unwrap();
        assert_eq!((small.len(), small.deleted()), (n / 3, 0));
        for q in data.chunks(dim).step_by(60) {
            let (a, b) = (index.search(q, 10).unwrap(), small.search(q, 10).unwrap());
            assert!(recall(&b, &a) >= 0.8, "{a:?} vs {b:?}");
        }
        assert!(small.to_bytes().unwrap().len() < back.to_bytes().unwrap().len() / 2);
    }

    #[test]
    fn damaged_bytes_are_an_error_never_a_panic() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (n, dim) = (300, 8);
        let data = random_unit(&mut rng, n, dim);
        let index = AnnIndex::new(dim, AnnParams::default()).unwrap();
        let items: Vec<(u64, &[f32])> = (0..n as u64).zip(data.chunks(dim)).collect();
        index.insert_many(&items).unwrap();
        let bytes = index.to_bytes().unwrap();
        let p = AnnParams::default();
        for cut in (0..bytes.len()).step_by(37) {
            assert!(
                AnnIndex::from_bytes(&bytes[..cut], dim, p).is_err(),
                "cut {cut}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(AnnIndex::from_bytes(&longer, dim, p).is_err());
        // Flipped bytes anywhere: an error or a graph that still answers without panicking.
        for _ in 0..400 {
            let mut b = bytes.clone();
            let at = rng.gen_range(0..b.len());
            b[at] ^= 1 << rng.gen_range(0..8);
            if let Ok(g) = AnnIndex::from_bytes(&b, dim, p) {
                let _ = g.search(&data[..dim], 5).unwrap();
            }
        }
        // Older releases stored USearch graphs: told apart from damage, so callers can rebuild.
        assert!(matches!(
            AnnIndex::from_bytes(b"usearch graph bytes", dim, p),
            Err(AnnError::Format(_))
        ));
    }

    #[test]
    fn many_concurrent_searches() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (n, dim) = (1500, 16);
        let data = random_unit(&mut rng, n, dim);
        let index = AnnIndex::new(dim, AnnParams::default()).unwrap();
        let items: Vec<(u64, &[f32])> = (0..n as u64).zip(data.chunks(dim)).collect();
        index.insert_many(&items).unwrap();
        let bytes = index.to_bytes().unwrap();
        let loaded = AnnIndex::from_bytes(&bytes, dim, AnnParams::default()).unwrap();
        // Far more threads than cores, as a query server's blocking pool has.
        std::thread::scope(|s| {
            for t in 0..32 {
                let (index, loaded, data) = (&index, &loaded, &data);
                s.spawn(move || {
                    for i in 0..20 {
                        let q = &data[((t * 20 + i) % n) * dim..][..dim];
                        assert!(!index.search(q, 5).unwrap().is_empty());
                        assert!(!loaded.search(q, 5).unwrap().is_empty());
                        assert!(!loaded
                            .search_filtered(q, 5, |k| k % 2 == 0)
                            .unwrap()
                            .is_empty());
                    }
                });
            }
        });
    }

    #[test]
    fn bad_vectors_are_refused() {
        let index = AnnIndex::new(4, AnnParams::default()).unwrap();
        assert!(matches!(
            index.insert(1, &[1.0, 0.0]),
            Err(AnnError::Dimensions { .. })
        ));
        assert!(matches!(
            index.insert(1, &[0.0; 4]),
            Err(AnnError::NotNormalisable)
        ));
        assert!(index.search(&[1.0, 0.0, 0.0, 0.0], 3).unwrap().is_empty());
        // Unnormalised input is normalised: scores stay cosines.
        index.insert(1, &[3.0, 0.0, 0.0, 0.0]).unwrap();
        index.insert(2, &[0.0, 2.0, 0.0, 0.0]).unwrap();
        let hits = index.search(&[1.0, 1.0, 0.0, 0.0], 2).unwrap();
        assert!((hits[0].score - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-5);
        // Replacing a key keeps one entry.
        index.insert(1, &[0.0, 0.0, 1.0, 0.0]).unwrap();
        assert_eq!(index.len(), 2);
    }
}
