//! txt2img: one request, or several stacked into one batch of UNet passes.

use super::cond::Encoded;
use super::denoise::Run;
use super::seeds::{BatchNoise, ImageSeeds};
use super::{BatchKey, Generated, PResult, PipelineError, StableDiffusion, Txt2Img};

impl StableDiffusion {
    /// Generate `batch_size` images; image i uses seed + i, so it equals a single run with that
    /// seed. `on_step(done, total)` returns false to cancel between steps.
    pub fn txt2img(
        &self,
        req: &Txt2Img,
        on_step: impl FnMut(usize, usize) -> bool,
    ) -> PResult<Vec<Generated>> {
        self.generate(req, (None, None), on_step, None)
    }

    /// txt2img from given initial latents `[batch_size, 4, height / 8, width / 8]` instead of the
    /// seeds' noise, as diffusers' `latents=` (the sampler scales them by its initial sigma):
    /// the way to check a pipeline against a reference run. Later steps' noise (ancestral and
    /// SDE samplers) is still the seeds' (their draws after the initial noise), so the seeds'
    /// own noise given as latents reproduces [`txt2img`](Self::txt2img) exactly.
    pub fn txt2img_from_latents(
        &self,
        req: &Txt2Img,
        latents: &candle_core::Tensor,
        on_step: impl FnMut(usize, usize) -> bool,
    ) -> PResult<Vec<Generated>> {
        self.generate(req, (None, Some(latents)), on_step, None)
    }

    /// Several txt2img requests through the same UNet passes: their images are stacked into one
    /// batch, each with its own prompt (and prompt-editing schedule), negative prompt, seeds and
    /// batch size, so the result per request is what [`txt2img`](Self::txt2img) gives alone (to
    /// float rounding). Requests must share the settings of [`BatchKey`]; requests whose encoded
    /// prompts differ in length (another 75-token chunk count) cannot share a context tensor and
    /// run one after another instead. `on_step(done, total)` counts the whole group's steps.
    pub fn txt2img_batch(
        &self,
        reqs: &[Txt2Img],
        mut on_step: impl FnMut(usize, usize) -> bool,
    ) -> PResult<Vec<Vec<Generated>>> {
        let Some(first) = reqs.first() else {
            return Ok(Vec::new());
        };
        let key = BatchKey::of(first);
        if let Some(r) = reqs.iter().find(|r| BatchKey::of(r) != key) {
            return Err(PipelineError::BadRequest(format!(
                "requests in one batch must share size, steps, sampler, CFG scale, clip skip and noise source: {:?} vs {:?}",
                key,
                BatchKey::of(r)
            )));
        }
        for r in reqs {
            r.validate().map_err(PipelineError::BadRequest)?;
        }
        let f = self.vae_scale();
        if first.width % f != 0 || first.height % f != 0 || reqs.len() == 1 || self.is_inpainting()
        {
            // One request, a size the single path rejects with its own message, or an
            // inpainting UNet (the single path builds its mask channels).
            return self.one_by_one(reqs, &mut on_step);
        }
        let use_cfg = first.cfg_scale != 1.0;
        let enc = reqs
            .iter()
            .map(|r| self.encode_request(r, use_cfg))
            .collect::<PResult<Vec<_>>>()?;
        if !one_length(&enc, use_cfg) {
            // Prompts of different lengths: the group runs one by one.
            return self.one_by_one(reqs, &mut on_step);
        }
        let (h, w) = self.latent_size(first.width, first.height)?;
        let sampler = self.sampler_for(first)?;
        let mut noise = BatchNoise::new(
            first.noise.source,
            first.noise.eta_noise_seed_delta,
            reqs.iter()
                .flat_map(|r| (0..r.batch_size).map(move |i| ImageSeeds::of(r.seed, &r.noise, i))),
        );
        let x = noise
            .initial((1, self.latent_channels(), h, w), self.device())?
            .affine(sampler.init_noise_sigma(), 0.0)?;
        let size = (first.width, first.height);
        let run = Run {
            sampler,
            cfg_scale: first.cfg_scale,
            batch: reqs.iter().map(|r| r.batch_size).sum(),
            size,
            extra: None,
            repaint: None,
            noise,
        };
        let mut cond_at = |step: usize| {
            let parts: Vec<(&Encoded, usize)> = enc.iter().map(|e| (e, e.entry_at(step))).collect();
            self.stack(&parts, use_cfg, size)
        };
        let x = self.denoise(run, x, &mut cond_at, &mut on_step, None)?;
        let mut decoded = self.decode_rgb(&x, first.width, first.height)?.into_iter();
        let mut out = Vec::with_capacity(reqs.len());
        for r in reqs {
            let mut images = Vec::with_capacity(r.batch_size);
            for i in 0..r.batch_size {
                let image = decoded.next().ok_or_else(|| {
                    PipelineError::Compute("the batch decoded fewer images than asked".into())
                })?;
                let seeds = ImageSeeds::of(r.seed, &r.noise, i);
                images.push(Generated {
                    seed: seeds.seed,
                    image,
                    parameters: self.parameters(r, &seeds, None),
                });
            }
            out.push(images);
        }
        Ok(out)
    }

    /// The requests of a group that cannot share a batch, one after another.
    fn one_by_one(
        &self,
        reqs: &[Txt2Img],
        on_step: &mut impl FnMut(usize, usize) -> bool,
    ) -> PResult<Vec<Vec<Generated>>> {
        reqs.iter()
            .map(|r| self.generate(r, (None, None), &mut *on_step, None))
            .collect()
    }
}

/// Whether every context in the group has one sequence length (one tensor can hold them).
/// Without CFG the negative prompts are not used.
fn one_length(enc: &[Encoded], use_cfg: bool) -> bool {
    let mut lens = enc
        .iter()
        .flat_map(|e| e.ctx.iter())
        .flat_map(|(u, c)| [use_cfg.then(|| u.dim(1)), Some(c.dim(1))])
        .flatten()
        .map(|d| d.unwrap_or(0));
    match lens.next() {
        Some(first) => lens.all(|l| l == first),
        None => true,
    }
}
