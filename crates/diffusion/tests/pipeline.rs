//! txt2img end to end on tiny random-weight models written in diffusers' layout.
use atelier_diffusion::pipeline::{make_tiny, Family, Placement, StableDiffusion, Txt2Img};
use atelier_diffusion::schedulers::SamplerKind;
use candle_core::{DType, Device};

fn request(seed: u64, sampler: SamplerKind) -> Txt2Img {
    Txt2Img {
        prompt: "a (red:1.3) circle [on:and:0.5] blue".into(),
        negative_prompt: "the".into(),
        steps: 4,
        cfg_scale: 7.0,
        seed,
        width: 32,
        height: 32,
        batch_size: 1,
        sampler,
        clip_skip: 1,
        clip_skip_convention: Default::default(),
        noise: Default::default(),
    }
}

#[test]
fn sd1_txt2img_is_deterministic_and_batches_match_singles() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 1).unwrap();
    let sd = StableDiffusion::load_diffusers(dir.path(), Placement::CPU).unwrap();
    assert_eq!(sd.family, Family::Sd1);
    assert_eq!(sd.vae_scale(), 2);

    let mut steps_seen = Vec::new();
    let a = sd.txt2img(&request(42, SamplerKind::EulerA), |d, t| {
        steps_seen.push((d, t));
        true
    });
    let a = a.unwrap();
    assert_eq!(steps_seen, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
    let b = sd
        .txt2img(&request(42, SamplerKind::EulerA), |_, _| true)
        .unwrap();
    let png_a = a[0].png().unwrap();
    assert_eq!(
        png_a,
        b[0].png().unwrap(),
        "same seed and settings → identical PNG bytes"
    );
    let c = sd
        .txt2img(&request(43, SamplerKind::EulerA), |_, _| true)
        .unwrap();
    assert_ne!(a[0].image, c[0].image, "another seed → another image");

    // Image i of a batch uses seed + i and equals the single run with that seed.
    let mut batch = request(42, SamplerKind::EulerA);
    batch.batch_size = 2;
    let both = sd.txt2img(&batch, |_, _| true).unwrap();
    assert_eq!(both.len(), 2);
    // Bit for bit: each image runs the UNet and the VAE in passes of its single-run shape.
    assert!(
        both[0].image == a[0].image,
        "batch image 0 is not seed 42's image"
    );
    assert!(
        both[1].image == c[0].image,
        "batch image 1 is not seed 43's image"
    );
    assert!(both[0].image != both[1].image);
    // Before 8-bit rounding too.
    let floats = sd.txt2img_pixels(&batch, None, |_, _| true).unwrap();
    let alone = sd
        .txt2img_pixels(&request(43, SamplerKind::EulerA), None, |_, _| true)
        .unwrap();
    let row1 = floats.narrow(0, 1, 1).unwrap();
    let same = row1
        .eq(&alone)
        .unwrap()
        .flatten_all()
        .unwrap()
        .min(0)
        .unwrap();
    assert_eq!(
        same.to_scalar::<u8>().unwrap(),
        1,
        "image 1's floats differ from seed 43's"
    );

    // A1111's parameters travel in the PNG.
    let decoder = png::Decoder::new(std::io::Cursor::new(png_a));
    let reader = decoder.read_info().unwrap();
    let text = reader
        .info()
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == "parameters")
        .map(|t| t.text.clone())
        .unwrap();
    assert!(text.starts_with("a (red:1.3) circle"), "{text}");
    assert!(text.contains("\nNegative prompt: the\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 42, Size: 32x32, Model hash: "), "{text}");
}

#[test]
fn every_sampler_runs_and_cancellation_stops_between_steps() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 2).unwrap();
    let sd = StableDiffusion::load_diffusers(dir.path(), Placement::CPU).unwrap();
    for kind in SamplerKind::ALL {
        let mut req = request(1, kind);
        req.steps = 3;
        let out = sd.txt2img(&req, |_, _| true).unwrap();
        assert_eq!(out[0].image.dimensions(), (32, 32), "{kind}");
    }
    let mut calls = 0;
    let err = sd
        .txt2img(&request(1, SamplerKind::Euler), |_, _| {
            calls += 1;
            calls < 2
        })
        .unwrap_err();
    assert!(matches!(
        err,
        atelier_diffusion::pipeline::PipelineError::Cancelled
    ));
    assert_eq!(calls, 2);
}

#[test]
fn sdxl_txt2img_runs_with_two_encoders() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sdxl, 3).unwrap();
    let sd = StableDiffusion::load_diffusers(dir.path(), Placement::CPU).unwrap();
    assert_eq!(sd.family, Family::Sdxl);
    let a = sd
        .txt2img(&request(5, SamplerKind::DpmPp2mKarras), |_, _| true)
        .unwrap();
    let b = sd
        .txt2img(&request(5, SamplerKind::DpmPp2mKarras), |_, _| true)
        .unwrap();
    assert_eq!(a[0].image, b[0].image);
    // Without CFG the negative prompt is not used and the image changes.
    let mut no_cfg = request(5, SamplerKind::DpmPp2mKarras);
    no_cfg.cfg_scale = 1.0;
    assert_ne!(
        sd.txt2img(&no_cfg, |_, _| true).unwrap()[0].image,
        a[0].image
    );
}

#[test]
fn bad_requests_are_refused_before_model_work() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 4).unwrap();
    let sd = StableDiffusion::load_diffusers(dir.path(), Placement::CPU).unwrap();
    for (mutate, why) in [
        (
            Box::new(|r: &mut Txt2Img| r.steps = 0) as Box<dyn Fn(&mut Txt2Img)>,
            "steps",
        ),
        (Box::new(|r: &mut Txt2Img| r.steps = 151), "steps"),
        (
            Box::new(|r: &mut Txt2Img| r.cfg_scale = f64::NAN),
            "cfg_scale",
        ),
        (Box::new(|r: &mut Txt2Img| r.width = 30), "multiples of 8"),
        (
            Box::new(|r: &mut Txt2Img| {
                r.width = 4096;
                r.height = 4096
            }),
            "pixel budget",
        ),
        (Box::new(|r: &mut Txt2Img| r.width = 8200), "latent cells"),
        (Box::new(|r: &mut Txt2Img| r.batch_size = 0), "batch_size"),
    ] {
        let mut r = request(1, SamplerKind::Euler);
        mutate(&mut r);
        let err = sd
            .txt2img(&r, |_, _| panic!("no step may run"))
            .unwrap_err()
            .to_string();
        assert!(err.contains(why), "{err}");
    }
    let empty = tempfile::tempdir().unwrap();
    let err = StableDiffusion::load_diffusers(empty.path(), Placement::CPU)
        .err()
        .unwrap();
    assert!(err.to_string().contains("model_index.json"), "{err}");
}

#[test]
fn textual_inversion_embeddings_are_found_by_name() {
    use atelier_diffusion::conditioning::Embedding;
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 6).unwrap();
    let sd = StableDiffusion::load_diffusers(dir.path(), Placement::CPU).unwrap();
    // A1111's .safetensors layout: emb_params [n, 32] for the tiny 32-wide encoder.
    let path = dir.path().join("redstyle.safetensors");
    let v = atelier_diffusion::noise::SeededNoise::new(3)
        .randn((2, 32), &Device::Cpu)
        .unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("emb_params".to_string(), v)]),
        &path,
    )
    .unwrap();
    let emb = Embedding::load(&path).unwrap();
    assert_eq!((emb.name.as_str(), emb.len()), ("redstyle", 2));
    let with = sd.with_embeddings(vec![emb]);
    let mut r = request(8, SamplerKind::Euler);
    r.prompt = "a circle, redstyle".into();
    let plain = sd.txt2img(&r, |_, _| true).unwrap();
    let styled = with.txt2img(&r, |_, _| true).unwrap();
    assert_ne!(
        plain[0].image, styled[0].image,
        "the embedding's vectors replace the word's tokens"
    );
    // Without the trigger word the embedding changes nothing.
    r.prompt = "a circle".into();
    assert_eq!(
        sd.txt2img(&r, |_, _| true).unwrap()[0].image,
        with.txt2img(&r, |_, _| true).unwrap()[0].image
    );
    // A wrong-width embedding is a clear error.
    let bad = Embedding {
        name: "wide".into(),
        vectors: vec![candle_core::Tensor::zeros((1, 768), DType::F32, &Device::Cpu).unwrap()],
    };
    r.prompt = "wide".into();
    let err = sd
        .with_embeddings(vec![bad])
        .txt2img(&r, |_, _| true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("768-wide"), "{err}");
    assert!(Embedding::load(&dir.path().join("x.txt")).is_err());
}

#[test]
fn previews_are_decoded_every_n_steps_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 4).unwrap();
    let sd = StableDiffusion::load_diffusers(dir.path(), Placement::CPU).unwrap();
    let mut req = request(9, SamplerKind::DpmPp2m);
    req.steps = 6;
    req.batch_size = 2;
    let plain = sd.txt2img(&req, |_, _| true).unwrap();
    let mut seen = Vec::new();
    let mut on_preview = |step: usize, img: image::RgbImage| {
        assert_eq!(img.dimensions(), (32, 32));
        seen.push(step);
    };
    let with = sd
        .generate_with_previews(&req, None, |_, _| true, 2, &mut on_preview)
        .unwrap();
    // Every second step, not the last (that is the result itself).
    assert_eq!(seen, vec![2, 4]);
    for (a, b) in plain.iter().zip(&with) {
        assert_eq!(a.image, b.image, "previews changed the result");
    }
}

#[test]
fn requests_batched_together_match_their_single_runs() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 3).unwrap();
    let sd = StableDiffusion::load_diffusers(dir.path(), Placement::CPU).unwrap();
    // Bit for bit (see sd1_txt2img_is_deterministic_and_batches_match_singles).
    let close = |x: &image::RgbImage, y: &image::RgbImage| x == y;
    // Different prompts (one with prompt editing), negatives, seeds and batch sizes.
    let a = request(7, SamplerKind::EulerA);
    let mut b = request(100, SamplerKind::EulerA);
    b.prompt = "a green square".into();
    b.negative_prompt = String::new();
    b.batch_size = 2;
    let mut c = request(5, SamplerKind::EulerA);
    c.prompt = "two stars, night".into();
    let mut steps = Vec::new();
    let together = sd
        .txt2img_batch(&[a.clone(), b.clone(), c.clone()], |d, t| {
            steps.push((d, t));
            true
        })
        .unwrap();
    assert_eq!(steps.len(), 4, "one pass of 4 steps for the whole group");
    assert_eq!(
        together.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![1, 2, 1]
    );
    for (req, got) in [&a, &b, &c].into_iter().zip(&together) {
        let alone = sd.txt2img(req, |_, _| true).unwrap();
        for (x, y) in got.iter().zip(&alone) {
            assert_eq!(x.seed, y.seed);
            assert_eq!(x.parameters, y.parameters);
            assert!(
                close(&x.image, &y.image),
                "{:?} seed {}",
                req.prompt,
                x.seed
            );
        }
    }
    assert!(!close(&together[0][0].image, &together[2][0].image));
    // Incompatible settings are refused, not silently mixed.
    let mut d = request(1, SamplerKind::EulerA);
    d.steps = 5;
    assert!(sd.txt2img_batch(&[a.clone(), d], |_, _| true).is_err());
    // A prompt of another 75-token chunk count cannot share the context: still correct, one by one.
    let mut long = request(9, SamplerKind::Ddim);
    long.prompt = vec!["circle"; 100].join(" ");
    let short = request(9, SamplerKind::Ddim);
    let mixed = sd
        .txt2img_batch(&[short.clone(), long.clone()], |_, _| true)
        .unwrap();
    let alone = sd.txt2img(&long, |_, _| true).unwrap();
    assert_eq!(mixed[1][0].png().unwrap(), alone[0].png().unwrap());
}

#[test]
fn sdxl_conditions_an_empty_negative_on_zeros_where_the_model_asks() {
    // diffusers' force_zeros_for_empty_prompt (model_index.json, true by default for SDXL; A1111
    // zeros an empty SDXL negative too): the same folder with the flag off encodes "" instead.
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sdxl, 2).unwrap();
    let zeros = StableDiffusion::load_diffusers(dir.path(), Placement::CPU).unwrap();
    let index = dir.path().join("model_index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["force_zeros_for_empty_prompt"] = serde_json::json!(false);
    std::fs::write(&index, v.to_string()).unwrap();
    let encoded = StableDiffusion::load_diffusers(dir.path(), Placement::CPU).unwrap();
    let mut r = request(3, SamplerKind::Euler);
    r.negative_prompt.clear();
    let a = zeros.txt2img(&r, |_, _| true).unwrap();
    let b = encoded.txt2img(&r, |_, _| true).unwrap();
    assert_ne!(
        a[0].image, b[0].image,
        "an empty negative was encoded either way"
    );
    // A negative prompt with text is encoded by both.
    r.negative_prompt = "the".into();
    let a = zeros.txt2img(&r, |_, _| true).unwrap();
    let b = encoded.txt2img(&r, |_, _| true).unwrap();
    assert_eq!(a[0].image, b[0].image);
}

#[test]
fn clip_skip_counts_in_either_convention() {
    use atelier_diffusion::pipeline::ClipSkipConvention;
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 4).unwrap();
    let sd = StableDiffusion::load_diffusers(dir.path(), Placement::CPU).unwrap();
    let run = |clip_skip, convention, cfg_scale| {
        let mut r = request(11, SamplerKind::Euler);
        (r.clip_skip, r.clip_skip_convention, r.cfg_scale) = (clip_skip, convention, cfg_scale);
        sd.txt2img(&r, |_, _| true).unwrap().remove(0)
    };
    // diffusers' clip_skip=1 reads the prompt where A1111's 2 does: without guidance (no
    // negative prompt) the images are the same.
    let d1 = run(1, ClipSkipConvention::Diffusers, 1.0);
    let a2 = run(2, ClipSkipConvention::A1111, 1.0);
    assert!(d1.image == a2.image);
    assert!(d1.image != run(1, ClipSkipConvention::A1111, 1.0).image);
    // With guidance they differ: diffusers keeps the negative prompt on the last layer.
    let d1 = run(1, ClipSkipConvention::Diffusers, 7.0);
    let a2 = run(2, ClipSkipConvention::A1111, 7.0);
    assert!(d1.image != a2.image);
    // Infotexts count as A1111 does, and only when it is not 1.
    assert!(d1.parameters.contains("Clip skip: 2"), "{}", d1.parameters);
    assert!(a2.parameters.contains("Clip skip: 2"));
    assert!(!run(0, ClipSkipConvention::Diffusers, 7.0)
        .parameters
        .contains("Clip skip"));
    // Out of range in either count.
    let mut r = request(1, SamplerKind::Euler);
    (r.clip_skip, r.clip_skip_convention) = (12, ClipSkipConvention::Diffusers);
    assert!(r.validate().unwrap_err().contains("diffusers"));
    (r.clip_skip, r.clip_skip_convention) = (0, ClipSkipConvention::A1111);
    assert!(r.validate().is_err());
}

#[test]
fn variation_seeds_nv_noise_and_ensd_change_what_they_should() {
    use atelier_diffusion::noise::RandnSource;
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 5).unwrap();
    let sd = StableDiffusion::load_diffusers(dir.path(), Placement::CPU).unwrap();
    let run = |seed, sampler, f: &dyn Fn(&mut Txt2Img)| {
        let mut r = request(seed, sampler);
        f(&mut r);
        sd.txt2img(&r, |_, _| true).unwrap().remove(0)
    };
    let plain = run(3, SamplerKind::Euler, &|_| {});
    // Strength 0 is the seed's image; strength 1 the variation seed's (Euler draws no more).
    let s0 = run(3, SamplerKind::Euler, &|r| {
        (r.noise.subseed, r.noise.subseed_strength) = (Some(9), 0.0)
    });
    assert!(s0.image == plain.image);
    assert!(!s0.parameters.contains("Variation seed"));
    let s1 = run(3, SamplerKind::Euler, &|r| {
        (r.noise.subseed, r.noise.subseed_strength) = (Some(9), 1.0)
    });
    assert!(s1.image == run(9, SamplerKind::Euler, &|_| {}).image);
    let half = run(3, SamplerKind::Euler, &|r| {
        (r.noise.subseed, r.noise.subseed_strength) = (Some(9), 0.5)
    });
    assert!(half.image != plain.image && half.image != s1.image);
    assert!(
        half.parameters
            .contains("Variation seed: 9, Variation seed strength: 0.5"),
        "{}",
        half.parameters
    );
    assert!(plain.parameters.contains("RNG: CPU"));
    // A1111's NV source draws other noise.
    let nv = run(3, SamplerKind::Euler, &|r| r.noise.source = RandnSource::Nv);
    assert!(nv.image != plain.image);
    assert!(nv.parameters.contains("RNG: NV"));
    // ENSD reseeds only the step noise: Euler a changes, Euler does not.
    let ensd = |r: &mut Txt2Img| r.noise.eta_noise_seed_delta = 31337;
    assert!(run(3, SamplerKind::Euler, &ensd).image == plain.image);
    let a = run(3, SamplerKind::EulerA, &|_| {});
    let a_ensd = run(3, SamplerKind::EulerA, &ensd);
    assert!(a_ensd.image != a.image);
    assert!(a_ensd.parameters.contains("ENSD: 31337"));
}
