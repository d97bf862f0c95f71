//! `atelier bench models`: every family at its native geometry with seeded random weights — SD 1.5
//! (512²), SDXL (1024²), SD 3.5 Medium (1024²), FLUX.1-dev (1024²) — timed component by component
//! as a pipeline runs them: the text encoders once per prompt (twice with CFG), the denoiser once
//! per step (a batch of 2 with CFG), the VAE decode once. Components are built, timed and dropped
//! one after another (what diffusers' model CPU offload does), so peak memory is the largest
//! component's plus the activations.
//!
//! A model whose weights exceed this machine's memory (FLUX.1-dev's 12B transformer in f32 on a
//! 24 GiB CPU) is timed by its blocks: the transformer with 1 double- and 1 single-stream block,
//! with 2 + 1 and with 1 + 2; the full depth's step time is the first plus 18 and 37 times the
//! extra blocks' times. The row says so.

mod families;

use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use families::{Family, FAMILIES};

/// What one family's run reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub family: String,
    /// Image size and what one step runs.
    pub geometry: String,
    /// Denoiser parameters (and all parameters: text encoders + denoiser + VAE).
    pub denoiser_params: u64,
    pub total_params: u64,
    pub dtype: String,
    /// Median of the denoiser's step time.
    pub step_ms: f64,
    /// Text encoders (per prompt, ×2 with CFG) + steps × step + VAE decode.
    pub image_s: f64,
    pub steps: usize,
    pub text_ms: f64,
    pub vae_ms: f64,
    /// The process's peak resident set (CPU), or the device's peak allocation where measured.
    pub peak_mib: u64,
    pub note: String,
}

/// How the run goes.
#[derive(Debug, Clone)]
pub struct Options {
    pub device: tch::Device,
    /// The denoiser's and text encoders' dtype; the VAE runs in f32.
    pub kind: tch::Kind,
    pub runs: usize,
    pub steps: usize,
    pub seed: u64,
}

/// The median of `runs` timings of `f` (after one untimed warm-up on GPUs), in milliseconds.
pub(crate) fn time_ms(
    opts: &Options,
    mut f: impl FnMut() -> crate::torch::Result<()>,
) -> crate::torch::Result<f64> {
    if opts.device != tch::Device::Cpu {
        f()?;
        sync(opts.device);
    }
    let mut t: Vec<f64> = Vec::with_capacity(opts.runs);
    for _ in 0..opts.runs.max(1) {
        let start = Instant::now();
        f()?;
        sync(opts.device);
        t.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

fn sync(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// This process's peak resident set in MiB (Linux `VmHWM`), 0 elsewhere.
pub fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<u64>().ok())
            })
        })
        .map_or(0, |kb| kb / 1024)
}

/// Runs one family.
pub fn run(family: Family, opts: &Options) -> crate::torch::Result<Row> {
    crate::torch::guard(|| tch::no_grad(|| families::run(family, opts)))
}
