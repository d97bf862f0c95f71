//! `atelier-captioner`: the captioner service as its own process (one replica of many).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "atelier-captioner",
    version,
    about = "atelier captioner service (OpenAI-compatible vision endpoints, local BLIP)"
)]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
    #[command(flatten)]
    openai: atelier_captioner::OpenAiArgs,
    /// A folder of BLIP model folders (Hugging Face layout) for the `blip` backend.
    #[arg(long, env = "ATELIER_BLIP_MODELS")]
    blip_models: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let captioner =
        atelier_captioner::Captioner::new(args.openai)?.with_blip_models(args.blip_models);
    atelier_kit::service::run_service(captioner, args.kit).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Args as clap::CommandFactory>::command().debug_assert();
    }
}
