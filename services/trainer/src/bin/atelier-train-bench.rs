//! `atelier-train-bench`: LoRA training speed, as JSON lines.
//!
//! ```text
//! atelier-train-bench                       # tiny model on CPU: optimizer steps/s of a session
//! atelier-train-bench --sd15 --device cuda  # SD1.5 UNet geometry (random weights), batch 4,
//!                                           # 512² (64² latents), LoRA rank 16 on the attention
//!                                           # projections, bf16 compute, f32 LoRA weights
//! ```
//!
//! `--batch N`, `--latent N` (latent side), `--rank N`, `--dtype f32|f16|bf16` and `--runs N`
//! change the SD1.5 case. Every figure is the median of `--runs` timed steps after two warm-up
//! steps. Peak GPU memory is what `scripts/bench-train-gpu` samples from nvidia-smi beside it.

use std::time::Instant;

use atelier_contracts::{TrainData, TrainImage, TrainSpec};
use atelier_diffusion::models::shapes::RandomWeights;
use atelier_diffusion::pipeline::{
    make_tiny_for_training, Family, Placement, SingleFileConfig, StableDiffusion,
};
use atelier_diffusion::schedulers::{NoiseSchedule, PredictionType, ScheduleConfig};
use atelier_diffusion::torch::unet::UNet;
use atelier_diffusion::torch::weights::Weights;
use atelier_diffusion::torch::{Kind, Tensor};
use atelier_diffusion::train::{
    stream, AdamW, AdamWParams, Batch, LoraConfig, LoraNetwork, Objective, UnetTargets,
};
use atelier_trainer::session::{prepare, Session, Source};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
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
    let num = |f: &str, d: usize| -> usize { value(f).and_then(|v| v.parse().ok()).unwrap_or(d) };
    let runs = num("--runs", 10).max(1);
    let dev_name = value("--device").unwrap_or_else(|| "cpu".into());
    let device = Placement::named(&dev_name)?.device;
    let kind = match value("--dtype").as_deref() {
        None if device == atelier_diffusion::torch::Device::Cpu => Kind::Float,
        None => Kind::BFloat16,
        Some("f32") => Kind::Float,
        Some("f16") => Kind::Half,
        Some("bf16") => Kind::BFloat16,
        Some(other) => anyhow::bail!("--dtype f32|f16|bf16 (got {other})"),
    };
    let placement = Placement { device, kind };
    let sync = || {
        if let atelier_diffusion::torch::Device::Cuda(i) = device {
            atelier_diffusion::torch::Cuda::synchronize(i as i64);
        }
    };

    if !flag("--sd15") {
        // The tiny model through a whole session: data, text cache, loss, AdamW.
        let dir = tempfile::tempdir()?;
        make_tiny_for_training(dir.path(), Family::Sd1, 1)?;
        for batch in [1u32, 2] {
            let model = StableDiffusion::load(dir.path(), placement)?;
            let mut spec = TrainSpec::new(
                "tiny",
                "bench",
                TrainData::Images {
                    images: vec![TrainImage {
                        image: "bench/only".into(),
                        caption: String::new(),
                    }],
                },
            );
            spec.resolution = 64;
            spec.min_bucket_reso = 64;
            spec.max_bucket_reso = 128;
            spec.network.rank = 4;
            spec.batch_size = batch;
            spec.max_train_steps = (runs + 2) as u32;
            let sources = (0..4)
                .map(|i| Source {
                    image: image::RgbImage::from_pixel(64, 64, image::Rgb([i * 60, 90, 200])),
                    caption: format!("square number {i}"),
                    weight: 1.0,
                    repeats: 1,
                    is_class: false,
                })
                .collect();
            let ex = prepare(&model, &spec, sources)?;
            let mut run = Session::new(model, &spec, ex)?;
            run.train_step()?;
            run.train_step()?;
            let mut t = Vec::new();
            while !run.done() {
                let s = Instant::now();
                run.train_step()?;
                t.push(s.elapsed().as_secs_f64() * 1000.0);
            }
            let ms = median(t);
            println!(
                "{}",
                serde_json::json!({"bench": "tiny_lora_step", "device": dev_name,
                    "dtype": format!("{kind:?}"), "batch": batch, "size": 64, "rank": 4,
                    "median_ms": ms, "steps_per_s": 1000.0 / ms})
            );
        }
        return Ok(());
    }

    // SD1.5 geometry: the UNet alone (latents and text states as a cache would hold them).
    let batch = num("--batch", 4);
    let side = num("--latent", 64);
    let rank = num("--rank", 16);
    let cfg = SingleFileConfig::standard(Family::Sd1, 4);
    let weights = Weights::from_backend(RandomWeights::unrecorded(7), kind, device);
    let mut unet = UNet::new(&weights, cfg.unet.clone())?;
    let lora = LoraConfig {
        rank,
        alpha: rank as f64,
        conv_rank: None,
        conv_alpha: 1.0,
        unet_targets: UnetTargets::Attention,
        text_encoder: false,
    };
    let network = LoraNetwork::attach_parts(&mut unet, Vec::new(), Family::Sd1, &lora, 1)?;
    let (vars, _): (Vec<&Tensor>, Vec<_>) = network.vars().into_iter().unzip();
    let mut opt = AdamW::new(AdamWParams::default(), &vars);
    let schedule = NoiseSchedule::new(ScheduleConfig::default());
    let objective = Objective {
        prediction: PredictionType::Epsilon,
        min_snr_gamma: Some(5.0),
        noise_offset: 0.0,
        min_timestep: 0,
        max_timestep: 1000,
    };
    let (b, s) = (batch as i64, side as i64);
    let batch_data = Batch {
        latents: Tensor::randn([b, 4, s, s], (Kind::Float, device)),
        context: Tensor::randn(
            [b, 77, cfg.unet.cross_attention_dim as i64],
            (Kind::Float, device),
        )
        .to_kind(kind),
        added: None,
        weights: vec![1.0; batch],
    };
    let lrs = vec![1e-4; vars.len()];
    let mut step = |i: u64| -> anyhow::Result<()> {
        let mut rng = stream(1, 2, i);
        network.zero_grad();
        objective
            .loss(&unet, &schedule, &batch_data, &mut rng)?
            .f_backward()?;
        opt.step(&vars, &network.grads(), &lrs)?;
        sync();
        Ok(())
    };
    step(0)?;
    step(1)?;
    let mut t = Vec::new();
    for i in 0..runs {
        let s = Instant::now();
        step(2 + i as u64)?;
        t.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "{}",
        serde_json::json!({"bench": "sd15_lora_step", "device": dev_name,
            "dtype": format!("{kind:?}"), "batch": batch, "latent": side,
            "pixels": side * 8, "rank": rank, "targets": "attention",
            "lora_params": network.parameter_count(), "median_ms": median(t)})
    );
    Ok(())
}
