//! atelier-kit: the one runtime every atelier service uses.
//!
//! A service is mostly its [`worker::Handler`]; everything about NATS, acking, retrying, dead-letter
//! queues, idempotency, job state, object storage, configuration, logs, metrics, health and shutdown
//! lives here, written once:
//!
//! - [`config`]: CLI flags and environment (`ATELIER_*`), the single place they are documented.
//! - [`bus`]: connecting to NATS and declaring every stream, consumer and KV bucket.
//! - [`kv`]: typed key-value buckets (a bucket reads and writes only its own value type).
//! - [`store`]: the object store (local directory or S3), content-addressed, with retries.
//! - [`jobstate`]: the `atelier_jobs` KV bucket: queued → running → succeeded | failed | cancelled.
//! - [`joblist`]: a filtered page of jobs, newest first, in bounded memory.
//! - [`consumer`]: the JetStream pull loop: batched fetch, back-pressure, in-progress acks, nak with
//!   backoff, dead-lettering after `max_deliver`, graceful drain.
//! - [`worker`]: the job protocol on top of [`consumer`]: idempotency, state, cancellation, results.
//! - [`telemetry`]: tracing, Prometheus metrics, `/healthz` and `/metrics`.
//! - [`shutdown`]: SIGINT/SIGTERM into a cancellation token.
//! - [`memory`]: a worker's memory budget (jobs that cannot fit are refused with the figure).
//! - [`redact`]: the server's paths out of job errors users read.
//! - [`nats_server`]: starting the official nats-server binary as a child process.

pub mod bus;
pub mod config;
pub mod consumer;
pub mod datasets;
pub mod gpus;
pub mod joblist;
pub mod jobstate;
pub mod kv;
pub mod memory;
pub mod nats_server;
pub mod outbox;
pub mod queue;
pub mod redact;
pub mod service;
pub mod shutdown;
pub mod stale_uploads;
pub mod store;
pub mod telemetry;
pub mod worker;

pub use bus::Bus;
pub use store::Store;
pub use worker::{Handler, JobCtx, JobError, Worker};

/// A short random id for this process, used in logs and job records (`worker` field).
pub fn instance_id(service: &str) -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!(
        "{service}@{host}:{}:{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}
