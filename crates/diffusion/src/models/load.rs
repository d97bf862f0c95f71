//! Weights from safetensors files into our models: name fallbacks for the layouts real files use
//! (transformers' optional `text_model.` prefix, diffusers' pre-0.14 VAE attention names), shape
//! checks that name the tensor, and a cast to the compute dtype. Unused entries (`position_ids`)
//! are ignored.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::ldm::Source;

/// A set of safetensors files, memory-mapped.
#[derive(Clone)]
pub struct SafetensorsWeights {
    st: Arc<MmapedSafetensors>,
    names: Arc<Vec<String>>,
    label: String,
    /// Single-file checkpoints: where each model parameter is stored.
    map: Option<Arc<std::collections::HashMap<String, Source>>>,
    /// Bytes of every tensor handed out (in the requested dtype): what the model holds.
    loaded: Arc<std::sync::atomic::AtomicU64>,
}

impl SafetensorsWeights {
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        for p in paths {
            if !p.exists() {
                return Err(candle_core::Error::Msg(format!(
                    "weights file {} does not exist",
                    p.display()
                )));
            }
        }
        // SAFETY: the files are mapped read-only; atelier never writes a weights file it has
        // mapped (models are written to a new path and renamed into place).
        let st = unsafe { MmapedSafetensors::multi(paths)? };
        let names = st.tensors().into_iter().map(|(n, _)| n).collect();
        Ok(Self {
            st: Arc::new(st),
            names: Arc::new(names),
            label: paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            map: None,
            loaded: Arc::default(),
        })
    }

    /// The same files read through a single-file name map.
    pub fn with_map(&self, map: std::collections::HashMap<String, Source>) -> Self {
        Self {
            map: Some(Arc::new(map)),
            ..self.clone()
        }
    }

    /// Whether a stored tensor of this name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.has(name)
    }

    /// A stored tensor's shape.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.st.get(name).ok().map(|v| v.shape().to_vec())
    }

    fn load_mapped(&self, src: &Source, dev: &Device) -> Result<Tensor> {
        match src {
            Source::Rename(n) => self.st.load(n, dev),
            Source::Transposed(n) => self.st.load(n, dev)?.t()?.contiguous(),
            Source::Part { name, part, parts } => {
                let t = self.st.load(name, dev)?;
                let rows = t.dim(0)? / parts;
                t.narrow(0, part * rows, rows)?.contiguous()
            }
            Source::Rows { name, start, len } => self
                .st
                .load(name, dev)?
                .narrow(0, *start, *len)?
                .contiguous(),
            Source::SwappedHalves(n) => {
                let t = self.st.load(n, dev)?;
                let h = t.dim(0)? / 2;
                Tensor::cat(&[t.narrow(0, h, h)?, t.narrow(0, 0, h)?], 0)
            }
        }
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Bytes of the tensors loaded through this handle (and its clones) so far.
    pub fn loaded_bytes(&self) -> u64 {
        self.loaded.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    fn has(&self, name: &str) -> bool {
        self.st.get(name).is_ok()
    }

    /// The stored name for a model parameter name.
    fn resolve(&self, name: &str) -> Option<String> {
        if self.has(name) {
            return Some(name.to_string());
        }
        let mut candidates = vec![format!("text_model.{name}")];
        if let Some(rest) = name.strip_prefix("text_model.") {
            candidates.push(rest.to_string());
        }
        for (new, old) in [
            (".to_q.", ".query."),
            (".to_k.", ".key."),
            (".to_v.", ".value."),
            (".to_out.0.", ".proj_attn."),
        ] {
            if name.contains(new) {
                candidates.push(name.replace(new, old));
            }
        }
        candidates.into_iter().find(|c| self.has(c))
    }
}

impl SimpleBackend for SafetensorsWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let (stored, t) = match self.map.as_ref().and_then(|m| m.get(name)) {
            Some(src) => {
                let stored = src.stored().to_string();
                let t = self.load_mapped(src, dev).map_err(|e| {
                    candle_core::Error::Msg(format!("{}: {stored} (for {name}): {e}", self.label))
                })?;
                (stored, t)
            }
            None => {
                let stored = self.resolve(name).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "{}: no tensor {name} (is this the right model type?)",
                        self.label
                    ))
                })?;
                let t = self.st.load(&stored, dev)?;
                (stored, t)
            }
        };
        let t = if t.shape() != &s
            && t.elem_count() == s.elem_count()
            && t.rank() == 2
            && s.rank() == 4
        {
            // 1×1 convolutions stored as linear layers (and back).
            t.reshape(s.clone())?
        } else if t.shape() != &s
            && t.elem_count() == s.elem_count()
            && t.rank() == 4
            && s.rank() == 2
        {
            t.reshape(s.clone())?
        } else {
            t
        };
        if t.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "{}: {stored} has shape {:?}, the model expects {:?}",
                self.label,
                t.dims(),
                s.dims()
            )));
        }
        self.loaded.fetch_add(
            (t.elem_count() * dtype.size_in_bytes()) as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let stored = self
            .resolve(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: no tensor {name}", self.label)))?;
        self.st.load(&stored, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.as_ref().is_some_and(|m| m.contains_key(name)) || self.resolve(name).is_some()
    }
}

/// The weights file of a diffusers component folder (`unet/`, `vae/`, `text_encoder/`), preferring
/// full precision, accepting the `.fp16` variant.
pub fn component_weights(dir: &Path) -> Result<Vec<PathBuf>> {
    for name in [
        "diffusion_pytorch_model.safetensors",
        "model.safetensors",
        "diffusion_pytorch_model.fp16.safetensors",
        "model.fp16.safetensors",
    ] {
        let p = dir.join(name);
        if p.exists() {
            return Ok(vec![p]);
        }
    }
    // Sharded: an index naming the shards.
    for index in [
        "diffusion_pytorch_model.safetensors.index.json",
        "model.safetensors.index.json",
    ] {
        let p = dir.join(index);
        if let Ok(text) = std::fs::read_to_string(&p) {
            let v: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", p.display())))?;
            let mut files: Vec<String> = v["weight_map"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|f| f.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            files.dedup();
            return Ok(files.into_iter().map(|f| dir.join(f)).collect());
        }
    }
    Err(candle_core::Error::Msg(format!(
        "{}: expected diffusion_pytorch_model.safetensors or model.safetensors (.bin checkpoints are not loaded: convert them to safetensors)",
        dir.display()
    )))
}

/// Save named tensors as a safetensors file, written beside and renamed into place.
pub fn save(tensors: &std::collections::BTreeMap<String, Tensor>, path: &Path) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    let map: std::collections::HashMap<String, Tensor> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    candle_core::safetensors::save(&map, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A safetensors file's header: each tensor's shape and dtype name, and `__metadata__`.
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub tensors: std::collections::HashMap<String, (Vec<usize>, String)>,
    pub metadata: std::collections::HashMap<String, String>,
}

impl Header {
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.tensors.get(name).map(|(s, _)| s.clone())
    }
}

/// Read a safetensors file's header only (no tensor data), whatever the file's size.
pub fn read_header(path: &Path) -> Result<Header> {
    use std::io::Read;
    let not = |why: String| {
        candle_core::Error::Msg(format!("{}: not a safetensors file: {why}", path.display()))
    };
    let mut f = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    if n > MAX_HEADER_BYTES {
        return Err(not(format!("header of {n} bytes")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)?;
    Header::parse(&header).map_err(not)
}

/// The longest safetensors header atelier reads (real ones are a few hundred KiB).
pub const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

impl Header {
    /// Parses the JSON header that follows a safetensors file's 8-byte length.
    pub fn parse(header: &[u8]) -> std::result::Result<Self, String> {
        let v: serde_json::Value = serde_json::from_slice(header).map_err(|e| e.to_string())?;
        let obj = v
            .as_object()
            .ok_or_else(|| "the header is not a JSON object".to_string())?;
        let mut out = Header::default();
        for (k, entry) in obj {
            if k == "__metadata__" {
                if let Some(m) = entry.as_object() {
                    out.metadata = m
                        .iter()
                        .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
                        .collect();
                }
                continue;
            }
            let shape = entry["shape"]
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|d| d.as_u64().map(|d| d as usize))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| format!("{k} has no shape"))?;
            let dtype = entry["dtype"].as_str().unwrap_or_default().to_string();
            out.tensors.insert(k.clone(), (shape, dtype));
        }
        Ok(out)
    }
}

/// The `__metadata__` of a safetensors file (its header only is read).
pub fn read_metadata(path: &Path) -> Result<std::collections::HashMap<String, String>> {
    read_header(path).map(|h| h.metadata)
}

/// Save named tensors with `__metadata__`, written beside and renamed into place.
pub fn save_with_metadata(
    tensors: &std::collections::BTreeMap<String, Tensor>,
    metadata: std::collections::HashMap<String, String>,
    path: &Path,
) -> Result<()> {
    let tmp = path.with_extension("safetensors.tmp");
    let data: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    safetensors::serialize_to_file(data, Some(metadata), &tmp)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
