//! Generation jobs on the diffusion engine, shared by the sampler service (txt2img) and the
//! inpainter service (img2img, inpaint): each runs a [`Generator`] on its own work queue, so GPU
//! workers for either scale on their own.
//!
//! Each job: validate, resolve the model in the [`Registry`] (kept in an LRU cache of loaded
//! models), apply any `<lora:name:weight>` of the prompt at run time, sample on a blocking thread
//! with a progress event per step and cancellation between steps, and store the PNGs (with A1111's
//! `parameters`) content-addressed. A job without a seed gets one derived from its id, so a
//! redelivered job repeats the same images.

pub mod batch;
mod cache;
pub mod detect;
mod flow;
mod relay;
pub mod resize;
pub mod upscalers;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use atelier_contracts::{
    GenerateKind, GenerateSpec, GeneratedImage, ImagesOutput, JobOutput, JobSpec, Service,
};
use atelier_diffusion::lora::{LoraFile, LoraMode};
use atelier_diffusion::noise::RandnSource;
use atelier_diffusion::pipeline::{
    ClipSkipConvention, Hires, HiresUpscaler, Init, NoiseOptions, PipelineError, Placement,
    Repaint, StableDiffusion, Txt2Img,
};
use atelier_diffusion::schedulers::SamplerKind;
use atelier_kit::{Handler, JobCtx, JobError};
use sha2::{Digest, Sha256};

pub use atelier_registry::Registry;
use atelier_registry::{check_name, store as store_models};

/// PNGs with their seeds, the parameters text, the model hash.
pub type Rendered = (Vec<(Vec<u8>, u64)>, String, String);

/// A LoRA to apply: its file, weight and name (for the parameters' hashes).
pub type Lora = (PathBuf, f64, String);

/// Turns a job's mask and its spec (blur, inversion, fill, "only masked") into the engine's
/// repaint hooks: the inpainter's masks, handed to its generator with [`Generator::with_masks`].
pub type Masks = fn(image::GrayImage, &GenerateSpec) -> Arc<dyn Repaint>;

/// Runs generation jobs for one service (sampler or inpainter).
#[derive(Clone)]
pub struct Generator {
    service: Service,
    registry: Registry,
    placement: Placement,
    /// Loaded models of every family, least recently used first.
    cache: Arc<Mutex<Vec<cache::Cached>>>,
    cache_size: usize,
    /// Upscaler models for `upscale` jobs (the sampler's).
    upscalers: Arc<upscalers::Upscalers>,
    /// Bytes of weights the cache may hold (0: no byte limit); the model in use always stays.
    cache_bytes: u64,
    /// Groups compatible txt2img jobs into shared UNet batches (off with a zero window).
    batcher: Arc<batch::Batcher>,
    /// How masks repaint (the inpainter's); without them inpaint jobs are refused.
    masks: Option<Masks>,
}

impl Generator {
    pub fn new(
        service: Service,
        registry: Registry,
        placement: Placement,
        cache_size: usize,
    ) -> Self {
        Self {
            service,
            upscalers: Arc::new(upscalers::Upscalers::new(
                registry.clone(),
                placement.device,
            )),
            registry,
            placement,
            cache: Arc::default(),
            cache_size: cache_size.max(1),
            cache_bytes: 0,
            batcher: Arc::new(batch::Batcher::new(std::time::Duration::ZERO, 1)),
            masks: None,
        }
    }

    /// Run masked jobs with `masks` (the inpainter's).
    pub fn with_masks(mut self, masks: Masks) -> Self {
        self.masks = Some(masks);
        self
    }

    /// Stack compatible txt2img jobs arriving within `window` of each other, at most `max` jobs
    /// per batch (a zero window or `max` 1: every job alone).
    pub fn with_batching(mut self, window: std::time::Duration, max: usize) -> Self {
        self.batcher = Arc::new(batch::Batcher::new(window, max));
        self
    }

    /// Keep at most `bytes` of model weights loaded (least recently used evicted first).
    pub fn with_cache_budget(mut self, bytes: u64) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// One job on its own: sampling on a blocking thread, progress (and previews) relayed.
    async fn run_alone(
        &self,
        ctx: &JobCtx,
        (path, vae): (PathBuf, Option<PathBuf>),
        (embeddings, loras): (Vec<PathBuf>, Vec<Lora>),
        (init, hires): (Option<Init>, Option<Hires>),
        req: Txt2Img,
        preview_every: usize,
    ) -> Result<Rendered, JobError> {
        let this = self.clone();
        let cancel = ctx.cancellation().clone();
        let (reports, relay) = relay::channel();
        let steps = req.steps;
        let work = tokio::task::spawn_blocking(move || -> Result<Rendered, JobError> {
            let model = this.prepared(&path, vae.as_ref(), &embeddings, &loras)?;
            let on_step = |done: usize, total: usize| {
                reports.step(done, total);
                !cancel.is_cancelled()
            };
            let images = if let Some(hr) = &hires {
                model.txt2img_hires(&req, hr, on_step)
            } else if preview_every > 0 {
                let mut send = |step: usize, img: image::RgbImage| reports.preview(step, img);
                model.generate_with_previews(&req, init.as_ref(), on_step, preview_every, &mut send)
            } else {
                match &init {
                    None => model.txt2img(&req, on_step),
                    Some(init) => model.img2img(&req, init, on_step),
                }
            }
            .map_err(pipeline_err)?;
            rendered(&images, &model.hash)
        });
        relay.run(ctx, work, steps).await
    }

    /// The model at `path` with the job's embeddings and LoRAs (applied at run time).
    fn prepared(
        &self,
        path: &Path,
        vae: Option<&PathBuf>,
        embeddings: &[PathBuf],
        loras: &[Lora],
    ) -> Result<StableDiffusion, JobError> {
        let base = self.model(path, vae)?;
        let mut model = (*base).clone();
        if !embeddings.is_empty() {
            let loaded = embeddings
                .iter()
                .map(|p| atelier_diffusion::conditioning::Embedding::load(p))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| JobError::permanent("bad_embedding", e))?;
            model = model.with_embeddings(loaded);
        }
        for (p, w, name) in loras {
            let bytes = std::fs::read(p)
                .map_err(|e| JobError::retryable("local_disk", format!("{}: {e}", p.display())))?;
            let file = LoraFile::from_bytes(&bytes)
                .map_err(|e| JobError::permanent("bad_lora", format!("{}: {e}", p.display())))?;
            let (hash, _) = atelier_diffusion::lora::file_hashes(&bytes);
            model = model
                .with_lora(&file, *w, LoraMode::Runtime)
                .map_err(pipeline_err)?
                .0
                .with_lora_hash(name, &hash[..12]);
        }
        Ok(model)
    }

    async fn image(ctx: &JobCtx, key: &str, what: &str) -> Result<image::DynamicImage, JobError> {
        let k = atelier_contracts::ArtifactKey::parse(key)
            .map_err(|e| JobError::permanent("bad_artifact_key", format!("{what} {key:?}: {e}")))?;
        let bytes = ctx.store().get_bytes(&k).await?;
        atelier_decode::decode_async(bytes, atelier_decode::Limits::default())
            .await
            .map(atelier_decode::Decoded::into_image)
            .map_err(|e| JobError::permanent(e.code(), format!("{what} {key}: {e}")))
    }
}

/// Where checkpoints from the object store are copied: `ATELIER_STORE_MODELS_DIR`, else
/// `atelier-models` in the temporary folder.
pub fn model_cache() -> PathBuf {
    std::env::var_os("ATELIER_STORE_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("atelier-models"))
}

/// Checkpoint `name` from the object store (`models/NAME.safetensors` or `models/NAME/`),
/// copied into the local cache; `local` is why the registry folder did not have it.
async fn store_checkpoint(ctx: &JobCtx, name: &str, local: &str) -> Result<PathBuf, JobError> {
    use store_models::FetchError;
    match store_models::fetch_checkpoint(ctx.store(), name, &model_cache()).await {
        Ok(Some(p)) => Ok(p),
        Ok(None) => Err(JobError::permanent(
            "unknown_model",
            format!("{local}; nor models/{name}.safetensors or models/{name}/ in the object store"),
        )),
        Err(FetchError::Store(e)) => Err(e.into()),
        Err(FetchError::Disk(m)) => Err(JobError::retryable("local_disk", m)),
        Err(e) => Err(JobError::permanent("unknown_model", e.to_string())),
    }
}

/// A LoRA the trainer published to the object store (`loras/NAME.safetensors`), copied to a
/// local file named by its content hash (so a re-published name is never served stale).
async fn store_lora(ctx: &JobCtx, name: &str) -> Result<Option<PathBuf>, JobError> {
    check_name(name).map_err(|e| JobError::permanent("unknown_lora", e))?;
    let Ok(key) = atelier_contracts::ArtifactKey::parse(&format!("loras/{name}.safetensors"))
    else {
        return Ok(None);
    };
    let bytes = match ctx.store().get_bytes(&key).await {
        Ok(b) => b,
        Err(atelier_kit::store::StoreError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let dir = std::env::temp_dir().join("atelier-loras");
    let path = dir.join(format!("{}.safetensors", hex_sha256(&bytes)));
    if !path.exists() {
        let io = |e: std::io::Error| {
            JobError::retryable("local_disk", format!("{}: {e}", dir.display()))
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, &bytes).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
    }
    Ok(Some(path))
}

/// Textual-inversion embeddings under `embeddings/` in the object store whose name occurs in
/// `text`, fetched into a local cache (by content, under their own file name, which is the
/// token name).
async fn store_embeddings(ctx: &JobCtx, text: &str) -> Result<Vec<PathBuf>, JobError> {
    let listed = match ctx.store().list("embeddings").await {
        Ok(l) => l,
        Err(e) if e.is_transient() => return Err(e.into()),
        // A store without the prefix (or that cannot list it) has no embeddings.
        Err(_) => return Ok(Vec::new()),
    };
    let mut out = Vec::new();
    for meta in listed {
        let file = meta.location.filename().unwrap_or_default().to_owned();
        let Some((stem, ext)) = file.rsplit_once('.') else {
            continue;
        };
        if !(ext == "safetensors" || ext == "pt")
            || check_name(stem).is_err()
            || !text.contains(stem)
        {
            continue;
        }
        let Ok(key) = atelier_contracts::ArtifactKey::parse(meta.location.as_ref()) else {
            continue;
        };
        let bytes = ctx.store().get_bytes(&key).await?;
        let dir = std::env::temp_dir()
            .join("atelier-embeddings")
            .join(&hex_sha256(&bytes)[..16]);
        let path = dir.join(&file);
        if !path.exists() {
            let io = |e: std::io::Error| {
                JobError::retryable("local_disk", format!("{}: {e}", dir.display()))
            };
            std::fs::create_dir_all(&dir).map_err(io)?;
            let tmp = dir.join(format!(".{file}.tmp{}", std::process::id()));
            std::fs::write(&tmp, &bytes).map_err(io)?;
            std::fs::rename(&tmp, &path).map_err(io)?;
        }
        out.push(path);
    }
    out.sort();
    Ok(out)
}

fn hex_sha256(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The images' PNGs with their seeds, the first one's parameters text, the model hash.
fn rendered(
    images: &[atelier_diffusion::pipeline::Generated],
    hash: &str,
) -> Result<Rendered, JobError> {
    let params = images
        .first()
        .map(|i| i.parameters.clone())
        .unwrap_or_default();
    let pngs = images
        .iter()
        .map(|i| i.png().map(|b| (b, i.seed)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(pipeline_err)?;
    Ok((pngs, params, hash.to_string()))
}

/// Stores each PNG content-addressed.
async fn store_images(
    ctx: &JobCtx,
    pngs: Vec<(Vec<u8>, u64)>,
) -> Result<Vec<GeneratedImage>, JobError> {
    let mut images = Vec::with_capacity(pngs.len());
    for (png, seed) in pngs {
        let (image, _) = ctx.store().put_bytes(png.into(), "image/png").await?;
        images.push(GeneratedImage { image, seed });
    }
    Ok(images)
}

/// The engine's noise source for a spec's `randn_source`.
fn randn_source(s: atelier_contracts::generate::RandnSource) -> RandnSource {
    match s {
        atelier_contracts::generate::RandnSource::Cpu => RandnSource::TorchCpu,
        atelier_contracts::generate::RandnSource::Nv => RandnSource::Nv,
    }
}

fn seed_for(ctx: &JobCtx) -> u64 {
    let h = Sha256::digest(ctx.id.to_string().as_bytes());
    u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as u64
}

fn pipeline_err(e: PipelineError) -> JobError {
    match e {
        PipelineError::BadRequest(m) => JobError::permanent("invalid_job", m),
        PipelineError::Model { .. } => JobError::permanent("model_load_failed", e.to_string()),
        PipelineError::Cancelled => JobError::permanent("cancelled", "cancelled between steps"),
        PipelineError::Compute(m) => JobError::retryable("compute_failed", m),
    }
}

impl Handler for Generator {
    fn service(&self) -> Service {
        self.service
    }

    async fn handle(&self, ctx: &JobCtx, spec: JobSpec) -> Result<JobOutput, JobError> {
        let (kind, g): (GenerateKind, GenerateSpec) = match (self.service, spec) {
            (Service::Sampler, JobSpec::Upscale(u)) => {
                return atelier_upscale::run(ctx, u, self.upscalers.clone()).await
            }
            (Service::Sampler, JobSpec::Txt2img(g)) => (GenerateKind::Txt2Img, g),
            (Service::Inpainter, JobSpec::Img2img(g)) => (GenerateKind::Img2Img, g),
            (Service::Inpainter, JobSpec::Inpaint(g)) => (GenerateKind::Inpaint, g),
            (s, other) => {
                return Err(JobError::permanent(
                    "wrong_service",
                    format!(
                        "the {} service does not run {} jobs",
                        s.name(),
                        other.kind()
                    ),
                ))
            }
        };
        g.check(kind)
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        let path = match self.registry.checkpoint(&g.model) {
            Ok(p) => p,
            Err(local) => store_checkpoint(ctx, &g.model, &local).await?,
        };
        let (_, tags) = atelier_diffusion::prompt::extract_extra_networks(&g.prompt)
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        let mut loras = Vec::new();
        for t in tags.iter().filter(|t| t.kind == "lora" || t.kind == "lyco") {
            let p = match self.registry.lora(&t.name) {
                Ok(p) => p,
                Err(local) => match store_lora(ctx, &t.name).await? {
                    Some(p) => p,
                    None => {
                        return Err(JobError::permanent(
                            "unknown_lora",
                            format!("{local}, nor loras/{}.safetensors in the object store (where the trainer publishes)", t.name),
                        ))
                    }
                },
            };
            loras.push((p, t.weight, t.name.clone()));
        }
        if let Some(family) = atelier_diffusion::flow::is_flow_folder(&path) {
            return self.run_flow(ctx, (kind, family), &g, path, loras).await;
        }
        let sampler = SamplerKind::parse(&g.sampler).ok_or_else(|| {
            JobError::permanent(
                "unknown_sampler",
                format!("unknown sampler {:?}", g.sampler),
            )
        })?;
        let vae = match &g.vae {
            None => None,
            Some(name) => Some(
                self.registry
                    .vae(name)
                    .map_err(|e| JobError::permanent("unknown_vae", e))?,
            ),
        };
        let text = format!("{} {}", g.prompt, g.negative_prompt);
        let mut embeddings = self.registry.embeddings_in(&text);
        // Embeddings published to the object store (`embeddings/NAME.safetensors|.pt`) count
        // too; a local file of the same name wins.
        for p in store_embeddings(ctx, &text).await? {
            if !embeddings.iter().any(|l| l.file_name() == p.file_name()) {
                embeddings.push(p);
            }
        }
        let init = match &g.init_image {
            None => None,
            Some(key) => {
                let (w, h) = (g.width, g.height);
                // Mode 0 is the engine's own resize; "only masked" crops the image as given.
                let only_masked = g.inpaint_only_masked && g.mask.is_some();
                let latent_resize = g.resize_mode
                    == atelier_contracts::generate::ResizeMode::LatentUpscale
                    && !only_masked;
                let reshape = !(g.resize_mode.is_default() || only_masked || latent_resize);
                let image = Self::image(ctx, key, "init_image").await?.to_rgb8();
                let image = match reshape {
                    true => resize::resize(&image, w, h, g.resize_mode),
                    false => image,
                };
                let repaint = match (&g.mask, self.masks) {
                    (None, _) => None,
                    (Some(mk), Some(masks)) => {
                        let mask = Self::image(ctx, mk, "mask").await?.to_luma8();
                        let mask = match reshape {
                            true => resize::resize(&mask, w, h, g.resize_mode),
                            false => mask,
                        };
                        Some(masks(mask, &g))
                    }
                    (Some(_), None) => {
                        return Err(JobError::permanent(
                            "invalid_job",
                            "masks are the inpainter's work: send the job to atelier.v1.inpainter.request",
                        ))
                    }
                };
                let init = Init {
                    image,
                    strength: g.strength,
                    repaint,
                    latents: None,
                    latent_resize,
                };
                init.validate()
                    .map_err(|e| JobError::permanent("invalid_job", e))?;
                Some(init)
            }
        };
        let req = Txt2Img {
            prompt: g.prompt.clone(),
            negative_prompt: g.negative_prompt.clone(),
            steps: g.steps as usize,
            cfg_scale: g.cfg_scale,
            seed: g.seed.unwrap_or_else(|| seed_for(ctx)),
            width: g.width as usize,
            height: g.height as usize,
            batch_size: g.batch_size as usize,
            sampler,
            clip_skip: g.clip_skip as usize,
            // /v1 and the A1111 routes count clip skip as A1111 does (see GenerateSpec).
            clip_skip_convention: ClipSkipConvention::A1111,
            noise: NoiseOptions {
                source: randn_source(g.randn_source),
                subseed: g.subseed,
                subseed_strength: g.subseed_strength,
                eta_noise_seed_delta: g.eta_noise_seed_delta,
            },
        };
        req.validate()
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        ctx.progress(0.0, Some(format!("loading {}", g.model)))
            .await;

        let preview_every = g.preview_every as usize;
        let hires = match &g.hires {
            None => None,
            Some(h) => {
                let (width, height) = h.size(g.width, g.height);
                let upscaler = HiresUpscaler::parse(&h.upscaler).ok_or_else(|| {
                    JobError::permanent(
                        "invalid_job",
                        format!("unknown hires upscaler {:?}", h.upscaler),
                    )
                })?;
                Some(Hires {
                    width: width as usize,
                    height: height as usize,
                    upscaler,
                    steps: h.steps as usize,
                    denoising_strength: h.denoising_strength,
                    prompt: h.prompt.clone(),
                    negative_prompt: h.negative_prompt.clone(),
                    label: h.label(),
                })
            }
        };
        let batchable = kind == GenerateKind::Txt2Img
            && init.is_none()
            && hires.is_none()
            && preview_every == 0
            && vae.is_none()
            && self.batcher.enabled();
        let (pngs, parameters, model_hash, batch_jobs) = if batchable {
            let key = batch::GroupKey::new(&path, &loras, &embeddings, &req);
            let (r, n) = self.batcher.run(self, ctx, key, req).await?;
            (r.0, r.1, r.2, n)
        } else {
            let r = self
                .run_alone(
                    ctx,
                    (path, vae),
                    (embeddings, loras),
                    (init, hires),
                    req,
                    preview_every,
                )
                .await?;
            (r.0, r.1, r.2, 1)
        };
        let images = store_images(ctx, pngs).await?;
        Ok(JobOutput::Images(ImagesOutput {
            images,
            parameters,
            model_hash,
            batch_jobs: (batch_jobs > 1).then_some(batch_jobs as u32),
        }))
    }
}

/// The sampler/inpainter process's own options.
#[derive(Debug, Clone, clap::Args)]
pub struct GeneratorArgs {
    #[command(flatten)]
    pub model: atelier_registry::ModelArgs,
    /// Loaded models kept in memory.
    #[arg(long, env = "ATELIER_MODEL_CACHE", default_value_t = 2)]
    pub model_cache: usize,
    /// Memory budget of the model cache in MiB of weights (0: only --model-cache counts).
    #[arg(long, env = "ATELIER_MODEL_CACHE_MB", default_value_t = 0)]
    pub model_cache_mb: u64,
    /// Stack compatible txt2img jobs (same model, LoRAs, size, steps, sampler, CFG, clip skip)
    /// that arrive within this many milliseconds into one UNet batch (0: off). A batched job's
    /// PNG may differ from its solo run by float rounding; leave it off where byte-identical
    /// reruns matter.
    #[arg(long, env = "ATELIER_BATCH_WINDOW_MS", default_value_t = 0)]
    pub batch_window_ms: u64,
    /// Most jobs in one batch (the worker's --concurrency bounds it too).
    #[arg(long, env = "ATELIER_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
}

impl Default for GeneratorArgs {
    fn default() -> Self {
        Self {
            model: Default::default(),
            model_cache: 2,
            model_cache_mb: 0,
            batch_window_ms: 0,
            max_batch: 8,
        }
    }
}

impl GeneratorArgs {
    /// The generator for `service`; an unusable `--device` is an error naming the fix.
    pub fn generator(&self, service: Service) -> anyhow::Result<Generator> {
        let placement = Placement::named(&self.model.device)?;
        Ok(Generator::new(
            service,
            Registry::new(&self.model.models),
            placement,
            self.model_cache,
        )
        .with_cache_budget(self.model_cache_mb * 1024 * 1024)
        .with_batching(
            std::time::Duration::from_millis(self.batch_window_ms),
            self.max_batch,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_within_its_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        for (name, seed) in [("a", 1), ("b", 2), ("c", 3)] {
            atelier_diffusion::pipeline::make_tiny(
                &dir.path().join(name),
                atelier_diffusion::pipeline::Family::Sd1,
                seed,
            )
            .unwrap();
        }
        let reg = Registry::new(dir.path());
        let g = Generator::new(Service::Sampler, reg.clone(), Placement::CPU, 8);
        let a = g.model(&reg.checkpoint("a").unwrap(), None).unwrap();
        let one = a.weight_bytes();
        assert!(one > 10_000, "a tiny model weighs {one} bytes");
        // Room for two: loading a third evicts the least recently used.
        let g = g.with_cache_budget(2 * one + one / 2);
        g.model(&reg.checkpoint("b").unwrap(), None).unwrap();
        g.model(&reg.checkpoint("a").unwrap(), None).unwrap(); // a is now the most recent
        g.model(&reg.checkpoint("c").unwrap(), None).unwrap();
        let names: Vec<String> = g
            .cached()
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["a", "c"]);
        assert!(g.cached().iter().map(|(_, b)| b).sum::<u64>() <= 2 * one + one / 2);
        // A budget below one model still keeps the one in use.
        let small = g.with_cache_budget(1);
        small.model(&reg.checkpoint("b").unwrap(), None).unwrap();
        assert_eq!(small.cached().len(), 1);
    }
}
