//! Webhooks: a job created with an `Atelier-Webhook: <url>` header is announced to that URL when
//! it ends (its `done` or `failed` event). The POST's body is `{"event", "job"}` (the job's
//! record); `Atelier-Signature: t=<unix seconds>,v1=<hex>` is HMAC-SHA256 with the gateway's
//! `ATELIER_WEBHOOK_SECRET` over `<t>.<body>`, so a receiver can check who sent it and refuse replays.
//! A delivery that fails (no answer in 10 s, or not 2xx) is tried again with backoff (1 s, 2 s, 4 s
//! … up to 5 minutes) up to [`MAX_ATTEMPTS`] times; every attempt is logged in the job's
//! [`WebhookLog`] (`GET /v1/jobs/{id}/webhook`). Delivery runs in every gateway replica as
//! competing consumers of the events stream, so each event is delivered by one of them.

use std::cell::RefCell;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, kv, AckKind};
use atelier_contracts::http::{WebhookAttempt, WebhookLog, WebhookState};
use atelier_contracts::{subjects, JobId, Service};
use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures::StreamExt;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

/// The header naming a job's webhook.
pub const HEADER: &str = "atelier-webhook";
pub const MAX_ATTEMPTS: usize = 8;
const CONSUMER: &str = "atelier-webhooks";

tokio::task_local! {
    static URL: RefCell<Option<String>>;
}

/// The webhook URL of the request being handled, taken once by the job it creates.
pub fn take_url() -> Option<String> {
    URL.try_with(|u| u.borrow_mut().take()).ok().flatten()
}

fn check_url(raw: &str) -> Result<String, String> {
    if raw.len() > 2048 {
        return Err("the URL is longer than 2048 characters".into());
    }
    let url = reqwest::Url::parse(raw).map_err(|e| format!("{raw:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("{raw:?} is not an http(s) URL with a host"));
    }
    Ok(url.to_string())
}

/// The per-key webhooks (`NAME=URL` entries), checked: an error names the entry at fault.
pub fn key_webhooks(
    entries: &[String],
    have_secret: bool,
) -> anyhow::Result<std::collections::HashMap<String, String>> {
    let mut out = std::collections::HashMap::new();
    for entry in entries.iter().map(|e| e.trim()).filter(|e| !e.is_empty()) {
        let Some((name, url)) = entry.split_once('=') else {
            anyhow::bail!("--key-webhook {entry:?} must be NAME=URL");
        };
        if !have_secret {
            anyhow::bail!(
                "--key-webhook {name}: webhooks are signed; set ATELIER_WEBHOOK_SECRET in the gateway's environment"
            );
        }
        let url =
            check_url(url.trim()).map_err(|e| anyhow::anyhow!("--key-webhook {name}: {e}"))?;
        out.insert(name.trim().to_owned(), url);
    }
    Ok(out)
}

/// On the routes that create a job: reads and checks `Atelier-Webhook` before the handler runs.
pub async fn middleware(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let Some(value) = req.headers().get(HEADER) else {
        return next.run(req).await;
    };
    let bad = |m: String| ApiError::unprocessable("invalid_webhook", m).into_response();
    if app.webhook_secret.is_none() {
        return bad("this gateway sends no webhooks: set ATELIER_WEBHOOK_SECRET in its environment so receivers can check their signature".into());
    }
    let url = match value
        .to_str()
        .map_err(|e| e.to_string())
        .and_then(check_url)
    {
        Ok(u) => u,
        Err(e) => return bad(format!("Atelier-Webhook: {e}")),
    };
    URL.scope(RefCell::new(Some(url)), next.run(req)).await
}

/// Records job `id`'s webhook (before the job is queued, so its end cannot come first).
pub async fn register(app: &AppState, id: JobId, url: String) -> Result<(), ApiError> {
    let log = WebhookLog {
        url,
        state: WebhookState::Pending,
        attempts: Vec::new(),
    };
    let bytes = serde_json::to_vec(&log).map_err(|e| ApiError::unavailable(e.to_string()))?;
    app.webhooks
        .put(id.to_string(), bytes.into())
        .await
        .map_err(|e| ApiError::unavailable(format!("recording the webhook: {e}")))?;
    Ok(())
}

/// A job's webhook and its delivery attempts.
#[utoipa::path(
    get, path = "/v1/jobs/{id}/webhook", tag = "jobs", operation_id = "get_job_webhook",
    params(("id" = String, Path, description = "Job id")),
    responses((status = 200, body = WebhookLog), (status = 404, body = atelier_contracts::http::ApiErrorBody)),
    security(("bearer" = ["jobs:read"]))
)]
pub async fn get_log(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<WebhookLog>, ApiError> {
    caller.require(Scope::JobsRead)?;
    let none = || ApiError::not_found("no_webhook", format!("job {id} has no webhook"));
    let id = JobId::parse(&id).ok_or_else(none)?;
    match app.webhooks.get(id.to_string()).await {
        Ok(Some(v)) => serde_json::from_slice(&v)
            .map(Json)
            .map_err(|e| ApiError::unavailable(e.to_string())),
        Ok(None) => Err(none()),
        Err(e) => Err(ApiError::unavailable(format!("reading the webhook: {e}"))),
    }
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Delivers webhooks until `shutdown` (restarting the consumer after bus errors).
pub fn spawn_deliverer(app: AppState, shutdown: CancellationToken) {
    let Some(secret) = app.webhook_secret.clone() else {
        return;
    };
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .expect("a plain HTTP client builds");
        while !shutdown.is_cancelled() {
            if let Err(e) = deliver(&app, &http, secret.as_bytes(), &shutdown).await {
                tracing::warn!(error = %format!("{e:#}"), "webhook delivery stopped; restarting in 2 s");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    });
}

async fn deliver(
    app: &AppState,
    http: &reqwest::Client,
    secret: &[u8],
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let stream = app.bus.js.get_stream(subjects::EVENTS_STREAM).await?;
    let filters = Service::ALL
        .iter()
        .flat_map(|s| [s.done_subject(), s.failed_subject()])
        .collect();
    let consumer = stream
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.into()),
                filter_subjects: filters,
                ack_wait: Duration::from_secs(60),
                max_deliver: (MAX_ATTEMPTS + 2) as i64,
                deliver_policy: jetstream::consumer::DeliverPolicy::New,
                ..Default::default()
            },
        )
        .await?;
    let mut messages = consumer.messages().await?;
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = messages.next() => m,
        };
        let Some(message) = next else { return Ok(()) };
        let message = message.map_err(|e| anyhow::anyhow!("{e}"))?;
        let ack = match one(app, http, secret, &message).await {
            Ok(None) => AckKind::Ack,
            Ok(Some(delay)) => AckKind::Nak(Some(delay)),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "webhook delivery; retrying in 5 s");
                AckKind::Nak(Some(Duration::from_secs(5)))
            }
        };
        if let Err(e) = message.ack_with(ack).await {
            tracing::warn!(error = %e, "acknowledging a webhook event");
        }
    }
}

/// Delivers one event's webhook, if its job has one: `Some(delay)` to try again after `delay`.
async fn one(
    app: &AppState,
    http: &reqwest::Client,
    secret: &[u8],
    message: &jetstream::Message,
) -> anyhow::Result<Option<Duration>> {
    let event = if message.subject.ends_with(".done") {
        "done"
    } else {
        "failed"
    };
    let id = serde_json::from_slice::<serde_json::Value>(&message.payload)
        .ok()
        .and_then(|v| JobId::parse(v["id"].as_str()?));
    let Some(id) = id else { return Ok(None) };
    let Some(entry) = app.webhooks.entry(id.to_string()).await? else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    let mut log: WebhookLog = serde_json::from_slice(&entry.value)?;
    if log.state != WebhookState::Pending {
        return Ok(None);
    }
    let record = app.states.get(id).await?.map(|(r, _)| r);
    let body = serde_json::to_vec(&serde_json::json!({"event": event, "job": record}))?;
    let t = chrono::Utc::now().timestamp();
    let sent = http
        .post(&log.url)
        .header("content-type", "application/json")
        .header("atelier-signature", signature(secret, t, &body))
        .header("atelier-event", event)
        .header("atelier-job", id.to_string())
        .body(body)
        .send()
        .await;
    let (status, error) = match sent {
        Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
        Ok(r) => (
            Some(r.status().as_u16()),
            Some(format!("answered {}", r.status())),
        ),
        Err(e) => (None, Some(e.to_string())),
    };
    let ok = error.is_none();
    log.attempts.push(WebhookAttempt {
        at: chrono::Utc::now(),
        event: event.into(),
        status,
        error,
    });
    let tries = log.attempts.len();
    log.state = match (ok, tries >= MAX_ATTEMPTS) {
        (true, _) => WebhookState::Delivered,
        (false, true) => WebhookState::GaveUp,
        (false, false) => WebhookState::Pending,
    };
    // Compare-and-set on the revision read: a second replica delivering the same event (after a
    // lost acknowledgement) cannot erase this attempt.
    app.webhooks
        .update(
            id.to_string(),
            serde_json::to_vec(&log)?.into(),
            entry.revision,
        )
        .await?;
    if log.state == WebhookState::Pending {
        let backoff = Duration::from_secs(1 << (tries - 1).min(8)).min(Duration::from_secs(300));
        return Ok(Some(backoff));
    }
    if log.state == WebhookState::GaveUp {
        tracing::warn!(job = %id, url = %log.url, "webhook given up after {tries} attempts");
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_over_time_and_body() {
        // RFC 4231 test case 2's key and data, split as "<t>." + body would be: check the
        // construction against a direct HMAC of the joined bytes.
        let sig = signature(b"Jefe", 1700000000, b"{\"a\":1}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"1700000000.{\"a\":1}");
        let want = hex::encode(mac.finalize().into_bytes());
        assert_eq!(sig, format!("t=1700000000,v1={want}"));
        // RFC 4231 test case 2 itself, through the same HMAC.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac.finalize().into_bytes()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn webhook_urls_are_checked() {
        assert!(check_url("https://example.com/hook").is_ok());
        assert!(check_url("ftp://example.com/").is_err());
        assert!(check_url("not a url").is_err());
        assert!(check_url(&format!("https://e.com/{}", "a".repeat(3000))).is_err());
    }
}
