//! Webhooks: a job created with `Atelier-Webhook` is announced to that URL when it ends, signed
//! with the gateway's secret; a receiver that fails is tried again with backoff, and the job's
//! delivery log shows every attempt.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atelier_contracts::http::{WebhookLog, WebhookState};
use atelier_e2e::*;
use axum::http::{HeaderMap, StatusCode};
use tokio_util::sync::CancellationToken;

type Seen = Arc<Mutex<Vec<(String, HeaderMap, Vec<u8>)>>>;

/// A receiver on loopback: `/flaky` answers 500 to its first POST and 200 after, `/ok` 200.
async fn receiver(seen: Seen) -> String {
    let flaky_calls = Arc::new(Mutex::new(0u32));
    let app = axum::Router::new().route(
        "/{path}",
        axum::routing::post(
            move |axum::extract::Path(path): axum::extract::Path<String>,
                  headers: HeaderMap,
                  body: axum::body::Bytes| {
                let seen = seen.clone();
                let flaky_calls = flaky_calls.clone();
                async move {
                    seen.lock()
                        .unwrap()
                        .push((path.clone(), headers, body.to_vec()));
                    let mut n = flaky_calls.lock().unwrap();
                    if path == "flaky" {
                        *n += 1;
                        if *n == 1 {
                            return StatusCode::INTERNAL_SERVER_ERROR;
                        }
                    }
                    StatusCode::OK
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

fn signed_by(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let sig = headers["atelier-signature"].to_str().unwrap();
    let (t, v1) = sig.split_once(",v1=").unwrap();
    let t = t.strip_prefix("t=").unwrap();
    atelier_gateway::webhooks::signature(secret.as_bytes(), t.parse().unwrap(), body) == sig
        && v1.len() == 64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_are_signed_retried_and_logged() {
    let mut c = Cluster::local().await.unwrap();
    c.spawn_service("atelier-checksum", &[]).unwrap();
    let seen: Seen = Arc::default();
    let hooks = receiver(seen.clone()).await;
    let shutdown = CancellationToken::new();
    let args = atelier_gateway::GatewayArgs {
        webhook_secret: Some("s3cret".into()),
        ..Default::default()
    };
    let base = c.gateway(Vec::new(), args, shutdown.clone()).await.unwrap();
    let client = atelier_client::Client::new(&base, None).unwrap();
    let up = client
        .upload(bytes_of(3, 500), "application/octet-stream")
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let submit = |input: String, hook: Option<String>| {
        let mut r = http
            .post(format!("{base}/v1/jobs"))
            .json(&serde_json::json!(
                {"schema_version": 1, "spec": {"kind": "checksum", "input": input}}
            ));
        if let Some(h) = hook {
            r = r.header("Atelier-Webhook", h);
        }
        r.send()
    };
    let ok = submit(up.artifact.key.clone(), Some(format!("{hooks}/flaky")))
        .await
        .unwrap();
    assert_eq!(ok.status(), 202);
    let ok: serde_json::Value = ok.json().await.unwrap();
    let missing = format!("sha256/00/{}", "0".repeat(64));
    let failing = submit(missing, Some(format!("{hooks}/ok"))).await.unwrap();
    let failing: serde_json::Value = failing.json().await.unwrap();
    let plain: serde_json::Value = submit(up.artifact.key.clone(), None)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bad = submit(up.artifact.key.clone(), Some("ftp://example.com/x".into()))
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    assert!(bad.text().await.unwrap().contains("invalid_webhook"));

    // Three POSTs: the flaky receiver's 500 then its 200, and the failed job's.
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.lock().unwrap().len() < 3 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        3,
        "{:?}",
        seen.iter().map(|s| &s.0).collect::<Vec<_>>()
    );
    for (path, headers, body) in &seen {
        assert!(signed_by("s3cret", headers, body), "{path}: bad signature");
        assert!(!signed_by("other", headers, body));
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        let (want_id, want_event, want_state) = match path.as_str() {
            "flaky" => (&ok["id"], "done", "succeeded"),
            _ => (&failing["id"], "failed", "failed"),
        };
        assert_eq!(&v["job"]["id"], want_id);
        assert_eq!(v["event"], want_event);
        assert_eq!(v["job"]["state"], want_state);
        assert_eq!(headers["atelier-event"], want_event);
    }
    let log = |id: &serde_json::Value| {
        http.get(format!("{base}/v1/jobs/{}/webhook", id.as_str().unwrap()))
            .send()
    };
    let flaky: WebhookLog = log(&ok["id"]).await.unwrap().json().await.unwrap();
    assert_eq!(flaky.state, WebhookState::Delivered);
    assert_eq!(flaky.attempts.len(), 2);
    assert_eq!(flaky.attempts[0].status, Some(500));
    assert!(flaky.attempts[0].error.is_some());
    assert_eq!(flaky.attempts[1].status, Some(200));
    assert_eq!(log(&plain["id"]).await.unwrap().status(), 404);
    shutdown.cancel();
    c.stop_services(libc::SIGTERM, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_webhook_announces_every_job_it_creates() {
    let mut c = Cluster::local().await.unwrap();
    c.spawn_service("atelier-checksum", &[]).unwrap();
    let seen: Seen = Arc::default();
    let hooks = receiver(seen.clone()).await;
    let shutdown = CancellationToken::new();
    let (ci_key, ci) = atelier_gateway::auth::generate_key("ci", "*").unwrap();
    let (other_key, other) = atelier_gateway::auth::generate_key("other", "*").unwrap();
    // Refused at start: an entry that is not NAME=URL, or any entry without a secret.
    for (entries, secret) in [
        (vec!["ci".to_owned()], Some("s3cret")),
        (vec![format!("ci={hooks}/key")], None),
        (vec!["ci=ftp://x/y".to_owned()], Some("s3cret")),
    ] {
        let args = atelier_gateway::GatewayArgs {
            webhook_secret: secret.map(Into::into),
            key_webhooks: entries.clone(),
            ..Default::default()
        };
        let started = c.gateway(vec![ci.clone()], args, shutdown.clone()).await;
        let err = format!("{:#}", started.expect_err("refused"));
        assert!(err.contains("--key-webhook"), "{entries:?}: {err}");
    }
    let args = atelier_gateway::GatewayArgs {
        webhook_secret: Some("s3cret".into()),
        key_webhooks: vec![format!("ci={hooks}/key")],
        ..Default::default()
    };
    let base = c
        .gateway(vec![ci, other], args, shutdown.clone())
        .await
        .unwrap();
    let as_ci = atelier_client::Client::new(&base, Some(ci_key.clone())).unwrap();
    let as_other = atelier_client::Client::new(&base, Some(other_key)).unwrap();
    let input = as_ci
        .upload(bytes_of(4, 500), "application/octet-stream")
        .await
        .unwrap()
        .artifact
        .key
        .to_string();
    let spec = atelier_contracts::JobSpec::Checksum(atelier_contracts::ChecksumSpec {
        input,
        expected_sha256: None,
    });
    let by_ci = as_ci.submit(&spec).await.unwrap().id;
    let by_other = as_other.submit(&spec).await.unwrap().id;
    // A header of its own wins over the key's.
    let own: serde_json::Value = reqwest::Client::new()
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&ci_key)
        .header("Atelier-Webhook", format!("{hooks}/own"))
        .json(&serde_json::json!({"schema_version": 1, "spec": spec}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    c.wait_terminal(&[by_ci, by_other], Duration::from_secs(60))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = seen.lock().unwrap().clone();
    let mut got: Vec<(String, String)> = seen
        .iter()
        .map(|(path, headers, body)| {
            assert!(signed_by("s3cret", headers, body));
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            (path.clone(), v["job"]["id"].as_str().unwrap().to_owned())
        })
        .collect();
    got.sort();
    let mut want = vec![
        ("key".to_owned(), by_ci.to_string()),
        ("own".to_owned(), own["id"].as_str().unwrap().to_owned()),
    ];
    want.sort();
    assert_eq!(got, want, "the other key's job has no webhook");
    shutdown.cancel();
    c.stop_services(libc::SIGTERM, Duration::from_secs(10));
}
