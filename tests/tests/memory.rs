//! A1111's `memory` route from the worker reports: each live worker's resident set, the GPUs the
//! workers' machines have (one GPU seen by two workers counted once), stale reports left out; and
//! a real worker's own report appearing in it.

use std::time::Duration;

use atelier_contracts::{GpuMemory, Service, WorkerReport};
use atelier_e2e::*;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

fn gpu(uuid: &str, used_mib: u64) -> GpuMemory {
    GpuMemory {
        index: 0,
        uuid: uuid.into(),
        name: "Test GPU".into(),
        total: 1000 << 20,
        used: used_mib << 20,
        free: (1000 - used_mib) << 20,
    }
}

fn report(instance: &str, gpus: Vec<GpuMemory>, age_s: i64) -> WorkerReport {
    WorkerReport {
        service: Service::Sampler,
        instance: instance.into(),
        slots: 1,
        running: 0,
        mean_run_s: None,
        rss_bytes: Some(300 << 20),
        gpus,
        at: chrono::Utc::now() - chrono::Duration::seconds(age_s),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_reports_the_workers_and_their_gpus() {
    let mut c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let base = c
        .gateway(vec![], Default::default(), shutdown.clone())
        .await
        .unwrap();
    let get = || async {
        reqwest::get(format!("{base}/sdapi/v1/memory"))
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    };
    // No worker: A1111's shape, with the reason there is no GPU figure.
    let m = get().await;
    assert!(m["ram"]["total"].as_u64().unwrap() > 0, "{m}");
    assert!(m["ram"]["process"].as_u64().unwrap() > 0, "{m}");
    assert!(m["cuda"]["error"].as_str().unwrap().contains("GPU"), "{m}");

    let workers = c.bus.workers_kv().await.unwrap();
    for (key, r) in [
        (
            "sampler.a",
            report("a", vec![gpu("GPU-1", 100), gpu("GPU-2", 200)], 0),
        ),
        ("sampler.b", report("b", vec![gpu("GPU-1", 100)], 0)),
        ("sampler.old", report("old", vec![gpu("GPU-9", 900)], 3600)),
    ] {
        workers
            .put(key, serde_json::to_vec(&r).unwrap().into())
            .await
            .unwrap();
    }
    let m = get().await;
    let sys = &m["cuda"]["system"];
    assert_eq!(sys["total"].as_u64(), Some(2000 << 20), "{m}");
    assert_eq!(sys["used"].as_u64(), Some(300 << 20), "{m}");
    assert_eq!(sys["free"].as_u64(), Some(1700 << 20), "{m}");
    assert_eq!(m["cuda"]["devices"].as_array().unwrap().len(), 2, "{m}");
    let names: Vec<&str> = m["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["instance"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b"], "the stale report is left out: {m}");
    for k in ["sampler.a", "sampler.b", "sampler.old"] {
        workers.delete(k).await.unwrap();
    }

    // A real worker reports its own resident set.
    c.spawn_service("atelier-checksum", &[]).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = get().await;
        let w = m["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["service"] == "checksum")
            .cloned();
        if let Some(w) = w {
            assert!(w["rss"].as_u64().unwrap() > 1 << 20, "{w}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never reported: {m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
}
