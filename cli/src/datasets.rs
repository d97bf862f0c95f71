//! `atelier ingest | caption | filter | datasets | export`: the dataset side, over the gateway.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::remote::{print_json, run_job, Remote};

#[derive(clap::Subcommand)]
pub enum DatasetCmd {
    /// Upload every image under DIR into a dataset and wait until each is recorded.
    Ingest {
        dir: PathBuf,
        #[arg(long)]
        dataset: String,
        /// License recorded for every image (e.g. CC-BY-4.0).
        #[arg(long)]
        license: Option<String>,
        /// Seconds to wait for the ingest service to record them.
        #[arg(long, default_value_t = 300)]
        wait_secs: u64,
        #[command(flatten)]
        remote: Remote,
    },
    /// Caption a dataset's images (the captioner service; skips images already captioned by the
    /// same model and prompt).
    Caption {
        #[arg(long)]
        dataset: String,
        /// `openai` (an OpenAI-compatible vision endpoint) or `blip` (local BLIP on the worker).
        #[arg(long, default_value = "openai", value_parser = ["openai", "blip"])]
        backend: String,
        /// openai: the endpoint's model (the worker's default when absent); blip: a model
        /// folder in the worker's --blip-models directory (required).
        #[arg(long)]
        model: Option<String>,
        /// openai: the prompt (default ShareGPT4V's); blip: text the caption continues.
        #[arg(long)]
        prompt: Option<String>,
        /// Default 300 for openai, 40 for blip.
        #[arg(long)]
        max_tokens: Option<u32>,
        #[arg(long, default_value_t = 0.2)]
        temperature: f32,
        #[arg(long, default_value_t = 768)]
        image_max_side: u32,
        /// blip: images through the vision encoder at once.
        #[arg(long, default_value_t = 8)]
        batch_size: u32,
        /// Images per shard job: a dataset with more is captioned by a run of shards that every
        /// captioner replica takes (default 1000).
        #[arg(long)]
        shard_size: Option<u32>,
        /// openai: through the endpoint's Batch API (half the price, results within 24 hours).
        #[arg(long)]
        batch: bool,
        /// openai: stop the run once it has spent this many tokens (prompt + completion).
        #[arg(long)]
        spend_cap_tokens: Option<u64>,
        /// openai: stop the run once it has spent this many US dollars (at the captioners'
        /// ATELIER_OPENAI_PRICES).
        #[arg(long)]
        spend_cap_usd: Option<f64>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Check a dataset's images and captions under a policy and write a new dataset version.
    Filter {
        #[arg(long)]
        dataset: String,
        /// A TOML policy file (thresholds and severities; see docs/datasets.md).
        #[arg(long)]
        policy: Option<PathBuf>,
        /// Caption source id (from a caption job's output); default: each image's newest caption.
        #[arg(long)]
        caption_source: Option<String>,
        #[arg(long, default_value_t = 0.05)]
        val: f32,
        #[arg(long, default_value_t = 0.05)]
        test: f32,
        #[arg(long, default_value = "atelier")]
        split_seed: String,
        #[arg(long)]
        note: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Dataset versions: list them, or show one's manifest.
    Datasets {
        /// Show this dataset's manifest (the latest, or --version).
        dataset: Option<String>,
        #[arg(long)]
        version: Option<u32>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Export a dataset version for training.
    Export {
        #[arg(long)]
        dataset: String,
        /// Default: the latest.
        #[arg(long)]
        version: Option<u32>,
        #[arg(long, value_enum)]
        format: crate::export::ExportFormat,
        /// A new or empty folder (or, with --resume, the folder of an interrupted export).
        #[arg(long)]
        out: PathBuf,
        /// Tiers to include, comma-separated.
        #[arg(long, default_value = "gold,silver,bronze", value_delimiter = ',')]
        tiers: Vec<String>,
        /// Rows per shard (tar, Parquet file, metadata folder, LLaVA file). Memory holds about
        /// one shard's images.
        #[arg(long, default_value_t = 1000)]
        shard_size: usize,
        /// Continue an export interrupted in --out: complete shards are kept.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        remote: Remote,
    },
}

pub async fn run(cmd: DatasetCmd) -> anyhow::Result<()> {
    match cmd {
        DatasetCmd::Ingest {
            dir,
            dataset,
            license,
            wait_secs,
            remote,
        } => {
            let report = crate::ingest::ingest_dir(
                &remote.client()?,
                &dir,
                &dataset,
                license,
                std::time::Duration::from_secs(wait_secs),
                true,
            )
            .await?;
            print_json(&report)?;
            if !report.pending.is_empty() {
                anyhow::bail!(
                    "{} files not recorded within {wait_secs} s; is the ingest service running?",
                    report.pending.len()
                );
            }
            Ok(())
        }
        DatasetCmd::Caption {
            dataset,
            backend,
            model,
            prompt,
            max_tokens,
            temperature,
            image_max_side,
            batch_size,
            shard_size,
            batch,
            spend_cap_tokens,
            spend_cap_usd,
            remote,
        } => {
            let spend_cap = (spend_cap_tokens.is_some() || spend_cap_usd.is_some()).then_some(
                atelier_contracts::dataset::SpendCap {
                    tokens: spend_cap_tokens,
                    usd: spend_cap_usd,
                },
            );
            let backend = if backend == "blip" {
                let Some(model) = model else {
                    anyhow::bail!("--backend blip needs --model NAME (a model folder in the captioner's --blip-models directory)");
                };
                atelier_contracts::CaptionBackend::Blip {
                    model,
                    prompt,
                    max_tokens: max_tokens.unwrap_or(40),
                    batch_size,
                }
            } else {
                atelier_contracts::CaptionBackend::Openai {
                    model,
                    prompt,
                    max_tokens: max_tokens.unwrap_or(300),
                    temperature,
                    image_max_side,
                    batch,
                }
            };
            let spec = atelier_contracts::JobSpec::Caption(atelier_contracts::CaptionSpec {
                dataset,
                images: vec![],
                backend,
                shard_size,
                spend_cap,
                shard: None,
            });
            run_job(&remote, &spec).await
        }
        DatasetCmd::Filter {
            dataset,
            policy,
            caption_source,
            val,
            test,
            split_seed,
            note,
            remote,
        } => {
            let policy = match policy {
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    toml::from_str(&text)
                        .with_context(|| format!("{} is not a valid policy", p.display()))?
                }
                None => Default::default(),
            };
            let spec = atelier_contracts::JobSpec::Filter(atelier_contracts::FilterSpec {
                dataset,
                caption_source,
                policy,
                split: atelier_contracts::dataset::SplitSpec {
                    val,
                    test,
                    seed: split_seed,
                },
                note,
            });
            run_job(&remote, &spec).await
        }
        DatasetCmd::Datasets {
            dataset,
            version,
            remote,
        } => {
            let client = remote.client()?;
            match dataset {
                Some(d) => print_json(&client.dataset_version(&d, version).await?),
                None => {
                    for d in client.datasets().await? {
                        println!(
                        "{}\tversions {:?}\tlatest: {} rows, {} accepted, {} flagged, {} rejected",
                        d.dataset,
                        d.versions,
                        d.latest.counts.rows,
                        d.latest.counts.accepted,
                        d.latest.counts.flagged,
                        d.latest.counts.rejected
                    );
                    }
                    Ok(())
                }
            }
        }
        DatasetCmd::Export {
            dataset,
            version,
            format,
            out,
            tiers,
            shard_size,
            resume,
            remote,
        } => {
            let tiers = tiers
                .iter()
                .map(|t| {
                    serde_json::from_value::<atelier_contracts::dataset::Tier>(t.trim().into())
                        .map_err(|_| {
                            anyhow::anyhow!("--tiers: unknown tier {t:?}; use gold, silver, bronze")
                        })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let client = remote.client()?;
            let manifest = client.dataset_version(&dataset, version).await?;
            let report =
                crate::export::export(&client, &manifest, format, &tiers, &out, shard_size, resume)
                    .await?;
            print_json(&serde_json::json!({
                "dataset": report.dataset,
                "version": report.version,
                "out": out,
                "splits": report.splits,
                "files": report.files,
                "shards_written": report.shards_written,
                "shards_skipped": report.shards_skipped,
                "transcoded": report.transcoded,
                "bytes": report.bytes_written,
            }))
        }
    }
}
