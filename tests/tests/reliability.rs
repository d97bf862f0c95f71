//! The reliability suite: real nats-server, real SeaweedFS, real service processes.
//! (The 30-second store outage lives in `store_outage.rs`, with its own SeaweedFS.)

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use atelier_contracts::{
    ArtifactKey, ChecksumSpec, DeadLetter, JobDone, JobFailed, JobId, JobOutput, JobRequest,
    JobSpec, JobState, Service, SCHEMA_VERSION,
};
use atelier_e2e::*;
use atelier_kit::config::WorkerArgs;
use rand::Rng;
use tokio_util::sync::CancellationToken;

fn checksum(key: &str) -> JobSpec {
    JobSpec::Checksum(ChecksumSpec {
        input: key.into(),
        expected_sha256: None,
    })
}

/// `done` events per job id in ATELIER_EVENTS.
async fn done_events(c: &Cluster) -> HashMap<JobId, usize> {
    let mut counts = HashMap::new();
    for m in c
        .read_stream("ATELIER_EVENTS", &Service::Checksum.done_subject())
        .await
        .unwrap()
    {
        let done: JobDone = serde_json::from_slice(&m.payload).unwrap();
        *counts.entry(done.id).or_default() += 1;
    }
    counts
}

fn fast_worker_env() -> Vec<(&'static str, String)> {
    vec![
        ("ATELIER_ACK_WAIT_SECS", "2".into()),
        ("ATELIER_CONCURRENCY", "2".into()),
        ("ATELIER_MAX_DELIVER", "50".into()),
        ("ATELIER_MAX_WORKER_DEATHS", "50".into()),
        ("ATELIER_RETRY_BACKOFF_MS", "100".into()),
    ]
}

/// 1. kill -9 a worker mid-job, 20 times: every job completes once on a surviving replica; no
/// duplicate results or artifacts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_workers_mid_job_twenty_times() {
    let mut c = Cluster::start(shared_s3_store(60)).await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    for _ in 0..3 {
        c.spawn_service("atelier-checksum", &fast_worker_env())
            .unwrap();
    }
    // Distinct inputs, large enough that digesting takes a while.
    let mut inputs = Vec::new();
    for i in 0..20u64 {
        let up = client
            .upload(bytes_of(1000 + i, 6 << 20), "application/octet-stream")
            .await
            .unwrap();
        inputs.push(up.artifact);
    }
    let mut ids = Vec::new();
    let mut rng = rand::thread_rng();
    let mut mid_job_kills = 0;
    // 20 rounds of 5 jobs here; 300 rounds of 7 (2,100 jobs) with ATELIER_DRILL=full.
    let (rounds, per_round) = (drill_count(20, 300), drill_count(5, 7));
    for round in 0..rounds {
        let mut round_ids = Vec::new();
        for j in 0..per_round {
            let input = &inputs[(round * per_round + j) % inputs.len()];
            round_ids.push(client.submit(&checksum(&input.key)).await.unwrap().id);
        }
        ids.extend(&round_ids);
        // Kill a process that is running one of this round's jobs (its pid is in the record).
        let live = c.live_services();
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        let victim = loop {
            let mut running = None;
            for id in &round_ids {
                if let Ok(Some((r, _))) = c.states.get(*id).await {
                    let pid = r
                        .worker
                        .as_deref()
                        .and_then(|w| w.split(':').nth(1))
                        .and_then(|p| p.parse::<u32>().ok());
                    if r.state == JobState::Running && pid.is_some_and(|p| live.contains(&p)) {
                        running = pid;
                        break;
                    }
                }
            }
            if let Some(pid) = running {
                mid_job_kills += 1;
                break pid;
            }
            if std::time::Instant::now() > deadline {
                break live[rng.gen_range(0..live.len())];
            }
            tokio::time::sleep(Duration::from_millis(rng.gen_range(5..30))).await;
        };
        c.kill9(victim);
        c.spawn_service("atelier-checksum", &fast_worker_env())
            .unwrap();
    }
    let records = c
        .wait_terminal(&ids, Duration::from_secs(drill_count(240, 3600) as u64))
        .await
        .unwrap();
    let failed: Vec<_> = records
        .iter()
        .filter(|r| r.state != JobState::Succeeded)
        .map(|r| (r.id, r.state, r.error.clone()))
        .collect();
    assert!(failed.is_empty(), "jobs did not succeed: {failed:?}");
    // The kills landed mid-job: some jobs needed another delivery.
    let redelivered = records.iter().filter(|r| r.attempts > 1).count();
    assert!(
        redelivered > 0,
        "no job was interrupted; the test did not test anything"
    );
    // Exactly one result per job.
    let done = done_events(&c).await;
    for id in &ids {
        assert_eq!(
            done.get(id),
            Some(&1),
            "job {id} has {:?} done events",
            done.get(id)
        );
    }
    // No duplicate artifacts: the store holds the inputs and one report per distinct input.
    let objects = c.store.list("sha256").await.unwrap();
    let reports: HashSet<String> = records
        .iter()
        .map(|r| match &r.output {
            Some(JobOutput::Checksum(o)) => o.report.key.clone(),
            other => panic!("succeeded checksum job with output {other:?}"),
        })
        .collect();
    assert_eq!(reports.len(), inputs.len());
    assert_eq!(
        objects.len(),
        inputs.len() + reports.len(),
        "unexpected objects: {:?}",
        objects
            .iter()
            .map(|o| o.location.to_string())
            .collect::<Vec<_>>()
    );
    assert!(c.store.list("tmp").await.unwrap().is_empty());
    eprintln!("drill: kill -9 x{rounds} ({mid_job_kills} while the victim ran a job): {} jobs, {redelivered} redelivered, 0 lost, 0 duplicated, 0 stuck", ids.len());
    shutdown.cancel();
}

/// 2. Restart nats-server mid-run (file storage): every job completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_server_restart_mid_run() {
    let mut c = Cluster::start(shared_s3_store(60)).await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    for _ in 0..2 {
        c.spawn_service("atelier-checksum", &fast_worker_env())
            .unwrap();
    }
    let mut ids = Vec::new();
    for i in 0..40u64 {
        let up = client
            .upload(bytes_of(2000 + i, 1 << 20), "application/octet-stream")
            .await
            .unwrap();
        ids.push(client.submit(&checksum(&up.artifact.key)).await.unwrap().id);
    }
    // Restart while jobs are queued and running.
    tokio::task::block_in_place(|| c.nats.restart()).unwrap();
    // Submissions resume once clients have reconnected.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    for i in 0..20u64 {
        let up = client
            .upload(bytes_of(3000 + i, 64 << 10), "application/octet-stream")
            .await
            .unwrap();
        loop {
            match client.submit(&checksum(&up.artifact.key)).await {
                Ok(r) => {
                    ids.push(r.id);
                    break;
                }
                Err(e) if std::time::Instant::now() < deadline => {
                    eprintln!("submit during reconnect: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("gateway never recovered: {e}"),
            }
        }
    }
    let records = c
        .wait_terminal(&ids, Duration::from_secs(120))
        .await
        .unwrap();
    assert!(
        all_succeeded(&records),
        "{:?}",
        records
            .iter()
            .filter(|r| r.state != JobState::Succeeded)
            .collect::<Vec<_>>()
    );
    let done = done_events(&c).await;
    assert!(ids.iter().all(|id| done.get(id) == Some(&1)));
    shutdown.cancel();
}

/// A checksum service whose handler always fails (retryably) on one input: a poison job.
struct FailsOn(String);

impl atelier_kit::Handler for FailsOn {
    fn service(&self) -> Service {
        Service::Checksum
    }
    async fn handle(
        &self,
        ctx: &atelier_kit::JobCtx,
        spec: JobSpec,
    ) -> Result<JobOutput, atelier_kit::JobError> {
        let JobSpec::Checksum(s) = &spec else {
            return Err(atelier_kit::JobError::permanent(
                "wrong_service",
                "not a checksum job",
            ));
        };
        if s.input == self.0 {
            return Err(atelier_kit::JobError::retryable(
                "flaky_dependency",
                "the dependency is down (always)",
            ));
        }
        atelier_kit::Handler::handle(&atelier_checksum::Checksum, ctx, spec).await
    }
}

/// 4. Poison messages: an undecodable payload and a handler that always fails are dead-lettered
/// (the latter after max_deliver) with their reasons; other jobs are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn poison_messages_are_dead_lettered() {
    let c = Cluster::start(shared_s3_store(30)).await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let poison = client
        .upload(bytes_of(7, 100), "application/octet-stream")
        .await
        .unwrap()
        .artifact
        .key;
    let rt = atelier_kit::service::Runtime::connect(
        &c.service_args(WorkerArgs {
            max_deliver: 3,
            retry_backoff_ms: 50,
            ack_wait_secs: 5.0,
            ..Default::default()
        }),
        "poison-test",
    )
    .await
    .unwrap();
    let worker = atelier_kit::Worker::new(
        FailsOn(poison.clone()),
        rt.bus.clone(),
        rt.store.clone(),
        rt.metrics.clone(),
    )
    .await
    .unwrap();
    let ws = shutdown.clone();
    let running = tokio::spawn(worker.run(
        WorkerArgs {
            max_deliver: 3,
            retry_backoff_ms: 50,
            ack_wait_secs: 5.0,
            ..Default::default()
        },
        ws,
    ));

    // Undecodable payload straight onto the bus.
    c.bus
        .js
        .publish(
            Service::Checksum.request_subject(),
            "{this is not json".into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // A job of another service's kind published onto this service's subject, and one of a kind
    // this build does not know: each ends failed with its reason where its publisher looks.
    let misrouted = JobRequest {
        schema_version: SCHEMA_VERSION,
        id: JobId::new(),
        submitted_at: chrono::Utc::now(),
        submitted_by: None,
        priority: Default::default(),
        spec: serde_json::from_value(serde_json::json!({"kind": "caption", "dataset": "d"}))
            .unwrap(),
    };
    let unknown = JobId::new();
    let unknown_body = serde_json::json!({"schema_version": SCHEMA_VERSION, "id": unknown,
        "submitted_at": chrono::Utc::now(), "spec": {"kind": "teleport"}});
    for body in [
        serde_json::to_vec(&misrouted).unwrap(),
        unknown_body.to_string().into_bytes(),
    ] {
        c.bus
            .js
            .publish(Service::Checksum.request_subject(), body.into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let bad = client.submit(&checksum(&poison)).await.unwrap();
    let mut good = Vec::new();
    for i in 0..10u64 {
        let up = client
            .upload(bytes_of(100 + i, 1000), "application/octet-stream")
            .await
            .unwrap();
        good.push(client.submit(&checksum(&up.artifact.key)).await.unwrap().id);
    }
    let records = c
        .wait_terminal(&good, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(all_succeeded(&records), "other jobs were affected");
    let bad_record = c
        .wait_terminal(&[bad.id], Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(bad_record.state, JobState::Failed);
    assert_eq!(bad_record.attempts, 3);
    let err = bad_record.error.unwrap();
    assert_eq!(err.code, "flaky_dependency");
    assert!(
        err.message.contains("dead-lettered after 3 deliveries"),
        "{}",
        err.message
    );

    let letters: Vec<DeadLetter> = c
        .read_stream("ATELIER_DLQ", &Service::Checksum.dead_letter_subject())
        .await
        .unwrap()
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert_eq!(letters.len(), 4, "{letters:?}");
    let misrouted_record = c
        .wait_terminal(&[misrouted.id], Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(misrouted_record.state, JobState::Failed);
    let reason = misrouted_record.error.unwrap();
    assert_eq!(reason.code, "wrong_service");
    assert!(
        reason
            .message
            .contains("a caption job arrived at the checksum service"),
        "{}",
        reason.message
    );
    let failed_events = |service: Service| {
        let c = &c;
        async move {
            c.read_stream("ATELIER_EVENTS", &service.failed_subject())
                .await
                .unwrap()
                .iter()
                .map(|m| serde_json::from_slice::<JobFailed>(&m.payload).unwrap())
                .collect::<Vec<_>>()
        }
    };
    let on_captioner = failed_events(Service::Captioner).await;
    assert!(on_captioner
        .iter()
        .any(|f| f.id == misrouted.id && f.error.code == "wrong_service"));
    let on_checksum = failed_events(Service::Checksum).await;
    let teleport = on_checksum
        .iter()
        .find(|f| f.id == unknown)
        .expect("a failed event for the job of an unknown kind");
    assert_eq!(teleport.error.code, "undecodable");
    assert!(
        teleport.error.message.contains("teleport"),
        "{}",
        teleport.error.message
    );
    // Two undecodable letters: the bytes that are not JSON and the job of an unknown kind.
    let undecodable = letters
        .iter()
        .find(|l| l.reason.code == "undecodable" && l.payload == "{this is not json")
        .expect("undecodable letter");
    assert_eq!(undecodable.deliveries, 1);
    assert!(letters
        .iter()
        .any(|l| l.reason.code == "undecodable" && l.payload.contains("teleport")));
    let failing = letters
        .iter()
        .find(|l| l.reason.code == "flaky_dependency")
        .expect("failing-handler letter");
    assert_eq!(failing.deliveries, 3);
    assert!(failing.payload.contains(&bad.id.to_string()));
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

/// 5. Gateway bad input: a 4xx with a clear JSON message each; no panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_rejects_bad_input_clearly() {
    let c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let (full_key, full) = atelier_gateway::auth::generate_key("full", "*").unwrap();
    let (ro_key, ro) = atelier_gateway::auth::generate_key("reader", "jobs:read").unwrap();
    let args = atelier_gateway::GatewayArgs {
        max_json_bytes: 4096,
        max_upload_bytes: 1 << 20,
        ..Default::default()
    };
    let base = c
        .gateway(vec![full, ro], args, shutdown.clone())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let post = |body: &'static str, key: Option<&str>| {
        let mut r = http
            .post(format!("{base}/v1/jobs"))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r
    };
    async fn expect(r: reqwest::RequestBuilder, status: u16, code: &str) {
        let resp = r.send().await.unwrap();
        let got = resp.status().as_u16();
        let body: serde_json::Value = resp
            .json()
            .await
            .unwrap_or_else(|e| panic!("{code}: body is not JSON: {e}"));
        assert_eq!(got, status, "{code}: {body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(
            body["error"]["message"].as_str().unwrap().len() > 10,
            "{body}"
        );
    }
    let k = Some(full_key.as_str());
    expect(post("{\"schema_version\":1,", k), 400, "invalid_json").await;
    expect(
        post(
            r#"{"schema_version":1,"spec":{"kind":"teleport","input":"x"}}"#,
            k,
        ),
        422,
        "unknown_job_kind",
    )
    .await;
    expect(
        post(
            r#"{"schema_version":7,"spec":{"kind":"checksum","input":"x"}}"#,
            k,
        ),
        422,
        "unsupported_schema_version",
    )
    .await;
    expect(
        post(
            r#"{"schema_version":1,"spec":{"kind":"checksum","input":"/etc/passwd"}}"#,
            k,
        ),
        422,
        "bad_artifact_key",
    )
    .await;
    let huge: &'static str = Box::leak(
        format!(
            r#"{{"schema_version":1,"spec":{{"kind":"checksum","input":"{}"}}}}"#,
            "a".repeat(10_000)
        )
        .into_boxed_str(),
    );
    expect(post(huge, k), 413, "payload_too_large").await;
    // An upload declaring more than the limit is refused from its headers, before any body is read
    // (over a raw socket: an HTTP client writing the 2 MiB body would race the early answer).
    let (status, body) = raw_request(
        &base,
        "POST",
        "/v1/uploads",
        &full_key,
        &[("Content-Length", (2u64 << 20).to_string())],
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("payload_too_large"), "{body}");
    // A1111 routes have their own limit (64 MiB by default), answered as JSON naming it.
    let (status, body) = raw_request(
        &base,
        "POST",
        "/sdapi/v1/txt2img",
        &full_key,
        &[("Content-Length", (300u64 << 20).to_string())],
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body.contains("payload_too_large") && body.contains("67108864"),
        "{body}"
    );
    expect(
        post(
            r#"{"schema_version":1,"spec":{"kind":"checksum","input":"x"}}"#,
            None,
        ),
        401,
        "unauthorized",
    )
    .await;
    expect(
        post(
            r#"{"schema_version":1,"spec":{"kind":"checksum","input":"x"}}"#,
            Some("atl_wrong"),
        ),
        401,
        "unauthorized",
    )
    .await;
    expect(
        post(
            r#"{"schema_version":1,"spec":{"kind":"checksum","input":"x"}}"#,
            Some(&ro_key),
        ),
        403,
        "forbidden",
    )
    .await;
    // Traversal and absolute keys. HTTP clients normalise `..` away, so these go over a raw socket
    // exactly as written.
    for path in [
        "/v1/artifacts/../../etc/passwd",
        "/v1/artifacts/sha256/../../secret",
        "/v1/artifacts//etc/passwd",
        "/v1/artifacts/sha256/..%2F..%2Fsecret",
        "/v1/artifacts/%2Fetc%2Fpasswd",
    ] {
        let (status, body) = raw_get(&base, path, &full_key).await;
        let body: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|_| panic!("{path}: {body}"));
        assert_eq!(
            (status, body["error"]["code"].as_str().unwrap()),
            (400, "bad_artifact_key"),
            "{path}: {body}"
        );
    }
    expect(
        http.get(format!("{base}/v1/artifacts/sha256/00/none"))
            .bearer_auth(&full_key),
        404,
        "artifact_not_found",
    )
    .await;
    expect(
        http.get(format!("{base}/v1/jobs/not-a-uuid"))
            .bearer_auth(&full_key),
        400,
        "bad_job_id",
    )
    .await;
    expect(
        http.get(format!("{base}/v1/jobs/{}", JobId::new()))
            .bearer_auth(&full_key),
        404,
        "job_not_found",
    )
    .await;
    expect(
        http.get(format!("{base}/v1/images/xyz"))
            .bearer_auth(&full_key),
        400,
        "bad_sha256",
    )
    .await;
    expect(http.get(format!("{base}/v2/nothing")), 404, "no_such_route").await;
    // Still healthy, and a good request still works.
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let ok = post(
        r#"{"schema_version":1,"spec":{"kind":"checksum","input":"sha256/ab/x"}}"#,
        k,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(ok.status(), 202);

    // A request the bus cannot carry (NATS' max_payload, 1 MiB) is a 413 at submit, not a
    // retryable 503, and nothing is recorded: a caption job listing 20,000 images.
    let roomy = atelier_gateway::GatewayArgs {
        max_json_bytes: 8 << 20,
        ..Default::default()
    };
    let (big_key, big) = atelier_gateway::auth::generate_key("big", "*").unwrap();
    let base2 = c.gateway(vec![big], roomy, shutdown.clone()).await.unwrap();
    let images: Vec<String> = (0..20_000).map(|i| format!("{i:064x}")).collect();
    let job = serde_json::json!({"schema_version": 1, "spec": {"kind": "caption",
        "dataset": "many", "images": images}});
    let before =
        futures::StreamExt::count(c.bus.jobs_kv().await.unwrap().keys().await.unwrap()).await;
    let resp = http
        .post(format!("{base2}/v1/jobs"))
        .bearer_auth(&big_key)
        .json(&job)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["error"]["code"], "request_too_large", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/uploads"),
        "{body}"
    );
    let after =
        futures::StreamExt::count(c.bus.jobs_kv().await.unwrap().keys().await.unwrap()).await;
    assert_eq!(before, after, "a refused request left a job record");
    shutdown.cancel();
}

/// GET over a raw TCP connection, so the path reaches the server unnormalised.
async fn raw_get(base: &str, path: &str, key: &str) -> (u16, String) {
    raw_request(base, "GET", path, key, &[]).await
}

/// A request's head alone over a raw TCP connection; returns the status and body of the answer.
async fn raw_request(
    base: &str,
    method: &str,
    path: &str,
    key: &str,
    headers: &[(&str, String)],
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// 6. A plain NATS client in another language (nats-py) publishes the documented
/// `atelier.v1.images.ingested` event, and the system records it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_nats_client_announces_images() {
    let mut c = Cluster::start(shared_s3_store(30)).await.unwrap();
    c.spawn_service("atelier-ingest", &[]).unwrap();
    let image: bytes::Bytes =
        atelier_ingest::samples::scene_bytes(55, 80, 60, image::ImageFormat::Png).into();
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&image));
    // A truncated JPEG: recorded and flagged, never a crash or a lost event.
    let jpeg = atelier_ingest::samples::scene_bytes(56, 80, 60, image::ImageFormat::Jpeg);
    let broken: bytes::Bytes = jpeg[..jpeg.len() / 3].to_vec().into();
    let broken_sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&broken));
    c.store
        .put_at(
            &ArtifactKey::parse("incoming/broken.jpg").unwrap(),
            broken.clone(),
            "image/jpeg",
        )
        .await
        .unwrap();
    for key in ["incoming/a.png", "mirror/a-copy.png"] {
        c.store
            .put_at(
                &ArtifactKey::parse(key).unwrap(),
                image.clone(),
                "image/png",
            )
            .await
            .unwrap();
    }
    let script = r#"
import asyncio, json, sys
import nats
async def main():
    nc = await nats.connect(sys.argv[1])
    js = nc.jetstream()
    for key, src in (("incoming/a.png", "https://example.org/a.png"), ("mirror/a-copy.png", "file:///mirror/a.png")):
        event = {"schema_version": 1, "dataset": "py", "images": [
            {"key": key, "sha256": sys.argv[2], "source": src, "license": "CC-BY-4.0", "metadata": {"camera": "x100"}}]}
        ack = await js.publish("atelier.v1.images.ingested", json.dumps(event).encode())
        print("published", ack.seq)
    broken = {"schema_version": 1, "dataset": "py", "images": [{"key": "incoming/broken.jpg"}]}
    await js.publish("atelier.v1.images.ingested", json.dumps(broken).encode())
    await nc.close()
asyncio.run(main())
"#;
    let out = std::process::Command::new(tool("python"))
        .arg("-c")
        .arg(script)
        .arg(c.nats.url())
        .arg(&sha)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nats-py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let images = c.bus.images_kv().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let record: atelier_contracts::images::ImageRecord = loop {
        if let Ok(Some(v)) = images.get(&sha).await {
            let r: atelier_contracts::images::ImageRecord = serde_json::from_slice(&v).unwrap();
            if r.sources.len() == 2 {
                break r;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "image not recorded with both sources"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(record.key, ArtifactKey::for_sha256(&sha).to_string());
    assert_eq!(record.size, image.len() as u64);
    assert_eq!(record.datasets, vec!["py".to_string()]);
    assert_eq!(record.flag, None);
    assert_eq!(
        (record.format.as_deref(), record.width, record.height),
        (Some("png"), Some(80), Some(60))
    );
    assert_eq!(record.content_type, "image/png");
    assert_eq!(record.phash.as_ref().map(String::len), Some(16));
    assert_eq!(record.sources[0].metadata["camera"], "x100");
    // Same bytes twice → one record, and the bytes are at their content address.
    assert_eq!(
        c.store
            .get_bytes(&ArtifactKey::for_sha256(&sha))
            .await
            .unwrap(),
        image
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let flagged: atelier_contracts::images::ImageRecord = loop {
        if let Ok(Some(v)) = images.get(&broken_sha).await {
            break serde_json::from_slice(&v).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "truncated image not recorded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        flagged
            .flag
            .as_deref()
            .is_some_and(|f| f.starts_with("corrupt:")),
        "{flagged:?}"
    );
    assert_eq!((flagged.width, flagged.format.as_deref()), (None, None));
}

/// A handler that reports progress, then waits to be cancelled (or for 30 s).
struct Waits(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl atelier_kit::Handler for Waits {
    fn service(&self) -> Service {
        Service::Checksum
    }
    async fn handle(
        &self,
        ctx: &atelier_kit::JobCtx,
        _spec: JobSpec,
    ) -> Result<JobOutput, atelier_kit::JobError> {
        ctx.progress(0.25, Some("warming up".to_string())).await;
        tokio::select! {
            _ = ctx.cancellation().cancelled() => {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
                Err(atelier_kit::JobError::Cancelled)
            }
            _ = tokio::time::sleep(Duration::from_secs(30)) => Err(atelier_kit::JobError::permanent("not_cancelled", "cancellation never arrived")),
        }
    }
}

/// Progress streams over SSE, and DELETE /v1/jobs/{id} reaches the running handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_streams_and_cancellation_reaches_the_worker() {
    let c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rt = atelier_kit::service::Runtime::connect(
        &c.service_args(WorkerArgs::default()),
        "cancel-test",
    )
    .await
    .unwrap();
    let worker = atelier_kit::Worker::new(
        Waits(seen.clone()),
        rt.bus.clone(),
        rt.store.clone(),
        rt.metrics.clone(),
    )
    .await
    .unwrap();
    let running = tokio::spawn(worker.run(WorkerArgs::default(), shutdown.clone()));

    let job = client
        .submit(&checksum("sha256/00/whatever"))
        .await
        .unwrap();
    let id = job.id.to_string();
    // Follow the job's events; every update also goes to `seen_tx`, so the test cancels only
    // after the event stream has shown the handler's progress.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel();
    let follower = {
        let (client, id) = (client.clone(), id.clone());
        tokio::spawn(async move {
            let mut updates = Vec::new();
            let last = client
                .follow(&id, |r| {
                    let _ = seen_tx.send((r.state, r.progress.clone()));
                    updates.push((r.state, r.progress.clone()));
                })
                .await
                .unwrap();
            (updates, last)
        })
    };
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some((state, progress)) = seen_rx.recv().await {
            if progress.is_some_and(|p| p.fraction == 0.25) {
                assert_eq!(state, JobState::Running);
                return;
            }
        }
    })
    .await
    .expect("the event stream never showed the handler's progress");
    let cancelled = client.cancel(&id).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    let (updates, last) = tokio::time::timeout(Duration::from_secs(10), follower)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(last.state, JobState::Cancelled);
    assert!(
        updates.iter().any(|(s, p)| *s == JobState::Running
            && p.as_ref()
                .is_some_and(|p| p.message.as_deref() == Some("warming up"))),
        "{updates:?}"
    );
    // The handler saw the cancellation (within the 1 s poll), and no result was published.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !seen.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the running handler never saw the cancellation"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(done_events(&c).await.is_empty());
    assert_eq!(
        c.states.get(job.id).await.unwrap().unwrap().0.state,
        JobState::Cancelled
    );
    // Cancelling twice is fine; cancelling a finished job is a conflict.
    assert_eq!(client.cancel(&id).await.unwrap().state, JobState::Cancelled);
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

/// SIGTERM drains: the process stops fetching, finishes what it holds, acks, and exits 0; nothing
/// it held is redelivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_in_flight_jobs() {
    let mut c = Cluster::start(shared_s3_store(30)).await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let mut ids = Vec::new();
    for i in 0..8u64 {
        let a = client
            .upload(bytes_of(500 + i, 4 << 20), "application/octet-stream")
            .await
            .unwrap()
            .artifact;
        ids.push(client.submit(&checksum(&a.key)).await.unwrap().id);
    }
    // Started once every job is queued, so it holds several when it is stopped (a worker
    // running beside the uploads could finish each job before this test saw it running).
    c.spawn_service(
        "atelier-checksum",
        &[
            ("ATELIER_ACK_WAIT_SECS", "30".into()),
            ("ATELIER_CONCURRENCY", "4".into()),
        ],
    )
    .unwrap();
    // Wait until it holds jobs, then ask it to stop.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut running = 0;
        for id in &ids {
            if c.states
                .get(*id)
                .await
                .unwrap()
                .is_some_and(|(r, _)| r.state == JobState::Running)
            {
                running += 1;
            }
        }
        if running > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never started a job"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let statuses =
        tokio::task::block_in_place(|| c.stop_services(libc::SIGTERM, Duration::from_secs(30)));
    assert!(
        statuses.iter().all(|s| s.success()),
        "worker did not exit cleanly: {statuses:?}"
    );
    // Whatever it started, it finished: no job is left running.
    for id in &ids {
        let (r, _) = c.states.get(*id).await.unwrap().unwrap();
        assert!(
            matches!(r.state, JobState::Succeeded | JobState::Queued),
            "{id} left {:?}",
            r.state
        );
    }
    // A new replica picks up the rest; nothing ran twice.
    c.spawn_service("atelier-checksum", &[]).unwrap();
    let records = c
        .wait_terminal(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(all_succeeded(&records));
    assert!(
        records.iter().all(|r| r.attempts == 1),
        "{:?}",
        records.iter().map(|r| r.attempts).collect::<Vec<_>>()
    );
    shutdown.cancel();
}

/// Records the sizes of the batches it is handed and how many jobs run at once.
#[derive(Clone, Default)]
struct Probe {
    batch: usize,
    sizes: std::sync::Arc<std::sync::Mutex<Vec<usize>>>,
    now: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    peak: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl atelier_kit::Handler for Probe {
    fn service(&self) -> Service {
        Service::Checksum
    }
    fn batch_size(&self) -> usize {
        self.batch
    }
    async fn handle(
        &self,
        ctx: &atelier_kit::JobCtx,
        spec: JobSpec,
    ) -> Result<JobOutput, atelier_kit::JobError> {
        use std::sync::atomic::Ordering::SeqCst;
        let n = self.now.fetch_add(1, SeqCst) + 1;
        self.peak.fetch_max(n, SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        self.now.fetch_sub(1, SeqCst);
        atelier_kit::Handler::handle(&atelier_checksum::Checksum, ctx, spec).await
    }
    async fn handle_batch(
        &self,
        jobs: Vec<(atelier_kit::JobCtx, JobSpec)>,
    ) -> Vec<Result<JobOutput, atelier_kit::JobError>> {
        self.sizes.lock().unwrap().push(jobs.len());
        futures::future::join_all(
            jobs.into_iter().map(|(ctx, spec)| async move {
                atelier_kit::Handler::handle(self, &ctx, spec).await
            }),
        )
        .await
    }
}

async fn run_probe(
    c: &Cluster,
    probe: Probe,
    args: WorkerArgs,
    shutdown: &CancellationToken,
) -> tokio::task::JoinHandle<anyhow::Result<()>> {
    let rt = atelier_kit::service::Runtime::connect(&c.service_args(args.clone()), "probe")
        .await
        .unwrap();
    let w = atelier_kit::Worker::new(probe, rt.bus.clone(), rt.store.clone(), rt.metrics.clone())
        .await
        .unwrap();
    tokio::spawn(w.run(args, shutdown.clone()))
}

/// Services that declare a batch size get batches; `max_ack_pending` bounds the work in flight
/// across all replicas (back-pressure).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batched_fetch_and_back_pressure() {
    let c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let mut ids = Vec::new();
    for i in 0..16u64 {
        let a = client
            .upload(bytes_of(700 + i, 100), "application/octet-stream")
            .await
            .unwrap()
            .artifact;
        ids.push(client.submit(&checksum(&a.key)).await.unwrap().id);
    }
    // Queued first, so the first fetch finds a full batch.
    let batched = Probe {
        batch: 4,
        ..Default::default()
    };
    let task = run_probe(
        &c,
        batched.clone(),
        WorkerArgs {
            concurrency: 2,
            ..Default::default()
        },
        &shutdown,
    )
    .await;
    let records = c
        .wait_terminal(&ids, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(all_succeeded(&records));
    let sizes = batched.sizes.lock().unwrap().clone();
    assert!(sizes.iter().all(|&s| (1..=4).contains(&s)), "{sizes:?}");
    assert!(sizes.contains(&4), "never got a full batch: {sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 16);
    assert!(
        batched.peak.load(std::sync::atomic::Ordering::SeqCst) <= 8,
        "more than concurrency × batch at once"
    );
    shutdown.cancel();
    task.await.unwrap().unwrap();

    // Back-pressure: two replicas with room for 16 jobs each, but the consumer allows 3 unacked.
    let c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let probe = Probe {
        batch: 1,
        ..Default::default()
    };
    let args = WorkerArgs {
        concurrency: 16,
        max_ack_pending: 3,
        ..Default::default()
    };
    let t1 = run_probe(&c, probe.clone(), args.clone(), &shutdown).await;
    let t2 = run_probe(&c, probe.clone(), args, &shutdown).await;
    let mut ids = Vec::new();
    for i in 0..12u64 {
        let a = client
            .upload(bytes_of(800 + i, 100), "application/octet-stream")
            .await
            .unwrap()
            .artifact;
        ids.push(client.submit(&checksum(&a.key)).await.unwrap().id);
    }
    let records = c
        .wait_terminal(&ids, Duration::from_secs(30))
        .await
        .unwrap();
    assert!(all_succeeded(&records));
    let peak = probe.peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        (2..=3).contains(&peak),
        "peak concurrency {peak} with max_ack_pending 3"
    );
    shutdown.cancel();
    t1.await.unwrap().unwrap();
    t2.await.unwrap().unwrap();
}

/// Large uploads stream through the gateway into an S3 multipart upload, land content-addressed,
/// and stream back out unchanged; nothing temporary is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_uploads_stream_through_s3_multipart() {
    let c = Cluster::start(shared_s3_store(30)).await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let data = bytes_of(4242, atelier_kit::store::MULTIPART_THRESHOLD * 2 + 12345);
    let up = client
        .upload(data.clone(), "application/x-tar")
        .await
        .unwrap();
    assert!(up.created);
    assert_eq!(up.artifact.size, data.len() as u64);
    assert_eq!(
        up.artifact.sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&data))
    );
    let again = client
        .upload(data.clone(), "application/x-tar")
        .await
        .unwrap();
    assert!(!again.created, "same bytes stored twice");
    let back = client.download(&up.artifact.key).await.unwrap();
    assert!(back == data, "downloaded bytes differ");
    assert!(
        c.store.list("tmp").await.unwrap().is_empty(),
        "temporary multipart object left behind"
    );
    assert_eq!(c.store.list("sha256").await.unwrap().len(), 1);
    shutdown.cancel();
}

/// While NATS is down the gateway answers 503 with `Retry-After` at once (not after a request
/// timeout) and records nothing; once NATS is back, submissions are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_bus_is_answered_503_at_once() {
    let mut c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let (key, entry) = atelier_gateway::auth::generate_key("full", "*").unwrap();
    let base = c
        .gateway(vec![entry], Default::default(), shutdown.clone())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let submit = || {
        http.post(format!("{base}/v1/jobs"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(r#"{"schema_version":1,"spec":{"kind":"checksum","input":"x"}}"#)
            .send()
    };
    assert_eq!(submit().await.unwrap().status(), 202);
    tokio::task::block_in_place(|| c.nats.stop(Duration::from_secs(5)));
    // The client notices the closed socket; from then on every answer is immediate.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut fast = 0;
    while fast < 5 {
        let t0 = std::time::Instant::now();
        let r = submit().await.unwrap();
        let took = t0.elapsed();
        if r.status() == 503 {
            assert!(took < Duration::from_secs(1), "503 after {took:?}");
            assert_eq!(r.headers()["retry-after"], "2");
            let body: serde_json::Value = r.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unavailable", "{body}");
            fast += 1;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no 503 while NATS is down"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::task::block_in_place(|| c.nats.restart()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while submit().await.unwrap().status() != 202 {
        assert!(std::time::Instant::now() < deadline, "never accepted again");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
}

/// `Idempotency-Key`: a repeat gets the first attempt's job, another body under the key is
/// refused, a refused request releases its key, concurrent repeats make one job, keys are per
/// caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_keys_make_one_job_per_logical_submit() {
    let c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let (key_a, a) = atelier_gateway::auth::generate_key("a", "*").unwrap();
    let (key_b, b) = atelier_gateway::auth::generate_key("b", "*").unwrap();
    let base = c
        .gateway(vec![a, b], Default::default(), shutdown.clone())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let body = r#"{"schema_version":1,"spec":{"kind":"checksum","input":"x"}}"#;
    let other = r#"{"schema_version":1,"spec":{"kind":"checksum","input":"y"}}"#;
    let post = |api_key: &str, idem: Option<&str>, body: &'static str| {
        let mut r = http
            .post(format!("{base}/v1/jobs"))
            .bearer_auth(api_key)
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = idem {
            r = r.header("Idempotency-Key", k);
        }
        r.send()
    };
    async fn id_of(r: reqwest::Response) -> (u16, String) {
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        (status, v["id"].as_str().unwrap_or_default().to_string())
    }
    let (s, first) = id_of(post(&key_a, Some("k1"), body).await.unwrap()).await;
    assert_eq!(s, 202);
    let again = post(&key_a, Some("k1"), body).await.unwrap();
    assert_eq!(again.headers()["idempotency-replayed"], "true");
    assert_eq!(id_of(again).await, (200, first.clone()));
    let reused = post(&key_a, Some("k1"), other).await.unwrap();
    assert_eq!(reused.status(), 422);
    assert!(reused
        .text()
        .await
        .unwrap()
        .contains("idempotency_key_reused"));
    // Another caller's key space.
    let (s, theirs) = id_of(post(&key_b, Some("k1"), body).await.unwrap()).await;
    assert_eq!(s, 202);
    assert_ne!(theirs, first);
    // A refused request releases its key.
    let bad = r#"{"schema_version":1,"spec":{"kind":"teleport","input":"x"}}"#;
    assert_eq!(post(&key_a, Some("k2"), bad).await.unwrap().status(), 422);
    assert_eq!(
        id_of(post(&key_a, Some("k2"), body).await.unwrap()).await.0,
        202
    );
    // Without a key, every submission is a job.
    let (_, x) = id_of(post(&key_a, None, body).await.unwrap()).await;
    let (_, y) = id_of(post(&key_a, None, body).await.unwrap()).await;
    assert_ne!(x, y);
    // Ten concurrent repeats: one job.
    let all = futures::future::join_all((0..10).map(|_| post(&key_a, Some("k3"), body))).await;
    let mut ids = std::collections::BTreeSet::new();
    for r in all {
        let (s, id) = id_of(r.unwrap()).await;
        assert!(matches!(s, 200 | 202 | 409), "{s}");
        if s != 409 {
            ids.insert(id);
        }
    }
    assert_eq!(ids.len(), 1, "{ids:?}");
    let (s, later) = id_of(post(&key_a, Some("k3"), body).await.unwrap()).await;
    assert_eq!((s, Some(&later)), (200, ids.first()));
    // Oversized or empty keys are refused.
    let long = "k".repeat(300);
    assert_eq!(post(&key_a, Some(&long), body).await.unwrap().status(), 400);
    shutdown.cancel();
}

/// Accepted means it will run: a job recorded `queued` by a gateway that died before publishing it
/// is published by the reconciler, and one that was published before the gateway died (its
/// outbox entry left behind) is not run twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_left_in_the_outbox_run_exactly_once() {
    use atelier_kit::outbox::{reconcile, Pending};
    let mut c = Cluster::start(shared_s3_store(30)).await.unwrap();
    c.spawn_service("atelier-checksum", &fast_worker_env())
        .unwrap();
    let up = c
        .store
        .put_bytes(bytes_of(77, 4096), "application/octet-stream")
        .await
        .unwrap()
        .0;
    let request = |spec| atelier_contracts::JobRequest {
        schema_version: atelier_contracts::SCHEMA_VERSION,
        id: JobId::new(),
        submitted_at: chrono::Utc::now(),
        submitted_by: Some("drill".into()),
        priority: Default::default(),
        spec,
    };
    let outbox = c.bus.outbox().await.unwrap();
    let leave = |req: &atelier_contracts::JobRequest| {
        let p = Pending {
            request: req.clone(),
            since: chrono::Utc::now() - chrono::Duration::seconds(60),
        };
        (req.id.to_string(), serde_json::to_vec(&p).unwrap())
    };
    // Died after recording, before publishing.
    let unpublished = request(checksum(&up.key.to_string()));
    let (k, v) = leave(&unpublished);
    outbox.put(&k, v.into()).await.unwrap();
    c.states
        .create(&atelier_contracts::JobRecord::queued(&unpublished))
        .await
        .unwrap();
    // Died after publishing, before clearing its outbox entry.
    let published = request(checksum(&up.key.to_string()));
    atelier_kit::worker::enqueue(&c.bus, &c.states, &published)
        .await
        .unwrap();
    let (k, v) = leave(&published);
    outbox.put(&k, v.into()).await.unwrap();

    let r = reconcile(&c.bus, &c.states, Duration::ZERO).await.unwrap();
    assert_eq!(r.republished + r.cleared, 2, "{r:?}");
    assert!(r.republished >= 1, "{r:?}");
    let ids = [unpublished.id, published.id];
    let records = c
        .wait_terminal(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(all_succeeded(&records), "{records:?}");
    // Give a duplicate delivery time to show, then count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let done = done_events(&c).await;
    assert!(ids.iter().all(|id| done.get(id) == Some(&1)), "{done:?}");
    let again = reconcile(&c.bus, &c.states, Duration::ZERO).await.unwrap();
    assert_eq!(again, Default::default());
}

/// A submit whose outcome the gateway cannot know is settled under one job id. The publish fails
/// after the record is written: the job is accepted (202) and the reconciler publishes it. The
/// record's write fails (here its bucket is gone; in the drill, an acknowledgement lost to a NATS
/// restart): the 503 keeps the `Idempotency-Key` bound to the job id the outbox holds, and the
/// client's retry creates the job under that id, not a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submits_that_fail_midway_settle_under_one_job_id() {
    use atelier_kit::outbox::{reconcile, Pending};
    let mut c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let (key, entry) = atelier_gateway::auth::generate_key("full", "*").unwrap();
    let base = c
        .gateway(vec![entry], Default::default(), shutdown.clone())
        .await
        .unwrap();
    let client = atelier_client::Client::new(&base, Some(key.clone())).unwrap();
    let input = client
        .upload(bytes_of(78, 4096), "application/octet-stream")
        .await
        .unwrap()
        .artifact
        .key
        .to_string();
    let body = serde_json::json!({"schema_version": 1, "spec": checksum(&input)}).to_string();
    let http = reqwest::Client::new();
    let post = |idem: &'static str| {
        http.post(format!("{base}/v1/jobs"))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .header("Idempotency-Key", idem)
            .body(body.clone())
            .send()
    };
    async fn answer(r: reqwest::Response) -> (u16, String) {
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().await.unwrap();
        (status, v["id"].as_str().unwrap_or_default().to_string())
    }
    c.spawn_service("atelier-checksum", &fast_worker_env())
        .unwrap();
    let outbox = c.bus.outbox().await.unwrap();
    let outbox_ids = || async {
        let mut ids = Vec::new();
        let mut keys = outbox.keys().await.unwrap();
        while let Some(k) = futures::StreamExt::next(&mut keys).await {
            let p: Pending =
                serde_json::from_slice(&outbox.get(k.unwrap()).await.unwrap().unwrap()).unwrap();
            ids.push(p.request.id.to_string());
        }
        ids
    };
    // The record's write fails: the job bucket is gone.
    let jobs_stream = format!("KV_{}", atelier_contracts::subjects::JOBS_BUCKET);
    c.bus.js.delete_stream(&jobs_stream).await.unwrap();
    assert_eq!(answer(post("k-record").await.unwrap()).await.0, 503);
    let left = outbox_ids().await;
    assert_eq!(left.len(), 1, "the attempt's request stays in the outbox");
    c.bus.ensure_topology().await.unwrap();
    let (status, retried) = answer(post("k-record").await.unwrap()).await;
    assert_eq!((status, vec![retried.clone()]), (202, left));

    // The publish fails: no stream takes checksum requests.
    let retried = JobId::parse(&retried).unwrap();
    c.wait_terminal(&[retried], Duration::from_secs(60))
        .await
        .unwrap();
    c.bus
        .js
        .delete_stream(Service::Checksum.request_stream())
        .await
        .unwrap();
    let (status, published_later) = answer(post("k-publish").await.unwrap()).await;
    assert_eq!(status, 202, "a recorded job is accepted");
    assert_eq!(
        answer(post("k-publish").await.unwrap()).await,
        (200, published_later.clone())
    );
    assert_eq!(outbox_ids().await, vec![published_later.clone()]);
    c.bus.ensure_topology().await.unwrap();
    let r = reconcile(&c.bus, &c.states, Duration::ZERO).await.unwrap();
    assert_eq!(r.republished, 1, "{r:?}");

    let ids = [retried, JobId::parse(&published_later).unwrap()];
    let records = c
        .wait_terminal(&ids, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(all_succeeded(&records), "{records:?}");
    let all = futures::StreamExt::count(c.bus.jobs_kv().await.unwrap().keys().await.unwrap()).await;
    assert_eq!(all, 2, "one job per logical submit");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let done = done_events(&c).await;
    assert!(ids.iter().all(|id| done.get(id) == Some(&1)), "{done:?}");
    shutdown.cancel();
    c.stop_services(libc::SIGTERM, Duration::from_secs(10));
}

/// Slowloris: clients that send headers or bodies slowly are cut off (header deadline, body idle
/// limit), connections over the cap are closed at once, and everyone else is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_cannot_stall_the_gateway() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let (key, entry) = atelier_gateway::auth::generate_key("full", "*").unwrap();
    let args = atelier_gateway::GatewayArgs {
        max_connections: 16,
        header_timeout_secs: 1,
        body_idle_secs: 1,
        ..Default::default()
    };
    let base = c
        .gateway(vec![entry], args, shutdown.clone())
        .await
        .unwrap();
    let addr = base.trim_start_matches("http://").to_string();
    // 40 connections that never finish their headers: 16 hold slots, the rest are closed at
    // once; the held ones are closed at the header deadline.
    let t0 = std::time::Instant::now();
    let mut slow = Vec::new();
    for _ in 0..40 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
        slow.push(s);
    }
    for mut s in slow {
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        assert!(r.is_ok(), "a slow connection was still open after 5 s");
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    // Everyone else is served.
    let http = reqwest::Client::new();
    let ok = http.get(format!("{base}/healthz")).send().await.unwrap();
    assert!(ok.status().is_success());
    // A body that stops arriving ends with 408 after the idle limit, not a held request.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/uploads HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n0123456789"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let t0 = std::time::Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 408") || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    shutdown.cancel();
}

/// A key's in-flight limit counts open event streams: a client cannot hold more streams than its
/// limit, and a closed stream gives its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_count_toward_a_keys_in_flight_limit() {
    let c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let (key, entry) = atelier_gateway::auth::generate_key("full", "*").unwrap();
    let args = atelier_gateway::GatewayArgs {
        key_concurrency: 2,
        ..Default::default()
    };
    let base = c
        .gateway(vec![entry], args, shutdown.clone())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    // No service runs: the job stays queued and its event stream stays open.
    let job: serde_json::Value = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&key)
        .json(&serde_json::json!({"schema_version": 1,
            "spec": {"kind": "checksum", "input": "sha256/ab/x"}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    let events = || {
        http.get(format!("{base}/v1/jobs/{id}/events"))
            .bearer_auth(&key)
            .send()
    };
    let first = events().await.unwrap();
    let second = events().await.unwrap();
    assert_eq!(
        (first.status().as_u16(), second.status().as_u16()),
        (200, 200)
    );
    let third = events().await.unwrap();
    assert_eq!(third.status(), 429);
    let body: serde_json::Value = third.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_in_flight", "{body}");
    let plain = http
        .get(format!("{base}/v1/jobs/{id}"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 429, "two open streams fill a limit of 2");
    // Closing a stream frees its slot (the server sees the connection go).
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = http
            .get(format!("{base}/v1/jobs/{id}"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        if r.status() == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a closed stream kept its slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(second);
    shutdown.cancel();
}

/// A job whose every attempt ends with its worker's death (as a job that needs more memory than
/// the worker has) fails `worker_died` after `--max-worker-deaths`, instead of taking down each
/// next worker. The workers here hang on a store that never answers, and are killed mid-job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_keeps_killing_its_workers_fails_worker_died() {
    let mut c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    // Accepts connections and never answers: the worker's input read hangs, mid-job.
    let blackhole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole = format!("http://{}", blackhole.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = blackhole.accept().await {
            open.push(s);
        }
    });
    let env = vec![
        ("ATELIER_ACK_WAIT_SECS", "1".to_string()),
        ("ATELIER_MAX_DELIVER", "50".into()),
        ("ATELIER_MAX_WORKER_DEATHS", "2".into()),
        ("ATELIER_STORE", "s3://nowhere".into()),
        ("ATELIER_S3_ENDPOINT", hole),
        ("AWS_ACCESS_KEY_ID", "x".into()),
        ("AWS_SECRET_ACCESS_KEY", "x".into()),
        ("ATELIER_STORE_RETRY_SECS", "600".into()),
    ];
    let id = client
        .submit(&checksum("sha256/ab/never"))
        .await
        .unwrap()
        .id;
    let mut kills = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let last = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the job neither ran nor failed"
        );
        let pid = c.spawn_service("atelier-checksum", &env).unwrap();
        // Wait for this worker to take the job, or for the job to end.
        let r = loop {
            let (r, _) = c.states.get(id).await.unwrap().unwrap();
            let by_it = r.worker.as_deref().and_then(|w| w.split(':').nth(1))
                == Some(pid.to_string().as_str());
            if r.state.is_terminal() || (r.state == JobState::Running && by_it) {
                break r;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no worker took the job: {r:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        if r.state.is_terminal() {
            break r;
        }
        c.kill9(pid);
        kills += 1;
    };
    assert_eq!(last.state, JobState::Failed, "{last:?}");
    let error = last.error.clone().unwrap();
    assert_eq!(error.code, "worker_died", "{error:?}");
    assert!(error.message.contains("--max-worker-deaths 2"), "{error:?}");
    assert_eq!(
        kills, 3,
        "two deaths are allowed, the third fails it at the next delivery"
    );
    assert_eq!(last.interrupted, 3);
    held.abort();
    shutdown.cancel();
}

/// NATS as three nodes with every stream and bucket replicated three times: one node killed
/// (SIGKILL) mid-run loses, duplicates and strands nothing; submissions go on through the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_one_nats_node_of_three_mid_run() {
    let dir = tempfile::tempdir().unwrap();
    let store = atelier_kit::config::StoreArgs {
        store: dir.path().join("objects").display().to_string(),
        ..Default::default()
    };
    let mut c = Cluster::start_three_node(store).await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    for _ in 0..2 {
        c.spawn_service("atelier-checksum", &fast_worker_env())
            .unwrap();
    }
    let mut inputs = Vec::new();
    for i in 0..6u64 {
        let up = client
            .upload(bytes_of(3000 + i, 2 << 20), "application/octet-stream")
            .await
            .unwrap();
        inputs.push(up.artifact.key);
    }
    let submit = |key: String| {
        let client = client.clone();
        async move {
            // The client retries (one Idempotency-Key per submit) through the failover.
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            loop {
                match client.submit(&checksum(&key)).await {
                    Ok(r) => return r.id,
                    Err(e) => {
                        assert!(std::time::Instant::now() < deadline, "submit: {e}");
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
            }
        }
    };
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(submit(inputs[i % inputs.len()].clone()).await);
    }
    // SIGKILL the node that leads the work queue's stream while those jobs run (with one
    // replica, its jobs would be gone); then keep submitting.
    let info = c
        .bus
        .js
        .get_stream(Service::Checksum.request_stream())
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    let leader = info.cluster.and_then(|cl| cl.leader).unwrap();
    eprintln!("killing {leader}, the leader of the checksum work queue");
    match leader.as_str() {
        "n0" => c.nats.kill(),
        "n1" => c.peers[0].kill(),
        _ => c.peers[1].kill(),
    }
    for i in 0..30 {
        ids.push(submit(inputs[i % inputs.len()].clone()).await);
    }
    let records = c
        .wait_terminal(&ids, Duration::from_secs(180))
        .await
        .unwrap();
    let failed: Vec<_> = records
        .iter()
        .filter(|r| r.state != JobState::Succeeded)
        .map(|r| (r.id, r.state, r.error.clone()))
        .collect();
    assert!(failed.is_empty(), "lost or failed: {failed:?}");
    let done = done_events(&c).await;
    for id in &ids {
        assert_eq!(
            done.get(id),
            Some(&1),
            "job {id}: {:?} done events",
            done.get(id)
        );
    }
    eprintln!(
        "drill: three-node NATS, the work queue's leader killed: {} jobs, 0 lost, 0 duplicated, 0 stuck",
        ids.len()
    );
    shutdown.cancel();
    c.stop_services(libc::SIGTERM, Duration::from_secs(10));
    let _ = std::fs::remove_dir_all(dir);
}

/// Submissions through a gateway process that is killed (SIGKILL) mid-submit, while nats-server
/// is restarted too: every logical submit (one `Idempotency-Key`, retried by the client) becomes
/// exactly one job, and every job runs once. 200 submits here; 2,000 with `scripts/drill --full`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submits_survive_gateway_kills_and_nats_restarts() {
    use std::sync::{Arc, Mutex};
    let submits = drill_count(200, 2000);
    let chaos = drill_count(6, 30);
    let mut c = Cluster::local().await.unwrap();
    for _ in 0..2 {
        c.spawn_service("atelier-checksum", &fast_worker_env())
            .unwrap();
    }
    let port = atelier_kit::nats_server::free_port().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let gw_env = vec![
        ("ATELIER_ADDR", format!("127.0.0.1:{port}")),
        ("ATELIER_INSECURE_NO_AUTH", "true".to_string()),
    ];
    let healthy = |base: String| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{base}/healthz"))
            .await
            .map_or(true, |r| r.status() != 200)
        {
            assert!(std::time::Instant::now() < deadline, "gateway not healthy");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let mut gateway = c.spawn_service("atelier-gateway", &gw_env).unwrap();
    healthy(base.clone()).await;
    let client = atelier_client::Client::new(&base, None).unwrap();
    let input = client
        .upload(bytes_of(77, 4096), "application/octet-stream")
        .await
        .unwrap()
        .artifact
        .key;
    let ids = Arc::new(Mutex::new(Vec::new()));
    let gave_up = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut submitters = tokio::task::JoinSet::new();
    for t in 0..8 {
        let (client, ids, gave_up, input) =
            (client.clone(), ids.clone(), gave_up.clone(), input.clone());
        submitters.spawn(async move {
            for _ in (t..submits).step_by(8) {
                match client.submit(&checksum(&input)).await {
                    Ok(r) => ids.lock().unwrap().push(r.id),
                    Err(e) => {
                        eprintln!("a submit was given up: {e:#}");
                        gave_up.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }
            }
        });
    }
    // Chaos while they submit: restart nats-server first, then SIGKILL the gateway twice
    // (restarted on the same port), and again, so both happen however fast the submits go.
    let (mut gateway_kills, mut nats_restarts) = (0, 0);
    let mut rng = rand::thread_rng();
    for k in 0..chaos {
        // At least one fault of each kind, even when the submits finish first.
        if k >= 2 && ids.lock().unwrap().len() >= submits {
            break;
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(100..600))).await;
        if k % 3 == 0 {
            tokio::task::block_in_place(|| c.nats.restart()).unwrap();
            nats_restarts += 1;
        } else {
            c.kill9(gateway);
            gateway_kills += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            gateway = c.spawn_service("atelier-gateway", &gw_env).unwrap();
            healthy(base.clone()).await;
        }
    }
    while let Some(r) = submitters.join_next().await {
        r.unwrap();
    }
    let ids = ids.lock().unwrap().clone();
    let records = c
        .wait_terminal(&ids, Duration::from_secs(600))
        .await
        .unwrap();
    let not_done: Vec<_> = records
        .iter()
        .filter(|r| r.state != JobState::Succeeded)
        .map(|r| (r.id, r.state, r.error.clone()))
        .collect();
    // Every record in the bucket is one the clients were answered with: no logical submit
    // made a second job.
    let all = futures::StreamExt::count(c.bus.jobs_kv().await.unwrap().keys().await.unwrap()).await;
    let done = done_events(&c).await;
    let duplicated = ids.iter().filter(|id| done.get(id) != Some(&1)).count();
    eprintln!(
        "drill: {submits} submits, {gateway_kills} gateway kills, {nats_restarts} NATS restarts: \
         {} accepted, {} given up, {} lost or failed, {} jobs in the bucket, {duplicated} without \
         exactly one done event",
        ids.len(),
        gave_up.load(std::sync::atomic::Ordering::SeqCst),
        not_done.len(),
        all
    );
    assert!(
        gateway_kills > 0 && nats_restarts > 0,
        "the chaos did not happen"
    );
    assert!(not_done.is_empty(), "{not_done:?}");
    assert_eq!(all, ids.len(), "a logical submit made more than one job");
    assert_eq!(duplicated, 0);
    assert_eq!(gave_up.load(std::sync::atomic::Ordering::SeqCst), 0);
    c.stop_services(libc::SIGTERM, Duration::from_secs(10));
}

/// Reports progress from concurrent tasks in no particular order.
struct Jumpy;

impl atelier_kit::Handler for Jumpy {
    fn service(&self) -> Service {
        Service::Checksum
    }
    async fn handle(
        &self,
        ctx: &atelier_kit::JobCtx,
        _spec: JobSpec,
    ) -> Result<JobOutput, atelier_kit::JobError> {
        // 0/40 .. 39/40, permuted, all in flight at once.
        let reports = (0..40u32).map(|i| {
            let f = ((i * 17) % 40) as f32 / 40.0;
            ctx.progress(f, Some(format!("{f}")))
        });
        futures::future::join_all(reports).await;
        Err(atelier_kit::JobError::permanent(
            "reported",
            "the test handler only reports progress",
        ))
    }
}

/// Progress only moves forward: reports from concurrent tasks of one job, in any order, reach
/// the record and the event stream as a non-decreasing sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn progress_only_moves_forward() {
    let c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let rt = atelier_kit::service::Runtime::connect(
        &c.service_args(WorkerArgs::default()),
        "progress-test",
    )
    .await
    .unwrap();
    let worker =
        atelier_kit::Worker::new(Jumpy, rt.bus.clone(), rt.store.clone(), rt.metrics.clone())
            .await
            .unwrap();
    let running = tokio::spawn(worker.run(WorkerArgs::default(), shutdown.clone()));
    let job = client
        .submit(&checksum("sha256/00/whatever"))
        .await
        .unwrap();
    let records = c
        .wait_terminal(&[job.id], Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(records[0].state, JobState::Failed);
    let fractions: Vec<f32> = c
        .read_stream("ATELIER_EVENTS", &Service::Checksum.progress_subject())
        .await
        .unwrap()
        .iter()
        .filter_map(|m| serde_json::from_slice::<atelier_contracts::JobProgress>(&m.payload).ok())
        .filter(|p| p.id == job.id)
        .map(|p| p.progress.fraction)
        .collect();
    assert_eq!(fractions.len(), 40, "{fractions:?}");
    assert!(
        fractions.windows(2).all(|w| w[0] <= w[1]),
        "progress went backwards: {fractions:?}"
    );
    assert_eq!(fractions.last(), Some(&(39.0 / 40.0)));
    shutdown.cancel();
    running.await.unwrap().unwrap();
}
