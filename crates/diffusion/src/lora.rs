//! LoRA files as the community writes them: kohya/A1111 (`lora_unet_*`, `lora_te_*`,
//! `lora_te1_*`/`lora_te2_*`, `.lora_down/.lora_up/.alpha`, diffusers or LDM module names) and
//! diffusers/peft (`unet.….lora_A/lora_B`, older `….processor.to_q_lora.down/up`). Applied either
//! merged into the weights or as run-time adapters: the same result either way.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// How a LoRA is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraMode {
    /// Added into the weights (fastest to run; the model is a new copy).
    Merge,
    /// Kept beside the weights and added at every forward pass.
    Runtime,
}

/// One adapted layer: down [r, in(, k, k)], up [out, r(, 1, 1)], scale alpha / r.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// Which model a layer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Part {
    Unet,
    Text(usize),
    /// A diffusion transformer's layers by their diffusers path (`transformer.…`, what
    /// diffusers' and ai-toolkit's FLUX trainers write).
    Transformer,
}

/// A parsed LoRA file: layers by (part, module key as written, normalised).
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub layers: BTreeMap<(Part, String), LoraLayer>,
    pub metadata: HashMap<String, String>,
}

/// (down, up, alpha) of one layer while reading a file.
type Pieces = (Option<Tensor>, Option<Tensor>, Option<f64>);

pub(crate) fn underscore(path: &str) -> String {
    path.replace('.', "_")
}

impl LoraFile {
    pub fn load(path: &Path) -> Result<Self, String> {
        let tensors = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let metadata = crate::models::load::read_metadata(path).unwrap_or_default();
        Self::from_tensors(tensors, metadata).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A LoRA file already read into memory (its hashes can then come from the same bytes).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| e.to_string())?;
        let metadata = safetensors::SafeTensors::read_metadata(bytes)
            .ok()
            .and_then(|(_, m)| m.metadata().clone())
            .unwrap_or_default();
        Self::from_tensors(tensors, metadata)
    }

    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        metadata: HashMap<String, String>,
    ) -> Result<Self, String> {
        // module → (down, up, alpha)
        let mut groups: BTreeMap<(Part, String), Pieces> = BTreeMap::new();
        for (name, t) in tensors {
            let (module, role) = if let Some(m) = name.strip_suffix(".lora_down.weight") {
                (m.to_string(), 0)
            } else if let Some(m) = name.strip_suffix(".lora_up.weight") {
                (m.to_string(), 1)
            } else if let Some(m) = name.strip_suffix(".alpha") {
                (m.to_string(), 2)
            } else if let Some(m) = name.strip_suffix(".lora_A.weight") {
                (m.to_string(), 0)
            } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
                (m.to_string(), 1)
            } else if let Some(m) = name.strip_suffix("_lora.down.weight") {
                (
                    m.replace(".processor.", ".").replace("to_out", "to_out.0"),
                    0,
                )
            } else if let Some(m) = name.strip_suffix("_lora.up.weight") {
                (
                    m.replace(".processor.", ".").replace("to_out", "to_out.0"),
                    1,
                )
            } else {
                continue; // dora scales, hada, etc. are not LoRA: ignored, reported as unmatched
            };
            let (part, key) = if let Some(k) = module.strip_prefix("lora_unet_") {
                (Part::Unet, k.to_string())
            } else if let Some(k) = module.strip_prefix("lora_te1_") {
                (Part::Text(0), k.to_string())
            } else if let Some(k) = module.strip_prefix("lora_te2_") {
                (Part::Text(1), k.to_string())
            } else if let Some(k) = module.strip_prefix("lora_te_") {
                (Part::Text(0), k.to_string())
            } else if let Some(k) = module.strip_prefix("unet.") {
                (Part::Unet, underscore(k))
            } else if let Some(k) = module.strip_prefix("transformer.") {
                (Part::Transformer, underscore(k))
            } else if let Some(k) = module.strip_prefix("text_encoder_2.") {
                (Part::Text(1), underscore(k))
            } else if let Some(k) = module.strip_prefix("text_encoder.") {
                (Part::Text(0), underscore(k))
            } else {
                return Err(format!("{name}: not a LoRA key this loader knows (kohya lora_unet_/lora_te_ or diffusers unet./transformer./text_encoder.)"));
            };
            let key = key.strip_prefix("text_model_").unwrap_or(&key).to_string();
            let g = groups.entry((part, key)).or_default();
            match role {
                0 => g.0 = Some(t),
                1 => g.1 = Some(t),
                _ => {
                    g.2 = Some(
                        t.to_dtype(DType::F64)
                            .and_then(|a| a.flatten_all()?.to_vec1::<f64>())
                            .map_err(|e| e.to_string())?
                            .first()
                            .copied()
                            .unwrap_or(1.0),
                    )
                }
            }
        }
        let mut layers = BTreeMap::new();
        for (k, (down, up, alpha)) in groups {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(format!(
                    "{}: a LoRA layer needs both down and up weights",
                    k.1
                ));
            };
            let rank = down.dim(0).map_err(|e| e.to_string())?;
            let scale = alpha.map_or(1.0, |a| a / rank as f64);
            layers.insert(
                k,
                LoraLayer {
                    down: down.to_dtype(DType::F32).map_err(|e| e.to_string())?,
                    up: up.to_dtype(DType::F32).map_err(|e| e.to_string())?,
                    scale,
                },
            );
        }
        if layers.is_empty() {
            return Err("no LoRA layers in this file".into());
        }
        Ok(Self { layers, metadata })
    }
}

/// A1111's hashes of a safetensors file: the SHA-256 of the bytes after the header (what it
/// stores as `sshs_model_hash`; its first 12 hex digits are the "Lora hashes" entry) and the
/// legacy 8-digit hash of the 64 KiB at offset 1 MiB (of what is there, for small files).
pub fn file_hashes(file: &[u8]) -> (String, String) {
    use sha2::{Digest, Sha256};
    let n = file
        .get(..8)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map(|b| u64::from_le_bytes(b) as usize)
        .unwrap_or(0);
    let body = file.get(8usize.saturating_add(n)..).unwrap_or(&[]);
    let full = hex::encode(Sha256::digest(body));
    let legacy_part = &file[file.len().min(0x100000)..file.len().min(0x110000)];
    let legacy = hex::encode(Sha256::digest(legacy_part))[..8].to_string();
    (full, legacy)
}

/// Each UNet layer's position among `paths` (diffusers paths), by its underscored diffusers name
/// and its underscored LDM name (kohya's SDXL LoRAs use those).
pub(crate) fn unet_index<'a>(
    paths: impl Iterator<Item = &'a str>,
    cfg: &crate::models::config::UNetConfig,
) -> HashMap<String, usize> {
    let mut index = HashMap::new();
    for (i, path) in paths.enumerate() {
        index.insert(underscore(path), i);
        if let Some(ldm) = crate::models::ldm::unet_name(&format!("{path}.weight"), cfg) {
            index.insert(underscore(ldm.trim_end_matches(".weight")), i);
        }
    }
    index
}

/// What applying a file did.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    pub matched: usize,
    /// Layers of the file no module of this model answers to.
    pub unmatched: Vec<String>,
}
