//! The inpainter service: img2img and inpaint jobs from `atelier.v1.inpainter.request` (a
//! `generate` job of kind `img2img` or `inpaint`), on its own work queue so its GPU workers scale
//! apart from the sampler's. Jobs run through `atelier_generation::Generator` (models, LoRAs,
//! progress, storage); inpainting itself is this crate's [`mask`]: mask preparation and blur,
//! latent injection for regular models, the mask channels of 9-channel models, and the final
//! paste of the original, as hooks around the engine's one denoise loop.
//!
//! [`build`] is the one way to make the service from its [`Config`]: the `atelier-inpainter`
//! binary and `atelier up` both call it.

pub mod fill;
pub mod mask;
pub mod region;

use std::sync::Arc;

use atelier_contracts::{GenerateSpec, Service};
use atelier_diffusion::pipeline::Repaint;
pub use atelier_generation::{Generator, GeneratorArgs as Config};

/// The inpainter's handler from its configuration; an unusable `--device` is an error naming the fix.
pub fn build(config: &Config) -> anyhow::Result<Generator> {
    Ok(config.generator(Service::Inpainter)?.with_masks(masks))
}

/// A job's mask as the engine's repaint hooks: its blur, inversion, fill and, for "only masked",
/// the region generated (the feathered mask's box, padded, grown to the output's ratio).
fn masks(image: image::GrayImage, g: &GenerateSpec) -> Arc<dyn Repaint> {
    let mut m = mask::Mask {
        image,
        blur: g.mask_blur,
        invert: g.mask_invert,
        fill: g.inpaint_fill,
        region: None,
    };
    if g.inpaint_only_masked {
        let (w, h) = m.image.dimensions();
        let feathered = m.at_size(w, h);
        m.region = region::crop_region(&feathered, g.inpaint_padding)
            .map(|r| region::expand_to_ratio(r, (g.width, g.height), (w, h)));
    }
    m.repaint()
}

/// Runs the inpainter: the `atelier-inpainter` binary and `atelier up` both call this.
pub async fn serve(config: Config, launch: atelier_kit::service::Launch) -> anyhow::Result<()> {
    launch.run(build(&config)?).await
}
