//! `atelier export`: a dataset version exported through the gateway's HTTP API into a local
//! folder by [`atelier_export`] — streamed shard by shard, resumable, with a Hub dataset card.

use std::path::Path;

use anyhow::Context as _;
use atelier_client::Client;
use atelier_contracts::dataset::{DatasetManifest, DatasetRow, Tier};

pub use atelier_export::Report as ExportReport;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// Hugging Face image folders: `<split>/<shard>/metadata.jsonl` + images
    /// (`load_dataset("imagefolder")`).
    Jsonl,
    /// WebDataset tar shards as img2dataset writes them: `<split>/00000.tar` with key.jpg or
    /// key.png (one for every sample), key.txt, key.json.
    Webdataset,
    /// LLaVA / ShareGPT4V conversation JSON per split and shard, images under `images/`.
    Llava,
    /// Parquet shards as the Hugging Face Hub lays them out (`data/<split>-00000-of-0000N.parquet`),
    /// images embedded as `{bytes, path}` and marked as the `Image` feature.
    Parquet,
}

impl From<ExportFormat> for atelier_contracts::dataset::ExportFormat {
    fn from(f: ExportFormat) -> Self {
        use atelier_contracts::dataset::ExportFormat as F;
        match f {
            ExportFormat::Jsonl => F::Jsonl,
            ExportFormat::Webdataset => F::Webdataset,
            ExportFormat::Llava => F::Llava,
            ExportFormat::Parquet => F::Parquet,
        }
    }
}

/// Images fetched from the gateway.
struct GatewayImages<'a>(&'a Client);

impl atelier_export::Images for GatewayImages<'_> {
    async fn get(&self, key: &str) -> anyhow::Result<bytes::Bytes> {
        self.0.download(key).await
    }
}

/// A version's rows (for callers that want them in memory; exports stream them instead).
pub async fn rows(client: &Client, manifest: &DatasetManifest) -> anyhow::Result<Vec<DatasetRow>> {
    let data = client.download(&manifest.data.key).await?;
    let text = std::str::from_utf8(&data).context("the data file is not UTF-8")?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a dataset row", manifest.data.key, i + 1))
        })
        .collect()
}

/// Exports `manifest`'s version to the folder `out` (`resume`: continue an export interrupted
/// there; complete shards are kept and their images not fetched again).
pub async fn export(
    client: &Client,
    manifest: &DatasetManifest,
    format: ExportFormat,
    tiers: &[Tier],
    out: &Path,
    shard_size: usize,
    resume: bool,
) -> anyhow::Result<ExportReport> {
    let sink = atelier_export::DirSink::new(out, resume)?;
    // The rows stream from a copy of the data file on disk, not from memory.
    let staging = tempfile::tempdir().context("creating a temporary folder")?;
    let data = staging.path().join("data.jsonl");
    client
        .download_to_file(&manifest.data.key, &data)
        .await
        .context("downloading the version's data file")?;
    let opts = atelier_export::Options {
        format: format.into(),
        tiers: tiers.to_vec(),
        shard_size,
    };
    atelier_export::export(manifest, &data, &GatewayImages(client), &sink, &opts).await
}
