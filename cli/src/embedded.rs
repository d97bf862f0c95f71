//! `atelier up`: gateway plus every service in one process, on the same code as the cluster.
//!
//! Starts nats-server as a child process with JetStream under `<data-dir>/nats` unless a NATS URL
//! is configured (on 127.0.0.1, user `atelier` with the password in `<data-dir>/nats-password`); objects go under `<data-dir>/objects` unless S3 is configured. Ctrl-C drains the
//! workers, stops the gateway and then nats-server. Jobs live in JetStream's file storage, so a
//! restart resumes what was queued or running.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use atelier_captioner::vision_server::{ServerConfig, VisionServer};
use atelier_kit::config::{NatsArgs, StoreArgs, TelemetryArgs, WorkerArgs};
use atelier_kit::nats_server::{NatsServer, NatsServerOptions};
use atelier_kit::service::{Launch, Runtime};
use atelier_kit::{Bus, Store};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use atelier_gateway::GatewayArgs;

#[derive(clap::Args, Debug, Clone)]
pub struct UpArgs {
    /// Where embedded state lives: `nats/` (JetStream), `objects/` (default store), `logs/`,
    /// `models/` (the registry; `models/blip`, `models/clip` when present).
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
    /// Every service's own settings, the same flags and variables as its binary.
    #[command(flatten)]
    pub services: ServiceConfigs,
    /// Caption through the built-in scene describer (an OpenAI-compatible server on loopback
    /// that captions atelier's generated sample scenes) instead of --openai-base-url; for
    /// trying the pipeline without a vision model.
    #[arg(long = "scene-captioner", env = "ATELIER_SCENE_CAPTIONER")]
    pub scene_captioner: bool,
    /// Seconds Ctrl-C / SIGTERM waits for running jobs before exiting; jobs still running then
    /// are not acknowledged and run again at the next start.
    #[arg(long = "drain-secs", env = "ATELIER_DRAIN_SECS", default_value_t = 8.0)]
    pub drain_secs: f64,
}

/// The settings of every service, as their binaries read them. Settings two services share are
/// read once: the OpenAI endpoint (captioner, augmenter), the CLIP and MiniLM folders (quality
/// filter, retrieval indexer), the registry and device (sampler, inpainter, trainer).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServiceConfigs {
    #[command(flatten)]
    pub ingest: atelier_ingest::Config,
    #[command(flatten)]
    pub captioner: atelier_captioner::Config,
    #[command(flatten)]
    pub quality_filter: atelier_quality_filter::Config,
    #[command(flatten)]
    pub generation: atelier_sampler::Config,
    #[command(flatten)]
    pub trainer: atelier_trainer::Config,
}

impl ServiceConfigs {
    /// Embedded defaults under the data dir: the registry `<data-dir>/models` (unless
    /// --models names another), BLIP models in `models/blip`, CLIP in `models/clip`.
    fn under(mut self, data_dir: &Path) -> Self {
        let models = &mut self.generation.model.models;
        if models == Path::new("models") {
            *models = data_dir.join("models");
        }
        let blip = data_dir.join("models/blip");
        if self.captioner.blip_models.is_none() && blip.is_dir() {
            self.captioner.blip_models = Some(blip);
        }
        let clip = data_dir.join("models/clip");
        let dirs = &mut self.quality_filter.models;
        if dirs.clip().is_none() && clip.join("config.json").is_file() {
            dirs.clip_model = Some(clip);
        }
        self
    }
}

/// A running embedded atelier.
pub struct Embedded {
    pub addr: SocketAddr,
    pub nats_url: String,
    pub bus: Bus,
    pub store: Store,
    nats: Option<NatsServer>,
    /// The built-in scene describer, when `--scene-captioner` is on.
    _vision: Option<VisionServer>,
    tasks: JoinSet<anyhow::Result<()>>,
    shutdown: CancellationToken,
    drain: std::time::Duration,
    data_dir: PathBuf,
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
                let (password, conf) = crate::embedded_nats::prepare(&args.data_dir)?;
                let server = tokio::task::block_in_place(|| {
                    NatsServer::start(NatsServerOptions {
                        store_dir: args.data_dir.join("nats"),
                        port: args.nats_port,
                        log_file: args.data_dir.join("logs/nats-server.log"),
                        config: Some(conf),
                    })
                })
                .map_err(|e| anyhow::anyhow!("{e:#} (port {} busy? use --nats-port 0, or ATELIER_NATS_URL for an existing server)", args.nats_port))?;
                args.nats.nats_url = Some(server.url());
                args.nats.nats_user = Some(crate::embedded_nats::USER.into());
                args.nats.nats_password = Some(password);
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
        let mut services = args.services.clone().under(&args.data_dir);
        let vision = if args.scene_captioner {
            let server = VisionServer::start(ServerConfig {
                model: "atelier-scene-describer".into(),
                ..Default::default()
            })
            .await?;
            services.captioner.openai.base_url = server.base_url();
            services.captioner.openai.model = "atelier-scene-describer".into();
            Some(server)
        } else {
            None
        };
        let launch = Launch {
            rt: rt.clone(),
            worker: args.worker.clone(),
            shutdown: shutdown.clone(),
        };
        let mut tasks = JoinSet::new();
        spawn_services(&mut tasks, services.clone(), &launch);

        let app = atelier_gateway::api::AppState::new(
            rt.bus.clone(),
            rt.store.clone(),
            rt.metrics.clone(),
            args.gateway.limits(),
            shutdown.clone(),
        )
        .await?
        .with_models(Some(services.generation.model.models.clone()));
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
            drain: std::time::Duration::from_secs_f64(args.drain_secs.clamp(0.0, 3600.0)),
            data_dir: args.data_dir.clone(),
        })
    }

    /// Where external publishers find the embedded server's credentials ("" for an external one).
    pub fn nats_credentials_hint(&self) -> String {
        match &self.nats {
            Some(_) => format!(
                ", user {} with the password in {}",
                crate::embedded_nats::USER,
                self.data_dir.join("nats-password").display()
            ),
            None => String::new(),
        }
    }

    /// Waits for every part to finish (after the shutdown token fired, or after one part failed,
    /// which stops the others), at most `--drain-secs` after shutdown, then stops nats-server.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut first_error = None;
        let shutdown = self.shutdown.clone();
        let drain = self.drain;
        let deadline = async move {
            shutdown.cancelled().await;
            tokio::time::sleep(drain).await;
        };
        tokio::pin!(deadline);
        loop {
            let res = tokio::select! {
                r = self.tasks.join_next() => match r { Some(r) => r, None => break },
                _ = &mut deadline => {
                    tracing::warn!(
                        parts = self.tasks.len(), drain = ?drain,
                        "drain deadline passed: stopping what is still running (its jobs run again at the next start)"
                    );
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    break;
                }
            };
            if let Err(e) = res.map_err(anyhow::Error::from).and_then(|r| r) {
                tracing::error!(error = %e, "embedded part failed; stopping the others");
                self.shutdown.cancel();
                first_error.get_or_insert(e);
            }
        }
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.bus.client.flush()).await;
        if let Some(mut nats) = self.nats.take() {
            tokio::task::block_in_place(|| nats.stop(std::time::Duration::from_secs(5)));
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Every service on `launch`, through the same `serve` functions their binaries call.
fn spawn_services(tasks: &mut JoinSet<anyhow::Result<()>>, c: ServiceConfigs, launch: &Launch) {
    let l = || launch.clone();
    tasks.spawn(atelier_checksum::serve(l()));
    tasks.spawn(atelier_ingest::serve(c.ingest, l()));
    tasks.spawn(atelier_augmenter::serve(c.captioner.openai.clone(), l()));
    tasks.spawn(atelier_captioner::serve(c.captioner, l()));
    let models = c.quality_filter.models.clone();
    tasks.spawn(atelier_retrieval_indexer::serve(models, l()));
    tasks.spawn(atelier_quality_filter::serve(c.quality_filter, l()));
    let model = c.generation.model.clone();
    tasks.spawn(atelier_trainer::serve(c.trainer, model, l()));
    tasks.spawn(atelier_sampler::serve(c.generation.clone(), l()));
    tasks.spawn(atelier_inpainter::serve(c.generation, l()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(clap::Parser)]
    struct Up {
        #[command(flatten)]
        up: UpArgs,
    }

    /// `atelier up` takes every service's own settings, the flags their binaries take, and hands
    /// them to the services unchanged (the embedded defaults fill only what was not given).
    #[test]
    fn up_takes_every_services_settings() {
        let tmp = tempfile::tempdir().unwrap();
        let d = |name: &str| tmp.path().join(name).display().to_string();
        let argv = [
            "up",
            "--data-dir",
            &d("data"),
            "--max-image-pixels",
            "100",
            "--blip-models",
            &d("blip"),
            "--openai-model",
            "my-vlm",
            "--meteor-jar",
            &d("meteor.jar"),
            "--nsfw-model",
            &d("320n.onnx"),
            "--no-nsfw",
            "--clip-model",
            &d("clip"),
            "--minilm",
            &d("minilm"),
            "--models",
            &d("registry"),
            "--model-cache",
            "5",
            "--batch-window-ms",
            "7",
            "--sampler-timeout-s",
            "42",
        ];
        let up = Up::try_parse_from(argv).unwrap().up;
        let c = up.services.clone().under(&up.data_dir);
        assert_eq!(c.ingest.max_image_pixels, 100);
        assert_eq!(c.captioner.blip_models, Some(tmp.path().join("blip")));
        assert_eq!(c.captioner.openai.model, "my-vlm");
        let qf = &c.quality_filter;
        assert_eq!(qf.meteor_jar, Some(tmp.path().join("meteor.jar")));
        assert!(qf.no_nsfw);
        assert_eq!(
            qf.filter().nsfw_model,
            None,
            "--no-nsfw turns the detector off"
        );
        assert_eq!(qf.models.clip(), Some(tmp.path().join("clip")));
        assert_eq!(qf.models.minilm(), Some(tmp.path().join("minilm")));
        assert_eq!(c.generation.model.models, tmp.path().join("registry"));
        assert_eq!(c.generation.model_cache, 5);
        assert_eq!(c.generation.batch_window_ms, 7);
        assert_eq!(c.trainer.sampler_timeout_s, 42);
    }

    #[test]
    fn embedded_defaults_live_under_the_data_dir() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("models/blip")).unwrap();
        atelier_embed::clip::make_tiny(&tmp.path().join("models/clip"), 1).unwrap();
        let c = ServiceConfigs::default().under(tmp.path());
        assert_eq!(c.generation.model.models, tmp.path().join("models"));
        assert_eq!(
            c.captioner.blip_models,
            Some(tmp.path().join("models/blip"))
        );
        if std::env::var_os("ATELIER_CLIP_MODEL").is_none() {
            assert_eq!(
                c.quality_filter.models.clip(),
                Some(tmp.path().join("models/clip"))
            );
        }
    }
}
