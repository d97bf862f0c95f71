//! atelier's diffusion engine.
//!
//! - [`schedulers`]: the noise schedule and every sampler our users know from diffusers, A1111 and
//!   ComfyUI, number for number with diffusers (replayed against its traces by [`conformance`]).
pub mod conformance;
pub mod noise;
pub mod schedulers;
