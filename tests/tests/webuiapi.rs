//! A1111's API as its users' scripts call it: `tests/python/webuiapi_drive.py` drives every
//! `webuiapi` method atelier answers (catalogue routes, options, progress, txt2img, img2img,
//! inpainting, png-info, interrupt) against a gateway with a tiny SD 1.x model, a LoRA and an
//! embedding in its model folder, and checks each answer against A1111's schema.

use std::time::Duration;

use atelier_diffusion::pipeline::{make_tiny, Family};
use atelier_e2e::*;
use tokio_util::sync::CancellationToken;

/// A safetensors file of one zero tensor `name` of `shape`, with `metadata`.
fn safetensors(path: &std::path::Path, name: &str, shape: [usize; 2], metadata: serde_json::Value) {
    let bytes = shape[0] * shape[1] * 4;
    let header = serde_json::json!({
        "__metadata__": metadata,
        name: {"dtype": "F32", "shape": shape, "data_offsets": [0, bytes]},
    })
    .to_string();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.resize(out.len() + bytes, 0);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_webuiapi_method_gets_a1111s_answer() {
    let mut c = Cluster::local().await.unwrap();
    let models = c.tmp.path().join("models");
    make_tiny(&models.join("tiny"), Family::Sd1, 19).unwrap();
    safetensors(
        &models.join("loras/style.safetensors"),
        "lora_unet_down.lora_down.weight",
        [4, 8],
        serde_json::json!({"ss_network_dim": "4", "ss_output_name": "style"}),
    );
    safetensors(
        &models.join("embeddings/tok.safetensors"),
        "emb_params",
        [2, 32],
        serde_json::json!({}),
    );
    // A BLIP model for interrogate, served by the captioner from the same folder.
    atelier_captioner::blip::make_tiny(&models.join("blip/tiny-blip"), 5).unwrap();
    let env = [
        ("ATELIER_MODELS", models.display().to_string()),
        (
            "ATELIER_BLIP_MODELS",
            models.join("blip").display().to_string(),
        ),
    ];
    for b in [
        "atelier-sampler",
        "atelier-inpainter",
        "atelier-augmenter",
        "atelier-captioner",
    ] {
        c.spawn_service(b, &env).unwrap();
    }
    c.models = Some(models.clone());
    let shutdown = CancellationToken::new();
    let (key, entry) = atelier_gateway::auth::generate_key("webuiapi", "*").unwrap();
    let base = c
        .gateway(vec![entry], Default::default(), shutdown.clone())
        .await
        .unwrap();
    let url = reqwest::Url::parse(&base).unwrap();
    let script = repo_root().join("tests/python/webuiapi_drive.py");
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(tool("python"))
            .arg(&script)
            .arg(url.host_str().unwrap())
            .arg(url.port().unwrap().to_string())
            .arg(&key)
            .output(),
    )
    .await
    .expect("webuiapi_drive.py took over 5 minutes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "webuiapi_drive.py failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("webuiapi: checked"), "{stdout}");
    shutdown.cancel();
    c.stop_services(libc::SIGTERM, Duration::from_secs(10));
}
