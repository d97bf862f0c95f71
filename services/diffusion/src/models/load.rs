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

/// A set of safetensors files, memory-mapped.
#[derive(Clone)]
pub struct SafetensorsWeights {
    st: Arc<MmapedSafetensors>,
    /// Prefix every lookup with this (a single-file checkpoint's component, after renaming).
    names: Arc<Vec<String>>,
    label: String,
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
        })
    }

    pub fn names(&self) -> &[String] {
        &self.names
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
        let stored = self.resolve(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: no tensor {name} (is this the right model type?)",
                self.label
            ))
        })?;
        let t = self.st.load(&stored, dev)?;
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
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        let stored = self
            .resolve(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: no tensor {name}", self.label)))?;
        self.st.load(&stored, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolve(name).is_some()
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
