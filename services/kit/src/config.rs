//! Configuration from CLI flags and environment variables. Every `ATELIER_*` variable a process reads
//! is declared here (see also README.md, "Configuration").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How to reach NATS.
#[derive(clap::Args, Debug, Clone)]
pub struct NatsArgs {
    /// NATS server URL; a cluster's nodes comma-separated. `atelier up` starts its own
    /// nats-server when this is unset.
    #[arg(long = "nats-url", env = "ATELIER_NATS_URL")]
    pub nats_url: Option<String>,
    /// NATS user (see infra/nats/ for per-service users).
    #[arg(long = "nats-user", env = "ATELIER_NATS_USER")]
    pub nats_user: Option<String>,
    /// NATS password.
    #[arg(
        long = "nats-password",
        env = "ATELIER_NATS_PASSWORD",
        hide_env_values = true
    )]
    pub nats_password: Option<String>,
    /// Copies JetStream keeps of every stream and bucket (1 on a single server; 3 on a
    /// three-node cluster, so losing a node loses nothing).
    #[arg(
        long = "nats-replicas",
        env = "ATELIER_NATS_REPLICAS",
        default_value_t = 1
    )]
    pub nats_replicas: usize,
    /// CA certificate (PEM) the NATS servers' certificates must chain to. TLS is required when
    /// this is set or the URL starts with `tls://`.
    #[arg(long = "nats-tls-ca", env = "ATELIER_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
}

impl Default for NatsArgs {
    fn default() -> Self {
        Self {
            nats_url: None,
            nats_user: None,
            nats_password: None,
            nats_replicas: 1,
            nats_tls_ca: None,
        }
    }
}

/// Passwords that are someone's default somewhere: refused like an empty one.
const DEFAULT_PASSWORDS: &[&str] = &[
    "password",
    "changeme",
    "change-me",
    "secret",
    "atelier",
    "nats",
    "admin",
    "default",
    "s3cr3t",
];

impl NatsArgs {
    pub const DEFAULT_URL: &'static str = "nats://127.0.0.1:4222";
    pub fn url(&self) -> &str {
        self.nats_url.as_deref().unwrap_or(Self::DEFAULT_URL)
    }

    /// A user without a password, or with an empty, short or well-known one, is refused before
    /// connecting: the error names the variable to set.
    pub fn check_credentials(&self) -> Result<(), String> {
        let Some(user) = &self.nats_user else {
            return Ok(());
        };
        let password = self.nats_password.as_deref().unwrap_or_default();
        let weak = password.trim().is_empty()
            || password.chars().count() < 8
            || DEFAULT_PASSWORDS.contains(&password.to_lowercase().as_str());
        if weak {
            return Err(format!(
                "NATS user {user:?} has an empty, short or default password: set \
                 ATELIER_NATS_PASSWORD to the generated one (`just cluster-env` writes fresh \
                 credentials; the local cluster's are in .atelier/cluster/env)"
            ));
        }
        Ok(())
    }
}

/// Where artifacts live.
#[derive(clap::Args, Debug, Clone)]
pub struct StoreArgs {
    /// Object store: a local directory path, `file:///abs/path`, or `s3://bucket[/prefix]`.
    #[arg(
        long = "store",
        env = "ATELIER_STORE",
        default_value = "./.atelier/objects"
    )]
    pub store: String,
    /// S3 endpoint URL (SeaweedFS, MinIO, …); unset means AWS.
    #[arg(long = "s3-endpoint", env = "ATELIER_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(
        long = "s3-region",
        env = "ATELIER_S3_REGION",
        default_value = "us-east-1"
    )]
    pub s3_region: String,
    #[arg(
        long = "s3-access-key-id",
        env = "AWS_ACCESS_KEY_ID",
        hide_env_values = true
    )]
    pub s3_access_key_id: Option<String>,
    #[arg(
        long = "s3-secret-access-key",
        env = "AWS_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    pub s3_secret_access_key: Option<String>,
    /// Seconds a store operation keeps retrying (with exponential backoff) before it fails.
    #[arg(
        long = "store-retry-secs",
        env = "ATELIER_STORE_RETRY_SECS",
        default_value_t = 120
    )]
    pub store_retry_secs: u64,
}

impl Default for StoreArgs {
    fn default() -> Self {
        Self {
            store: "./.atelier/objects".into(),
            s3_endpoint: None,
            s3_region: "us-east-1".into(),
            s3_access_key_id: None,
            s3_secret_access_key: None,
            store_retry_secs: 120,
        }
    }
}

/// Where a store URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Local(PathBuf),
    S3 {
        bucket: String,
        prefix: Option<String>,
    },
}

impl StoreArgs {
    pub fn location(&self) -> Result<StoreLocation, String> {
        let s = self.store.trim();
        if let Some(rest) = s.strip_prefix("s3://") {
            let mut it = rest.splitn(2, '/');
            let bucket = it.next().unwrap_or_default().to_owned();
            if bucket.is_empty() {
                return Err(format!(
                    "store {s:?} has no bucket; write s3://BUCKET[/prefix]"
                ));
            }
            let prefix = it
                .next()
                .map(|p| p.trim_matches('/').to_owned())
                .filter(|p| !p.is_empty());
            Ok(StoreLocation::S3 { bucket, prefix })
        } else if let Some(path) = s.strip_prefix("file://") {
            Ok(StoreLocation::Local(PathBuf::from(path)))
        } else if s.contains("://") {
            Err(format!(
                "store {s:?}: unsupported scheme; use a path, file:///path or s3://bucket"
            ))
        } else if s.is_empty() {
            Err("store is empty; set --store or ATELIER_STORE".into())
        } else {
            Ok(StoreLocation::Local(PathBuf::from(s)))
        }
    }
}

/// Logging and the per-process health/metrics listener.
#[derive(clap::Args, Debug, Clone)]
pub struct TelemetryArgs {
    /// Log format: `text` or `json`.
    #[arg(
        long = "log-format",
        env = "ATELIER_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    /// Log filter (tracing EnvFilter syntax), e.g. `info,atelier_kit=debug`.
    #[arg(long = "log", env = "ATELIER_LOG", default_value = "info")]
    pub log: String,
    /// Address of this process's `/healthz` and `/metrics` (services only; the gateway serves them
    /// on its API address). Port 0 picks a free port.
    #[arg(
        long = "health-addr",
        env = "ATELIER_HEALTH_ADDR",
        default_value = "127.0.0.1:0"
    )]
    pub health_addr: SocketAddr,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// How a service consumes its work queue.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Jobs (or batches, for batched services) this process runs at once.
    #[arg(
        long = "concurrency",
        env = "ATELIER_CONCURRENCY",
        default_value_t = 16
    )]
    pub concurrency: usize,
    /// Deliveries before a failing job goes to the dead-letter stream.
    #[arg(long = "max-deliver", env = "ATELIER_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: u64,
    /// Attempts of one job that may end with their worker's death (killed, out of memory)
    /// before the job fails `worker_died` instead of taking down the next worker.
    #[arg(
        long = "max-worker-deaths",
        env = "ATELIER_MAX_WORKER_DEATHS",
        default_value_t = 2
    )]
    pub max_worker_deaths: u64,
    /// Seconds without an ack (or in-progress ack) before NATS redelivers a job to another replica.
    #[arg(
        long = "ack-wait-secs",
        env = "ATELIER_ACK_WAIT_SECS",
        default_value_t = 30.0
    )]
    pub ack_wait_secs: f64,
    /// Unacked jobs the service's consumer allows across all replicas (back-pressure).
    #[arg(
        long = "max-ack-pending",
        env = "ATELIER_MAX_ACK_PENDING",
        default_value_t = 1000
    )]
    pub max_ack_pending: i64,
    /// First retry delay in milliseconds; doubles each delivery up to 60 s.
    #[arg(
        long = "retry-backoff-ms",
        env = "ATELIER_RETRY_BACKOFF_MS",
        default_value_t = 1000
    )]
    pub retry_backoff_ms: u64,
}

impl Default for WorkerArgs {
    fn default() -> Self {
        Self {
            concurrency: 16,
            max_deliver: 5,
            max_worker_deaths: 2,
            ack_wait_secs: 30.0,
            max_ack_pending: 1000,
            retry_backoff_ms: 1000,
        }
    }
}

impl WorkerArgs {
    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs_f64(self.ack_wait_secs.max(0.5))
    }
    /// Delay before delivery `delivered + 1`.
    pub fn backoff(&self, delivered: u64) -> Duration {
        let exp = delivered.saturating_sub(1).min(16) as u32;
        Duration::from_millis(
            self.retry_backoff_ms
                .saturating_mul(1u64 << exp)
                .min(60_000),
        )
    }
}

/// Everything a service binary needs: `#[command(flatten)] kit: ServiceArgs`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_locations() {
        let mut a = StoreArgs {
            store: "s3://bucket/some/prefix/".into(),
            ..Default::default()
        };
        assert_eq!(
            a.location().unwrap(),
            StoreLocation::S3 {
                bucket: "bucket".into(),
                prefix: Some("some/prefix".into())
            }
        );
        a.store = "file:///tmp/x".into();
        assert_eq!(a.location().unwrap(), StoreLocation::Local("/tmp/x".into()));
        a.store = "s3://".into();
        assert!(a.location().unwrap_err().contains("no bucket"));
        a.store = "gs://x".into();
        assert!(a.location().unwrap_err().contains("unsupported scheme"));
    }

    #[test]
    fn empty_short_and_default_nats_passwords_are_refused() {
        let with = |pw: Option<&str>| NatsArgs {
            nats_user: Some("sampler".into()),
            nats_password: pw.map(String::from),
            ..Default::default()
        };
        for bad in [None, Some(""), Some("   "), Some("short"), Some("ChangeMe")] {
            let e = with(bad).check_credentials().unwrap_err();
            assert!(e.contains("ATELIER_NATS_PASSWORD"), "{e}");
        }
        assert!(with(Some("9f2c1e7a44b0d3c8")).check_credentials().is_ok());
        assert!(
            NatsArgs::default().check_credentials().is_ok(),
            "no user: no auth"
        );
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let w = WorkerArgs {
            retry_backoff_ms: 100,
            ..Default::default()
        };
        assert_eq!(w.backoff(1), Duration::from_millis(100));
        assert_eq!(w.backoff(3), Duration::from_millis(400));
        assert_eq!(w.backoff(40), Duration::from_secs(60));
    }
}
