//! The sampler service: txt2img jobs from `atelier.v1.sampler.request` (a `generate` job of kind
//! `txt2img`), answered with PNGs in the object store and an `images` output. The work itself is
//! `atelier_generation::Generator`, which the inpainter runs on its own queue.
//!
//! [`build`] is the one way to make the service from its [`Config`]: the `atelier-sampler`
//! binary and `atelier up` both call it.

use atelier_contracts::Service;
pub use atelier_generation::{Generator, GeneratorArgs as Config};

/// The sampler's handler from its configuration; an unusable `--device` is an error naming the fix.
pub fn build(config: &Config) -> anyhow::Result<Generator> {
    config.generator(Service::Sampler)
}

/// Runs the sampler: the `atelier-sampler` binary and `atelier up` both call this.
pub async fn serve(config: Config, launch: atelier_kit::service::Launch) -> anyhow::Result<()> {
    launch.run(build(&config)?).await
}
