//! The inpainter service: img2img and inpaint jobs on their own work queue
//! (`atelier.v1.inpainter.request`), run by the same generator as the sampler service.

use atelier_contracts::Service;
pub use atelier_sampler::{Generator, GeneratorArgs};

/// The inpainter's generator.
pub fn generator(args: &GeneratorArgs) -> anyhow::Result<Generator> {
    args.generator(Service::Inpainter)
}
