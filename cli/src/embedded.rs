//! `atelier up`: gateway plus every service in one process, on the same code as the cluster.
//!
//! Starts nats-server as a child process with JetStream under `<data-dir>/nats` unless a NATS URL
//! is configured; objects go under `<data-dir>/objects` unless S3 is configured. Ctrl-C drains the
//! workers, stops the gateway and then nats-server. Jobs live in JetStream's file storage, so a
//! restart resumes what was queued or running.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use atelier_kit::config::{NatsArgs, StoreArgs, TelemetryArgs, WorkerArgs};
use atelier_kit::nats_server::{NatsServer, NatsServerOptions};
use atelier_kit::service::Runtime;
use atelier_kit::telemetry::Metrics;
use atelier_kit::{Bus, Store, Worker};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use atelier_gateway::GatewayArgs;

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Where embedded state lives: `nats/` (JetStream), `objects/` (default store), `logs/`.
    #[arg(
        long = "data-dir",
        env = "ATELIER_DATA_DIR",
        default_value = "./.atelier"
    )]
    pub data_dir: PathBuf,
    /// Port of the embedded nats-server (0 picks a free one). External systems publish events here.
    #[arg(long = "nats-port", env = "ATELIER_NATS_PORT", default_value_t = 4222)]
    pub nats_port: u16,
    #[command(flatten)]
    pub gateway: GatewayArgs,
    #[command(flatten)]
    pub nats: NatsArgs,
    #[command(flatten)]
    pub store: StoreArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    #[command(flatten)]
    pub worker: WorkerArgs,
    /// Model registry for the sampler and inpainter (default `<data-dir>/models`).
    #[command(flatten)]
    pub models: atelier_sampler::Config,
    /// The captioner's endpoint (an OpenAI-compatible vision API).
    #[command(flatten)]
    pub openai: atelier_captioner::OpenAiArgs,
    /// Caption through the built-in scene describer (an OpenAI-compatible server on loopback
    /// that captions atelier's generated sample scenes) instead of --openai-base-url; for
    /// trying the pipeline without a vision model.
    #[arg(long = "scene-captioner", env = "ATELIER_SCENE_CAPTIONER")]
    pub scene_captioner: bool,
    /// A folder of BLIP model folders for the captioner's `blip` backend
    /// (default `<data-dir>/models/blip` when it exists).
    #[arg(long = "blip-models", env = "ATELIER_BLIP_MODELS")]
    pub blip_models: Option<PathBuf>,
}

/// A running embedded atelier.
pub struct Embedded {
    pub addr: SocketAddr,
    pub nats_url: String,
    pub bus: Bus,
    pub store: Store,
    nats: Option<NatsServer>,
    /// The built-in scene describer, when `--scene-captioner` is on.
    _vision: Option<atelier_captioner::vision_server::VisionServer>,
    tasks: JoinSet<anyhow::Result<()>>,
    shutdown: CancellationToken,
}

impl Embedded {
    pub async fn start(mut args: UpArgs, shutdown: CancellationToken) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&args.data_dir)
            .map_err(|e| anyhow::anyhow!("creating data dir {}: {e}", args.data_dir.display()))?;
        if args.store.store == StoreArgs::default().store {
            args.store.store = args.data_dir.join("objects").display().to_string();
        }
        let nats = match &args.nats.nats_url {
            Some(_) => None,
            None => {
                let server = tokio::task::block_in_place(|| {
                    NatsServer::start(NatsServerOptions {
                        store_dir: args.data_dir.join("nats"),
                        port: args.nats_port,
                        log_file: args.data_dir.join("logs/nats-server.log"),
                        config: None,
                    })
                })
                .map_err(|e| anyhow::anyhow!("{e:#} (port {} busy? use --nats-port 0, or ATELIER_NATS_URL for an existing server)", args.nats_port))?;
                args.nats.nats_url = Some(server.url());
                Some(server)
            }
        };
        let nats_url = args.nats.url().to_owned();
        let service_args = atelier_kit::config::ServiceArgs {
            nats: args.nats.clone(),
            store: args.store.clone(),
            telemetry: args.telemetry.clone(),
            worker: args.worker.clone(),
        };
        let rt = Runtime::connect(&service_args, "atelier-embedded").await?;
        let metrics: Arc<Metrics> = rt.metrics.clone();
        let mut tasks = JoinSet::new();

        let checksum = Worker::new(
            atelier_checksum::Checksum,
            rt.bus.clone(),
            rt.store.clone(),
            metrics.clone(),
        )
        .await?;
        let (w, s) = (args.worker.clone(), shutdown.clone());
        tasks.spawn(async move { checksum.run(w, s).await });
        let (w, s, r) = (args.worker.clone(), shutdown.clone(), rt.clone());
        tasks.spawn(async move {
            atelier_ingest::Ingest::run(r, w, atelier_ingest::analyze::DEFAULT_MAX_PIXELS, s).await
        });

        let vision = if args.scene_captioner {
            let server = atelier_captioner::vision_server::VisionServer::start(
                atelier_captioner::vision_server::ServerConfig {
                    model: "atelier-scene-describer".into(),
                    ..Default::default()
                },
            )
            .await?;
            args.openai.base_url = server.base_url();
            args.openai.model = "atelier-scene-describer".into();
            Some(server)
        } else {
            None
        };
        let captioner = Worker::new(
            atelier_captioner::Captioner::new(args.openai.clone())?.with_blip_models(
                args.blip_models
                    .clone()
                    .or_else(|| Some(args.data_dir.join("models/blip")).filter(|d| d.is_dir())),
            ),
            rt.bus.clone(),
            rt.store.clone(),
            metrics.clone(),
        )
        .await?;
        let (w, s) = (args.worker.clone(), shutdown.clone());
        tasks.spawn(async move { captioner.run(w, s).await });
        let filter = Worker::new(
            atelier_quality_filter::QualityFilter::discover(),
            rt.bus.clone(),
            rt.store.clone(),
            metrics.clone(),
        )
        .await?;
        let (w, s) = (args.worker.clone(), shutdown.clone());
        tasks.spawn(async move { filter.run(w, s).await });

        if args.models.models == std::path::Path::new("models") {
            args.models.models = args.data_dir.join("models");
        }
        let (device, dtype) = atelier_diffusion::kernels::device_named(&args.models.device)?;
        for service in [
            atelier_contracts::Service::Sampler,
            atelier_contracts::Service::Inpainter,
        ] {
            let gen = Worker::new(
                args.models.generator(service)?,
                rt.bus.clone(),
                rt.store.clone(),
                metrics.clone(),
            )
            .await?;
            let (w, s) = (args.worker.clone(), shutdown.clone());
            tasks.spawn(async move { gen.run(w, s).await });
        }

        let trainer = Worker::new(
            atelier_trainer::Trainer::new(
                atelier_registry::Registry::new(&args.models.models),
                device,
                dtype,
                std::time::Duration::from_secs(1800),
            ),
            rt.bus.clone(),
            rt.store.clone(),
            metrics.clone(),
        )
        .await?;
        let (w, s) = (args.worker.clone(), shutdown.clone());
        tasks.spawn(async move { trainer.run(w, s).await });

        // The retrieval indexer: MiniLM from .tools/ (or ATELIER_MINILM_DIR), CLIP from
        // ATELIER_CLIP_MODEL or DATA_DIR/models/clip.
        let found = atelier_retrieval_indexer::Models::discover();
        let indexer =
            atelier_retrieval_indexer::Indexer::new(atelier_retrieval_indexer::Models::new(
                found.clip_dir.or_else(|| {
                    Some(args.data_dir.join("models/clip"))
                        .filter(|d| d.join("config.json").is_file())
                }),
                found.minilm_dir,
            ));
        let (b, st, s) = (rt.bus.clone(), rt.store.clone(), shutdown.clone());
        tasks.spawn(atelier_retrieval_indexer::query::serve(
            indexer.clone(),
            b,
            st,
            s,
        ));
        let indexer =
            Worker::new(indexer, rt.bus.clone(), rt.store.clone(), metrics.clone()).await?;
        let (w, s) = (args.worker.clone(), shutdown.clone());
        tasks.spawn(async move { indexer.run(w, s).await });

        // The augmenter: `openai` paraphrases through the captioner's endpoint settings.
        let augmenter = Worker::new(
            atelier_augmenter::Augmenter {
                openai: Some(std::sync::Arc::new(atelier_captioner::openai::Client::new(
                    args.openai.clone(),
                )?)),
            },
            rt.bus.clone(),
            rt.store.clone(),
            metrics.clone(),
        )
        .await?;
        let (w, s) = (args.worker.clone(), shutdown.clone());
        tasks.spawn(async move { augmenter.run(w, s).await });

        let app = atelier_gateway::api::AppState::new(
            rt.bus.clone(),
            rt.store.clone(),
            metrics,
            args.gateway.limits(),
            shutdown.clone(),
        )
        .await?
        .with_models(Some(args.models.models.clone()));
        let (addr, server) = atelier_gateway::serve(&args.gateway, app, shutdown.clone()).await?;
        tasks.spawn(async move { server.await? });
        tracing::info!(%addr, nats = %nats_url, store = rt.store.describe(), "atelier is up");
        Ok(Self {
            addr,
            nats_url,
            bus: rt.bus,
            store: rt.store,
            nats,
            _vision: vision,
            tasks,
            shutdown,
        })
    }

    /// Waits for every part to finish (after the shutdown token fired, or after one part failed,
    /// which stops the others), then stops nats-server.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        while let Some(res) = self.tasks.join_next().await {
            let res = res.map_err(anyhow::Error::from).and_then(|r| r);
            if let Err(e) = res {
                tracing::error!(error = %e, "embedded part failed; stopping the others");
                self.shutdown.cancel();
                first_error.get_or_insert(e);
            }
        }
        let _ = self.bus.client.flush().await;
        if let Some(mut nats) = self.nats.take() {
            tokio::task::block_in_place(|| nats.stop(std::time::Duration::from_secs(10)));
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
