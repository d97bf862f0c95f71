//! `atelier-checksum`: the checksum service as its own process (one replica of many).

use clap::Parser;

#[derive(Parser)]
#[command(name = "atelier-checksum", version, about = "atelier checksum service")]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    atelier_kit::service::run_main("checksum", args.kit, atelier_checksum::serve).await
}
