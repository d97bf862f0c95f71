//! ROUGE-L as pycocoevalcap's `rouge.py`: the longest common subsequence against each reference,
//! the best precision and the best recall over references (taken separately), F with β = 1.2;
//! the corpus score is the mean of the per-image scores.

const BETA: f64 = 1.2;

fn lcs(a: &[&str], b: &[&str]) -> usize {
    let mut prev = vec![0usize; b.len() + 1];
    let mut cur = vec![0usize; b.len() + 1];
    for x in a {
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = if x == y {
                prev[j] + 1
            } else {
                cur[j].max(prev[j + 1])
            };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

fn one(refs: &[String], cand: &str) -> f64 {
    // pycocoevalcap splits on single spaces.
    let c: Vec<&str> = cand.split(' ').collect();
    let (mut prec_max, mut rec_max) = (0.0f64, 0.0f64);
    for r in refs {
        let r: Vec<&str> = r.split(' ').collect();
        let l = lcs(&r, &c) as f64;
        prec_max = prec_max.max(l / c.len() as f64);
        rec_max = rec_max.max(l / r.len() as f64);
    }
    if prec_max != 0.0 && rec_max != 0.0 {
        ((1.0 + BETA * BETA) * prec_max * rec_max) / (rec_max + BETA * BETA * prec_max)
    } else {
        0.0
    }
}

/// Corpus ROUGE-L and per-image ROUGE-L, for tokenized captions.
pub fn score(refs: &[Vec<String>], cands: &[String]) -> (f64, Vec<f64>) {
    let each: Vec<f64> = refs.iter().zip(cands).map(|(r, c)| one(r, c)).collect();
    let mean = each.iter().sum::<f64>() / each.len().max(1) as f64;
    (mean, each)
}
