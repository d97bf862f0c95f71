//! BLEU-1..4 exactly as pycocoevalcap's `bleu_scorer.py` computes it: clipped n-gram counts against
//! the per-n-gram maximum over references, the *closest* reference length for the brevity penalty,
//! and its smoothing constants (`tiny` = 1e-15 added to matches, `small` = 1e-9 to guesses). Per-image
//! scores use the same formula on one image's counts.

use crate::grams::{self, Image, Prepared, MAX_N as N};

const TINY: f64 = 1e-15;
const SMALL: f64 = 1e-9;

struct Comps {
    testlen: usize,
    reflen: usize,
    guess: [usize; N],
    correct: [usize; N],
}

fn cook(image: &Image) -> Comps {
    let testlen = image.cand_len;
    // 'closest': the reference length nearest the candidate's, the shorter on ties.
    let reflen = image
        .ref_lens
        .iter()
        .map(|&l| ((l as i64 - testlen as i64).abs(), l))
        .min()
        .map(|(_, l)| l)
        .unwrap_or(0);
    let mut guess = [0; N];
    let mut correct = [0; N];
    for (k, g) in guess.iter_mut().enumerate() {
        *g = (testlen + 1).saturating_sub(k + 1);
    }
    grams::join(&image.cand, &image.ref_max, |g, c, max| {
        correct[grams::order(g) - 1] += c.min(max) as usize;
    });
    Comps {
        testlen,
        reflen,
        guess,
        correct,
    }
}

fn bleu_of(testlen: f64, reflen: f64, guess: &[f64; N], correct: &[f64; N]) -> [f64; N] {
    let mut out = [0.0; N];
    let mut bleu = 1.0;
    for k in 0..N {
        bleu *= (correct[k] + TINY) / (guess[k] + SMALL);
        out[k] = bleu.powf(1.0 / (k as f64 + 1.0));
    }
    let ratio = (testlen + TINY) / (reflen + SMALL);
    if ratio < 1.0 {
        for b in &mut out {
            *b *= (1.0 - 1.0 / ratio).exp();
        }
    }
    out
}

/// Corpus BLEU-1..4 and per-image BLEU-1..4, for tokenized captions.
pub fn score(refs: &[Vec<String>], cands: &[String]) -> ([f64; N], Vec<[f64; N]>) {
    score_prepared(&Prepared::new(refs, cands))
}

/// [`score`] on n-grams already counted.
pub fn score_prepared(prepared: &Prepared) -> ([f64; N], Vec<[f64; N]>) {
    let mut per_image = Vec::with_capacity(prepared.images.len());
    let (mut testlen, mut reflen) = (0usize, 0usize);
    let mut guess = [0.0; N];
    let mut correct = [0.0; N];
    for image in &prepared.images {
        let comps = cook(image);
        testlen += comps.testlen;
        reflen += comps.reflen;
        let g = comps.guess.map(|x| x as f64);
        let k = comps.correct.map(|x| x as f64);
        for i in 0..N {
            guess[i] += g[i];
            correct[i] += k[i];
        }
        per_image.push(bleu_of(comps.testlen as f64, comps.reflen as f64, &g, &k));
    }
    (
        bleu_of(testlen as f64, reflen as f64, &guess, &correct),
        per_image,
    )
}
