//! Single-file checkpoints with the original LDM key names: the name map covers every parameter
//! of the published architectures, hits the names real files use, and a tiny model written in
//! that layout loads back to the same images as its diffusers folder. A1111's separate VAE files
//! (LDM names with or without `first_stage_model.`, or diffusers') replace a model's own VAE.
use atelier_diffusion::models::ldm;
use atelier_diffusion::pipeline::{
    make_tiny, write_single_file, Family, Placement, SingleFileConfig, StableDiffusion, Txt2Img,
};
use atelier_diffusion::schedulers::SamplerKind;
use atelier_diffusion::torch::unet::UNet;
use atelier_diffusion::torch::vae::Vae;
use atelier_diffusion::torch::weights::Recorder;
use candle_core::{DType, Device};

fn all_names(family: Family) -> (Vec<String>, Vec<String>, SingleFileConfig) {
    let cfg = SingleFileConfig::standard(family, 4);
    let r = Recorder::default();
    UNet::new(&r.weights(), cfg.unet.clone()).unwrap();
    let unet: Vec<String> = r.shapes().into_keys().collect();
    let r = Recorder::default();
    Vae::new(&r.weights(), cfg.vae.clone()).unwrap();
    let vae: Vec<String> = r.shapes().into_keys().collect();
    (unet, vae, cfg)
}

#[test]
fn ldm_names_cover_the_published_architectures() {
    for (family, expect) in [
        (
            Family::Sd1,
            &[
                "time_embed.0.weight",
                "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
                "input_blocks.3.0.op.weight",
                "input_blocks.4.0.skip_connection.weight",
                "middle_block.1.proj_in.weight",
                "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight",
                "output_blocks.11.1.proj_out.weight",
                "out.2.weight",
            ][..],
        ),
        (
            Family::Sdxl,
            &[
                "label_emb.0.0.weight",
                "input_blocks.4.1.transformer_blocks.1.attn1.to_k.weight",
                "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight",
                "output_blocks.2.2.conv.weight",
                "output_blocks.8.0.emb_layers.1.weight",
            ][..],
        ),
    ] {
        let (unet, vae, cfg) = all_names(family);
        let mapped: Vec<String> = unet
            .iter()
            .map(|n| ldm::unet_name(n, &cfg.unet).unwrap_or_else(|| panic!("{n}")))
            .collect();
        let distinct: std::collections::HashSet<_> = mapped.iter().collect();
        assert_eq!(
            distinct.len(),
            mapped.len(),
            "two parameters map to one name"
        );
        for e in expect {
            assert!(
                mapped.iter().any(|m| m == e),
                "{family:?}: {e} not produced"
            );
        }
        let vae: Vec<String> = vae.iter().map(|n| ldm::vae_name(n, 4).unwrap()).collect();
        for e in [
            "encoder.down.0.downsample.conv.weight",
            "encoder.mid.attn_1.q.weight",
            "decoder.up.3.block.0.conv1.weight",
            "decoder.up.1.upsample.conv.weight",
            "decoder.norm_out.weight",
            "encoder.down.1.block.0.nin_shortcut.weight",
            "decoder.mid.attn_1.proj_out.bias",
        ] {
            assert!(vae.iter().any(|m| m == e), "{e}");
        }
    }
    // OpenCLIP: fused q/k/v and the transposed projection.
    assert_eq!(
        ldm::openclip_source("text_model.encoder.layers.3.self_attn.k_proj.weight", "p."),
        Some(ldm::Source::Part {
            name: "p.transformer.resblocks.3.attn.in_proj_weight".into(),
            part: 1,
            parts: 3
        })
    );
    assert_eq!(
        ldm::openclip_source("text_projection.weight", "p."),
        Some(ldm::Source::Transposed("p.text_projection".into()))
    );
    assert_eq!(
        ldm::openclip_source("encoder.layers.0.mlp.fc2.bias", "p."),
        Some(ldm::Source::Rename(
            "p.transformer.resblocks.0.mlp.c_proj.bias".into()
        ))
    );
}

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

#[test]
fn tiny_models_round_trip_through_the_single_file_layout() {
    for family in [Family::Sd1, Family::Sdxl] {
        let root = tempfile::tempdir().unwrap();
        let folder = root.path().join("tiny");
        make_tiny(&folder, family, 11).unwrap();
        let single_dir = root.path().join("single");
        std::fs::create_dir_all(&single_dir).unwrap();
        let file = single_dir.join("tiny.safetensors");
        write_single_file(&folder, &file).unwrap();
        // The file holds LDM names only.
        let names: Vec<String> = candle_core::safetensors::load(&file, &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
        assert!(
            names.iter().all(|n| n.starts_with("model.diffusion_model.")
                || n.starts_with("first_stage_model.")
                || n.starts_with("cond_stage_model.")
                || n.starts_with("conditioner.embedders.")),
            "{names:?}"
        );
        let a = StableDiffusion::load(&folder, Placement::CPU).unwrap();
        let b = StableDiffusion::load(&file, Placement::CPU).unwrap();
        assert_eq!(b.family, family);
        let ia = a.txt2img(&req(), |_, _| true).unwrap();
        let ib = b.txt2img(&req(), |_, _| true).unwrap();
        assert_eq!(
            ia[0].image, ib[0].image,
            "{family:?}: single file differs from the folder"
        );
    }
}

#[test]
fn unknown_single_file_layouts_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.safetensors");
    let t = candle_core::Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([("foo.weight".to_string(), t)]),
        &p,
    )
    .unwrap();
    let err = StableDiffusion::load(&p, Placement::CPU)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("unknown checkpoint layout"), "{err}");
    let err = StableDiffusion::load(&dir.path().join("x.ckpt"), Placement::CPU)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(".safetensors"), "{err}");
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
    let vae_of = |prefix: &str| -> std::collections::HashMap<String, candle_core::Tensor> {
        all.iter()
            .filter_map(|(k, v)| {
                k.strip_prefix("first_stage_model.")
                    .map(|n| (format!("{prefix}{n}"), v.clone()))
            })
            .collect()
    };
    let write = |name: &str, tensors: &std::collections::HashMap<String, candle_core::Tensor>| {
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
    let unet_only: std::collections::HashMap<String, candle_core::Tensor> = all
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
