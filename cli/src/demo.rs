//! `atelier demo`: the main job, end to end on the embedded default.
//!
//! Today it runs the spine's pipeline: start atelier embedded (its own nats-server, local store,
//! a fresh API key), upload generated artifacts through the gateway (one large enough for a
//! multipart upload, one a duplicate), submit a checksum job per artifact and follow each through
//! Server-Sent Events, download every result artifact and check it against digests computed here,
//! show a failing job (a wrong expected digest), and announce an image the way an external system
//! does (an object in the bucket plus an `atelier.v1.images.ingested` event) and wait for its
//! record; then it generates with a tiny model (txt2img twice with one seed, img2img, inpainting).
//! Then the dataset side: a folder of generated scenes ingested, captioned (through the built-in
//! scene describer, over the OpenAI wire format), filtered into a dataset version, exported as
//! WebDataset, image folders, LLaVA JSON and Parquet, and the captions scored against the scenes' truth.
//! Then training, retrieval (index, search, curation) and augmentation (seeded variants,
//! paraphrases, hard negatives, checked to be reproducible).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use atelier_contracts::images::{ImagesIngested, IngestedImage};
use atelier_contracts::{ArtifactKey, ChecksumSpec, JobOutput, JobSpec, JobState, SCHEMA_VERSION};
use atelier_kit::config::{NatsArgs, StoreArgs, TelemetryArgs, WorkerArgs};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::embedded::{Embedded, ServiceConfigs, UpArgs};
use atelier_client::Client;

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

pub async fn run(mut args: DemoArgs) -> anyhow::Result<()> {
    // The demo prints its own story; logs only for warnings unless asked.
    if std::env::var_os("ATELIER_LOG").is_none() && args.telemetry.log == "info" {
        args.telemetry.log = "error,async_nats=off".into();
    }
    atelier_kit::telemetry::init_tracing(&args.telemetry);
    if args.data_dir.exists() {
        std::fs::remove_dir_all(&args.data_dir)
            .with_context(|| format!("clearing {}", args.data_dir.display()))?;
    }
    let (key, entry) =
        atelier_gateway::auth::generate_key("demo", "*").map_err(anyhow::Error::msg)?;
    let gateway = atelier_gateway::GatewayArgs {
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
        services: ServiceConfigs {
            generation: atelier_sampler::Config {
                model: atelier_registry::ModelArgs {
                    models: args.data_dir.join("models"),
                    device: "cpu".into(),
                },
                model_cache: 2,
                batch_window_ms: 150,
                ..Default::default()
            },
            captioner: atelier_captioner::Config {
                openai: atelier_captioner::OpenAiArgs::default(),
                ..Default::default()
            },
            ..Default::default()
        },
        // No vision model can be reached here: caption through the built-in scene describer,
        // over the same OpenAI wire format a real endpoint speaks.
        scene_captioner: true,
        drain_secs: 8.0,
    };
    // A tiny random-weight Stable Diffusion (real weights cannot be downloaded here): the
    // pipeline is the real one, the pictures are noise-like.
    atelier_diffusion::pipeline::make_tiny(
        &args.data_dir.join("models/tiny-sd"),
        atelier_diffusion::pipeline::Family::Sd1,
        7,
    )
    .map_err(|e| anyhow::anyhow!("writing the demo model: {e}"))?;
    // A tiny random-weight CLIP for the image spaces of the search index (the caption space
    // uses the real MiniLM weights from .tools/).
    atelier_embed::clip::make_tiny(&args.data_dir.join("models/clip"), 3)
        .map_err(|e| anyhow::anyhow!("writing the demo CLIP: {e}"))?;
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

    generation(&client, &mut summary).await?;
    datasets(&client, &mut summary).await?;
    training(&client, &mut summary).await?;
    retrieval(&client, &mut summary).await?;
    augmentation(&client, &mut summary).await?;

    let health = reqwest::get(format!("http://{}/healthz", embedded.addr))
        .await?
        .text()
        .await?;
    println!("\n9. GET /healthz → {health}");
    Ok(format!("\nsummary:\n{summary}"))
}

async fn finish(
    client: &Client,
    id: &str,
    what: &str,
) -> anyhow::Result<atelier_contracts::ImagesOutput> {
    let mut steps = 0;
    let done = tokio::time::timeout(
        Duration::from_secs(300),
        client.follow(id, |r| {
            if r.progress.is_some() {
                steps += 1;
            }
        }),
    )
    .await
    .with_context(|| format!("{what} did not finish within 300 s"))??;
    if done.state != JobState::Succeeded {
        bail!("{what} job {id} ended {:?}: {:?}", done.state, done.error);
    }
    match done.output {
        Some(JobOutput::Images(out)) => Ok(out),
        other => bail!("{what} job {id} has output {other:?}"),
    }
}

/// Step 4: txt2img, the same seed again (byte-identical, so the same content address), img2img
/// from the result, and inpainting with a mask, through the sampler and inpainter services.
async fn generation(client: &Client, summary: &mut String) -> anyhow::Result<()> {
    println!("\n4. generate with the tiny model: POST /v1/txt2img, /v1/img2img, /v1/inpaint");
    let spec = atelier_contracts::GenerateSpec {
        model: "tiny-sd".into(),
        vae: None,
        prompt: "a (red:1.2) circle on [blue:green:0.5] ground".into(),
        negative_prompt: "blurry".into(),
        steps: 8,
        cfg_scale: 6.0,
        seed: Some(1234),
        width: 64,
        height: 64,
        batch_size: 2,
        sampler: "DPM++ 2M Karras".into(),
        clip_skip: 1,
        randn_source: Default::default(),
        subseed: None,
        subseed_strength: 0.0,
        eta_noise_seed_delta: 0,
        init_image: None,
        strength: 0.75,
        mask: None,
        mask_blur: 4.0,
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
    };
    let first = finish(
        client,
        &client.generate("txt2img", &spec).await?.id.to_string(),
        "txt2img",
    )
    .await?;
    let again = finish(
        client,
        &client.generate("txt2img", &spec).await?.id.to_string(),
        "txt2img",
    )
    .await?;
    if first.images.len() != 2 || first.images[1].seed != 1235 {
        bail!("txt2img returned {:?}", first.images);
    }
    if first.images[0].image.key != again.images[0].image.key {
        bail!("the same seed and settings gave different PNG bytes");
    }
    let png = client.download(&first.images[0].image.key).await?;
    let decoded = image::load_from_memory(&png).context("the generated PNG does not decode")?;
    println!(
        "   txt2img  2 images {}x{}  seeds 1234, 1235  {}  model hash {}",
        decoded.width(),
        decoded.height(),
        first.images[0].image.key,
        first.model_hash
    );
    println!("   same seed again → same bytes, same key (deterministic)");
    println!("   parameters: {}", first.parameters.replace('\n', " | "));
    // Three compatible jobs at once (other prompts and seeds): the sampler stacks them into one
    // UNet batch (this demo runs it with a 150 ms batch window).
    let mut ids = Vec::new();
    for (i, prompt) in ["a green square", "two stars at night", "a yellow sun"]
        .into_iter()
        .enumerate()
    {
        let s = atelier_contracts::GenerateSpec {
            prompt: prompt.into(),
            seed: Some(77 + i as u64),
            batch_size: 1,
            ..spec.clone()
        };
        ids.push(client.generate("txt2img", &s).await?.id.to_string());
    }
    let mut shared = Vec::new();
    for id in &ids {
        shared.push(finish(client, id, "txt2img").await?.batch_jobs.unwrap_or(1));
    }
    println!("   3 txt2img jobs submitted together → sampled as batches of {shared:?} jobs");
    if shared.iter().all(|n| *n == 1) {
        bail!("three compatible jobs submitted together were not batched");
    }
    if !first
        .parameters
        .contains("Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 1234, Size: 64x64")
    {
        bail!("unexpected parameters text: {}", first.parameters);
    }
    let img2img = atelier_contracts::GenerateSpec {
        init_image: Some(first.images[0].image.key.clone()),
        strength: 0.5,
        batch_size: 1,
        ..spec.clone()
    };
    let out = finish(
        client,
        &client.generate("img2img", &img2img).await?.id.to_string(),
        "img2img",
    )
    .await?;
    println!(
        "   img2img  strength 0.5 from the first image → {}",
        out.images[0].image.key
    );
    let mask =
        image::GrayImage::from_fn(64, 64, |x, _| image::Luma([if x < 32 { 255 } else { 0 }]));
    let mut mask_png = Vec::new();
    image::DynamicImage::ImageLuma8(mask).write_to(
        &mut std::io::Cursor::new(&mut mask_png),
        image::ImageFormat::Png,
    )?;
    let mask = client.upload(Bytes::from(mask_png), "image/png").await?;
    let inpaint = atelier_contracts::GenerateSpec {
        mask: Some(mask.artifact.key.clone()),
        mask_blur: 0.0,
        strength: 1.0,
        ..img2img
    };
    let out = finish(
        client,
        &client.generate("inpaint", &inpaint).await?.id.to_string(),
        "inpaint",
    )
    .await?;
    let result =
        image::load_from_memory(&client.download(&out.images[0].image.key).await?)?.to_rgb8();
    let original = decoded.to_rgb8();
    let kept =
        (0..64).all(|y| (32..64).all(|x| result.get_pixel(x, y) == original.get_pixel(x, y)));
    if !kept {
        bail!("inpainting changed the unmasked half");
    }
    println!(
        "   inpaint  left half repainted, right half kept pixel for pixel → {}",
        out.images[0].image.key
    );
    summary.push_str("txt2img / img2img / inpaint: ok\n");
    Ok(())
}

/// Step 5, the dataset side: ingest a folder of generated scenes, caption them, filter them into
/// a dataset version, export it four ways, and score the captions against the scenes' truth.
async fn datasets(client: &Client, summary: &mut String) -> anyhow::Result<()> {
    use atelier_contracts::dataset::{CaptionBackend, CaptionSpec, FilterSpec, Tier};
    use atelier_ingest::samples;
    println!("\n5. dataset: atelier ingest → caption → filter → export, then eval-captions");
    let dir = tempfile::tempdir()?;
    let n = 24u64;
    for seed in 0..n {
        let (fmt, ext) = if seed % 3 == 0 {
            (image::ImageFormat::Jpeg, "jpg")
        } else {
            (image::ImageFormat::Png, "png")
        };
        std::fs::write(
            dir.path().join(format!("scene-{seed:03}.{ext}")),
            samples::scene_bytes(seed, 160, 120, fmt),
        )?;
    }
    // A copy under another name (one image, two sources), a truncated file, a tiny thumbnail.
    std::fs::copy(
        dir.path().join("scene-001.png"),
        dir.path().join("copy-of-scene-001.png"),
    )?;
    let whole = samples::scene_bytes(99, 160, 120, image::ImageFormat::Png);
    std::fs::write(dir.path().join("broken.png"), &whole[..whole.len() / 2])?;
    std::fs::write(
        dir.path().join("thumb.png"),
        samples::scene_bytes(98, 40, 30, image::ImageFormat::Png),
    )?;
    let report = crate::ingest::ingest_dir(
        client,
        dir.path(),
        "scenes",
        Some("CC0-1.0".into()),
        Duration::from_secs(60),
        false,
    )
    .await?;
    println!(
        "   ingest: {} files → {} images recorded, flagged: {:?}",
        report.files, report.recorded, report.flagged
    );
    if report.images != (n as usize) + 2 || report.flagged.len() != 1 || !report.pending.is_empty()
    {
        bail!("ingest went wrong: {report:?}");
    }

    let caption = JobSpec::Caption(CaptionSpec {
        dataset: "scenes".into(),
        images: vec![],
        backend: CaptionBackend::default(),
        shard_size: None,
        spend_cap: None,
        shard: None,
    });
    let out = match run_to_end(client, &caption).await? {
        JobOutput::Captions(c) => c,
        other => bail!("caption job returned {other:?}"),
    };
    println!(
        "   caption (model {}, source {}): {} captioned, {} unusable, {} prompt + {} completion tokens",
        out.source.model,
        out.source_id,
        out.captioned,
        out.unusable,
        out.usage.prompt_tokens,
        out.usage.completion_tokens
    );
    if out.captioned != n + 1 || out.unusable != 1 || !out.failed.is_empty() {
        bail!("captioning went wrong: {out:?}");
    }
    let again = match run_to_end(client, &caption).await? {
        JobOutput::Captions(c) => c,
        other => bail!("caption job returned {other:?}"),
    };
    println!(
        "   caption again: {} already captioned, {} new, {} tokens spent",
        again.already_captioned,
        again.captioned,
        again.usage.prompt_tokens + again.usage.completion_tokens
    );
    if again.captioned != 0 || again.already_captioned != n + 1 {
        bail!("re-captioning was not free: {again:?}");
    }

    let filter = JobSpec::Filter(FilterSpec {
        dataset: "scenes".into(),
        caption_source: Some(out.source_id.clone()),
        policy: Default::default(),
        split: atelier_contracts::dataset::SplitSpec {
            val: 0.15,
            test: 0.15,
            seed: "demo".into(),
        },
        note: Some("atelier demo".into()),
    });
    let v = match run_to_end(client, &filter).await? {
        JobOutput::DatasetVersion(v) => v,
        other => bail!("filter job returned {other:?}"),
    };
    println!(
        "   filter → {} v{}: {} rows, {} accepted, {} flagged, {} rejected; tiers {:?}; splits {:?}; signals {:?}",
        v.dataset,
        v.version,
        v.counts.rows,
        v.counts.accepted,
        v.counts.flagged,
        v.counts.rejected,
        v.counts.tiers,
        v.counts.splits,
        v.counts.signals
    );
    // The broken file and the thumbnail are rejected; the scenes are kept.
    if v.counts.rows != n + 2 || v.counts.rejected != 2 {
        bail!("unexpected decisions: {:?}", v.counts);
    }

    let manifest = client.dataset_version("scenes", Some(v.version)).await?;
    let exports = tempfile::tempdir()?;
    for format in [
        crate::export::ExportFormat::Webdataset,
        crate::export::ExportFormat::Jsonl,
        crate::export::ExportFormat::Llava,
        crate::export::ExportFormat::Parquet,
    ] {
        let out_dir = exports.path().join(format!("{format:?}").to_lowercase());
        let r = crate::export::export(
            client,
            &manifest,
            format,
            &[Tier::Gold, Tier::Silver, Tier::Bronze],
            &out_dir,
            16,
            false,
        )
        .await?;
        let kept: usize = r.splits.values().sum();
        if kept as u64 != v.counts.accepted + v.counts.flagged {
            bail!("{format:?} export wrote {kept} rows");
        }
        println!(
            "   export --format {:<10} {kept} rows in {} files, splits {:?}",
            format!("{format:?}").to_lowercase(),
            r.files,
            r.splits
        );
    }

    // Captions against the scenes' ground truth (five references each).
    let rows = crate::export::rows(client, &manifest).await?;
    let mut refs = std::collections::BTreeMap::new();
    let mut cands = std::collections::BTreeMap::new();
    for r in &rows {
        let seed = r
            .source
            .as_deref()
            .and_then(|s| s.strip_prefix("scene-"))
            .and_then(|s| s.get(..3))
            .and_then(|s| s.parse::<u64>().ok());
        if let (Some(seed), Some(c)) = (seed, &r.caption) {
            refs.insert(r.image_id.clone(), samples::scene_captions(seed));
            cands.insert(r.image_id.clone(), c.clone());
        }
    }
    let scores = atelier_caption_eval::evaluate(&refs, &cands)
        .map_err(|e| anyhow::anyhow!("scoring captions: {e}"))?;
    let get = |k: &str| scores.corpus.get(k).copied().unwrap_or(f64::NAN);
    println!(
        "   eval-captions vs ground truth ({} images): Bleu_1 {:.3} Bleu_4 {:.3} ROUGE_L {:.3} CIDEr {:.3}",
        cands.len(),
        get("Bleu_1"),
        get("Bleu_4"),
        get("ROUGE_L"),
        get("CIDEr")
    );
    if get("Bleu_1") < 0.3 {
        bail!("captions do not match the scenes: {:?}", scores.corpus);
    }
    summary.push_str("ingest / caption / filter / export / eval: ok\n");
    Ok(())
}

/// Step 6: a short LoRA run on the tiny model, trained on the dataset version step 5 wrote, then
/// sampled with through `<lora:NAME:1>`.
async fn training(client: &Client, summary: &mut String) -> anyhow::Result<()> {
    use atelier_contracts::{TrainData, TrainSpec};
    println!(
        "\n6. train: POST /v1/train/lora on dataset scenes (latest version), then sample with it"
    );
    let mut spec = TrainSpec::new(
        "tiny-sd",
        "demo-scenes",
        TrainData::Dataset {
            dataset: "scenes".into(),
            version: None,
            splits: vec!["train".into()],
            include_flagged: false,
        },
    );
    spec.resolution = 64;
    spec.min_bucket_reso = 64;
    spec.max_bucket_reso = 128;
    spec.network.rank = 4;
    spec.network.alpha = 4.0;
    spec.unet_lr = 1e-2;
    spec.max_train_steps = 12;
    spec.checkpoint_every = 4;
    spec.batch_size = 2;
    spec.shuffle_caption = true;
    spec.keep_tokens = 1;
    spec.seed = 7;
    let out = match run_to_end(client, &JobSpec::Train(Box::new(spec))).await? {
        JobOutput::Trained(t) => t,
        other => bail!("the training job has output {other:?}"),
    };
    let csv = String::from_utf8(client.download(&out.loss_csv.key).await?.to_vec())?;
    let losses: Vec<f64> = csv
        .lines()
        .skip(1)
        .filter_map(|l| l.split(',').nth(1)?.parse().ok())
        .collect();
    if losses.len() != out.steps as usize || !losses.iter().all(|l| l.is_finite()) {
        bail!(
            "the loss curve has {} finite rows for {} steps",
            losses.len(),
            out.steps
        );
    }
    println!(
        "   {} steps on {} images: loss {:.4} → {:.4}; LoRA {} ({} bytes, hash {}) published as {}",
        out.steps,
        out.images,
        losses.first().copied().unwrap_or(f64::NAN),
        out.final_loss,
        out.lora.key,
        out.lora.size,
        out.lora_hash,
        out.published_as
    );
    println!(
        "   loss curve: {} (CSV), {} (PNG)",
        out.loss_csv.key, out.loss_plot.key
    );
    let mut g = atelier_contracts::GenerateSpec::txt2img("tiny-sd", "a red circle on blue ground");
    g.width = 64;
    g.height = 64;
    g.steps = 6;
    g.seed = Some(99);
    let plain = client.generate("txt2img", &g).await?;
    let plain = finish(client, &plain.id.to_string(), "txt2img").await?;
    g.prompt = format!("{} <lora:{}:1>", g.prompt, out.output_name);
    let with = client.generate("txt2img", &g).await?;
    let with = finish(client, &with.id.to_string(), "txt2img with the LoRA").await?;
    if plain.images[0].image.sha256 == with.images[0].image.sha256 {
        bail!("sampling with the trained LoRA changed nothing");
    }
    println!(
        "   same seed without / with <lora:{}:1>: {} / {} (different, as they should be)",
        out.output_name, plain.images[0].image.key, with.images[0].image.key
    );
    summary.push_str("train LoRA / sample with it: ok\n");
    Ok(())
}

/// Step 7: index the dataset version, search it four ways, curate a new version from it.
async fn retrieval(client: &Client, summary: &mut String) -> anyhow::Result<()> {
    use atelier_contracts::{CurateSpec, IndexSpec, Space};
    println!("\n7. retrieval: atelier index → search → curate on dataset scenes");
    let spec = JobSpec::Index(IndexSpec {
        dataset: "scenes".into(),
        version: None,
        spaces: vec![],
    });
    let out = match run_to_end(client, &spec).await? {
        JobOutput::Indexed(o) => o,
        other => bail!("the index job has output {other:?}"),
    };
    for (space, c) in &out.spaces {
        println!(
            "   index v{} space {space:<10} {} records ({} embedded, {} skipped)",
            out.version, c.count, c.embedded, c.skipped
        );
    }
    if !out.spaces.contains_key(&Space::Caption) {
        bail!("no caption space: the MiniLM weights are missing (scripts/bootstrap installs them)");
    }
    let manifest = client.dataset_version("scenes", Some(out.version)).await?;
    let rows = crate::export::rows(client, &manifest).await?;
    let probe = rows
        .iter()
        .find(|r| r.decision == atelier_contracts::dataset::Decision::Accept && r.caption.is_some())
        .context("no accepted row to search for")?;
    let caption = probe.caption.clone().unwrap_or_default();
    let q = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    // caption→caption: a row's own caption finds it first.
    let r = client
        .search(
            &q(&[
                ("dataset", "scenes"),
                ("text", &caption),
                ("space", "caption"),
                ("k", "3"),
            ]),
            None,
        )
        .await?;
    let top = r.results.first().context("no search results")?;
    println!(
        "   GET /v1/search?space=caption&text={:?}\n     → {:?} (score {:.3}), then {} more",
        caption.chars().take(48).collect::<String>(),
        top.caption
            .as_deref()
            .unwrap_or("")
            .chars()
            .take(48)
            .collect::<String>(),
        top.score,
        r.results.len() - 1
    );
    if top.sha256 != probe.sha256 {
        bail!("a caption did not find its own record first: {r:?}");
    }
    // A free-text query with a tier filter.
    let r = client
        .search(
            &q(&[
                ("dataset", "scenes"),
                ("text", "a red circle"),
                ("space", "caption"),
                ("k", "3"),
                ("tier", "gold,silver"),
            ]),
            None,
        )
        .await?;
    for h in &r.results {
        println!(
            "   \"a red circle\" (gold/silver) → {:.3} {:?}",
            h.score,
            h.caption
                .as_deref()
                .unwrap_or("")
                .chars()
                .take(60)
                .collect::<String>()
        );
    }
    // image→image with an uploaded copy of a record's image: that record comes first.
    let bytes = client.download(&probe.image_key).await?;
    let r = client
        .search(
            &q(&[("dataset", "scenes"), ("k", "3")]),
            Some((bytes, "image/png")),
        )
        .await?;
    if r.results.first().map(|h| &h.sha256) != Some(&probe.sha256) {
        bail!("an uploaded image did not find its own record first: {r:?}");
    }
    println!(
        "   POST /v1/search (an image) → {} first, score {:.3}",
        probe.image_id, r.results[0].score
    );
    // Curation: keywords, caption near-duplicates, a seeded limit; twice, the same rows.
    let spec: CurateSpec = serde_json::from_value(serde_json::json!({
        "dataset": "scenes",
        "version": out.version,
        "queries": [{"text": "colourful shapes", "space": "caption", "min_score": 0.0}],
        "keywords": {"none": ["blurry"]},
        "dedup": {"space": "caption", "threshold": 0.97},
        "limit": 12,
        "seed": "demo",
        "note": "demo curation"
    }))?;
    let a = crate::search::curate(client, &spec).await?;
    let b = crate::search::curate(client, &spec).await?;
    let (ma, mb) = (
        client.dataset_version("scenes", a.version).await?,
        client.dataset_version("scenes", b.version).await?,
    );
    if ma.data.key != mb.data.key {
        bail!("the same curation gave different rows");
    }
    println!(
        "   POST /v1/datasets/scenes/curate → v{} from v{}: {} matched, {} near-duplicates dropped, {} rows (again: v{}, the same rows)",
        a.version.unwrap_or(0),
        a.parent,
        a.matched,
        a.duplicates_removed,
        a.counts.rows,
        b.version.unwrap_or(0)
    );
    summary.push_str("index / search / curate: ok\n");
    Ok(())
}

/// Step 8: augment the dataset's latest version twice with one seed (same bytes), and check a
/// variant against its recorded steps.
async fn augmentation(client: &Client, summary: &mut String) -> anyhow::Result<()> {
    println!("\n8. augmentation: atelier augment on dataset scenes");
    // The latest version (the curation); given explicitly, so the run again augments it too
    // and not the version the first run writes.
    let latest = client.dataset_version("scenes", None).await?.version;
    let spec: atelier_contracts::AugmentSpec = serde_json::from_value(serde_json::json!({
        "dataset": "scenes",
        "version": latest,
        "transforms": [
            {"op": "random_crop", "scale": [0.5, 1.0]},
            {"op": "resize", "size": 64, "mode": "center_crop"},
            {"op": "flip"},
            {"op": "color_jitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
            {"op": "jpeg", "quality": [50, 90]}
        ],
        "variants": 2,
        "captions": {"paraphrase": "rules", "hard_negatives": {"neighbours": 1}},
        "seed": "demo",
        "note": "demo augmentation"
    }))?;
    let a = crate::augment::run(client, &spec).await?;
    let b = crate::augment::run(client, &spec).await?;
    let (ma, mb) = (
        client.dataset_version("scenes", Some(a.version)).await?,
        client.dataset_version("scenes", Some(b.version)).await?,
    );
    if ma.data.key != mb.data.key {
        bail!("the same augmentation gave different bytes");
    }
    let data = client.download(&ma.data.key).await?;
    let rows: Vec<atelier_contracts::DatasetRow> = std::str::from_utf8(&data)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    let variant = rows
        .iter()
        .find(|r| r.augmentation.is_some())
        .context("the augmented version has no variant")?;
    let aug = variant.augmentation.as_ref().context("no augmentation")?;
    let parent = rows
        .iter()
        .find(|r| r.sha256 == aug.parent)
        .context("a variant's parent is missing")?;
    println!(
        "   POST /v1/datasets/scenes/augment → v{} from v{}: {} variants of {} rows, {} hard negatives (again: v{}, the same bytes)",
        a.version, a.parent, a.variants, a.augmented_rows, a.negatives, b.version
    );
    println!(
        "   {} ← {} by {}",
        variant.image_id,
        parent.image_id,
        serde_json::to_string(&aug.steps)?
    );
    println!(
        "   caption {:?} → {:?}",
        parent.caption.as_deref().unwrap_or(""),
        variant.caption.as_deref().unwrap_or("")
    );
    if let Some(n) = parent.negatives.first() {
        println!("   hard negative ({:?}): {:?}", n.kind, n.text);
    }
    summary.push_str("augment: ok\n");
    Ok(())
}

/// Submits a job and follows it to the end; its output, or an error with the job's reason.
async fn run_to_end(client: &Client, spec: &JobSpec) -> anyhow::Result<JobOutput> {
    let record = client.submit(spec).await?;
    let done = client.follow(&record.id.to_string(), |_| {}).await?;
    match (done.state, done.output, done.error) {
        (JobState::Succeeded, Some(out), _) => Ok(out),
        (state, _, e) => bail!("{} job {} ended {state:?}: {e:?}", spec.kind(), done.id),
    }
}
