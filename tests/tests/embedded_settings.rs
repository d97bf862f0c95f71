//! `atelier up` honours a service's own settings: they reach the service through the same
//! `serve` function its binary calls (cli/src/embedded.rs `spawn_services`), and take effect.

use std::time::Duration;

use atelier_cli::embedded::{Embedded, UpArgs};
use atelier_client::Client;
use atelier_e2e::*;
use clap::Parser as _;

#[derive(clap::Parser)]
struct Up {
    #[command(flatten)]
    up: UpArgs,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_applies_the_ingest_limit_and_the_model_registry_it_is_given() {
    std::env::set_var("ATELIER_NATS_SERVER", tool("nats-server"));
    let tmp = tempfile::tempdir().unwrap();
    let registry = tmp.path().join("elsewhere");
    atelier_diffusion::pipeline::make_tiny(
        &registry.join("my-model"),
        atelier_diffusion::pipeline::Family::Sd1,
        1,
    )
    .unwrap();
    let data = tmp.path().join("data").display().to_string();
    let argv = [
        "up",
        "--insecure-no-auth",
        "--addr",
        "127.0.0.1:0",
        "--nats-port",
        "0",
        "--data-dir",
        &data,
        // Non-default settings of two services: ingest's bomb guard and the sampler's registry.
        "--max-image-pixels",
        "1000",
        "--models",
        &registry.display().to_string(),
    ];
    let mut up = Up::try_parse_from(argv).unwrap().up;
    up.nats.nats_url = None;
    up.store = Default::default();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let embedded = Embedded::start(up, shutdown.clone()).await.unwrap();
    let base = format!("http://{}", embedded.addr);

    // 40×40 = 1,600 pixels is over --max-image-pixels 1000; 20×20 is under.
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    for (name, side) in [("big.png", 40u32), ("small.png", 20)] {
        let bytes = atelier_ingest::samples::scene_bytes(
            u64::from(side),
            side,
            side,
            image::ImageFormat::Png,
        );
        std::fs::write(images.join(name), bytes).unwrap();
    }
    let client = Client::new(&base, None).unwrap();
    let report = atelier_cli::ingest::ingest_dir(
        &client,
        &images,
        "settings",
        None,
        Duration::from_secs(60),
        false,
    )
    .await
    .unwrap();
    assert_eq!(report.recorded, 2, "{report:?}");
    let flagged: Vec<&str> = report.flagged.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        flagged.len(),
        1,
        "only the big image is over the limit: {report:?}"
    );
    assert!(flagged[0].ends_with("big.png"), "{report:?}");
    assert!(
        report.flagged[0].1.contains("1000"),
        "the reason names the limit: {report:?}"
    );

    // The registry the sampler and the A1111 routes read is the one given, not <data-dir>/models.
    let models: serde_json::Value = reqwest::get(format!("{base}/sdapi/v1/sd-models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = models
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["model_name"].as_str())
        .collect();
    assert_eq!(names, ["my-model"], "{models}");

    shutdown.cancel();
    embedded.wait().await.unwrap();
}
