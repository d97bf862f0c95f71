//! A1111's separate VAE files: a model loaded with a VAE file in LDM names (as A1111's VAE folder
//! holds them, with or without `first_stage_model.`) or diffusers' makes the same images as its
//! own VAE when the file holds the same weights, and other images when it holds others.
use std::collections::HashMap;

use atelier_diffusion::pipeline::{
    make_tiny, write_single_file, Family, Placement, StableDiffusion, Txt2Img,
};
use atelier_diffusion::schedulers::SamplerKind;
use candle_core::{Device, Tensor};

fn req() -> Txt2Img {
    Txt2Img {
        prompt: "red circle on blue".into(),
        negative_prompt: String::new(),
        steps: 3,
        cfg_scale: 5.0,
        seed: 9,
        width: 32,
        height: 32,
        batch_size: 1,
        sampler: SamplerKind::Euler,
        clip_skip: 1,
        clip_skip_convention: Default::default(),
        noise: Default::default(),
    }
}

fn image(m: &StableDiffusion) -> Vec<u8> {
    m.txt2img(&req(), |_, _| true).unwrap()[0]
        .image
        .clone()
        .into_raw()
}

#[test]
fn separate_vae_files_replace_the_models_own() {
    let root = tempfile::tempdir().unwrap();
    let folder = root.path().join("tiny");
    make_tiny(&folder, Family::Sd1, 11).unwrap();
    let single = root.path().join("tiny.safetensors");
    write_single_file(&folder, &single).unwrap();
    let all = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    let vae_of = |prefix: &str| -> HashMap<String, Tensor> {
        all.iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("first_stage_model.")
                    .map(|n| (format!("{prefix}{n}"), v.clone()))
            })
            .collect()
    };
    let write = |name: &str, tensors: &HashMap<String, Tensor>| {
        let p = root.path().join(name);
        candle_core::safetensors::save(tensors, &p).unwrap();
        p
    };
    let ldm = write("ldm.vae.safetensors", &vae_of(""));
    let prefixed = write("prefixed.vae.safetensors", &vae_of("first_stage_model."));
    let diffusers = folder.join("vae/diffusion_pytorch_model.safetensors");
    let mut changed = vae_of("");
    let bias = changed["decoder.conv_out.bias"].affine(1.0, 0.3).unwrap();
    changed.insert("decoder.conv_out.bias".into(), bias);
    let changed = write("changed.vae.safetensors", &changed);

    let own = image(&StableDiffusion::load(&folder, Placement::CPU).unwrap());
    for vae in [&ldm, &prefixed, &diffusers] {
        let m = StableDiffusion::load_with_vae(&folder, vae, Placement::CPU).unwrap();
        assert_eq!(image(&m), own, "{}", vae.display());
    }
    let from_single = StableDiffusion::load_with_vae(&single, &ldm, Placement::CPU).unwrap();
    assert_eq!(image(&from_single), own);
    let other = StableDiffusion::load_with_vae(&folder, &changed, Placement::CPU).unwrap();
    assert_ne!(image(&other), own, "a different VAE made the same image");

    // Not a VAE: the error says what was expected.
    let unet_only: HashMap<String, Tensor> = all
        .iter()
        .filter(|(k, _)| k.starts_with("model.diffusion_model."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bad = write("unet.safetensors", &unet_only);
    let err = StableDiffusion::load_with_vae(&folder, &bad, Placement::CPU)
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("not a VAE"), "{err}");
}
