//! The dataset pipeline end to end on the embedded default, through NATS and the store:
//! `cargo bench -p atelier-e2e --bench dataset_pipeline` (ATELIER_BENCH_IMAGES, default 2,000).
//!
//! Stages, timed separately and together: ingest (HTTP upload + announce, until the ingest
//! service has recorded every image), caption (the `openai` backend against the loopback vision
//! server with zero added latency, 8 requests in flight), filter (checks, policy and the dataset
//! version written to the store, with NudeNet's NSFW detector on every image unless
//! `ATELIER_NO_NSFW=1`). Prints images/s per stage and end to end; then times a second filter job
//! with another policy, which reuses the first job's model verdicts, and `atelier ingest` again on
//! the same folder.

use std::time::{Duration, Instant};

use atelier_cli::embedded::{Embedded, ServiceConfigs, UpArgs};
use atelier_client::Client;
use atelier_contracts::dataset::{CaptionBackend, CaptionSpec, FilterSpec};
use atelier_contracts::{JobOutput, JobSpec, JobState};
use atelier_kit::config::{NatsArgs, StoreArgs, TelemetryArgs, WorkerArgs};
use tokio_util::sync::CancellationToken;

async fn run(client: &Client, spec: &JobSpec) -> JobOutput {
    let rec = client.submit(spec).await.expect("submitted");
    let done = client
        .follow(&rec.id.to_string(), |_| {})
        .await
        .expect("followed");
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    done.output.expect("output")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: u64 = std::env::var("ATELIER_BENCH_IMAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let tmp = tempfile::tempdir().expect("tmp");
    let images = tmp.path().join("images");
    std::fs::create_dir_all(&images).expect("mkdir");
    for seed in 0..n {
        let (w, h) = (64 + (seed % 29) as u32, 48 + (seed % 31) as u32);
        std::fs::write(
            images.join(format!("{seed:06}.png")),
            atelier_ingest::samples::scene_bytes(seed, w, h, image::ImageFormat::Png),
        )
        .expect("write");
    }
    let (key, entry) = atelier_gateway::auth::generate_key("bench", "*").expect("key");
    let worker = WorkerArgs {
        concurrency: 4,
        ..Default::default()
    };
    let up = UpArgs {
        data_dir: tmp.path().join("atelier"),
        nats_port: 0,
        gateway: atelier_gateway::GatewayArgs {
            addr: "127.0.0.1:0".parse().expect("addr"),
            api_keys: vec![entry],
            // Bulk ingest through the CLI: one operator's key, limits raised (--rate-limit).
            rate_limit: 100_000.0,
            rate_burst: 100_000.0,
            ..Default::default()
        },
        nats: NatsArgs::default(),
        store: StoreArgs::default(),
        telemetry: TelemetryArgs {
            log_format: Default::default(),
            log: "error".into(),
            health_addr: "127.0.0.1:0".parse().expect("addr"),
        },
        worker,
        services: ServiceConfigs {
            generation: atelier_sampler::Config {
                model: atelier_registry::ModelArgs {
                    models: tmp.path().join("models"),
                    device: "cpu".into(),
                },
                model_cache: 1,
                batch_window_ms: 0,
                ..Default::default()
            },
            captioner: atelier_captioner::Config {
                openai: atelier_captioner::OpenAiArgs {
                    requests_per_minute: 0,
                    tokens_per_minute: 0,
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        },
        scene_captioner: true,
        drain_secs: 8.0,
    };
    let shutdown = CancellationToken::new();
    let embedded = Embedded::start(up, shutdown.clone()).await.expect("up");
    let client = Client::new(&format!("http://{}", embedded.addr), Some(key)).expect("client");

    let t0 = Instant::now();
    let report = atelier_cli::ingest::ingest_dir(
        &client,
        &images,
        "bench",
        None,
        Duration::from_secs(600),
        false,
    )
    .await
    .expect("ingest");
    let t_ingest = t0.elapsed();
    assert!(report.pending.is_empty());
    let unique = report.images as f64;

    let t1 = Instant::now();
    let JobOutput::Captions(c) = run(
        &client,
        &JobSpec::Caption(CaptionSpec {
            dataset: "bench".into(),
            images: vec![],
            backend: CaptionBackend::default(),
            ..Default::default()
        }),
    )
    .await
    else {
        panic!("not captions")
    };
    let t_caption = t1.elapsed();
    assert!(c.failed.is_empty());

    let t2 = Instant::now();
    let JobOutput::DatasetVersion(v) = run(
        &client,
        &JobSpec::Filter(FilterSpec {
            dataset: "bench".into(),
            caption_source: None,
            policy: Default::default(),
            split: Default::default(),
            note: None,
        }),
    )
    .await
    else {
        panic!("not a version")
    };
    let t_filter = t2.elapsed();
    let total = t0.elapsed();

    // Filtering again with another policy, as users do: the models' verdicts are kept from the
    // first filter job, so this one runs only the checks.
    let t3 = Instant::now();
    let mut policy = atelier_contracts::QualityPolicy::default();
    policy.min_words += 2;
    let JobOutput::DatasetVersion(v2) = run(
        &client,
        &JobSpec::Filter(FilterSpec {
            dataset: "bench".into(),
            caption_source: None,
            policy,
            split: Default::default(),
            note: None,
        }),
    )
    .await
    else {
        panic!("not a version")
    };
    let t_refilter = t3.elapsed();

    // `atelier ingest` again on the same folder: every file hashed and looked up, none sent.
    let t4 = Instant::now();
    let again = atelier_cli::ingest::ingest_dir(
        &client,
        &images,
        "bench",
        None,
        Duration::from_secs(600),
        false,
    )
    .await
    .expect("ingest");
    let t_reingest = t4.elapsed();
    assert_eq!((again.uploaded, again.already_recorded), (0, report.files));
    shutdown.cancel();
    let _ = embedded.wait().await;

    let nsfw = if std::env::var("ATELIER_NO_NSFW").is_ok_and(|v| v == "1" || v == "true") {
        "without"
    } else {
        "with"
    };
    println!(
        "dataset pipeline, embedded default (local store), {} files → {} images, {} captioned, filter {nsfw} the NSFW detector:",
        report.files, report.images, c.captioned
    );
    for (stage, t) in [
        ("ingest (upload + announce + recorded)", t_ingest),
        ("caption (openai backend, loopback)", t_caption),
        ("filter → dataset version", t_filter),
        ("end to end", total),
        ("re-filter, another policy (verdicts kept)", t_refilter),
        ("re-ingest, same folder (nothing sent)", t_reingest),
    ] {
        println!(
            "  {stage:<40} {:>8.2} s  {:>8.0} images/s",
            t.as_secs_f64(),
            unique / t.as_secs_f64()
        );
    }
    println!(
        "  version {}: {} accepted, {} flagged, {} rejected",
        v.version, v.counts.accepted, v.counts.flagged, v.counts.rejected
    );
    println!(
        "  version {}: {} accepted, {} flagged, {} rejected",
        v2.version, v2.counts.accepted, v2.counts.flagged, v2.counts.rejected
    );
}
