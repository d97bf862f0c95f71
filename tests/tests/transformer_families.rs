//! FLUX.1 and SD 3.5 served end to end: tiny models with the real structures (the conformance
//! cases' folders) in a sampler's models directory generate through `POST /v1/txt2img` and
//! A1111's `/sdapi/v1/txt2img`, byte for byte what the engine's pipeline (checked against
//! diffusers by `atelier conformance models`) makes in-process; `sd-models` lists them with the
//! hash their infotexts carry; what these families cannot do is refused with the reason.

use std::path::Path;
use std::time::Duration;

use atelier_contracts::{GenerateSpec, JobOutput, JobState};
use atelier_diffusion::flow::{FlowModel, FlowRequest};
use atelier_diffusion::pipeline::Placement;
use atelier_e2e::*;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// What the engine makes in-process for the request.
fn expected(dir: &Path, req: &FlowRequest) -> Vec<u8> {
    let m = FlowModel::load(dir, Placement::CPU).unwrap();
    let g = m.txt2img(req, |_, _| true).unwrap();
    g[0].image.as_raw().clone()
}

fn flow_req(prompt: &str, seed: u64, (w, h): (usize, usize)) -> FlowRequest {
    FlowRequest {
        prompt: prompt.into(),
        negative_prompt: String::new(),
        steps: 4,
        cfg_scale: 1.0,
        guidance: 3.5,
        width: w,
        height: h,
        seed,
        batch_size: 1,
        max_sequence_length: 32,
        shift: None,
        noise: Default::default(),
        sampler: Default::default(),
    }
}

fn pixels(png: &[u8]) -> (u32, u32, Vec<u8>) {
    let img = image::load_from_memory(png).unwrap().to_rgb8();
    (img.width(), img.height(), img.into_raw())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flux_and_sd35_generate_through_v1_and_a1111() {
    let mut c = Cluster::local().await.unwrap();
    let models = c.tmp.path().join("models");
    let conf = conformance_dir().join("models");
    copy_dir(&conf.join("flux-dev/model"), &models.join("flux-tiny"));
    copy_dir(&conf.join("sd35/model"), &models.join("sd35-tiny"));
    // The peft FLUX LoRA diffusers' loader applied in the conformance case.
    std::fs::create_dir_all(models.join("loras")).unwrap();
    std::fs::copy(
        conf.join("flux-lora-peft/lora.safetensors"),
        models.join("loras/flux-style.safetensors"),
    )
    .unwrap();
    c.spawn_service(
        "atelier-sampler",
        &[("ATELIER_MODELS", models.display().to_string())],
    )
    .unwrap();
    c.models = Some(models.clone());
    let shutdown = CancellationToken::new();
    let base = c
        .gateway(vec![], Default::default(), shutdown.clone())
        .await
        .unwrap();
    let client = c.open_gateway(&shutdown).await;

    // sd-models lists both folders with the transformer weights' hash.
    let listed: Value = reqwest::get(format!("{base}/sdapi/v1/sd-models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let hash_of = |name: &str| {
        listed
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model_name"] == name)
            .unwrap_or_else(|| panic!("{name} not listed: {listed}"))["hash"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let (flux_hash, sd3_hash) = (hash_of("flux-tiny"), hash_of("sd35-tiny"));

    // FLUX through /v1/txt2img: FLUX-dev's guidance, T5 length 32, Euler.
    let mut spec =
        GenerateSpec::txt2img("flux-tiny", "a photograph of an astronaut riding a horse");
    spec.steps = 4;
    spec.width = 32;
    spec.height = 32;
    spec.seed = Some(1234);
    spec.sampler = "Euler".into();
    spec.guidance = Some(3.5);
    spec.max_sequence_length = Some(32);
    let job = client.generate("txt2img", &spec).await.unwrap();
    // Refusals come back as failed jobs with the reason.
    let mut dpm = spec.clone();
    dpm.sampler = "DPM++ 2M".into();
    let dpm = client.generate("txt2img", &dpm).await.unwrap();
    let mut hires = spec.clone();
    hires.hires = Some(serde_json::from_value(json!({"scale": 2.0})).unwrap());
    let hires = client.generate("txt2img", &hires).await.unwrap();
    let mut styled = spec.clone();
    styled.prompt = format!("{} <lora:flux-style:0.8>", spec.prompt);
    let styled = client.generate("txt2img", &styled).await.unwrap();
    let records = c
        .wait_terminal(
            &[job.id, dpm.id, hires.id, styled.id],
            Duration::from_secs(180),
        )
        .await
        .unwrap();
    let by_id = |id| records.iter().find(|r| r.id == id).unwrap();
    let r = by_id(job.id);
    assert_eq!(r.state, JobState::Succeeded, "{:?}", r.error);
    let Some(JobOutput::Images(out)) = &r.output else {
        panic!("{:?}", r.output)
    };
    for want in [
        "Sampler: Euler",
        "Distilled CFG Scale: 3.5",
        "Seed: 1234",
        "Size: 32x32",
        "Model: flux-tiny",
        "Max sequence length: 32",
    ] {
        assert!(out.parameters.contains(want), "{want}: {}", out.parameters);
    }
    assert!(
        out.parameters.contains(&format!("Model hash: {flux_hash}")),
        "{}",
        out.parameters
    );
    let key = atelier_contracts::ArtifactKey::parse(&out.images[0].image.key).unwrap();
    let png = c.store.get_bytes(&key).await.unwrap();
    let (w, h, flux_px) = pixels(&png);
    assert_eq!((w, h), (32, 32));
    let want = expected(
        &models.join("flux-tiny"),
        &flow_req(&spec.prompt, 1234, (32, 32)),
    );
    assert_eq!(
        flux_px, want,
        "the service's FLUX image differs from the engine's"
    );
    // The LoRA at run time: the engine's image with the same file at 0.8, named in the infotext.
    let r = by_id(styled.id);
    assert_eq!(r.state, JobState::Succeeded, "{:?}", r.error);
    let Some(JobOutput::Images(out)) = &r.output else {
        panic!("{:?}", r.output)
    };
    let bytes = std::fs::read(models.join("loras/flux-style.safetensors")).unwrap();
    let (hash, _) = atelier_diffusion::lora::file_hashes(&bytes);
    assert!(
        out.parameters
            .contains(&format!("Lora hashes: \"flux-style: {}\"", &hash[..12])),
        "{}",
        out.parameters
    );
    let key = atelier_contracts::ArtifactKey::parse(&out.images[0].image.key).unwrap();
    let (_, _, styled_px) = pixels(&c.store.get_bytes(&key).await.unwrap());
    let file = atelier_diffusion::lora::LoraFile::from_bytes(&bytes).unwrap();
    let (m, _) = FlowModel::load(&models.join("flux-tiny"), Placement::CPU)
        .unwrap()
        .with_lora(&file, 0.8, atelier_diffusion::lora::LoraMode::Runtime)
        .unwrap();
    let want = m
        .txt2img(&flow_req(&spec.prompt, 1234, (32, 32)), |_, _| true)
        .unwrap();
    assert_eq!(styled_px, want[0].image.as_raw().clone());
    assert_ne!(styled_px, flux_px, "the LoRA changes the image");
    let e = by_id(dpm.id).error.as_ref().unwrap();
    assert_eq!(e.code, "unknown_sampler", "{e:?}");
    assert!(e.message.contains("Euler or Heun (flow matching)"), "{e:?}");
    let e = by_id(hires.id).error.as_ref().unwrap();
    assert!(e.message.contains("hires"), "{e:?}");

    // SD 3.5 through A1111's route: CFG with a negative prompt, 32×48.
    let body = json!({
        "prompt": "A watercolor painting of a lighthouse at dusk", "negative_prompt": "blurry",
        "seed": 77, "steps": 4, "cfg_scale": 5, "width": 32, "height": 48, "sampler_name": "Euler",
        "max_sequence_length": 32, "override_settings": {"sd_model_checkpoint": "sd35-tiny"}
    });
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{base}/sdapi/v1/txt2img"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out: Value = r.json().await.unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(out["images"][0].as_str().unwrap())
        .unwrap();
    let (w, h, px) = pixels(&png);
    assert_eq!((w, h), (32, 48));
    let mut req = flow_req(
        "A watercolor painting of a lighthouse at dusk",
        77,
        (32, 48),
    );
    req.negative_prompt = "blurry".into();
    req.cfg_scale = 5.0;
    assert_eq!(
        px,
        expected(&models.join("sd35-tiny"), &req),
        "the service's SD 3.5 image differs from the engine's"
    );
    let info: Value = serde_json::from_str(out["info"].as_str().unwrap()).unwrap();
    let text = info["infotexts"][0].as_str().unwrap();
    for want in [
        "Negative prompt: blurry",
        "CFG scale: 5",
        "Seed: 77",
        "Size: 32x48",
        "Model: sd35-tiny",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    assert!(text.contains(&format!("Model hash: {sd3_hash}")), "{text}");

    // FLUX through A1111's route with Forge's distilled CFG: another guidance, another image.
    let body = json!({
        "prompt": "a photograph of an astronaut riding a horse", "seed": 1234, "steps": 4,
        "width": 32, "height": 32, "sampler_name": "Euler", "distilled_cfg_scale": 1.5,
        "max_sequence_length": 32, "override_settings": {"sd_model_checkpoint": "flux-tiny"}
    });
    let out: Value = http
        .post(format!("{base}/sdapi/v1/txt2img"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let png = base64::engine::general_purpose::STANDARD
        .decode(out["images"][0].as_str().unwrap())
        .unwrap();
    let mut req = flow_req(
        "a photograph of an astronaut riding a horse",
        1234,
        (32, 32),
    );
    req.guidance = 1.5;
    let (_, _, px2) = pixels(&png);
    assert_eq!(px2, expected(&models.join("flux-tiny"), &req));
    assert_ne!(px2, flux_px, "guidance 1.5 should change the image");
    shutdown.cancel();
}
