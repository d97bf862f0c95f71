//! `run_service`: everything a service binary's `main` does, once for all services.

use std::sync::Arc;

use crate::config::ServiceArgs;
use crate::telemetry::{self, Health, Metrics};
use crate::{shutdown, Bus, Handler, Store, Worker};

/// Connected runtime pieces a process shares between its parts.
#[derive(Clone)]
pub struct Runtime {
    pub bus: Bus,
    pub store: Store,
    pub metrics: Arc<Metrics>,
}

impl Runtime {
    /// Connects to NATS, declares the topology and opens the store.
    pub async fn connect(args: &ServiceArgs, name: &str) -> anyhow::Result<Self> {
        let bus = Bus::connect(&args.nats, name).await?;
        bus.ensure_topology().await?;
        let store = Store::open(&args.store)?;
        Ok(Self {
            bus,
            store,
            metrics: Arc::new(Metrics::default()),
        })
    }

    pub fn health(&self) -> Health {
        Health {
            bus: self.bus.clone(),
            store: self.store.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

/// Runs one service process: logs, connection, topology, `/healthz` + `/metrics`, the worker, and a
/// graceful drain on SIGINT/SIGTERM.
pub async fn run_service<H: Handler>(handler: H, args: ServiceArgs) -> anyhow::Result<()> {
    let name = handler.service().name();
    let worker_args = args.worker.clone();
    run_process(name, args, move |rt, shutdown| async move {
        let worker = Worker::new(
            handler,
            rt.bus.clone(),
            rt.store.clone(),
            rt.metrics.clone(),
        )
        .await?;
        worker.run(worker_args, shutdown).await
    })
    .await
}

/// The process shell around any consumer loop `body`: logs, connection, topology, health server,
/// signals, and a final flush.
pub async fn run_process<F, Fut>(name: &str, args: ServiceArgs, body: F) -> anyhow::Result<()>
where
    F: FnOnce(Runtime, shutdown::CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    telemetry::init_tracing(&args.telemetry);
    let shutdown = shutdown::on_signals();
    let rt = Runtime::connect(&args, &format!("atelier-{name}")).await?;
    tracing::info!(
        service = name,
        store = rt.store.describe(),
        nats = args.nats.url(),
        "starting"
    );
    telemetry::serve_health(args.telemetry.health_addr, rt.health(), shutdown.clone()).await?;
    body(rt.clone(), shutdown).await?;
    // Flush acks and published events before exiting.
    let _ = rt.bus.client.flush().await;
    tracing::info!(service = name, "stopped");
    Ok(())
}
