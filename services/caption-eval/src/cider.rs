//! CIDEr-D as pycocoevalcap's `cider_scorer.py`: TF-IDF n-gram vectors (n = 1..4) with document
//! frequencies over the references of the evaluated set, clipped similarity
//! (`min(hyp, ref) · ref`), a Gaussian length penalty (σ = 6), averaged over n and references,
//! times 10. Its quirks are kept: the "length" is the count of bigrams, and an n-gram missing from
//! the document frequencies gets df = 1.

use std::collections::{HashMap, HashSet};

const N: usize = 4;
const SIGMA: f64 = 6.0;

type Counts = HashMap<Vec<String>, f64>;

fn counts(sentence: &str) -> Counts {
    let words: Vec<&str> = sentence.split_whitespace().collect();
    let mut c = HashMap::new();
    for k in 1..=N {
        for w in words.windows(k) {
            *c.entry(w.iter().map(|s| s.to_string()).collect())
                .or_insert(0.0) += 1.0;
        }
    }
    c
}

struct Vector {
    vec: [HashMap<Vec<String>, f64>; N],
    norm: [f64; N],
    length: f64,
}

fn to_vec(c: &Counts, df: &HashMap<Vec<String>, f64>, ref_len: f64) -> Vector {
    let mut vec: [HashMap<Vec<String>, f64>; N] = Default::default();
    let mut norm = [0.0; N];
    let mut length = 0.0;
    for (ng, &tf) in c {
        let d = df.get(ng).copied().unwrap_or(0.0).max(1.0).ln();
        let n = ng.len() - 1;
        let v = tf * (ref_len - d);
        vec[n].insert(ng.clone(), v);
        norm[n] += v * v;
        if n == 1 {
            length += tf;
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
    std::array::from_fn(|n| {
        let mut v = 0.0;
        for (ng, &hv) in &h.vec[n] {
            let rv = r.vec[n].get(ng).copied().unwrap_or(0.0);
            v += hv.min(rv) * rv;
        }
        if h.norm[n] != 0.0 && r.norm[n] != 0.0 {
            v /= h.norm[n] * r.norm[n];
        }
        v * (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp()
    })
}

/// Corpus CIDEr-D and per-image CIDEr-D, for tokenized captions.
pub fn score(refs: &[Vec<String>], cands: &[String]) -> (f64, Vec<f64>) {
    let ref_counts: Vec<Vec<Counts>> = refs
        .iter()
        .map(|rs| rs.iter().map(|r| counts(r)).collect())
        .collect();
    let mut df: HashMap<Vec<String>, f64> = HashMap::new();
    for rs in &ref_counts {
        let distinct: HashSet<&Vec<String>> = rs.iter().flat_map(|c| c.keys()).collect();
        for ng in distinct {
            *df.entry(ng.clone()).or_insert(0.0) += 1.0;
        }
    }
    let ref_len = (refs.len() as f64).ln();
    let each: Vec<f64> = ref_counts
        .iter()
        .zip(cands)
        .map(|(rs, cand)| {
            let h = to_vec(&counts(cand), &df, ref_len);
            let mut total = [0.0; N];
            for rc in rs {
                let r = to_vec(rc, &df, ref_len);
                for (t, v) in total.iter_mut().zip(sim(&h, &r)) {
                    *t += v;
                }
            }
            let mean = total.iter().sum::<f64>() / N as f64;
            mean / rs.len() as f64 * 10.0
        })
        .collect();
    let corpus = each.iter().sum::<f64>() / each.len().max(1) as f64;
    (corpus, each)
}
