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
    trainer: atelier_trainer::TrainerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let trainer = args.trainer.trainer()?;
    atelier_kit::service::run_service(trainer, args.kit).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
