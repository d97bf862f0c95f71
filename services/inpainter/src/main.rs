//! `atelier-inpainter`: the img2img/inpaint service as its own process (one replica of many).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "atelier-inpainter",
    version,
    about = "atelier inpainter service (img2img, inpaint)"
)]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
    #[command(flatten)]
    config: atelier_inpainter::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    atelier_kit::service::run_service(atelier_inpainter::build(&args.config)?, args.kit).await
}
