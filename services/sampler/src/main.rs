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
    gen: atelier_sampler::GeneratorArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let generator = args.gen.generator(atelier_contracts::Service::Sampler)?;
    atelier_kit::service::run_service(generator, args.kit).await
}
