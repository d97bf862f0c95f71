//! The `atelier` binary; the commands live in the library (`src/lib.rs`).

use clap::Parser as _;

#[tokio::main]
async fn main() {
    if let Err(e) = atelier_cli::run(atelier_cli::Cli::parse()).await {
        eprintln!("atelier: {e:#}");
        std::process::exit(1);
    }
}
