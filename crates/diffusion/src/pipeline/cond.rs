//! Prompts → the UNet's conditioning: each prompt-editing entry encoded once, stacked per step
//! for one request or a batch of them.

use candle_core::Tensor;

use super::{PResult, PipelineError, StableDiffusion, Txt2Img};
use crate::conditioning;
use crate::prompt::{schedule, text_at, ScheduleEntry};

/// SDXL's added conditioning: pooled text embeddings [B, 1280] and size/crop ids [B, 6].
#[derive(Clone)]
pub(super) struct AddedCond {
    pub text_embeds: Tensor,
    pub time_ids: Tensor,
}

/// The UNet's conditioning at one step: `[B, …]` without CFG; with CFG the negative prompts'
/// half first, then the prompts' (`[2B, …]`).
#[derive(Clone)]
pub(super) struct Cond {
    pub ctx: Tensor,
    pub add: Option<AddedCond>,
}

/// One request's prompts, encoded: per prompt-editing entry the (negative, prompt) contexts —
/// padded to one length under CFG — and SDXL's pooled (negative, prompt) pair.
pub(super) struct Encoded {
    sched: Vec<ScheduleEntry>,
    pub ctx: Vec<(Tensor, Tensor)>,
    pooled: Vec<Option<(Tensor, Tensor)>>,
    batch: usize,
}

impl Encoded {
    /// The entry in force at step `step_no` (1-based).
    pub fn entry_at(&self, step_no: usize) -> usize {
        let text = text_at(&self.sched, step_no).unwrap_or_default();
        self.sched.iter().position(|e| e.text == text).unwrap_or(0)
    }
}

/// The prompt without its extra-network tags (`<lora:…>`): those are applied to the model by
/// the caller (see `with_lora`), they are not text for the encoder.
fn without_extra_networks(p: &str) -> PResult<String> {
    crate::prompt::extract_extra_networks(p)
        .map(|(clean, _)| clean)
        .map_err(PipelineError::BadRequest)
}

impl StableDiffusion {
    /// Encodes `req`'s prompt schedule and negative prompt once per distinct text.
    pub(super) fn encode_request(&self, req: &Txt2Img, use_cfg: bool) -> PResult<Encoded> {
        let prompt = without_extra_networks(&req.prompt)?;
        let negative = without_extra_networks(&req.negative_prompt)?;
        let sched = schedule(&prompt, req.steps as i64);
        let (prompt_layer, negative_layer) = req.clip_layers();
        let (mut empty, empty_pooled) = self.encode_prompt("", negative_layer)?;
        let (uncond, uncond_pooled) = if negative.is_empty() && self.zero_empty_negative {
            // Zeros for the negative, padded with zeros to a longer prompt's length (diffusers'
            // zeros_like(prompt_embeds)).
            empty = empty.zeros_like()?;
            let pooled = empty_pooled.map(|p| p.zeros_like()).transpose()?;
            (empty.clone(), pooled)
        } else {
            self.encode_prompt(&negative, negative_layer)?
        };
        let (mut ctx, mut pooled) = (Vec::new(), Vec::new());
        for e in &sched {
            let (c, p) = self.encode_prompt(&e.text, prompt_layer)?;
            ctx.push(if use_cfg {
                conditioning::pad_to_same(uncond.clone(), c, &empty)?
            } else {
                (uncond.clone(), c)
            });
            pooled.push(match (&uncond_pooled, p) {
                (Some(u), Some(p)) => Some((u.clone(), p)),
                _ => None,
            });
        }
        Ok(Encoded {
            sched,
            ctx,
            pooled,
            batch: req.batch_size,
        })
    }

    /// The conditioning of several requests' images in one batch, each request at its entry:
    /// `[all negatives; all prompts]` under CFG. `width`×`height` feed SDXL's time ids.
    pub(super) fn stack(
        &self,
        parts: &[(&Encoded, usize)],
        use_cfg: bool,
        (width, height): (usize, usize),
    ) -> PResult<Cond> {
        let (mut us, mut cs, mut pus, mut pcs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (e, ci) in parts {
            let (u, c) = &e.ctx[*ci];
            us.push(u.repeat((e.batch, 1, 1))?);
            cs.push(c.repeat((e.batch, 1, 1))?);
            if let Some((pu, pc)) = &e.pooled[*ci] {
                pus.push(pu.repeat((e.batch, 1))?);
                pcs.push(pc.repeat((e.batch, 1))?);
            }
        }
        let b: usize = parts.iter().map(|(e, _)| e.batch).sum();
        let pooled = pcs.len() == parts.len();
        let ids = [height, width, 0, 0, height, width].map(|v| v as f32);
        let time_ids =
            |n: usize| Tensor::from_vec(ids.to_vec(), (1, 6), self.device())?.repeat((n, 1));
        Ok(if use_cfg {
            Cond {
                ctx: Tensor::cat(&[Tensor::cat(&us, 0)?, Tensor::cat(&cs, 0)?], 0)?,
                add: match pooled {
                    true => Some(AddedCond {
                        text_embeds: Tensor::cat(
                            &[Tensor::cat(&pus, 0)?, Tensor::cat(&pcs, 0)?],
                            0,
                        )?,
                        time_ids: time_ids(2 * b)?,
                    }),
                    false => None,
                },
            }
        } else {
            Cond {
                ctx: Tensor::cat(&cs, 0)?,
                add: match pooled {
                    true => Some(AddedCond {
                        text_embeds: Tensor::cat(&pcs, 0)?,
                        time_ids: time_ids(b)?,
                    }),
                    false => None,
                },
            }
        })
    }
}
