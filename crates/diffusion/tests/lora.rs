//! LoRA files (kohya and diffusers/peft layouts) applied merged or at run time.
use std::collections::HashMap;

use atelier_diffusion::lora::{LoraFile, LoraMode};
use atelier_diffusion::pipeline::{make_tiny, Family, Placement, StableDiffusion, Txt2Img};
use atelier_diffusion::schedulers::SamplerKind;
use candle_core::{Device, Tensor};

fn req() -> Txt2Img {
    Txt2Img {
        prompt: "red circle <lora:style:0.7>".into(),
        negative_prompt: String::new(),
        steps: 4,
        cfg_scale: 3.0,
        seed: 5,
        width: 32,
        height: 32,
        batch_size: 1,
        sampler: SamplerKind::Euler,
        clip_skip: 1,
        clip_skip_convention: Default::default(),
        noise: Default::default(),
    }
}

fn rand(shape: &[usize], seed: u64) -> Tensor {
    let mut n = atelier_diffusion::noise::SeededNoise::new(seed);
    n.randn(shape.to_vec(), &Device::Cpu)
        .unwrap()
        .affine(0.5, 0.0)
        .unwrap()
}

/// A kohya-style file: attention projections (diffusers names and one LDM name), a LoCon on a
/// 3×3 convolution, a text-encoder projection.
fn kohya_file() -> HashMap<String, Tensor> {
    let mut t = HashMap::new();
    let mut add = |key: &str, down: &[usize], up: &[usize], alpha: f32, seed: u64| {
        t.insert(format!("{key}.lora_down.weight"), rand(down, seed));
        t.insert(format!("{key}.lora_up.weight"), rand(up, seed + 1));
        t.insert(
            format!("{key}.alpha"),
            Tensor::new(alpha, &Device::Cpu).unwrap(),
        );
    };
    add(
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
        &[4, 32],
        &[32, 4],
        2.0,
        1,
    );
    add(
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v",
        &[4, 32],
        &[32, 4],
        4.0,
        3,
    );
    add(
        "lora_unet_down_blocks_0_resnets_0_conv1",
        &[2, 32, 3, 3],
        &[32, 2, 1, 1],
        1.0,
        5,
    );
    add(
        "lora_unet_up_blocks_1_attentions_0_proj_in",
        &[2, 32, 1, 1],
        &[32, 2, 1, 1],
        2.0,
        7,
    );
    add(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        &[4, 32],
        &[32, 4],
        4.0,
        9,
    );
    t
}

#[test]
fn weight_zero_is_the_base_and_merged_equals_runtime() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 51).unwrap();
    let sd = StableDiffusion::load(dir.path(), Placement::CPU).unwrap();
    let base = sd.txt2img(&req(), |_, _| true).unwrap()[0].image.clone();
    let file = LoraFile::from_tensors(kohya_file(), HashMap::new()).unwrap();
    assert_eq!(file.layers.len(), 5);

    for mode in [LoraMode::Runtime, LoraMode::Merge] {
        let (zero, applied) = sd.with_lora(&file, 0.0, mode).unwrap();
        assert_eq!(applied.matched, 5, "{:?}", applied.unmatched);
        assert_eq!(
            zero.txt2img(&req(), |_, _| true).unwrap()[0].image,
            base,
            "{mode:?} at weight 0"
        );
    }
    let (rt, _) = sd.with_lora(&file, 1.0, LoraMode::Runtime).unwrap();
    let (mg, _) = sd.with_lora(&file, 1.0, LoraMode::Merge).unwrap();
    let a = rt.txt2img(&req(), |_, _| true).unwrap()[0].image.clone();
    let b = mg.txt2img(&req(), |_, _| true).unwrap()[0].image.clone();
    assert_ne!(a, base, "a LoRA at weight 1 changes the image");
    let max_diff = a
        .pixels()
        .zip(b.pixels())
        .flat_map(|(p, q)| (0..3).map(move |c| (p.0[c] as i32 - q.0[c] as i32).abs()))
        .max()
        .unwrap();
    assert!(max_diff <= 2, "merged and runtime differ by {max_diff}");
    // The base model is untouched by either.
    assert_eq!(sd.txt2img(&req(), |_, _| true).unwrap()[0].image, base);
}

#[test]
fn peft_layout_loads_and_foreign_files_are_refused() {
    let mut t = HashMap::new();
    t.insert(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight".to_string(),
        rand(&[4, 32], 1),
    );
    t.insert(
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight".to_string(),
        rand(&[32, 4], 2),
    );
    t.insert(
        "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_A.weight".to_string(),
        rand(&[4, 32], 3),
    );
    t.insert(
        "text_encoder.text_model.encoder.layers.1.mlp.fc1.lora_B.weight".to_string(),
        rand(&[37, 4], 4),
    );
    let file = LoraFile::from_tensors(t, HashMap::new()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    make_tiny(dir.path(), Family::Sd1, 52).unwrap();
    let sd = StableDiffusion::load(dir.path(), Placement::CPU).unwrap();
    let (_, applied) = sd.with_lora(&file, 1.0, LoraMode::Merge).unwrap();
    assert_eq!(applied.matched, 2);

    let mut foreign = HashMap::new();
    foreign.insert(
        "lora_unet_not_a_layer.lora_down.weight".to_string(),
        rand(&[4, 32], 1),
    );
    foreign.insert(
        "lora_unet_not_a_layer.lora_up.weight".to_string(),
        rand(&[32, 4], 1),
    );
    let file = LoraFile::from_tensors(foreign, HashMap::new()).unwrap();
    let err = sd
        .with_lora(&file, 1.0, LoraMode::Runtime)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("another architecture"), "{err}");

    let mut half = HashMap::new();
    half.insert(
        "lora_unet_x.lora_down.weight".to_string(),
        rand(&[4, 32], 1),
    );
    assert!(LoraFile::from_tensors(half, HashMap::new())
        .unwrap_err()
        .contains("both down and up"));
}
