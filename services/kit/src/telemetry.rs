//! Logs (tracing, text or JSON), Prometheus metrics, and the `/healthz` + `/metrics` endpoints.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::config::{LogFormat, TelemetryArgs};
use crate::{Bus, Store};

/// Installs the global tracing subscriber. Safe to call more than once (later calls do nothing).
pub fn init_tracing(args: &TelemetryArgs) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_new(&args.log).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    pub service: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabel {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

fn job_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 20))
}

/// Every metric an atelier process exports. One per process, shared by its parts.
pub struct Metrics {
    registry: Registry,
    /// `atelier_jobs_total{service,outcome}`: outcome is succeeded, failed, retried, cancelled,
    /// dead_lettered or duplicate (a redelivery of a finished job).
    pub jobs: Family<JobLabels, Counter>,
    pub job_seconds: Family<ServiceLabel, Histogram, fn() -> Histogram>,
    pub in_flight: Family<ServiceLabel, Gauge>,
    pub fetch_errors: Family<ServiceLabel, Counter>,
    pub http_requests: Family<HttpLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("atelier");
        let jobs = Family::<JobLabels, Counter>::default();
        let job_seconds =
            Family::<ServiceLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                job_seconds as fn() -> Histogram,
            );
        let in_flight = Family::<ServiceLabel, Gauge>::default();
        let fetch_errors = Family::<ServiceLabel, Counter>::default();
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register("jobs", "Jobs settled, by service and outcome", jobs.clone());
        registry.register("job_seconds", "Handler time per job", job_seconds.clone());
        registry.register(
            "jobs_in_flight",
            "Jobs being handled now",
            in_flight.clone(),
        );
        registry.register(
            "fetch_errors",
            "Failed JetStream fetches",
            fetch_errors.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests served",
            http_requests.clone(),
        );
        Self {
            registry,
            jobs,
            job_seconds,
            in_flight,
            fetch_errors,
            http_requests,
        }
    }
}

impl Metrics {
    pub fn job(&self, service: &str, outcome: &str) {
        self.jobs
            .get_or_create(&JobLabels {
                service: service.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// What `/healthz` checks.
#[derive(Clone)]
pub struct Health {
    pub bus: Bus,
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

impl Health {
    /// `(nats ok, store ok)`, each bounded by 2 s.
    pub async fn check(&self) -> (bool, bool) {
        let t = Duration::from_secs(2);
        tokio::join!(self.bus.ping(t), self.store.ping(t))
    }
}

async fn healthz(State(h): State<Health>) -> impl IntoResponse {
    let (nats, store) = h.check().await;
    let status = if nats && store {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "status": if nats && store { "ok" } else { "unavailable" },
        "nats": nats,
        "store": store,
    });
    (status, Json(body))
}

async fn metrics(State(h): State<Health>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        h.metrics.encode(),
    )
}

/// `/healthz` (200 only when NATS and the store answer, else 503) and `/metrics`.
pub fn health_router(health: Health) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(health)
}

/// Serves [`health_router`] on `addr` until `shutdown`; returns the bound address.
pub async fn serve_health(
    addr: SocketAddr,
    health: Health,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the health/metrics address {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tracing::info!(%bound, "serving /healthz and /metrics");
    tokio::spawn(async move {
        let _ = axum::serve(listener, health_router(health))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
    });
    Ok(bound)
}
