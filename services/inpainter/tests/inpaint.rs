//! Inpainting on tiny models: the inpainter's masks around the engine's denoise loop.
use atelier_diffusion::pipeline::{
    make_tiny, make_tiny_with, Family, Init, Placement, StableDiffusion, Txt2Img,
};
use atelier_diffusion::schedulers::SamplerKind;
use atelier_inpainter::mask::Mask;

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
        clip_skip_convention: Default::default(),
        noise: Default::default(),
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
fn inpainting_keeps_the_unmasked_region_and_repaints_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    for (inpainting, name) in [(false, "regular"), (true, "9-channel")] {
        let d = dir.path().join(name);
        make_tiny_with(&d, Family::Sd1, 31, inpainting).unwrap();
        let sd = StableDiffusion::load(&d, Placement::CPU).unwrap();
        let init = Init {
            image: picture(),
            strength: 0.8,
            repaint: Some(
                Mask {
                    image: left_half_mask(),
                    blur: 0.0,
                    invert: false,
                    fill: Default::default(),
                    region: None,
                }
                .repaint(),
            ),
            latents: None,
            latent_resize: false,
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
            repaint: Some(
                Mask {
                    image: left_half_mask(),
                    blur: 2.0,
                    invert: true,
                    fill: Default::default(),
                    region: None,
                }
                .repaint(),
            ),
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
fn masks_of_another_size_or_blur_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 41).unwrap();
    let sd = StableDiffusion::load(dir.path(), Placement::CPU).unwrap();
    let small_mask = Init {
        image: picture(),
        strength: 0.5,
        repaint: Some(
            Mask {
                image: image::GrayImage::new(8, 8),
                blur: 0.0,
                invert: false,
                fill: Default::default(),
                region: None,
            }
            .repaint(),
        ),
        latents: None,
        latent_resize: false,
    };
    let err = sd
        .img2img(&req(SamplerKind::Euler), &small_mask, |_, _| panic!())
        .unwrap_err()
        .to_string();
    assert!(err.contains("same size"), "{err}");
    let blurry = Init {
        image: picture(),
        strength: 0.5,
        repaint: Some(
            Mask {
                image: left_half_mask(),
                blur: 100.0,
                invert: false,
                fill: Default::default(),
                region: None,
            }
            .repaint(),
        ),
        latents: None,
        latent_resize: false,
    };
    let err = sd
        .img2img(&req(SamplerKind::Euler), &blurry, |_, _| panic!())
        .unwrap_err()
        .to_string();
    assert!(err.contains("mask_blur"), "{err}");
}
