//! img2img on tiny models (inpainting's masks are the inpainter's: services/inpainter/tests).
use atelier_diffusion::pipeline::{make_tiny, Family, Init, Placement, StableDiffusion, Txt2Img};
use atelier_diffusion::schedulers::SamplerKind;

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

#[test]
fn strength_one_equals_txt2img_and_lower_strength_runs_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 21).unwrap();
    let sd = StableDiffusion::load(dir.path(), Placement::CPU).unwrap();
    for sampler in [SamplerKind::Euler, SamplerKind::Ddim, SamplerKind::Heun] {
        let t2i = sd.txt2img(&req(sampler), |_, _| true).unwrap();
        let full = Init {
            image: picture(),
            strength: 1.0,
            repaint: None,
            latents: None,
            latent_resize: false,
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
        repaint: None,
        latents: None,
        latent_resize: false,
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
        repaint: None,
        latents: None,
        latent_resize: false,
    };
    let err = sd
        .img2img(&req(SamplerKind::Euler), &none, |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("raise strength"), "{err}");
}

#[test]
fn bad_strengths_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 41).unwrap();
    let sd = StableDiffusion::load(dir.path(), Placement::CPU).unwrap();
    let bad = Init {
        image: picture(),
        strength: 1.5,
        repaint: None,
        latents: None,
        latent_resize: false,
    };
    let err = sd
        .img2img(&req(SamplerKind::Euler), &bad, |_, _| panic!())
        .unwrap_err()
        .to_string();
    assert!(err.contains("strength"), "{err}");
}

#[test]
fn img2img_infotexts_carry_the_denoising_strength_as_a1111_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 21).unwrap();
    let sd = StableDiffusion::load(dir.path(), Placement::CPU).unwrap();
    let r = req(SamplerKind::Euler);
    let init = Init {
        image: picture(),
        strength: 0.5,
        repaint: None,
        latents: None,
        latent_resize: false,
    };
    let p = &sd.img2img(&r, &init, |_, _| true).unwrap()[0].parameters;
    let model = p.find(", Model: ").expect("Model");
    let strength = p.find(", Denoising strength: 0.5,").expect(p);
    assert!(strength > model, "A1111 writes it after the model: {p}");
    let t2i = &sd.txt2img(&r, |_, _| true).unwrap()[0].parameters;
    assert!(!t2i.contains("Denoising strength"), "{t2i}");
}

#[test]
fn txt2img_starts_from_given_latents() {
    use atelier_diffusion::noise::{Generator, RandnSource};
    use candle_core::{Device, Tensor};
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 21).unwrap();
    let sd = StableDiffusion::load(dir.path(), Placement::CPU).unwrap();
    let mut r = req(SamplerKind::EulerA);
    r.batch_size = 2;
    // The seeds' own initial noise as latents — what torch.randn draws from
    // torch.Generator("cpu").manual_seed(seed + i) — gives the same images, ancestral steps
    // included.
    let seeded: Vec<Tensor> = (0..2)
        .map(|i| {
            Generator::new(RandnSource::TorchCpu, r.seed + i)
                .randn((1, 4, 16, 16), &Device::Cpu)
                .unwrap()
        })
        .collect();
    let latents = Tensor::cat(&seeded, 0).unwrap();
    let plain = sd.txt2img(&r, |_, _| true).unwrap();
    let given = sd.txt2img_from_latents(&r, &latents, |_, _| true).unwrap();
    for (a, b) in plain.iter().zip(&given) {
        assert_eq!(a.image, b.image);
    }
    // Other latents, another image; a wrong shape is a clear error.
    let other = sd
        .txt2img_from_latents(&r, &(latents.clone() * -1.0).unwrap(), |_, _| true)
        .unwrap();
    assert_ne!(other[0].image, plain[0].image);
    let err = sd
        .txt2img_from_latents(&r, &latents.narrow(0, 0, 1).unwrap(), |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("[1, 4, 16, 16]") && err.contains("(2, 4, 16, 16)"),
        "{err}"
    );
}
