//! `atelier models | generate | prompt`: local models and generation without services.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use atelier_contracts::samplers::SamplerKind;
use atelier_generation::detect;
use atelier_kit::config::StoreArgs;
use atelier_registry::{Entry, EntryKind, Registry};

#[derive(clap::Subcommand)]
pub enum ModelsCmd {
    /// Write tiny random-weight Stable Diffusion models (for tests and trying atelier out).
    MakeTiny {
        /// Folder to write (a diffusers folder; with --single-file, the .safetensors path).
        out: PathBuf,
        /// SDXL-shaped (two text encoders, added conditioning) instead of SD 1.x-shaped.
        #[arg(long)]
        sdxl: bool,
        /// A 9-channel inpainting UNet.
        #[arg(long)]
        inpainting: bool,
        /// Write one single-file checkpoint with the original LDM key names instead.
        #[arg(long)]
        single_file: bool,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Write a tiny random-weight BLIP captioning model (Hugging Face layout) for the
    /// captioner's `blip` backend: put it under the captioner's --blip-models folder.
    MakeTinyBlip {
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// List the registry's checkpoints, LoRAs and embeddings (the local folder, then the object
    /// store's `models/`, `loras/`, `embeddings/`), one JSON line each, with what each is (from
    /// headers and configs; no weights are read): family (sd1, sd2, sdxl), inpainting, prediction
    /// type; a LoRA's format, rank and base; an embedding's vectors and base.
    List {
        #[arg(long, env = "ATELIER_MODELS", default_value = "models")]
        models: PathBuf,
        /// Only the local folder.
        #[arg(long)]
        local: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(clap::Subcommand)]
pub enum PromptCmd {
    /// Print A1111's reading of a prompt: {"attention": [[text, weight], ...], "schedule": [[step, text], ...]}.
    Parse {
        prompt: String,
        /// Sampling steps the editing schedule is computed for.
        #[arg(long, default_value_t = 20)]
        steps: usize,
    },
}

#[derive(clap::Subcommand)]
pub enum LocalCmd {
    /// Model tools: tiny test models, the registry.
    #[command(subcommand)]
    Models(ModelsCmd),
    /// Generate images here, without services (txt2img; img2img with --init; inpaint with --mask).
    Generate(Box<crate::generate::GenerateArgs>),
    /// Prompt tools (A1111 syntax).
    #[command(subcommand)]
    Prompt(PromptCmd),
}

pub async fn run(cmd: LocalCmd) -> anyhow::Result<()> {
    match cmd {
        LocalCmd::Models(ModelsCmd::MakeTiny {
            out,
            sdxl,
            inpainting,
            single_file,
            seed,
        }) => make_tiny(&out, sdxl, inpainting, single_file, seed),
        LocalCmd::Models(ModelsCmd::MakeTinyBlip { out, seed }) => {
            atelier_captioner::blip::make_tiny(&out, seed).map_err(anyhow::Error::msg)?;
            println!("wrote a tiny BLIP model to {}", out.display());
            Ok(())
        }
        LocalCmd::Models(ModelsCmd::List {
            models,
            local,
            store,
        }) => list(&models, (!local).then_some(&store)).await,
        LocalCmd::Generate(g) => crate::generate::run(*g),
        LocalCmd::Prompt(PromptCmd::Parse { prompt, steps }) => {
            if steps == 0 || steps > 10_000 {
                anyhow::bail!("--steps must be between 1 and 10000 (got {steps})");
            }
            let parsed = atelier_diffusion::prompt::parse(&prompt, steps as i64);
            println!("{}", serde_json::to_string(&parsed)?);
            Ok(())
        }
    }
}

fn make_tiny(
    out: &Path,
    sdxl: bool,
    inpainting: bool,
    single_file: bool,
    seed: u64,
) -> anyhow::Result<()> {
    use atelier_diffusion::pipeline::{make_tiny_with, write_single_file, Family};
    let family = if sdxl { Family::Sdxl } else { Family::Sd1 };
    if single_file {
        if out.extension().is_none_or(|e| e != "safetensors") {
            anyhow::bail!(
                "with --single-file, OUT must end in .safetensors (got {})",
                out.display()
            );
        }
        let tmp = tempfile::tempdir()?;
        make_tiny_with(tmp.path(), family, seed, inpainting)?;
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        write_single_file(tmp.path(), out)?;
    } else {
        make_tiny_with(out, family, seed, inpainting)?;
    }
    println!("wrote a tiny {family:?} model to {}", out.display());
    Ok(())
}

/// `atelier models list`: local entries with what they are, then the store's.
async fn list(models: &Path, store: Option<&StoreArgs>) -> anyhow::Result<()> {
    if !models.is_dir() {
        eprintln!(
            "atelier: no model folder at {} (pass --models DIR or set ATELIER_MODELS; `atelier models make-tiny DIR/tiny` writes one)",
            models.display()
        );
    }
    let local = Registry::new(models).list();
    for e in &local {
        let line = serde_json::json!({
            "name": e.name, "kind": e.kind, "path": e.path, "source": "local",
        });
        println!("{}", with_detection(line, detect::local(e))?);
    }
    let Some(args) = store else {
        return Ok(());
    };
    let store = atelier_kit::Store::open(args)?;
    match atelier_registry::store::list(&store).await {
        Ok(entries) => {
            for e in entries {
                let line = serde_json::json!({
                    "name": e.name, "kind": e.kind, "path": e.path, "source": "store",
                    "shadowed_by_local": shadowed(&local, &e),
                });
                let found = detect::in_store(&store, &e).await;
                println!("{}", with_detection(line, found)?);
            }
        }
        Err(e) => eprintln!(
            "atelier: the object store ({}) could not be listed: {e}; pass --local to list the folder only",
            args.store
        ),
    }
    Ok(())
}

/// A local entry of the same name and kind (any checkpoint kind for a checkpoint) is the one
/// jobs use.
fn shadowed(local: &[Entry], e: &Entry) -> bool {
    let same = |a: EntryKind, b: EntryKind| (a.is_checkpoint() && b.is_checkpoint()) || a == b;
    local
        .iter()
        .any(|l| l.name == e.name && same(l.kind, e.kind))
}

fn with_detection(
    mut line: serde_json::Value,
    found: Result<detect::Detected, String>,
) -> anyhow::Result<serde_json::Value> {
    match found {
        Ok(d) => line["detected"] = serde_json::to_value(d)?,
        Err(why) => line["error"] = why.into(),
    }
    Ok(line)
}

/// Reads a sampler by our name or A1111's.
pub fn sampler(name: &str) -> anyhow::Result<SamplerKind> {
    SamplerKind::parse(name).with_context(|| {
        format!(
            "unknown sampler {name:?}; known: {}",
            SamplerKind::ALL.map(|k| k.name()).join(", ")
        )
    })
}
