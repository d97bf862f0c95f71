//! The model registry: a folder (`ATELIER_MODELS`) of checkpoints (diffusers folders or
//! single-file `.safetensors`), LoRA files under `loras/` and textual-inversion embeddings under
//! `embeddings/`. The object store's `models/`, `loras/` and `embeddings/` are the second source
//! ([`store`]); a local entry wins over a store entry of the same name.
//!
//! Names and files only: what a file holds (family, LoRA rank) is read by the diffusion engine's
//! `inspect`, so the gateway can list models without linking the engine.

pub mod hash;
pub mod header;
pub mod store;

use std::path::{Path, PathBuf};

use serde::Serialize;

/// What a registry entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    DiffusersFolder,
    SingleFile,
    Lora,
    Embedding,
}

impl EntryKind {
    pub fn is_checkpoint(self) -> bool {
        matches!(self, EntryKind::DiffusersFolder | EntryKind::SingleFile)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub name: String,
    pub kind: EntryKind,
    pub path: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Registry {
    pub dir: PathBuf,
}

/// A registry name: a plain file or folder name, nothing that walks out of the folder.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 200
        || name.contains(['/', '\\', '\0'])
        || name == "."
        || name == ".."
    {
        return Err(format!(
            "{name:?} is not a model name (a file or folder name in the registry)"
        ));
    }
    Ok(())
}

/// The model family of a checkpoint as far as the UI and clients need it, read from configs and
/// headers only: `flux` and `sd3` (the transformer families, sampled by flow matching), else
/// `unet` (SD 1.x, 2.x, SDXL).
pub fn family(path: &Path) -> &'static str {
    if path.is_dir() {
        let class = std::fs::read_to_string(path.join("transformer/config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["_class_name"].as_str().map(str::to_string));
        return match class.as_deref() {
            Some("FluxTransformer2DModel") => "flux",
            Some("SD3Transformer2DModel") => "sd3",
            _ => "unet",
        };
    }
    let Ok(h) = header::read(path) else {
        return "unet";
    };
    let has = |k: &str| {
        ["", "model.diffusion_model."]
            .iter()
            .any(|p| h.tensors.contains_key(&format!("{p}{k}")))
    };
    if has("double_blocks.0.img_attn.qkv.weight") {
        "flux"
    } else if has("joint_blocks.0.x_block.attn.qkv.weight") {
        "sd3"
    } else {
        "unet"
    }
}

impl Registry {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        let dir = dir.into();
        // Job errors name its files as `<models>/…`, not by the server's path.
        atelier_kit::redact::register_root(&dir, "<models>");
        Self { dir }
    }

    /// Every checkpoint, LoRA and embedding, sorted by name.
    pub fn list(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        let scan = |dir: &Path, lora: bool, out: &mut Vec<Entry>| {
            let Ok(rd) = std::fs::read_dir(dir) else {
                return;
            };
            for e in rd.flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if p.is_dir() && !lora && p.join("model_index.json").exists() {
                    out.push(Entry {
                        name,
                        kind: EntryKind::DiffusersFolder,
                        path: p,
                    });
                } else if p.extension().is_some_and(|x| x == "safetensors") {
                    let stem = p
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or(name);
                    let kind = if lora {
                        EntryKind::Lora
                    } else {
                        EntryKind::SingleFile
                    };
                    out.push(Entry {
                        name: stem,
                        kind,
                        path: p,
                    });
                }
            }
        };
        scan(&self.dir, false, &mut out);
        scan(&self.dir.join("loras"), true, &mut out);
        if let Ok(rd) = std::fs::read_dir(self.dir.join("embeddings")) {
            for p in rd.flatten().map(|e| e.path()) {
                if p.extension()
                    .is_some_and(|x| x == "safetensors" || x == "pt")
                {
                    if let Some(stem) = p.file_stem() {
                        out.push(Entry {
                            name: stem.to_string_lossy().into_owned(),
                            kind: EntryKind::Embedding,
                            path: p,
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// The path of checkpoint `name` (folder, `name.safetensors`, or `name` itself).
    pub fn checkpoint(&self, name: &str) -> Result<PathBuf, String> {
        check_name(name)?;
        let folder = self.dir.join(name);
        if folder.join("model_index.json").exists() {
            return Ok(folder);
        }
        for p in [
            self.dir.join(format!("{name}.safetensors")),
            self.dir.join(name),
        ] {
            if p.is_file() {
                return Ok(p);
            }
        }
        let known: Vec<String> = self
            .list()
            .into_iter()
            .filter(|e| e.kind.is_checkpoint())
            .map(|e| e.name)
            .collect();
        Err(format!(
            "unknown model {name:?}; the registry at {} has: {}",
            self.dir.display(),
            known.join(", ")
        ))
    }

    /// Textual-inversion embeddings under `embeddings/` whose name occurs in `text` (A1111 finds
    /// them by name in the prompt).
    pub fn embeddings_in(&self, text: &str) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(self.dir.join("embeddings")) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "safetensors" || x == "pt")
                    && p.file_stem()
                        .is_some_and(|s| text.contains(&*s.to_string_lossy()))
            })
            .collect();
        out.sort();
        out
    }

    /// Upscaler models under `ESRGAN/` (A1111's `models/ESRGAN`): `(name, path)` for each
    /// `.pth` or `.safetensors` file, named by its stem, sorted.
    pub fn upscalers(&self) -> Vec<(String, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(self.dir.join("ESRGAN")) else {
            return Vec::new();
        };
        let mut out: Vec<(String, PathBuf)> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && p.extension()
                        .is_some_and(|x| x == "pth" || x == "safetensors")
            })
            .filter_map(|p| Some((p.file_stem()?.to_string_lossy().into_owned(), p)))
            .collect();
        out.sort();
        out
    }

    /// The upscaler model `name` under `ESRGAN/`.
    pub fn upscaler(&self, name: &str) -> Result<PathBuf, String> {
        let all = self.upscalers();
        match all.iter().find(|(n, _)| n == name) {
            Some((_, p)) => Ok(p.clone()),
            None => Err(format!(
                "unknown upscaler {name:?}; <models>/ESRGAN has: {}",
                all.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// The `.safetensors` embedding named `name` under `embeddings/`, if there is one.
    pub fn embedding(&self, name: &str) -> Option<PathBuf> {
        check_name(name).ok()?;
        let p = self
            .dir
            .join("embeddings")
            .join(format!("{name}.safetensors"));
        p.is_file().then_some(p)
    }

    /// Separate VAE files under `vae/` (A1111's `models/VAE`): `(file name, path)`, sorted.
    pub fn vaes(&self) -> Vec<(String, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(self.dir.join("vae")) else {
            return Vec::new();
        };
        let mut out: Vec<(String, PathBuf)> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
            .filter_map(|p| Some((p.file_name()?.to_string_lossy().into_owned(), p)))
            .collect();
        out.sort();
        out
    }

    /// The path of VAE `name` under `vae/` (its file name, or the name without `.safetensors`).
    pub fn vae(&self, name: &str) -> Result<PathBuf, String> {
        let vaes = self.vaes();
        let stem = |f: &str| f.strip_suffix(".safetensors").unwrap_or(f).to_owned();
        match vaes.iter().find(|(f, _)| f == name || stem(f) == name) {
            Some((_, p)) => Ok(p.clone()),
            None => Err(format!(
                "unknown VAE {name:?}; <models>/vae has: {}",
                vaes.iter()
                    .map(|(f, _)| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// The path of LoRA `name` under `loras/`.
    pub fn lora(&self, name: &str) -> Result<PathBuf, String> {
        check_name(name)?;
        let p = self.dir.join("loras").join(format!("{name}.safetensors"));
        if p.is_file() {
            Ok(p)
        } else {
            Err(format!("unknown LoRA {name:?} (expected {})", p.display()))
        }
    }
}

/// The model registry and the device that runs its models (flags and `ATELIER_*` variables),
/// shared by the sampler, the inpainter and the trainer.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// The model registry: diffusers folders and `.safetensors` checkpoints; LoRAs in `loras/`.
    #[arg(long, env = "ATELIER_MODELS", default_value = "models")]
    pub models: PathBuf,
    /// Where the diffusion networks run: `cpu`, `cuda` (GPU 0) or `cuda:N` (through libtorch).
    #[arg(long, env = "ATELIER_DEVICE", default_value = "cpu")]
    pub device: String,
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self {
            models: PathBuf::from("models"),
            device: "cpu".into(),
        }
    }
}
