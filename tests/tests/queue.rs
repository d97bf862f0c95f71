//! Priorities and queue places: jobs submitted with `Atelier-Priority` wait in their service's
//! high / normal / low queue; a queued job's record (and its event stream) says how many jobs
//! are ahead of it and when it should start; a worker takes every high job before any normal one
//! and every normal one before any low one.

use std::time::Duration;

use atelier_contracts::JobRecord;
use atelier_contracts::{
    subjects, ChecksumSpec, JobId, JobSpec, JobState, Priority, Service, WorkerReport,
};
use atelier_e2e::*;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_jobs_run_first_and_queued_jobs_know_their_place() {
    let mut c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let input = client
        .upload(bytes_of(7, 4096), "application/octet-stream")
        .await
        .unwrap()
        .artifact
        .key
        .to_string();
    let spec = JobSpec::Checksum(ChecksumSpec {
        input,
        expected_sha256: None,
    });

    // A worker that holds 2 jobs on 2 slots and takes 3 s a job, as the ETA sees it (reported
    // by hand: no worker runs yet, so the jobs stay queued).
    let workers = c.bus.workers_kv().await.unwrap();
    let report = WorkerReport {
        service: Service::Checksum,
        instance: "by-hand".into(),
        slots: 2,
        running: 2,
        mean_run_s: Some(3.0),
        rss_bytes: None,
        gpus: vec![],
        at: chrono::Utc::now(),
    };
    workers
        .put(
            "checksum.by-hand",
            serde_json::to_vec(&report).unwrap().into(),
        )
        .await
        .unwrap();

    // Submitted interleaved; expected positions follow priority, then submission.
    let order = [
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Low,
        Priority::Normal,
        Priority::High,
        Priority::Low,
        Priority::Normal,
    ];
    let mut submitted: Vec<(Priority, JobId)> = Vec::new();
    for p in order {
        let r = client.clone().with_priority(p).submit(&spec).await.unwrap();
        assert_eq!(r.priority, p);
        submitted.push((p, r.id));
    }
    let mut expected: Vec<(Priority, JobId)> = Vec::new();
    for p in Priority::ORDER {
        expected.extend(submitted.iter().filter(|(q, _)| *q == p));
    }
    for (position, (p, id)) in expected.iter().enumerate() {
        let r = client.job(&id.to_string()).await.unwrap();
        assert_eq!(r.priority, *p);
        let place = r
            .queue
            .unwrap_or_else(|| panic!("queued job {id} has no place"));
        assert_eq!(place.position, position as u64, "{p:?} job {id}");
        assert_eq!((place.slots, place.running), (2, 2));
        // (position + running + 1 - slots) jobs before it, 2 at a time, 3 s each.
        let eta = place.eta_s.expect("an ETA from the report");
        assert!(
            (eta - (position as f64 + 1.0) * 1.5).abs() < 1e-9,
            "eta {eta}"
        );
    }

    // The last low job's event stream: its place now, then again as the jobs ahead run.
    let last_low = expected.last().unwrap().1;
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<JobRecord>::new()));
    let follower = {
        let (client, seen) = (client.clone(), seen.clone());
        tokio::spawn(async move {
            client
                .follow(&last_low.to_string(), |r| {
                    seen.lock().unwrap().push(r.clone())
                })
                .await
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while seen.lock().unwrap().is_empty() {
        assert!(std::time::Instant::now() < deadline, "no first event");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(first.queue.map(|q| q.position), Some(7));

    workers.delete("checksum.by-hand").await.unwrap();
    let mut done = c
        .bus
        .client
        .subscribe(Service::Checksum.done_subject())
        .await
        .unwrap();
    c.spawn_service("atelier-checksum", &[("ATELIER_CONCURRENCY", "1".into())])
        .unwrap();
    let mut finished = Vec::new();
    while finished.len() < expected.len() {
        let msg = tokio::time::timeout(Duration::from_secs(60), done.next())
            .await
            .expect("jobs finish")
            .unwrap();
        let d: atelier_contracts::JobDone = serde_json::from_slice(&msg.payload).unwrap();
        finished.push(d.id);
    }
    let expected_ids: Vec<JobId> = expected.iter().map(|(_, id)| *id).collect();
    assert_eq!(
        finished, expected_ids,
        "one slot: high, then normal, then low, each in order"
    );

    let last = tokio::time::timeout(Duration::from_secs(30), follower)
        .await
        .expect("the event stream ends")
        .unwrap()
        .unwrap();
    assert_eq!(last.state, JobState::Succeeded);
    let positions: Vec<u64> = seen
        .lock()
        .unwrap()
        .iter()
        .filter_map(|r| r.queue.as_ref().map(|q| q.position))
        .collect();
    assert!(
        positions.windows(2).all(|w| w[0] >= w[1]),
        "places only go down: {positions:?}"
    );

    // The real worker reports itself (every few seconds): one slot and the mean of its jobs.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let real = loop {
        let reports: Vec<(String, WorkerReport)> =
            atelier_kit::bus::kv_values(&workers, "checksum.")
                .await
                .unwrap();
        let real = reports
            .into_iter()
            .map(|(_, r)| r)
            .find(|r| r.instance != "by-hand" && r.mean_run_s.is_some());
        match real {
            Some(r) => break r,
            None if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(250)).await
            }
            None => panic!("no report with a mean run time from the worker"),
        }
    };
    assert_eq!((real.slots, real.running), (1, 0));
    assert!(real.mean_run_s.is_some_and(|m| m > 0.0 && m < 60.0));

    // A job published straight onto the high queue's subject is recorded as high.
    let spec_json = serde_json::to_value(&spec).unwrap();
    let id = JobId::new();
    let request = serde_json::json!({
        "schema_version": atelier_contracts::SCHEMA_VERSION,
        "id": id,
        "submitted_at": chrono::Utc::now(),
        "spec": spec_json,
    });
    c.bus
        .js
        .publish(
            Service::Checksum.request_subject_for(Priority::High),
            serde_json::to_vec(&request).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let records = c
        .wait_terminal(&[id], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(records[0].state, JobState::Succeeded);
    assert_eq!(records[0].priority, Priority::High);
    assert_eq!(
        subjects::priority_of(&Service::Checksum.request_subject_for(Priority::Low)),
        Priority::Low
    );

    // The CLI's --priority.
    let out = tokio::process::Command::new(bin("atelier"))
        .args(["submit", "--gateway", client.base(), "--priority", "low"])
        .arg(serde_json::to_string(&spec).unwrap())
        .env_remove("ATELIER_API_KEY")
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record: atelier_contracts::JobRecord = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record.priority, Priority::Low);
    let out = tokio::process::Command::new(bin("atelier"))
        .args([
            "submit",
            "--gateway",
            client.base(),
            "--priority",
            "urgent",
            "{}",
        ])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--priority"));

    // A priority that is not one: 422 naming the header.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/jobs", client.base()))
        .header("Atelier-Priority", "urgent")
        .json(
            &serde_json::json!({"schema_version": atelier_contracts::SCHEMA_VERSION, "spec": spec}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_priority");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Atelier-Priority"));
    shutdown.cancel();
}
