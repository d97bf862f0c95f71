//! What Stable Diffusion checkpoints are made of, apart from the networks (which run on
//! libtorch: [`crate::torch`]): the components' configs, the LDM ↔ diffusers name maps of single
//! files, and the safetensors loaders.

pub mod config;
pub mod ldm;
pub mod load;
pub use atelier_modelkit::shapes;
