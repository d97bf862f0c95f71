//! Stable Diffusion's networks written on candle-core/candle-nn: the UNet, the VAE and the CLIP
//! text encoders, named and shaped as diffusers/transformers name them so real files load.

pub mod clip;
pub mod ldm;
pub mod load;
pub mod nn;
pub use atelier_modelkit::shapes;
pub mod unet;
pub mod vae;
