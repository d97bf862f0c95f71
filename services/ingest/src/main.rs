//! `atelier-ingest`: records images announced on `atelier.v1.images.ingested`.

use clap::Parser;

#[derive(Parser)]
#[command(name = "atelier-ingest", version, about = "atelier ingest service")]
struct Args {
    #[command(flatten)]
    kit: atelier_kit::config::ServiceArgs,
    /// Decompression-bomb guard: images with more pixels are recorded, flagged, not decoded.
    #[arg(long = "max-image-pixels", env = "ATELIER_MAX_IMAGE_PIXELS", default_value_t = atelier_ingest::analyze::DEFAULT_MAX_PIXELS)]
    max_image_pixels: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let worker = args.kit.worker.clone();
    let max_pixels = args.max_image_pixels;
    atelier_kit::service::run_process("ingest", args.kit, move |rt, shutdown| {
        atelier_ingest::Ingest::run(rt, worker, max_pixels, shutdown)
    })
    .await
}
