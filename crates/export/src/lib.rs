//! Exports of a dataset version, streamed shard by shard: memory holds one shard per split (at
//! most `shard_size` rows and their images), never the dataset. Rows are read from the version's
//! data file on disk twice — once to count each split's rows (so shard names can say `-of-N`),
//! once to write — and images are fetched when their shard is written. Each shard is complete
//! when its last file is in place, so an interrupted export resumes by skipping complete shards
//! without fetching their images. A Hub dataset card (`README.md` with `configs`) and the
//! version's manifest are written last: `load_dataset(folder)` opens every split.
//!
//! Where files go is a [`Sink`] (a local folder here, the object store in the exporter job) and
//! where images come from an [`Images`] (the gateway for the CLI, the store for the job).

mod card;
pub mod dir;
pub mod parquet;
mod rows;
mod shard;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;

use atelier_contracts::dataset::{DatasetManifest, DatasetRow, ExportFormat, Split, Tier};
use serde::Serialize;

pub use dir::DirSink;

/// Where image bytes come from, by key.
pub trait Images: Sync {
    fn get(&self, key: &str) -> impl Future<Output = anyhow::Result<bytes::Bytes>> + Send;
}

/// Where exported files go, by path relative to the export's root.
pub trait Sink: Sync {
    fn exists(&self, rel: &str) -> impl Future<Output = anyhow::Result<bool>> + Send;
    /// Writes the whole file at once (readers never see part of it).
    fn put(&self, rel: &str, bytes: Vec<u8>) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// What to export.
#[derive(Debug, Clone)]
pub struct Options {
    pub format: ExportFormat,
    /// Kept rows of these tiers (rejected rows and rows without a caption never).
    pub tiers: Vec<Tier>,
    /// Rows per shard.
    pub shard_size: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub dataset: String,
    pub version: u32,
    /// Rows per split.
    pub splits: BTreeMap<String, usize>,
    /// Files the export consists of (written now or found complete).
    pub files: usize,
    pub shards_written: usize,
    /// Shards found complete (an export resumed).
    pub shards_skipped: usize,
    /// WebDataset samples whose image was re-encoded as PNG so every sample has the same key.
    pub transcoded: usize,
    pub bytes_written: u64,
}

/// The Hugging Face name of a split's folder.
pub fn split_name(s: Split) -> &'static str {
    match s {
        Split::Train => "train",
        Split::Val => "validation",
        Split::Test => "test",
    }
}

/// The file extension of a row's image format.
pub fn ext_of(row: &DatasetRow) -> &str {
    ext_of_format(row.format.as_deref())
}

fn ext_of_format(format: Option<&str>) -> &str {
    match format {
        Some("jpeg") => "jpg",
        Some("tiff") => "tif",
        Some(f) => f,
        None => "bin",
    }
}

/// Exports the rows in `data` (the version's JSONL data file on disk) to `sink`.
pub async fn export(
    manifest: &DatasetManifest,
    data: &Path,
    images: &impl Images,
    sink: &impl Sink,
    opts: &Options,
) -> anyhow::Result<Report> {
    let keep = |r: &DatasetRow| rows::kept(r, &opts.tiers);
    let counts = rows::count(data, &keep)?;
    anyhow::ensure!(
        !counts.per_split.is_empty(),
        "version {} of `{}` has no rows to export: an export keeps the rows that were not rejected, \
         have a caption and are in the tiers asked for ({} rows, {} of them not rejected but \
         uncaptioned: caption the dataset and filter it into a new version first)",
        manifest.version,
        manifest.dataset,
        counts.total,
        counts.uncaptioned
    );
    let mtime = manifest.created_at.timestamp().max(0) as u64;
    let mut plan = shard::Plan::new(opts, &counts, mtime);
    let mut report = Report {
        dataset: manifest.dataset.clone(),
        version: manifest.version,
        splits: counts
            .per_split
            .iter()
            .map(|(s, n)| (split_name(*s).to_owned(), *n))
            .collect(),
        ..Default::default()
    };
    let mut open: BTreeMap<Split, Vec<DatasetRow>> = BTreeMap::new();
    for row in rows::read(data)? {
        let row = row?;
        if !keep(&row) {
            continue;
        }
        let split = row.split.unwrap_or(Split::Train);
        let shard = open.entry(split).or_default();
        shard.push(row);
        if shard.len() >= opts.shard_size.max(1) {
            let rows = std::mem::take(shard);
            plan.flush(split, rows, images, sink, &mut report).await?;
        }
    }
    for (split, rows) in open {
        if !rows.is_empty() {
            plan.flush(split, rows, images, sink, &mut report).await?;
        }
    }
    let card = card::render(manifest, opts, &report);
    for (rel, bytes) in [
        ("README.md".to_owned(), card.into_bytes()),
        (
            "manifest.json".to_owned(),
            serde_json::to_vec_pretty(manifest)?,
        ),
    ] {
        report.bytes_written += bytes.len() as u64;
        sink.put(&rel, bytes).await?;
        report.files += 1;
    }
    Ok(report)
}
