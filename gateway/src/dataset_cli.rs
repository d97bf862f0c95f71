//! The dataset side of the CLI, over the gateway's HTTP API: `atelier ingest DIR` (upload and
//! announce a folder of images, then wait until each is recorded) and `atelier export` (a dataset
//! version as Hugging Face image folders with `metadata.jsonl`, WebDataset tar shards in
//! img2dataset's layout, or LLaVA/ShareGPT4V conversation JSON).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use atelier_contracts::dataset::{DatasetManifest, DatasetRow, Decision, Split, Tier};
use atelier_contracts::images::{ImagesIngested, IngestedImage};
use atelier_contracts::SCHEMA_VERSION;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;
use sha2::Digest as _;

use crate::client::Client;

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif"];

#[derive(Debug, Serialize)]
pub struct IngestReport {
    pub dataset: String,
    pub files: usize,
    /// Distinct images (the same bytes twice are one image).
    pub images: usize,
    /// Files whose bytes were sent (the gateway did not have them).
    pub uploaded: usize,
    /// Files skipped: their image was already recorded in this dataset under the same path.
    pub already_recorded: usize,
    /// Distinct images recorded in the dataset when the wait ended.
    pub recorded: usize,
    /// Files whose bytes are not a usable image, with the reason.
    pub flagged: Vec<(String, String)>,
    /// Files not yet recorded when the wait ended.
    pub pending: Vec<String>,
}

/// What one file needs.
enum Step {
    /// Recorded in this dataset under this path already (with the record's flag): nothing to
    /// do, and nothing to wait for.
    Recorded(Option<String>),
    /// The gateway has the bytes (under this key): announce only.
    Announce(String),
    /// Uploaded just now (under this key): announce.
    Uploaded(String),
}

/// Image files under `dir`, sorted, by extension.
pub fn image_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let mut files = Vec::new();
    for e in walkdir::WalkDir::new(dir).follow_links(true) {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let ext = e
            .path()
            .extension()
            .and_then(|x| x.to_str())
            .map(str::to_ascii_lowercase);
        if e.file_type().is_file() && ext.is_some_and(|x| IMAGE_EXTENSIONS.contains(&x.as_str())) {
            files.push(e.into_path());
        }
    }
    files.sort();
    Ok(files)
}

pub fn content_type(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|x| x.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("png") => "image/png",
        Some("webp") => "image/webp",
        Some("bmp") => "image/bmp",
        Some("tif" | "tiff") => "image/tiff",
        Some("gif") => "image/gif",
        _ => "application/octet-stream",
    }
}

/// Uploads every image under `dir` that the gateway does not have, announces them for `dataset`
/// (skipping files already recorded there under the same path), and waits (up to `wait`) until
/// the ingest service has recorded each. With `progress`, a line on stderr per batch of files and
/// per wait round.
pub async fn ingest_dir(
    client: &Client,
    dir: &Path,
    dataset: &str,
    license: Option<String>,
    wait: Duration,
    progress: bool,
) -> anyhow::Result<IngestReport> {
    atelier_contracts::dataset::check_dataset_name(dataset).map_err(anyhow::Error::msg)?;
    let files = image_files(dir)?;
    if files.is_empty() {
        bail!(
            "no images under {} (looked for {})",
            dir.display(),
            IMAGE_EXTENSIONS.join(", ")
        );
    }
    // Each file is hashed here and looked up first: bytes the gateway already has are not sent
    // again, and a file whose image is recorded in this dataset under the same path is skipped,
    // so running `atelier ingest` again on a grown (or half-ingested) folder costs only what is
    // new. Announcements go out as soon as a batch is ready, not after the last upload.
    let mut checked = futures::stream::iter(files.iter())
        .map(|f| async move {
            let bytes = tokio::fs::read(f)
                .await
                .with_context(|| format!("reading {}", f.display()))?;
            let sha = hex::encode(sha2::Sha256::digest(&bytes));
            let known = client
                .image(&sha)
                .await
                .with_context(|| format!("looking up {}", f.display()))?;
            anyhow::Ok((f, bytes, sha, known))
        })
        // Lookups run ahead of the uploads (they are cheaper), uploads 8 at a time.
        .buffered(16)
        .map_ok(|(f, bytes, sha, known)| async move {
            let rel = f.strip_prefix(dir).unwrap_or(f).display().to_string();
            let step = match known {
                Some(r)
                    if r.datasets.iter().any(|d| d == dataset)
                        && r.sources.iter().any(|s| s.source.as_deref() == Some(&rel)) =>
                {
                    Step::Recorded(r.flag)
                }
                Some(r) => Step::Announce(r.key),
                None => {
                    let up = client
                        .upload(bytes.into(), content_type(f))
                        .await
                        .with_context(|| format!("uploading {}", f.display()))?;
                    Step::Uploaded(up.artifact.key)
                }
            };
            anyhow::Ok((rel, sha, step))
        })
        .try_buffered(8)
        .try_chunks(crate::datasets::MAX_IMAGES_PER_ANNOUNCE);
    let mut seen: Vec<(String, String)> = Vec::with_capacity(files.len());
    let (mut uploaded, mut already_recorded) = (0, 0);
    // Images the lookups found recorded in this dataset (sha256 → flag): not polled again.
    let mut in_dataset: BTreeMap<String, Option<String>> = BTreeMap::new();
    while let Some(chunk) = checked.try_next().await.map_err(|e| e.1)? {
        let mut images = Vec::new();
        for (rel, sha, step) in chunk {
            let key = match step {
                Step::Recorded(flag) => {
                    already_recorded += 1;
                    in_dataset.insert(sha.clone(), flag);
                    None
                }
                Step::Announce(key) => Some(key),
                Step::Uploaded(key) => {
                    uploaded += 1;
                    Some(key)
                }
            };
            if let Some(key) = key {
                images.push(IngestedImage {
                    key,
                    sha256: Some(sha.clone()),
                    source: Some(rel.clone()),
                    license: license.clone(),
                    metadata: Default::default(),
                });
            }
            seen.push((rel, sha));
        }
        if !images.is_empty() {
            client
                .announce(&ImagesIngested {
                    schema_version: SCHEMA_VERSION,
                    dataset: Some(dataset.to_owned()),
                    images,
                })
                .await?;
        }
        if progress {
            eprintln!(
                "ingest: {} of {} files checked, {uploaded} uploaded, {already_recorded} already recorded",
                seen.len(),
                files.len()
            );
        }
    }
    let mut by_sha: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (rel, sha) in &seen {
        by_sha.entry(sha).or_default().push(rel);
    }
    let deadline = Instant::now() + wait;
    let mut flagged = Vec::new();
    for (sha, flag) in &in_dataset {
        if let Some(flag) = flag {
            for rel in &by_sha[sha.as_str()] {
                flagged.push(((*rel).to_owned(), flag.clone()));
            }
        }
    }
    let mut recorded = in_dataset.len();
    let mut pending: Vec<&str> = by_sha
        .keys()
        .copied()
        .filter(|sha| !in_dataset.contains_key(*sha))
        .collect();
    loop {
        let mut still = Vec::new();
        let seen: Vec<_> = futures::stream::iter(pending)
            .map(|sha| async move { client.image(sha).await.map(|r| (sha, r)) })
            .buffered(16)
            .try_collect()
            .await?;
        for (sha, record) in seen {
            match record {
                Some(r) if r.datasets.iter().any(|d| d == dataset) => {
                    recorded += 1;
                    if let Some(flag) = r.flag {
                        for rel in &by_sha[sha] {
                            flagged.push(((*rel).to_owned(), flag.clone()));
                        }
                    }
                }
                _ => still.push(sha),
            }
        }
        pending = still;
        if pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        if progress {
            eprintln!(
                "ingest: {recorded} of {} images recorded, waiting for the ingest service",
                by_sha.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(IngestReport {
        dataset: dataset.to_owned(),
        files: files.len(),
        images: by_sha.len(),
        uploaded,
        already_recorded,
        recorded,
        flagged,
        pending: pending
            .iter()
            .flat_map(|s| by_sha[s].iter().map(|r| (*r).to_owned()))
            .collect(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportFormat {
    /// Hugging Face image folders: `<split>/metadata.jsonl` + images (`load_dataset("imagefolder")`).
    Jsonl,
    /// WebDataset tar shards as img2dataset writes them: `<split>/00000.tar` with key.jpg/png,
    /// key.txt, key.json.
    Webdataset,
    /// LLaVA / ShareGPT4V conversation JSON per split, images under `images/`.
    Llava,
    /// Parquet shards as the Hugging Face Hub lays them out (`data/<split>-00000-of-0000N.parquet`),
    /// images embedded as `{bytes, path}` and marked as the `Image` feature.
    Parquet,
}

#[derive(Debug, Serialize)]
pub struct ExportReport {
    pub dataset: String,
    pub version: u32,
    pub out: PathBuf,
    /// Rows written per split.
    pub splits: BTreeMap<String, usize>,
    pub files: Vec<String>,
}

fn split_dir(s: Split) -> &'static str {
    match s {
        Split::Train => "train",
        Split::Val => "validation",
        Split::Test => "test",
    }
}

fn ext_of(row: &DatasetRow) -> &str {
    match row.format.as_deref() {
        Some("jpeg") => "jpg",
        Some("tiff") => "tif",
        Some(f) => f,
        None => "bin",
    }
}

/// Reads a version's rows from its data file.
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

/// Writes `rows` (kept ones in `tiers`) of a version to `out` in `format`.
pub async fn export(
    client: &Client,
    manifest: &DatasetManifest,
    all_rows: Vec<DatasetRow>,
    format: ExportFormat,
    tiers: &[Tier],
    out: &Path,
    shard_size: usize,
) -> anyhow::Result<ExportReport> {
    if out.exists() && out.read_dir()?.next().is_some() {
        bail!(
            "{} exists and is not empty; choose a new --out folder",
            out.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let rows: Vec<DatasetRow> = all_rows
        .into_iter()
        .filter(|r| r.decision != Decision::Reject && r.tier.is_some_and(|t| tiers.contains(&t)))
        .filter(|r| r.caption.is_some())
        .collect();
    // Fetch every image once (a few at a time).
    let images: Vec<bytes::Bytes> = futures::stream::iter(rows.iter())
        .map(|r| client.download(&r.image_key))
        .buffered(8)
        .try_collect()
        .await?;
    let mut report = ExportReport {
        dataset: manifest.dataset.clone(),
        version: manifest.version,
        out: out.to_owned(),
        splits: BTreeMap::new(),
        files: Vec::new(),
    };
    let mut by_split: BTreeMap<&str, Vec<(&DatasetRow, &bytes::Bytes)>> = BTreeMap::new();
    for (r, b) in rows.iter().zip(&images) {
        by_split
            .entry(split_dir(r.split.unwrap_or(Split::Train)))
            .or_default()
            .push((r, b));
    }
    let write = |rel: String, bytes: &[u8], files: &mut Vec<String>| -> anyhow::Result<()> {
        let p = out.join(&rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
        files.push(rel);
        Ok(())
    };
    for (split, items) in &by_split {
        report.splits.insert((*split).to_owned(), items.len());
        match format {
            ExportFormat::Jsonl => {
                let mut meta = Vec::new();
                for (r, b) in items {
                    let name = format!("{}.{}", r.image_id, ext_of(r));
                    write(format!("{split}/{name}"), b, &mut report.files)?;
                    let mut v = serde_json::to_value(r)?;
                    v["file_name"] = name.into();
                    v["text"] = r.caption.clone().unwrap_or_default().into();
                    serde_json::to_writer(&mut meta, &v)?;
                    meta.push(b'\n');
                }
                write(format!("{split}/metadata.jsonl"), &meta, &mut report.files)?;
            }
            ExportFormat::Webdataset => {
                for (n, shard) in items.chunks(shard_size.max(1)).enumerate() {
                    let mut tar = tar::Builder::new(Vec::new());
                    for (r, b) in shard {
                        let mut add = |name: String, data: &[u8]| -> anyhow::Result<()> {
                            let mut h = tar::Header::new_gnu();
                            h.set_size(data.len() as u64);
                            h.set_mode(0o644);
                            h.set_mtime(manifest.created_at.timestamp().max(0) as u64);
                            h.set_cksum();
                            tar.append_data(&mut h, name, data)?;
                            Ok(())
                        };
                        add(format!("{}.{}", r.image_id, ext_of(r)), b)?;
                        add(
                            format!("{}.txt", r.image_id),
                            r.caption.as_deref().unwrap_or("").as_bytes(),
                        )?;
                        let mut v = serde_json::to_value(r)?;
                        v["key"] = r.image_id.clone().into();
                        add(format!("{}.json", r.image_id), &serde_json::to_vec(&v)?)?;
                    }
                    let bytes = tar.into_inner()?;
                    write(format!("{split}/{n:05}.tar"), &bytes, &mut report.files)?;
                }
            }
            ExportFormat::Parquet => {
                let hf_split = *split;
                let shards: Vec<_> = items.chunks(shard_size.max(1)).collect();
                for (n, shard) in shards.iter().enumerate() {
                    let bytes = parquet_shard(shard)?;
                    write(
                        format!("data/{hf_split}-{n:05}-of-{:05}.parquet", shards.len()),
                        &bytes,
                        &mut report.files,
                    )?;
                }
            }
            ExportFormat::Llava => {
                let mut convs = Vec::new();
                for (r, b) in items {
                    let name = format!("images/{}.{}", r.image_id, ext_of(r));
                    write(name.clone(), b, &mut report.files)?;
                    let prompt = r
                        .caption_source
                        .as_ref()
                        .map(|s| s.prompt.clone())
                        .unwrap_or_else(|| atelier_contracts::dataset::SHAREGPT4V_PROMPT.into());
                    convs.push(serde_json::json!({
                        "id": r.image_id,
                        "image": name,
                        "conversations": [
                            {"from": "human", "value": format!("<image>\n{prompt}")},
                            {"from": "gpt", "value": r.caption.clone().unwrap_or_default()},
                        ],
                    }));
                }
                write(
                    format!("{split}.json"),
                    &serde_json::to_vec_pretty(&convs)?,
                    &mut report.files,
                )?;
            }
        }
    }
    write(
        "manifest.json".into(),
        &serde_json::to_vec_pretty(manifest)?,
        &mut report.files,
    )?;
    Ok(report)
}

/// One Parquet file of rows with their images. Columns: `image` (struct of `bytes`, `path`),
/// `image_id`, `text` (the caption), `sha256`, `image_key`, `width`, `height`, `format`,
/// `caption_backend`, `caption_model`, `caption_prompt`, `language`, `words`, `decision`, `tier`,
/// `split`, `signals` (JSON), `tags` (comma-separated), `source`, `license`, and from augment jobs
/// `negatives`, `paraphrases` and `augmentation` (JSON, null when absent). The schema carries the
/// `huggingface` metadata that makes `datasets` decode `image` as an `Image` feature.
fn parquet_shard(items: &[(&DatasetRow, &bytes::Bytes)]) -> anyhow::Result<Vec<u8>> {
    use std::sync::Arc;

    use arrow_array::{ArrayRef, BinaryArray, Int32Array, RecordBatch, StringArray, StructArray};
    use arrow_schema::{DataType, Field, Schema};

    let strings = |f: &dyn Fn(&DatasetRow) -> Option<String>| -> ArrayRef {
        Arc::new(StringArray::from(
            items
                .iter()
                .map(|(r, _)| f(r))
                .collect::<Vec<Option<String>>>(),
        ))
    };
    let ints = |f: &dyn Fn(&DatasetRow) -> Option<i32>| -> ArrayRef {
        Arc::new(Int32Array::from(
            items
                .iter()
                .map(|(r, _)| f(r))
                .collect::<Vec<Option<i32>>>(),
        ))
    };
    let name = |v: &dyn erased_name::Named| v.name();
    let image_fields = [
        Arc::new(Field::new("bytes", DataType::Binary, true)),
        Arc::new(Field::new("path", DataType::Utf8, true)),
    ];
    let image = StructArray::from(vec![
        (
            image_fields[0].clone(),
            Arc::new(BinaryArray::from(
                items
                    .iter()
                    .map(|(_, b)| Some(b.as_ref()))
                    .collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
        (
            image_fields[1].clone(),
            Arc::new(StringArray::from(
                items
                    .iter()
                    .map(|(r, _)| Some(format!("{}.{}", r.image_id, ext_of(r))))
                    .collect::<Vec<_>>(),
            )) as ArrayRef,
        ),
    ]);
    let columns: Vec<(&str, ArrayRef)> = vec![
        ("image", Arc::new(image)),
        ("image_id", strings(&|r| Some(r.image_id.clone()))),
        ("text", strings(&|r| r.caption.clone())),
        ("sha256", strings(&|r| Some(r.sha256.clone()))),
        ("image_key", strings(&|r| Some(r.image_key.clone()))),
        ("width", ints(&|r| r.width.map(|w| w as i32))),
        ("height", ints(&|r| r.height.map(|h| h as i32))),
        ("format", strings(&|r| r.format.clone())),
        (
            "caption_backend",
            strings(&|r| r.caption_source.as_ref().map(|c| c.backend.clone())),
        ),
        (
            "caption_model",
            strings(&|r| r.caption_source.as_ref().map(|c| c.model.clone())),
        ),
        (
            "caption_prompt",
            strings(&|r| r.caption_source.as_ref().map(|c| c.prompt.clone())),
        ),
        ("language", strings(&|r| r.language.clone())),
        ("words", ints(&|r| Some(r.words as i32))),
        ("decision", strings(&|r| Some(name(&r.decision)))),
        ("tier", strings(&|r| r.tier.map(|t| name(&t)))),
        ("split", strings(&|r| r.split.map(|s| name(&s)))),
        (
            "signals",
            strings(&|r| serde_json::to_string(&r.signals).ok()),
        ),
        ("tags", strings(&|r| Some(r.tags.join(", ")))),
        ("source", strings(&|r| r.source.clone())),
        ("license", strings(&|r| r.license.clone())),
        (
            "negatives",
            strings(&|r| {
                (!r.negatives.is_empty())
                    .then(|| serde_json::to_string(&r.negatives).ok())
                    .flatten()
            }),
        ),
        (
            "paraphrases",
            strings(&|r| {
                (!r.paraphrases.is_empty())
                    .then(|| serde_json::to_string(&r.paraphrases).ok())
                    .flatten()
            }),
        ),
        (
            "augmentation",
            strings(&|r| {
                r.augmentation
                    .as_ref()
                    .and_then(|a| serde_json::to_string(a).ok())
            }),
        ),
    ];
    let mut features = serde_json::Map::new();
    let fields: Vec<Field> = columns
        .iter()
        .map(|(n, a)| {
            let feature = match a.data_type() {
                DataType::Struct(_) => serde_json::json!({"_type": "Image"}),
                DataType::Int32 => serde_json::json!({"dtype": "int32", "_type": "Value"}),
                _ => serde_json::json!({"dtype": "string", "_type": "Value"}),
            };
            features.insert((*n).to_owned(), feature);
            Field::new(*n, a.data_type().clone(), true)
        })
        .collect();
    let hf = serde_json::json!({"info": {"features": features}});
    let schema = Arc::new(Schema::new_with_metadata(
        fields,
        std::collections::HashMap::from([("huggingface".to_owned(), hf.to_string())]),
    ));
    let batch = RecordBatch::try_new(
        schema.clone(),
        columns.into_iter().map(|(_, a)| a).collect(),
    )?;
    let mut out = Vec::new();
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, Some(props))?;
    w.write(&batch)?;
    w.close()?;
    Ok(out)
}

/// The serde name of a unit enum (`accept`, `gold`, `val`, …).
mod erased_name {
    pub trait Named {
        fn name(&self) -> String;
    }
    impl<T: serde::Serialize> Named for T {
        fn name(&self) -> String {
            serde_json::to_value(self)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        }
    }
}
