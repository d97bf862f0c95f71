//! Single-file FLUX and SD 3.5 checkpoints (the original Black Forest Labs / Stability key
//! layouts, bare or under `model.diffusion_model.`, with or without their VAE and text encoders)
//! load into the same model as the diffusers folder they were written from: images identical.
//! The files are written here from the conformance cases' folders by the layouts' own rules.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use atelier_diffusion::flow::{FlowModel, FlowRequest};
use atelier_diffusion::pipeline::Placement;
use candle_core::{Device, Tensor};

fn case(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/conformance/models")
        .join(name)
        .join("model")
}

fn load(p: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

fn cat(t: &HashMap<String, Tensor>, names: &[String]) -> Tensor {
    let parts: Vec<&Tensor> = names
        .iter()
        .map(|n| t.get(n).unwrap_or_else(|| panic!("{n}")))
        .collect();
    Tensor::cat(&parts, 0).unwrap()
}

fn swap(t: &Tensor) -> Tensor {
    let h = t.dim(0).unwrap() / 2;
    Tensor::cat(&[t.narrow(0, h, h).unwrap(), t.narrow(0, 0, h).unwrap()], 0).unwrap()
}

/// Puts `ours.{weight,bias}` (where present) at `theirs.{weight,bias}`.
fn mv(out: &mut HashMap<String, Tensor>, t: &HashMap<String, Tensor>, ours: &str, theirs: &str) {
    for p in ["weight", "bias"] {
        if let Some(x) = t.get(&format!("{ours}.{p}")) {
            out.insert(format!("{theirs}.{p}"), x.clone());
        }
    }
}

fn fused(
    out: &mut HashMap<String, Tensor>,
    t: &HashMap<String, Tensor>,
    ours: &[String],
    theirs: &str,
) {
    for p in ["weight", "bias"] {
        let names: Vec<String> = ours.iter().map(|o| format!("{o}.{p}")).collect();
        out.insert(format!("{theirs}.{p}"), cat(t, &names));
    }
}

/// BFL's layout of a diffusers FLUX transformer.
fn flux_bfl(t: &HashMap<String, Tensor>, pre: &str) -> HashMap<String, Tensor> {
    let mut o = HashMap::new();
    let n = |s: &str| format!("{pre}{s}");
    for (ours, theirs) in [
        ("x_embedder", "img_in"),
        ("context_embedder", "txt_in"),
        (
            "time_text_embed.timestep_embedder.linear_1",
            "time_in.in_layer",
        ),
        (
            "time_text_embed.timestep_embedder.linear_2",
            "time_in.out_layer",
        ),
        (
            "time_text_embed.guidance_embedder.linear_1",
            "guidance_in.in_layer",
        ),
        (
            "time_text_embed.guidance_embedder.linear_2",
            "guidance_in.out_layer",
        ),
        (
            "time_text_embed.text_embedder.linear_1",
            "vector_in.in_layer",
        ),
        (
            "time_text_embed.text_embedder.linear_2",
            "vector_in.out_layer",
        ),
        ("proj_out", "final_layer.linear"),
    ] {
        mv(&mut o, t, ours, &n(theirs));
    }
    for p in ["weight", "bias"] {
        o.insert(
            n(&format!("final_layer.adaLN_modulation.1.{p}")),
            swap(&t[&format!("norm_out.linear.{p}")]),
        );
    }
    for i in 0.. {
        let b = format!("transformer_blocks.{i}");
        if !t.contains_key(&format!("{b}.attn.to_q.weight")) {
            break;
        }
        let d = n(&format!("double_blocks.{i}"));
        let a = |x: &str| format!("{b}.attn.{x}");
        fused(
            &mut o,
            t,
            &[a("to_q"), a("to_k"), a("to_v")],
            &format!("{d}.img_attn.qkv"),
        );
        fused(
            &mut o,
            t,
            &[a("add_q_proj"), a("add_k_proj"), a("add_v_proj")],
            &format!("{d}.txt_attn.qkv"),
        );
        for (ours, theirs) in [
            ("norm_q", "img_attn.norm.query_norm"),
            ("norm_k", "img_attn.norm.key_norm"),
            ("norm_added_q", "txt_attn.norm.query_norm"),
            ("norm_added_k", "txt_attn.norm.key_norm"),
        ] {
            o.insert(
                format!("{d}.{theirs}.scale"),
                t[&a(&format!("{ours}.weight"))].clone(),
            );
        }
        for (ours, theirs) in [
            ("attn.to_out.0", "img_attn.proj"),
            ("attn.to_add_out", "txt_attn.proj"),
            ("ff.net.0.proj", "img_mlp.0"),
            ("ff.net.2", "img_mlp.2"),
            ("ff_context.net.0.proj", "txt_mlp.0"),
            ("ff_context.net.2", "txt_mlp.2"),
            ("norm1.linear", "img_mod.lin"),
            ("norm1_context.linear", "txt_mod.lin"),
        ] {
            mv(&mut o, t, &format!("{b}.{ours}"), &format!("{d}.{theirs}"));
        }
    }
    for i in 0.. {
        let b = format!("single_transformer_blocks.{i}");
        if !t.contains_key(&format!("{b}.attn.to_q.weight")) {
            break;
        }
        let s = n(&format!("single_blocks.{i}"));
        let parts = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"].map(|x| format!("{b}.{x}"));
        fused(&mut o, t, &parts, &format!("{s}.linear1"));
        mv(&mut o, t, &format!("{b}.proj_out"), &format!("{s}.linear2"));
        mv(
            &mut o,
            t,
            &format!("{b}.norm.linear"),
            &format!("{s}.modulation.lin"),
        );
        o.insert(
            format!("{s}.norm.query_norm.scale"),
            t[&format!("{b}.attn.norm_q.weight")].clone(),
        );
        o.insert(
            format!("{s}.norm.key_norm.scale"),
            t[&format!("{b}.attn.norm_k.weight")].clone(),
        );
    }
    o
}

/// Stability's layout of a diffusers SD 3 transformer.
fn sd3_sai(t: &HashMap<String, Tensor>, pre: &str) -> HashMap<String, Tensor> {
    let mut o = HashMap::new();
    let n = |s: &str| format!("{pre}{s}");
    o.insert(n("pos_embed"), t["pos_embed.pos_embed"].clone());
    for (ours, theirs) in [
        ("pos_embed.proj", "x_embedder.proj"),
        (
            "time_text_embed.timestep_embedder.linear_1",
            "t_embedder.mlp.0",
        ),
        (
            "time_text_embed.timestep_embedder.linear_2",
            "t_embedder.mlp.2",
        ),
        ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
        ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
        ("context_embedder", "context_embedder"),
        ("proj_out", "final_layer.linear"),
    ] {
        mv(&mut o, t, ours, &n(theirs));
    }
    for p in ["weight", "bias"] {
        o.insert(
            n(&format!("final_layer.adaLN_modulation.1.{p}")),
            swap(&t[&format!("norm_out.linear.{p}")]),
        );
    }
    let blocks = (0..)
        .take_while(|i| t.contains_key(&format!("transformer_blocks.{i}.attn.to_q.weight")))
        .count();
    for i in 0..blocks {
        let b = format!("transformer_blocks.{i}");
        let (x, c) = (
            n(&format!("joint_blocks.{i}.x_block")),
            n(&format!("joint_blocks.{i}.context_block")),
        );
        let a = |s: &str| format!("{b}.{s}");
        fused(
            &mut o,
            t,
            &[a("attn.to_q"), a("attn.to_k"), a("attn.to_v")],
            &format!("{x}.attn.qkv"),
        );
        fused(
            &mut o,
            t,
            &[
                a("attn.add_q_proj"),
                a("attn.add_k_proj"),
                a("attn.add_v_proj"),
            ],
            &format!("{c}.attn.qkv"),
        );
        if t.contains_key(&a("attn2.to_q.weight")) {
            fused(
                &mut o,
                t,
                &[a("attn2.to_q"), a("attn2.to_k"), a("attn2.to_v")],
                &format!("{x}.attn2.qkv"),
            );
            mv(&mut o, t, &a("attn2.to_out.0"), &format!("{x}.attn2.proj"));
            mv(&mut o, t, &a("attn2.norm_q"), &format!("{x}.attn2.ln_q"));
            mv(&mut o, t, &a("attn2.norm_k"), &format!("{x}.attn2.ln_k"));
        }
        for (ours, theirs) in [
            ("attn.norm_q", format!("{x}.attn.ln_q")),
            ("attn.norm_k", format!("{x}.attn.ln_k")),
            ("attn.norm_added_q", format!("{c}.attn.ln_q")),
            ("attn.norm_added_k", format!("{c}.attn.ln_k")),
            ("attn.to_out.0", format!("{x}.attn.proj")),
            ("attn.to_add_out", format!("{c}.attn.proj")),
            ("ff.net.0.proj", format!("{x}.mlp.fc1")),
            ("ff.net.2", format!("{x}.mlp.fc2")),
            ("ff_context.net.0.proj", format!("{c}.mlp.fc1")),
            ("ff_context.net.2", format!("{c}.mlp.fc2")),
            ("norm1.linear", format!("{x}.adaLN_modulation.1")),
        ] {
            mv(&mut o, t, &a(ours), &theirs);
        }
        for p in ["weight", "bias"] {
            let w = &t[&a(&format!("norm1_context.linear.{p}"))];
            let w = if i + 1 == blocks { swap(w) } else { w.clone() };
            o.insert(format!("{c}.adaLN_modulation.1.{p}"), w);
        }
    }
    o
}

/// A folder with only the tokenizers, the scheduler and the configs (no weights) of `model`.
fn tokenizers_only(model: &Path, to: &Path) {
    copy_without(model, to, &[], false);
}

fn image(path: &Path, req: &FlowRequest) -> Vec<u8> {
    let m =
        FlowModel::load(path, Placement::CPU).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    m.txt2img(req, |_, _| true).unwrap()[0]
        .image
        .as_raw()
        .clone()
}

fn req(cfg: f64) -> FlowRequest {
    FlowRequest {
        prompt: "portrait of a cat wearing a tiny hat".into(),
        negative_prompt: "blurry".into(),
        steps: 3,
        cfg_scale: cfg,
        guidance: 3.5,
        width: 32,
        height: 32,
        seed: 5,
        batch_size: 1,
        max_sequence_length: 32,
        shift: None,
        noise: Default::default(),
        sampler: Default::default(),
    }
}

fn save(t: &HashMap<String, Tensor>, p: &Path) {
    candle_core::safetensors::save(t, p).unwrap();
}

#[test]
fn flux_single_files_load_as_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = case("flux-dev");
    let tr = load(&model.join("transformer/diffusion_pytorch_model.safetensors"));
    let want = image(&model, &req(1.0));

    // The transformer alone, bare keys; everything else from the folder the sidecar names.
    let bare = dir.path().join("flux-bare.safetensors");
    save(&flux_bfl(&tr, ""), &bare);
    std::fs::write(
        bare.with_extension("json"),
        format!("{{\"components\": \"{}\"}}", model.display()),
    )
    .unwrap();
    assert_eq!(image(&bare, &req(1.0)), want);

    // ComfyUI's all-in-one: model.diffusion_model., vae. (LDM names), text_encoders.*; the sidecar
    // folder holds only tokenizers and the scheduler.
    let mut all = flux_bfl(&tr, "model.diffusion_model.");
    let vae = load(&model.join("vae/diffusion_pytorch_model.safetensors"));
    for (k, v) in &vae {
        all.insert(
            format!(
                "vae.{}",
                atelier_diffusion::models::ldm::vae_name(k, 3).unwrap()
            ),
            v.clone(),
        );
    }
    for (k, v) in load(&model.join("text_encoder/model.safetensors")) {
        all.insert(format!("text_encoders.clip_l.transformer.{k}"), v);
    }
    for (k, v) in load(&model.join("text_encoder_2/model.safetensors")) {
        all.insert(format!("text_encoders.t5xxl.transformer.{k}"), v);
    }
    let toks = dir.path().join("toks");
    tokenizers_only(&model, &toks);
    let aio = dir.path().join("flux-aio.safetensors");
    save(&all, &aio);
    std::fs::write(aio.with_extension("json"), "{\"components\": \"toks\"}").unwrap();
    let m = FlowModel::load(&aio, Placement::CPU).unwrap();
    assert!(m.has_guidance());
    assert_eq!(image(&aio, &req(1.0)), want);

    // Without a components folder: the reason and the fix.
    let lone = dir.path().join("lone.safetensors");
    std::fs::copy(&bare, &lone).unwrap();
    let e = FlowModel::load(&lone, Placement::CPU)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("lone.json") && e.contains("components"), "{e}");
}

#[test]
fn sd35_single_files_load_as_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let model = case("sd35");
    let tr = load(&model.join("transformer/diffusion_pytorch_model.safetensors"));
    let want = image(&model, &req(5.0));
    let file = dir.path().join("sd35.safetensors");
    save(&sd3_sai(&tr, "model.diffusion_model."), &file);
    std::fs::write(
        file.with_extension("json"),
        format!("{{\"components\": \"{}\"}}", model.display()),
    )
    .unwrap();
    assert_eq!(image(&file, &req(5.0)), want);
}

/// A copy of model folder `from` without the components named in `skip` (and without any
/// weights files unless `weights`).
fn copy_without(from: &Path, to: &Path, skip: &[&str], weights: bool) {
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if skip.contains(&name.as_str()) {
            continue;
        }
        let dest = to.join(&name);
        if e.path().is_dir() {
            std::fs::create_dir_all(&dest).unwrap();
            for f in std::fs::read_dir(e.path()).unwrap().flatten() {
                if weights || !f.file_name().to_string_lossy().ends_with(".safetensors") {
                    std::fs::copy(f.path(), dest.join(f.file_name())).unwrap();
                }
            }
        } else {
            std::fs::create_dir_all(to).unwrap();
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

#[test]
fn sd3_without_its_t5_conditions_on_zeros_in_its_place() {
    // diffusers' SD 3 pipeline without text_encoder_3: zeros of 77 tokens after the CLIP states.
    let dir = tempfile::tempdir().unwrap();
    let model = case("sd35");
    let copy = dir.path().join("sd35-no-t5");
    copy_without(&model, &copy, &["text_encoder_3", "tokenizer_3"], true);
    let m = FlowModel::load(&copy, Placement::CPU).unwrap();
    assert!(m.t5.is_none());
    let c = m.encode("a cat", 32).unwrap();
    assert_eq!(c.context.size(), [1, 77 + 77, 64]);
    let t5_part = c.context.narrow(1, 77, 77);
    assert_eq!(t5_part.abs().sum(tch::Kind::Float).double_value(&[]), 0.0);
    let with_t5 = image(&model, &req(5.0));
    let without = image(&copy, &req(5.0));
    assert_ne!(with_t5, without, "T5's states take part when it is there");
    // A FLUX folder without T5 is refused with the reason.
    let flux = dir.path().join("flux-no-t5");
    copy_without(&case("flux-dev"), &flux, &["text_encoder_2"], true);
    let e = FlowModel::load(&flux, Placement::CPU)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("T5"), "{e}");
}
