//! The quality filter's settings and its start.

use crate::QualityFilter;

/// The quality filter's settings (flags and `ATELIER_*` variables; docs/configuration.md).
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "quality_filter")]
pub struct Config {
    /// METEOR 1.5's jar for eval_captions jobs (default: ATELIER_METEOR_JAR, else pycocoevalcap's
    /// in .tools/).
    #[arg(long, env = "ATELIER_METEOR_JAR")]
    pub meteor_jar: Option<std::path::PathBuf>,
    /// NudeNet's 320n.onnx for the `nsfw` signal (default: ATELIER_NSFW_MODEL, else nudenet's in
    /// .tools/); ONNX Runtime's library comes from ORT_DYLIB_PATH or the onnxruntime wheel in .tools/.
    #[arg(long, env = "ATELIER_NSFW_MODEL")]
    pub nsfw_model: Option<std::path::PathBuf>,
    /// Do not run the NSFW detector.
    #[arg(long, env = "ATELIER_NO_NSFW")]
    pub no_nsfw: bool,
    /// CLIP (the `clip_score` signal; none without it) and MiniLM (eval_captions' SemSim).
    #[command(flatten)]
    pub models: atelier_embed::ModelDirs,
}

impl Config {
    /// The handler: what is configured, else what `scripts/bootstrap` installed.
    pub fn filter(&self) -> QualityFilter {
        let mut handler = QualityFilter::discover();
        if self.meteor_jar.is_some() {
            handler.meteor_jar = self.meteor_jar.clone();
        }
        handler.minilm = self.models.minilm();
        if self.nsfw_model.is_some() {
            handler.nsfw_model = self.nsfw_model.clone();
        }
        if self.no_nsfw {
            handler.nsfw_model = None;
        }
        handler.clip_model = self.models.clip();
        handler
    }
}

/// Runs the quality filter: the `atelier-quality-filter` binary and `atelier up` both call this.
pub async fn serve(config: Config, launch: atelier_kit::service::Launch) -> anyhow::Result<()> {
    launch.run(config.filter()).await
}
