//! The configs of Stable Diffusion's networks, as diffusers and transformers write them
//! (`unet/config.json`, `vae/config.json`, `text_encoder/config.json`), with their defaults.

use serde::{Deserialize, Serialize};

/// A number or one per block (diffusers accepts both for several fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v.get(i).or(v.last()).copied().unwrap_or(1),
        }
    }
}

/// `unet/config.json`, the fields that shape the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub layers_per_block: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub cross_attention_dim: usize,
    /// Heads per block, under its historical (misleading) name; `num_attention_heads` wins.
    pub attention_head_dim: PerBlock,
    pub num_attention_heads: Option<PerBlock>,
    pub transformer_layers_per_block: PerBlock,
    pub use_linear_projection: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Attention scores in f32 under f16/bf16 (diffusers' name; SD 2.1 sets it).
    pub upcast_attention: bool,
}

impl Default for UNetConfig {
    /// Stable Diffusion 1.5.
    fn default() -> Self {
        Self {
            sample_size: 64,
            in_channels: 4,
            out_channels: 4,
            layers_per_block: 2,
            block_out_channels: vec![320, 640, 1280, 1280],
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            cross_attention_dim: 768,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            transformer_layers_per_block: PerBlock::One(1),
            use_linear_projection: false,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            upcast_attention: false,
        }
    }
}

impl UNetConfig {
    pub fn heads(&self, block: usize) -> usize {
        self.num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .get(block)
    }

    /// SDXL-style added conditioning (pooled text embeds + time ids).
    pub fn is_sdxl(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "unet config: {} block_out_channels, {} down blocks, {} up blocks (they must agree)",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(
                t.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                return Err(format!("unet config: unsupported block type {t}"));
            }
        }
        Ok(())
    }
}

/// `vae/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    /// Latents are `(mean − shift_factor) · scaling_factor` (SD 3 and FLUX's 16-channel VAEs).
    pub shift_factor: Option<f64>,
    /// The 1×1 convolutions around the latent space (absent from SD 3's and FLUX's VAEs).
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub sample_size: usize,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            sample_size: 512,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    QuickGelu,
    Gelu,
}

/// `text_encoder/config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub projection_dim: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    pub eos_token_id: u32,
}

impl Default for ClipConfig {
    /// SD 1.x's ViT-L/14 text tower.
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 49407,
        }
    }
}
