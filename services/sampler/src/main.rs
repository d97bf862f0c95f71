//! `atelier-sampler`: the txt2img service as its own process (one replica of many).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "atelier-sampler",
    version,
    about = "atelier sampler service (txt2img)"
)]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
    #[command(flatten)]
    config: atelier_sampler::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    atelier_kit::service::run_service(atelier_sampler::build(&args.config)?, args.kit).await
}
