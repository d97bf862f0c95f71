//! Reliability 3: SeaweedFS stopped for 30 s mid-run. Store operations retry with backoff, and
//! every job completes after it returns. Its own test binary, because it stops its own SeaweedFS.

use std::time::{Duration, Instant};

use atelier_contracts::{ChecksumSpec, JobSpec, JobState};
use atelier_e2e::*;
use tokio_util::sync::CancellationToken;

/// A checksum job that verifies the artifact against its known digest.
fn verify(a: &atelier_contracts::ArtifactRef) -> JobSpec {
    JobSpec::Checksum(ChecksumSpec {
        input: a.key.clone(),
        expected_sha256: Some(a.sha256.clone()),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_outage_of_thirty_seconds() {
    let weed_dir = tempfile::Builder::new()
        .prefix("atelier-weed-outage-")
        .tempdir()
        .unwrap();
    let mut weed = tokio::task::block_in_place(|| Seaweed::start(weed_dir.path())).unwrap();
    let mut c = Cluster::start(weed.store_args("outage", 180))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let env = [
        ("ATELIER_ACK_WAIT_SECS", "5".to_string()),
        ("ATELIER_CONCURRENCY", "4".to_string()),
        ("ATELIER_STORE_RETRY_SECS", "180".to_string()),
    ];
    for _ in 0..2 {
        c.spawn_service("atelier-checksum", &env).unwrap();
    }
    let mut keys = Vec::new();
    for i in 0..30u64 {
        keys.push(
            client
                .upload(bytes_of(9000 + i, 256 << 10), "application/octet-stream")
                .await
                .unwrap()
                .artifact,
        );
    }
    // Some jobs complete before the outage.
    let mut ids = Vec::new();
    for a in &keys[..10] {
        ids.push(client.submit(&verify(a)).await.unwrap().id);
    }
    c.wait_terminal(&ids, Duration::from_secs(30))
        .await
        .unwrap();

    // Stop the store; submit the rest while it is down.
    weed.kill();
    let stopped = Instant::now();
    for a in &keys[10..] {
        ids.push(client.submit(&verify(a)).await.unwrap().id);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    // While the store is down nothing fails: the new jobs are running (retrying) or queued.
    for id in &ids[10..] {
        let (r, _) = c.states.get(*id).await.unwrap().unwrap();
        assert!(
            matches!(r.state, JobState::Running | JobState::Queued),
            "{id} is {:?} during the outage: {:?}",
            r.state,
            r.error
        );
    }
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(stopped.elapsed())).await;
    tokio::task::block_in_place(|| weed.restart()).unwrap();
    eprintln!(
        "drill: store was down for {:.1} s",
        stopped.elapsed().as_secs_f64()
    );

    let records = c
        .wait_terminal(&ids, Duration::from_secs(120))
        .await
        .unwrap();
    let bad: Vec<_> = records
        .iter()
        .filter(|r| r.state != JobState::Succeeded)
        .map(|r| (r.id, r.state, r.error.clone()))
        .collect();
    assert!(bad.is_empty(), "{bad:?}");
    // The outage cost retries, not failures: log lines show backoff in the workers' logs.
    let logs: String = std::fs::read_dir(c.tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("atelier-checksum")
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("object store unavailable; retrying"),
        "no retry was logged"
    );
    shutdown.cancel();
}
