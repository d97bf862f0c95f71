//! `atelier-embed-bench`: CLIP embeddings on candle (the retrieval indexer's and quality filter's
//! encoder), one JSON line, to compare with `crates/embed/benches/clip_torch.py` (transformers'
//! CLIPModel on PyTorch) on the same model folder, each in its own process.
//!
//! ```text
//! atelier-embed-bench --dir DIR [--item clip_image|clip_text] [--batch 16] [--runs 3]
//! ```
//!
//! The figure is the median of `--runs` timed calls after one warm-up; `peak_rss_mb` is the
//! process's peak resident memory.

use std::time::Instant;

use atelier_embed::clip::ClipEncoder;
use candle_core::Device;

fn peak_rss_mb() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let value = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let num = |f: &str, d: usize| value(f).and_then(|v| v.parse().ok()).unwrap_or(d);
    let dir = value("--dir").ok_or_else(|| anyhow::anyhow!("--dir: a CLIP model folder"))?;
    let item = value("--item").unwrap_or_else(|| "clip_image".into());
    let (batch, runs) = (num("--batch", 16).max(1), num("--runs", 3).max(1));
    let enc = ClipEncoder::load(std::path::Path::new(&dir), &Device::Cpu)?;
    let images: Vec<image::DynamicImage> = (0..batch)
        .map(|i| {
            image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(256, 256, |x, y| {
                image::Rgb([(x + i as u32) as u8, y as u8, (x ^ y) as u8])
            }))
        })
        .collect();
    let texts: Vec<String> = (0..batch)
        .map(|i| format!("a photo of a red circle number {i} on a blue square, high detail"))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let run = || -> anyhow::Result<()> {
        match item.as_str() {
            "clip_image" => drop(enc.embed_images(&images)?),
            "clip_text" => drop(enc.embed_texts(&refs)?),
            other => anyhow::bail!("--item clip_image|clip_text (got {other})"),
        }
        Ok(())
    };
    run()?;
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = Instant::now();
        run()?;
        times.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({"bench": item, "engine": "candle", "batch": batch,
            "median_ms": (median * 10.0).round() / 10.0, "runs": runs,
            "peak_rss_mb": peak_rss_mb()})
    );
    Ok(())
}
