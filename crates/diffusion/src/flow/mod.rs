//! The transformer families, FLUX.1 and SD 3 / 3.5: their models loaded from diffusers folders
//! (or made of seeded random weights of a real geometry, for benchmarks), their prompts encoded
//! as diffusers' pipelines encode them (`cond`), and flow-matching sampling from seeds or given
//! latents (`sample`).

mod cond;
mod generate;
mod load;
mod lora;
mod sample;
pub mod single_file;

use atelier_modelkit::t5_tokenizer::T5Tokenizer;
use serde::{Deserialize, Serialize};

use crate::schedulers::flow_match::FlowMatchConfig;
use crate::tokenizer::ClipTokenizer;
use crate::torch::clip::ClipTextModel;
use crate::torch::flux::FluxTransformer;
use crate::torch::mmdit::Sd3Transformer;
use crate::torch::t5::T5Encoder;
use crate::torch::vae::Vae;

pub use cond::Conditioning;
pub use load::is_flow_folder;
pub use sample::{FlowRequest, FlowSampler, Previews, MAX_SEQUENCE_LENGTH};

/// Which transformer family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FlowFamily {
    Flux,
    Sd3,
}

impl FlowFamily {
    pub fn label(self) -> &'static str {
        match self {
            FlowFamily::Flux => "FLUX.1",
            FlowFamily::Sd3 => "SD 3",
        }
    }
}

/// The denoising transformer.
#[derive(Debug, Clone)]
pub enum Denoiser {
    Flux(FluxTransformer),
    Sd3(Sd3Transformer),
}

/// A loaded FLUX or SD 3 model. Cloning shares the weights.
#[derive(Clone)]
pub struct FlowModel {
    pub family: FlowFamily,
    pub name: String,
    /// A1111's short hash: the first 10 hex digits of the transformer weights' SHA-256.
    pub hash: String,
    pub scheduler: FlowMatchConfig,
    pub denoiser: Denoiser,
    pub vae: Vae,
    /// CLIP-L (FLUX: pooled output only), and for SD 3 CLIP-G.
    pub clip: Vec<ClipTextModel>,
    /// T5 v1.1; None where the folder has none (SD 3 then conditions on zeros in its place).
    pub t5: Option<T5Encoder>,
    clip_tokenizers: Vec<ClipTokenizer>,
    t5_tokenizer: Option<T5Tokenizer>,
    /// (name, A1111 short hash) of the LoRAs applied, for the `parameters` text.
    lora_hashes: Vec<(String, String)>,
    weight_bytes: u64,
}

// SAFETY: as for the UNet families' `Nets`: `tch::Tensor` is not `Sync` because some methods
// change a tensor through a shared reference (in-place ops, gradients accumulated by
// `backward`). A shared `FlowModel` only runs inference: its weights are loaded without
// gradients, sampling and encoding run under `no_grad` and allocate new tensors (libtorch's ops
// are safe to call concurrently on shared inputs), and applying a LoRA takes `&mut` on a clone
// and replaces tensor handles rather than writing into the shared storage.
unsafe impl Sync for FlowModel {}

impl FlowModel {
    /// Bytes of weights read from disk.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Latent pixels per image pixel along a side (8 for the real VAEs).
    pub fn vae_scale(&self) -> usize {
        1 << self.vae.config.block_out_channels.len().saturating_sub(1)
    }
}
