//! Prompt → text-encoder conditioning as AUTOMATIC1111 builds it: emphasis weights per token,
//! 75-token chunks (BREAK starts a new one; a full chunk backs up to a comma within 20 tokens),
//! each chunk framed by start/end tokens and encoded on its own, weights applied to the token
//! states and the original mean restored, chunks concatenated along the sequence.

use candle_core::{DType, Device, Result, Tensor};

use crate::models::clip::{ClipOutput, ClipTextModel};
use crate::prompt::parse_attention;
use crate::tokenizer::ClipTokenizer;

pub const CHUNK: usize = 75;
const COMMA_BACKTRACK: usize = 20;

/// 75 tokens and their weights (before framing).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenChunk {
    pub tokens: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Split a prompt into weighted 75-token chunks, as A1111's `tokenize_line`.
pub fn chunks(tok: &ClipTokenizer, prompt: &str) -> std::result::Result<Vec<TokenChunk>, String> {
    let mut out: Vec<TokenChunk> = Vec::new();
    let mut cur = TokenChunk {
        tokens: Vec::new(),
        weights: Vec::new(),
    };
    let mut last_comma: Option<usize> = None;
    let comma = tok.comma();
    let next = |cur: &mut TokenChunk, out: &mut Vec<TokenChunk>, last_comma: &mut Option<usize>| {
        let mut c = std::mem::replace(
            cur,
            TokenChunk {
                tokens: Vec::new(),
                weights: Vec::new(),
            },
        );
        let pad = CHUNK - c.tokens.len().min(CHUNK);
        c.tokens.extend(std::iter::repeat_n(tok.eos, pad));
        c.weights.extend(std::iter::repeat_n(1.0, pad));
        out.push(c);
        *last_comma = None;
    };
    for chunk in parse_attention(prompt) {
        if chunk.is_break {
            next(&mut cur, &mut out, &mut last_comma);
            continue;
        }
        let ids = tok.encode(&chunk.text).map_err(|e| e.to_string())?;
        for id in ids {
            if Some(id) == comma {
                last_comma = Some(cur.tokens.len());
            } else if cur.tokens.len() == CHUNK {
                if let Some(lc) = last_comma.filter(|&lc| CHUNK - lc <= COMMA_BACKTRACK) {
                    let moved_t = cur.tokens.split_off(lc + 1);
                    let moved_w = cur.weights.split_off(lc + 1);
                    next(&mut cur, &mut out, &mut last_comma);
                    cur.tokens = moved_t;
                    cur.weights = moved_w;
                }
            }
            if cur.tokens.len() == CHUNK {
                next(&mut cur, &mut out, &mut last_comma);
            }
            cur.tokens.push(id);
            cur.weights.push(chunk.weight as f32);
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

/// One encoder's conditioning for a prompt: [1, 77·chunks, D] and the first chunk's pooled state.
pub fn encode(
    model: &ClipTextModel,
    tok: &ClipTokenizer,
    prompt: &str,
    layer: Layer,
    device: &Device,
    dtype: DType,
) -> std::result::Result<(Tensor, Tensor), String> {
    let e = |err: candle_core::Error| err.to_string();
    let mut states = Vec::new();
    let mut pooled = None;
    for c in chunks(tok, prompt)? {
        let mut ids = Vec::with_capacity(CHUNK + 2);
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
        let ids = Tensor::from_vec(ids, (1, CHUNK + 2), device).map_err(e)?;
        let out: ClipOutput = model.forward(&ids).map_err(e)?;
        let z = match layer {
            Layer::Normed { clip_skip } => model.conditioning(&out, clip_skip).map_err(e)?,
            Layer::Penultimate => ClipTextModel::penultimate(&out),
        };
        let z = apply_weights(&z, &weights).map_err(e)?;
        if pooled.is_none() {
            pooled = Some(out.pooled.clone());
        }
        states.push(z.to_dtype(dtype).map_err(e)?);
    }
    let z = Tensor::cat(&states, 1).map_err(e)?;
    let pooled = pooled.ok_or("no chunks")?.to_dtype(dtype).map_err(e)?;
    Ok((z, pooled))
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
