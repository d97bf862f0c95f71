//! The libtorch engine beyond the component references (tests/conformance/models, replayed by
//! tests/tests/cli.rs): devices and errors, single files, LoRAs merged and at run time, training,
//! half precision.

use atelier_diffusion::conformance::components::load;
use atelier_diffusion::pipeline::{make_tiny_with, write_single_file, Family};
use candle_core::{Device, Tensor};

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut noise = atelier_diffusion::noise::SeededNoise::new(seed);
    noise.randn(shape.to_vec(), &Device::Cpu).unwrap()
}

#[test]
fn a_bad_device_name_is_an_error_naming_the_choices() {
    std::env::set_var("ATELIER_DEVICE", "tpu");
    let e = atelier_diffusion::torch::device().unwrap_err().to_string();
    std::env::remove_var("ATELIER_DEVICE");
    assert!(e.contains("cpu, cuda or cuda:N"), "{e}");
}

#[test]
fn libtorch_errors_are_errors_not_panics() {
    // A UNet fed latents with the wrong channel count: libtorch's error comes back as a message.
    let dir = tempfile::tempdir().unwrap();
    make_tiny_with(dir.path(), Family::Sd1, 7, false).unwrap();
    let torch = load(dir.path(), None).unwrap();
    let ctx = torch
        .text(0, &Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap())
        .unwrap()
        .0;
    let e = torch
        .unet(&randn(&[1, 5, 8, 8], 1), 10.0, &ctx, None)
        .unwrap_err();
    assert!(e.contains("channels"), "{e}");
    let e = torch
        .text(0, &Tensor::new(&[[1u32, 99_999]], &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(e.contains("outside this text encoder's vocabulary"), "{e}");
}

#[test]
fn single_file_checkpoints_load_on_libtorch_as_their_folders_do() {
    for family in [Family::Sd1, Family::Sd2, Family::Sdxl] {
        let root = tempfile::tempdir().unwrap();
        let folder = root.path().join("tiny");
        make_tiny_with(&folder, family, 5, false).unwrap();
        let file = root.path().join("tiny.safetensors");
        write_single_file(&folder, &file).unwrap();
        let (a, b) = (load(&folder, None).unwrap(), load(&file, None).unwrap());
        let ids = Tensor::new(&[[1u32, 20, 30, 526]], &Device::Cpu).unwrap();
        let encoders = if family == Family::Sdxl { 2 } else { 1 };
        for i in 0..encoders {
            let d = max_diff(&a.text(i, &ids).unwrap().0, &b.text(i, &ids).unwrap().0);
            assert_eq!(d, 0.0, "{family:?}: text encoder {i}");
        }
        let z = randn(&[1, 4, 8, 8], 4);
        assert_eq!(
            max_diff(&a.vae_decode(&z).unwrap(), &b.vae_decode(&z).unwrap()),
            0.0
        );
        if family != Family::Sdxl {
            let x = randn(&[1, 4, 8, 8], 5);
            let ctx = a.text(0, &ids).unwrap().0;
            let d = max_diff(
                &a.unet(&x, 10.0, &ctx, None).unwrap(),
                &b.unet(&x, 10.0, &ctx, None).unwrap(),
            );
            assert_eq!(d, 0.0, "{family:?}: unet");
        }
    }
}

#[test]
fn a_lora_merged_into_a_clone_leaves_the_original_alone() {
    use atelier_diffusion::torch::{lora::merge_file, TorchModels};
    let models =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance/models");
    let base = TorchModels::load(
        &models.join("sd1/model"),
        tch::Device::Cpu,
        tch::Kind::Float,
    )
    .unwrap();
    let file =
        atelier_diffusion::lora::LoraFile::load(&models.join("sd1-lora-kohya/lora.safetensors"))
            .unwrap();
    let mut merged = base.clone();
    let applied = merge_file(&mut merged, &file, 0.7).unwrap();
    assert!(
        applied.matched > 0 && applied.unmatched.is_empty(),
        "{applied:?}"
    );
    let x = tch::Tensor::randn([1, 4, 8, 8], (tch::Kind::Float, tch::Device::Cpu));
    let ctx = tch::Tensor::randn([1, 77, 32], (tch::Kind::Float, tch::Device::Cpu));
    let t = tch::Tensor::from(10f32);
    let (a, b, again) = tch::no_grad(|| {
        (
            base.unet.forward(&x, &t, &ctx, None).unwrap(),
            merged.unet.forward(&x, &t, &ctx, None).unwrap(),
            base.clone().unet.forward(&x, &t, &ctx, None).unwrap(),
        )
    });
    assert!(
        (&a - &b).abs().max().double_value(&[]) > 1e-4,
        "the LoRA changed nothing"
    );
    assert_eq!((&a - &again).abs().max().double_value(&[]), 0.0);
}

#[test]
fn lora_training_on_libtorch_lowers_the_loss_and_writes_a_kohya_file() {
    use atelier_diffusion::lora::LoraFile;
    use atelier_diffusion::schedulers::{NoiseSchedule, PredictionType, ScheduleConfig};
    use atelier_diffusion::torch::lora::merge_file;
    use atelier_diffusion::torch::TorchModels;
    use atelier_diffusion::train::{
        stream, AdamW, AdamWParams, Batch, LoraConfig, LoraNetwork, Objective, UnetTargets,
    };
    let dir = tempfile::tempdir().unwrap();
    make_tiny_with(dir.path(), Family::Sd1, 3, false).unwrap();
    let (cpu, f32k) = (tch::Device::Cpu, tch::Kind::Float);
    let base = TorchModels::load(dir.path(), cpu, f32k).unwrap();
    let mut trained = base.clone();
    let cfg = LoraConfig {
        rank: 4,
        alpha: 4.0,
        conv_rank: None,
        conv_alpha: 1.0,
        unet_targets: UnetTargets::Attention,
        text_encoder: false,
    };
    let lora = LoraNetwork::attach(&mut trained, &cfg, 9).unwrap();
    assert!(lora.parameter_count() > 0);
    let (vars, _): (Vec<&tch::Tensor>, Vec<_>) = lora.vars().into_iter().unzip();
    let mut opt = AdamW::new(AdamWParams::default(), &vars);
    tch::manual_seed(1);
    let ctx = tch::Tensor::randn([2, 77, 32], (f32k, cpu));
    let batch = Batch {
        latents: tch::Tensor::randn([2, 4, 8, 8], (f32k, cpu)),
        context: ctx.shallow_clone(),
        added: None,
        weights: vec![1.0, 1.0],
    };
    let schedule = NoiseSchedule::new(ScheduleConfig::default());
    let objective = Objective {
        prediction: PredictionType::Epsilon,
        min_snr_gamma: Some(5.0),
        noise_offset: 0.0,
        min_timestep: 0,
        max_timestep: 1000,
    };
    let mut step = || {
        // The same timesteps and noise every step: the loss of one fixed sample falls.
        let l = objective
            .loss(&trained.unet, &schedule, &batch, &mut stream(1, 2, 0))
            .unwrap();
        lora.zero_grad();
        l.backward();
        opt.step(&vars, &lora.grads(), &vec![1e-2; vars.len()])
            .unwrap();
        l.double_value(&[])
    };
    let first = step();
    let last = (0..30).map(|_| step()).last().unwrap();
    assert!(last < first * 0.9, "loss {first} → {last}");
    // The file in kohya's layout, merged into the base model, predicts as the trained adapters do.
    let path = dir.path().join("trained.safetensors");
    lora.save(&path, candle_core::DType::F32, &Default::default())
        .unwrap();
    let file = LoraFile::load(&path).unwrap();
    let mut merged = base.clone();
    let applied = merge_file(&mut merged, &file, 1.0).unwrap();
    assert!(applied.unmatched.is_empty(), "{:?}", applied.unmatched);
    let x = tch::Tensor::randn([1, 4, 8, 8], (f32k, cpu));
    let t = tch::Tensor::from(500f32);
    let c = ctx.narrow(0, 0, 1);
    let (a, b) = tch::no_grad(|| {
        (
            trained.unet.forward(&x, &t, &c, None).unwrap(),
            merged.unet.forward(&x, &t, &c, None).unwrap(),
        )
    });
    let d = (&a - &b).abs().max().double_value(&[]);
    assert!(d < 1e-4, "merged file vs trained adapters: {d}");
}

#[test]
fn half_precision_unets_on_libtorch_follow_f32() {
    // bf16 weights and activations (CPU kernels here; the GPU path's dtype handling is the same
    // code): SD 1.x and SDXL (added conditioning cast to the UNet's kind) stay near f32.
    use atelier_diffusion::torch::unet::AddedCond;
    use atelier_diffusion::torch::TorchModels;
    for family in [Family::Sd1, Family::Sdxl] {
        let dir = tempfile::tempdir().unwrap();
        make_tiny_with(dir.path(), family, 9, false).unwrap();
        let cpu = tch::Device::Cpu;
        let full = TorchModels::load(dir.path(), cpu, tch::Kind::Float).unwrap();
        let half = TorchModels::load(dir.path(), cpu, tch::Kind::BFloat16).unwrap();
        let dim = full.unet.config.cross_attention_dim as i64;
        let x = tch::Tensor::randn([2, 4, 8, 8], (tch::Kind::Float, cpu));
        let ctx = tch::Tensor::randn([2, 7, dim], (tch::Kind::Float, cpu));
        let t = tch::Tensor::from_slice(&[900f32, 20.]);
        let added = (family == Family::Sdxl).then(|| {
            let n = full
                .unet
                .config
                .projection_class_embeddings_input_dim
                .unwrap_or(2816) as i64
                - 6 * full.unet.config.addition_time_embed_dim.unwrap_or(256) as i64;
            AddedCond {
                text_embeds: tch::Tensor::randn([2, n], (tch::Kind::Float, cpu)),
                time_ids: tch::Tensor::from_slice(&[64f32, 64., 0., 0., 64., 64.])
                    .repeat([2])
                    .view([2, 6]),
            }
        });
        let (a, b) = tch::no_grad(|| {
            (
                full.unet.forward(&x, &t, &ctx, added.as_ref()).unwrap(),
                half.unet.forward(&x, &t, &ctx, added.as_ref()).unwrap(),
            )
        });
        assert_eq!(b.kind(), tch::Kind::BFloat16);
        let scale = a.abs().max().double_value(&[]);
        let d = (&a - b.to_kind(tch::Kind::Float))
            .abs()
            .max()
            .double_value(&[]);
        assert!(
            d < 0.05 * scale.max(1.0),
            "{family:?}: bf16 vs f32 {d} (output scale {scale})"
        );
    }
}

#[test]
fn a_lora_at_run_time_predicts_as_merged() {
    use atelier_diffusion::lora::{LoraFile, LoraMode};
    use atelier_diffusion::torch::lora::apply_file;
    use atelier_diffusion::torch::TorchModels;
    let models =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance/models");
    let cpu = tch::Device::Cpu;
    let base = TorchModels::load(&models.join("sd1/model"), cpu, tch::Kind::Float).unwrap();
    let file = LoraFile::load(&models.join("sd1-lora-kohya/lora.safetensors")).unwrap();
    let (mut merged, mut runtime) = (base.clone(), base.clone());
    let a = apply_file(&mut merged, &file, 0.7, LoraMode::Merge).unwrap();
    let b = apply_file(&mut runtime, &file, 0.7, LoraMode::Runtime).unwrap();
    assert_eq!(
        (a.matched, b.matched),
        (file.layers.len(), file.layers.len())
    );
    let ids = tch::Tensor::from_slice(&[1i64, 320, 1125, 2]).view([1, 4]);
    let x = tch::Tensor::randn([1, 4, 8, 8], (tch::Kind::Float, cpu));
    let t = tch::Tensor::from(300f32);
    tch::no_grad(|| {
        let (tm, tr) = (
            merged.text[0].forward(&ids).unwrap(),
            runtime.text[0].forward(&ids).unwrap(),
        );
        let d = (&tm.last - &tr.last).abs().max().double_value(&[]);
        assert!(d < 1e-5, "text encoder: {d}");
        let um = merged.unet.forward(&x, &t, &tm.last, None).unwrap();
        let ur = runtime.unet.forward(&x, &t, &tm.last, None).unwrap();
        let d = (&um - &ur).abs().max().double_value(&[]);
        assert!(d < 1e-5, "unet: {d}");
    });
}

#[test]
fn conv_adapters_at_run_time_predict_as_merged() {
    // LoCon on a 3×3 convolution: a 3×3 down, and a 1×1 down acting at the kernel's centre.
    use atelier_diffusion::lora::{LoraFile, LoraMode};
    use atelier_diffusion::torch::lora::apply_file;
    use atelier_diffusion::torch::TorchModels;
    let dir = tempfile::tempdir().unwrap();
    make_tiny_with(dir.path(), Family::Sd1, 2, false).unwrap();
    let cpu = tch::Device::Cpu;
    let base = TorchModels::load(dir.path(), cpu, tch::Kind::Float).unwrap();
    let w = base.unet.down[0].resnets[0].conv1.weight.size();
    let (out, inp) = (w[0] as usize, w[1] as usize);
    let mut tensors = std::collections::HashMap::new();
    for (module, k) in [("conv1", 3usize), ("conv2", 1)] {
        let key = format!("lora_unet_down_blocks_0_resnets_0_{module}");
        let c_in = if module == "conv1" { inp } else { out };
        tensors.insert(
            format!("{key}.lora_down.weight"),
            (randn(&[2, c_in, k, k], 7) * 0.1).unwrap(),
        );
        tensors.insert(
            format!("{key}.lora_up.weight"),
            (randn(&[out, 2, 1, 1], 8) * 0.1).unwrap(),
        );
        tensors.insert(
            format!("{key}.alpha"),
            Tensor::new(1f32, &Device::Cpu).unwrap(),
        );
    }
    let file = LoraFile::from_tensors(tensors, Default::default()).unwrap();
    let (mut merged, mut runtime) = (base.clone(), base.clone());
    assert_eq!(
        apply_file(&mut merged, &file, 1.0, LoraMode::Merge)
            .unwrap()
            .matched,
        2
    );
    assert_eq!(
        apply_file(&mut runtime, &file, 1.0, LoraMode::Runtime)
            .unwrap()
            .matched,
        2
    );
    let dim = base.unet.config.cross_attention_dim as i64;
    let x = tch::Tensor::randn([1, 4, 8, 8], (tch::Kind::Float, cpu));
    let ctx = tch::Tensor::randn([1, 4, dim], (tch::Kind::Float, cpu));
    let t = tch::Tensor::from(300f32);
    tch::no_grad(|| {
        let b = base.unet.forward(&x, &t, &ctx, None).unwrap();
        let m = merged.unet.forward(&x, &t, &ctx, None).unwrap();
        let r = runtime.unet.forward(&x, &t, &ctx, None).unwrap();
        assert!(
            (&m - &b).abs().max().double_value(&[]) > 1e-4,
            "the LoRA changed nothing"
        );
        let d = (&m - &r).abs().max().double_value(&[]);
        assert!(d < 1e-5, "merged vs run time: {d}");
    });
}

#[test]
fn libtorch_cuda_opens_or_the_cpu_stays() {
    // On a machine without a GPU, opening libtorch's CUDA library (or failing to) leaves libtorch
    // answering on the CPU; with one, libtorch sees it after.
    let opened = atelier_diffusion::torch::open_cuda();
    let x = tch::Tensor::from_slice(&[1f32, 2., 3.]).sum(tch::Kind::Float);
    assert_eq!(x.double_value(&[]), 6.0);
    if !opened {
        assert!(!tch::Cuda::is_available());
    }
}

#[test]
fn checkpointed_backward_equals_the_plain_one_on_sdxl() {
    // SDXL's layout: added conditioning, linear projections, two transformer layers per block.
    use atelier_diffusion::schedulers::{NoiseSchedule, PredictionType, ScheduleConfig};
    use atelier_diffusion::torch::unet::AddedCond;
    use atelier_diffusion::torch::TorchModels;
    use atelier_diffusion::train::{
        stream, Batch, LoraConfig, LoraNetwork, Objective, UnetTargets,
    };
    let dir = tempfile::tempdir().unwrap();
    make_tiny_with(dir.path(), Family::Sdxl, 4, false).unwrap();
    let (cpu, f32k) = (tch::Device::Cpu, tch::Kind::Float);
    let mut m = TorchModels::load(dir.path(), cpu, f32k).unwrap();
    let cfg = LoraConfig {
        rank: 2,
        alpha: 2.0,
        conv_rank: Some(2),
        conv_alpha: 1.0,
        unet_targets: UnetTargets::Transformer,
        text_encoder: false,
    };
    let lora = LoraNetwork::attach(&mut m, &cfg, 3).unwrap();
    // Non-zero up-projections, so every down-projection gets a gradient too.
    tch::no_grad(|| {
        for l in &lora.layers {
            let _ = l.up.shallow_clone().normal_(0.0, 0.05);
        }
    });
    tch::manual_seed(2);
    let batch = Batch {
        latents: tch::Tensor::randn([2, 4, 8, 8], (f32k, cpu)),
        context: tch::Tensor::randn([2, 77, 64], (f32k, cpu)),
        added: Some(AddedCond {
            text_embeds: tch::Tensor::randn([2, 32], (f32k, cpu)),
            time_ids: tch::Tensor::from_slice(&[64f32, 64., 0., 0., 64., 64.].repeat(2))
                .view([2, 6]),
        }),
        weights: vec![1.0, 0.5],
    };
    let schedule = NoiseSchedule::new(ScheduleConfig::default());
    let objective = Objective {
        prediction: PredictionType::VPrediction,
        min_snr_gamma: Some(5.0),
        noise_offset: 0.05,
        min_timestep: 0,
        max_timestep: 1000,
    };
    let plain = objective
        .loss(&m.unet, &schedule, &batch, &mut stream(1, 2, 0))
        .unwrap();
    plain.backward();
    let a = lora.grads();
    lora.zero_grad();
    let l = objective
        .backward_checkpointed(&m.unet, &schedule, &batch, &mut stream(1, 2, 0), 0.5)
        .unwrap();
    let b = lora.grads();
    assert!((l - plain.double_value(&[])).abs() < 1e-6, "loss {l}");
    for ((ga, gb), name) in a.iter().zip(&b).zip(lora.var_names()) {
        let scale = ga.abs().max().double_value(&[]);
        let d = (ga * 0.5 - gb).abs().max().double_value(&[]);
        assert!(scale > 0.0, "{name} got no gradient");
        assert!(d <= 1e-4 * scale, "{name}: {d} against {scale}");
    }
}
