//! T5's tokenizer (SD 3.5's and FLUX's `tokenizer_2`): SentencePiece unigram with its precompiled
//! normalizer, read from the folder's `tokenizer.json` by the `tokenizers` crate (the format
//! `T5TokenizerFast` writes, so nothing is reimplemented by hand). Framed as diffusers frames it
//! for these pipelines: the text's pieces, then `</s>`, truncated to `max_length` with `</s>`
//! kept last, padded with `<pad>`.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::tokenizer::TokenizerError;

#[derive(Clone)]
pub struct T5Tokenizer {
    inner: Tokenizer,
    eos: u32,
    pad: u32,
}

/// A text's ids at a fixed length, and how many it had before truncation.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Ids {
    pub ids: Vec<u32>,
    pub untruncated: usize,
}

impl T5Tokenizer {
    /// The tokenizer in `dir` (`tokenizer.json`).
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let load = |m: String| TokenizerError::Load(dir.display().to_string(), m);
        let inner =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| load(e.to_string()))?;
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| load(format!("no {t} token in its vocabulary")))
        };
        let (eos, pad) = (id("</s>")?, id("<pad>")?);
        Ok(Self { inner, eos, pad })
    }

    /// `text`'s pieces and `</s>`, cut to `max_length` (keeping `</s>` last), padded with `<pad>`.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<T5Ids, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        let mut ids: Vec<u32> = enc.get_ids().to_vec();
        let untruncated = ids.len() + 1;
        ids.truncate(max_length.saturating_sub(1));
        if max_length > 0 {
            ids.push(self.eos);
        }
        ids.resize(max_length, self.pad);
        Ok(T5Ids { ids, untruncated })
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
