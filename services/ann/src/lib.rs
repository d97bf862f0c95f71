//! Approximate nearest-neighbour search over unit-length embeddings.
//!
//! [`AnnIndex`] is an HNSW graph (Malkov & Yashunin) held by USearch: inner product over
//! L2-normalised `f32` vectors, so a score is the cosine similarity. Keys are `u64`s the caller
//! chooses (the retrieval indexer uses the first 8 bytes of an image's sha256, so a key means the
//! same record on every replica and in every version). Inserts and deletes are incremental; the
//! whole index round-trips through bytes ([`AnnIndex::to_bytes`], [`AnnIndex::from_bytes`]) for
//! the object store. [`exact_top_k`] is the brute-force reference recall is measured against.
//!
//! The graph library sits behind this one type so it can be replaced without touching callers.

use std::cmp::Ordering;

#[derive(Debug, thiserror::Error)]
pub enum AnnError {
    #[error("vector has {got} dimensions; this index holds {expected}")]
    Dimensions { expected: usize, got: usize },
    #[error("vector is not finite or has zero length")]
    NotNormalisable,
    #[error("index bytes: {0}")]
    Corrupt(String),
    #[error("index: {0}")]
    Library(String),
}

fn lib(e: impl std::fmt::Display) -> AnnError {
    AnnError::Library(e.to_string())
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
    inner: usearch::Index,
    /// USearch keeps one scratch context per concurrent search or insert and fails a call that
    /// finds none free; callers (query tasks on a blocking pool) may outnumber them, so every
    /// such call first takes one of these slots, waiting when all are busy.
    slots: Slots,
}

/// A counting semaphore over USearch's reserved thread contexts.
struct Slots {
    state: std::sync::Mutex<(usize, usize)>,
    freed: std::sync::Condvar,
}

struct Slot<'a>(&'a Slots);

impl Slots {
    fn new(total: usize) -> Self {
        Self {
            state: std::sync::Mutex::new((total, total)),
            freed: std::sync::Condvar::new(),
        }
    }
    fn total(&self) -> usize {
        self.state.lock().map_or(1, |s| s.1)
    }
    /// Raises the number of slots to `total` (never lowers it).
    fn grow(&self, total: usize) {
        if let Ok(mut s) = self.state.lock() {
            if total > s.1 {
                s.0 += total - s.1;
                s.1 = total;
                self.freed.notify_all();
            }
        }
    }
    fn take(&self) -> Slot<'_> {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        while s.0 == 0 {
            s = match self.freed.wait(s) {
                Ok(s) => s,
                Err(p) => p.into_inner(),
            };
        }
        s.0 -= 1;
        Slot(self)
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut s = match self.0.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        s.0 += 1;
        self.0.freed.notify_one();
    }
}

/// Thread contexts reserved per index: the machine's parallelism (more gain nothing, as
/// searches are CPU-bound).
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn options(dim: usize, p: AnnParams) -> usearch::IndexOptions {
    usearch::IndexOptions {
        dimensions: dim,
        metric: usearch::MetricKind::IP,
        quantization: usearch::ScalarKind::F32,
        connectivity: p.m,
        expansion_add: p.ef_construction,
        expansion_search: p.ef_search,
        multi: false,
    }
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

/// `1 - a·b` over `dim` lanes, in 16 independent accumulators so the compiler vectorises it.
#[inline(always)]
fn ip_distance_lanes(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    1.0 - (acc.iter().sum::<f32>() + tail)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn ip_distance_avx2(a: &[f32], b: &[f32]) -> f32 {
    ip_distance_lanes(a, b)
}

type Metric = Box<dyn Fn(*const f32, *const f32) -> f32 + Send + Sync>;

/// The inner-product distance USearch calls, with AVX2 when the CPU has it (checked at run
/// time, so the binary still runs on CPUs without it).
fn ip_metric(dim: usize) -> Metric {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return Box::new(move |a, b| {
            // SAFETY: USearch passes two vectors of the index's `dim` f32s; the CPU has AVX2+FMA.
            unsafe {
                ip_distance_avx2(
                    std::slice::from_raw_parts(a, dim),
                    std::slice::from_raw_parts(b, dim),
                )
            }
        });
    }
    Box::new(move |a, b| {
        // SAFETY: USearch passes two vectors of the index's `dim` f32s.
        unsafe {
            ip_distance_lanes(
                std::slice::from_raw_parts(a, dim),
                std::slice::from_raw_parts(b, dim),
            )
        }
    })
}

impl AnnIndex {
    pub fn new(dim: usize, params: AnnParams) -> Result<Self, AnnError> {
        let mut inner = usearch::Index::new(&options(dim, params)).map_err(lib)?;
        inner.change_metric(ip_metric(dim));
        let threads = default_threads();
        inner
            .reserve_capacity_and_threads(64, threads)
            .map_err(lib)?;
        Ok(Self {
            dim,
            params,
            inner,
            slots: Slots::new(threads),
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
        self.params.ef_search = ef;
        self.inner.change_expansion_search(ef);
    }

    pub fn len(&self) -> usize {
        self.inner.size()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn contains(&self, key: u64) -> bool {
        self.inner.contains(key)
    }

    fn check(&self, v: &[f32]) -> Result<Vec<f32>, AnnError> {
        if v.len() != self.dim {
            return Err(AnnError::Dimensions {
                expected: self.dim,
                got: v.len(),
            });
        }
        normalised(v)
    }

    /// Room for `n` more vectors without reallocating, and `threads` concurrent inserters or
    /// searchers.
    pub fn reserve(&self, n: usize, threads: usize) -> Result<(), AnnError> {
        let threads = threads.max(self.slots.total());
        self.inner
            .reserve_capacity_and_threads(self.len() + n, threads)
            .map_err(lib)?;
        self.slots.grow(threads);
        Ok(())
    }

    /// Inserts (or replaces) `key`. Safe to call from several threads after [`reserve`](Self::reserve).
    pub fn insert(&self, key: u64, v: &[f32]) -> Result<(), AnnError> {
        let v = self.check(v)?;
        if self.inner.contains(key) {
            self.inner.remove(key).map_err(lib)?;
        }
        if self.inner.size() + 1 > self.inner.capacity() {
            let grow = (self.inner.capacity() * 2).max(64);
            self.inner
                .reserve_capacity_and_threads(grow, self.slots.total())
                .map_err(lib)?;
        }
        let _slot = self.slots.take();
        self.inner.add(key, &v).map_err(lib)
    }

    /// Inserts many vectors on the rayon pool.
    pub fn insert_many(&self, items: &[(u64, &[f32])]) -> Result<(), AnnError> {
        use rayon::prelude::*;
        self.reserve(items.len(), rayon::current_num_threads())?;
        items
            .par_iter()
            .try_for_each(|(key, v)| self.insert(*key, v))
    }

    /// The stored (unit-length) vector of `key`.
    pub fn get(&self, key: u64) -> Option<Vec<f32>> {
        if !self.inner.contains(key) {
            return None;
        }
        let mut buf = vec![0f32; self.dim];
        match self.inner.get(key, &mut buf) {
            Ok(n) if n > 0 => Some(buf),
            _ => None,
        }
    }

    /// Removes `key`; whether it was there.
    pub fn remove(&self, key: u64) -> Result<bool, AnnError> {
        Ok(self.inner.remove(key).map_err(lib)? > 0)
    }

    /// The `k` nearest keys, best first.
    pub fn search(&self, q: &[f32], k: usize) -> Result<Vec<Hit>, AnnError> {
        let q = self.check(q)?;
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        self.raise_ef(k);
        let _slot = self.slots.take();
        let m = self.inner.search(&q, k).map_err(lib)?;
        Ok(hits(m))
    }

    /// The `k` nearest keys for which `keep` holds, best first.
    pub fn search_filtered(
        &self,
        q: &[f32],
        k: usize,
        keep: impl Fn(u64) -> bool,
    ) -> Result<Vec<Hit>, AnnError> {
        let q = self.check(q)?;
        if k == 0 || self.is_empty() {
            return Ok(Vec::new());
        }
        self.raise_ef(k);
        let _slot = self.slots.take();
        let m = self.inner.filtered_search(&q, k, keep).map_err(lib)?;
        Ok(hits(m))
    }

    fn raise_ef(&self, k: usize) {
        let ef = self.params.ef_search.max(k);
        if self.inner.expansion_search() != ef {
            self.inner.change_expansion_search(ef);
        }
    }

    /// The whole index (graph and vectors) as bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, AnnError> {
        let mut buf = vec![0u8; self.inner.serialized_length()];
        self.inner.save_to_buffer(&mut buf).map_err(lib)?;
        Ok(buf)
    }

    /// An index from [`to_bytes`](Self::to_bytes)' output; `dim` and `params` must be the ones it
    /// was built with.
    pub fn from_bytes(bytes: &[u8], dim: usize, params: AnnParams) -> Result<Self, AnnError> {
        let meta = usearch::Index::metadata_from_buffer(bytes)
            .map_err(|e| AnnError::Corrupt(e.to_string()))?;
        if meta.dimensions as usize != dim {
            return Err(AnnError::Corrupt(format!(
                "holds {}-dimensional vectors, expected {dim}",
                meta.dimensions
            )));
        }
        let mut index = Self::new(dim, params)?;
        index
            .inner
            .load_from_buffer(bytes)
            .map_err(|e| AnnError::Corrupt(e.to_string()))?;
        // Loading restores the stored metric kind; ours replaces it again, and the thread
        // contexts the slots count on.
        index.inner.change_metric(ip_metric(dim));
        index
            .inner
            .reserve_capacity_and_threads(index.inner.size().max(64), index.slots.total())
            .map_err(lib)?;
        index.inner.change_expansion_search(params.ef_search);
        Ok(index)
    }
}

fn hits(m: usearch::ffi::Matches) -> Vec<Hit> {
    m.keys
        .into_iter()
        .zip(m.distances)
        // USearch's inner-product distance is 1 - a·b.
        .map(|(key, d)| Hit {
            key,
            score: 1.0 - d,
        })
        .collect()
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

        // Bytes round-trip: same answers.
        let bytes = index.to_bytes().unwrap();
        let back = AnnIndex::from_bytes(&bytes, dim, AnnParams::default()).unwrap();
        assert_eq!(back.len(), n - 1);
        for q in queries.chunks(dim).take(10) {
            assert_eq!(index.search(q, 10).unwrap(), back.search(q, 10).unwrap());
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
    fn many_concurrent_searches_wait_for_a_context() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let (n, dim) = (1500, 16);
        let data = random_unit(&mut rng, n, dim);
        let index = AnnIndex::new(dim, AnnParams::default()).unwrap();
        let items: Vec<(u64, &[f32])> = (0..n as u64).zip(data.chunks(dim)).collect();
        index.insert_many(&items).unwrap();
        let bytes = index.to_bytes().unwrap();
        let loaded = AnnIndex::from_bytes(&bytes, dim, AnnParams::default()).unwrap();
        // Far more threads than reserved contexts, as a query server's blocking pool has.
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
