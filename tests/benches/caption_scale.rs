//! Captioning at scale: `scripts/bench-dataset` (or `cargo bench -p atelier-e2e --bench
//! caption_scale`). Generated images (ATELIER_BENCH_IMAGES, default 100,000) ingested into one
//! dataset, then captioned by 1, 2 and 4 captioner replicas (ATELIER_BENCH_REPLICAS) on one NATS,
//! each run as its own caption source, through the loopback OpenAI-compatible server with 200 ms
//! latency that accepts 600 requests a minute (429 beyond). The replicas share one 600/minute
//! budget. Printed per run: wall time, requests the server accepted and refused, the rate used
//! against the allowed one, captions lost and duplicated. Then the version is exported in every
//! format by `atelier export` processes, with their peak RSS, and each export loaded by `datasets`.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use atelier_captioner::vision_server::{Faults, ServerConfig, VisionServer};
use atelier_contracts::dataset::{CaptionBackend, CaptionRecord, CaptionSpec, FilterSpec};
use atelier_contracts::{JobOutput, JobSpec, JobState};
use atelier_e2e::*;
use tokio_util::sync::CancellationToken;

const RPM: u32 = 600;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn finish(c: &Cluster, client: &atelier_client::Client, spec: &JobSpec) -> JobOutput {
    let id = client.submit(spec).await.expect("submitted").id;
    let r = c
        .wait_terminal(&[id], Duration::from_secs(24 * 3600))
        .await
        .expect("finished")
        .remove(0);
    assert_eq!(r.state, JobState::Succeeded, "{:?}", r.error);
    r.output.expect("output")
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: u64 = env_or("ATELIER_BENCH_IMAGES", 100_000);
    let replicas: Vec<usize> = std::env::var("ATELIER_BENCH_REPLICAS")
        .unwrap_or_else(|_| "1,2,4".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let vision = VisionServer::start(ServerConfig {
        faults: Faults {
            latency: Duration::from_millis(200),
            rpm_limit: RPM,
            ..Default::default()
        },
        model: "scene-describer".into(),
        ..Default::default()
    })
    .await
    .expect("vision server");
    let mut c = Cluster::local().await.expect("cluster");
    c.spawn_service("atelier-ingest", &[]).expect("ingest");
    c.spawn_service(
        "atelier-quality-filter",
        &[("ATELIER_NO_NSFW", "1".to_owned())],
    )
    .expect("filter");
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;

    let dir = tempfile::tempdir().expect("tmp");
    for seed in 0..n {
        std::fs::write(
            dir.path().join(format!("{seed:07}.png")),
            unique_scene(seed),
        )
        .expect("write");
    }
    let t0 = Instant::now();
    let report = atelier_cli::ingest::ingest_dir(
        &client,
        dir.path(),
        "scale",
        None,
        Duration::from_secs(3600),
        false,
    )
    .await
    .expect("ingest");
    assert_eq!(
        report.recorded as u64, n,
        "every generated image is distinct"
    );
    println!(
        "ingest: {} images in {:.1} s ({:.0}/s)",
        report.recorded,
        t0.elapsed().as_secs_f64(),
        report.recorded as f64 / t0.elapsed().as_secs_f64()
    );

    let env = vec![
        ("ATELIER_OPENAI_BASE_URL", vision.base_url()),
        ("ATELIER_OPENAI_MODEL", "scene-describer".to_owned()),
        ("ATELIER_OPENAI_RPM", RPM.to_string()),
        ("ATELIER_OPENAI_TPM", "0".to_owned()),
        ("ATELIER_OPENAI_CONCURRENCY", "4".to_owned()),
        ("ATELIER_CONCURRENCY", "2".to_owned()),
    ];
    let mut spawned = Vec::new();
    for (run, &r) in replicas.iter().enumerate() {
        while spawned.len() < r {
            spawned.push(
                c.spawn_service("atelier-captioner", &env)
                    .expect("captioner"),
            );
        }
        caption_run(&c, &client, &vision, n, r, run).await;
        // The next run starts from an idle minute: the server's window and the shared bucket
        // refill, so each run is measured alike.
        if run + 1 < replicas.len() {
            tokio::time::sleep(Duration::from_secs(61)).await;
        }
    }
    if replicas.is_empty() {
        caption_unlimited(&mut c, &client).await;
    }
    export_all(&c, &client, n).await;
    shutdown.cancel();
    c.stop_services(libc::SIGTERM, Duration::from_secs(10));
}

/// Exports only (ATELIER_BENCH_REPLICAS empty): the images captioned as fast as they go, by one
/// replica through a server with no latency and no limit (an export keeps captioned rows).
async fn caption_unlimited(c: &mut Cluster, client: &atelier_client::Client) {
    let fast = VisionServer::start(ServerConfig {
        model: "scene-describer".into(),
        ..Default::default()
    })
    .await
    .expect("vision server");
    let env = vec![
        ("ATELIER_OPENAI_BASE_URL", fast.base_url()),
        ("ATELIER_OPENAI_MODEL", "scene-describer".to_owned()),
        ("ATELIER_OPENAI_RPM", "0".to_owned()),
        ("ATELIER_OPENAI_TPM", "0".to_owned()),
        ("ATELIER_OPENAI_CONCURRENCY", "16".to_owned()),
    ];
    c.spawn_service("atelier-captioner", &env)
        .expect("captioner");
    let t0 = Instant::now();
    let spec = JobSpec::Caption(CaptionSpec {
        dataset: "scale".into(),
        backend: CaptionBackend::Openai {
            model: None,
            prompt: None,
            max_tokens: 60,
            temperature: 0.2,
            image_max_side: 64,
            batch: false,
        },
        ..Default::default()
    });
    let JobOutput::Captions(out) = finish(c, client, &spec).await else {
        panic!("not a caption output")
    };
    println!(
        "captions for the exports (no rate limit): {} in {:.1} s",
        out.captioned,
        t0.elapsed().as_secs_f64()
    );
}

/// A small scene whose first pixels spell out `seed`, so every image has its own sha256 (small
/// scenes of simple shapes repeat).
fn unique_scene(seed: u64) -> Vec<u8> {
    let png = atelier_ingest::samples::scene_bytes(seed, 48, 32, image::ImageFormat::Png);
    let mut img = image::load_from_memory(&png).expect("scene").to_rgb8();
    for (i, b) in seed.to_le_bytes().chunks(3).enumerate() {
        let mut px = [0u8; 3];
        px[..b.len()].copy_from_slice(b);
        img.put_pixel(i as u32, 0, image::Rgb(px));
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .expect("png");
    out.into_inner()
}

async fn caption_run(
    c: &Cluster,
    client: &atelier_client::Client,
    vision: &VisionServer,
    n: u64,
    replicas: usize,
    run: usize,
) {
    let (ok0, refused0) = (
        vision.stats.ok.load(Ordering::SeqCst),
        vision.stats.rate_limited.load(Ordering::SeqCst),
    );
    let spec = JobSpec::Caption(CaptionSpec {
        dataset: "scale".into(),
        backend: CaptionBackend::Openai {
            model: None,
            prompt: Some(format!("Describe the picture (run {run}).")),
            max_tokens: 60,
            temperature: 0.2,
            image_max_side: 64,
            batch: false,
        },
        shard_size: Some(500),
        ..Default::default()
    });
    let t0 = Instant::now();
    // The first minute may spend a whole minute's budget at once (the bucket and the server's
    // window both start full); the rate that counts is the one after it.
    let stats = vision.stats.clone();
    let at_minute = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        stats.ok.load(Ordering::SeqCst)
    });
    let JobOutput::Captions(out) = finish(c, client, &spec).await else {
        panic!("not a caption output")
    };
    let secs = t0.elapsed().as_secs_f64();
    let ok_end = vision.stats.ok.load(Ordering::SeqCst);
    let ok = ok_end - ok0;
    let refused = vision.stats.rate_limited.load(Ordering::SeqCst) - refused0;
    let steady = if secs > 75.0 {
        let at60 = at_minute.await.unwrap_or(ok_end);
        let per_min = (ok_end - at60) as f64 / ((secs - 60.0) / 60.0);
        format!(
            "{per_min:.0}/min after the first minute = {:.1}% of {RPM}/min",
            100.0 * per_min / f64::from(RPM)
        )
    } else {
        at_minute.abort();
        "run shorter than 75 s: no steady rate".to_owned()
    };
    let kv = c.bus.captions_kv().await.expect("kv");
    let captions: Vec<(String, CaptionRecord)> = atelier_kit::bus::kv_values(&kv, "")
        .await
        .expect("captions");
    let mine: Vec<&CaptionRecord> = captions
        .iter()
        .map(|(_, r)| r)
        .filter(|r| r.source_id == out.source_id)
        .collect();
    let distinct: HashSet<&str> = mine.iter().map(|r| r.image_sha256.as_str()).collect();
    let whole = ok as f64 / (secs / 60.0);
    println!(
        "caption, {replicas} replica(s): {n} images in {secs:.1} s; {ok} requests accepted, {refused} refused (429); \
         {whole:.0}/min over the run = {:.1}% of {RPM}/min; rate used: {steady}; \
         {} captions, {} lost, {} duplicated, {} failed",
        100.0 * whole / f64::from(RPM),
        mine.len(),
        n - distinct.len() as u64,
        mine.len() - distinct.len(),
        out.failed_total
    );
}

async fn export_all(c: &Cluster, client: &atelier_client::Client, n: u64) {
    // The generated scenes are small and alike: keep them all (no size or near-duplicate check).
    // Without caption runs (ATELIER_BENCH_REPLICAS empty: exports only), uncaptioned images are
    // kept, flagged.
    let policy = atelier_contracts::dataset::QualityPolicy {
        min_side: 16,
        duplicate_max_bits: -1,
        severity: [(
            "no_caption".to_owned(),
            atelier_contracts::dataset::Severity::Flag,
        )]
        .into(),
        ..Default::default()
    };
    let JobOutput::DatasetVersion(v) = finish(
        c,
        client,
        &JobSpec::Filter(FilterSpec {
            dataset: "scale".into(),
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
    let kept = v.counts.accepted + v.counts.flagged;
    println!("filter: version {} keeps {kept} of {n}", v.version);
    let idle = peak_rss_of(
        std::process::Command::new(bin("atelier"))
            .arg("--version")
            .stdout(std::process::Stdio::null()),
    );
    println!(
        "atelier --version: peak RSS {:.0} MiB (the process before any work)",
        idle as f64 / 1024.0
    );
    let out = tempfile::tempdir().expect("tmp");
    for format in ["parquet", "webdataset", "jsonl", "llava"] {
        let dir = out.path().join(format);
        let t0 = Instant::now();
        let peak = peak_rss_of(
            std::process::Command::new(bin("atelier"))
                .args(["export", "--dataset", "scale", "--format", format, "--out"])
                .arg(&dir)
                .env("ATELIER_GATEWAY", client.base())
                .stdout(std::process::Stdio::null()),
        );
        let secs = t0.elapsed().as_secs_f64();
        let loaded = if format == "llava" {
            "llava JSON (not an image builder)".to_owned()
        } else {
            let seen = hf_load("card", &dir);
            let rows: u64 = seen
                .as_object()
                .map(|o| o.values().filter_map(|s| s["rows"].as_u64()).sum())
                .unwrap_or(0);
            format!("datasets loads {rows} rows")
        };
        println!(
            "export {format}: {kept} rows in {secs:.1} s, peak RSS {:.0} MiB ({:.0} MiB above idle); {loaded}",
            peak as f64 / 1024.0,
            (peak - idle) as f64 / 1024.0
        );
    }
}

/// Runs `cmd` to the end and returns its peak resident set in KiB (`ru_maxrss`).
fn peak_rss_of(cmd: &mut std::process::Command) -> i64 {
    let child = cmd.spawn().expect("spawned");
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; `status` and `usage` are valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "export failed"
    );
    std::mem::forget(child);
    usage.ru_maxrss
}
