//! The inpainter service: img2img and inpaint jobs from `atelier.v1.inpainter.request` (a
//! `generate` job of kind `img2img` or `inpaint`), on its own work queue so its GPU workers scale
//! apart from the sampler's. The work itself is `atelier_generation::Generator`; mask
//! preparation, latent injection and 9-channel models are in the diffusion engine's pipeline.
//!
//! [`build`] is the one way to make the service from its [`Config`]: the `atelier-inpainter`
//! binary and `atelier up` both call it.

use atelier_contracts::Service;
pub use atelier_generation::{Generator, GeneratorArgs as Config};

/// The inpainter's handler from its configuration; an unusable `--device` is an error naming the fix.
pub fn build(config: &Config) -> anyhow::Result<Generator> {
    config.generator(Service::Inpainter)
}

/// Runs the inpainter: the `atelier-inpainter` binary and `atelier up` both call this.
pub async fn serve(config: Config, launch: atelier_kit::service::Launch) -> anyhow::Result<()> {
    launch.run(build(&config)?).await
}
