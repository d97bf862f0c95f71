//! Generation runs its networks on libtorch; the same checkpoint, request and seed give the image
//! the candle networks give (txt2img with guidance and a weighted prompt, img2img), for every
//! family.
use atelier_diffusion::pipeline::{make_tiny, Family, Init, Placement, StableDiffusion, Txt2Img};
use atelier_diffusion::schedulers::SamplerKind;
use candle_core::{DType, Device};

fn req(sampler: SamplerKind) -> Txt2Img {
    Txt2Img {
        prompt: "a (red:1.3) circle, [blue] sky".into(),
        negative_prompt: "green".into(),
        steps: 8,
        cfg_scale: 6.0,
        seed: 5,
        width: 32,
        height: 32,
        batch_size: 2,
        sampler,
        clip_skip: 1,
    }
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn both(family: Family) -> (StableDiffusion, StableDiffusion) {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), family, 31).unwrap();
    let torch = StableDiffusion::load(dir.path(), Placement::CPU).unwrap();
    let candle = StableDiffusion::load_candle(dir.path(), &Device::Cpu, DType::F32).unwrap();
    assert!(torch.torch().is_some() && torch.candle().is_none());
    assert!(candle.candle().is_some());
    (torch, candle)
}

#[test]
fn txt2img_on_libtorch_equals_candle_for_every_family() {
    for family in [Family::Sd1, Family::Sd2, Family::Sdxl] {
        let (torch, candle) = both(family);
        for sampler in [SamplerKind::DpmPp2m, SamplerKind::EulerA] {
            let a = torch.txt2img(&req(sampler), |_, _| true).unwrap();
            let b = candle.txt2img(&req(sampler), |_, _| true).unwrap();
            assert_eq!(a.len(), 2);
            for (x, y) in a.iter().zip(&b) {
                let d = max_diff(&x.image, &y.image);
                assert!(d <= 1, "{family:?} {sampler}: pixels differ by {d}/255");
                assert_eq!(x.parameters, y.parameters);
            }
        }
    }
}

#[test]
fn img2img_on_libtorch_equals_candle() {
    let (torch, candle) = both(Family::Sd1);
    let init = Init {
        image: image::RgbImage::from_fn(32, 32, |x, y| {
            image::Rgb([(x * 8) as u8, 90, (y * 8) as u8])
        }),
        strength: 0.6,
        repaint: None,
    };
    let r = req(SamplerKind::Euler);
    let a = torch.img2img(&r, &init, |_, _| true).unwrap();
    let b = candle.img2img(&r, &init, |_, _| true).unwrap();
    let d = max_diff(&a[0].image, &b[0].image);
    assert!(d <= 1, "img2img pixels differ by {d}/255");
}
