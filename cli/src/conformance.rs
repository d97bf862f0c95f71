//! `atelier conformance ...`: replay reference data from other tools and report `N passed, N failed`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

#[derive(clap::Subcommand)]
pub enum Conformance {
    /// A pycocoevalcap file (tests/conformance/captions/pycocoevalcap-1.2.json format).
    Captions {
        #[arg(long)]
        cases: PathBuf,
        /// METEOR 1.5's jar (default: ATELIER_METEOR_JAR, else pycocoevalcap's in .tools/).
        #[arg(long)]
        meteor_jar: Option<PathBuf>,
    },
    /// AUTOMATIC1111 prompt-parser outputs (tests/conformance/prompts format).
    Prompts {
        #[arg(long)]
        cases: PathBuf,
    },
    /// Model components against diffusers and transformers: every case folder in DIR
    /// (tests/conformance/models format): the CLIP tokenizer, text encoders, UNets, VAE decode and
    /// encode, LoRAs, whole txt2img runs from given latents and from seeds.
    Models {
        #[arg(long)]
        cases: PathBuf,
    },
    /// What seeds draw: torch's CPU generator and A1111's "NV" source, draw by draw, bit for bit
    /// (tests/conformance/noise/noise.json format; its tensors file beside it).
    Noise {
        #[arg(long)]
        file: PathBuf,
    },
    /// Diffusers scheduler traces: every `*.json` in DIR (tests/conformance/schedulers format).
    Schedulers {
        #[arg(long)]
        traces: PathBuf,
    },
}

/// Runs one replay; `Ok(false)` when any case failed (the command then exits 1).
pub fn run(cmd: Conformance) -> anyhow::Result<bool> {
    match cmd {
        Conformance::Captions { cases, meteor_jar } => captions(&cases, meteor_jar),
        Conformance::Prompts { cases } => {
            use atelier_diffusion::conformance::prompts;
            let file = prompts::parse_file(&read(&cases)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", cases.display()))?;
            let report = prompts::replay(&file);
            for f in &report.failures {
                println!("FAIL {f}");
            }
            println!("{}", report.summary());
            Ok(report.failed == 0)
        }
        Conformance::Models { cases } => {
            let lines = atelier_diffusion::conformance::models::replay_dir(&cases)
                .map_err(anyhow::Error::msg)?;
            for l in &lines {
                println!("{l}");
            }
            let passed = lines.iter().filter(|l| l.passed).count();
            let skipped = lines.iter().filter(|l| l.skipped()).count();
            let failed = lines.len() - passed - skipped;
            match skipped {
                0 => println!("{passed} passed, {failed} failed"),
                n => println!("{passed} passed, {failed} failed ({n} skipped)"),
            }
            Ok(failed == 0)
        }
        Conformance::Noise { file } => {
            let lines = atelier_diffusion::conformance::noise::replay_file(&file)
                .map_err(anyhow::Error::msg)?;
            for l in &lines {
                println!("{l}");
            }
            let passed = lines.iter().filter(|l| l.passed()).count();
            println!("{passed} passed, {} failed", lines.len() - passed);
            Ok(passed == lines.len())
        }
        Conformance::Schedulers { traces } => {
            let report = atelier_diffusion::conformance::schedulers::replay_dir(&traces)
                .map_err(anyhow::Error::msg)?;
            for f in &report.failures {
                println!("FAIL {f}");
            }
            println!("{}", report.summary());
            Ok(report.failed == 0)
        }
    }
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

fn captions(cases: &Path, meteor_jar: Option<PathBuf>) -> anyhow::Result<bool> {
    use atelier_caption_eval::{conformance, meteor};
    let file = conformance::parse(&read(cases)?).with_context(|| {
        format!(
            "{} is not a pycocoevalcap conformance file",
            cases.display()
        )
    })?;
    let mut meteor = match meteor_jar.or_else(meteor::find_jar) {
        Some(jar) => Some(meteor::Meteor::start(&jar)?),
        None => None,
    };
    let report = conformance::replay_with(&file, meteor.as_mut());
    for f in &report.failures {
        println!("FAIL {f}");
    }
    if report.skipped > 0 {
        eprintln!(
            "({} METEOR values skipped: no meteor-1.5.jar; run scripts/bootstrap or pass --meteor-jar)",
            report.skipped
        );
    }
    println!("{} passed, {} failed", report.passed, report.failed);
    Ok(report.failed == 0)
}
