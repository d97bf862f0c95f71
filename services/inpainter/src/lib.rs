//! The inpainter service: img2img and inpaint jobs from `atelier.v1.inpainter.request` (a
//! `generate` job of kind `img2img` or `inpaint`), on its own work queue so its GPU workers scale
//! apart from the sampler's. Jobs run through `atelier_generation::Generator` (models, LoRAs,
//! progress, storage); inpainting itself is this crate's [`mask`]: mask preparation and blur,
//! latent injection for regular models, the mask channels of 9-channel models, and the final
//! paste of the original, as hooks around the engine's one denoise loop.
//!
//! [`build`] is the one way to make the service from its [`Config`]: the `atelier-inpainter`
//! binary and `atelier up` both call it.

pub mod mask;

use std::sync::Arc;

use atelier_contracts::Service;
use atelier_diffusion::pipeline::Repaint;
pub use atelier_generation::{Generator, GeneratorArgs as Config};

/// The inpainter's handler from its configuration; an unusable `--device` is an error naming the fix.
pub fn build(config: &Config) -> anyhow::Result<Generator> {
    Ok(config.generator(Service::Inpainter)?.with_masks(masks))
}

/// A job's mask as the engine's repaint hooks.
fn masks(image: image::GrayImage, blur: f32, invert: bool) -> Arc<dyn Repaint> {
    mask::Mask {
        image,
        blur,
        invert,
    }
    .repaint()
}

/// Runs the inpainter: the `atelier-inpainter` binary and `atelier up` both call this.
pub async fn serve(config: Config, launch: atelier_kit::service::Launch) -> anyhow::Result<()> {
    launch.run(build(&config)?).await
}
