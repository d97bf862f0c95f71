//! What a generation asks for, and the limits checked before any model work.

use serde::{Deserialize, Serialize};

use super::seeds::NoiseOptions;
use crate::noise::RandnSource;
use crate::schedulers::SamplerKind;

/// txt2img settings (A1111's names where it has them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Txt2Img {
    pub prompt: String,
    #[serde(default)]
    pub negative_prompt: String,
    pub steps: usize,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    #[serde(default = "one")]
    pub batch_size: usize,
    pub sampler: SamplerKind,
    /// Clip skip, counted as `clip_skip_convention` says (A1111's by default).
    #[serde(default = "one")]
    pub clip_skip: usize,
    #[serde(default)]
    pub clip_skip_convention: ClipSkipConvention,
    /// Noise source, variation seed, eta noise seed delta.
    #[serde(default)]
    pub noise: NoiseOptions,
}

fn one() -> usize {
    1
}

/// The two meanings "clip skip" has among the tools people bring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipSkipConvention {
    /// AUTOMATIC1111's "Clip skip" N (ComfyUI's `CLIPSetLastLayer` −N): the prompt and the
    /// negative prompt are both read from the N-th layer from the end, then the final layer
    /// norm; 1 is the last layer.
    #[default]
    A1111,
    /// diffusers' `clip_skip=k`: the prompt is read from `hidden_states[-(k + 1)]` (A1111's
    /// N = k + 1) through the final layer norm; the negative prompt stays on the last layer;
    /// 0 skips nothing.
    Diffusers,
}

impl Txt2Img {
    /// The layers (A1111's count: 1 = last) the prompt and the negative prompt are read from.
    pub fn clip_layers(&self) -> (usize, usize) {
        match self.clip_skip_convention {
            ClipSkipConvention::A1111 => (self.clip_skip, self.clip_skip),
            ClipSkipConvention::Diffusers => (self.clip_skip + 1, 1),
        }
    }
}

/// What txt2img requests must share to run in one batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub sampler: SamplerKind,
    /// The CFG scale's bits (exact equality).
    pub cfg_bits: u64,
    pub clip_skip: (usize, usize),
    /// Noise source and eta noise seed delta (variation seeds are per image).
    pub noise: (RandnSource, u64),
}

impl BatchKey {
    pub fn of(r: &Txt2Img) -> Self {
        Self {
            width: r.width,
            height: r.height,
            steps: r.steps,
            sampler: r.sampler,
            cfg_bits: r.cfg_scale.to_bits(),
            clip_skip: r.clip_layers(),
            noise: r.noise.batch_key(),
        }
    }
}

/// Limits checked before any model work.
pub const MAX_STEPS: usize = 150;
pub const MAX_PIXELS: usize = 2048 * 2048;

impl Txt2Img {
    /// A clear reason for any setting out of range.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.steps == 0 || self.steps > MAX_STEPS {
            return Err(format!(
                "steps must be 1..={MAX_STEPS} (got {})",
                self.steps
            ));
        }
        if !(self.cfg_scale.is_finite() && (0.0..=30.0).contains(&self.cfg_scale)) {
            return Err(format!(
                "cfg_scale must be within 0..=30 (got {})",
                self.cfg_scale
            ));
        }
        if self.width == 0 || self.height == 0 || self.width % 8 != 0 || self.height % 8 != 0 {
            return Err(format!(
                "width and height must be positive multiples of 8 (got {}x{})",
                self.width, self.height
            ));
        }
        if self.width * self.height > MAX_PIXELS {
            return Err(format!(
                "{}x{} is over the pixel budget of {MAX_PIXELS} pixels",
                self.width, self.height
            ));
        }
        if self.batch_size == 0 || self.batch_size > 16 {
            return Err(format!(
                "batch_size must be 1..=16 (got {})",
                self.batch_size
            ));
        }
        let (prompt_layer, _) = self.clip_layers();
        if prompt_layer == 0 || prompt_layer > 12 {
            return Err(match self.clip_skip_convention {
                ClipSkipConvention::A1111 => {
                    format!("clip_skip must be 1..=12 (got {})", self.clip_skip)
                }
                ClipSkipConvention::Diffusers => format!(
                    "clip_skip in diffusers' convention must be 0..=11 (got {})",
                    self.clip_skip
                ),
            });
        }
        self.noise.validate()
    }
}
