//! `upscale` jobs: images upscaled as A1111's extras tab does it, with its built-in upscalers —
//! `Lanczos` and `Nearest` — or upscaler models (ESRGAN-family files in the registry's `ESRGAN`
//! folder, named by their file stem), by its size rules (multiples of 8, a second upscaler
//! blended in, "resize to" with an optional centred crop). Jobs with built-in upscalers only run
//! on the augmenter; jobs that name a model run on the sampler, where the engine is.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ArtifactRef;

/// The upscalers an `upscale` job knows (A1111's names); `None` leaves an image as it is.
pub const UPSCALERS: &[&str] = &["None", "Lanczos", "Nearest"];
/// Images one job may upscale.
pub const MAX_IMAGES: usize = 64;
/// The largest side an upscaled image may have.
pub const MAX_SIDE: u32 = 8192;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpscaleSpec {
    /// Artifact keys of the images (uploads), upscaled in order.
    pub images: Vec<String>,
    pub resize: UpscaleResize,
    /// `Lanczos`, `Nearest`, `None`, or an upscaler model's name.
    pub upscaler: String,
    /// A second upscaler blended over the first at `upscaler_2_visibility`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upscaler_2: Option<String>,
    #[serde(default)]
    pub upscaler_2_visibility: f32,
}

/// How big: by a factor, or to a size (the smallest factor covering it, then optionally cropped
/// to it around the centre).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
pub enum UpscaleResize {
    By { scale: f32 },
    To { width: u32, height: u32, crop: bool },
}

impl UpscaleSpec {
    /// Whether an upscaler it uses is a model (not built in).
    pub fn uses_models(&self) -> bool {
        std::iter::once(&self.upscaler)
            .chain(self.upscaler_2.iter())
            .any(|u| !UPSCALERS.contains(&u.as_str()))
    }

    /// Why this spec cannot run, if it cannot (checked before anything is queued).
    pub fn check(&self) -> Result<(), String> {
        match self.problem() {
            Some(p) => Err(p),
            None => Ok(()),
        }
    }

    fn problem(&self) -> Option<String> {
        if self.images.is_empty() || self.images.len() > MAX_IMAGES {
            return Some(format!(
                "images: 1 to {MAX_IMAGES} images, not {}",
                self.images.len()
            ));
        }
        if let Some((k, e)) = self
            .images
            .iter()
            .find_map(|k| crate::ArtifactKey::parse(k).err().map(|e| (k, e)))
        {
            return Some(format!("images: {k:?} is not an artifact key: {e}"));
        }
        for u in std::iter::once(&self.upscaler).chain(self.upscaler_2.iter()) {
            let model_name = !u.is_empty()
                && u.len() <= 200
                && !u.starts_with('.')
                && !u.contains(['/', '\\', '\0']);
            if !UPSCALERS.contains(&u.as_str()) && !model_name {
                return Some(format!(
                    "upscaler {u:?} is neither one of {} nor an upscaler model's name",
                    UPSCALERS.join(", ")
                ));
            }
        }
        if !(0.0..=1.0).contains(&self.upscaler_2_visibility) {
            return Some("upscaler_2_visibility must be within 0..=1".into());
        }
        match self.resize {
            UpscaleResize::By { scale } if !(scale > 0.0 && scale <= 8.0) => {
                Some(format!("scale must be within (0, 8], not {scale}"))
            }
            UpscaleResize::To { width, height, .. }
                if width == 0 || height == 0 || width > MAX_SIDE || height > MAX_SIDE =>
            {
                Some(format!("width and height must be 1..={MAX_SIDE}"))
            }
            _ => None,
        }
    }
}

/// What an `upscale` job made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct UpscaleOutput {
    /// PNGs, one per input image, in order.
    pub images: Vec<ArtifactRef>,
    /// A1111's postprocessing infotext of the first image (e.g. `Postprocess upscale by: 2,
    /// Postprocess upscaler: Lanczos`).
    pub info: String,
}
