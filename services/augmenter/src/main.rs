//! `atelier-augmenter`: the augmenter service as its own process (one replica of many).

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "atelier-augmenter",
    version,
    about = "atelier augmenter service (seeded image transforms, caption paraphrases, hard negatives)"
)]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
    /// The OpenAI-compatible endpoint for `openai` paraphrases (the captioner's settings).
    #[command(flatten)]
    openai: atelier_openai::OpenAiArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let openai = args.openai;
    atelier_kit::service::run_main("augmenter", args.kit, |launch| {
        atelier_augmenter::serve(openai, launch)
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
