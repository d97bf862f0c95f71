//! Checkpoints published to the object store, beside the local registry folder.
//!
//! Layout under the store's root (the trainer publishes LoRAs the same way):
//! - `models/NAME.safetensors`: a single-file checkpoint, its CLIP tokenizers beside it in
//!   `models/tokenizer/` (and `models/tokenizer_2/` for SDXL) and its optional `models/NAME.json`
//!   sidecar, as in a local registry folder;
//! - `models/NAME/…`: a diffusers folder (with `model_index.json`);
//! - `loras/NAME.safetensors` and `embeddings/NAME.safetensors|.pt`.
//!
//! A checkpoint is copied into a local cache folder named by a hash of its objects' names, sizes
//! and e-tags, so a re-published name is fetched again and an unchanged one never is. Files are
//! streamed to disk (checkpoints are gigabytes); a folder counts only once its `.complete` mark
//! is written, so a worker killed mid-download starts that copy again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use atelier_contracts::ArtifactKey;
use atelier_kit::store::StoreError;
use atelier_kit::Store;
use sha2::{Digest, Sha256};

use crate::{check_name, Entry, EntryKind};

/// One object: its key, relative path in the local copy, size and e-tag.
struct Object {
    key: String,
    rel: PathBuf,
    size: u64,
    e_tag: Option<String>,
}

/// Objects under `prefix`, keyed by path relative to it. A prefix the store cannot list (a
/// local store without the folder) holds nothing.
async fn objects(store: &Store, prefix: &str) -> Result<BTreeMap<String, Object>, StoreError> {
    let listed = match store.list(prefix).await {
        Ok(l) => l,
        Err(e) if e.is_transient() => return Err(e),
        Err(_) => return Ok(BTreeMap::new()),
    };
    let mut out = BTreeMap::new();
    for meta in listed {
        let key = meta.location.to_string();
        let Some(rel) = key
            .strip_prefix(prefix)
            .map(|r| r.trim_start_matches('/').to_owned())
        else {
            continue;
        };
        // Object store paths have no `.`/`..` parts, but a local copy must never leave its
        // folder whatever the listing says.
        if rel.is_empty()
            || rel
                .split('/')
                .any(|p| p.is_empty() || p == "." || p == "..")
        {
            continue;
        }
        out.insert(
            rel.clone(),
            Object {
                key,
                rel: rel.split('/').collect(),
                size: meta.size,
                e_tag: meta.e_tag,
            },
        );
    }
    Ok(out)
}

/// Checkpoints, LoRAs and embeddings the store holds, sorted by name; `path` is the object key
/// (of the file, or of the diffusers folder).
pub async fn list(store: &Store) -> Result<Vec<Entry>, StoreError> {
    let mut out = Vec::new();
    for (rel, _) in objects(store, "models").await? {
        match rel.split_once('/') {
            Some((folder, "model_index.json")) if check_name(folder).is_ok() => out.push(Entry {
                name: folder.to_owned(),
                kind: EntryKind::DiffusersFolder,
                path: format!("models/{folder}").into(),
            }),
            None => {
                if let Some(stem) = rel.strip_suffix(".safetensors") {
                    out.push(Entry {
                        name: stem.to_owned(),
                        kind: EntryKind::SingleFile,
                        path: format!("models/{rel}").into(),
                    });
                }
            }
            _ => {}
        }
    }
    for (dir, kind, exts) in [
        ("loras", EntryKind::Lora, &["safetensors"][..]),
        (
            "embeddings",
            EntryKind::Embedding,
            &["safetensors", "pt"][..],
        ),
    ] {
        for (rel, _) in objects(store, dir).await? {
            let Some((stem, ext)) = rel.rsplit_once('.') else {
                continue;
            };
            if !rel.contains('/') && exts.contains(&ext) && check_name(stem).is_ok() {
                out.push(Entry {
                    name: stem.to_owned(),
                    kind,
                    path: format!("{dir}/{rel}").into(),
                });
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name).then(a.path.cmp(&b.path)));
    Ok(out)
}

/// A local copy of checkpoint `name` from the store (the diffusers folder, or the single file
/// with its tokenizers beside it) under `cache`; `None` when the store has no such checkpoint.
pub async fn fetch_checkpoint(
    store: &Store,
    name: &str,
    cache: &Path,
) -> Result<Option<PathBuf>, FetchError> {
    check_name(name).map_err(FetchError::Name)?;
    let folder = objects(store, &format!("models/{name}")).await?;
    if folder.contains_key("model_index.json") {
        // Copied as `<cache folder>/NAME/…`, so the model keeps its name.
        let files: Vec<Object> = folder
            .into_values()
            .map(|mut o| {
                o.rel = Path::new(name).join(&o.rel);
                o
            })
            .collect();
        let dir = copy(store, name, &files, cache).await?;
        return Ok(Some(dir.join(name)));
    }
    // A single file, with the tokenizers beside it.
    let file = format!("models/{name}.safetensors");
    let Some(meta) = store.head(&ArtifactKey::parse(&file)?).await? else {
        return Ok(None);
    };
    let tokenizers = objects(store, "models/tokenizer").await?;
    let tokenizers_2 = objects(store, "models/tokenizer_2").await?;
    if tokenizers.is_empty() {
        return Err(FetchError::Layout(format!(
            "{file} is in the object store but models/tokenizer/ (CLIP's vocab.json and merges.txt) is not beside it"
        )));
    }
    let mut files = vec![Object {
        key: file,
        rel: PathBuf::from(format!("{name}.safetensors")),
        size: meta.size,
        e_tag: meta.e_tag,
    }];
    // The `NAME.json` sidecar (`prediction_type` of a v-prediction SD 2.x file) travels too.
    let sidecar = format!("models/{name}.json");
    if let Some(meta) = store.head(&ArtifactKey::parse(&sidecar)?).await? {
        files.push(Object {
            key: sidecar,
            rel: PathBuf::from(format!("{name}.json")),
            size: meta.size,
            e_tag: meta.e_tag,
        });
    }
    for (dir, objs) in [("tokenizer", tokenizers), ("tokenizer_2", tokenizers_2)] {
        files.extend(objs.into_values().map(|mut o| {
            o.rel = Path::new(dir).join(&o.rel);
            o
        }));
    }
    let dir = copy(store, name, &files, cache).await?;
    Ok(Some(dir.join(format!("{name}.safetensors"))))
}

/// Copies `files` into `cache/<hash of their keys, sizes and e-tags>/` (once) and returns that
/// folder.
async fn copy(
    store: &Store,
    name: &str,
    files: &[Object],
    cache: &Path,
) -> Result<PathBuf, FetchError> {
    let mut h = Sha256::new();
    for f in files {
        h.update(f.key.as_bytes());
        h.update([0]);
        h.update(f.size.to_le_bytes());
        h.update(f.e_tag.as_deref().unwrap_or("").as_bytes());
        h.update([0]);
    }
    let digest: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = cache.join(format!("{name}-{digest}"));
    let mark = dir.join(".complete");
    if mark.exists() {
        return Ok(dir);
    }
    let io = |p: &Path, e: std::io::Error| FetchError::Disk(format!("{}: {e}", p.display()));
    let mut bytes = 0;
    for f in files {
        let dest = dir.join(&f.rel);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        bytes += store.download(&ArtifactKey::parse(&f.key)?, &dest).await?;
    }
    std::fs::write(&mark, b"").map_err(|e| io(&mark, e))?;
    tracing::info!(model = name, files = files.len(), bytes, dir = %dir.display(), "copied a checkpoint from the object store");
    remove_older_copies(cache, name, &dir);
    Ok(dir)
}

/// Removes the copies of earlier publications of `name` (and unfinished ones) once `keep` is
/// complete: jobs resolve the store on every run, so nothing asks for them again, and a model
/// still loaded from one keeps its mapped files (Linux frees them when it is unmapped).
fn remove_older_copies(cache: &Path, name: &str, keep: &Path) {
    let Ok(entries) = std::fs::read_dir(cache) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if path == keep {
            continue;
        }
        let file_name = e.file_name();
        let Some(digest) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(name))
            .and_then(|n| n.strip_prefix('-'))
        else {
            continue;
        };
        // `NAME-<16 hex digits>` only: "a-b-…" belongs to model "a-b", not to "a".
        if digest.len() == 16 && digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => {
                    tracing::info!(model = name, dir = %path.display(), "removed an earlier copy")
                }
                Err(err) => {
                    tracing::warn!(model = name, dir = %path.display(), %err, "could not remove an earlier copy")
                }
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0}")]
    Name(String),
    #[error("{0}")]
    Layout(String),
    #[error("local disk: {0}")]
    Disk(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] atelier_contracts::KeyError),
}
