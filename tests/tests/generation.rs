//! The sampler and inpainter services as processes, driven through the gateway.

use std::collections::HashMap;
use std::time::Duration;

use atelier_contracts::{GenerateSpec, JobOutput, JobState};
use atelier_diffusion::pipeline::{make_tiny, Family};
use atelier_e2e::*;
use tokio_util::sync::CancellationToken;

fn spec(model: &str) -> GenerateSpec {
    GenerateSpec {
        model: model.into(),
        vae: None,
        prompt: "a red circle <lora:style:0.8>".into(),
        negative_prompt: String::new(),
        steps: 4,
        cfg_scale: 5.0,
        seed: Some(3),
        width: 32,
        height: 32,
        batch_size: 1,
        sampler: "Euler a".into(),
        clip_skip: 1,
        randn_source: Default::default(),
        subseed: None,
        subseed_strength: 0.0,
        eta_noise_seed_delta: 0,
        init_image: None,
        strength: 0.6,
        mask: None,
        mask_blur: 0.0,
        mask_invert: false,
        preview_every: 0,
        inpaint_fill: Default::default(),
        inpaint_only_masked: false,
        inpaint_padding: 0,
        hires: None,
        resize_mode: Default::default(),
        guidance: None,
        max_sequence_length: None,
        shift: None,
    }
}

fn write_lora(path: &std::path::Path) {
    let dev = candle_core::Device::Cpu;
    let mut t = HashMap::new();
    let key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    t.insert(
        format!("{key}.lora_down.weight"),
        candle_core::Tensor::ones((4, 32), candle_core::DType::F32, &dev).unwrap(),
    );
    t.insert(
        format!("{key}.lora_up.weight"),
        candle_core::Tensor::ones((32, 4), candle_core::DType::F32, &dev).unwrap(),
    );
    t.insert(
        format!("{key}.alpha"),
        candle_core::Tensor::new(4f32, &dev).unwrap(),
    );
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    candle_core::safetensors::save(&t, path).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_jobs_run_on_the_services_and_bad_input_is_refused() {
    let mut c = Cluster::local().await.unwrap();
    let models = c.tmp.path().join("models");
    make_tiny(&models.join("tiny"), Family::Sd1, 17).unwrap();
    write_lora(&models.join("loras/style.safetensors"));
    for b in ["atelier-sampler", "atelier-inpainter"] {
        c.spawn_service(b, &[("ATELIER_MODELS", models.display().to_string())])
            .unwrap();
    }
    c.models = Some(models.clone());
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;

    // Refused before any model work, with the reason.
    let mut bad = spec("tiny");
    bad.sampler = "Warp drive".into();
    let err = client
        .generate("txt2img", &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown_sampler"), "{err}");
    let mut bad = spec("tiny");
    bad.width = 30;
    let err = client
        .generate("txt2img", &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("multiples of 8"), "{err}");
    let mut bad = spec("tiny");
    bad.steps = 0;
    assert!(client
        .generate("txt2img", &bad)
        .await
        .unwrap_err()
        .to_string()
        .contains("steps"));
    let err = client
        .generate("img2img", &spec("tiny"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("init_image"), "{err}");

    // Accepted jobs: one good, one for a model the registry lacks, one naming an unknown LoRA.
    let good = client.generate("txt2img", &spec("tiny")).await.unwrap();
    let missing = client.generate("txt2img", &spec("nope")).await.unwrap();
    let mut no_lora = spec("tiny");
    no_lora.prompt = "x <lora:absent:1>".into();
    let no_lora = client.generate("txt2img", &no_lora).await.unwrap();
    let records = c
        .wait_terminal(&[good.id, missing.id, no_lora.id], Duration::from_secs(120))
        .await
        .unwrap();
    let by_id = |id| records.iter().find(|r| r.id == id).unwrap();
    let ok = by_id(good.id);
    assert_eq!(ok.state, JobState::Succeeded, "{:?}", ok.error);
    let Some(JobOutput::Images(out)) = &ok.output else {
        panic!("{:?}", ok.output)
    };
    assert_eq!(out.images[0].seed, 3);
    assert!(
        out.parameters.contains("Sampler: Euler a"),
        "{}",
        out.parameters
    );
    // The LoRA of the prompt is named with A1111's short hash of its file.
    let lora_bytes = std::fs::read(models.join("loras/style.safetensors")).unwrap();
    let (lora_hash, _) = atelier_diffusion::lora::file_hashes(&lora_bytes);
    assert!(
        out.parameters
            .contains(&format!("Lora hashes: \"style: {}\"", &lora_hash[..12])),
        "{}",
        out.parameters
    );
    let png = client.download(&out.images[0].image.key).await.unwrap();
    let img = image::load_from_memory(&png).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    let m = by_id(missing.id);
    assert_eq!(m.state, JobState::Failed);
    assert_eq!(m.error.as_ref().unwrap().code, "unknown_model");
    // Named by its folder's role, not by the server's path (which a job's reader may not see).
    let message = &m.error.as_ref().unwrap().message;
    assert!(
        message.contains("<models>") && !message.contains(&models.display().to_string()),
        "{message}"
    );
    assert!(
        m.error.as_ref().unwrap().message.contains("tiny"),
        "the error lists the models there are"
    );
    let l = by_id(no_lora.id);
    assert_eq!(l.state, JobState::Failed);
    assert_eq!(l.error.as_ref().unwrap().code, "unknown_lora");

    // Previews every 2 of 4 steps: the progress events carry a decodable preview image.
    let mut with_previews = spec("tiny");
    with_previews.preview_every = 2;
    with_previews.steps = 4;
    let job = client.generate("txt2img", &with_previews).await.unwrap();
    let done = c
        .wait_terminal(&[job.id], Duration::from_secs(120))
        .await
        .unwrap();
    assert_eq!(done[0].state, JobState::Succeeded, "{:?}", done[0].error);
    let events = c
        .read_stream(
            "ATELIER_EVENTS",
            &atelier_contracts::Service::Sampler.progress_subject(),
        )
        .await
        .unwrap();
    let previews: Vec<String> = events
        .iter()
        .filter_map(|m| serde_json::from_slice::<atelier_contracts::JobProgress>(&m.payload).ok())
        .filter(|p| p.id == job.id)
        .filter_map(|p| p.progress.preview)
        .collect();
    assert_eq!(
        previews.len(),
        1,
        "one preview (step 2; step 4 is the result)"
    );
    let preview = client.download(&previews[0]).await.unwrap();
    let preview = image::load_from_memory(&preview).unwrap();
    assert_eq!((preview.width(), preview.height()), (32, 32));
    let mut bad = spec("tiny");
    bad.preview_every = 99;
    let err = client
        .generate("txt2img", &bad)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("preview_every"), "{err}");

    // img2img and inpaint on the inpainter's queue, from the generated image.
    let mut i2i = spec("tiny");
    i2i.init_image = Some(out.images[0].image.key.clone());
    let job = client.generate("img2img", &i2i).await.unwrap();
    let mut inp = i2i.clone();
    let mask =
        image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x < 16 { 255 } else { 0 }]));
    let mut bytes = Vec::new();
    image::DynamicImage::ImageLuma8(mask)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    inp.mask = Some(
        client
            .upload(bytes.into(), "image/png")
            .await
            .unwrap()
            .artifact
            .key,
    );
    let job2 = client.generate("inpaint", &inp).await.unwrap();
    // A mask that is not an image fails the job with the reason.
    let mut broken = i2i.clone();
    broken.mask = Some(
        client
            .upload(bytes_of(1, 100), "application/octet-stream")
            .await
            .unwrap()
            .artifact
            .key,
    );
    let job3 = client.generate("inpaint", &broken).await.unwrap();
    let records = c
        .wait_terminal(&[job.id, job2.id, job3.id], Duration::from_secs(120))
        .await
        .unwrap();
    for r in &records[..2] {
        assert_eq!(r.state, JobState::Succeeded, "{:?}", r.error);
        assert_eq!(r.service, atelier_contracts::Service::Inpainter);
    }
    assert_eq!(records[2].error.as_ref().unwrap().code, "bad_image");
    shutdown.cancel();
    c.stop_services(libc::SIGTERM, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1111_clients_work_unchanged() {
    use base64::Engine as _;
    let mut c = Cluster::local().await.unwrap();
    let models = c.tmp.path().join("models");
    make_tiny(&models.join("tiny"), Family::Sd1, 19).unwrap();
    for b in ["atelier-sampler", "atelier-inpainter"] {
        c.spawn_service(b, &[("ATELIER_MODELS", models.display().to_string())])
            .unwrap();
    }
    c.models = Some(models.clone());
    let shutdown = CancellationToken::new();
    let (key, entry) = atelier_gateway::auth::generate_key("a1111", "*").unwrap();
    let base = c
        .gateway(vec![entry], Default::default(), shutdown.clone())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{base}{path}")).bearer_auth(&key).send();

    let samplers: serde_json::Value = get("/sdapi/v1/samplers")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = samplers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    for n in ["Euler a", "DPM++ 2M Karras", "DDIM", "UniPC", "LCM"] {
        assert!(names.contains(&n), "{n} missing from {names:?}");
    }
    let models_list: serde_json::Value = get("/sdapi/v1/sd-models")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(models_list[0]["model_name"], "tiny");
    // A1111's short hash: the first 10 hex digits of the sha256, in the title's brackets.
    let sha = models_list[0]["sha256"].as_str().unwrap().to_string();
    assert_eq!(sha.len(), 64);
    let short = models_list[0]["hash"].as_str().unwrap().to_string();
    assert_eq!(short, sha[..10]);
    assert_eq!(models_list[0]["title"], format!("tiny [{short}]"));
    let opts: serde_json::Value = get("/sdapi/v1/options")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(opts["sd_model_checkpoint"], "tiny");
    let r = http
        .post(format!("{base}/sdapi/v1/options"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"sd_model_checkpoint": "missing [abc]"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let r = http
        .post(format!("{base}/sdapi/v1/options"))
        .bearer_auth(&key)
        .json(
            &serde_json::json!({"sd_model_checkpoint": "tiny [0123456789]", "samples_save": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // txt2img with two batches (run in parallel), HTTP Basic with the key as password.
    let body = serde_json::json!({
        "prompt": "a (red:1.2) circle", "negative_prompt": "", "seed": 100, "steps": 3,
        "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 5, "width": 32, "height": 32,
        "batch_size": 1, "n_iter": 2, "restore_faces": false, "send_images": true
    });
    let r = http
        .post(format!("{base}/sdapi/v1/txt2img"))
        .basic_auth("me", Some(&key))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let out: serde_json::Value = r.json().await.unwrap();
    let images = out["images"].as_array().unwrap();
    assert_eq!(images.len(), 2);
    let png = base64::engine::general_purpose::STANDARD
        .decode(images[0].as_str().unwrap())
        .unwrap();
    assert_eq!(image::load_from_memory(&png).unwrap().width(), 32);
    let info: serde_json::Value = serde_json::from_str(out["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["all_seeds"], serde_json::json!([100, 101]));
    assert_eq!(info["sampler_name"], "DPM++ 2M Karras");
    assert!(info["infotexts"][1].as_str().unwrap().contains("Seed: 101"));
    // The infotext's Model hash is the one sd-models lists.
    let infotext = info["infotexts"][0].as_str().unwrap();
    assert!(
        infotext.contains(&format!("Model hash: {short}")),
        "{infotext}"
    );
    assert_eq!(out["parameters"]["prompt"], "a (red:1.2) circle");

    // img2img with a mask; bad base64 and a mask of the wrong size are refused.
    let mask =
        image::GrayImage::from_fn(32, 32, |x, _| image::Luma([if x < 16 { 255 } else { 0 }]));
    let mut mask_png = Vec::new();
    image::DynamicImage::ImageLuma8(mask)
        .write_to(
            &mut std::io::Cursor::new(&mut mask_png),
            image::ImageFormat::Png,
        )
        .unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let mut i2i = body.clone();
    i2i["init_images"] = serde_json::json!([format!("data:image/png;base64,{}", b64(&png))]);
    i2i["mask"] = serde_json::json!(b64(&mask_png));
    i2i["denoising_strength"] = serde_json::json!(0.9);
    i2i["n_iter"] = serde_json::json!(1);
    let r = http
        .post(format!("{base}/sdapi/v1/img2img"))
        .bearer_auth(&key)
        .json(&i2i)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let mut bad = i2i.clone();
    bad["init_images"] = serde_json::json!(["!!!not base64"]);
    let r = http
        .post(format!("{base}/sdapi/v1/img2img"))
        .bearer_auth(&key)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("malformed_base64"));
    // A PNG whose header claims 100,000 × 100,000 pixels is refused from its header (413, the
    // limit named); the gateway decodes no pixel.
    bad["init_images"] = serde_json::json!([b64(&claimed_size(&png, 100_000, 100_000))]);
    let r = http
        .post(format!("{base}/sdapi/v1/img2img"))
        .bearer_auth(&key)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("decompression_bomb") && text.contains("178956970"),
        "{text}"
    );
    let small = image::GrayImage::new(8, 8);
    let mut small_png = Vec::new();
    image::DynamicImage::ImageLuma8(small)
        .write_to(
            &mut std::io::Cursor::new(&mut small_png),
            image::ImageFormat::Png,
        )
        .unwrap();
    let mut bad = i2i.clone();
    bad["mask"] = serde_json::json!(b64(&small_png));
    let r = http
        .post(format!("{base}/sdapi/v1/img2img"))
        .bearer_auth(&key)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert!(r.text().await.unwrap().contains("mask_size_mismatch"));
    let mut bad = body.clone();
    bad["steps"] = serde_json::json!(0);
    let r = http
        .post(format!("{base}/sdapi/v1/txt2img"))
        .bearer_auth(&key)
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    let p: serde_json::Value = get("/sdapi/v1/progress")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p["state"]["job_count"], 0);
    let r = http
        .post(format!("{base}/sdapi/v1/interrupt"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("{base}/sdapi/v1/samplers"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the A1111 routes need the key too");
    shutdown.cancel();
    c.stop_services(libc::SIGTERM, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compatible_txt2img_jobs_share_a_batch() {
    let mut c = Cluster::local().await.unwrap();
    let models = c.tmp.path().join("models");
    make_tiny(&models.join("tiny"), Family::Sd1, 23).unwrap();
    write_lora(&models.join("loras/style.safetensors"));
    c.spawn_service(
        "atelier-sampler",
        &[
            ("ATELIER_MODELS", models.display().to_string()),
            ("ATELIER_BATCH_WINDOW_MS", "1500".into()),
            ("ATELIER_MAX_BATCH", "3".into()),
        ],
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    // Four compatible jobs (other prompts, seeds, batch sizes) and one with other steps.
    let mut ids = Vec::new();
    for (i, prompt) in [
        "a red circle <lora:style:0.8>",
        "a (blue:1.2) square <lora:style:0.8>",
        "[a:b:0.5] star <lora:style:0.8>",
        "a moon <lora:style:0.8>",
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = spec("tiny");
        s.prompt = prompt.into();
        s.seed = Some(10 + i as u64);
        s.batch_size = 1 + (i as u32 % 2);
        ids.push(client.generate("txt2img", &s).await.unwrap().id);
    }
    let mut other = spec("tiny");
    other.steps = 3;
    ids.push(client.generate("txt2img", &other).await.unwrap().id);
    let records = c
        .wait_terminal(&ids, Duration::from_secs(120))
        .await
        .unwrap();
    let outputs: Vec<_> = ids
        .iter()
        .map(|id| {
            let r = records.iter().find(|r| r.id == *id).unwrap();
            assert_eq!(r.state, JobState::Succeeded, "{:?}", r.error);
            match r.output.clone() {
                Some(JobOutput::Images(o)) => o,
                other => panic!("{other:?}"),
            }
        })
        .collect();
    let shared: Vec<Option<u32>> = outputs.iter().map(|o| o.batch_jobs).collect();
    // The first three fill a batch (max 3); the fourth opens the next; other steps run apart.
    assert_eq!(
        shared.iter().filter(|n| **n == Some(3)).count(),
        3,
        "{shared:?}"
    );
    assert_eq!(shared[4], None, "{shared:?}");
    for (o, i) in outputs.iter().zip(0..4u64) {
        assert_eq!(o.images.len(), 1 + (i as usize % 2));
        assert_eq!(o.images[0].seed, 10 + i);
        assert!(
            o.parameters.contains(&format!("Seed: {}", 10 + i)),
            "{}",
            o.parameters
        );
        assert!(o.parameters.contains("Lora hashes"), "{}", o.parameters);
    }
    // A batched job's image is its solo run's (to float rounding): run job 1 again, alone.
    let mut again = spec("tiny");
    again.prompt = "a (blue:1.2) square <lora:style:0.8>".into();
    again.seed = Some(11);
    again.batch_size = 2;
    let solo = client.generate("txt2img", &again).await.unwrap();
    let r = c
        .wait_terminal(&[solo.id], Duration::from_secs(60))
        .await
        .unwrap()
        .remove(0);
    let Some(JobOutput::Images(solo)) = r.output else {
        panic!("{:?}", r.error)
    };
    assert_eq!(solo.batch_jobs, None);
    for (a, b) in outputs[1].images.iter().zip(&solo.images) {
        let pa = image::load_from_memory(&client.download(&a.image.key).await.unwrap())
            .unwrap()
            .to_rgb8();
        let pb = image::load_from_memory(&client.download(&b.image.key).await.unwrap())
            .unwrap()
            .to_rgb8();
        assert!(pa
            .pixels()
            .zip(pb.pixels())
            .all(|(p, q)| (0..3).all(|k| (p.0[k] as i32 - q.0[k] as i32).abs() <= 2)));
    }
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_published_to_the_store_are_used_by_name() {
    let mut c = Cluster::local().await.unwrap();
    let models = c.tmp.path().join("models");
    make_tiny(&models.join("tiny"), Family::Sd1, 29).unwrap();
    c.spawn_service(
        "atelier-sampler",
        &[("ATELIER_MODELS", models.display().to_string())],
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let mut s = spec("tiny");
    s.prompt = "a circle, glowstyle".into();
    let run = |s: GenerateSpec| {
        let (client, c) = (&client, &c);
        async move {
            let id = client.generate("txt2img", &s).await.unwrap().id;
            let r = c
                .wait_terminal(&[id], Duration::from_secs(60))
                .await
                .unwrap()
                .remove(0);
            match r.output {
                Some(JobOutput::Images(o)) => o.images[0].image.key.clone(),
                _ => panic!("{:?}", r.error),
            }
        }
    };
    let plain = run(s.clone()).await;
    // A1111's layout for the tiny 32-wide text encoder, published where a trainer would.
    let v = atelier_diffusion::noise::SeededNoise::new(4)
        .randn((2, 32), &candle_core::Device::Cpu)
        .unwrap();
    let file = c.tmp.path().join("glowstyle.safetensors");
    candle_core::safetensors::save(&HashMap::from([("emb_params".to_string(), v)]), &file).unwrap();
    c.store
        .put_at(
            &atelier_contracts::ArtifactKey::parse("embeddings/glowstyle.safetensors").unwrap(),
            std::fs::read(&file).unwrap().into(),
            "application/octet-stream",
        )
        .await
        .unwrap();
    let styled = run(s.clone()).await;
    assert_ne!(
        plain, styled,
        "the store's embedding replaces the word's tokens"
    );
    assert_eq!(run(s.clone()).await, styled, "and does so every time");
    shutdown.cancel();
}

/// Every file under `dir`, relative to it, with `/` separators.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap();
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_published_to_the_store_are_fetched_and_listed() {
    let mut c = Cluster::local().await.unwrap();
    // The same tiny model three ways: a local diffusers folder (the reference), a diffusers
    // folder under models/shelf/ and a single file models/solo.safetensors (with the CLIP
    // tokenizer beside it in models/tokenizer/) in the object store.
    let models = c.tmp.path().join("models");
    make_tiny(&models.join("local"), Family::Sd1, 31).unwrap();
    let single = c.tmp.path().join("single");
    std::fs::create_dir_all(&single).unwrap();
    atelier_diffusion::pipeline::write_single_file(
        &models.join("local"),
        &single.join("solo.safetensors"),
    )
    .unwrap();
    let store = c.store.clone();
    let put = |key: String, path: std::path::PathBuf| {
        let store = store.clone();
        async move {
            store
                .put_at(
                    &atelier_contracts::ArtifactKey::parse(&key).unwrap(),
                    std::fs::read(path).unwrap().into(),
                    "application/octet-stream",
                )
                .await
                .unwrap()
        }
    };
    for rel in files_under(&models.join("local")) {
        put(
            format!("models/shelf/{rel}"),
            models.join("local").join(&rel),
        )
        .await;
    }
    // With the sidecar a single file may carry (SD 2.x v-prediction files name it there).
    std::fs::write(
        single.join("solo.json"),
        r#"{"prediction_type": "epsilon"}"#,
    )
    .unwrap();
    for rel in files_under(&single) {
        put(format!("models/{rel}"), single.join(&rel)).await;
    }
    let cache = c.tmp.path().join("model-cache");
    c.spawn_service(
        "atelier-sampler",
        &[
            ("ATELIER_MODELS", models.display().to_string()),
            ("ATELIER_STORE_MODELS_DIR", cache.display().to_string()),
        ],
    )
    .unwrap();
    c.models = Some(models.clone());
    let shutdown = CancellationToken::new();
    let (key, entry) = atelier_gateway::auth::generate_key("models", "*").unwrap();
    let base = c
        .gateway(vec![entry], Default::default(), shutdown.clone())
        .await
        .unwrap();
    let client = atelier_client::Client::new(&base, Some(key.clone())).unwrap();
    let run = |model: &str| {
        let (client, c) = (&client, &c);
        let mut s = spec(model);
        s.prompt = "a red circle".into();
        async move {
            let id = client.generate("txt2img", &s).await.unwrap().id;
            c.wait_terminal(&[id], Duration::from_secs(120))
                .await
                .unwrap()
                .remove(0)
        }
    };
    let pixels = |r: &atelier_contracts::JobRecord| {
        let c = &c;
        let key = match &r.output {
            Some(JobOutput::Images(o)) => o.images[0].image.key.clone(),
            _ => panic!("{:?}", r.error),
        };
        async move {
            let png = c
                .store
                .get_bytes(&atelier_contracts::ArtifactKey::parse(&key).unwrap())
                .await
                .unwrap();
            image::load_from_memory(&png).unwrap().to_rgb8().into_raw()
        }
    };
    let reference = pixels(&run("local").await).await;
    let shelf = run("shelf").await;
    assert_eq!(shelf.state, JobState::Succeeded, "{:?}", shelf.error);
    assert_eq!(
        pixels(&shelf).await,
        reference,
        "the store's folder is the same model"
    );
    let solo = run("solo").await;
    assert_eq!(solo.state, JobState::Succeeded, "{:?}", solo.error);
    assert_eq!(
        pixels(&solo).await,
        reference,
        "the single file is the same model"
    );
    // Copied once, under a folder named by the objects' sizes and e-tags.
    let copies: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(copies.len(), 2, "{copies:?}");
    assert!(
        copies.iter().any(|n| n.starts_with("shelf-"))
            && copies.iter().any(|n| n.starts_with("solo-"))
    );
    let solo_copy = copies.iter().find(|n| n.starts_with("solo-")).unwrap();
    assert!(
        cache.join(solo_copy).join("solo.json").is_file(),
        "the sidecar is copied beside the file"
    );
    assert_eq!(run("shelf").await.state, JobState::Succeeded);
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2);

    // Re-published under the same name (other weights): fetched again, the old copy removed.
    let other = c.tmp.path().join("other");
    make_tiny(&other, Family::Sd1, 32).unwrap();
    for rel in files_under(&other) {
        put(format!("models/shelf/{rel}"), other.join(&rel)).await;
    }
    let republished = run("shelf").await;
    assert_eq!(
        republished.state,
        JobState::Succeeded,
        "{:?}",
        republished.error
    );
    assert_ne!(
        pixels(&republished).await,
        reference,
        "the new weights are used"
    );
    let after: Vec<String> = std::fs::read_dir(&cache)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.iter().any(|n| n.starts_with("solo-")));
    let old_shelf = copies.iter().find(|n| n.starts_with("shelf-")).unwrap();
    assert!(!after.contains(old_shelf), "{after:?}");

    // Neither local nor in the store: the job fails saying where it looked.
    let missing = run("nowhere").await;
    let e = missing.error.unwrap();
    assert_eq!(e.code, "unknown_model");
    assert!(
        e.message.contains("nowhere") && e.message.contains("object store"),
        "{}",
        e.message
    );

    // A1111's model list has the local and the store's checkpoints; the store's can be chosen.
    let http = reqwest::Client::new();
    let listed: serde_json::Value = http
        .get(format!("{base}/sdapi/v1/sd-models"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["model_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["local", "shelf", "solo"]);

    // `atelier models list`: the local folder with what each entry is, then the store's (whose
    // LoRA and embedding are read from the store too).
    let extras = c.tmp.path().join("extras");
    std::fs::create_dir_all(&extras).unwrap();
    let zeros = |shape: &[usize]| {
        candle_core::Tensor::zeros(shape, candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap()
    };
    let k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
    let lora: std::collections::BTreeMap<String, candle_core::Tensor> = [
        (format!("{k}.lora_down.weight"), zeros(&[4, 768])),
        (format!("{k}.lora_up.weight"), zeros(&[320, 4])),
    ]
    .into_iter()
    .collect();
    atelier_diffusion::models::load::save(&lora, &extras.join("ink.safetensors")).unwrap();
    let emb: std::collections::BTreeMap<String, candle_core::Tensor> =
        [("emb_params".to_string(), zeros(&[2, 768]))]
            .into_iter()
            .collect();
    atelier_diffusion::models::load::save(&emb, &extras.join("style.safetensors")).unwrap();
    put(
        "loras/ink.safetensors".into(),
        extras.join("ink.safetensors"),
    )
    .await;
    put(
        "embeddings/style.safetensors".into(),
        extras.join("style.safetensors"),
    )
    .await;
    let out = std::process::Command::new(atelier_e2e::bin("atelier"))
        .args(["models", "list", "--models"])
        .arg(&models)
        .args(["--store", &c.store_args.store])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["name"].as_str().unwrap(),
                l["kind"].as_str().unwrap(),
                l["source"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("local", "diffusers_folder", "local"),
            ("ink", "lora", "store"),
            ("shelf", "diffusers_folder", "store"),
            ("solo", "single_file", "store"),
            ("style", "embedding", "store"),
        ]
    );
    for l in [&lines[0], &lines[2], &lines[3]] {
        assert_eq!(l["detected"]["family"], "sd1", "{l}");
        assert_eq!(l["detected"]["inpainting"], false, "{l}");
        assert_eq!(l["detected"]["prediction"], "epsilon", "{l}");
    }
    assert_eq!(
        lines[1]["detected"],
        serde_json::json!({"format": "kohya", "rank": 4, "unet_layers": 1, "text_layers": 0, "base": "sd1"})
    );
    assert_eq!(
        lines[4]["detected"],
        serde_json::json!({"vectors": 2, "dims": [768], "base": "sd1"})
    );

    for (model, status) in [("solo", 200), ("nowhere", 422)] {
        let r = http
            .post(format!("{base}/sdapi/v1/options"))
            .bearer_auth(&key)
            .json(&serde_json::json!({ "sd_model_checkpoint": model }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{model}");
    }
    shutdown.cancel();
    c.stop_services(libc::SIGTERM, Duration::from_secs(10));
}

/// `png` with its IHDR rewritten to claim `w`×`h` (CRC fixed; the pixel data is unchanged).
fn claimed_size(png: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut out = png.to_vec();
    // Signature (8), length (4), "IHDR" (4), then width and height.
    assert_eq!(&out[12..16], b"IHDR");
    out[16..20].copy_from_slice(&w.to_be_bytes());
    out[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32fast::hash(&out[12..29]);
    out[29..33].copy_from_slice(&crc.to_be_bytes());
    out
}
