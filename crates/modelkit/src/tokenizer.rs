//! CLIP's byte-level BPE tokenizer through the `tokenizers` crate, from a diffusers `tokenizer/`
//! folder (`vocab.json` + `merges.txt`, or a `tokenizer.json`).

use std::path::Path;

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormSeq, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSeq;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

/// CLIP's pre-tokenization pattern (words, single digits, punctuation runs, contractions).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("tokenizer folder {0}: {1}")]
    Load(String, String),
    #[error("tokenizing: {0}")]
    Encode(String),
}

/// A CLIP tokenizer: text → ids without special tokens; the caller frames them.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    pub bos: u32,
    pub eos: u32,
    pub pad: u32,
}

fn err(dir: &Path, e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Load(dir.display().to_string(), e.to_string())
}

/// The `pad_token` a transformers tokenizer file names (a string, or an added token's `content`).
fn pad_token(file: &Path) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(file).ok()?).ok()?;
    let p = &v["pad_token"];
    p.as_str()
        .or_else(|| p["content"].as_str())
        .map(str::to_string)
}

impl ClipTokenizer {
    /// Load a `tokenizer/` folder. The pad token comes from `tokenizer_config.json` or
    /// `special_tokens_map.json` (SD 2 and SDXL's second tokenizer pad with `!`), defaulting to
    /// end-of-text.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let json = dir.join("tokenizer.json");
        let inner = if json.exists() {
            Tokenizer::from_file(&json).map_err(|e| err(dir, e))?
        } else {
            let (vocab, merges) = (dir.join("vocab.json"), dir.join("merges.txt"));
            if !vocab.exists() || !merges.exists() {
                return Err(err(
                    dir,
                    "expected vocab.json and merges.txt (or tokenizer.json)",
                ));
            }
            let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
                .end_of_word_suffix("</w>".into())
                .unk_token(EOS.into())
                .build()
                .map_err(|e| err(dir, e))?;
            let mut t = Tokenizer::new(bpe);
            let normalizer = NormSeq::new(vec![
                NFC.into(),
                Replace::new(
                    tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                    " ",
                )
                .map_err(|e| err(dir, e))?
                .into(),
                Lowercase.into(),
            ]);
            t.with_normalizer(Some(normalizer))
                .map_err(|e| err(dir, e))?;
            let split = Split::new(
                SplitPattern::Regex(CLIP_PATTERN.into()),
                SplitDelimiterBehavior::Removed,
                true,
            )
            .map_err(|e| err(dir, e))?;
            t.with_pre_tokenizer(Some(PreSeq::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])));
            t
        };
        let id = |tok: &str| {
            inner
                .token_to_id(tok)
                .ok_or_else(|| err(dir, format!("the vocabulary has no {tok}")))
        };
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        let mut tok = Self {
            inner,
            bos,
            eos,
            pad: eos,
        };
        // transformers reads the pad token from tokenizer_config.json; an older
        // special_tokens_map.json beside it overrides it, as transformers applies it last.
        let named = ["special_tokens_map.json", "tokenizer_config.json"]
            .iter()
            .find_map(|f| pad_token(&dir.join(f)));
        if let Some(p) = named {
            tok.set_pad_token(&p).map_err(|e| err(dir, e))?;
        }
        Ok(tok)
    }

    /// Pad with `token`, as transformers does when a tokenizer folder names it: the token becomes
    /// one of the tokenizer's special tokens, so where it appears in a text it is split out as
    /// that id before BPE (SD 2.x's and SDXL's second tokenizer: `"wow!!!"` → `wow`, `!`, `!`,
    /// `!`, where open_clip's own tokenizer, which A1111 runs for SD 2.x checkpoints, reads `!!!`
    /// as one token; a single-file checkpoint's OpenCLIP encoder sets [`pad`](Self::pad) alone).
    pub fn set_pad_token(&mut self, token: &str) -> Result<(), String> {
        let id = self
            .inner
            .token_to_id(token)
            .ok_or_else(|| format!("the pad token {token:?} is not in the vocabulary"))?;
        if id != self.eos && id != self.bos {
            self.inner
                .add_special_tokens([tokenizers::AddedToken::from(token.to_string(), true)])
                .map_err(|e| format!("the pad token {token:?}: {e}"))?;
        }
        self.pad = id;
        Ok(())
    }

    /// Token ids of `text` (no start/end tokens). Text is cleaned as CLIP's tokenizer does with
    /// ftfy ([`fix_text`](crate::text_fix::fix_text)) and trimmed.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let fixed = crate::text_fix::fix_text(text);
        let text = fixed.trim();
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The token a `,` becomes (A1111 backs chunks up to the last comma).
    pub fn comma(&self) -> Option<u32> {
        self.inner.token_to_id(",</w>")
    }

    /// The id of a vocabulary entry (`"!"`, `"<|endoftext|>"`, ...).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// GPT-2/CLIP's reversible byte → printable character table.
pub fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..=255u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter()
        .zip(cs)
        .map(|(b, c)| (b as u8, char::from_u32(c).unwrap_or('?')))
        .collect()
}

/// Write a small but real CLIP vocabulary (every byte, every byte ending a word, the given
/// merges, the special tokens) into `dir`: what tiny test models use.
pub fn write_tiny_vocab(dir: &Path, merges: &[(&str, &str)]) -> std::io::Result<usize> {
    std::fs::create_dir_all(dir)?;
    let mut vocab: Vec<String> = Vec::new();
    let table = bytes_to_unicode();
    for (_, c) in &table {
        vocab.push(c.to_string());
    }
    for (_, c) in &table {
        vocab.push(format!("{c}</w>"));
    }
    let mut merge_lines = vec!["#version: 0.2".to_string()];
    for (a, b) in merges {
        merge_lines.push(format!("{a} {b}"));
        let joined = format!("{a}{b}");
        if !vocab.contains(&joined) {
            vocab.push(joined);
        }
    }
    vocab.push(BOS.into());
    vocab.push(EOS.into());
    let map: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), serde_json::Value::from(i)))
        .collect();
    std::fs::write(dir.join("vocab.json"), serde_json::to_string(&map)?)?;
    std::fs::write(dir.join("merges.txt"), merge_lines.join("\n") + "\n")?;
    std::fs::write(
        dir.join("special_tokens_map.json"),
        serde_json::json!({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS})
            .to_string(),
    )?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"model_max_length": 77, "do_lower_case": true, "tokenizer_class": "CLIPTokenizer"}).to_string(),
    )?;
    Ok(vocab.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tiny_vocab_tokenizes_like_clip() {
        let dir = tempfile::tempdir().unwrap();
        let n = write_tiny_vocab(dir.path(), &[("c", "a"), ("ca", "t</w>"), ("d", "o")]).unwrap();
        let t = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(t.vocab_size(), n);
        // "cat" merges to one word token; case and spacing are normalised.
        let ids = t.encode("  A   CAT ").unwrap();
        let cat = t.inner.token_to_id("cat</w>").unwrap();
        let a = t.inner.token_to_id("a</w>").unwrap();
        assert_eq!(ids, vec![a, cat]);
        // Punctuation splits off; digits are single tokens.
        let ids = t.encode("dog, 42").unwrap();
        let toks: Vec<String> = ids
            .iter()
            .map(|&i| t.inner.id_to_token(i).unwrap())
            .collect();
        assert_eq!(toks, ["do", "g</w>", ",</w>", "4</w>", "2</w>"]);
        assert_eq!(t.comma(), t.inner.token_to_id(",</w>"));
        assert_eq!(
            (t.bos, t.eos, t.pad),
            (n as u32 - 2, n as u32 - 1, n as u32 - 1)
        );
        assert!(t.encode("").unwrap().is_empty());
        assert!(ClipTokenizer::from_dir(&dir.path().join("nope")).is_err());
    }

    #[test]
    fn the_pad_token_comes_from_tokenizer_config_or_the_older_map() {
        let dir = tempfile::tempdir().unwrap();
        write_tiny_vocab(dir.path(), &[("c", "a")]).unwrap();
        let bang = |t: &ClipTokenizer| t.inner.token_to_id("!").unwrap();
        // Newer folders (SD 2.x, SDXL's second tokenizer) name "!" only in tokenizer_config.json,
        // as an added token.
        std::fs::remove_file(dir.path().join("special_tokens_map.json")).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"pad_token": {"__type": "AddedToken", "content": "!", "lstrip": false}}"#,
        )
        .unwrap();
        let t = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(t.pad, bang(&t));
        // As in transformers, the named pad token is a special token: a literal "!" is split
        // out as the vocabulary's "!" (the pad's id), not BPE's end-of-word "!</w>".
        assert!(t.encode("ca!!").unwrap().ends_with(&[bang(&t), bang(&t)]));
        let mut plain = ClipTokenizer::from_dir(dir.path()).unwrap();
        plain.pad = plain.eos;
        assert_eq!(plain.encode("&amp;").unwrap(), plain.encode("&").unwrap());
        // The older file, when present, has the last word.
        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            r#"{"pad_token": "<|endoftext|>"}"#,
        )
        .unwrap();
        let t = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(t.pad, t.eos);
        // Neither file: end-of-text.
        std::fs::remove_file(dir.path().join("special_tokens_map.json")).unwrap();
        std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
        assert_eq!(ClipTokenizer::from_dir(dir.path()).unwrap().pad, t.eos);
    }
}
