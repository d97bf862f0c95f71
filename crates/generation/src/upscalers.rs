//! Upscaler models for `upscale` jobs on the sampler: ESRGAN-family files from the registry's
//! `ESRGAN` folder on the engine's device, loaded once and kept.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use atelier_diffusion::torch::esrgan::Esrgan;
use atelier_registry::Registry;
use atelier_upscale::{Model, Models};
use image::RgbImage;

struct Loaded(Esrgan);

impl Model for Loaded {
    fn scale(&self) -> u32 {
        self.0.scale
    }

    fn run(&self, img: &RgbImage) -> Result<RgbImage, String> {
        self.0.upscale_whole(img).map_err(|e| e.to_string())
    }
}

/// The registry's upscaler models, by name.
pub struct Upscalers {
    registry: Registry,
    device: atelier_diffusion::torch::Device,
    loaded: Mutex<HashMap<PathBuf, Arc<dyn Model>>>,
}

impl Upscalers {
    pub fn new(registry: Registry, device: atelier_diffusion::torch::Device) -> Self {
        Self {
            registry,
            device,
            loaded: Mutex::default(),
        }
    }
}

impl Models for Upscalers {
    fn get(&self, name: &str) -> Result<Arc<dyn Model>, String> {
        let path = self.registry.upscaler(name)?;
        let mut loaded = self.loaded.lock().map_err(|e| e.to_string())?;
        if let Some(m) = loaded.get(&path) {
            return Ok(m.clone());
        }
        let m: Arc<dyn Model> = Arc::new(Loaded(
            Esrgan::load(&path, self.device).map_err(|e| e.to_string())?,
        ));
        loaded.insert(path, m.clone());
        Ok(m)
    }
}
