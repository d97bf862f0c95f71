//! Training on a tiny random-weight SD model: gradients reach every LoRA parameter, the loss
//! falls, a fresh LoRA is a no-op, a trained one changes samples (and loads back through the
//! sampler's LoRA loader in kohya's layout), a resumed run equals an uninterrupted one, and the
//! prior loss enters with its weight.

use std::collections::HashMap;

use atelier_diffusion::lora::{LoraFile, LoraMode};
use atelier_diffusion::pipeline::{Placement, StableDiffusion};
use atelier_trainer::session::{lora_hashes, prepare, Session, Source};
use candle_core::{DType, Device, Tensor};

mod common;
use common::*;

#[test]
fn every_lora_parameter_receives_a_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec();
    s.network.conv_rank = Some(2);
    s.network.train_text_encoder = true;
    let mut run = session(dir.path(), &s, 2);
    let names = run.network().unwrap().var_names();
    assert!(names.iter().any(|n| n.starts_with("lora_te_")));
    assert!(names.iter().any(|n| n.contains("resnets")));
    // Up-projections start at zero, so only they get gradient at step 0 (as in kohya); after
    // one update every tensor must.
    let g0 = run.gradients().unwrap();
    for (name, g) in &g0 {
        let nz = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if name.ends_with("lora_up.weight") {
            assert!(nz > 0.0, "{name} got no gradient at step 0");
        }
    }
    run.train_step().unwrap();
    let g1 = run.gradients().unwrap();
    assert_eq!(g1.len(), names.len());
    for (name, g) in &g1 {
        let nz = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(nz > 0.0 && nz.is_finite(), "{name} got no gradient");
    }
}

#[test]
fn loss_falls_when_overfitting_a_few_images() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec();
    s.unet_lr = 3e-3;
    s.max_train_steps = 40;
    s.network.targets = "attention".into();
    let mut run = session(dir.path(), &s, 3);
    let before = fixed_loss(&mut run);
    while !run.done() {
        run.train_step().unwrap();
    }
    let after = fixed_loss(&mut run);
    assert!(
        after < before * 0.9,
        "loss did not fall: {before:.5} → {after:.5}"
    );
    assert_eq!(run.history.len(), 40);
    assert!(run.history.iter().all(|p| p.loss.is_finite()));
}

#[test]
fn fresh_lora_changes_nothing_and_trained_one_changes_samples() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec();
    let run = session(dir.path(), &s, 2);
    let base = StableDiffusion::load(dir.path(), Placement::CPU).unwrap();
    let prompt = "red square";
    let plain = render(&base, prompt);
    // A fresh network: its up-projections are zero.
    assert_eq!(
        render(run.model(), prompt),
        plain,
        "a fresh LoRA changed the output"
    );
    let fresh = run.output_file("tiny", "abc").unwrap();
    let file = LoraFile::from_bytes(&fresh).unwrap();
    let (with_fresh, applied) = base.with_lora(&file, 1.0, LoraMode::Runtime).unwrap();
    assert!(applied.unmatched.is_empty(), "{:?}", applied.unmatched);
    assert_eq!(render(&with_fresh, prompt), plain);

    let mut s2 = s.clone();
    s2.unet_lr = 2e-2;
    let mut run = session(dir.path(), &s2, 2);
    for _ in 0..5 {
        run.train_step().unwrap();
    }
    let trained = run.output_file("tiny", "abc").unwrap();
    let file = LoraFile::from_bytes(&trained).unwrap();
    let (with_lora, applied) = base.with_lora(&file, 1.0, LoraMode::Merge).unwrap();
    assert!(applied.unmatched.is_empty());
    let out = render(&with_lora, prompt);
    assert!(
        max_diff(&out, &plain) > 2,
        "a trained LoRA left samples unchanged"
    );
    // Loaded through the sampler's loader, the file does what the training session does.
    let in_session = render(run.model(), prompt);
    assert!(
        max_diff(&out, &in_session) <= 2,
        "the saved LoRA does not reproduce the trained adapters"
    );
}

#[test]
fn resumed_run_equals_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec();
    s.gradient_accumulation_steps = 2;
    s.lr_scheduler = "cosine".into();
    s.lr_warmup_steps = 2;
    s.flip_aug = true;
    s.shuffle_caption = true;
    s.caption_dropout_rate = 0.2;
    s.noise_offset = 0.05;
    s.min_snr_gamma = Some(5.0);
    let mut straight = session(dir.path(), &s, 3);
    for _ in 0..10 {
        straight.train_step().unwrap();
    }
    let mut first = session(dir.path(), &s, 3);
    for _ in 0..5 {
        first.train_step().unwrap();
    }
    let ckpt = first.checkpoint().unwrap();
    drop(first);
    let mut resumed = session(dir.path(), &s, 3);
    resumed.restore(&ckpt).unwrap();
    assert_eq!(resumed.step, 5);
    assert_eq!(resumed.history.len(), 5);
    while !resumed.done() {
        resumed.train_step().unwrap();
    }
    let a = straight.network().unwrap().tensors(DType::F32).unwrap();
    let b = resumed.network().unwrap().tensors(DType::F32).unwrap();
    assert_eq!(a.len(), b.len());
    for (k, ta) in &a {
        let d = (ta - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(d < 1e-5, "{k} differs by {d}");
    }
    for (p, q) in straight.history.iter().zip(&resumed.history) {
        assert!((p.loss - q.loss).abs() < 1e-5, "{p:?} vs {q:?}");
    }
    // A checkpoint of another spec is refused.
    let mut other = s.clone();
    other.unet_lr = 5e-4;
    let mut wrong = session(dir.path(), &other, 3);
    assert!(wrong.restore(&ckpt).is_err());
}

#[test]
fn prior_loss_enters_with_its_weight() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path());
    let mut s = spec();
    s.batch_size = 2;
    let mk = |w: f32| {
        let mut v: Vec<Source> = Vec::new();
        let imgs = shapes(2);
        v.push(Source {
            image: imgs[0].0.clone(),
            caption: "sks square".into(),
            weight: 1.0,
            repeats: 1,
            is_class: false,
        });
        v.push(Source {
            image: imgs[1].0.clone(),
            caption: "square".into(),
            weight: w,
            repeats: 1,
            is_class: true,
        });
        v
    };
    let loss_with = |w: f32| {
        let ex = prepare(&m, &s, mk(w)).unwrap();
        let mut run = Session::new(m.clone(), &s, ex).unwrap();
        run.eval_loss(7).unwrap()
    };
    let (l0, l1, l2) = (loss_with(0.0), loss_with(1.0), loss_with(2.0));
    assert!(l1 > l0, "the class image added no loss");
    // Linear in the weight: L(2) - L(1) = L(1) - L(0) = the class image's share.
    assert!(((l2 - l1) - (l1 - l0)).abs() < 1e-5 * l1.abs().max(1.0));
}

#[test]
fn file_follows_kohyas_layout() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec();
    s.network.train_text_encoder = true;
    s.save_fp16 = true;
    let mut run = session(dir.path(), &s, 2);
    run.train_step().unwrap();
    let bytes = run.output_file("tiny", "0123456789").unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta: HashMap<String, String> = meta.metadata().clone().unwrap();
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    assert!(names.contains(
        &"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"
            .to_string()
    ));
    assert!(names.contains(
        &"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight".to_string()
    ));
    for n in &names {
        assert!(
            n.starts_with("lora_unet_") || n.starts_with("lora_te_"),
            "{n}"
        );
        assert!(
            n.ends_with(".lora_down.weight")
                || n.ends_with(".lora_up.weight")
                || n.ends_with(".alpha"),
            "{n}"
        );
        let t = st.tensor(n).unwrap();
        assert_eq!(t.dtype(), safetensors::Dtype::F16, "{n}");
        if n.ends_with(".alpha") {
            assert!(t.shape().is_empty(), "alpha is a scalar");
        }
    }
    for k in [
        "ss_network_module",
        "ss_network_dim",
        "ss_network_alpha",
        "ss_learning_rate",
        "ss_num_train_images",
        "ss_max_train_steps",
        "ss_base_model_version",
        "ss_sd_model_hash",
        "ss_tag_frequency",
        "sshs_model_hash",
        "sshs_legacy_hash",
    ] {
        assert!(meta.contains_key(k), "metadata lacks {k}");
    }
    assert_eq!(meta["ss_network_module"], "networks.lora");
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_base_model_version"], "sd_v1");
    assert_eq!(meta["ss_steps"], "1");
    // The recorded hash is the file's tensor data's SHA-256, which metadata does not change.
    let (h, _) = lora_hashes(&bytes);
    assert_eq!(meta["sshs_model_hash"], h);
    // Up-projections of a fresh-then-once-trained network are no longer zero; downs are
    // initialised as PyTorch's Linear: within ±1/√fan_in.
    let down = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    let d: &Tensor = &down
        ["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"];
    let fan_in = d.dim(1).unwrap() as f32;
    let m = d
        .to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(m <= 1.0 / fan_in.sqrt() + 0.01, "down init {m}");
}

fn abs_max(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn gradient_checkpointing_gives_the_gradients_of_the_plain_backward_pass() {
    // Every kind of adapter (attention and transformer linears, 1×1 projections, LoCon convs,
    // the text encoder through the context), one step in so the down-projections get gradients.
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec();
    s.network.targets = "transformer".into();
    s.network.conv_rank = Some(2);
    s.network.train_text_encoder = true;
    let mut checkpointed = s.clone();
    checkpointed.gradient_checkpointing = true;
    let mut runs = [
        session(dir.path(), &s, 2),
        session(dir.path(), &checkpointed, 2),
    ];
    let losses: Vec<f64> = runs
        .iter_mut()
        .map(|r| r.train_step().unwrap().loss)
        .collect();
    assert!(
        (losses[0] - losses[1]).abs() <= 1e-6 * losses[0].abs(),
        "{losses:?}"
    );
    let [a, b] = runs.map(|mut r| r.gradients().unwrap());
    assert_eq!(a.len(), b.len());
    let mut text = 0;
    for ((na, ga), (nb, gb)) in a.iter().zip(&b) {
        assert_eq!(na, nb);
        let d = abs_max(&(ga - gb).unwrap());
        let scale = abs_max(ga);
        assert!(scale > 0.0, "{na} got no gradient");
        assert!(d <= 1e-4 * scale, "{na}: {d} against {scale}");
        text += usize::from(na.starts_with("lora_te_"));
    }
    assert!(text > 0, "the text encoder's adapters were not compared");
}
