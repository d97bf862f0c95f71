//! `atelier-train-bench`: whole training-session steps on a tiny model (data, text cache, loss,
//! AdamW), as JSON lines.
//!
//! ```text
//! atelier-train-bench [--device cpu|cuda] [--dtype f32|f16|bf16] [--runs N]
//! ```
//!
//! Every figure is the median of `--runs` timed steps after two warm-up steps. The LoRA step at
//! a real geometry (SD 1.5, any batch and size, beside PyTorch) is `atelier-engine-bench --item
//! lora_step`.

use std::time::Instant;

use atelier_contracts::{TrainData, TrainImage, TrainSpec};
use atelier_diffusion::pipeline::{make_tiny_for_training, Family, Placement, StableDiffusion};
use atelier_diffusion::torch::Kind;
use atelier_trainer::session::{prepare, Session, Source};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
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
    Ok(())
}
