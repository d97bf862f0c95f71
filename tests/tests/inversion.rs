//! Textual inversion through A1111's routes, on trainer and sampler processes: `create/embedding`
//! makes an embedding from an initial text (a second create of the name is refused),
//! `/sdapi/v1/embeddings` lists it with its width and step, `train/embedding` trains it on a
//! dataset version and continues it from its step, and txt2img prompts that name it change with
//! the training while prompts that do not stay the same.

use std::time::Duration;

use atelier_contracts::dataset::Tier;
use atelier_diffusion::pipeline::{make_tiny_for_training, Family};
use atelier_e2e::*;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

async fn post(http: &reqwest::Client, url: &str, body: Value) -> (u16, Value) {
    let r = http.post(url).json(&body).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// One txt2img image (base64 PNG) for `prompt` at a fixed seed.
async fn image(http: &reqwest::Client, base: &str, prompt: &str) -> String {
    let (status, body) = post(
        http,
        &format!("{base}/sdapi/v1/txt2img"),
        json!({"prompt": prompt, "steps": 3, "width": 64, "height": 64, "seed": 7,
            "sampler_name": "Euler"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["images"][0].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1111_creates_and_trains_an_embedding_that_the_sampler_uses() {
    let mut c = Cluster::local().await.unwrap();
    let models = c.tmp.path().join("models");
    make_tiny_for_training(&models.join("tiny"), Family::Sd1, 29).unwrap();
    let env = vec![("ATELIER_MODELS", models.display().to_string())];
    c.spawn_service("atelier-trainer", &env).unwrap();
    c.spawn_service("atelier-sampler", &env).unwrap();
    c.models = Some(models.clone());
    write_version(
        &c,
        "scenes",
        1,
        &[
            (1, "a red scene", Tier::Gold, "a"),
            (2, "a blue scene", Tier::Gold, "a"),
            (3, "a green scene", Tier::Silver, "b"),
        ],
    )
    .await;
    let shutdown = CancellationToken::new();
    let base = c
        .gateway(vec![], Default::default(), shutdown.clone())
        .await
        .unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .unwrap();
    let url = |p: &str| format!("{base}/sdapi/v1/{p}");

    let create = json!({"name": "sqtok", "num_vectors_per_token": 2, "init_text": "scene"});
    let (status, body) = post(&http, &url("create/embedding"), create.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["info"],
        "create embedding filename: embeddings/sqtok.safetensors"
    );
    let (status, body) = post(&http, &url("create/embedding"), create.clone()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("exists"),
        "{body}"
    );
    let (status, body) = post(
        &http,
        &url("create/embedding"),
        json!({"name": "a b/c", "num_vectors_per_token": 1}),
    )
    .await;
    assert_eq!(status, 422, "{body}");

    let listed: Value = http
        .get(url("embeddings"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let e = &listed["loaded"]["sqtok"];
    assert_eq!(
        (e["vectors"].as_u64(), e["step"].as_u64()),
        (Some(2), Some(0)),
        "{listed}"
    );
    assert_eq!(e["sd_checkpoint_name"], "tiny");

    let named = "a photo of sqtok";
    let (before, plain_before) = (
        image(&http, &base, named).await,
        image(&http, &base, "a scene").await,
    );

    let train = json!({"embedding_name": "sqtok", "data_root": "scenes@1", "steps": 4,
        "learn_rate": "0.05:2, 0.02", "training_width": 64, "training_height": 64,
        "template_filename": "subject_filewords.txt", "log_directory": "textual_inversion"});
    let (status, body) = post(&http, &url("train/embedding"), train.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["info"],
        "train embedding complete: filename: embeddings/sqtok.safetensors error: None"
    );
    let listed: Value = http
        .get(url("embeddings"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["loaded"]["sqtok"]["step"], 4, "{listed}");
    // Asking again for 4 steps: it is already there.
    let (status, body) = post(&http, &url("train/embedding"), train.clone()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already trained to step 4"),
        "{body}"
    );
    // Continued to step 6.
    let mut more = train.clone();
    more["steps"] = json!(6);
    let (status, body) = post(&http, &url("train/embedding"), more).await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = http
        .get(url("embeddings"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["loaded"]["sqtok"]["step"], 6, "{listed}");

    // The sampler picks up the trained vectors where the prompt names the embedding.
    assert_ne!(
        image(&http, &base, named).await,
        before,
        "training changed nothing"
    );
    assert_eq!(image(&http, &base, "a scene").await, plain_before);

    // What atelier does not take, and data that is not there, are refused by name.
    let mut bad = train.clone();
    bad["steps"] = json!(8);
    bad["data_root"] = json!("no-such-dataset");
    let (status, body) = post(&http, &url("train/embedding"), bad).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no-such-dataset"),
        "{body}"
    );
    let mut bad = train.clone();
    bad["template_filename"] = json!("missing.txt");
    let (status, body) = post(&http, &url("train/embedding"), bad).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("template_filename"),
        "{body}"
    );
    shutdown.cancel();
}
