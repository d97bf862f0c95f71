//! What a job will need in memory, from the model's geometry, before it runs: a worker refuses a
//! job that cannot fit with the figure, instead of growing until the kernel kills it (and, with
//! it, every other job of the process).
//!
//! Training keeps every activation of the UNet's forward pass for the backward pass. Per latent
//! cell and channel of a level, a ResNet block saves about 12 tensors and a transformer block
//! about 36 (norms, projections, attention in and out, GEGLU's 8× inner width); attention runs
//! through `scaled_dot_product_attention`, whose fused kernels keep no tokens² score matrix.
//! Gradient checkpointing keeps about half. The constants are calibrated on libtorch CPU
//! measurements of whole training steps (peak RSS, `docs/reliability.md`: within 17% below the
//! measured growth), and the result is rounded up by a quarter.

use crate::models::config::UNetConfig;

/// Floats a ResNet block keeps per latent cell and channel while training.
const RESNET_SAVED: u64 = 12;
/// Floats a transformer block keeps per token and channel while training.
const TRANSFORMER_SAVED: u64 = 36;
/// Floats alive at once during backward at the widest level (gradients of activations).
const BACKWARD_TRANSIENT: u64 = 8;

/// A job's estimated peak, split for the message that refuses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub weights: u64,
    pub activations: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights + self.activations
    }
}

/// Bytes of activations one training step keeps for `batch` latents of `latent_w`×`latent_h`
/// cells, in f32 (`elem_bytes` 4) or half precision (2).
pub fn train_activation_bytes(
    cfg: &UNetConfig,
    latent_w: usize,
    latent_h: usize,
    batch: usize,
    gradient_checkpointing: bool,
    elem_bytes: usize,
) -> u64 {
    let levels = cfg.block_out_channels.len();
    let mut floats = 0u64;
    let mut widest = 0u64;
    for level in 0..levels {
        let scale = 1usize << level;
        let cells = (latent_w.div_ceil(scale) * latent_h.div_ceil(scale)) as u64;
        let channels = cfg.block_out_channels[level] as u64;
        let transformers = cfg.transformer_layers_per_block.get(level) as u64;
        let attends = |t: Option<&String>| t.is_some_and(|t| t.contains("CrossAttn"));
        let down_attn = attends(cfg.down_block_types.get(level));
        let up_attn = attends(cfg.up_block_types.get(levels - 1 - level));
        let layers = cfg.layers_per_block as u64;
        // Down blocks have `layers` ResNets, up blocks one more; the mid block (2 ResNets and a
        // transformer) sits at the last level.
        let mut resnets = layers + (layers + 1);
        let mut blocks_with_attn =
            u64::from(down_attn) * layers + u64::from(up_attn) * (layers + 1);
        if level + 1 == levels {
            resnets += 2;
            blocks_with_attn += 1;
        }
        let per_cell = RESNET_SAVED * resnets + TRANSFORMER_SAVED * transformers * blocks_with_attn;
        floats += cells * channels * per_cell;
        widest = widest.max(cells * channels);
    }
    if gradient_checkpointing {
        floats /= 2;
    }
    floats += widest * BACKWARD_TRANSIENT;
    floats * batch as u64 * elem_bytes as u64 * 5 / 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn training_memory_grows_with_pixels_and_batch() {
        let sd15 = UNetConfig::default();
        let one = train_activation_bytes(&sd15, 64, 64, 1, false, 4);
        // SD 1.5 at 512 px, batch 1, f32: about 3 GiB of activations.
        assert!((2u64 << 30..4u64 << 30).contains(&one), "{} MiB", one >> 20);
        assert_eq!(train_activation_bytes(&sd15, 64, 64, 4, false, 4), 4 * one);
        let big = train_activation_bytes(&sd15, 128, 128, 1, false, 4);
        assert!(big > 3 * one && big < 5 * one, "{big} vs {one}");
        let gc = train_activation_bytes(&sd15, 64, 64, 1, true, 4);
        assert!(gc < one * 6 / 10, "gradient checkpointing keeps about half");
        assert_eq!(train_activation_bytes(&sd15, 64, 64, 1, false, 2), one / 2);
    }
}
