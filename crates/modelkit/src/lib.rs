//! What atelier's model libraries share (the diffusion engine and the CLIP/MiniLM encoders), so
//! neither depends on the other:
//!
//! - [`tokenizer`]: CLIP's byte-level BPE tokenizer, as `transformers`' `CLIPTokenizer`, with
//!   [`text_fix`], the ftfy cleanup it applies first; [`t5_tokenizer`]: T5's (SD 3.5, FLUX);
//! - [`noise`]: what seeds draw: torch's CPU generator and A1111's NV source bit for bit, and a
//!   portable seeded stream for random weights and test data;
//! - [`shapes`]: recording a model's weight shapes, and random weights of that geometry (tiny
//!   test models and benchmarks of the real sizes).
pub mod noise;
pub mod shapes;
pub mod t5_tokenizer;
pub mod text_fix;
pub mod tokenizer;
pub mod tools;
