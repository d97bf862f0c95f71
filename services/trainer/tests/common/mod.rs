//! What the trainer's tests share: a tiny SD 1 model, coloured-square images, a small spec.
#![allow(dead_code)]

use std::path::Path;

use atelier_contracts::{TrainData, TrainImage, TrainSpec};
use atelier_diffusion::pipeline::{
    make_tiny_for_training, Family, Placement, StableDiffusion, Txt2Img,
};
use atelier_diffusion::schedulers::SamplerKind;
use atelier_trainer::session::{prepare, Session, Source};

pub fn shapes(n: usize) -> Vec<(image::RgbImage, String)> {
    let colours = [
        ([220u8, 30, 30], "red"),
        ([30, 30, 220], "blue"),
        ([30, 200, 40], "green"),
    ];
    (0..n)
        .map(|i| {
            let (c, name) = colours[i % colours.len()];
            let mut img = image::RgbImage::from_pixel(64, 64, image::Rgb([240, 240, 240]));
            for y in 16..48 {
                for x in 16..48 {
                    img.put_pixel(x, y, image::Rgb(c));
                }
            }
            (img, format!("{name} square, on the white"))
        })
        .collect()
}

pub fn spec() -> TrainSpec {
    let mut s = TrainSpec::new(
        "tiny",
        "test-lora",
        TrainData::Images {
            images: vec![TrainImage {
                image: "unused/by/session".into(),
                caption: String::new(),
            }],
        },
    );
    s.resolution = 64;
    s.min_bucket_reso = 64;
    s.max_bucket_reso = 128;
    s.network.rank = 4;
    s.network.alpha = 4.0;
    s.unet_lr = 1e-3;
    s.max_train_steps = 10;
    s.batch_size = 2;
    s.seed = 42;
    s.save_fp16 = false;
    s
}

pub fn model(dir: &Path) -> StableDiffusion {
    if !dir.join("model_index.json").exists() {
        make_tiny_for_training(dir, Family::Sd1, 3).unwrap();
    }
    StableDiffusion::load(dir, Placement::CPU).unwrap()
}

pub fn session(dir: &Path, spec: &TrainSpec, n: usize) -> Session {
    let m = model(dir);
    let sources = shapes(n)
        .into_iter()
        .map(|(image, caption)| Source {
            image,
            caption,
            weight: 1.0,
            repeats: 1,
            is_class: false,
        })
        .collect();
    let ex = prepare(&m, spec, sources).unwrap();
    Session::new(m, spec, ex).unwrap()
}

pub fn render(m: &StableDiffusion, prompt: &str) -> Vec<u8> {
    let req = Txt2Img {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        steps: 4,
        cfg_scale: 5.0,
        seed: 11,
        width: 32,
        height: 32,
        batch_size: 1,
        sampler: SamplerKind::parse("euler").unwrap(),
        clip_skip: 1,
        clip_skip_convention: Default::default(),
        noise: Default::default(),
    };
    m.txt2img(&req, |_, _| true).unwrap()[0]
        .image
        .clone()
        .into_raw()
}

pub fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

pub fn fixed_loss(run: &mut Session) -> f64 {
    // The mean of several gradient-free evaluations at fixed draws.
    (0..6)
        .map(|k| run.eval_loss(1000 + k).unwrap())
        .sum::<f64>()
        / 6.0
}
