//! `atelier-trainer`: the training service as its own process (one replica per GPU).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "atelier-trainer",
    version,
    about = "atelier trainer service (LoRA, DreamBooth)"
)]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
    #[command(flatten)]
    model: atelier_registry::ModelArgs,
    #[command(flatten)]
    config: atelier_trainer::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let (config, model) = (args.config, args.model);
    atelier_kit::service::run_main("trainer", args.kit, |launch| {
        atelier_trainer::serve(config, model, launch)
    })
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
