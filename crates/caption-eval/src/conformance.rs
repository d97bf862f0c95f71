//! Replays a pycocoevalcap conformance file (the format of
//! `tests/conformance/captions/pycocoevalcap-1.2.json`: `refs`, `cands`, `corpus`, `per_image`,
//! `tokenized`) and checks tokenization exactly and BLEU, ROUGE-L and CIDEr to [`TOLERANCE`].
//! METEOR is checked when a running METEOR jar is given ([`replay_with`]), else its values are
//! counted as skipped.

use std::collections::BTreeMap;

use serde::Deserialize;

/// Largest absolute difference accepted for a score.
pub const TOLERANCE: f64 = 1e-6;

#[derive(Debug, Deserialize)]
pub struct CaseFile {
    pub refs: BTreeMap<String, Vec<String>>,
    pub cands: BTreeMap<String, String>,
    pub corpus: BTreeMap<String, f64>,
    pub per_image: BTreeMap<String, BTreeMap<String, f64>>,
    pub tokenized: Tokenized,
}

#[derive(Debug, Deserialize)]
pub struct Tokenized {
    pub refs: BTreeMap<String, Vec<String>>,
    /// One-element lists, as pycocoevalcap's tokenizer returns them.
    pub cands: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
    /// The first failures, described.
    pub failures: Vec<String>,
}

impl Report {
    fn check(&mut self, ok: bool, describe: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
        } else {
            self.failed += 1;
            if self.failures.len() < 50 {
                self.failures.push(describe());
            }
        }
    }
}

pub fn parse(text: &str) -> Result<CaseFile, serde_json::Error> {
    serde_json::from_str(text)
}

/// Checks every tokenized caption, every corpus score and every per-image score in the file.
pub fn replay(cases: &CaseFile) -> Report {
    replay_with(cases, None)
}

/// [`replay`], checking METEOR too when `meteor` is given.
pub fn replay_with(cases: &CaseFile, meteor: Option<&mut crate::meteor::Meteor>) -> Report {
    let mut report = Report::default();
    for (id, refs) in &cases.refs {
        let want = cases.tokenized.refs.get(id);
        for (i, r) in refs.iter().enumerate() {
            let got = crate::ptb::tokenize(r);
            let expected = want.and_then(|w| w.get(i));
            report.check(expected == Some(&got), || {
                format!("tokenize ref {id}[{i}] {r:?}: got {got:?}, want {expected:?}")
            });
        }
    }
    for (id, c) in &cases.cands {
        let got = crate::ptb::tokenize(c);
        let expected = cases.tokenized.cands.get(id).and_then(|c| c.first());
        report.check(expected == Some(&got), || {
            format!("tokenize cand {id} {c:?}: got {got:?}, want {expected:?}")
        });
    }
    // Scores from the reference tokenization, so a tokenizer slip shows up once, above, not in
    // every metric below.
    let ids: Vec<&String> = cases.cands.keys().collect();
    let refs: Vec<Vec<String>> = ids
        .iter()
        .map(|id| cases.tokenized.refs.get(*id).cloned().unwrap_or_default())
        .collect();
    let cands: Vec<String> = ids
        .iter()
        .map(|id| {
            cases
                .tokenized
                .cands
                .get(*id)
                .and_then(|c| c.first())
                .cloned()
                .unwrap_or_default()
        })
        .collect();
    let mut scores = crate::score_tokenized(&ids, &refs, &cands);
    if let Some(m) = meteor {
        if let Err(e) = crate::add_meteor(&mut scores, &ids, &refs, &cands, m) {
            report.check(false, || e.to_string());
        }
    }
    for (metric, want) in &cases.corpus {
        match scores.corpus.get(metric) {
            Some(got) => report.check((got - want).abs() <= TOLERANCE, || {
                format!("corpus {metric}: got {got}, want {want}")
            }),
            None => report.skipped += 1,
        }
    }
    for (metric, images) in &cases.per_image {
        let Some(ours) = scores.per_image.get(metric) else {
            report.skipped += images.len();
            continue;
        };
        for (id, want) in images {
            let got = ours.get(id).copied().unwrap_or(f64::NAN);
            report.check((got - want).abs() <= TOLERANCE, || {
                format!("{metric} {id}: got {got}, want {want}")
            });
        }
    }
    report
}
