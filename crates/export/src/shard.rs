//! One shard at a time: its files named from its split and number, skipped when complete, else
//! its images fetched (a few at a time, in order) and its files written, the one that marks it
//! complete last.

use std::collections::BTreeMap;

use anyhow::Context as _;
use atelier_contracts::dataset::{DatasetRow, ExportFormat, Split};
use futures::{StreamExt as _, TryStreamExt as _};

use crate::rows::Counts;
use crate::{ext_of, ext_of_format, split_name, Images, Options, Report, Sink};

/// Images fetched at once while a shard is written.
const FETCH_AHEAD: usize = 8;

pub struct Plan {
    format: ExportFormat,
    /// Shards per split.
    total: BTreeMap<Split, usize>,
    /// The next shard's number per split.
    next: BTreeMap<Split, usize>,
    /// WebDataset: the one image key of every sample, and whether other formats are re-encoded.
    wds_ext: String,
    wds_transcode: bool,
    mtime: u64,
}

impl Plan {
    /// `mtime`: the tar entries' time (the version's), so an export is reproducible.
    pub fn new(opts: &Options, counts: &Counts, mtime: u64) -> Self {
        let size = opts.shard_size.max(1);
        // `datasets` reads WebDataset samples as one set of keys: a shard mixing key.png and
        // key.jpg loses images. One format keeps its bytes; mixed formats all become PNG
        // (lossless).
        let (wds_ext, wds_transcode) = match counts.formats.keys().collect::<Vec<_>>()[..] {
            [only] => (ext_of_format(Some(only)).to_owned(), false),
            _ => ("png".to_owned(), true),
        };
        Self {
            format: opts.format,
            total: counts
                .per_split
                .iter()
                .map(|(s, n)| (*s, n.div_ceil(size)))
                .collect(),
            next: BTreeMap::new(),
            wds_ext,
            wds_transcode,
            mtime,
        }
    }

    /// The file whose presence marks shard `n` of `split` complete.
    fn marker(&self, split: Split, n: usize) -> String {
        let s = split_name(split);
        let of = self.total.get(&split).copied().unwrap_or(1);
        match self.format {
            ExportFormat::Jsonl => format!("{s}/{n:05}/metadata.jsonl"),
            ExportFormat::Webdataset => format!("{s}/{n:05}.tar"),
            ExportFormat::Parquet => format!("data/{s}-{n:05}-of-{of:05}.parquet"),
            ExportFormat::Llava => format!("{s}-{n:05}-of-{of:05}.json"),
        }
    }

    /// Writes the next shard of `split` (or finds it complete).
    pub async fn flush(
        &mut self,
        split: Split,
        rows: Vec<DatasetRow>,
        images: &impl Images,
        sink: &impl Sink,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        let n = *self.next.entry(split).and_modify(|n| *n += 1).or_insert(0);
        let marker = self.marker(split, n);
        let images_too = matches!(self.format, ExportFormat::Jsonl | ExportFormat::Llava);
        let files = 1 + if images_too { rows.len() } else { 0 };
        if sink.exists(&marker).await? {
            report.shards_skipped += 1;
            report.files += files;
            return Ok(());
        }
        // Owned keys: the fetches' futures borrow nothing of the loop (so they are `Send` for
        // any caller).
        let keys: Vec<String> = rows.iter().map(|r| r.image_key.clone()).collect();
        let bytes: Vec<bytes::Bytes> = futures::stream::iter(keys)
            .map(|k| async move { images.get(&k).await })
            .buffered(FETCH_AHEAD)
            .try_collect()
            .await?;
        let body = match self.format {
            ExportFormat::Jsonl => {
                let dir = format!("{}/{n:05}", split_name(split));
                let mut meta = Vec::new();
                for (r, b) in rows.iter().zip(&bytes) {
                    let name = format!("{}.{}", r.image_id, ext_of(r));
                    put(sink, report, format!("{dir}/{name}"), b.to_vec()).await?;
                    let mut v = serde_json::to_value(r)?;
                    v["file_name"] = name.into();
                    v["text"] = r.caption.clone().unwrap_or_default().into();
                    serde_json::to_writer(&mut meta, &v)?;
                    meta.push(b'\n');
                }
                meta
            }
            ExportFormat::Llava => {
                let mut convs = Vec::with_capacity(rows.len());
                for (r, b) in rows.iter().zip(&bytes) {
                    let name = format!("images/{}.{}", r.image_id, ext_of(r));
                    put(sink, report, name.clone(), b.to_vec()).await?;
                    convs.push(llava_entry(r, &name));
                }
                serde_json::to_vec_pretty(&convs)?
            }
            ExportFormat::Webdataset => {
                let (tar, transcoded) = self.tar(&rows, bytes).await?;
                report.transcoded += transcoded;
                tar
            }
            ExportFormat::Parquet => {
                let items: Vec<(&DatasetRow, &bytes::Bytes)> = rows.iter().zip(&bytes).collect();
                crate::parquet::shard(&items)?
            }
        };
        put(sink, report, marker, body).await?;
        report.shards_written += 1;
        report.files += files;
        Ok(())
    }

    /// A WebDataset shard: per sample key.<ext>, key.txt, key.json.
    async fn tar(
        &self,
        rows: &[DatasetRow],
        bytes: Vec<bytes::Bytes>,
    ) -> anyhow::Result<(Vec<u8>, usize)> {
        let mut tar = tar::Builder::new(Vec::new());
        let mut transcoded = 0;
        for (r, b) in rows.iter().zip(bytes) {
            let mut meta = serde_json::to_value(r)?;
            meta["key"] = r.image_id.clone().into();
            let image = if self.wds_transcode && ext_of(r) != self.wds_ext {
                meta["original_format"] = r.format.clone().into();
                transcoded += 1;
                to_png(b)
                    .await
                    .with_context(|| format!("re-encoding {} as PNG", r.image_key))?
            } else {
                b.to_vec()
            };
            let mut add = |name: String, data: &[u8]| -> anyhow::Result<()> {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_mtime(self.mtime);
                h.set_cksum();
                tar.append_data(&mut h, name, data)?;
                Ok(())
            };
            add(format!("{}.{}", r.image_id, self.wds_ext), &image)?;
            add(
                format!("{}.txt", r.image_id),
                r.caption.as_deref().unwrap_or("").as_bytes(),
            )?;
            add(format!("{}.json", r.image_id), &serde_json::to_vec(&meta)?)?;
        }
        Ok((tar.into_inner()?, transcoded))
    }
}

async fn put(
    sink: &impl Sink,
    report: &mut Report,
    rel: String,
    data: Vec<u8>,
) -> anyhow::Result<()> {
    report.bytes_written += data.len() as u64;
    sink.put(&rel, data).await
}

/// A LLaVA / ShareGPT4V conversation for one row.
fn llava_entry(r: &DatasetRow, image: &str) -> serde_json::Value {
    let prompt = r
        .caption_source
        .as_ref()
        .map(|s| s.prompt.clone())
        .unwrap_or_else(|| atelier_contracts::dataset::SHAREGPT4V_PROMPT.into());
    serde_json::json!({
        "id": r.image_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": format!("<image>\n{prompt}")},
            {"from": "gpt", "value": r.caption.clone().unwrap_or_default()},
        ],
    })
}

/// Lossless re-encoding (under the decode limits every user image gets).
async fn to_png(bytes: bytes::Bytes) -> anyhow::Result<Vec<u8>> {
    tokio::task::spawn_blocking(move || {
        let img = atelier_decode::decode(&bytes, &atelier_decode::Limits::default())?;
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png)?;
        anyhow::Ok(out.into_inner())
    })
    .await?
}
