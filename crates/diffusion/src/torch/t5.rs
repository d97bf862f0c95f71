//! The T5 v1.1 encoder (SD 3.5's and FLUX's third / second text encoder) on libtorch, as
//! `transformers`' `T5EncoderModel` computes it: RMS layer norms (no mean, no bias), self-attention
//! without score scaling and with a learned bias by relative-position bucket (block 0's, shared by
//! every block), a gated-GELU feed-forward (tanh GELU of `wi_0` times `wi_1`, then `wo`), a final
//! RMS norm. Loaded from a `text_encoder_*` folder (`config.json` + safetensors).

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::weights::Weights;
use super::{msg, Result};

#[derive(Debug, Clone)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub buckets: usize,
    pub max_distance: usize,
    pub eps: f64,
}

impl T5Config {
    /// From a `transformers` T5 `config.json` (gated-GELU feed-forward only).
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let n = |k: &str| {
            v[k].as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| msg(format!("T5 config without {k}")))
        };
        let ff = v["feed_forward_proj"].as_str().unwrap_or("relu");
        if ff != "gated-gelu" {
            return Err(msg(format!(
                "T5 feed_forward_proj {ff:?}: only T5 v1.1's gated-gelu is supported"
            )));
        }
        Ok(Self {
            vocab_size: n("vocab_size")?,
            d_model: n("d_model")?,
            d_kv: n("d_kv")?,
            d_ff: n("d_ff")?,
            num_heads: n("num_heads")?,
            num_layers: n("num_layers")?,
            buckets: n("relative_attention_num_buckets")?,
            max_distance: n("relative_attention_max_distance")?,
            eps: v["layer_norm_epsilon"].as_f64().unwrap_or(1e-6),
        })
    }
}

struct Block {
    ln_attn: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    ln_ff: Tensor,
    wi_0: Tensor,
    wi_1: Tensor,
    wo: Tensor,
}

/// Cloning shares the weights.
pub struct T5Encoder {
    pub config: T5Config,
    embed: Tensor,
    relative_bias: Tensor,
    blocks: Vec<Block>,
    final_norm: Tensor,
}

impl Clone for Block {
    fn clone(&self) -> Self {
        Self {
            ln_attn: self.ln_attn.shallow_clone(),
            q: self.q.shallow_clone(),
            k: self.k.shallow_clone(),
            v: self.v.shallow_clone(),
            o: self.o.shallow_clone(),
            ln_ff: self.ln_ff.shallow_clone(),
            wi_0: self.wi_0.shallow_clone(),
            wi_1: self.wi_1.shallow_clone(),
            wo: self.wo.shallow_clone(),
        }
    }
}

impl Clone for T5Encoder {
    fn clone(&self) -> Self {
        Self {
            config: self.config.clone(),
            embed: self.embed.shallow_clone(),
            relative_bias: self.relative_bias.shallow_clone(),
            blocks: self.blocks.clone(),
            final_norm: self.final_norm.shallow_clone(),
        }
    }
}

impl T5Encoder {
    /// The encoder in `dir` (`config.json`, `model.safetensors` or shards) in f32 on `device`.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let text = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| msg(format!("{}: {e}", dir.join("config.json").display())))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| msg(format!("T5 config.json: {e}")))?;
        let config = T5Config::from_json(&json)?;
        let files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| msg(format!("{}: {e}", dir.display())))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        if files.is_empty() {
            return Err(msg(format!("{}: no .safetensors weights", dir.display())));
        }
        let st = crate::models::load::SafetensorsWeights::open(&files)
            .map_err(|e| msg(format!("{}: {e}", dir.display())))?;
        Self::new(&Weights::from_backend(st, Kind::Float, device), config)
    }

    pub fn new(w: &Weights, config: T5Config) -> Result<Self> {
        let c = &config;
        let inner = c.num_heads * c.d_kv;
        let embed = match w.contains("shared.weight") {
            true => w.get(&[c.vocab_size, c.d_model], "shared.weight")?,
            false => w.get(&[c.vocab_size, c.d_model], "encoder.embed_tokens.weight")?,
        };
        let mut blocks = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let b = w.pp(format!("encoder.block.{i}.layer"));
            let (at, ff) = (b.pp("0.SelfAttention"), b.pp("1.DenseReluDense"));
            blocks.push(Block {
                ln_attn: b.get(&[c.d_model], "0.layer_norm.weight")?,
                q: at.get(&[inner, c.d_model], "q.weight")?,
                k: at.get(&[inner, c.d_model], "k.weight")?,
                v: at.get(&[inner, c.d_model], "v.weight")?,
                o: at.get(&[c.d_model, inner], "o.weight")?,
                ln_ff: b.get(&[c.d_model], "1.layer_norm.weight")?,
                wi_0: ff.get(&[c.d_ff, c.d_model], "wi_0.weight")?,
                wi_1: ff.get(&[c.d_ff, c.d_model], "wi_1.weight")?,
                wo: ff.get(&[c.d_model, c.d_ff], "wo.weight")?,
            });
        }
        Ok(Self {
            relative_bias: w.get(
                &[c.buckets, c.num_heads],
                "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            )?,
            final_norm: w.get(&[c.d_model], "encoder.final_layer_norm.weight")?,
            embed,
            blocks,
            config,
        })
    }

    /// Token ids [B, T] → the last hidden state [B, T, d_model] (every position attended, as
    /// the SD 3 and FLUX pipelines call it: no attention mask).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let ids = ids.to_kind(Kind::Int64).to_device(self.embed.device());
        let (b, t) = match ids.size()[..] {
            [b, t] => (b, t),
            ref s => {
                return Err(msg(format!(
                    "token ids of shape {s:?}, expected [batch, tokens]"
                )))
            }
        };
        let vocab = self.config.vocab_size as i64;
        if t == 0 || ids.min().int64_value(&[]) < 0 || ids.max().int64_value(&[]) >= vocab {
            return Err(msg(format!("token ids outside T5's vocabulary of {vocab}")));
        }
        let (h, dk) = (self.config.num_heads as i64, self.config.d_kv as i64);
        let mut x = Tensor::embedding(&self.embed, &ids, -1, false, false);
        let bias = self.position_bias(t);
        for blk in &self.blocks {
            let n = self.rms(&x, &blk.ln_attn);
            let heads = |w: &Tensor| n.matmul(&w.tr()).view([b, t, h, dk]).transpose(1, 2);
            let (q, k, v) = (heads(&blk.q), heads(&blk.k), heads(&blk.v));
            let scores = q.matmul(&k.transpose(-1, -2)) + &bias;
            let attn = scores.softmax(-1, Kind::Float).matmul(&v);
            let out = attn
                .transpose(1, 2)
                .reshape([b, t, h * dk])
                .matmul(&blk.o.tr());
            x += out;
            let n = self.rms(&x, &blk.ln_ff);
            let gated = n.matmul(&blk.wi_0.tr()).gelu("tanh") * n.matmul(&blk.wi_1.tr());
            x += gated.matmul(&blk.wo.tr());
        }
        Ok(self.rms(&x, &self.final_norm))
    }

    /// T5's layer norm: scaled by the root mean square, no mean subtracted, no bias.
    fn rms(&self, x: &Tensor, w: &Tensor) -> Tensor {
        let var = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        x * (var + self.config.eps).rsqrt() * w
    }

    /// [1, heads, T, T]: the learned bias of each (query, key) pair's relative-position bucket.
    fn position_bias(&self, t: i64) -> Tensor {
        let c = &self.config;
        let buckets: Vec<i64> = (0..t)
            .flat_map(|q| (0..t).map(move |k| (q, k)))
            .map(|(q, k)| bucket(k - q, c.buckets as i64, c.max_distance as i64))
            .collect();
        let idx = Tensor::from_slice(&buckets)
            .view([t, t])
            .to_device(self.relative_bias.device());
        Tensor::embedding(&self.relative_bias, &idx, -1, false, false)
            .permute([2, 0, 1])
            .unsqueeze(0)
    }
}

/// `transformers`' bidirectional relative-position bucket of `rel` = key − query: half the
/// buckets for keys after the query; within a half, exact buckets for distances under a quarter
/// of the buckets, then logarithmic ones up to `max_distance` (computed in f32, as torch does).
pub fn bucket(rel: i64, buckets: i64, max_distance: i64) -> i64 {
    let half = buckets / 2;
    let base = if rel > 0 { half } else { 0 };
    let n = rel.abs();
    let exact = half / 2;
    if n < exact {
        return base + n;
    }
    let scale = ((max_distance as f64) / (exact as f64)).ln() as f32;
    let large = exact + ((n as f32 / exact as f32).ln() / scale * (half - exact) as f32) as i64;
    base + large.min(half - 1)
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn buckets_follow_transformers() {
        // 32 buckets, max distance 128 (T5's defaults): exact up to 7 each way, then logarithmic.
        let got: Vec<i64> = [-200, -128, -20, -8, -7, -1, 0, 1, 7, 8, 20, 127, 200]
            .iter()
            .map(|&r| bucket(r, 32, 128))
            .collect();
        assert_eq!(got, [15, 15, 10, 8, 7, 1, 0, 17, 23, 24, 26, 31, 31]);
        // 8 buckets, max distance 16 (the conformance models'), -6..=6, as torch computes them.
        let got: Vec<i64> = (-6..=6).map(|r| bucket(r, 8, 16)).collect();
        assert_eq!(got, [3, 2, 2, 2, 2, 1, 0, 5, 6, 6, 6, 6, 7]);
    }
}
