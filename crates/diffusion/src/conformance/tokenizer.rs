//! The CLIP tokenizer case (`cases.json`): the ids transformers' `CLIPTokenizer` gives texts as
//! diffusers' pipelines frame them (start token, at most 75 tokens, end token, padded to 77 with
//! the tokenizer's pad token), for the end-token pad (SD 1.x) and the `!` pad (SD 2.x, SDXL's
//! second tokenizer), and the untruncated length. One line per text.

use std::path::Path;

use serde::Deserialize;

use super::models::Line;
use crate::tokenizer::ClipTokenizer;

#[derive(Deserialize)]
struct Cases {
    tokenizer: String,
    #[serde(default)]
    tokenizer_pad_bang: Option<String>,
    cases: Vec<TextCase>,
}

#[derive(Deserialize)]
struct TextCase {
    text: String,
    ids: Vec<u32>,
    #[serde(default)]
    ids_pad_bang: Option<Vec<u32>>,
    untruncated_len: usize,
}

/// The ids a diffusers pipeline feeds the text encoder for `text`.
fn framed(tok: &ClipTokenizer, text: &str) -> Result<(Vec<u32>, usize), String> {
    let body = tok.encode(text).map_err(|e| e.to_string())?;
    let untruncated = body.len() + 2;
    let mut ids = vec![tok.bos];
    ids.extend(body.into_iter().take(75));
    ids.push(tok.eos);
    ids.resize(77, tok.pad);
    Ok((ids, untruncated))
}

fn tokenizer(dir: &Path, name: &str) -> Result<ClipTokenizer, String> {
    ClipTokenizer::from_dir(&dir.join(name)).map_err(|e| e.to_string())
}

/// The `!`-padded tokenizer: its own folder when the case has one, else the first with `!` as
/// pad (the vocabulary is the same).
fn bang_tokenizer(
    dir: &Path,
    cases: &Cases,
    first: &ClipTokenizer,
) -> Result<ClipTokenizer, String> {
    match &cases.tokenizer_pad_bang {
        Some(name) if dir.join(name).is_dir() => tokenizer(dir, name),
        _ => {
            let mut t = first.clone();
            t.set_pad_token("!")?;
            Ok(t)
        }
    }
}

/// Every text of the case folder `dir`.
pub fn replay(dir: &Path) -> Result<Vec<Line>, String> {
    let path = dir.join("cases.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cases: Cases =
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let plain = tokenizer(dir, &cases.tokenizer)?;
    let bang = bang_tokenizer(dir, &cases, &plain)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut lines = Vec::new();
    for (i, c) in cases.cases.iter().enumerate() {
        let mut line = Line {
            case: name.clone(),
            check: format!("{i}:tokenizer"),
            max_diff: None,
            tolerance: 0.0,
            note: None,
            passed: false,
        };
        match check(&plain, &bang, c) {
            Ok(None) => {
                line.max_diff = Some(0.0);
                line.passed = true;
            }
            Ok(Some(why)) => {
                line.max_diff = Some(1.0);
                line.note = Some(format!("{:?}: {why}", c.text));
            }
            Err(e) => line.note = Some(e),
        }
        lines.push(line);
    }
    Ok(lines)
}

/// None when every id and the length agree, else what differs.
fn check(
    plain: &ClipTokenizer,
    bang: &ClipTokenizer,
    c: &TextCase,
) -> Result<Option<String>, String> {
    let (ids, len) = framed(plain, &c.text)?;
    if ids != c.ids {
        return Ok(Some(format!(
            "ids {:?}, transformers {:?}",
            trim(&ids),
            trim(&c.ids)
        )));
    }
    if len != c.untruncated_len {
        return Ok(Some(format!(
            "{len} tokens, transformers {}",
            c.untruncated_len
        )));
    }
    if let Some(want) = &c.ids_pad_bang {
        let (ids, _) = framed(bang, &c.text)?;
        if &ids != want {
            return Ok(Some(format!(
                "!-padded ids {:?}, transformers {:?}",
                trim(&ids),
                trim(want)
            )));
        }
    }
    Ok(None)
}

/// The ids up to the first end token (the rest is padding).
fn trim(ids: &[u32]) -> &[u32] {
    let end = ids
        .iter()
        .position(|&i| i == 49407)
        .map_or(ids.len(), |p| p + 1);
    &ids[..end]
}
