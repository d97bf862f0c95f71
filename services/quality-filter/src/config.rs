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
    #[arg(long, env = "ATELIER_NO_NSFW", value_parser = clap::builder::BoolishValueParser::new())]
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
            handler.nsfw_off = true;
        }
        handler.clip_model = self.models.clip();
        handler
    }
}

impl Config {
    /// A model that is configured but missing stops the start, saying which.
    pub fn check(&self) -> anyhow::Result<()> {
        self.models.check().map_err(anyhow::Error::msg)?;
        let files = [
            ("--meteor-jar (ATELIER_METEOR_JAR)", self.meteor_jar.clone()),
            ("--nsfw-model (ATELIER_NSFW_MODEL)", self.nsfw_model.clone()),
            (
                "ORT_DYLIB_PATH",
                std::env::var_os("ORT_DYLIB_PATH").map(Into::into),
            ),
        ];
        for (what, path) in files {
            if let Some(p) = path.filter(|p| !p.is_file()) {
                anyhow::bail!(
                    "{what} is {} but there is no such file: fix the path, or unset it",
                    p.display()
                );
            }
        }
        Ok(())
    }
}

/// Runs the quality filter: the `atelier-quality-filter` binary and `atelier up` both call this.
pub async fn serve(config: Config, launch: atelier_kit::service::Launch) -> anyhow::Result<()> {
    config.check()?;
    let filter = config.filter();
    filter.log_models();
    launch.run(filter).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_configured_model_that_is_missing_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope.onnx");
        let c = Config {
            nsfw_model: Some(missing.clone()),
            ..Default::default()
        };
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.contains("ATELIER_NSFW_MODEL") && e.contains("nope.onnx"),
            "{e}"
        );
        let c = Config {
            models: atelier_embed::ModelDirs {
                clip_model: Some(tmp.path().to_owned()),
                minilm: None,
            },
            ..Default::default()
        };
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.contains("ATELIER_CLIP_MODEL") && e.contains("config.json"),
            "{e}"
        );
        assert!(Config::default().check().is_ok());
    }

    #[test]
    fn no_nsfw_reads_the_usual_ways_of_saying_yes() {
        use clap::Parser as _;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            qf: Config,
        }
        // From the environment, as deployments set it (this test is the only one that reads it).
        for (v, off) in [
            ("1", true),
            ("true", true),
            ("yes", true),
            ("0", false),
            ("false", false),
        ] {
            std::env::set_var("ATELIER_NO_NSFW", v);
            let cli = Cli::try_parse_from(["qf"]).map(|c| c.qf.no_nsfw);
            assert_eq!(cli.ok(), Some(off), "ATELIER_NO_NSFW={v}");
        }
        std::env::remove_var("ATELIER_NO_NSFW");
        assert!(Cli::try_parse_from(["qf", "--no-nsfw"]).is_ok_and(|c| c.qf.no_nsfw));
        assert!(Cli::try_parse_from(["qf"]).is_ok_and(|c| !c.qf.no_nsfw));
    }

    #[test]
    fn a_policy_using_nsfw_needs_the_detector_or_its_explicit_absence() {
        use atelier_contracts::dataset::{QualityPolicy, Severity};
        let missing = crate::QualityFilter::default();
        let policy = QualityPolicy::default();
        let e = missing.require_nsfw(&policy).unwrap_err();
        assert!(format!("{e:?}").contains("nsfw_unavailable"), "{e:?}");
        let mut off = crate::QualityFilter::default();
        off.nsfw_off = true;
        assert!(off.require_nsfw(&policy).is_ok());
        let mut ignoring = QualityPolicy::default();
        ignoring.severity.insert("nsfw".into(), Severity::Ignore);
        assert!(missing.require_nsfw(&ignoring).is_ok());
    }
}
