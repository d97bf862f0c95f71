//! `atelier-gateway`: the HTTP gateway alone, against a cluster's NATS and object store (the
//! gateway container's entry point; `atelier gateway` runs the same).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "atelier-gateway",
    version,
    about = "atelier's HTTP gateway (cluster mode)"
)]
struct Args {
    #[command(flatten)]
    gateway: atelier_gateway::Gateway,
}

#[tokio::main]
async fn main() {
    if let Err(e) = Args::parse().gateway.run().await {
        eprintln!("atelier-gateway: {e:#}");
        std::process::exit(1);
    }
}
