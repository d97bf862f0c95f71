//! `atelier ingest DIR`, over the gateway's HTTP API: hash each file, upload only bytes the
//! gateway lacks, announce a folder of images in batches, then wait until each is recorded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use atelier_contracts::images::{ImagesIngested, IngestedImage};
use atelier_contracts::SCHEMA_VERSION;
use futures::{StreamExt as _, TryStreamExt as _};
use serde::Serialize;
use sha2::Digest as _;

use atelier_client::Client;

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
        .try_chunks(atelier_contracts::http::MAX_IMAGES_PER_ANNOUNCE);
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
