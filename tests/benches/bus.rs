//! Bus + store overhead of the job runtime, with a no-op handler, on loopback.
//!
//! `cargo bench -p atelier-e2e --bench bus` (or `just bench`). Prints, from one run:
//! - raw async-nats JetStream publish throughput (the floor everything else stands on);
//! - throughput: 10,000 jobs submitted as the gateway does (KV record + request publish),
//!   consumed by 1 and by 4 worker replicas (each its own NATS connection), jobs/s from the first
//!   submission to the last `done` event;
//! - latency: 1,000 jobs one at a time, submit → `done` event received, p50/p99.
//!
//! Each twice, side by side: nats-server's default disk sync and `sync_interval: always`.
//!
//! The handler does no work, so the figures are the runtime's own cost: idempotency check, state
//! transitions (compare-and-set in KV), result event, ack.

use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_contracts::{
    ArtifactRef, ChecksumOutput, ChecksumSpec, JobId, JobOutput, JobRequest, JobSpec, Service,
    SCHEMA_VERSION,
};
use atelier_e2e::Cluster;
use atelier_kit::config::WorkerArgs;
use atelier_kit::telemetry::Metrics;
use atelier_kit::{Bus, Handler, JobCtx, JobError, Worker};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

struct Noop;

impl Handler for Noop {
    fn service(&self) -> Service {
        Service::Checksum
    }
    async fn handle(&self, _ctx: &JobCtx, _spec: JobSpec) -> Result<JobOutput, JobError> {
        let a = ArtifactRef {
            key: "sha256/00/noop".into(),
            sha256: "0".repeat(64),
            size: 0,
            content_type: "application/octet-stream".into(),
        };
        Ok(JobOutput::Checksum(ChecksumOutput {
            input: a.clone(),
            report: a,
        }))
    }
}

fn request() -> JobRequest {
    JobRequest {
        schema_version: SCHEMA_VERSION,
        id: JobId::new(),
        submitted_at: chrono::Utc::now(),
        submitted_by: None,
        priority: Default::default(),
        spec: JobSpec::Checksum(ChecksumSpec {
            input: "sha256/00/noop".into(),
            expected_sha256: None,
        }),
    }
}

/// What the gateway does per job: record it as queued, publish the request.
async fn submit(bus: &Bus, states: &atelier_kit::jobstate::JobStates, req: &JobRequest) {
    atelier_kit::worker::enqueue(bus, states, req)
        .await
        .expect("enqueue");
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn raw_publish(bus: &Bus, n: usize) -> f64 {
    use async_nats::jetstream::stream;
    bus.js
        .get_or_create_stream(stream::Config {
            name: "BENCH_RAW".into(),
            subjects: vec!["bench.raw".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let payload = serde_json::to_vec(&request()).unwrap();
    let start = Instant::now();
    let mut acks = futures::stream::FuturesUnordered::new();
    for _ in 0..n {
        acks.push(std::future::IntoFuture::into_future(
            bus.js
                .publish("bench.raw", payload.clone().into())
                .await
                .unwrap(),
        ));
        if acks.len() >= 256 {
            acks.next().await.unwrap().unwrap();
        }
    }
    while let Some(a) = acks.next().await {
        a.unwrap();
    }
    n as f64 / start.elapsed().as_secs_f64()
}

async fn throughput(c: &Cluster, replicas: usize, n: usize) -> (f64, Duration, Duration) {
    let shutdown = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..replicas {
        let bus = Bus::connect(&c.nats_args(), "bench-worker").await.unwrap();
        let w = Worker::new(Noop, bus, c.store.clone(), Arc::new(Metrics::default()))
            .await
            .unwrap();
        workers.push(tokio::spawn(w.run(
            WorkerArgs {
                concurrency: 64,
                max_ack_pending: 10_000,
                ..Default::default()
            },
            shutdown.clone(),
        )));
    }
    let mut done = c
        .bus
        .client
        .subscribe(Service::Checksum.done_subject())
        .await
        .unwrap();
    let submitted = Arc::new(dashmap_like::Map::default());
    let start = Instant::now();
    let sub = {
        let (bus, states, submitted) = (c.bus.clone(), c.states.clone(), submitted.clone());
        tokio::spawn(async move {
            futures::stream::iter(0..n)
                .for_each_concurrent(128, |_| {
                    let (bus, states, submitted) = (bus.clone(), states.clone(), submitted.clone());
                    async move {
                        let req = request();
                        submitted.insert(req.id, Instant::now());
                        submit(&bus, &states, &req).await;
                    }
                })
                .await;
        })
    };
    let mut lat = Vec::with_capacity(n);
    while lat.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(60), done.next())
            .await
            .expect("done events stalled")
            .unwrap();
        let d: atelier_contracts::JobDone = serde_json::from_slice(&m.payload).unwrap();
        if let Some(t) = submitted.get(&d.id) {
            lat.push(t.elapsed());
        }
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    sub.await.unwrap();
    shutdown.cancel();
    for w in workers {
        w.await.unwrap().unwrap();
    }
    lat.sort();
    (rate, pct(&lat, 0.5), pct(&lat, 0.99))
}

/// Submit→done and queued→done (from the moment the request is in the stream) per job.
async fn latency(c: &Cluster, n: usize) -> (Vec<Duration>, Vec<Duration>) {
    let shutdown = CancellationToken::new();
    let bus = Bus::connect(&c.nats_args(), "bench-worker").await.unwrap();
    let w = Worker::new(Noop, bus, c.store.clone(), Arc::new(Metrics::default()))
        .await
        .unwrap();
    let task = tokio::spawn(w.run(WorkerArgs::default(), shutdown.clone()));
    let mut done = c
        .bus
        .client
        .subscribe(Service::Checksum.done_subject())
        .await
        .unwrap();
    let mut lat = Vec::with_capacity(n);
    let mut runtime = Vec::with_capacity(n);
    for _ in 0..n {
        let req = request();
        let t = Instant::now();
        submit(&c.bus, &c.states, &req).await;
        let queued = Instant::now();
        loop {
            let m = done.next().await.unwrap();
            let d: atelier_contracts::JobDone = serde_json::from_slice(&m.payload).unwrap();
            if d.id == req.id {
                break;
            }
        }
        lat.push(t.elapsed());
        runtime.push(queued.elapsed());
    }
    shutdown.cancel();
    task.await.unwrap().unwrap();
    lat.sort();
    runtime.sort();
    (lat, runtime)
}

/// A tiny concurrent map (std only), to timestamp submissions.
mod dashmap_like {
    use std::collections::HashMap;
    use std::sync::Mutex;
    use std::time::Instant;

    use atelier_contracts::JobId;

    #[derive(Default)]
    pub struct Map(Mutex<HashMap<JobId, Instant>>);
    impl Map {
        pub fn insert(&self, k: JobId, v: Instant) {
            self.0.lock().unwrap().insert(k, v);
        }
        pub fn get(&self, k: &JobId) -> Option<Instant> {
            self.0.lock().unwrap().get(k).copied()
        }
    }
}

/// A loopback cluster whose nats-server syncs to disk every two minutes (its default) or before
/// acknowledging every write (`sync_interval: always`, what atelier's configurations use).
async fn cluster(sync_always: bool) -> Cluster {
    if !sync_always {
        return Cluster::local().await.unwrap();
    }
    let conf = std::env::temp_dir().join(format!("atelier-bench-{}.conf", uuid::Uuid::now_v7()));
    std::fs::write(&conf, "jetstream { sync_interval: always }\n").unwrap();
    let store = std::env::temp_dir().join(format!("atelier-objects-{}", uuid::Uuid::now_v7()));
    let store_args = atelier_kit::config::StoreArgs {
        store: store.display().to_string(),
        ..Default::default()
    };
    let c = Cluster::start_with(store_args, Some(conf.clone()), None)
        .await
        .unwrap();
    let _ = std::fs::remove_file(conf);
    c
}

fn main() {
    let n: usize = std::env::var("BENCH_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("atelier bus+store overhead, no-op handler, loopback nats-server (file storage), local store");
        for sync_always in [false, true] {
            let sync = if sync_always { "sync_interval: always" } else { "default sync (every 2 min)" };
            println!("-- nats-server with {sync}");
            run(n, sync_always).await;
        }
    });
}

async fn run(n: usize, sync_always: bool) {
    let c = cluster(sync_always).await;
    let raw = raw_publish(&c.bus, n).await;
    println!("raw JetStream publish (async-nats, 256 in flight): {raw:>9.0} msgs/s");
    for replicas in [1, 4] {
        let c = cluster(sync_always).await;
        let (rate, p50, p99) = throughput(&c, replicas, n).await;
        println!(
            "{n} jobs, {replicas} replica(s): {rate:>9.0} jobs/s  ({:.2} raw publishes per job-time)  submit→done under load p50 {:.2} ms p99 {:.2} ms",
            raw / rate,
            p50.as_secs_f64() * 1e3,
            p99.as_secs_f64() * 1e3
        );
    }
    let c = cluster(sync_always).await;
    let m = (n / 10).max(100);
    let (lat, runtime) = latency(&c, m).await;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{m} jobs one at a time, 1 replica: submit→done p50 {:.3} ms p99 {:.3} ms; queued→done (runtime overhead) p50 {:.3} ms p99 {:.3} ms",
        ms(pct(&lat, 0.5)), ms(pct(&lat, 0.99)), ms(pct(&runtime, 0.5)), ms(pct(&runtime, 0.99))
    );
}
