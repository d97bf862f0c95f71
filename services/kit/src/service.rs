//! How a service starts. Each service crate exposes `serve(config, Launch)`; its binary calls it
//! through [`run_main`] (logs, connection, health server, signals) and `atelier up` calls the same
//! function with the embedded process's [`Launch`], so both honour the same settings.

use std::sync::Arc;

use crate::config::{ServiceArgs, WorkerArgs};
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

/// What a service needs to run inside a process: the connected runtime, how to consume its
/// queue, and the token that stops it.
#[derive(Clone)]
pub struct Launch {
    pub rt: Runtime,
    pub worker: WorkerArgs,
    pub shutdown: shutdown::CancellationToken,
}

impl Launch {
    /// Consumes the handler's queue until shutdown (the common body of a `serve`).
    pub async fn run<H: Handler>(self, handler: H) -> anyhow::Result<()> {
        let worker = Worker::new(
            handler,
            self.rt.bus.clone(),
            self.rt.store.clone(),
            self.rt.metrics.clone(),
        )
        .await?;
        worker.run(self.worker, self.shutdown).await
    }
}

/// A service binary's `main`: the process shell of [`run_process`] around `serve(Launch)`.
pub async fn run_main<F, Fut>(name: &str, args: ServiceArgs, serve: F) -> anyhow::Result<()>
where
    F: FnOnce(Launch) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let worker = args.worker.clone();
    run_process(name, args, move |rt, shutdown| {
        serve(Launch {
            rt,
            worker,
            shutdown,
        })
    })
    .await
}

/// Runs one service process: logs, connection, topology, `/healthz` + `/metrics`, the worker, and a
/// graceful drain on SIGINT/SIGTERM.
pub async fn run_service<H: Handler>(handler: H, args: ServiceArgs) -> anyhow::Result<()> {
    let name = handler.service().name();
    run_main(name, args, move |launch| launch.run(handler)).await
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
