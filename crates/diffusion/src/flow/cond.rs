//! Prompts to conditioning as diffusers' FLUX and SD 3 pipelines build it.
//!
//! - FLUX: CLIP-L's pooled output (no projection) and T5's last hidden states.
//! - SD 3: CLIP-L's and CLIP-G's penultimate states side by side, zero-padded to T5's width, then
//!   T5's states (zeros of 77 tokens without T5) along the sequence; pooled: both projections.

use tch::{Kind, Tensor};

use super::{FlowFamily, FlowModel};
use crate::pipeline::PipelineError;
use crate::torch::clip::ClipTextModel;

type PResult<T> = Result<T, PipelineError>;

/// One prompt's conditioning: the sequence the transformer attends to and the pooled vector.
pub struct Conditioning {
    pub context: Tensor,
    pub pooled: Tensor,
}

fn compute(e: impl std::fmt::Display) -> PipelineError {
    PipelineError::Compute(e.to_string())
}

impl FlowModel {
    /// CLIP's framing: start token, at most 75 of the prompt's tokens, end token, padding to 77.
    fn clip_ids(&self, index: usize, prompt: &str) -> PResult<Tensor> {
        let tok = &self.clip_tokenizers[index];
        let mut ids = vec![tok.bos];
        let body = tok
            .encode(prompt)
            .map_err(|e| PipelineError::BadRequest(e.to_string()))?;
        ids.extend(body.iter().take(75));
        ids.push(tok.eos);
        ids.resize(77, tok.pad);
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        Ok(Tensor::from_slice(&ids).view([1, 77]))
    }

    fn t5_states(&self, prompt: &str, max_len: usize) -> PResult<Option<Tensor>> {
        let (Some(enc), Some(tok)) = (&self.t5, &self.t5_tokenizer) else {
            return Ok(None);
        };
        let ids = tok
            .encode(prompt, max_len)
            .map_err(|e| PipelineError::BadRequest(e.to_string()))?
            .ids;
        let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
        let ids = Tensor::from_slice(&ids).view([1, max_len as i64]);
        Ok(Some(
            enc.forward(&ids).map_err(compute)?.to_kind(Kind::Float),
        ))
    }

    /// The conditioning of one prompt with T5 reading at most `max_len` tokens.
    pub fn encode(&self, prompt: &str, max_len: usize) -> PResult<Conditioning> {
        crate::torch::guard(|| Ok(tch::no_grad(|| self.encode_inner(prompt, max_len))))
            .map_err(compute)?
    }

    fn encode_inner(&self, prompt: &str, max_len: usize) -> PResult<Conditioning> {
        match self.family {
            FlowFamily::Flux => {
                let out = self.clip[0]
                    .forward(&self.clip_ids(0, prompt)?)
                    .map_err(compute)?;
                let context = self
                    .t5_states(prompt, max_len)?
                    .ok_or_else(|| compute("FLUX without its T5 encoder"))?;
                Ok(Conditioning {
                    context,
                    pooled: out.pooled.to_kind(Kind::Float),
                })
            }
            FlowFamily::Sd3 => self.encode_sd3(prompt, max_len),
        }
    }

    fn encode_sd3(&self, prompt: &str, max_len: usize) -> PResult<Conditioning> {
        let (mut states, mut pooled) = (Vec::new(), Vec::new());
        for (i, enc) in self.clip.iter().enumerate() {
            let out = enc.forward(&self.clip_ids(i, prompt)?).map_err(compute)?;
            states.push(ClipTextModel::penultimate(&out).to_kind(Kind::Float));
            pooled.push(out.pooled.to_kind(Kind::Float));
        }
        let clip = Tensor::cat(&states, -1);
        let width = match &self.denoiser {
            super::Denoiser::Sd3(s) => s.config.joint_attention_dim as i64,
            super::Denoiser::Flux(f) => f.config.joint_attention_dim as i64,
        };
        let have = clip.size()[2];
        if have > width {
            return Err(compute(format!(
                "CLIP states of width {have} exceed the transformer's joint width {width}"
            )));
        }
        let clip = clip.constant_pad_nd([0, width - have]);
        let t5 = match self.t5_states(prompt, max_len)? {
            Some(t) => t,
            None => Tensor::zeros([1, 77, width], (Kind::Float, clip.device())),
        };
        Ok(Conditioning {
            context: Tensor::cat(&[clip, t5.to_device(states[0].device())], 1),
            pooled: Tensor::cat(&pooled, -1),
        })
    }
}
