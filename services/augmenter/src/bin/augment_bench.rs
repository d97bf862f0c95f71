//! `atelier-augment-bench`: the augmenter's resize and crop beside Pillow on the same images, in
//! the same run (issue 4's target: ≥ 2× Pillow's throughput).
//!
//! It writes `--images` seeded JPEGs (photo-like: gradients, shapes and noise) of a few common
//! sizes into a temporary folder, plans each workload once with the augmenter's own planner, and
//! times the same concrete steps (the same resize sizes and crop boxes) in Rust and, through
//! `--python`, in Pillow. Decoding is outside the timed region on both sides; a second,
//! end-to-end figure (decode + transform + JPEG encode) is printed too. One thread each.
//! Prints JSON lines.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use atelier_augmenter::ops;
use atelier_contracts::augment::{Step, Transform};
use clap::Parser;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
#[command(
    name = "atelier-augment-bench",
    about = "augmenter resize/crop throughput beside Pillow"
)]
struct Args {
    /// Images per workload.
    #[arg(long, default_value_t = 48)]
    images: usize,
    /// Timed passes; the median is reported.
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// A Python with Pillow (scripts/bench-augment installs one into .tools/).
    #[arg(long, default_value = "python3")]
    python: PathBuf,
}

fn synthetic(seed: u64, w: u32, h: u32) -> image::RgbImage {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (a, b, c): (f32, f32, f32) = (rng.gen(), rng.gen(), rng.gen());
    let mut img = image::RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        image::Rgb([
            (255.0 * (fx * a + fy * (1.0 - a))) as u8,
            (255.0 * ((fx * 6.0 + b * 3.0).sin() * 0.5 + 0.5)) as u8,
            (255.0 * (fy * c)) as u8,
        ])
    });
    for _ in 0..12 {
        let (cx, cy, r) = (
            rng.gen_range(0..w) as i64,
            rng.gen_range(0..h) as i64,
            rng.gen_range(10..(w.min(h) / 4).max(11)) as i64,
        );
        let col = image::Rgb([rng.gen(), rng.gen(), rng.gen()]);
        for y in (cy - r).max(0)..(cy + r).min(h as i64) {
            for x in (cx - r).max(0)..(cx + r).min(w as i64) {
                if (x - cx).pow(2) + (y - cy).pow(2) <= r * r {
                    img.put_pixel(x as u32, y as u32, col);
                }
            }
        }
    }
    for p in img.iter_mut() {
        *p = p.saturating_add(rng.gen_range(0..12));
    }
    img
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The Pillow side: the same steps on the same files, timed the same way.
const PILLOW: &str = r#"
import json, sys, time, io
from PIL import Image
plan = json.load(open(sys.argv[1]))
repeats = int(sys.argv[2])
out = {}
for work in plan["workloads"]:
    imgs = [Image.open(p).convert("RGB") for p in plan["files"]]
    for im in imgs:
        im.load()
    def run(im, steps):
        for s in steps:
            if s["op"] == "resize":
                im = im.resize((s["width"], s["height"]), Image.LANCZOS)
            elif s["op"] == "crop":
                im = im.crop((s["x"], s["y"], s["x"] + s["width"], s["y"] + s["height"]))
                im.load()
        return im
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for im, steps in zip(imgs, work["steps"]):
            run(im, steps)
        times.append(time.perf_counter() - t)
    e2e = []
    for _ in range(repeats):
        t = time.perf_counter()
        for path, steps in zip(plan["files"], work["steps"]):
            im = Image.open(path).convert("RGB")
            buf = io.BytesIO()
            run(im, steps).save(buf, format="JPEG", quality=95)
        e2e.append(time.perf_counter() - t)
    times.sort(); e2e.sort()
    out[work["name"]] = {"transform_s": times[len(times) // 2], "end_to_end_s": e2e[len(e2e) // 2]}
import PIL
out["pillow_version"] = PIL.__version__
print(json.dumps(out))
"#;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let sizes = [(1024u32, 768u32), (768, 1024), (1280, 720), (640, 480)];
    let mut files: Vec<PathBuf> = Vec::new();
    for i in 0..args.images {
        let (w, h) = sizes[i % sizes.len()];
        let path = dir.path().join(format!("{i:04}.jpg"));
        std::fs::write(&path, ops::encode_jpeg(&synthetic(i as u64, w, h), 90)?)?;
        files.push(path);
    }
    let decoded: Vec<image::RgbImage> = files
        .iter()
        .map(|p| Ok(image::open(p)?.to_rgb8()))
        .collect::<anyhow::Result<_>>()?;
    let workloads: Vec<(&str, Vec<Transform>)> = vec![
        (
            "center_crop_256",
            serde_json::from_value(
                serde_json::json!([{"op": "resize", "size": 256, "mode": "center_crop"}]),
            )?,
        ),
        (
            "keep_ratio_512",
            serde_json::from_value(
                serde_json::json!([{"op": "resize", "size": 512, "mode": "keep_ratio"}]),
            )?,
        ),
        (
            "random_crop_resize_224",
            serde_json::from_value(serde_json::json!([
                {"op": "random_crop", "scale": [0.25, 1.0]},
                {"op": "resize", "size": 224, "mode": "center_crop"}
            ]))?,
        ),
    ];
    let mut plans: Vec<Vec<Vec<Step>>> = Vec::new();
    for (_, chain) in &workloads {
        plans.push(
            decoded
                .iter()
                .enumerate()
                .map(|(i, img)| {
                    let mut rng =
                        atelier_augmenter::variant_rng("bench", &i.to_string(), 0, "image");
                    ops::plan(chain, img.width(), img.height(), &mut rng)
                })
                .collect(),
        );
    }
    let plan_path = dir.path().join("plan.json");
    let plan_json = serde_json::json!({
        "files": files,
        "workloads": workloads.iter().zip(&plans).map(|((name, _), steps)| serde_json::json!({"name": name, "steps": steps})).collect::<Vec<_>>(),
    });
    std::fs::File::create(&plan_path)?.write_all(plan_json.to_string().as_bytes())?;

    let mut ours = Vec::new();
    for ((name, _), steps) in workloads.iter().zip(&plans) {
        let mut times = Vec::new();
        for _ in 0..args.repeats {
            let t = Instant::now();
            for (img, s) in decoded.iter().zip(steps) {
                std::hint::black_box(ops::apply_all(img.clone(), s)?);
            }
            times.push(t.elapsed().as_secs_f64());
        }
        // The clone of the decoded image is part of the loop; time it alone and take it out.
        let mut clones = Vec::new();
        for _ in 0..args.repeats {
            let t = Instant::now();
            for img in &decoded {
                std::hint::black_box(img.clone());
            }
            clones.push(t.elapsed().as_secs_f64());
        }
        let mut e2e = Vec::new();
        for _ in 0..args.repeats {
            let t = Instant::now();
            for (path, s) in files.iter().zip(steps) {
                let img = image::open(path)?.to_rgb8();
                std::hint::black_box(ops::encode_jpeg(&ops::apply_all(img, s)?, 95)?);
            }
            e2e.push(t.elapsed().as_secs_f64());
        }
        ours.push((
            *name,
            (median(times) - median(clones)).max(1e-9),
            median(e2e),
        ));
    }
    let pillow = run_pillow(&args.python, &plan_path, args.repeats)?;
    let version = pillow["pillow_version"].as_str().unwrap_or("?").to_owned();
    for (name, t, e2e) in ours {
        let p = &pillow[name];
        let (pt, pe) = (
            p["transform_s"].as_f64().context("pillow transform_s")?,
            p["end_to_end_s"].as_f64().context("pillow end_to_end_s")?,
        );
        let n = args.images as f64;
        println!(
            "{}",
            serde_json::json!({
                "bench": "augment", "workload": name, "images": args.images, "threads": 1,
                "atelier_images_per_s": (n / t).round(),
                "pillow_images_per_s": (n / pt).round(),
                "ratio": ((pt / t) * 100.0).round() / 100.0,
                "end_to_end_atelier_images_per_s": (n / e2e).round(),
                "end_to_end_pillow_images_per_s": (n / pe).round(),
                "end_to_end_ratio": ((pe / e2e) * 100.0).round() / 100.0,
                "pillow": version,
            })
        );
    }
    Ok(())
}

fn run_pillow(python: &Path, plan: &Path, repeats: usize) -> anyhow::Result<serde_json::Value> {
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(PILLOW)
        .arg(plan)
        .arg(repeats.to_string())
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    if !out.status.success() {
        bail!(
            "the Pillow side failed (is Pillow installed? scripts/bench-augment installs it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
