//! `atelier-diffusion-bench`: latency figures for the diffusion engine, as JSON lines.
//!
//! ```text
//! atelier-diffusion-bench                 # tiny models on CPU: UNet step, txt2img end to end
//! atelier-diffusion-bench --full          # + SD1.5 / SDXL geometry (random weights)
//! atelier-diffusion-bench --device cuda   # the same on GPU 0 (a build with --features cuda)
//!   --check          the GPU against the CPU: our kernels vs their reference ops, and a tiny
//!                    txt2img's pixels (f32, f16, bf16 UNet)
//!   --profile        with --full: one more run per variant with every building block timed
//!   --smoke          with --full: 8² latents (every variant's code path, quickly, on a CPU)
//!   --kernel-sets L  with --full: which kernels each variant uses, comma-separated, of
//!                    candle (none: candle's ops), group_norm (our fused group norm), cudnn
//!                    (+ cuDNN convolutions), all (+ our flash attention);
//!                    default candle,group_norm,cudnn,all
//!   --txt2img-full   30-step DPM++ 2M txt2img with CFG and decode at SD1.5 geometry (--size,
//!                    --steps); --skip-tiny leaves out the tiny-model figures
//! ```
//!
//! Every figure is the median of `--runs` timed runs after one warm-up. `--full` prints each
//! SD1.5/SDXL figure for each kernel set side by side, with attention scores in the model's
//! dtype and upcast to f32, and the VAE decode in f32 (with and without TF32 matmuls), f16 and
//! bf16. `ATELIER_CUDNN_FIND=1` makes cuDNN time its algorithms once per shape.

use std::time::Instant;

use atelier_diffusion::kernels;
use atelier_diffusion::models::nn::{max_abs_diff, profile, Ops};
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

/// A variant's kernels: a name from `--kernel-sets` and what it switches on.
fn kernel_set(name: &str) -> anyhow::Result<(&'static str, Vec<kernels::Kernel>)> {
    use kernels::Kernel;
    Ok(match name {
        "candle" => ("candle's ops", vec![]),
        "group_norm" => ("our group norm", vec![Kernel::GroupNorm]),
        "cudnn" => (
            "our group norm + cuDNN conv",
            vec![Kernel::GroupNorm, Kernel::CudnnConv],
        ),
        "all" => (
            "our group norm + cuDNN conv + our flash attention",
            Kernel::ALL.to_vec(),
        ),
        other => anyhow::bail!("--kernel-sets: candle, group_norm, cudnn or all (got {other})"),
    })
}

fn variant_name(set: &str, scores: &str) -> String {
    format!("{set}, attention scores in {scores}")
}

/// One more run with every building block timed: where the time goes, as one JSON line.
fn profiled(
    dev: &Device,
    bench: &str,
    geometry: &str,
    variant: &str,
    f: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    sync(dev);
    profile::enable(true);
    let start = Instant::now();
    let result = f();
    sync(dev);
    let total = start.elapsed().as_secs_f64() * 1000.0;
    let table = profile::take();
    profile::enable(false);
    result?;
    let blocks: serde_json::Map<String, serde_json::Value> = table
        .iter()
        .map(|(k, ms, n)| (k.to_string(), serde_json::json!({"ms": ms, "calls": n})))
        .collect();
    let counted: f64 = table.iter().map(|(_, ms, _)| ms).sum();
    line(
        serde_json::json!({"profile": bench, "geometry": geometry, "variant": variant,
        "total_ms": total, "other_ms": total - counted, "blocks": blocks}),
    );
    Ok(())
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
        Some("cuda") => kernels::cuda_device(0)?,
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
    // `ATELIER_KERNELS` bounds every variant: a kernel it leaves out (say, one that crashed a
    // check run) is left out of each set, and sets that become the same run once.
    let allowed = kernels::from_env().map_err(anyhow::Error::msg)?;
    let mut sets: Vec<(String, Vec<kernels::Kernel>)> = Vec::new();
    for name in value("--kernel-sets")
        .unwrap_or_else(|| "candle,group_norm,cudnn,all".into())
        .split(',')
    {
        let (label, ks) = kernel_set(name)?;
        let (kept, left): (Vec<_>, Vec<_>) = ks.into_iter().partition(|k| allowed.contains(k));
        let label = if left.is_empty() {
            label.to_owned()
        } else {
            let left: Vec<&str> = left.iter().map(|k| k.name()).collect();
            format!("{label} (ATELIER_KERNELS leaves out {})", left.join(", "))
        };
        if !sets.iter().any(|(_, ks)| *ks == kept) {
            sets.push((label, kept));
        }
    }
    let profiling = flag("--profile");

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
        let cpu = StableDiffusion::load_candle(dir.path(), &Device::Cpu, DType::F32)?
            .txt2img(&req, |_, _| true)?;
        for check in kernels::self_check(&device)? {
            line(
                serde_json::json!({"check": "kernel_vs_reference", "device": dev_name,
                "result": check}),
            );
        }
        for dt in [DType::F32, DType::F16, DType::BF16] {
            let dev = StableDiffusion::load_candle(dir.path(), &device, dt)?
                .txt2img(&req, |_, _| true)?;
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
    let tiny = if flag("--skip-tiny") {
        &[][..]
    } else {
        &[Family::Sd1, Family::Sdxl][..]
    };
    for &family in tiny {
        let dir = tempfile::tempdir()?;
        make_tiny(dir.path(), family, 1)?;
        let sd = StableDiffusion::load_candle(dir.path(), &device, dtype)?;
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
    if !tiny.is_empty() {
        let dir = tempfile::tempdir()?;
        make_tiny(dir.path(), Family::Sd1, 1)?;
        let sd = StableDiffusion::load_candle(dir.path(), &device, dtype)?;
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
        // SD1.5 geometry, batch 2 (CFG), 512² → 64² latents; SDXL at 1024² → 128².
        // --smoke: the same code on 8² latents, to try every variant on a CPU in a minute.
        let smoke = flag("--smoke");
        for (name, family, side) in [("sd15", Family::Sd1, 64usize), ("sdxl", Family::Sdxl, 128)] {
            let side = if smoke { 8 } else { side };
            let cfg = SingleFileConfig::standard(family, 4);
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
            // Side by side: our kernels or candle's ops; attention scores in the model's dtype
            // or upcast to f32. The first row is how every step ran before either existed; each
            // row says how far its output is from that one's.
            let mut base: Option<Tensor> = None;
            for upcast in [true, false] {
                let mut ucfg = cfg.unet.clone();
                ucfg.upcast_attention = upcast;
                let unet = UNet::new(
                    RandomWeights::unrecorded(7)
                        .var_builder(&device)
                        .set_dtype(dtype),
                    ucfg,
                    Ops::INFERENCE,
                )?;
                for (i, (set, ks)) in sets.iter().enumerate() {
                    kernels::set_only(ks);
                    let mut step = || -> anyhow::Result<()> {
                        unet.forward(&x, &t, &ctx, added.as_ref())?;
                        Ok(())
                    };
                    let ms = time(&device, runs, &mut step)?;
                    let out = unet.forward(&x, &t, &ctx, added.as_ref())?;
                    let diff = match &base {
                        Some(b) => max_abs_diff(&out, b)?,
                        None => 0.0,
                    };
                    base.get_or_insert(out);
                    let variant = variant_name(set, if upcast { "f32" } else { "model" });
                    line(serde_json::json!({"bench": "unet_step", "geometry": name,
                        "device": dev_name, "dtype": format!("{dtype:?}"), "batch": 2,
                        "latent": side, "variant": variant, "median_ms": ms,
                        "max_abs_diff_vs_first": diff}));
                    // Where the time goes: how steps ran before (the first set, f32 scores) and
                    // with everything (the last set, scores in the model's dtype).
                    let last = i + 1 == sets.len();
                    if profiling && ((i == 0 && upcast) || (last && !upcast)) {
                        profiled(&device, "unet_step", name, &variant, &mut step)?;
                    }
                }
            }
            kernels::set_only(&allowed);
            if family == Family::Sd1 {
                let z = Tensor::randn(0f32, 1.0, (1, 4, side, side), &device)?;
                let mut base: Option<Tensor> = None;
                for (vae_dtype, tf32) in [
                    (DType::F32, false),
                    (DType::F32, true),
                    (DType::F16, false),
                    (DType::BF16, false),
                ]
                .into_iter()
                // candle's CPU matmul has no bf16.
                .filter(|(d, _)| !(device.is_cpu() && *d == DType::BF16))
                {
                    candle_core::cuda::set_gemm_reduced_precision_f32(tf32);
                    let vae = Vae::new(
                        RandomWeights::unrecorded(8)
                            .var_builder(&device)
                            .set_dtype(vae_dtype),
                        cfg.vae.clone(),
                    )?;
                    let z = z.to_dtype(vae_dtype)?;
                    for (i, (set, ks)) in sets.iter().enumerate() {
                        kernels::set_only(ks);
                        let mut decode = || -> anyhow::Result<()> {
                            vae.decode(&z)?;
                            Ok(())
                        };
                        let ms = time(&device, runs, &mut decode)?;
                        // Pixels in [-1, 1]: the difference from f32 with candle's ops.
                        let out = vae.decode(&z)?;
                        let diff = match &base {
                            Some(b) => max_abs_diff(&out, b)?,
                            None => 0.0,
                        };
                        base.get_or_insert(out);
                        let variant = format!(
                            "{}{}",
                            variant_name(set, "f32"),
                            if tf32 { ", tf32 matmul" } else { "" }
                        );
                        line(
                            serde_json::json!({"bench": "vae_decode", "geometry": "sd15",
                            "device": dev_name, "dtype": format!("{vae_dtype:?}"), "size": side * 8,
                            "variant": variant, "median_ms": ms,
                            "max_abs_diff_vs_first": diff}),
                        );
                        if profiling && i + 1 == sets.len() {
                            let what = format!("{variant}, {vae_dtype:?}");
                            profiled(&device, "vae_decode", "sd15", &what, &mut decode)?;
                        }
                    }
                }
                candle_core::cuda::set_gemm_reduced_precision_f32(false);
                kernels::set_only(&allowed);
            }
        }
    }

    if flag("--txt2img-full") {
        // The whole job at SD1.5 geometry: prompt encoding, 30 DPM++ 2M steps with CFG (batch 2
        // through the UNet), VAE decode to pixels. Random weights; the tiny model's tokenizer.
        let dir = tempfile::tempdir()?;
        make_tiny(dir.path(), Family::Sd1, 1)?;
        let side: usize = value("--size").and_then(|v| v.parse().ok()).unwrap_or(512);
        let steps: usize = value("--steps").and_then(|v| v.parse().ok()).unwrap_or(30);
        let req = Txt2Img {
            prompt: "a red circle on blue".into(),
            negative_prompt: "blurry".into(),
            steps,
            cfg_scale: 7.0,
            seed: 1,
            width: side,
            height: side,
            batch_size: 1,
            sampler: SamplerKind::DpmPp2m,
            clip_skip: 1,
        };
        // The pipeline runs its networks on libtorch: the UNet in the bench's dtype, the VAE in
        // each dtype `ATELIER_VAE_DTYPE` offers (f32 is the default).
        let on = if device.is_cpu() {
            tch::Device::Cpu
        } else {
            tch::Device::Cuda(0)
        };
        let kind_of = |d: DType| match d {
            DType::F16 => tch::Kind::Half,
            DType::BF16 => tch::Kind::BFloat16,
            _ => tch::Kind::Float,
        };
        let placement = atelier_diffusion::pipeline::Placement {
            device: on,
            kind: kind_of(dtype),
        };
        let vae_dtypes = if device.is_cpu() {
            vec![DType::F32]
        } else {
            vec![DType::F32, DType::F16, DType::BF16]
        };
        for vae_dtype in vae_dtypes {
            let sd = StableDiffusion::random(
                Family::Sd1,
                dir.path(),
                placement,
                kind_of(vae_dtype),
                11,
            )?;
            let ms = time(&device, runs.min(5), || {
                sd.txt2img(&req, |_, _| true)?;
                Ok(())
            })?;
            line(
                serde_json::json!({"bench": "txt2img_full", "geometry": "sd15",
                "device": dev_name, "dtype": format!("{dtype:?}"),
                "vae_dtype": format!("{vae_dtype:?}"), "size": side, "steps": steps,
                "sampler": "DPM++ 2M", "cfg": 7.0, "median_ms": ms}),
            );
        }
    }
    Ok(())
}
