//! A1111's extras upscale ([`rules`]), model upscalers run on its tile grid ([`grid`]), and the
//! `upscale` job ([`run`]): the augmenter runs it with the built-in upscalers, the sampler with
//! upscaler models too (where the engine is).

pub mod grid;
pub mod rules;

use std::sync::Arc;

use atelier_contracts::upscale::{UpscaleOutput, UpscaleSpec};
use atelier_contracts::{ArtifactKey, JobOutput};
use atelier_kit::store::StoreError;
use atelier_kit::{JobCtx, JobError};
use image::RgbImage;

pub use rules::upscale;

/// An upscaler model: one pass over an image (or a tile) at its own scale.
pub trait Model: Send + Sync {
    fn scale(&self) -> u32;
    fn run(&self, img: &RgbImage) -> Result<RgbImage, String>;
}

/// Upscaler models by name.
pub trait Models: Send + Sync {
    fn get(&self, name: &str) -> Result<Arc<dyn Model>, String>;
}

/// No models: only the built-in upscalers.
pub struct NoModels;

impl Models for NoModels {
    fn get(&self, name: &str) -> Result<Arc<dyn Model>, String> {
        Err(format!(
            "upscaler {name:?} is not built in, and this worker has no upscaler models"
        ))
    }
}

/// An `upscale` job: each image fetched, decoded under the decode budget, upscaled and stored as
/// a PNG (content-addressed, so a redelivery stores nothing new).
pub async fn run(
    ctx: &JobCtx,
    spec: UpscaleSpec,
    models: Arc<dyn Models>,
) -> Result<JobOutput, JobError> {
    spec.check()
        .map_err(|e| JobError::permanent("invalid_job", e))?;
    let spec = Arc::new(spec);
    let mut images = Vec::with_capacity(spec.images.len());
    let mut info = None;
    for (i, key) in spec.images.iter().enumerate() {
        if ctx.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        let parsed = ArtifactKey::parse(key)
            .map_err(|e| JobError::permanent("bad_artifact_key", format!("{key:?}: {e}")))?;
        let bytes = match ctx.store().get_bytes(&parsed).await {
            Ok(b) => b,
            Err(StoreError::NotFound(_)) => {
                return Err(JobError::permanent(
                    "artifact_not_found",
                    format!("images[{i}] {key} is not in the store"),
                ))
            }
            Err(e) => return Err(e.into()),
        };
        let (s, m) = (spec.clone(), models.clone());
        let made = tokio::task::spawn_blocking(move || {
            let img = atelier_decode::decode(&bytes, &atelier_decode::Limits::default())
                .map_err(|e| format!("the image does not decode: {e}"))?
                .to_rgb8();
            let (out, info) = upscale(&img, &s, m.as_ref())?;
            Ok::<_, String>((png(&out)?, info))
        })
        .await
        .map_err(|e| JobError::retryable("panicked", e.to_string()))?
        .map_err(|e| JobError::permanent("bad_image", format!("images[{i}]: {e}")))?;
        let (art, _) = ctx.store().put_bytes(made.0.into(), "image/png").await?;
        info.get_or_insert(made.1);
        images.push(art);
        ctx.progress((i + 1) as f32 / spec.images.len() as f32, None)
            .await;
    }
    Ok(JobOutput::Upscaled(UpscaleOutput {
        images,
        info: info.unwrap_or_default(),
    }))
}

fn png(img: &RgbImage) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(out)
}
