//! Caption evaluation with the numbers COCO-caption users know: pycocoevalcap's PTB tokenization,
//! BLEU-1..4, ROUGE-L and CIDEr-D, in native Rust, identical to pycocoevalcap 1.2 to 1e-6 (checked
//! against `tests/conformance/captions/pycocoevalcap-1.2.json` by `conformance::replay`).
//!
//! Inputs are captions per image id: several references and one candidate each. [`evaluate`]
//! tokenizes both the way pycocoevalcap does (Stanford PTBTokenizer, lower-cased, punctuation
//! tokens dropped) and scores them. METEOR 1.5 comes from the reference jar, run as pycocoevalcap
//! runs it ([`meteor`], [`evaluate_with_meteor`]); `SemSim` is the mean cosine similarity of
//! MiniLM sentence embeddings ([`add_semsim`], with `atelier-embed`).

pub mod bleu;
pub mod cider;
pub mod conformance;
pub mod grams;
pub mod meteor;
pub mod ptb;
pub mod rouge;

use std::collections::BTreeMap;

/// Corpus-level scores under pycocoevalcap's names, and per-image scores by metric.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scores {
    pub corpus: BTreeMap<String, f64>,
    pub per_image: BTreeMap<String, BTreeMap<String, f64>>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EvalError {
    #[error("candidate for image {0:?} has no references")]
    NoReferences(String),
    #[error("image {0:?} has references but no candidate")]
    NoCandidate(String),
    #[error("nothing to evaluate")]
    Empty,
    #[error("METEOR: {0}")]
    Meteor(String),
    #[error("SemSim: {0}")]
    SemSim(String),
}

/// Tokenizes and scores. Every image id must have references and exactly one candidate.
pub fn evaluate(
    refs: &BTreeMap<String, Vec<String>>,
    cands: &BTreeMap<String, String>,
) -> Result<Scores, EvalError> {
    let t = Tokenized::new(refs, cands)?;
    Ok(score_tokenized(&t.ids, &t.refs, &t.cands))
}

/// [`evaluate`] plus METEOR from a running jar, under pycocoevalcap's name `METEOR`.
pub fn evaluate_with_meteor(
    refs: &BTreeMap<String, Vec<String>>,
    cands: &BTreeMap<String, String>,
    meteor: &mut meteor::Meteor,
) -> Result<Scores, EvalError> {
    let t = Tokenized::new(refs, cands)?;
    let mut scores = score_tokenized(&t.ids, &t.refs, &t.cands);
    add_meteor(&mut scores, &t.ids, &t.refs, &t.cands, meteor)?;
    Ok(scores)
}

/// Checked and PTB-tokenized captions, in image id order.
struct Tokenized<'a> {
    ids: Vec<&'a String>,
    refs: Vec<Vec<String>>,
    cands: Vec<String>,
}

impl<'a> Tokenized<'a> {
    fn new(
        refs: &BTreeMap<String, Vec<String>>,
        cands: &'a BTreeMap<String, String>,
    ) -> Result<Self, EvalError> {
        if cands.is_empty() {
            return Err(EvalError::Empty);
        }
        for id in cands.keys() {
            if refs.get(id).is_none_or(|r| r.is_empty()) {
                return Err(EvalError::NoReferences(id.clone()));
            }
        }
        if let Some(id) = refs.keys().find(|id| !cands.contains_key(*id)) {
            return Err(EvalError::NoCandidate(id.clone()));
        }
        let ids: Vec<&String> = cands.keys().collect();
        // Tokenization is per caption: split the images over the cores.
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .clamp(1, 8);
        let chunk = ids.len().div_ceil(threads).max(1);
        let parts: Vec<(Vec<Vec<String>>, Vec<String>)> = std::thread::scope(|s| {
            let handles: Vec<_> = ids
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let r: Vec<Vec<String>> = part
                            .iter()
                            .map(|id| refs[*id].iter().map(|c| ptb::tokenize(c)).collect())
                            .collect();
                        let c: Vec<String> =
                            part.iter().map(|id| ptb::tokenize(&cands[*id])).collect();
                        (r, c)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("tokenizer thread"))
                .collect()
        });
        let mut tok_refs = Vec::with_capacity(ids.len());
        let mut tok_cands = Vec::with_capacity(ids.len());
        for (r, c) in parts {
            tok_refs.extend(r);
            tok_cands.extend(c);
        }
        Ok(Self {
            ids,
            refs: tok_refs,
            cands: tok_cands,
        })
    }
}

/// Adds `METEOR` (corpus and per image) for already-tokenized captions.
pub fn add_meteor(
    scores: &mut Scores,
    ids: &[&String],
    refs: &[Vec<String>],
    cands: &[String],
    meteor: &mut meteor::Meteor,
) -> Result<(), EvalError> {
    let (total, each) = meteor
        .score(refs, cands)
        .map_err(|e| EvalError::Meteor(e.to_string()))?;
    scores.corpus.insert("METEOR".into(), total);
    scores.per_image.insert(
        "METEOR".into(),
        ids.iter().map(|id| id.to_string()).zip(each).collect(),
    );
    Ok(())
}

/// Adds `SemSim`: per image, the mean cosine similarity between the candidate's sentence
/// embedding and each reference's (raw captions, not PTB-tokenized); corpus: the mean over images.
pub fn add_semsim(
    scores: &mut Scores,
    refs: &BTreeMap<String, Vec<String>>,
    cands: &BTreeMap<String, String>,
    encoder: &atelier_embed::SentenceEncoder,
) -> Result<(), EvalError> {
    let ids: Vec<&String> = cands.keys().collect();
    let mut texts: Vec<&str> = Vec::new();
    for id in &ids {
        texts.push(&cands[*id]);
        texts.extend(refs[*id].iter().map(String::as_str));
    }
    let emb = encoder
        .embed(&texts)
        .map_err(|e| EvalError::SemSim(e.to_string()))?;
    let mut at = 0;
    let mut each = BTreeMap::new();
    for id in &ids {
        let n = refs[*id].len();
        let c = &emb[at];
        let sum: f64 = emb[at + 1..at + 1 + n]
            .iter()
            .map(|r| f64::from(atelier_embed::cosine(c, r)))
            .sum();
        each.insert((*id).clone(), sum / n.max(1) as f64);
        at += 1 + n;
    }
    let total = each.values().sum::<f64>() / each.len().max(1) as f64;
    scores.corpus.insert("SemSim".into(), total);
    scores.per_image.insert("SemSim".into(), each);
    Ok(())
}

/// Scores already-tokenized captions (space-separated tokens), in `ids` order.
pub fn score_tokenized(ids: &[&String], refs: &[Vec<String>], cands: &[String]) -> Scores {
    let mut corpus = BTreeMap::new();
    let mut per_image: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    let mut put = |metric: &str, total: f64, each: Vec<f64>| {
        corpus.insert(metric.to_owned(), total);
        per_image.insert(
            metric.to_owned(),
            ids.iter().map(|id| id.to_string()).zip(each).collect(),
        );
    };
    // N-grams are counted once for BLEU and CIDEr; CIDEr (the slowest) then runs on its own
    // thread beside BLEU.
    let ((bleu_corpus, bleu_each), (rouge_corpus, rouge_each), (cider_corpus, cider_each)) =
        std::thread::scope(|s| {
            // ROUGE-L needs no n-grams: it runs beside the counting.
            let rouge = s.spawn(|| rouge::score(refs, cands));
            let prepared = grams::Prepared::new(refs, cands);
            let (bleu, cider) = std::thread::scope(|inner| {
                let cider = inner.spawn(|| cider::score_prepared(&prepared));
                let bleu = bleu::score_prepared(&prepared);
                (bleu, cider.join().expect("cider thread"))
            });
            (bleu, rouge.join().expect("rouge thread"), cider)
        });
    for k in 0..4 {
        put(
            &format!("Bleu_{}", k + 1),
            bleu_corpus[k],
            bleu_each.iter().map(|b| b[k]).collect(),
        );
    }
    put("ROUGE_L", rouge_corpus, rouge_each);
    put("CIDEr", cider_corpus, cider_each);
    Scores { corpus, per_image }
}

/// Reads JSONL caption files: one `{"image_id": …, "caption": "…"}` per line (ids may be numbers
/// or strings). References may repeat an id; candidates may not.
pub mod jsonl {
    use std::collections::BTreeMap;

    #[derive(Debug, thiserror::Error, PartialEq)]
    pub enum JsonlError {
        #[error("{file}:{line}: {message}")]
        Line {
            file: String,
            line: usize,
            message: String,
        },
    }

    fn entries(file: &str, text: &str) -> Result<Vec<(String, String)>, JsonlError> {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let err = |message: String| JsonlError::Line {
                file: file.to_owned(),
                line: i + 1,
                message,
            };
            let v: serde_json::Value =
                serde_json::from_str(line).map_err(|e| err(format!("not JSON: {e}")))?;
            let id = match v.get("image_id") {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(serde_json::Value::Number(n)) => n.to_string(),
                _ => return Err(err("needs \"image_id\" (a string or a number)".into())),
            };
            let caption = v
                .get("caption")
                .and_then(|c| c.as_str())
                .ok_or_else(|| err("needs \"caption\" (a string)".into()))?;
            out.push((id, caption.to_owned()));
        }
        Ok(out)
    }

    pub fn references(file: &str, text: &str) -> Result<BTreeMap<String, Vec<String>>, JsonlError> {
        let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (id, c) in entries(file, text)? {
            refs.entry(id).or_default().push(c);
        }
        Ok(refs)
    }

    /// Human references from a file in either format: JSONL as [`references`] reads it (also
    /// `{"image_id", "captions": [...]}`), or CSV with a header naming `image_id` and `caption`
    /// columns (one row per reference; quoted fields may hold commas, quotes and newlines).
    /// JSONL when the first non-blank character is `{`.
    pub fn any_references(
        file: &str,
        text: &str,
    ) -> Result<BTreeMap<String, Vec<String>>, JsonlError> {
        if text.trim_start().starts_with('{') {
            return references(file, &expand_lists(file, text)?);
        }
        csv_references(file, text)
    }

    /// JSONL whose lines may carry `"captions": [...]`, as one line per caption.
    fn expand_lists(file: &str, text: &str) -> Result<String, JsonlError> {
        let mut out = String::new();
        for (i, line) in text.lines().enumerate() {
            let v: Option<serde_json::Value> = serde_json::from_str(line).ok();
            match v
                .as_ref()
                .and_then(|v| Some((v.get("image_id")?, v.get("captions")?)))
            {
                Some((id, serde_json::Value::Array(cs))) => {
                    for c in cs {
                        let one = serde_json::json!({"image_id": id, "caption": c});
                        out.push_str(&one.to_string());
                        out.push('\n');
                    }
                }
                Some(_) => {
                    return Err(JsonlError::Line {
                        file: file.to_owned(),
                        line: i + 1,
                        message: "\"captions\" must be a list of strings".into(),
                    })
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        Ok(out)
    }

    fn csv_references(file: &str, text: &str) -> Result<BTreeMap<String, Vec<String>>, JsonlError> {
        let err = |line: usize, message: String| JsonlError::Line {
            file: file.to_owned(),
            line,
            message,
        };
        let mut reader = csv::ReaderBuilder::new()
            .flexible(false)
            .from_reader(text.as_bytes());
        let header = reader
            .headers()
            .map_err(|e| err(1, format!("not CSV: {e}")))?
            .clone();
        let col = |name: &str| {
            header.iter().position(|h| h.trim() == name).ok_or_else(|| {
                err(
                    1,
                    format!("the header needs an {name:?} column (image_id,caption)"),
                )
            })
        };
        let (id_col, caption_col) = (col("image_id")?, col("caption")?);
        let mut refs: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for record in reader.records() {
            let record = record.map_err(|e| {
                let line = e.position().map_or(0, |p| p.line() as usize);
                err(line, format!("not CSV: {e}"))
            })?;
            let line = record.position().map_or(0, |p| p.line() as usize);
            let id = record.get(id_col).unwrap_or_default().trim();
            let caption = record.get(caption_col).unwrap_or_default();
            if id.is_empty() {
                return Err(err(line, "an empty image_id".into()));
            }
            refs.entry(id.to_owned())
                .or_default()
                .push(caption.to_owned());
        }
        Ok(refs)
    }

    pub fn candidates(file: &str, text: &str) -> Result<BTreeMap<String, String>, JsonlError> {
        let mut cands = BTreeMap::new();
        for (i, (id, c)) in entries(file, text)?.into_iter().enumerate() {
            if cands.insert(id.clone(), c).is_some() {
                return Err(JsonlError::Line {
                    file: file.to_owned(),
                    line: i + 1,
                    message: format!(
                        "a second candidate for image {id:?}; give one caption per image"
                    ),
                });
            }
        }
        Ok(cands)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_read_from_jsonl_lists_and_csv_alike() {
        let jsonl = "{\"image_id\": 7, \"caption\": \"a dog\"}\n{\"image_id\": \"x\", \"captions\": [\"one\", \"two\"]}\n";
        let r = jsonl::any_references("refs.jsonl", jsonl).unwrap();
        assert_eq!(r["7"], vec!["a dog"]);
        assert_eq!(r["x"], vec!["one", "two"]);
        let csv =
            "image_id,caption\n7,a dog\nx,\"one, with a comma\"\nx,\"two \"\"quoted\"\"\nline\"\n";
        let r = jsonl::any_references("refs.csv", csv).unwrap();
        assert_eq!(r["7"], vec!["a dog"]);
        assert_eq!(r["x"], vec!["one, with a comma", "two \"quoted\"\nline"]);
        let e = jsonl::any_references("refs.csv", "id,text\n1,a\n").unwrap_err();
        assert!(e.to_string().contains("image_id"), "{e}");
        let e = jsonl::any_references("refs.csv", "image_id,caption\n1,a,extra\n").unwrap_err();
        assert!(e.to_string().starts_with("refs.csv:"), "{e}");
    }

    #[test]
    fn identical_captions_score_perfectly_and_mismatches_are_errors() {
        let refs: BTreeMap<String, Vec<String>> = [
            (
                "1".to_string(),
                vec![
                    "A dog runs on the beach.".to_string(),
                    "A dog on sand.".to_string(),
                ],
            ),
            (
                "2".to_string(),
                vec!["Two cats sleep on a red sofa.".to_string()],
            ),
        ]
        .into();
        let cands: BTreeMap<String, String> = [
            ("1".to_string(), "a dog runs on the beach".to_string()),
            ("2".to_string(), "two cats sleep on a red sofa".to_string()),
        ]
        .into();
        let s = evaluate(&refs, &cands).unwrap();
        assert!((s.corpus["Bleu_4"] - 1.0).abs() < 1e-6, "{:?}", s.corpus);
        assert!((s.per_image["ROUGE_L"]["2"] - 1.0).abs() < 1e-12);
        let mut missing = cands.clone();
        missing.insert("3".into(), "x".into());
        assert_eq!(
            evaluate(&refs, &missing).unwrap_err(),
            EvalError::NoReferences("3".into())
        );
        missing.remove("3");
        missing.remove("2");
        assert_eq!(
            evaluate(&refs, &missing).unwrap_err(),
            EvalError::NoCandidate("2".into())
        );
    }

    #[test]
    fn jsonl_errors_name_file_and_line() {
        let e =
            jsonl::references("r.jsonl", "{\"image_id\":1,\"caption\":\"a\"}\n{oops").unwrap_err();
        assert!(e.to_string().starts_with("r.jsonl:2: not JSON"), "{e}");
        let e = jsonl::candidates(
            "c.jsonl",
            "{\"image_id\":1,\"caption\":\"a\"}\n{\"image_id\":1,\"caption\":\"b\"}",
        )
        .unwrap_err();
        assert!(e.to_string().contains("second candidate"), "{e}");
        assert_eq!(
            jsonl::references("r", "{\"image_id\":7,\"caption\":\"x\"}").unwrap()["7"],
            vec!["x"]
        );
    }
}
