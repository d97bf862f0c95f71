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
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    atelier_kit::service::run_service(atelier_quality_filter::QualityFilter, args.kit).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Args as clap::CommandFactory>::command().debug_assert();
    }
}
