//! `atelier-ingest`: records images announced on `atelier.v1.images.ingested`.

use clap::Parser;

#[derive(Parser)]
#[command(name = "atelier-ingest", version, about = "atelier ingest service")]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let worker = args.kit.worker.clone();
    atelier_kit::service::run_process("ingest", args.kit, move |rt, shutdown| {
        atelier_ingest::Ingest::run(rt, worker, shutdown)
    })
    .await
}
