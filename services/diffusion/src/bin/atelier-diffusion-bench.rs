//! `atelier-diffusion-bench`: latency figures for the diffusion engine, as JSON lines.
//!
//! ```text
//! atelier-diffusion-bench                 # tiny models on CPU: UNet step, txt2img end to end
//! atelier-diffusion-bench --full          # + SD1.5 / SDXL geometry (random weights)
//! atelier-diffusion-bench --device cuda   # the same on GPU 0 (a build with --features cuda)
//! ```
//!
//! Every figure is the median of `--runs` timed runs after one warm-up.

use std::time::Instant;

use atelier_diffusion::models::nn::Ops;
use atelier_diffusion::models::shapes::RandomWeights;
use atelier_diffusion::models::unet::{AddedCond, UNet};
use atelier_diffusion::models::vae::Vae;
use atelier_diffusion::pipeline::{make_tiny, Family, SingleFileConfig, StableDiffusion, Txt2Img};
use atelier_diffusion::schedulers::SamplerKind;
use candle_core::{DType, Device, Tensor};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn sync(dev: &Device) {
    let _ = dev.synchronize();
}

fn time<F: FnMut() -> anyhow::Result<()>>(
    dev: &Device,
    runs: usize,
    mut f: F,
) -> anyhow::Result<f64> {
    f()?;
    sync(dev);
    let mut t = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        f()?;
        sync(dev);
        t.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(median(t))
}

fn line(v: serde_json::Value) {
    println!("{v}");
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().any(|a| a == f);
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let runs: usize = value("--runs").and_then(|v| v.parse().ok()).unwrap_or(5);
    let device = match value("--device").as_deref() {
        None | Some("cpu") => Device::Cpu,
        Some("cuda") => Device::new_cuda(0)?,
        Some(other) => anyhow::bail!("--device cpu|cuda (got {other})"),
    };
    let dtype = match value("--dtype").as_deref() {
        None => {
            if device.is_cpu() {
                DType::F32
            } else {
                DType::F16
            }
        }
        Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some(other) => anyhow::bail!("--dtype f32|f16|bf16 (got {other})"),
    };
    let dev_name = if device.is_cpu() { "cpu" } else { "cuda" };

    if flag("--check") && !device.is_cpu() {
        // The device path against the CPU path: the same tiny txt2img, pixel differences.
        let dir = tempfile::tempdir()?;
        make_tiny(dir.path(), Family::Sd1, 1)?;
        let req = Txt2Img {
            prompt: "a (red:1.2) circle on blue".into(),
            negative_prompt: "green".into(),
            steps: 20,
            cfg_scale: 7.0,
            seed: 3,
            width: 64,
            height: 64,
            batch_size: 1,
            sampler: SamplerKind::DpmPp2m,
            clip_skip: 1,
        };
        let cpu = StableDiffusion::load(dir.path(), &Device::Cpu, DType::F32)?
            .txt2img(&req, |_, _| true)?;
        for dt in [DType::F32, DType::F16] {
            let dev = StableDiffusion::load(dir.path(), &device, dt)?.txt2img(&req, |_, _| true)?;
            let diffs: Vec<i32> = cpu[0]
                .image
                .as_raw()
                .iter()
                .zip(dev[0].image.as_raw())
                .map(|(a, b)| (*a as i32 - *b as i32).abs())
                .collect();
            let max = diffs.iter().copied().max().unwrap_or(0);
            let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len().max(1) as f64;
            line(
                serde_json::json!({"check": "tiny_txt2img_vs_cpu", "device": dev_name,
                "unet_dtype": format!("{dt:?}"), "max_abs_diff_255": max, "mean_abs_diff_255": mean}),
            );
        }
    }

    // Tiny models: the pipeline end to end.
    for family in [Family::Sd1, Family::Sdxl] {
        let dir = tempfile::tempdir()?;
        make_tiny(dir.path(), family, 1)?;
        let sd = StableDiffusion::load(dir.path(), &device, dtype)?;
        for (side, steps) in [(32usize, 20usize), (64, 20)] {
            let req = Txt2Img {
                prompt: "a red circle on blue".into(),
                negative_prompt: String::new(),
                steps,
                cfg_scale: 7.0,
                seed: 1,
                width: side,
                height: side,
                batch_size: 1,
                sampler: SamplerKind::DpmPp2m,
                clip_skip: 1,
            };
            let total = time(&device, runs, || {
                sd.txt2img(&req, |_, _| true)?;
                Ok(())
            })?;
            line(serde_json::json!({
                "bench": "tiny_txt2img", "family": format!("{family:?}"), "device": dev_name,
                "size": side, "steps": steps, "cfg": true, "median_ms": total,
                "per_step_ms": total / steps as f64,
            }));
        }
    }

    // Cross-job batching (the sampler's --batch-window-ms): 4 jobs with their own prompts and
    // seeds, one after another vs stacked into one UNet batch, side by side.
    {
        let dir = tempfile::tempdir()?;
        make_tiny(dir.path(), Family::Sd1, 1)?;
        let sd = StableDiffusion::load(dir.path(), &device, dtype)?;
        let reqs: Vec<Txt2Img> = ["a red circle", "a blue square", "two stars", "a green tree"]
            .iter()
            .enumerate()
            .map(|(i, p)| Txt2Img {
                prompt: (*p).into(),
                negative_prompt: String::new(),
                steps: 20,
                cfg_scale: 7.0,
                seed: i as u64,
                width: 32,
                height: 32,
                batch_size: 1,
                sampler: SamplerKind::DpmPp2m,
                clip_skip: 1,
            })
            .collect();
        let one_by_one = time(&device, runs, || {
            for r in &reqs {
                sd.txt2img(r, |_, _| true)?;
            }
            Ok(())
        })?;
        let batched = time(&device, runs, || {
            sd.txt2img_batch(&reqs, |_, _| true)?;
            Ok(())
        })?;
        line(serde_json::json!({
            "bench": "txt2img_4_jobs", "family": "Sd1", "device": dev_name, "size": 32,
            "steps": 20, "one_by_one_ms": one_by_one, "batched_ms": batched,
            "speedup": one_by_one / batched,
        }));
    }

    if flag("--full") {
        // SD1.5 geometry, batch 2 (CFG), 512² → 64² latents.
        for (name, family, side) in [("sd15", Family::Sd1, 64usize), ("sdxl", Family::Sdxl, 128)] {
            let cfg = SingleFileConfig::standard(family, 4);
            let weights = RandomWeights::new(7);
            let unet = UNet::new(
                weights.var_builder(&device).set_dtype(dtype),
                cfg.unet.clone(),
                Ops::INFERENCE,
            )?;
            let x = Tensor::randn(0f32, 1.0, (2, 4, side, side), &device)?.to_dtype(dtype)?;
            let t = Tensor::new(&[500f32, 500.0], &device)?;
            let ctx_dim = cfg.unet.cross_attention_dim;
            let ctx = Tensor::randn(0f32, 1.0, (2, 77, ctx_dim), &device)?.to_dtype(dtype)?;
            let added = if family == Family::Sdxl {
                Some(AddedCond {
                    text_embeds: Tensor::randn(0f32, 1.0, (2, 1280), &device)?.to_dtype(dtype)?,
                    time_ids: Tensor::new(
                        &[[1024f32, 1024.0, 0.0, 0.0, 1024.0, 1024.0]; 2],
                        &device,
                    )?,
                })
            } else {
                None
            };
            let step = time(&device, runs, || {
                unet.forward(&x, &t, &ctx, added.as_ref())?;
                Ok(())
            })?;
            line(
                serde_json::json!({"bench": "unet_step", "geometry": name, "device": dev_name,
                "dtype": format!("{dtype:?}"), "batch": 2, "latent": side, "median_ms": step}),
            );
            drop(unet);
            if family == Family::Sd1 {
                let vw = RandomWeights::new(8);
                let vae = Vae::new(vw.var_builder(&device), cfg.vae.clone())?;
                let z = Tensor::randn(0f32, 1.0, (1, 4, 64, 64), &device)?;
                let dec = time(&device, runs, || {
                    vae.decode(&z)?;
                    Ok(())
                })?;
                line(
                    serde_json::json!({"bench": "vae_decode", "geometry": "sd15", "device": dev_name,
                    "dtype": "F32", "size": 512, "median_ms": dec}),
                );
            }
        }
    }
    Ok(())
}
