//! The bench's arguments, timing and report line.

use std::time::Instant;

pub struct Args {
    pub item: String,
    pub cuda: bool,
    pub dtype: String,
    pub latent: usize,
    pub runs: usize,
    pub warmup: usize,
    pub steps: usize,
    pub batch: usize,
    pub rank: usize,
    /// `lora_step` with the UNet checkpointed layer by layer.
    pub checkpointing: bool,
}

const ITEMS: [&str; 5] = [
    "unet_sd15",
    "unet_sdxl",
    "vae_decode",
    "txt2img",
    "lora_step",
];

impl Args {
    pub fn parse() -> anyhow::Result<Self> {
        let args: Vec<String> = std::env::args().collect();
        let value = |f: &str| {
            args.iter()
                .position(|a| a == f)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let num =
            |f: &str, d: usize| -> usize { value(f).and_then(|v| v.parse().ok()).unwrap_or(d) };
        // The engine is libtorch (tch); `--engine torch` is accepted as earlier scripts wrote it.
        if let Some(other) = value("--engine").filter(|e| e != "torch") {
            anyhow::bail!(
                "--engine: the engine is torch (candle's models left the tree; got {other})"
            );
        }
        let item = value("--item").unwrap_or_default();
        if !ITEMS.contains(&item.as_str()) {
            anyhow::bail!("--item: one of {ITEMS:?} (got {item:?})");
        }
        let cuda = match value("--device").as_deref() {
            None | Some("cpu") => false,
            Some("cuda") => true,
            Some(other) => anyhow::bail!("--device cpu|cuda (got {other})"),
        };
        let default_dtype = if cuda { "f16" } else { "f32" };
        let dtype = value("--dtype").unwrap_or_else(|| default_dtype.into());
        if !["f32", "f16", "bf16"].contains(&dtype.as_str()) {
            anyhow::bail!("--dtype f32|f16|bf16 (got {dtype})");
        }
        let default_latent = if item == "unet_sdxl" { 128 } else { 64 };
        Ok(Self {
            latent: num("--latent", default_latent),
            runs: num("--runs", 3).max(1),
            warmup: num("--warmup", 1),
            steps: num("--steps", 20).max(1),
            batch: num("--batch", 1).max(1),
            rank: num("--rank", 16).max(1),
            checkpointing: args.iter().any(|a| a == "--checkpointing"),
            item,
            cuda,
            dtype,
        })
    }

    pub fn report(&self, ms: f64) -> serde_json::Value {
        serde_json::json!({
            "bench": self.item,
            "engine": "tch",
            "device": if self.cuda { "cuda" } else { "cpu" },
            "dtype": self.dtype,
            "latent": self.latent,
            "pixels": self.latent * 8,
            "steps": (self.item == "txt2img").then_some(self.steps),
            "batch": (self.item == "lora_step").then_some(self.batch),
            "checkpointing": (self.item == "lora_step").then_some(self.checkpointing),
            "median_ms": (ms * 10.0).round() / 10.0,
            "runs": self.runs,
            "peak_rss_mb": peak_rss_mb(),
        })
    }
}

/// The median of `args.runs` timed calls after `args.warmup` untimed ones; `sync` waits for the
/// device.
pub fn time(
    args: &Args,
    mut f: impl FnMut() -> anyhow::Result<()>,
    sync: impl Fn(),
) -> anyhow::Result<f64> {
    let runs = args.runs;
    for _ in 0..args.warmup {
        f()?;
        sync();
    }
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        sync();
        t.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// The process's peak resident set (VmHWM), in MiB.
pub fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

/// The SD schedule's sigmas at `steps` evenly spaced timesteps (trailing zero added).
pub fn euler_sigmas(steps: usize) -> Vec<f64> {
    let schedule = atelier_diffusion::schedulers::NoiseSchedule::new(Default::default());
    let n = schedule.len();
    let mut sigmas: Vec<f64> = (0..steps)
        .map(|i| {
            let t = (n - 1) - i * n / steps;
            let a = schedule.alpha_cumprod(t as i64);
            ((1.0 - a) / a).sqrt()
        })
        .collect();
    sigmas.push(0.0);
    sigmas
}

/// The timestep of the i-th of `steps` evenly spaced steps.
pub fn euler_timestep(i: usize, steps: usize) -> f64 {
    (999 - i * 1000 / steps) as f64
}
