//! CIDEr-D as pycocoevalcap's `cider_scorer.py`: TF-IDF n-gram vectors (n = 1..4) with document
//! frequencies over the references of the evaluated set, clipped similarity
//! (`min(hyp, ref) · ref`), a Gaussian length penalty (σ = 6), averaged over n and references,
//! times 10. Its quirks are kept: the "length" is the count of bigrams, and an n-gram missing from
//! the document frequencies gets df = 1.

use rustc_hash::FxHashMap;

use crate::grams::{self, Counts, Gram, Prepared, MAX_N as N};

const SIGMA: f64 = 6.0;

/// A TF-IDF vector: `(gram, n - 1, weight)` sorted by gram, for merge-joins.
struct Vector {
    vec: Vec<(Gram, usize, f64)>,
    norm: [f64; N],
    length: f64,
}

fn to_vec(c: &Counts, df: &FxHashMap<Gram, f64>, ref_len: f64) -> Vector {
    let mut vec = Vec::with_capacity(c.len());
    let mut norm = [0.0; N];
    let mut length = 0.0;
    for &(g, tf) in c {
        let d = df.get(&g).copied().unwrap_or(0.0).max(1.0).ln();
        let n = grams::order(&g) - 1;
        let v = tf as f64 * (ref_len - d);
        vec.push((g, n, v));
        norm[n] += v * v;
        if n == 1 {
            length += tf as f64;
        }
    }
    Vector {
        vec,
        norm: norm.map(f64::sqrt),
        length,
    }
}

fn sim(h: &Vector, r: &Vector) -> [f64; N] {
    let delta = h.length - r.length;
    let mut val = [0.0; N];
    // n-grams of the hypothesis missing from the reference add min(h, 0) · 0 = 0: only the
    // common ones count.
    let (mut i, mut j) = (0, 0);
    while i < h.vec.len() && j < r.vec.len() {
        match h.vec[i].0.cmp(&r.vec[j].0) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                let (hv, rv) = (h.vec[i].2, r.vec[j].2);
                val[h.vec[i].1] += hv.min(rv) * rv;
                i += 1;
                j += 1;
            }
        }
    }
    for (n, v) in val.iter_mut().enumerate() {
        if h.norm[n] != 0.0 && r.norm[n] != 0.0 {
            *v /= h.norm[n] * r.norm[n];
        }
        *v *= (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
    }
    val
}

/// Corpus CIDEr-D and per-image CIDEr-D, for tokenized captions.
pub fn score(refs: &[Vec<String>], cands: &[String]) -> (f64, Vec<f64>) {
    score_prepared(&Prepared::new(refs, cands))
}

/// [`score`] on n-grams already counted.
pub fn score_prepared(prepared: &Prepared) -> (f64, Vec<f64>) {
    let images = &prepared.images;
    let mut df: FxHashMap<Gram, f64> = FxHashMap::default();
    for image in images {
        // Each gram once per image, however many references hold it.
        for (g, _) in &image.ref_max {
            *df.entry(*g).or_insert(0.0) += 1.0;
        }
    }
    let ref_len = (images.len() as f64).ln();
    let each: Vec<f64> = images
        .iter()
        .map(|image| {
            let h = to_vec(&image.cand, &df, ref_len);
            let mut total = [0.0; N];
            for rc in &image.refs {
                let r = to_vec(rc, &df, ref_len);
                for (t, v) in total.iter_mut().zip(sim(&h, &r)) {
                    *t += v;
                }
            }
            let mean = total.iter().sum::<f64>() / N as f64;
            mean / image.refs.len() as f64 * 10.0
        })
        .collect();
    let corpus = each.iter().sum::<f64>() / each.len().max(1) as f64;
    (corpus, each)
}
