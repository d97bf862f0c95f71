//! The one denoise loop every generation runs (txt2img alone or batched, img2img, inpainting),
//! and its one guidance function.

use candle_core::Tensor;

use super::cond::{AddedCond, Cond};
use super::img2img::RepaintRun;
use super::seeds::BatchNoise;
use super::{PResult, PipelineError, PreviewFn, StableDiffusion};
use crate::schedulers::Sampler;

/// One run of the loop: what its steps share.
pub(super) struct Run<'a> {
    pub sampler: Box<dyn Sampler>,
    /// Classifier-free guidance scale; 1 runs the prompt alone.
    pub cfg_scale: f64,
    /// Images in the batch.
    pub batch: usize,
    /// Output size in pixels (width, height), for previews.
    pub size: (usize, usize),
    /// UNet input channels after the latents (9-channel inpainting models), in the model's dtype.
    pub extra: Option<Tensor>,
    /// The inpainter's hook after each step (latent injection).
    pub repaint: Option<&'a dyn RepaintRun>,
    /// Step noise, per image from its own seed.
    pub noise: BatchNoise,
}

/// Receives (step, decoded first image) every `.0` steps.
pub(super) type Preview<'a, 'b> = Option<(usize, &'a mut PreviewFn<'b>)>;

impl StableDiffusion {
    /// Runs `run.sampler` to its end from latents `x`. Each step: the conditioning
    /// `cond_at(step number)` (prompt editing changes it), one guided UNet evaluation, the
    /// sampler's step, then the repaint hook; a preview every N steps; `on_step(done, total)`
    /// returning false cancels between steps.
    pub(super) fn denoise(
        &self,
        mut run: Run<'_>,
        mut x: Tensor,
        cond_at: &mut dyn FnMut(usize) -> PResult<Cond>,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
        mut preview: Preview<'_, '_>,
    ) -> PResult<Tensor> {
        let total = run.sampler.remaining();
        let mut done = 0;
        while !run.sampler.finished() {
            let cond = cond_at(run.sampler.step_index() + 1)?;
            let t = run.sampler.timestep();
            let mut input = run.sampler.scale_model_input(&x)?;
            if let Some(e) = &run.extra {
                input = Tensor::cat(&[&input, e], 1)?;
            }
            let eps = self.guided(&input, t, &cond, run.cfg_scale, run.batch)?;
            x = run.sampler.step(&eps, &x, &mut run.noise)?;
            if let Some(r) = run.repaint {
                x = r.after_step(x, run.sampler.as_ref())?;
            }
            done += 1;
            if let Some((every, cb)) = preview.as_mut() {
                if done % *every == 0 && !run.sampler.finished() {
                    let (w, h) = run.size;
                    let first = self.decode_rgb(&x.narrow(0, 0, 1)?, w, h)?;
                    if let Some(img) = first.into_iter().next() {
                        cb(done, img);
                    }
                }
            }
            if !on_step(done, total) {
                return Err(PipelineError::Cancelled);
            }
        }
        Ok(x)
    }

    /// The noise prediction at timestep `t` for `b` images. With classifier-free guidance
    /// (`cfg_scale` ≠ 1) an image's negative and positive halves go through one UNet pass and
    /// combine as uncond + scale × (cond − uncond). Each image runs in a pass of its own, the
    /// shape it has when generated alone, so image i of a batch is bit-identical to its seed's
    /// single run (matrix products of other batch sizes round differently); with
    /// `ATELIER_UNET_BATCH=stacked` the whole batch shares passes, faster on GPUs and equal to
    /// about 1e-6.
    fn guided(
        &self,
        input: &Tensor,
        t: f64,
        cond: &Cond,
        cfg_scale: f64,
        b: usize,
    ) -> PResult<Tensor> {
        if b == 1 || super::unet_batch()? == super::UnetBatch::Stacked {
            return self.guided_pass(input, t, cond, cfg_scale, b);
        }
        let halves = if cfg_scale == 1.0 { 1 } else { 2 };
        let per_image = (0..b)
            .map(|i| {
                let rows: Vec<usize> = (0..halves).map(|h| h * b + i).collect();
                let one = Cond {
                    ctx: rows_of(&cond.ctx, &rows)?,
                    add: match &cond.add {
                        Some(a) => Some(AddedCond {
                            text_embeds: rows_of(&a.text_embeds, &rows)?,
                            time_ids: rows_of(&a.time_ids, &rows)?,
                        }),
                        None => None,
                    },
                };
                self.guided_pass(&input.narrow(0, i, 1)?, t, &one, cfg_scale, 1)
            })
            .collect::<PResult<Vec<_>>>()?;
        Ok(Tensor::cat(&per_image, 0)?)
    }

    /// One UNet pass over `b` images (2b rows under CFG).
    fn guided_pass(
        &self,
        input: &Tensor,
        t: f64,
        cond: &Cond,
        cfg_scale: f64,
        b: usize,
    ) -> PResult<Tensor> {
        if cfg_scale == 1.0 {
            return self.nets.unet(input, t, &cond.ctx, cond.add.as_ref());
        }
        let xin = Tensor::cat(&[input, input], 0)?;
        let out = self.nets.unet(&xin, t, &cond.ctx, cond.add.as_ref())?;
        let (ou, oc) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
        Ok((&ou + (oc - &ou)?.affine(cfg_scale, 0.0)?)?)
    }
}

/// The given rows of `t` (first dimension), in order.
fn rows_of(t: &Tensor, rows: &[usize]) -> PResult<Tensor> {
    let parts = rows
        .iter()
        .map(|&r| t.narrow(0, r, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 0)?)
}
