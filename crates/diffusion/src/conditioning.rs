//! Prompt → text-encoder conditioning as AUTOMATIC1111 builds it: emphasis weights per token,
//! 75-token chunks (BREAK starts a new one; a full chunk backs up to a comma within 20 tokens),
//! each chunk framed by start/end tokens and encoded on its own, weights applied to the token
//! states and the original mean restored, chunks concatenated along the sequence.

use candle_core::{DType, Device, Result, Tensor};

use crate::prompt::parse_attention;
use crate::tokenizer::ClipTokenizer;

pub const CHUNK: usize = 75;
const COMMA_BACKTRACK: usize = 20;

/// 75 tokens and their weights (before framing); `vectors[i]` replaces token i's embedding
/// (textual inversion: (embedding index, row)).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TokenChunk {
    pub tokens: Vec<u32>,
    pub weights: Vec<f32>,
    pub vectors: Vec<Option<(usize, usize)>>,
}

/// A textual-inversion embedding: its trigger word and one [n, D] matrix per text encoder.
#[derive(Debug, Clone)]
pub struct Embedding {
    pub name: String,
    pub vectors: Vec<Tensor>,
}

impl Embedding {
    /// Rows (tokens) the embedding takes.
    pub fn len(&self) -> usize {
        self.vectors
            .first()
            .and_then(|v| v.dim(0).ok())
            .unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Load an A1111 (`string_to_param`, `emb_params`; SDXL `clip_l` + `clip_g`) or diffusers
    /// (one `{token: vector}`) embedding from `.safetensors` or `.pt`; named after the file.
    pub fn load(path: &std::path::Path) -> std::result::Result<Self, String> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .ok_or_else(|| format!("{}: no file name", path.display()))?;
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let tensors: Vec<(String, Tensor)> = match ext.as_str() {
            "safetensors" => candle_core::safetensors::load(path, &Device::Cpu)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .into_iter()
                .collect(),
            "pt" | "bin" => candle_core::pickle::read_all(path)
                .map_err(|e| format!("{}: {e}", path.display()))?,
            _ => {
                return Err(format!(
                    "{}: embeddings are .safetensors or .pt files",
                    path.display()
                ))
            }
        };
        Self::from_tensors(name, tensors, &path.display().to_string())
    }

    /// An embedding from a `.safetensors` file's bytes, named `name`.
    pub fn from_safetensors(name: &str, bytes: &[u8]) -> std::result::Result<Self, String> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| format!("embedding {name}: {e}"))?
            .into_iter()
            .collect();
        Self::from_tensors(name.to_string(), tensors, &format!("embedding {name}"))
    }

    /// An embedding from a file's tensors, in any of the layouts [`Embedding::load`] reads;
    /// errors name the file as `what`.
    fn from_tensors(
        name: String,
        tensors: Vec<(String, Tensor)>,
        what: &str,
    ) -> std::result::Result<Self, String> {
        let find = |key: &str| {
            tensors
                .iter()
                .find(|(k, _)| k == key || k.ends_with(&format!(".{key}")))
                .map(|(_, t)| t.clone())
        };
        let as_rows = |t: Tensor| -> std::result::Result<Tensor, String> {
            let t = t.to_dtype(DType::F32).map_err(|e| e.to_string())?;
            match t.rank() {
                1 => t.unsqueeze(0).map_err(|e| e.to_string()),
                2 => Ok(t),
                _ => Err(format!(
                    "{}: an embedding is [n, dim], got {:?}",
                    what,
                    t.dims()
                )),
            }
        };
        let vectors = if let (Some(l), Some(g)) = (find("clip_l"), find("clip_g")) {
            vec![as_rows(l)?, as_rows(g)?]
        } else if let Some(t) = find("emb_params").or_else(|| find("*")) {
            vec![as_rows(t)?]
        } else if tensors.len() == 1 {
            vec![as_rows(tensors[0].1.clone())?]
        } else {
            return Err(format!(
                "{}: not a textual-inversion embedding (expected string_to_param, emb_params or clip_l/clip_g)",
                what
            ));
        };
        Ok(Self { name, vectors })
    }
}

/// Split a prompt into weighted 75-token chunks, as A1111's `tokenize_line`.
pub fn chunks(tok: &ClipTokenizer, prompt: &str) -> std::result::Result<Vec<TokenChunk>, String> {
    chunks_with(tok, prompt, &[])
}

/// [`chunks`], with the token sequences of `embeddings`' names replaced by their vectors (each
/// embedding kept whole in one chunk, as A1111 does).
pub fn chunks_with(
    tok: &ClipTokenizer,
    prompt: &str,
    embeddings: &[Embedding],
) -> std::result::Result<Vec<TokenChunk>, String> {
    let names: Vec<Vec<u32>> = embeddings
        .iter()
        .map(|e| tok.encode(&e.name).map_err(|err| err.to_string()))
        .collect::<std::result::Result<_, _>>()?;
    let mut out: Vec<TokenChunk> = Vec::new();
    let mut cur = TokenChunk::default();
    let mut last_comma: Option<usize> = None;
    let comma = tok.comma();
    let next = |cur: &mut TokenChunk, out: &mut Vec<TokenChunk>, last_comma: &mut Option<usize>| {
        let mut c = std::mem::take(cur);
        let pad = CHUNK - c.tokens.len().min(CHUNK);
        c.tokens.extend(std::iter::repeat_n(tok.eos, pad));
        c.weights.extend(std::iter::repeat_n(1.0, pad));
        c.vectors.resize(CHUNK, None);
        out.push(c);
        *last_comma = None;
    };
    for chunk in parse_attention(prompt) {
        if chunk.is_break {
            next(&mut cur, &mut out, &mut last_comma);
            continue;
        }
        let ids = tok.encode(&chunk.text).map_err(|e| e.to_string())?;
        let mut i = 0;
        while i < ids.len() {
            if let Some((ei, n)) = names
                .iter()
                .enumerate()
                .find(|(_, n)| !n.is_empty() && ids[i..].starts_with(n))
            {
                let rows = embeddings[ei].len().min(CHUNK);
                if cur.tokens.len() + rows > CHUNK {
                    next(&mut cur, &mut out, &mut last_comma);
                }
                for r in 0..rows {
                    cur.tokens.push(tok.eos);
                    cur.weights.push(chunk.weight as f32);
                    cur.vectors.push(Some((ei, r)));
                }
                i += n.len();
                continue;
            }
            let id = ids[i];
            i += 1;
            if Some(id) == comma {
                last_comma = Some(cur.tokens.len());
            } else if cur.tokens.len() == CHUNK {
                if let Some(lc) = last_comma.filter(|&lc| CHUNK - lc <= COMMA_BACKTRACK) {
                    let moved_t = cur.tokens.split_off(lc + 1);
                    let moved_w = cur.weights.split_off(lc + 1);
                    let moved_v = cur.vectors.split_off(lc + 1);
                    next(&mut cur, &mut out, &mut last_comma);
                    cur.tokens = moved_t;
                    cur.weights = moved_w;
                    cur.vectors = moved_v;
                }
            }
            if cur.tokens.len() == CHUNK {
                next(&mut cur, &mut out, &mut last_comma);
            }
            cur.tokens.push(id);
            cur.weights.push(chunk.weight as f32);
            cur.vectors.push(None);
        }
    }
    if !cur.tokens.is_empty() || out.is_empty() {
        next(&mut cur, &mut out, &mut last_comma);
    }
    Ok(out)
}

/// How one text encoder's states are read.
#[derive(Debug, Clone, Copy)]
pub enum Layer {
    /// Last layer after the final norm, or `clip_skip` layers back, normed (SD 1/2).
    Normed { clip_skip: usize },
    /// The penultimate layer without the final norm (SDXL).
    Penultimate,
}

/// A text encoder prompts are encoded with (either engine's CLIP).
pub trait TextEncoder {
    /// The width of its token states.
    fn hidden_size(&self) -> usize;

    /// One framed chunk of token ids → (its states [1, T, D] read at `layer`, its pooled
    /// embedding [1, P]), with the embeddings at `overrides`' positions replaced by their vectors.
    fn states(
        &self,
        ids: &[u32],
        overrides: &[(usize, Tensor)],
        layer: Layer,
    ) -> std::result::Result<(Tensor, Tensor), String>;
}

/// One encoder's conditioning for a prompt: [1, 77·chunks, D] and the first chunk's pooled state.
pub fn encode(
    model: &dyn TextEncoder,
    tok: &ClipTokenizer,
    prompt: &str,
    layer: Layer,
    dtype: DType,
) -> std::result::Result<(Tensor, Tensor), String> {
    encode_with(model, tok, prompt, layer, dtype, &[], 0)
}

/// [`encode`] with textual-inversion `embeddings` (their `encoder`-th matrices).
pub fn encode_with(
    model: &dyn TextEncoder,
    tok: &ClipTokenizer,
    prompt: &str,
    layer: Layer,
    dtype: DType,
    embeddings: &[Embedding],
    encoder: usize,
) -> std::result::Result<(Tensor, Tensor), String> {
    let e = |err: candle_core::Error| err.to_string();
    let mut states = Vec::new();
    let mut pooled = None;
    for c in chunks_with(tok, prompt, embeddings)? {
        let mut overrides = Vec::new();
        for (i, v) in c.vectors.iter().enumerate() {
            if let Some((ei, row)) = v {
                let emb = &embeddings[*ei];
                let m = emb.vectors.get(encoder).ok_or_else(|| {
                    format!(
                        "embedding {} has no vectors for text encoder {}",
                        emb.name,
                        encoder + 1
                    )
                })?;
                let width = m.dim(1).map_err(e)?;
                if width != model.hidden_size() {
                    return Err(format!(
                        "embedding {} is for a {width}-wide text encoder, this model's is {}",
                        emb.name,
                        model.hidden_size()
                    ));
                }
                overrides.push((i + 1, m.get(*row).map_err(e)?));
            }
        }
        let (ids, weights) = framed(tok, &c);
        let (z, p) = model.states(&ids, &overrides, layer)?;
        let z = apply_weights(&z, &weights).map_err(e)?;
        if pooled.is_none() {
            pooled = Some(p);
        }
        states.push(z.to_dtype(dtype).map_err(e)?);
    }
    let z = Tensor::cat(&states, 1).map_err(e)?;
    let pooled = pooled.ok_or("no chunks")?.to_dtype(dtype).map_err(e)?;
    Ok((z, pooled))
}

/// A chunk as its encoder takes it: the start token, the chunk's tokens, the end token (where
/// the tokenizer pads with another token, every position after the first end token holds it),
/// and the weights of those positions (1 for the start and end).
pub fn framed(tok: &ClipTokenizer, c: &TokenChunk) -> (Vec<u32>, Vec<f32>) {
    let mut ids = Vec::with_capacity(c.tokens.len() + 2);
    ids.push(tok.bos);
    ids.extend(&c.tokens);
    ids.push(tok.eos);
    if tok.pad != tok.eos {
        if let Some(first) = ids.iter().position(|&i| i == tok.eos) {
            for id in ids.iter_mut().skip(first + 1) {
                *id = tok.pad;
            }
        }
    }
    let mut weights = vec![1.0f32];
    weights.extend(&c.weights);
    weights.push(1.0);
    (ids, weights)
}

/// Scale token states by their weights, then restore the original mean (A1111's "Original"
/// emphasis).
pub fn apply_weights(z: &Tensor, weights: &[f32]) -> Result<Tensor> {
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(z.clone());
    }
    let zf = z.to_dtype(DType::F32)?;
    let before = zf.mean_all()?.to_scalar::<f32>()?;
    let w = Tensor::from_vec(weights.to_vec(), (1, weights.len(), 1), z.device())?;
    let scaled = zf.broadcast_mul(&w)?;
    let after = scaled.mean_all()?.to_scalar::<f32>()?;
    let k = if after != 0.0 { before / after } else { 1.0 };
    scaled.affine(k as f64, 0.0)?.to_dtype(z.dtype())
}

/// Pad the shorter of two conditionings with chunks of `empty` (the empty prompt's states) so
/// both can run in one batch.
pub fn pad_to_same(a: Tensor, b: Tensor, empty: &Tensor) -> Result<(Tensor, Tensor)> {
    let (la, lb) = (a.dim(1)?, b.dim(1)?);
    let grow = |t: Tensor, by: usize| -> Result<Tensor> {
        let step = empty.dim(1)?;
        let mut parts = vec![t];
        for _ in 0..by / step {
            parts.push(empty.clone());
        }
        Tensor::cat(&parts, 1)
    };
    Ok(if la < lb {
        (grow(a, lb - la)?, b)
    } else if lb < la {
        let b = grow(b, la - lb)?;
        (a, b)
    } else {
        (a, b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_pads_after_the_end_token_and_keeps_the_pad_id_inside_the_prompt() {
        let dir = tempfile::tempdir().unwrap();
        crate::tokenizer::write_tiny_vocab(dir.path(), &[("c", "a")]).unwrap();
        let mut tok = ClipTokenizer::from_dir(dir.path()).unwrap();
        tok.pad = 0; // "!" as SD 2.x pads
        let c = TokenChunk {
            tokens: vec![5, 0, 7, tok.eos, tok.eos],
            weights: vec![1.0; 5],
            vectors: vec![None; 5],
        };
        let (ids, weights) = framed(&tok, &c);
        // The prompt's own id 0 stays; after the end token every position is the pad.
        assert_eq!(ids, vec![tok.bos, 5, 0, 7, tok.eos, 0, 0]);
        assert_eq!(weights.len(), ids.len());
    }
}
