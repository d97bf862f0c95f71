//! `atelier up` as a user runs it: the real binary, its own nats-server, the local store.

use std::process::Child;
use std::time::{Duration, Instant};

use atelier_client::Client;
use atelier_contracts::{ChecksumSpec, JobSpec, JobState};
use atelier_e2e::*;
use atelier_kit::nats_server::free_port;

fn up(data_dir: &std::path::Path, port: u16, log: &str) -> Child {
    up_with_nats(data_dir, port, 0, log)
}

fn up_with_nats(data_dir: &std::path::Path, port: u16, nats_port: u16, log: &str) -> Child {
    let mut cmd = atelier_up(data_dir, port, nats_port, &data_dir.with_extension(log));
    // A job interrupted by the crash is redelivered after ack_wait.
    cmd.args(["--concurrency", "1", "--ack-wait-secs", "5"]);
    // Its own process group, as a shell job is: Ctrl-C goes to the whole group.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.spawn().unwrap()
}

async fn wait_healthy(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = reqwest::get(format!("{base}/healthz")).await {
            if r.status() == 200 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "atelier up did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The pids whose parent is `parent` (from /proc).
fn child_pids(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_health_openapi_and_a_job_then_resumes_after_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("atelier");
    let port = free_port().unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let nats_port = free_port().unwrap();
    let mut proc = up_with_nats(&data, port, nats_port, "log1");
    wait_healthy(&base).await;

    // The embedded NATS takes no anonymous clients; its generated password (0600) lets one in.
    let nats = format!("nats://127.0.0.1:{nats_port}");
    let anonymous = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .connect(&nats)
        .await;
    assert!(
        anonymous.is_err(),
        "an anonymous client connected to the embedded NATS"
    );
    let password = std::fs::read_to_string(data.join("nats-password")).unwrap();
    async_nats::ConnectOptions::with_user_and_password("atelier".into(), password.trim().into())
        .connect(&nats)
        .await
        .expect("the generated credentials connect");

    let spec: serde_json::Value = reqwest::get(format!("{base}/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["paths"]["/v1/jobs"]["post"].is_object());
    let metrics = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("atelier_http_requests_total"), "{metrics}");

    // A job round trip.
    let client = Client::new(&base, None).unwrap();
    let up1 = client
        .upload(bytes_of(1, 10_000), "application/octet-stream")
        .await
        .unwrap();
    let job = client
        .submit(&JobSpec::Checksum(ChecksumSpec {
            input: up1.artifact.key.clone(),
            expected_sha256: None,
        }))
        .await
        .unwrap();
    let done = tokio::time::timeout(
        Duration::from_secs(30),
        client.follow(&job.id.to_string(), |_| {}),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(done.state, JobState::Succeeded);

    // Many slow-ish jobs submitted in one burst (their inputs uploaded first, so no upload
    // paces them); crash the whole process while they run.
    let mut inputs = Vec::new();
    for i in 0..12u64 {
        inputs.push(
            client
                .upload(bytes_of(50 + i, 3 << 20), "application/octet-stream")
                .await
                .unwrap()
                .artifact,
        );
    }
    let mut ids = Vec::new();
    for a in inputs {
        ids.push(
            client
                .submit(&JobSpec::Checksum(ChecksumSpec {
                    input: a.key,
                    expected_sha256: Some(a.sha256),
                }))
                .await
                .unwrap()
                .id,
        );
    }
    proc.kill().unwrap();
    proc.wait().unwrap();
    // Jobs still unfinished when the restarted process is first asked about them.
    let mut unfinished = 0;
    // Restart on the same data directory: the queued and interrupted jobs run.
    let mut proc = up(&data, port, "log2");
    wait_healthy(&base).await;
    let deadline = Instant::now() + Duration::from_secs(90);
    for id in &ids {
        loop {
            let r = client.job(&id.to_string()).await.unwrap();
            if r.state.is_terminal() {
                assert_eq!(r.state, JobState::Succeeded, "{r:?}");
                break;
            }
            unfinished += 1;
            assert!(
                Instant::now() < deadline,
                "job {id} never finished after the restart"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(
        unfinished > 0,
        "every job had finished before the crash; nothing was resumed"
    );

    // Ctrl-C in a terminal (SIGINT to the whole process group) drains and exits within 10 s,
    // with a job running, and takes its nats-server with it.
    for i in 0..6u64 {
        let a = client
            .upload(bytes_of(90 + i, 8 << 20), "application/octet-stream")
            .await
            .unwrap()
            .artifact;
        client
            .submit(&JobSpec::Checksum(ChecksumSpec {
                input: a.key,
                expected_sha256: Some(a.sha256),
            }))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let nats_pids = child_pids(proc.id());
    assert!(!nats_pids.is_empty(), "atelier up runs a nats-server child");
    let signalled = Instant::now();
    // SAFETY: kill(2) on our own child's process group.
    unsafe {
        libc::kill(-(proc.id() as i32), libc::SIGINT);
    }
    let status = wait_exit(&mut proc, Duration::from_secs(10))
        .expect("atelier up did not stop within 10 s of SIGINT to its process group");
    assert!(status.success(), "atelier up exited with {status}");
    eprintln!("SIGINT to the group: exited in {:?}", signalled.elapsed());
    for pid in nats_pids {
        let alive = std::path::Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(!alive, "nats-server {pid} outlived atelier up");
    }
}
