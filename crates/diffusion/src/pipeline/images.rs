//! Pixels in and out of latent space through the model's VAE.

use candle_core::{DType, Tensor};

use super::{PResult, PipelineError, StableDiffusion};

impl StableDiffusion {
    /// Pixels → scaled latents [1, 4, h, w] (the image resized to `width`×`height`).
    pub fn encode_image(
        &self,
        img: &image::RgbImage,
        width: usize,
        height: usize,
    ) -> PResult<Tensor> {
        let img = if img.dimensions() != (width as u32, height as u32) {
            image::imageops::resize(
                img,
                width as u32,
                height as u32,
                image::imageops::FilterType::Lanczos3,
            )
        } else {
            img.clone()
        };
        let t = Tensor::from_vec(img.into_raw(), (height, width, 3), self.device())?
            .permute((2, 0, 1))?
            .to_dtype(DType::F32)?
            .affine(2.0 / 255.0, -1.0)?
            .unsqueeze(0)?;
        self.nets.vae_encode(&t)
    }

    /// Latents [B, 4, h, w] → pixels [B, 3, H, W] in [-1, 1]: one image per pass unless
    /// batches are stacked (see [`UnetBatch`](super::UnetBatch)), so a batch's images equal
    /// their single runs bit for bit.
    fn decode(&self, x: &Tensor) -> PResult<Tensor> {
        let b = x.dim(0)?;
        if b == 1 || super::unet_batch()? == super::UnetBatch::Stacked {
            return self.nets.vae_decode(x);
        }
        let each = (0..b)
            .map(|i| self.nets.vae_decode(&x.narrow(0, i, 1)?))
            .collect::<PResult<Vec<_>>>()?;
        Ok(Tensor::cat(&each, 0)?)
    }

    /// Latents [B, 4, h, w] → images [B, H, W, 3] as floats in [0, 1], before 8-bit rounding.
    pub(super) fn decode_unit(&self, x: &Tensor) -> PResult<Tensor> {
        let pixels = self.decode(x)?.to_dtype(DType::F32)?;
        Ok(pixels
            .affine(0.5, 0.5)?
            .clamp(0.0, 1.0)?
            .permute((0, 2, 3, 1))?
            .contiguous()?)
    }

    /// Latents [B, 4, h, w] → one RGB image per batch item (`width`×`height`).
    pub(super) fn decode_rgb(
        &self,
        x: &Tensor,
        width: usize,
        height: usize,
    ) -> PResult<Vec<image::RgbImage>> {
        let pixels = self.decode(x)?;
        let pixels = ((pixels.clamp(-1.0, 1.0)? + 1.0)? * 127.5)?
            .round()?
            .to_dtype(DType::U8)?;
        (0..pixels.dim(0)?)
            .map(|i| {
                let raw = pixels
                    .get(i)?
                    .permute((1, 2, 0))?
                    .flatten_all()?
                    .to_vec1::<u8>()?;
                image::RgbImage::from_raw(width as u32, height as u32, raw).ok_or_else(|| {
                    PipelineError::Compute("decoded image has the wrong size".into())
                })
            })
            .collect()
    }
}
