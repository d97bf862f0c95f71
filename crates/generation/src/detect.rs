//! What a registry entry holds — family, variant, prediction type; a LoRA's format, rank and
//! base; an embedding's vectors — read from headers and configs, locally or in the object store,
//! without loading weights.

use std::path::Path;

use atelier_contracts::ArtifactKey;
use atelier_diffusion::inspect;
use atelier_kit::Store;
use atelier_registry::{Entry, EntryKind};
use serde::Serialize;

/// What an entry holds, read from its headers and configs (no weights are loaded).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Detected {
    Checkpoint(inspect::CheckpointInfo),
    Lora(inspect::LoraInfo),
    Embedding(inspect::EmbeddingInfo),
}

/// The family and variant of a local entry; an error says why the file is not what its place in
/// the registry promises.
pub fn local(entry: &Entry) -> Result<Detected, String> {
    match entry.kind {
        EntryKind::DiffusersFolder | EntryKind::SingleFile => {
            inspect::checkpoint(&entry.path).map(Detected::Checkpoint)
        }
        EntryKind::Lora => inspect::lora(&entry.path).map(Detected::Lora),
        EntryKind::Embedding => inspect::embedding(&entry.path).map(Detected::Embedding),
    }
}

/// What a store entry is, read like a local one without copying the weights: a single file's or
/// LoRA's safetensors header by ranged reads, a diffusers folder's configs, an embedding (a few
/// KiB) whole.
pub async fn in_store(store: &Store, entry: &Entry) -> Result<Detected, String> {
    let key = entry.path.to_string_lossy().into_owned();
    let label = |e: &dyn std::fmt::Display| format!("{key} in the object store: {e}");
    let get = |rel: String| async move {
        let k = ArtifactKey::parse(&rel).map_err(|e| e.to_string())?;
        match store.head(&k).await.map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(_) => store
                .get_bytes(&k)
                .await
                .map(Some)
                .map_err(|e| e.to_string()),
        }
    };
    let json = |rel: String| async move {
        match get(rel.clone()).await? {
            None => Ok(None),
            Some(b) => serde_json::from_slice::<serde_json::Value>(&b)
                .map(Some)
                .map_err(|e| format!("{rel}: {e}")),
        }
    };
    match entry.kind {
        EntryKind::DiffusersFolder => {
            let need = |rel: &str| {
                let rel = format!("{key}/{rel}");
                async move { json(rel.clone()).await?.ok_or(format!("{rel} is missing")) }
            };
            let index = need("model_index.json").await.map_err(|e| label(&e))?;
            let te = need("text_encoder/config.json")
                .await
                .map_err(|e| label(&e))?;
            let unet = need("unet/config.json").await.map_err(|e| label(&e))?;
            let scheduler = json(format!("{key}/scheduler/scheduler_config.json"))
                .await
                .map_err(|e| label(&e))?;
            let te2 = get(format!("{key}/text_encoder_2/config.json"))
                .await
                .map_err(|e| label(&e))?
                .is_some();
            inspect::checkpoint_from_configs(&index, &te, &unet, scheduler.as_ref(), te2)
                .map(Detected::Checkpoint)
                .map_err(|e| label(&e))
        }
        EntryKind::SingleFile | EntryKind::Lora => {
            let header = header(store, &key).await.map_err(|e| label(&e))?;
            if entry.kind == EntryKind::Lora {
                return inspect::lora_from_header(&header)
                    .map(Detected::Lora)
                    .map_err(|e| label(&e));
            }
            let sidecar_key = format!("{}.json", key.trim_end_matches(".safetensors"));
            let sidecar = get(sidecar_key).await.map_err(|e| label(&e))?;
            let sidecar = sidecar.map(|b| String::from_utf8_lossy(&b).into_owned());
            inspect::checkpoint_from_header(Path::new(&key), &header, sidecar.as_deref())
                .map(Detected::Checkpoint)
        }
        EntryKind::Embedding => {
            const MAX: u64 = 16 << 20;
            let k = ArtifactKey::parse(&key).map_err(|e| label(&e))?;
            let size = store
                .head(&k)
                .await
                .map_err(|e| label(&e))?
                .map_or(0, |m| m.size);
            if size > MAX {
                return Err(label(&format!(
                    "{size} bytes is not a textual-inversion embedding"
                )));
            }
            let bytes = store.get_bytes(&k).await.map_err(|e| label(&e))?;
            // The loader reads files (`.pt` is a pickle): a temporary copy under the same name.
            let dir = tempfile::tempdir().map_err(|e| label(&e))?;
            let file = dir.path().join(entry.path.file_name().unwrap_or_default());
            std::fs::write(&file, &bytes).map_err(|e| label(&e))?;
            inspect::embedding(&file)
                .map(Detected::Embedding)
                .map_err(|e| label(&e))
        }
    }
}

/// A safetensors object's header, read with two ranged GETs.
async fn header(
    store: &Store,
    key: &str,
) -> Result<atelier_diffusion::models::load::Header, String> {
    use atelier_diffusion::models::load::{Header, MAX_HEADER_BYTES};
    let k = ArtifactKey::parse(key).map_err(|e| e.to_string())?;
    let len = store.get_range(&k, 0..8).await.map_err(|e| e.to_string())?;
    let len: [u8; 8] = len[..]
        .try_into()
        .map_err(|_| "not a safetensors file (under 8 bytes)".to_string())?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES {
        return Err(format!("not a safetensors file (header of {n} bytes)"));
    }
    let bytes = store
        .get_range(&k, 8..8 + n)
        .await
        .map_err(|e| e.to_string())?;
    Header::parse(&bytes).map_err(|e| format!("not a safetensors file: {e}"))
}
