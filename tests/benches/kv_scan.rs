//! Reading a whole KV bucket, as filter, caption and curation jobs do with `atelier_images` and
//! `atelier_captions`: `cargo bench -p atelier-e2e --bench kv_scan` (ATELIER_BENCH_VALUES, default
//! 100,000 values of about 600 bytes, the size of an image record).
//!
//! Side by side in one run, median of 3 each: `atelier_kit::bus::kv_values` (one ordered consumer
//! delivering each key's last value) and what it replaced (list the keys, then one read per key,
//! 32 in flight).

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use atelier_kit::bus::{kv_put_many, kv_values};
use atelier_kit::nats_server::{NatsServer, NatsServerOptions};
use futures::{StreamExt as _, TryStreamExt as _};

/// The previous `kv_values`: keys, then a read per key.
async fn per_key_reads(store: &kv::Store) -> usize {
    let keys: Vec<String> = store.keys().await.unwrap().try_collect().await.unwrap();
    let values: Vec<Option<bytes::Bytes>> = futures::stream::iter(keys)
        .map(|k| async move { store.get(&k).await.unwrap() })
        .buffered(32)
        .collect()
        .await;
    values
        .into_iter()
        .flatten()
        .filter(|v| serde_json::from_slice::<serde_json::Value>(v).is_ok())
        .count()
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let n: usize = std::env::var("ATELIER_BENCH_VALUES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    let server = NatsServer::start(NatsServerOptions {
        store_dir: dir.path().join("js"),
        port: 0,
        log_file: dir.path().join("nats.log"),
        config: None,
    })
    .unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = jetstream::new(client);
    let store = js
        .create_key_value(kv::Config {
            bucket: "bench".into(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await
        .unwrap();
    let filler = "x".repeat(480);
    let items: Vec<(String, serde_json::Value)> = (0..n)
        .map(|i| {
            let sha = format!("{:064x}", (i as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let v = serde_json::json!({"sha256": sha, "width": 640, "height": 480, "note": filler});
            (sha, v)
        })
        .collect();
    for chunk in items.chunks(5000) {
        kv_put_many(&store, chunk).await.unwrap();
    }
    let (mut ours, mut before) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let t = Instant::now();
        let got: Vec<(String, serde_json::Value)> = kv_values(&store, "").await.unwrap();
        ours.push(t.elapsed());
        assert_eq!(got.len(), n);
        let t = Instant::now();
        assert_eq!(per_key_reads(&store).await, n);
        before.push(t.elapsed());
    }
    let (a, b) = (median(ours), median(before));
    println!(
        "reading {n} KV values of ~600 bytes (loopback nats-server, file storage), median of 3:"
    );
    println!(
        "  kv_values (one ordered consumer)      {:>9.1} ms  {:>9.0} values/s",
        a.as_secs_f64() * 1e3,
        n as f64 / a.as_secs_f64()
    );
    println!(
        "  key listing + a read per key (before) {:>9.1} ms  {:>9.0} values/s",
        b.as_secs_f64() * 1e3,
        n as f64 / b.as_secs_f64()
    );
    println!("  speed-up: {:.1}x", b.as_secs_f64() / a.as_secs_f64());
}
