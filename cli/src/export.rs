//! `atelier export`: a dataset version as Hugging Face image folders with `metadata.jsonl`,
//! WebDataset tar shards in img2dataset's layout, LLaVA/ShareGPT4V conversation JSON, JSONL or
//! Parquet, read over the gateway's HTTP API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use atelier_client::Client;
use atelier_contracts::dataset::{DatasetManifest, DatasetRow, Decision, Split, Tier};
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;

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
