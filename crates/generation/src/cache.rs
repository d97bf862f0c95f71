//! The loaded models a generator keeps: one LRU list for every family (UNet and transformer
//! models share the worker's memory), bounded by a count and by bytes of weights; the model in
//! use always stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use atelier_diffusion::flow::FlowModel;
use atelier_diffusion::pipeline::StableDiffusion;
use atelier_kit::JobError;

use crate::Generator;

/// A loaded model of either kind. Cloning shares it.
#[derive(Clone)]
pub(crate) enum Loaded {
    Unet(Arc<StableDiffusion>),
    Flow(Arc<FlowModel>),
}

impl Loaded {
    fn weight_bytes(&self) -> u64 {
        match self {
            Loaded::Unet(m) => m.weight_bytes(),
            Loaded::Flow(m) => m.weight_bytes(),
        }
    }
}

/// A checkpoint and separate VAE file (if any), and the model loaded from them.
pub(crate) type Cached = ((PathBuf, Option<PathBuf>), Loaded);

fn mismatch(path: &Path) -> JobError {
    JobError::permanent(
        "model_load_failed",
        format!("{} changed family while loaded", path.display()),
    )
}

impl Generator {
    /// The loaded models, least recently used first, with their weight bytes.
    pub fn cached(&self) -> Vec<(PathBuf, u64)> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((p, _), m)| (p.clone(), m.weight_bytes()))
            .collect()
    }

    /// The model under `key` from the cache (then the most recently used), else `load`ed and
    /// kept, evicting the least recently used beyond the count or the byte budget.
    fn cached_model(
        &self,
        key: (PathBuf, Option<PathBuf>),
        load: impl FnOnce() -> Result<Loaded, JobError>,
    ) -> Result<Loaded, JobError> {
        {
            let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(i) = c.iter().position(|(k, _)| *k == key) {
                let e = c.remove(i);
                let m = e.1.clone();
                c.push(e);
                return Ok(m);
            }
        }
        let m = load()?;
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        c.push((key, m.clone()));
        let total = |c: &Vec<Cached>| c.iter().map(|(_, m)| m.weight_bytes()).sum::<u64>();
        while c.len() > self.cache_size
            || (self.cache_bytes > 0 && c.len() > 1 && total(&c) > self.cache_bytes)
        {
            let ((evicted, _), _) = c.remove(0);
            tracing::info!(model = %evicted.display(), "evicted from the model cache");
        }
        Ok(m)
    }

    /// A UNet-family model (with the VAE of a separate file, when given).
    pub(crate) fn model(
        &self,
        path: &Path,
        vae: Option<&PathBuf>,
    ) -> Result<Arc<StableDiffusion>, JobError> {
        let load = || {
            let loaded = match vae {
                None => StableDiffusion::load(path, self.placement),
                Some(v) => StableDiffusion::load_with_vae(path, v, self.placement),
            };
            loaded
                .map(|m| Loaded::Unet(Arc::new(m)))
                .map_err(|e| JobError::permanent("model_load_failed", e.to_string()))
        };
        match self.cached_model((path.to_path_buf(), vae.cloned()), load)? {
            Loaded::Unet(m) => Ok(m),
            Loaded::Flow(_) => Err(mismatch(path)),
        }
    }

    /// A transformer-family model (FLUX, SD 3).
    pub(crate) fn flow_model(&self, path: &Path) -> Result<Arc<FlowModel>, JobError> {
        let load = || {
            FlowModel::load(path, self.placement)
                .map(|m| Loaded::Flow(Arc::new(m)))
                .map_err(|e| JobError::permanent("model_load_failed", e.to_string()))
        };
        match self.cached_model((path.to_path_buf(), None), load)? {
            Loaded::Flow(m) => Ok(m),
            Loaded::Unet(_) => Err(mismatch(path)),
        }
    }
}
