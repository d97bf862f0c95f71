//! `atelier-engine-bench`: one figure of the diffusion engine (libtorch through tch), as a JSON
//! line, to compare side by side with PyTorch from Python in separate processes (each with its
//! own peak memory).
//!
//! ```text
//! atelier-engine-bench --item ITEM [--device cpu|cuda] [--dtype f32|f16|bf16]
//!                      [--latent N] [--runs N] [--warmup N] [--steps N] [--batch N] [--rank N]
//! ```
//!
//! Items, on random weights of the real geometry:
//! - `unet_sd15`: one SD 1.5 UNet step, batch 2 (a CFG pair), `--latent` side (default 64: 512²);
//! - `unet_sdxl`: one SDXL UNet step, batch 2, with added conditioning (default 128: 1024²);
//! - `vae_decode`: the SD VAE decoding one `--latent`² latent (default 64: 512²), f32;
//! - `txt2img`: `--steps` (20) Euler steps with CFG 7.5 on the SD 1.5 UNet, then the VAE decode;
//! - `lora_step`: one LoRA training step (rank `--rank` 16 on the attention projections, AdamW,
//!   noise-prediction MSE), batch `--batch` (1), SD 1.5 UNet; `--checkpointing` recomputes the
//!   UNet layer by layer in the backward pass (gradient checkpointing).
//!
//! The figure is the median of `--runs` (3) timed runs after `--warmup` (1) untimed ones; `peak_rss_mb` is the
//! process's peak resident memory. `crates/diffusion/benches/engines.py` times the same items on
//! PyTorch from Python (diffusers' models); `scripts/bench-engines` runs both.

#[path = "engine_bench/common.rs"]
mod common;
#[path = "engine_bench/torch.rs"]
mod torch_items;

use common::Args;

fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let ms = torch_items::run(&args)?;
    println!("{}", args.report(ms));
    Ok(())
}
