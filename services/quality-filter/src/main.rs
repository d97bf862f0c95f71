//! `atelier-quality-filter`: the quality-filter service as its own process.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "atelier-quality-filter",
    version,
    about = "atelier quality-filter service (checks, policy, dataset versions)"
)]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
    #[command(flatten)]
    config: atelier_quality_filter::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = args.config;
    atelier_kit::service::run_main("quality-filter", args.kit, |launch| {
        atelier_quality_filter::serve(config, launch)
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
