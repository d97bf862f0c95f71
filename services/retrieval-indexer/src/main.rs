//! `atelier-retrieval-indexer`: index and curate jobs, and search queries, as one process.

use clap::Parser;

#[derive(Parser)]
#[command(
    name = "atelier-retrieval-indexer",
    version,
    about = "atelier retrieval-indexer service (embeddings, HNSW indexes, search, curation)"
)]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
    /// CLIP for the clip_image and clip_text spaces, MiniLM for the caption space.
    #[command(flatten)]
    models: atelier_embed::ModelDirs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let models = args.models;
    atelier_kit::service::run_main("retrieval-indexer", args.kit, |launch| {
        atelier_retrieval_indexer::serve(models, launch)
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
