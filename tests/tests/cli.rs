//! The `atelier` CLI's offline commands, as a user runs them.

use std::process::Command;

use atelier_e2e::*;

fn atelier(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin("atelier")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn conformance_captions_replays_the_shared_pycocoevalcap_file() {
    let file = conformance_dir().join("captions/pycocoevalcap-1.2.json");
    let (ok, stdout, stderr) =
        atelier(&["conformance", "captions", "--cases", file.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    let last = stdout.lines().last().unwrap();
    assert!(last.ends_with(" passed, 0 failed"), "{stdout}");
    let passed: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= 3347, "{last}");
}

#[test]
fn conformance_fails_loudly_on_a_wrong_reference() {
    let file = conformance_dir().join("captions/pycocoevalcap-1.2.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    doc["corpus"]["CIDEr"] = serde_json::json!(9.99);
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, doc.to_string()).unwrap();
    let (ok, stdout, _) = atelier(&["conformance", "captions", "--cases", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stdout.contains("FAIL corpus CIDEr") && stdout.trim_end().ends_with(" passed, 1 failed"),
        "{stdout}"
    );
}

#[test]
fn conformance_prompts_replays_the_shared_a1111_cases() {
    let file = conformance_dir().join("prompts/a1111-prompt-parser.json");
    let (ok, stdout, stderr) =
        atelier(&["conformance", "prompts", "--cases", file.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.trim_end().ends_with("86 passed, 0 failed"),
        "{stdout}"
    );
}

#[test]
fn prompt_parse_prints_attention_and_schedule() {
    let (ok, stdout, stderr) = atelier(&[
        "prompt",
        "parse",
        "a (red:1.5) [cat:dog:0.5]",
        "--steps",
        "10",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["attention"][1], serde_json::json!(["red", 1.5]));
    assert_eq!(
        v["schedule"],
        serde_json::json!([[5, "a (red:1.5) cat"], [10, "a (red:1.5) dog"]])
    );
    let (ok, _, stderr) = atelier(&["prompt", "parse", "x", "--steps", "0"]);
    assert!(
        !ok && stderr.contains("--steps must be between"),
        "{stderr}"
    );
}

#[test]
fn conformance_noise_is_bit_exact_on_the_shared_seeds_and_fails_on_a_wrong_one() {
    let file = conformance_dir().join("noise/noise.json");
    let (ok, stdout, stderr) = atelier(&["conformance", "noise", "--file", file.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.trim_end().ends_with("50 passed, 0 failed"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ok   a1111_nv seed 9223372036854775819"),
        "{stdout}"
    );

    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    doc["tensors"] = serde_json::json!(file.with_file_name("noise.safetensors"));
    doc["torch_cpu"]["cases"][0]["seed"] = serde_json::json!(5);
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("noise.json");
    std::fs::write(&wrong, doc.to_string()).unwrap();
    let (ok, stdout, _) = atelier(&["conformance", "noise", "--file", wrong.to_str().unwrap()]);
    assert!(!ok);
    assert!(stdout.contains("FAIL torch_cpu seed 5 draw 0"), "{stdout}");
    assert!(
        stdout.trim_end().ends_with("47 passed, 3 failed"),
        "{stdout}"
    );
}

#[test]
fn conformance_schedulers_replays_the_shared_diffusers_traces() {
    let dir = conformance_dir().join("schedulers");
    let (ok, stdout, stderr) = atelier(&[
        "conformance",
        "schedulers",
        "--traces",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{stdout}{stderr}");
    let last = stdout.lines().last().unwrap();
    assert!(last.ends_with(" passed, 0 failed"), "{stdout}");
    let passed: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= 63, "{last}");
}

#[test]
fn conformance_schedulers_fails_on_a_diverging_trace_and_explains_a_bad_dir() {
    let file = conformance_dir().join("schedulers/diffusers-0.42.1.json");
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let traces = doc["traces"].as_array_mut().unwrap();
    traces.truncate(2);
    let x = &mut traces[1]["trace"][3]["x"][0];
    *x = serde_json::json!(x.as_f64().unwrap() + 0.5);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("t.json"), doc.to_string()).unwrap();
    let (ok, stdout, _) = atelier(&[
        "conformance",
        "schedulers",
        "--traces",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        stdout.contains("step 3") && stdout.trim_end().ends_with("1 passed, 1 failed"),
        "{stdout}"
    );

    let empty = tempfile::tempdir().unwrap();
    let (ok, _, stderr) = atelier(&[
        "conformance",
        "schedulers",
        "--traces",
        empty.path().to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(stderr.contains("no *.json trace files"), "{stderr}");
}

#[test]
fn eval_captions_scores_jsonl_and_explains_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let refs = dir.path().join("refs.jsonl");
    let cands = dir.path().join("cands.jsonl");
    std::fs::write(&refs, "{\"image_id\":1,\"caption\":\"A dog runs on the beach.\"}\n{\"image_id\":1,\"caption\":\"A dog on the sand.\"}\n{\"image_id\":2,\"caption\":\"Two cats on a sofa.\"}\n").unwrap();
    std::fs::write(&cands, "{\"image_id\":1,\"caption\":\"a dog runs on the beach\"}\n{\"image_id\":2,\"caption\":\"a cat on a red sofa\"}\n").unwrap();
    let (ok, stdout, stderr) = atelier(&[
        "eval-captions",
        "--refs",
        refs.to_str().unwrap(),
        "--cands",
        cands.to_str().unwrap(),
        "--per-image",
    ]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    for m in ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"] {
        assert!(v[m].as_f64().is_some(), "{m} missing: {v}");
    }
    assert!((v["per_image"]["ROUGE_L"]["1"].as_f64().unwrap() - 1.0).abs() < 1e-12);
    // METEOR from pycocoevalcap's jar (installed into .tools/ by scripts/bootstrap).
    let meteor = &v["per_image"]["METEOR"];
    assert!(v["METEOR"].as_f64().is_some_and(|m| m > 0.0), "{v}");
    assert!(
        meteor["1"].as_f64().unwrap() > meteor["2"].as_f64().unwrap(),
        "{v}"
    );
    assert!(v["per_image"]["Bleu_1"]["2"].as_f64().unwrap() < 1.0);

    std::fs::write(&cands, "{\"image_id\":1,\"caption\":\"a dog\"}\n{\"image_id\":9,\"caption\":\"ghost\"}\n{\"image_id\":2,\"caption\":\"x\"}\n").unwrap();
    let (ok, _, stderr) = atelier(&[
        "eval-captions",
        "--refs",
        refs.to_str().unwrap(),
        "--cands",
        cands.to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("\"9\" has no references"),
        "{stderr}"
    );
    std::fs::write(&cands, "{\"image_id\":1,\"caption\":\"a dog\"}\nnot json\n").unwrap();
    let (ok, _, stderr) = atelier(&[
        "eval-captions",
        "--refs",
        refs.to_str().unwrap(),
        "--cands",
        cands.to_str().unwrap(),
    ]);
    assert!(
        !ok && stderr.contains("cands.jsonl:2: not JSON"),
        "{stderr}"
    );
}

#[test]
fn conformance_models_replays_the_component_pipeline_and_tokenizer_references() {
    // Every SD 1.x / 2.x / XL, inpainting and LoRA component check, every whole pipeline (from
    // given latents and from seeds), every CLIP tokenizer text, and T5's tokenizer and encoder
    // run and pass on libtorch.
    let dir = conformance_dir().join("models");
    let (ok, stdout, stderr) =
        atelier(&["conformance", "models", "--cases", dir.to_str().unwrap()]);
    assert!(ok, "{stdout}{stderr}");
    for check in [
        "ok   sd1/0:text_encoder",
        "ok   sd2-v/1:unet",
        "ok   sdxl/1:text_encoder text_encoder_2",
        "ok   sdxl/2:unet",
        "ok   sd1-inpainting-unet/1:unet",
        "ok   sd1-lora-kohya/2:unet",
        "ok   sd2-v/5:vae_encode",
        // DDIM from SD 1.x's PNDM config: clip_sample at DDIM's default (true).
        "ok   sd1/6:pipeline",
        // diffusers' clip_skip=2: the prompt only.
        "ok   sd1/7:pipeline",
        // SDXL's DDIM from an Euler config (set_alpha_to_one true); its empty negative is zeros.
        "ok   sdxl/7:pipeline",
        "ok   sdxl/8:pipeline",
        "ok   sd1-lora-kohya/3:pipeline",
        // Seeds drawn by per-image torch CPU generators, 64-bit seeds, SDE and DDPM noise.
        "ok   sd1-seeded/1:pipeline",
        "ok   sd1-seeded/3:pipeline",
        "ok   sd1-seeded/4:pipeline",
        // T5's tokenizer (FLUX's tokenizer_2, SD 3.5's tokenizer_3): ids identical, truncated
        // with </s> kept last.
        "ok   flux-dev/1:tokenizer_t5 tokenizer_2",
        "ok   sd35/2:tokenizer_t5 tokenizer_3",
        // The T5 v1.1 encoder (relative-position buckets, RMS norms, gated GELU).
        "ok   flux-dev/2:text_encoder_t5 text_encoder_2",
        "ok   sd35/3:text_encoder_t5 text_encoder_3",
        // The transformer families: FLUX's double/single-stream transformer with 3-axis RoPE,
        // SD 3.5's MMDiT with dual attention, 16-channel VAEs with shift_factor, flow-matching
        // Euler (dynamic and fixed shift), a peft LoRA on FLUX.
        "ok   flux-dev/3:transformer_flux",
        "ok   flux-dev/5:vae_decode",
        "ok   flux-dev/8:pipeline_flux",
        "ok   sd35/5:transformer_sd3",
        "ok   sd35/9:pipeline_sd3",
        "ok   flux-lora-peft/2:pipeline_flux",
        // HTML entities; the "!" pad token split out.
        "ok   tokenizer-clip/17:tokenizer",
        "ok   tokenizer-clip/26:tokenizer",
    ] {
        assert!(stdout.contains(check), "{check} missing:\n{stdout}");
    }
    let last = stdout.lines().last().unwrap();
    assert!(last.ends_with(" passed, 0 failed"), "{stdout}");
    let passed: usize = last.split(' ').next().unwrap().parse().unwrap();
    assert!(passed >= 226, "{last}");
}

#[test]
fn conformance_models_fails_beyond_the_tolerance() {
    // The sd1 case with a tolerance of 1e-9: libtorch's UNet outputs differ from PyTorch's in
    // the last bits (here its text encoder and VAE agree bit for bit, which other CPUs need not
    // repeat).
    let src = conformance_dir().join("models/sd1");
    let dir = tempfile::tempdir().unwrap();
    let case = dir.path().join("sd1");
    std::fs::create_dir_all(&case).unwrap();
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("case.json")).unwrap()).unwrap();
    doc["tolerance"]["abs"] = serde_json::json!(1e-9);
    doc["model"] = serde_json::json!(src.join("model").to_str().unwrap());
    std::fs::write(case.join("case.json"), doc.to_string()).unwrap();
    std::fs::copy(
        src.join("tensors.safetensors"),
        case.join("tensors.safetensors"),
    )
    .unwrap();
    let (ok, stdout, _) = atelier(&[
        "conformance",
        "models",
        "--cases",
        dir.path().to_str().unwrap(),
    ]);
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("FAIL sd1/1:unet: max |diff|"), "{stdout}");
    assert!(
        stdout.contains("FAIL sd1/6:pipeline: max |diff|"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with(" failed"), "{stdout}");
}

#[test]
fn api_keys_never_travel_in_argv() {
    // A key on the command line is refused with the fix; a key file is read (and an unreachable
    // gateway is then the error, not the key).
    let (ok, _, stderr) = atelier(&[
        "job",
        "00000000-0000-0000-0000-000000000000",
        "--key",
        "secret",
    ]);
    assert!(
        !ok && stderr.contains("ATELIER_API_KEY") && stderr.contains("--key-file"),
        "{stderr}"
    );
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let (ok, _, stderr) = atelier(&[
        "job",
        "00000000-0000-0000-0000-000000000000",
        "--key-file",
        empty.to_str().unwrap(),
    ]);
    assert!(!ok && stderr.contains("holds no API key"), "{stderr}");
}
