//! The trainer service: LoRA and DreamBooth training as jobs.
//!
//! [`data`] prepares images and captions as kohya's sd-scripts do; [`session`] is one training
//! run in memory (no I/O); the service wraps it with the bus and the object store.

pub mod data;
pub mod session;
