//! A1111's API as its users' scripts call it: `tests/python/webuiapi_drive.py` drives every
//! `webuiapi` method (catalogue routes, options, progress, txt2img, img2img, inpainting,
//! png-info, interrupt, extras with built-in upscalers and an ESRGAN model, interrogate) against
//! `atelier up` — with an API key, which webuiapi sends as HTTP Basic — whose model folder holds
//! a tiny SD 1.x model, a LoRA, an embedding, a VAE, an upscaler model and a tiny BLIP, and
//! checks each answer against A1111's schema.

use std::time::Duration;

use atelier_diffusion::pipeline::{make_tiny, Family};
use atelier_e2e::*;
use atelier_kit::nats_server::free_port;

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

/// A random 4x RRDBNet (one block, 4 features) as a `.safetensors` file in BasicSR's names,
/// its output centred in [0, 1].
fn tiny_esrgan(path: &std::path::Path) {
    use candle_core::{Device, Tensor};
    let (nf, gc) = (4usize, 2usize);
    let mut t = std::collections::HashMap::new();
    let mut add = |name: String, cin: usize, cout: usize, bias: f64| {
        let w = Tensor::randn(0f32, 1.0, (cout, cin, 3, 3), &Device::Cpu)
            .and_then(|w| w.affine(0.1, 0.0))
            .unwrap();
        let b = Tensor::randn(0f32, 1.0, cout, &Device::Cpu)
            .and_then(|b| b.affine(0.05, bias))
            .unwrap();
        t.insert(format!("{name}.weight"), w);
        t.insert(format!("{name}.bias"), b);
    };
    add("conv_first".into(), 3, nf, 0.0);
    for k in 1..=3 {
        for j in 1..=5 {
            let cout = if j < 5 { gc } else { nf };
            add(
                format!("body.0.rdb{k}.conv{j}"),
                nf + (j - 1) * gc,
                cout,
                0.0,
            );
        }
    }
    for name in ["conv_body", "conv_up1", "conv_up2", "conv_hr"] {
        add(name.into(), nf, nf, 0.0);
    }
    add("conv_last".into(), nf, 3, 0.5);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    candle_core::safetensors::save(&t, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_webuiapi_method_gets_a1111s_answer_from_atelier_up() {
    let tmp = tempfile::Builder::new()
        .prefix("atelier-webuiapi-")
        .tempdir()
        .unwrap();
    let data = tmp.path().join("data");
    let models = data.join("models");
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
    // A separate VAE (`sd_vae`): the tiny model's own with its decoder's output bias moved.
    let vae = models.join("tiny/vae/diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&vae, &candle_core::Device::Cpu).unwrap();
    let bias = tensors["decoder.conv_out.bias"].affine(1.0, 0.4).unwrap();
    tensors.insert("decoder.conv_out.bias".into(), bias);
    std::fs::create_dir_all(models.join("vae")).unwrap();
    candle_core::safetensors::save(&tensors, models.join("vae/warm.safetensors")).unwrap();
    // An upscaler model: a tiny random 4x RRDBNet in BasicSR's names.
    tiny_esrgan(&models.join("ESRGAN/tiny-4x.safetensors"));
    // A BLIP model for interrogate: `atelier up` serves <data>/models/blip to its captioner.
    atelier_captioner::blip::make_tiny(&models.join("blip/tiny-blip"), 5).unwrap();
    let (key, entry) = atelier_gateway::auth::generate_key("webuiapi", "*").unwrap();
    let (port, nats_port) = (free_port().unwrap(), free_port().unwrap());
    let mut up = atelier_up_keyed(
        &data,
        port,
        nats_port,
        &tmp.path().join("up.log"),
        Some(&entry),
    )
    .spawn()
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
    let script = repo_root().join("tests/python/webuiapi_drive.py");
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(tool("python"))
            .arg(&script)
            .arg("127.0.0.1")
            .arg(port.to_string())
            .arg(&key)
            .output(),
    )
    .await
    .expect("webuiapi_drive.py took over 5 minutes")
    .unwrap();
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    let _ = up.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    let up_log = std::fs::read_to_string(tmp.path().join("up.log")).unwrap_or_default();
    let tail: String = up_log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
    assert!(
        out.status.success(),
        "webuiapi_drive.py failed:\n{stdout}\n{stderr}\natelier up's log (last lines, newest first):\n{tail}"
    );
    assert!(stdout.contains("webuiapi: checked"), "{stdout}");
}
