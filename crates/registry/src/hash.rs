//! A checkpoint's SHA-256 as AUTOMATIC1111 shows it: `sha256` over the file, and the short `hash`
//! (its first 10 hex digits) that infotexts carry as `Model hash`. A diffusers folder, which A1111
//! does not load, is hashed over its UNet's weight files (the file, or the shards its index
//! names, in name order) — the same files the diffusion engine hashes for its infotexts.
//!
//! Hashing reads the whole file (gigabytes), so results are kept per process, keyed by path,
//! size and modification time.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};
use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// The UNet weight names a diffusers folder may hold, in the order the engine looks for them.
const UNET_FILES: [&str; 4] = [
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
];
const UNET_INDEXES: [&str; 2] = [
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
];

/// The files a checkpoint's hash covers: a single file itself; a diffusers folder's UNet weights
/// (the transformer's, for FLUX and SD 3 folders).
pub fn hashed_files(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let unet = match path.join("unet").is_dir() {
        true => path.join("unet"),
        false => path.join("transformer"),
    };
    if let Some(f) = UNET_FILES
        .iter()
        .map(|n| unet.join(n))
        .find(|p| p.is_file())
    {
        return Ok(vec![f]);
    }
    for index in UNET_INDEXES {
        let Ok(text) = std::fs::read_to_string(unet.join(index)) else {
            continue;
        };
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        let mut files: Vec<&str> = v["weight_map"]
            .as_object()
            .map(|m| m.values().filter_map(|f| f.as_str()).collect())
            .unwrap_or_default();
        files.sort_unstable();
        files.dedup();
        return Ok(files.into_iter().map(|f| unet.join(f)).collect());
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{}: no UNet or transformer weights to hash", path.display()),
    ))
}

type Key = (PathBuf, u64, Option<SystemTime>);
static CACHE: LazyLock<Mutex<HashMap<Vec<Key>, String>>> = LazyLock::new(Default::default);

/// The checkpoint's full SHA-256 in hex (A1111's `sha256`; [`short`] gives its `hash`).
pub fn sha256(path: &Path) -> std::io::Result<String> {
    let files = hashed_files(path)?;
    let key = files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f)?;
            Ok((f.clone(), m.len(), m.modified().ok()))
        })
        .collect::<std::io::Result<Vec<Key>>>()?;
    if let Some(h) = CACHE.lock().ok().and_then(|c| c.get(&key).cloned()) {
        return Ok(h);
    }
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    for f in &files {
        let mut file = std::fs::File::open(f)?;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    if let Ok(mut c) = CACHE.lock() {
        c.insert(key, hex.clone());
    }
    Ok(hex)
}

/// A1111's short model hash: the first 10 hex digits of the SHA-256.
pub fn short(sha256: &str) -> &str {
    sha256.get(..10).unwrap_or(sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_files_hash_whole_and_folders_hash_their_unet() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.safetensors");
        std::fs::write(&file, b"abc").unwrap();
        // sha256("abc")
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256(&file).unwrap(), want);
        assert_eq!(short(want), "ba7816bf8f");
        let folder = dir.path().join("f");
        std::fs::create_dir_all(folder.join("unet")).unwrap();
        assert!(sha256(&folder).is_err());
        std::fs::write(
            folder.join("unet/diffusion_pytorch_model.safetensors"),
            b"abc",
        )
        .unwrap();
        assert_eq!(sha256(&folder).unwrap(), want);
        // A changed file is hashed again, not served from the cache.
        std::fs::write(&file, b"abcd").unwrap();
        assert_ne!(sha256(&file).unwrap(), want);
    }
}
