//! atelier's HTTP gateway: the API ([`api`], with the dataset, retrieval, training, augmentation
//! and AUTOMATIC1111-compatible routes in their own modules), its auth and limits ([`auth`]), and
//! [`Gateway`], the one way to start it — called by the `atelier-gateway` binary (src/main.rs),
//! by `atelier gateway` and by `atelier up`.
//!
//! Architecture invariant: the gateway never runs a job itself. It validates, records the job as
//! queued, and publishes it; services pick it up from the bus. It links no ML engine and no
//! service crate (the test `gateway_links_no_engine_and_no_service` reads `cargo metadata`).

pub mod a1111;
pub mod a1111_catalog;
pub mod a1111_embedding;
pub mod a1111_extras;
pub mod a1111_interrogate;
pub mod a1111_params;
pub mod a1111_progress;
pub mod a1111_templates;
pub mod api;
pub mod augment;
pub mod auth;
pub mod conn;
pub mod dataset_changes;
pub mod dataset_rows;
pub mod datasets;
pub mod error;
pub mod idempotency;
pub mod infotext;
pub mod jobs;
pub mod openapi_unions;
pub mod priority;
pub mod retrieval;
pub mod train;
pub mod ui;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// Gateway flags (also used by `atelier up` and `atelier demo`).
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Address the HTTP API listens on.
    #[arg(long = "addr", env = "ATELIER_ADDR", default_value = "127.0.0.1:7860")]
    pub addr: SocketAddr,
    /// API keys as NAME:SHA256HEX:SCOPES (comma-separated; `atelier keygen` makes them).
    #[arg(
        long = "api-key",
        env = "ATELIER_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Signs job webhooks (`Atelier-Webhook` header); without it, webhooks are refused. From the
    /// environment only (`ATELIER_WEBHOOK_SECRET`), never argv, where `ps` shows it.
    #[arg(skip = std::env::var("ATELIER_WEBHOOK_SECRET").ok().filter(|s| !s.is_empty()))]
    pub webhook_secret: Option<String>,
    /// A webhook per API key, as NAME=URL (comma-separated): every job that key creates without
    /// an `Atelier-Webhook` header of its own is announced there. Needs ATELIER_WEBHOOK_SECRET.
    #[arg(
        long = "key-webhook",
        env = "ATELIER_KEY_WEBHOOKS",
        value_delimiter = ','
    )]
    pub key_webhooks: Vec<String>,
    /// Serve without authentication. Only allowed on loopback addresses.
    #[arg(long = "insecure-no-auth", env = "ATELIER_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Sustained requests per second per API key.
    #[arg(
        long = "rate-limit",
        env = "ATELIER_RATE_LIMIT",
        default_value_t = 200.0
    )]
    pub rate_limit: f64,
    /// Requests per API key above the sustained rate.
    #[arg(
        long = "rate-burst",
        env = "ATELIER_RATE_BURST",
        default_value_t = 400.0
    )]
    pub rate_burst: f64,
    /// Requests in flight per API key.
    #[arg(
        long = "key-concurrency",
        env = "ATELIER_KEY_CONCURRENCY",
        default_value_t = 64
    )]
    pub key_concurrency: usize,
    /// Largest `POST /v1/jobs` body, bytes.
    #[arg(long = "max-json-bytes", env = "ATELIER_MAX_JSON_BYTES", default_value_t = 1 << 20)]
    pub max_json_bytes: u64,
    /// Largest upload, bytes.
    #[arg(long = "max-upload-bytes", env = "ATELIER_MAX_UPLOAD_BYTES", default_value_t = 4 << 30)]
    pub max_upload_bytes: u64,
    /// Largest A1111 request (`/sdapi/v1/*`: JSON with base64 images), bytes.
    #[arg(long = "max-a1111-bytes", env = "ATELIER_MAX_A1111_BYTES", default_value_t = 64 << 20)]
    pub max_a1111_bytes: u64,
    /// Open connections at most; a new one over the cap is closed at once.
    #[arg(
        long = "max-connections",
        env = "ATELIER_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    pub max_connections: usize,
    /// Seconds a client has to send a request's headers (and to start the next one on a
    /// kept-alive connection).
    #[arg(
        long = "header-timeout-secs",
        env = "ATELIER_HEADER_TIMEOUT_SECS",
        default_value_t = 10
    )]
    pub header_timeout_secs: u64,
    /// Seconds a request body may go without a byte before the request ends with 408.
    #[arg(
        long = "body-idle-secs",
        env = "ATELIER_BODY_IDLE_SECS",
        default_value_t = 30
    )]
    pub body_idle_secs: u64,
}

impl Default for GatewayArgs {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 7860)),
            api_keys: Vec::new(),
            webhook_secret: None,
            key_webhooks: Vec::new(),
            insecure_no_auth: false,
            rate_limit: 200.0,
            rate_burst: 400.0,
            key_concurrency: 64,
            max_json_bytes: 1 << 20,
            max_upload_bytes: 4 << 30,
            max_a1111_bytes: 64 << 20,
            max_connections: 1024,
            header_timeout_secs: 10,
            body_idle_secs: 30,
        }
    }
}

impl GatewayArgs {
    pub fn auth(&self) -> anyhow::Result<auth::Auth> {
        auth::Auth::new(
            &self.api_keys,
            self.insecure_no_auth,
            self.addr,
            auth::Limits {
                rate: self.rate_limit,
                burst: self.rate_burst,
                concurrency: self.key_concurrency,
            },
        )
        .map_err(anyhow::Error::msg)
    }

    pub fn conn_limits(&self) -> conn::ConnLimits {
        conn::ConnLimits {
            max_connections: self.max_connections.max(1),
            header_timeout: std::time::Duration::from_secs(self.header_timeout_secs.max(1)),
            body_idle_timeout: std::time::Duration::from_secs(self.body_idle_secs.max(1)),
        }
    }

    pub fn limits(&self) -> api::BodyLimits {
        api::BodyLimits {
            json: self.max_json_bytes,
            upload: self.max_upload_bytes,
            a1111: self.max_a1111_bytes,
        }
    }
}

/// Staged uploads older than this are debris of a crash (no upload runs this long unfinished
/// without writing: the staging file's modification time moves with every part).
const STALE_UPLOAD_AGE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// Binds and serves the API until `shutdown`; returns the bound address and the server task.
pub async fn serve(
    args: &GatewayArgs,
    app: api::AppState,
    shutdown: CancellationToken,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let auth = Arc::new(args.auth()?);
    let listener = tokio::net::TcpListener::bind(args.addr).await.map_err(|e| {
        anyhow::anyhow!("binding the gateway to {}: {e} (is another atelier running? pick another with --addr / ATELIER_ADDR)", args.addr)
    })?;
    let addr = listener.local_addr()?;
    // Uploads a crash cut off (staged, never copied to their content address).
    let store = app.store.clone();
    tokio::spawn(async move {
        match store.remove_stale_uploads(STALE_UPLOAD_AGE).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "removed stale partial uploads"),
            Err(e) => tracing::warn!(error = %e, "removing stale partial uploads"),
        }
    });
    atelier_kit::outbox::spawn_reconciler(
        app.bus.clone(),
        app.states.clone(),
        std::time::Duration::from_secs(30),
        shutdown.clone(),
    );
    let mut app = app;
    app.webhook_secret = args.webhook_secret.clone().map(Into::into);
    app.key_webhooks = Arc::new(webhooks::key_webhooks(
        &args.key_webhooks,
        app.webhook_secret.is_some(),
    )?);
    webhooks::spawn_deliverer(app.clone(), shutdown.clone());
    let limits = args.conn_limits();
    let router = conn::with_body_timeout(api::router(app, auth), limits);
    let task = tokio::spawn(conn::serve(listener, router, limits, shutdown));
    tracing::info!(%addr, "gateway listening");
    Ok((addr, task))
}

/// The gateway on its own (cluster mode): its flags, the bus and store it uses, and the model
/// registry the A1111 routes list. `atelier-gateway` and `atelier gateway` both run this.
#[derive(clap::Args, Debug, Clone)]
pub struct Gateway {
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub nats: atelier_kit::config::NatsArgs,
    #[command(flatten)]
    pub store: atelier_kit::config::StoreArgs,
    #[command(flatten)]
    pub telemetry: atelier_kit::config::TelemetryArgs,
    /// The model registry the A1111 routes list and check (a shared volume in a cluster).
    #[arg(long = "models", env = "ATELIER_MODELS")]
    pub models: Option<std::path::PathBuf>,
}

impl Gateway {
    /// Connects, serves until SIGINT/SIGTERM, then drains.
    pub async fn run(self) -> anyhow::Result<()> {
        atelier_kit::telemetry::init_tracing(&self.telemetry);
        let shutdown = atelier_kit::shutdown::on_signals();
        let bus = atelier_kit::Bus::connect(&self.nats, "atelier-gateway").await?;
        bus.ensure_topology().await?;
        let store = atelier_kit::Store::open(&self.store)?;
        let app = api::AppState::new(
            bus.clone(),
            store,
            Default::default(),
            self.gateway.limits(),
            shutdown.clone(),
        )
        .await?
        .with_models(self.models);
        let (_, task) = serve(&self.gateway, app, shutdown).await?;
        task.await??;
        let _ = bus.client.flush().await;
        Ok(())
    }
}
