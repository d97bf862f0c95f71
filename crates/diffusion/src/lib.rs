//! atelier's diffusion engine.
//!
//! - [`schedulers`]: the noise schedule and every sampler our users know from diffusers, A1111 and
//!   ComfyUI, number for number with diffusers (replayed against its traces by [`conformance`]);
//! - [`prompt`]: AUTOMATIC1111's prompt language (emphasis, BREAK, editing, alternation, LoRA tags).
pub mod bench;
pub mod conditioning;
pub mod conformance;
pub mod flow;
pub mod inspect;
pub mod lora;
pub mod memory;
pub mod models;
pub mod pipeline;
pub mod prompt;
pub mod schedulers;
pub mod torch;
pub mod train;

/// Shared with the CLIP encoders (`atelier-modelkit`).
pub use atelier_modelkit::{noise, tokenizer};
