//! img2img and inpainting on tiny models.
use atelier_diffusion::pipeline::{
    make_tiny, make_tiny_with, Family, Init, Mask, StableDiffusion, Txt2Img,
};
use atelier_diffusion::schedulers::SamplerKind;
use candle_core::{DType, Device};

fn req(sampler: SamplerKind) -> Txt2Img {
    Txt2Img {
        prompt: "blue circle".into(),
        negative_prompt: String::new(),
        steps: 6,
        cfg_scale: 4.0,
        seed: 77,
        width: 32,
        height: 32,
        batch_size: 1,
        sampler,
        clip_skip: 1,
    }
}

fn picture() -> image::RgbImage {
    image::RgbImage::from_fn(32, 32, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, 200])
    })
}

fn left_half_mask() -> image::GrayImage {
    image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x < 16 { 255 } else { 0 }]))
}

#[test]
fn strength_one_equals_txt2img_and_lower_strength_runs_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 21).unwrap();
    let sd = StableDiffusion::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    for sampler in [SamplerKind::Euler, SamplerKind::Ddim, SamplerKind::Heun] {
        let t2i = sd.txt2img(&req(sampler), |_, _| true).unwrap();
        let full = Init {
            image: picture(),
            strength: 1.0,
            mask: None,
        };
        let i2i = sd.img2img(&req(sampler), &full, |_, _| true).unwrap();
        assert_eq!(
            t2i[0].image, i2i[0].image,
            "{sampler}: strength 1 must equal txt2img"
        );
    }
    let half = Init {
        image: picture(),
        strength: 0.5,
        mask: None,
    };
    let mut totals = Vec::new();
    let out = sd
        .img2img(&req(SamplerKind::Euler), &half, |_, t| {
            totals.push(t);
            true
        })
        .unwrap();
    assert_eq!(
        totals,
        vec![3, 3, 3],
        "strength 0.5 of 6 steps runs the last 3"
    );
    assert_ne!(
        out[0].image,
        sd.txt2img(&req(SamplerKind::Euler), |_, _| true).unwrap()[0].image
    );
    // Too little strength to run any step is refused with the fix.
    let none = Init {
        image: picture(),
        strength: 0.05,
        mask: None,
    };
    let err = sd
        .img2img(&req(SamplerKind::Euler), &none, |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("raise strength"), "{err}");
}

#[test]
fn inpainting_keeps_the_unmasked_region_and_repaints_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    for (inpainting, name) in [(false, "regular"), (true, "9-channel")] {
        let d = dir.path().join(name);
        make_tiny_with(&d, Family::Sd1, 31, inpainting).unwrap();
        let sd = StableDiffusion::load(&d, &Device::Cpu, DType::F32).unwrap();
        let init = Init {
            image: picture(),
            strength: 0.8,
            mask: Some(Mask {
                image: left_half_mask(),
                blur: 0.0,
                invert: false,
            }),
        };
        let out = &sd
            .img2img(&req(SamplerKind::DpmPp2m), &init, |_, _| true)
            .unwrap()[0]
            .image;
        let orig = picture();
        let mut changed_left = 0;
        for y in 0..32 {
            for x in 0..32 {
                if x >= 16 {
                    assert_eq!(
                        out.get_pixel(x, y),
                        orig.get_pixel(x, y),
                        "{name}: unmasked pixel {x},{y} changed"
                    );
                } else if out.get_pixel(x, y) != orig.get_pixel(x, y) {
                    changed_left += 1;
                }
            }
        }
        assert!(
            changed_left > 400,
            "{name}: the masked half was not repainted ({changed_left} px)"
        );

        // Inverting the mask swaps the halves.
        let inv = Init {
            mask: Some(Mask {
                image: left_half_mask(),
                blur: 2.0,
                invert: true,
            }),
            ..init.clone()
        };
        let out = &sd
            .img2img(&req(SamplerKind::DpmPp2m), &inv, |_, _| true)
            .unwrap()[0]
            .image;
        for y in 0..32 {
            for x in 0..8 {
                assert_eq!(
                    out.get_pixel(x, y),
                    orig.get_pixel(x, y),
                    "{name}: inverted mask, pixel {x},{y}"
                );
            }
        }
    }
}

#[test]
fn bad_masks_and_strengths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 41).unwrap();
    let sd = StableDiffusion::load(dir.path(), &Device::Cpu, DType::F32).unwrap();
    let small_mask = Init {
        image: picture(),
        strength: 0.5,
        mask: Some(Mask {
            image: image::GrayImage::new(8, 8),
            blur: 0.0,
            invert: false,
        }),
    };
    let err = sd
        .img2img(&req(SamplerKind::Euler), &small_mask, |_, _| panic!())
        .unwrap_err()
        .to_string();
    assert!(err.contains("same size"), "{err}");
    let bad = Init {
        image: picture(),
        strength: 1.5,
        mask: None,
    };
    let err = sd
        .img2img(&req(SamplerKind::Euler), &bad, |_, _| panic!())
        .unwrap_err()
        .to_string();
    assert!(err.contains("strength"), "{err}");
}
