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
