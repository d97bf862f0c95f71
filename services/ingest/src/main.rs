//! `atelier-ingest`: records images announced on `atelier.v1.images.ingested`.

use clap::Parser;

#[derive(Parser)]
#[command(name = "atelier-ingest", version, about = "atelier ingest service")]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
    #[command(flatten)]
    config: atelier_ingest::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config;
    atelier_kit::service::run_main("ingest", args.kit, |launch| {
        atelier_ingest::serve(config, launch)
    })
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Args as clap::CommandFactory>::command().debug_assert();
    }
}
