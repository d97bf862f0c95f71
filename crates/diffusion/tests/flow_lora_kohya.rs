//! A FLUX LoRA in kohya's layout (the original model's module names, `lora_unet_double_blocks_0_
//! img_attn_qkv`, with q/k/v and FLUX's single-block input fused) gives diffusers' result: the
//! conformance case's peft LoRA, rewritten here in kohya's layout (a fused layer's adapters side by
//! side: the downs stacked, the ups block-diagonal, so the product is exact), applied merged and at
//! run time, against the transformer output diffusers computed with the peft file.

use std::collections::HashMap;
use std::path::PathBuf;

use atelier_diffusion::conformance::models::diff;
use atelier_diffusion::flow::{Denoiser, FlowModel};
use atelier_diffusion::lora::{LoraFile, LoraMode};
use atelier_diffusion::pipeline::Placement;
use atelier_diffusion::torch::flux::FluxInput;
use atelier_diffusion::torch::weights::{from_candle, to_candle};
use candle_core::{DType, Device, Tensor};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance/models")
}

/// kohya's module for one or several peft modules (fused in that order).
fn kohya_layout() -> Vec<(String, Vec<String>)> {
    let d = |m: &str| format!("transformer.transformer_blocks.0.{m}");
    let mut v = vec![(
        "final_layer_linear".to_string(),
        vec!["transformer.proj_out".to_string()],
    )];
    for (key, mods) in [
        ("img_attn_qkv", &["attn.to_q", "attn.to_k", "attn.to_v"][..]),
        (
            "txt_attn_qkv",
            &["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
        ),
        ("img_attn_proj", &["attn.to_out.0"]),
        ("txt_attn_proj", &["attn.to_add_out"]),
        ("img_mlp_0", &["ff.net.0.proj"]),
        ("img_mlp_2", &["ff.net.2"]),
    ] {
        v.push((
            format!("double_blocks_0_{key}"),
            mods.iter().map(|m| d(m)).collect(),
        ));
    }
    for i in 0..2 {
        let s = |m: &str| format!("transformer.single_transformer_blocks.{i}.{m}");
        v.push((
            format!("single_blocks_{i}_linear1"),
            ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                .map(s)
                .to_vec(),
        ));
        v.push((format!("single_blocks_{i}_linear2"), vec![s("proj_out")]));
    }
    v
}

fn to_kohya(peft: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    for (key, mods) in kohya_layout() {
        let downs: Vec<&Tensor> = mods
            .iter()
            .map(|m| &peft[&format!("{m}.lora_A.weight")])
            .collect();
        let ups: Vec<&Tensor> = mods
            .iter()
            .map(|m| &peft[&format!("{m}.lora_B.weight")])
            .collect();
        let ranks: Vec<usize> = downs.iter().map(|d| d.dim(0).unwrap()).collect();
        let total: usize = ranks.iter().sum();
        let mut before = 0;
        let rows: Vec<Tensor> = ups
            .iter()
            .zip(&ranks)
            .map(|(u, &r)| {
                let n = u.dim(0).unwrap();
                let mut parts = Vec::new();
                if before > 0 {
                    parts.push(Tensor::zeros((n, before), DType::F32, &Device::Cpu).unwrap());
                }
                parts.push((*u).clone());
                if total - before - r > 0 {
                    parts.push(
                        Tensor::zeros((n, total - before - r), DType::F32, &Device::Cpu).unwrap(),
                    );
                }
                before += r;
                Tensor::cat(&parts, 1).unwrap()
            })
            .collect();
        let k = format!("lora_unet_{key}");
        out.insert(
            format!("{k}.lora_down.weight"),
            Tensor::cat(&downs, 0).unwrap(),
        );
        out.insert(
            format!("{k}.lora_up.weight"),
            Tensor::cat(&rows, 0).unwrap(),
        );
        // alpha = rank: scale 1, as the peft file (no alpha) means.
        out.insert(
            format!("{k}.alpha"),
            Tensor::new(total as f32, &Device::Cpu).unwrap(),
        );
    }
    out
}

#[test]
fn a_kohya_flux_lora_matches_diffusers_peft_result() {
    let case = root().join("flux-lora-peft");
    let peft = candle_core::safetensors::load(case.join("lora.safetensors"), &Device::Cpu).unwrap();
    let kohya = to_kohya(&peft);
    let covered: usize = kohya_layout().iter().map(|(_, m)| m.len()).sum();
    assert_eq!(covered * 2, peft.len(), "every peft layer is rewritten");
    let file = LoraFile::from_tensors(kohya, HashMap::new()).unwrap();
    let t = candle_core::safetensors::load(case.join("tensors.safetensors"), &Device::Cpu).unwrap();
    let tt = |n: &str| from_candle(&t[n]).unwrap();
    let base = FlowModel::load(&root().join("flux-dev/model"), Placement::CPU).unwrap();
    for mode in [LoraMode::Merge, LoraMode::Runtime] {
        let (m, applied) = base.with_lora(&file, 0.8, mode).unwrap();
        assert!(applied.unmatched.is_empty(), "{:?}", applied.unmatched);
        assert_eq!(applied.matched, covered);
        let Denoiser::Flux(f) = &m.denoiser else {
            panic!("not FLUX")
        };
        let (x, c, p) = (tt("tr.0.hidden_states"), tt("tr.0.ehs"), tt("tr.0.pooled"));
        let out = tch::no_grad(|| {
            f.forward(&FluxInput {
                hidden: &x,
                context: &c,
                pooled: &p,
                timestep: &tch::Tensor::from_slice(&[0.7f32]),
                guidance: Some(&tch::Tensor::from_slice(&[3.5f32])),
                img_ids: &tt("tr.0.img_ids"),
                txt_ids: &tt("tr.0.txt_ids"),
            })
        });
        let d = diff(&to_candle(&out).unwrap(), &t["tr.0.output"]).unwrap();
        assert!(d < 3e-4, "{mode:?}: max |diff| {d}");
    }
    // The base model is untouched by either.
    let Denoiser::Flux(f) = &base.denoiser else {
        panic!()
    };
    assert!(f
        .clone()
        .linears_mut()
        .iter()
        .all(|(_, l)| l.adapters.is_empty()));
}
