//! Peak memory of one training step beside the estimate the trainer refuses jobs by
//! (`atelier_diffusion::memory`), on the tiny SD 1.x-shaped model, libtorch CPU, f32.
//!
//! ```text
//! cargo run --release -p atelier-trainer --example train_memory -- RESOLUTION BATCH [gc]
//! ```
//!
//! One process per run (peak RSS only grows): prints the step's growth of peak RSS over the
//! prepared data and the estimate of the same.

use atelier_contracts::{TrainData, TrainImage, TrainSpec};
use atelier_diffusion::pipeline::{make_tiny, Family, Placement, StableDiffusion};
use atelier_trainer::session::{prepare, Session, Source};

/// Peak resident set (VmHWM) in MiB.
fn peak_mib() -> anyhow::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib = status
        .lines()
        .find(|l| l.starts_with("VmHWM"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/self/status"))?;
    Ok(kib / 1024)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: train_memory RESOLUTION BATCH [gc]";
    let res: u32 = args.get(1).ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let batch: u32 = args.get(2).ok_or_else(|| anyhow::anyhow!(usage))?.parse()?;
    let gc = args.get(3).is_some_and(|a| a == "gc");
    let dir = tempfile::tempdir()?;
    make_tiny(dir.path(), Family::Sd1, 1)?;
    let model = StableDiffusion::load(dir.path(), Placement::named("cpu")?)?;
    let image = TrainImage {
        image: "x/y".into(),
        caption: String::new(),
    };
    let data = TrainData::Images {
        images: vec![image],
    };
    let mut spec = TrainSpec::new("tiny", "bench", data);
    spec.resolution = res;
    spec.min_bucket_reso = 64;
    spec.max_bucket_reso = res.max(128);
    spec.batch_size = batch;
    spec.max_train_steps = 2;
    spec.gradient_checkpointing = gc;
    let side = res as usize / model.vae_scale();
    let estimate = atelier_diffusion::memory::train_activation_bytes(
        model.unet_config(),
        side,
        side,
        batch as usize,
        gc,
        4,
    ) >> 20;
    let sources = (0..4u8)
        .map(|i| Source {
            image: image::RgbImage::from_pixel(64, 64, image::Rgb([i * 60, 90, 200])),
            caption: format!("square {i}"),
            weight: 1.0,
            repeats: 1,
            is_class: false,
        })
        .collect();
    let examples = prepare(&model, &spec, sources)?;
    let prepared = peak_mib()?;
    let mut run = Session::new(model, &spec, examples)?;
    run.train_step()?;
    let grew = peak_mib()? - prepared;
    println!(
        "{{\"resolution\":{res},\"batch\":{batch},\"gradient_checkpointing\":{gc},\"step_peak_growth_mib\":{grew},\"estimate_mib\":{estimate}}}"
    );
    Ok(())
}
