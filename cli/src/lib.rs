//! `atelier`: the command line, one module per command group.
//!
//! - `atelier up` ([`embedded`]): gateway and every service in one process
//! - `atelier demo` ([`demo`]): the main job, end to end, on a fresh embedded atelier
//! - `atelier gateway | check-store | dead-letters | keygen` ([`ops`]): running a cluster
//! - `atelier upload | submit | job | cancel` ([`jobs`]): jobs over the HTTP API
//! - `atelier ingest | caption | filter | datasets | export` ([`datasets`]): the dataset side
//! - `atelier index | search | curate` ([`search`]), `augment` ([`augment`]), `train` ([`train`])
//! - `atelier models | generate | prompt` ([`models`]): local models, no services
//! - `atelier conformance | eval-captions` ([`conformance`], [`eval`]): reference replays, metrics

pub mod augment;
pub mod bench;
pub mod conformance;
pub mod datasets;
pub mod demo;
pub mod embedded;
pub mod embedded_nats;
pub mod eval;
pub mod export;
pub mod generate;
pub mod ingest;
pub mod jobs;
pub mod models;
pub mod ops;
pub mod remote;
pub mod search;
pub mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "atelier",
    version,
    about = "atelier: captioned datasets and diffusion models, as services over NATS JetStream"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run gateway and every service in this process (nats-server started as a child).
    Up(Box<embedded::UpArgs>),
    /// Run the demo pipeline end to end on a fresh embedded atelier.
    Demo(demo::DemoArgs),
    #[command(flatten)]
    Ops(ops::OpsCmd),
    #[command(flatten)]
    Jobs(jobs::JobsCmd),
    #[command(flatten)]
    Datasets(datasets::DatasetCmd),
    #[command(flatten)]
    Search(search::SearchCmd),
    /// Augment a dataset version: seeded image variants, caption paraphrases, hard negatives.
    Augment {
        #[command(flatten)]
        augment: augment::AugmentArgs,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Train a LoRA or DreamBooth (the trainer service); follows the job and prints its output.
    #[command(subcommand)]
    Train(train::TrainCmd),
    #[command(flatten)]
    Local(models::LocalCmd),
    /// Replay reference data from other tools and report `N passed, N failed`.
    #[command(subcommand)]
    Conformance(conformance::Conformance),
    /// Score candidate captions against references (pycocoevalcap's metrics and names).
    EvalCaptions(eval::EvalArgs),
    /// Benchmarks that print their figures with the command, date and machine.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
}

/// Runs one command; an error is the command's message.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up(args) => up(*args).await,
        Command::Demo(args) => demo::run(args).await,
        Command::Ops(cmd) => ops::run(cmd).await,
        Command::Jobs(cmd) => jobs::run(cmd).await,
        Command::Datasets(cmd) => datasets::run(cmd).await,
        Command::Search(cmd) => search::run(cmd).await,
        Command::Augment { augment, remote } => {
            let spec = augment::spec(&augment)?;
            let out = augment::run(&remote.client()?, &spec).await?;
            remote::print_json(&out)
        }
        Command::Train(cmd) => train::command(cmd).await,
        Command::Local(cmd) => models::run(cmd).await,
        Command::Conformance(cmd) => {
            if !conformance::run(cmd)? {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::EvalCaptions(args) => eval::run(args).await,
        Command::Bench(cmd) => tokio::task::spawn_blocking(move || bench::run(cmd)).await?,
    }
}

async fn up(args: embedded::UpArgs) -> anyhow::Result<()> {
    atelier_kit::telemetry::init_tracing(&args.telemetry);
    let shutdown = atelier_kit::shutdown::on_signals();
    let embedded = embedded::Embedded::start(args, shutdown).await?;
    eprintln!(
        "atelier is up: http://{}  (nats {}{}; Ctrl-C stops)",
        embedded.addr,
        embedded.nats_url,
        embedded.nats_credentials_hint()
    );
    embedded.wait().await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
