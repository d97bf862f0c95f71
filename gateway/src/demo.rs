//! `atelier demo`: the main job, end to end on the embedded default.
//!
//! Today it runs the spine's pipeline: start atelier embedded (its own nats-server, local store,
//! a fresh API key), upload generated artifacts through the gateway (one large enough for a
//! multipart upload, one a duplicate), submit a checksum job per artifact and follow each through
//! Server-Sent Events, download every result artifact and check it against digests computed here,
//! show a failing job (a wrong expected digest), and announce an image the way an external system
//! does (an object in the bucket plus an `atelier.v1.images.ingested` event) and wait for its
//! record. Later issues extend it (captions, quality, datasets, search, training, sampling).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use atelier_contracts::images::{ImagesIngested, IngestedImage};
use atelier_contracts::{ArtifactKey, ChecksumSpec, JobOutput, JobSpec, JobState, SCHEMA_VERSION};
use atelier_kit::config::{NatsArgs, StoreArgs, TelemetryArgs, WorkerArgs};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::embedded::{Embedded, UpArgs};

#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Working directory of the demo's embedded atelier (wiped first).
    #[arg(long = "data-dir", default_value = "./.atelier/demo")]
    pub data_dir: PathBuf,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Deterministic sample bytes (xorshift), so every run digests the same artifacts.
pub fn sample_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn short(h: &str) -> &str {
    &h[..12.min(h.len())]
}

pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("clearing {}", args.data_dir.display()))?;
    }
    let (key, entry) = crate::auth::generate_key("demo", "*").map_err(anyhow::Error::msg)?;
    let gateway = crate::GatewayArgs {
        addr: "127.0.0.1:0".parse()?,
        api_keys: vec![entry],
        ..Default::default()
    };
    let up = UpArgs {
        data_dir: args.data_dir.clone(),
        nats_port: 0,
        gateway,
        nats: NatsArgs::default(),
        store: StoreArgs::default(),
        telemetry: args.telemetry.clone(),
        worker: WorkerArgs::default(),
    };
    let shutdown = CancellationToken::new();
    let started = Instant::now();
    let embedded = Embedded::start(up, shutdown.clone()).await?;
    println!(
        "atelier demo: embedded atelier up at http://{} (nats {}), data in {}",
        embedded.addr,
        embedded.nats_url,
        args.data_dir.display()
    );
    let result = pipeline(&embedded, &key).await;
    shutdown.cancel();
    embedded.wait().await?;
    let summary = result?;
    println!("{summary}");
    println!(
        "atelier demo: all checks passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

async fn pipeline(embedded: &Embedded, key: &str) -> anyhow::Result<String> {
    let client = Client::new(&format!("http://{}", embedded.addr), Some(key.to_owned()))?;
    let mut summary = String::new();

    // 1. Uploads (one over the multipart threshold, one duplicate).
    let samples: Vec<(&str, Vec<u8>)> = vec![
        ("small.bin", sample_bytes(1, 1024)),
        ("medium.bin", sample_bytes(2, 256 * 1024)),
        (
            "large.bin",
            sample_bytes(3, atelier_kit::store::MULTIPART_THRESHOLD + 1024 * 1024),
        ),
        ("small-again.bin", sample_bytes(1, 1024)),
    ];
    println!(
        "\n1. upload {} artifacts through POST /v1/uploads",
        samples.len()
    );
    let mut uploaded = Vec::new();
    for (name, bytes) in &samples {
        let local = hex::encode(Sha256::digest(bytes));
        let up = client
            .upload(Bytes::from(bytes.clone()), "application/octet-stream")
            .await?;
        if up.artifact.sha256 != local {
            bail!(
                "{name}: gateway stored sha256 {} but the bytes hash to {local}",
                up.artifact.sha256
            );
        }
        println!(
            "   {name:<16} {:>9} bytes  {}  {}",
            up.artifact.size,
            up.artifact.key,
            if up.created {
                "stored"
            } else {
                "already stored (deduplicated)"
            }
        );
        uploaded.push((name.to_string(), up));
    }
    if uploaded[3].1.created || uploaded[3].1.artifact.key != uploaded[0].1.artifact.key {
        bail!("the duplicate upload was stored twice");
    }

    // 2. One checksum job per distinct artifact, verified, followed over SSE.
    println!(
        "\n2. submit checksum jobs (POST /v1/jobs) and follow them (GET /v1/jobs/{{id}}/events)"
    );
    let mut jobs = Vec::new();
    for (name, up) in uploaded.iter().take(3) {
        let spec = JobSpec::Checksum(ChecksumSpec {
            input: up.artifact.key.clone(),
            expected_sha256: Some(up.artifact.sha256.clone()),
        });
        let job = client.submit(&spec).await?;
        jobs.push((name.clone(), up.artifact.clone(), job.id));
    }
    let wrong = client
        .submit(&JobSpec::Checksum(ChecksumSpec {
            input: uploaded[0].1.artifact.key.clone(),
            expected_sha256: Some("0".repeat(64)),
        }))
        .await?;
    for (name, artifact, id) in &jobs {
        let mut states = Vec::new();
        let done = tokio::time::timeout(
            Duration::from_secs(60),
            client.follow(&id.to_string(), |r| {
                let s = serde_json::to_value(r.state)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_default();
                if states.last() != Some(&s) {
                    states.push(s);
                }
            }),
        )
        .await
        .context("a checksum job did not finish within 60 s")??;
        if done.state != JobState::Succeeded {
            bail!(
                "job {id} for {name} ended {:?}: {:?}",
                done.state,
                done.error
            );
        }
        let Some(JobOutput::Checksum(out)) = &done.output else {
            bail!("job {id} has no checksum output")
        };
        let report_bytes = client.download(&out.report.key).await?;
        let report: serde_json::Value = serde_json::from_slice(&report_bytes)?;
        if report["sha256"] != artifact.sha256 || out.input.sha256 != artifact.sha256 {
            bail!(
                "job {id}: report says {} but {name} hashes to {}",
                report["sha256"],
                artifact.sha256
            );
        }
        println!(
            "   {name:<16} job {id}  {}  sha256 {}…  report {}",
            states.join(" → "),
            short(&out.input.sha256),
            short(&out.report.sha256)
        );
        summary.push_str(&format!("checksum {name}: ok\n"));
    }
    let failed = client.follow(&wrong.id.to_string(), |_| {}).await?;
    match (&failed.state, &failed.error) {
        (JobState::Failed, Some(e)) if e.code == "checksum_mismatch" => {
            println!(
                "   wrong digest     job {}  failed as it should: {}",
                wrong.id, e.message
            );
        }
        other => bail!("the job with a wrong expected digest ended {other:?}"),
    }

    // 3. An external system announces an image over NATS.
    println!(
        "\n3. an external system puts an object in the bucket and publishes {}",
        atelier_contracts::subjects::IMAGES_INGESTED
    );
    let image = atelier_ingest::samples::scene_bytes(42, 64, 48, image::ImageFormat::Png);
    let sha = hex::encode(Sha256::digest(&image));
    let key = ArtifactKey::parse("incoming/camera-0001.png").map_err(anyhow::Error::msg)?;
    embedded
        .store
        .put_at(&key, Bytes::from(image), "image/png")
        .await?;
    let event = ImagesIngested {
        schema_version: SCHEMA_VERSION,
        dataset: Some("demo".into()),
        images: vec![IngestedImage {
            key: key.to_string(),
            sha256: Some(sha.clone()),
            source: Some("camera://0001".into()),
            license: Some("CC0-1.0".into()),
            metadata: Default::default(),
        }],
    };
    embedded
        .bus
        .publish_json(
            atelier_contracts::subjects::IMAGES_INGESTED.into(),
            None,
            &event,
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let record = loop {
        if let Some(r) = client.image(&sha).await? {
            break r;
        }
        if Instant::now() > deadline {
            bail!("the ingested image was not recorded within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "   recorded image {}…  {} {}x{}  phash {}  at {}  datasets {:?}  sources {}",
        short(&record.sha256),
        record.format.as_deref().unwrap_or("?"),
        record.width.unwrap_or(0),
        record.height.unwrap_or(0),
        record.phash.as_deref().unwrap_or("-"),
        record.key,
        record.datasets,
        record.sources.len()
    );
    if record.flag.is_some()
        || (record.format.as_deref(), record.width, record.height)
            != (Some("png"), Some(64), Some(48))
    {
        bail!("the ingested image was recorded wrongly: {record:?}");
    }
    summary.push_str("ingest event: ok\n");

    let health = reqwest::get(format!("http://{}/healthz", embedded.addr))
        .await?
        .text()
        .await?;
    println!("\n4. GET /healthz → {health}");
    Ok(format!("\nsummary:\n{summary}"))
}
