//! The captioner service: captions a dataset's images through an OpenAI-compatible vision
//! endpoint ([`openai`]) and stores one [`CaptionRecord`] per (image, backend, model, prompt) in
//! the `atelier_captions` KV bucket.
//!
//! Consumes `caption` jobs on `atelier.v1.captioner.request`; reads image records
//! (`atelier_images`) and image bytes (the store); writes captions. Idempotent: an image that
//! already has a caption from the same source is skipped, so a re-run or a redelivered job costs
//! nothing for the work already done, and a job that failed part-way resumes where it stopped.
//! Images the endpoint still fails on after retries are listed in the output, not lost; a job
//! whose every request failed is retried as a whole (the endpoint is down).

mod batch;
pub mod blip;
pub mod run;
pub mod scene;
pub mod shared_budget;
pub mod spend;
pub mod vision_server;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use atelier_contracts::dataset::{
    CaptionBackend, CaptionFailure, CaptionOutput, CaptionRecord, CaptionSource, TokenUsage,
    DEFAULT_SHARD_SIZE, MAX_LISTED_FAILURES, SHAREGPT4V_PROMPT,
};
use atelier_contracts::images::ImageRecord;
use atelier_contracts::{ArtifactKey, JobOutput, JobSpec, Service, SCHEMA_VERSION};
use atelier_kit::kv::Kv;
use atelier_kit::{Handler, JobCtx, JobError};
use futures::StreamExt as _;
use sha2::{Digest, Sha256};

pub use atelier_openai as openai;
pub use atelier_openai::{Client, OpenAiArgs};

/// The 16-hex-digit id of a (backend, model, prompt) triple: part of the caption's KV key.
pub fn source_id(source: &CaptionSource) -> String {
    let mut h = Sha256::new();
    for part in [&source.backend, &source.model, &source.prompt] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    hex::encode(&h.finalize()[..8])
}

/// The images of `dataset`, sorted by sha256; `unknown_dataset` when it has none.
pub async fn dataset_images(
    images: &Kv<ImageRecord>,
    dataset: &str,
) -> Result<Vec<ImageRecord>, JobError> {
    let all = images
        .of_dataset(dataset)
        .await
        .map_err(|e| JobError::retryable("kv_unavailable", format!("{e:#}")))?;
    if all.is_empty() {
        return Err(JobError::permanent(
            "unknown_dataset",
            format!(
                "dataset {dataset:?} has no images; add some with `atelier ingest DIR --dataset {dataset}`"
            ),
        ));
    }
    Ok(all)
}

/// A loaded BLIP model, by folder.
type LoadedBlip = Option<(std::path::PathBuf, Arc<std::sync::Mutex<blip::Blip>>)>;

/// Runs caption jobs; one per worker, sharing the endpoint's budgets across jobs.
#[derive(Clone)]
pub struct Captioner {
    client: Arc<Client>,
    /// Folder of BLIP model folders (`--blip-models`); the `blip` backend needs it.
    blip_dir: Option<std::path::PathBuf>,
    blip: Arc<tokio::sync::Mutex<LoadedBlip>>,
}

/// The backend a job runs with, resolved against the worker's configuration.
enum Backend {
    Openai {
        req: openai::Request,
        max_side: u32,
        /// Through the Batch API.
        batch: bool,
    },
    Blip {
        dir: std::path::PathBuf,
        prompt: String,
        max_tokens: usize,
        batch: usize,
    },
}

async fn put_caption(
    captions: &Kv<CaptionRecord>,
    key: &str,
    record: &CaptionRecord,
) -> Result<(), JobError> {
    captions
        .put(key, record)
        .await
        .map(|_| ())
        .map_err(|e| JobError::retryable("kv_unavailable", e.to_string()))
}

/// What every image of one job shares.
struct Batch {
    captions: Kv<CaptionRecord>,
    source: CaptionSource,
    sid: String,
    req: openai::Request,
    max_side: u32,
    /// The run's shared spend, when it is tracked (a shard, or a job with a cap).
    spend: Option<spend::Spend>,
}

/// What a job's images came to.
#[derive(Default)]
struct Tally {
    captioned: u64,
    already: u64,
    usage: TokenUsage,
    failed: Vec<CaptionFailure>,
    /// Why requests stopped: the run's spend cap.
    over_budget: Option<String>,
}

enum One {
    Done(TokenUsage),
    Already,
    Failed(CaptionFailure),
    /// Not sent: the run's spend cap is reached.
    OverBudget(String),
}

impl Captioner {
    pub fn new(args: OpenAiArgs) -> anyhow::Result<Self> {
        Ok(Self::with_client(Client::new(args)?))
    }

    /// A captioner calling the endpoint through `client` (its budgets, shared or not).
    pub fn with_client(client: Client) -> Self {
        Self {
            client: Arc::new(client),
            blip_dir: None,
            blip: Arc::default(),
        }
    }

    /// Serve the `blip` backend from the model folders in `dir`.
    pub fn with_blip_models(mut self, dir: Option<std::path::PathBuf>) -> Self {
        self.blip_dir = dir;
        self
    }

    /// The BLIP model in `dir`, loaded once and kept (one model per worker).
    async fn blip_model(
        &self,
        dir: &std::path::Path,
    ) -> Result<Arc<std::sync::Mutex<blip::Blip>>, JobError> {
        let mut slot = self.blip.lock().await;
        if let Some((p, m)) = slot.as_ref() {
            if p == dir {
                return Ok(m.clone());
            }
        }
        let d = dir.to_path_buf();
        let m =
            tokio::task::spawn_blocking(move || blip::Blip::load(&d, &candle_core::Device::Cpu))
                .await
                .map_err(|e| JobError::retryable("panicked", e.to_string()))?
                .map_err(|e| JobError::permanent("model_load_failed", e))?;
        let m = Arc::new(std::sync::Mutex::new(m));
        *slot = Some((dir.to_path_buf(), m.clone()));
        Ok(m)
    }

    /// Caption `usable` with BLIP: skip those already captioned, then batches through the model.
    #[allow(clippy::too_many_arguments)]
    async fn blip_images(
        &self,
        ctx: &JobCtx,
        captions: &Kv<CaptionRecord>,
        source: &CaptionSource,
        sid: &str,
        usable: Vec<ImageRecord>,
        (dir, prompt, max_tokens, batch): (std::path::PathBuf, String, usize, usize),
    ) -> Result<Tally, JobError> {
        let mut tally = Tally::default();
        let mut pending = Vec::new();
        let keys: Vec<String> = usable
            .iter()
            .map(|rec| format!("{}.{sid}", rec.sha256))
            .collect();
        let have: Vec<Option<CaptionRecord>> = captions
            .get_many(&keys)
            .await
            .map_err(|e| JobError::retryable("kv_unavailable", format!("{e:#}")))?;
        for (rec, have) in usable.into_iter().zip(have) {
            match have {
                Some(_) => tally.already += 1,
                None => pending.push(rec),
            }
        }
        if pending.is_empty() {
            return Ok(tally);
        }
        let model = self.blip_model(&dir).await?;
        let n = pending.len();
        for (bi, chunk) in pending.chunks(batch.max(1)).enumerate() {
            if ctx.is_cancelled() {
                return Err(JobError::permanent("cancelled", "cancelled"));
            }
            let mut images = Vec::with_capacity(chunk.len());
            let mut recs = Vec::with_capacity(chunk.len());
            for rec in chunk {
                let decoded = match ArtifactKey::parse(&rec.key) {
                    Err(e) => Err(format!("image key {:?}: {e}", rec.key)),
                    Ok(k) => match ctx.store().get_bytes(&k).await {
                        Ok(b) => atelier_decode::decode_async(b, atelier_decode::Limits::default())
                            .await
                            .map(atelier_decode::Decoded::into_image)
                            .map_err(|e| format!("decoding the image: {e}")),
                        Err(e) if e.is_transient() => return Err(e.into()),
                        Err(e) => Err(format!("reading {}: {e}", rec.key)),
                    },
                };
                match decoded {
                    Ok(img) => {
                        images.push(img);
                        recs.push(rec);
                    }
                    Err(error) => tally.failed.push(CaptionFailure {
                        image_sha256: rec.sha256.clone(),
                        error,
                    }),
                }
            }
            let (m, p) = (model.clone(), prompt.clone());
            let generated = tokio::task::spawn_blocking(move || {
                m.lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .caption(&images, &p, max_tokens)
            })
            .await
            .map_err(|e| JobError::retryable("panicked", e.to_string()))?
            .map_err(|e| JobError::retryable("compute_failed", e))?;
            for (rec, g) in recs.into_iter().zip(generated) {
                let record = CaptionRecord {
                    schema_version: SCHEMA_VERSION,
                    image_sha256: rec.sha256.clone(),
                    source_id: sid.to_owned(),
                    source: source.clone(),
                    caption: g.text,
                    finish_reason: Some(g.finish_reason.to_string()),
                    usage: TokenUsage {
                        prompt_tokens: 0,
                        completion_tokens: g.tokens,
                    },
                    job: ctx.id,
                    created_at: chrono::Utc::now(),
                };
                put_caption(captions, &format!("{}.{sid}", rec.sha256), &record).await?;
                tally.captioned += 1;
                tally.usage.add(record.usage);
            }
            let k = ((bi + 1) * batch).min(n);
            ctx.progress(k as f32 / n as f32, Some(format!("{k} of {n} images")))
                .await;
        }
        Ok(tally)
    }

    async fn one(&self, ctx: &JobCtx, job: &Batch, rec: &ImageRecord) -> Result<One, JobError> {
        let Batch {
            captions,
            sid,
            req,
            max_side,
            spend,
            ..
        } = job;
        let max_side = *max_side;
        let key = format!("{}.{sid}", rec.sha256);
        let fail = |error: String| {
            Ok(One::Failed(CaptionFailure {
                image_sha256: rec.sha256.clone(),
                error,
            }))
        };
        match captions.entry(&key).await {
            Ok(Some(_)) => return Ok(One::Already),
            Ok(None) => {}
            Err(e) => return Err(JobError::retryable("kv_unavailable", e.to_string())),
        }
        if ctx.is_cancelled() {
            return Err(JobError::permanent("cancelled", "cancelled"));
        }
        if let Some(s) = spend {
            if let Some(why) = s.exhausted().await? {
                return Ok(One::OverBudget(why));
            }
        }
        let jpeg = match prepared_jpeg(ctx, rec, max_side).await? {
            Ok(j) => j,
            Err(e) => return fail(e),
        };
        let c = match self.client.caption(&jpeg, req).await {
            Ok(c) => c,
            Err(e) => return fail(e.to_string()),
        };
        let usage = c.usage;
        store_caption(ctx, job, &rec.sha256, c).await?;
        Ok(One::Done(usage))
    }
}

/// An image as the endpoint gets it: decoded under the limits, downscaled to `max_side`, JPEG.
/// The inner error says why this image cannot be sent (the job goes on without it).
async fn prepared_jpeg(
    ctx: &JobCtx,
    rec: &ImageRecord,
    max_side: u32,
) -> Result<Result<Vec<u8>, String>, JobError> {
    let k = match ArtifactKey::parse(&rec.key) {
        Ok(k) => k,
        Err(e) => return Ok(Err(format!("image key {:?}: {e}", rec.key))),
    };
    let bytes = match ctx.store().get_bytes(&k).await {
        Ok(b) => b,
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => return Ok(Err(format!("reading {}: {e}", rec.key))),
    };
    let jpeg = tokio::task::spawn_blocking(move || {
        let img = atelier_decode::decode(&bytes, &atelier_decode::Limits::default())
            .map_err(|e| e.to_string())?;
        openai::prepare_image(&img, max_side)
    })
    .await
    .map_err(|e| JobError::retryable("panicked", e.to_string()))?;
    Ok(jpeg.map_err(|e| format!("decoding the image: {e}")))
}

/// Stores one caption and adds its cost to the run's spend.
async fn store_caption(
    ctx: &JobCtx,
    job: &Batch,
    sha256: &str,
    c: openai::Caption,
) -> Result<(), JobError> {
    let record = CaptionRecord {
        schema_version: SCHEMA_VERSION,
        image_sha256: sha256.to_owned(),
        source_id: job.sid.clone(),
        source: job.source.clone(),
        caption: c.text,
        finish_reason: c.finish_reason,
        usage: c.usage,
        job: ctx.id,
        created_at: chrono::Utc::now(),
    };
    put_caption(&job.captions, &format!("{sha256}.{}", job.sid), &record).await?;
    if let Some(s) = &job.spend {
        s.add(c.usage).await?;
    }
    Ok(())
}

impl Handler for Captioner {
    fn service(&self) -> Service {
        Service::Captioner
    }

    async fn handle(&self, ctx: &JobCtx, spec: JobSpec) -> Result<JobOutput, JobError> {
        let spec = match spec {
            JobSpec::Caption(spec) => spec,
            JobSpec::Interrogate(spec) => return self.interrogate(ctx, spec).await,
            other => {
                return Err(JobError::permanent(
                    "wrong_service",
                    format!("the captioner does not run {} jobs", other.kind()),
                ))
            }
        };
        spec.check()
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        let (source, backend) = self.resolve(spec.backend.clone())?;
        let sid = source_id(&source);
        let records = selected_images(ctx, &spec.dataset, &spec.images).await?;
        let total = records.len() as u64;
        let (usable, unusable): (Vec<_>, Vec<_>) = records
            .into_iter()
            .partition(|r| r.flag.is_none() && r.format.is_some());
        let out = CaptionOutput {
            dataset: spec.dataset.clone(),
            source_id: sid.clone(),
            source: source.clone(),
            images: total,
            captioned: 0,
            already_captioned: 0,
            unusable: unusable.len() as u64,
            failed: Vec::new(),
            usage: TokenUsage::default(),
            failed_total: 0,
            cost_usd: None,
            shards: Vec::new(),
            failed_shards: Vec::new(),
        };
        let price = match &backend {
            // The Batch API costs half the online price.
            Backend::Openai { req, batch, .. } => {
                self.client
                    .price(&req.model)
                    .map(|p| if *batch { p.scaled(0.5) } else { p })
            }
            Backend::Blip { .. } => None,
        };
        if spec.spend_cap.is_some_and(|c| c.usd.is_some()) && price.is_none() {
            return Err(JobError::permanent(
                "invalid_job",
                format!("spend_cap.usd needs the price of model {:?}: set ATELIER_OPENAI_PRICES on the captioners (e.g. {}=2.50/10.00, US dollars per million prompt/completion tokens), or cap tokens instead", source.model, source.model),
            ));
        }
        let shard_size = spec.shard_size.unwrap_or(DEFAULT_SHARD_SIZE) as usize;
        let run_id = spec.shard.map_or(ctx.id, |s| s.run);
        let spend = spend::Spend::new(
            ctx.bucket(atelier_contracts::typed::SPEND).await?,
            run_id,
            spec.spend_cap,
            price,
        );
        if spec.shard.is_none() && usable.len() > shard_size {
            return run::run(ctx, &spec, &usable, shard_size, spend, out).await;
        }
        let tracked = spec.shard.is_some() || spec.spend_cap.is_some();
        let captions = ctx.bucket(atelier_contracts::typed::CAPTIONS).await?;
        let tally = match backend {
            Backend::Blip {
                dir,
                prompt,
                max_tokens,
                batch,
            } => {
                self.blip_images(
                    ctx,
                    &captions,
                    &source,
                    &sid,
                    usable,
                    (dir, prompt, max_tokens, batch),
                )
                .await?
            }
            Backend::Openai {
                req,
                max_side,
                batch: via_batch_api,
            } => {
                let batch = Batch {
                    captions,
                    source,
                    sid,
                    req,
                    max_side,
                    spend: tracked.then_some(spend),
                };
                if via_batch_api {
                    batch::caption(self, ctx, batch, usable).await?
                } else {
                    self.openai_images(ctx, batch, usable).await?
                }
            }
        };
        finish(ctx, out, tally, price)
    }
}

/// The images a caption job covers: the dataset's, or the `wanted` ones of it.
async fn selected_images(
    ctx: &JobCtx,
    dataset: &str,
    wanted: &[String],
) -> Result<Vec<ImageRecord>, JobError> {
    let images_kv = ctx.bucket(atelier_contracts::typed::IMAGES).await?;
    let mut records = dataset_images(&images_kv, dataset).await?;
    if !wanted.is_empty() {
        let wanted: std::collections::HashSet<&String> = wanted.iter().collect();
        let missing: Vec<&&String> = wanted
            .iter()
            .filter(|w| !records.iter().any(|r| &&r.sha256 == *w))
            .take(20)
            .collect();
        if !missing.is_empty() {
            return Err(JobError::permanent(
                "unknown_image",
                format!("not in dataset {dataset:?}: {missing:?}"),
            ));
        }
        records.retain(|r| wanted.contains(&r.sha256));
    }
    Ok(records)
}

/// A job's output from what its images came to.
fn finish(
    ctx: &JobCtx,
    mut out: CaptionOutput,
    tally: Tally,
    price: Option<openai::Price>,
) -> Result<JobOutput, JobError> {
    out.captioned = tally.captioned;
    out.already_captioned = tally.already;
    out.usage = tally.usage;
    out.cost_usd = price.map(|p| p.cost(tally.usage));
    out.failed_total = tally.failed.len() as u64;
    out.failed = tally.failed;
    for f in &out.failed {
        tracing::warn!(job = %ctx.id, image = %f.image_sha256, error = %f.error, "caption failed");
    }
    if let Some(why) = tally.over_budget {
        return Err(JobError::permanent("budget_exhausted", why));
    }
    if out.captioned == 0 && !out.failed.is_empty() {
        return Err(JobError::retryable(
            "captioner_unavailable",
            format!(
                "every one of {} caption requests failed; first: {}",
                out.failed.len(),
                out.failed[0].error
            ),
        ));
    }
    out.failed
        .sort_by(|a, b| a.image_sha256.cmp(&b.image_sha256));
    out.failed.truncate(MAX_LISTED_FAILURES);
    tracing::info!(job = %ctx.id, dataset = %out.dataset, captioned = out.captioned,
        already = out.already_captioned, failed = out.failed_total,
        prompt_tokens = out.usage.prompt_tokens,
        completion_tokens = out.usage.completion_tokens, "captions done");
    Ok(JobOutput::Captions(out))
}

impl Captioner {
    /// The caption source and backend a job asks for, against this worker's configuration.
    fn resolve(&self, backend: CaptionBackend) -> Result<(CaptionSource, Backend), JobError> {
        Ok(match backend {
            CaptionBackend::Openai {
                model,
                prompt,
                max_tokens,
                temperature,
                image_max_side,
                batch,
            } => {
                if let Some(why) = self.client.unusable() {
                    return Err(JobError::permanent("captioner_not_configured", why));
                }
                let source = CaptionSource {
                    backend: "openai".into(),
                    model: model.unwrap_or_else(|| self.client.default_model().to_owned()),
                    prompt: prompt.unwrap_or_else(|| SHAREGPT4V_PROMPT.to_owned()),
                };
                let req = openai::Request {
                    model: source.model.clone(),
                    prompt: source.prompt.clone(),
                    max_tokens,
                    temperature,
                };
                (
                    source,
                    Backend::Openai {
                        req,
                        max_side: image_max_side,
                        batch,
                    },
                )
            }
            CaptionBackend::Blip {
                model,
                prompt,
                max_tokens,
                batch_size,
            } => {
                let Some(root) = &self.blip_dir else {
                    return Err(JobError::permanent(
                        "captioner_not_configured",
                        "this worker serves no BLIP models: start it with --blip-models DIR (ATELIER_BLIP_MODELS), a folder of BLIP model folders",
                    ));
                };
                let dir = root.join(&model);
                if !dir.join("config.json").is_file() {
                    return Err(JobError::permanent(
                        "unknown_model",
                        format!(
                            "no BLIP model {model:?} in {} (expected {}/config.json, model.safetensors, tokenizer.json)",
                            root.display(),
                            dir.display()
                        ),
                    ));
                }
                let source = CaptionSource {
                    backend: "blip".into(),
                    model,
                    prompt: prompt.clone().unwrap_or_default(),
                };
                (
                    source,
                    Backend::Blip {
                        dir,
                        prompt: prompt.unwrap_or_default(),
                        max_tokens: max_tokens as usize,
                        batch: batch_size as usize,
                    },
                )
            }
        })
    }
}

impl Captioner {
    /// One image's caption, answered and not stored (A1111's `interrogate`).
    async fn interrogate(
        &self,
        ctx: &JobCtx,
        spec: atelier_contracts::dataset::InterrogateSpec,
    ) -> Result<JobOutput, JobError> {
        spec.check()
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        let (source, backend) = self.resolve(spec.backend)?;
        let key = ArtifactKey::parse(&spec.image)
            .map_err(|e| JobError::permanent("bad_artifact_key", e.to_string()))?;
        let bytes = match ctx.store().get_bytes(&key).await {
            Ok(b) => b,
            Err(e) if e.is_transient() => return Err(e.into()),
            Err(e) => {
                return Err(JobError::permanent(
                    "artifact_not_found",
                    format!("{}: {e}", spec.image),
                ))
            }
        };
        let img = tokio::task::spawn_blocking(move || {
            atelier_decode::decode(&bytes, &atelier_decode::Limits::default())
                .map(|d| d.into_image())
                .map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| JobError::retryable("panicked", e.to_string()))?
        .map_err(|e| JobError::permanent("bad_image", format!("the image does not decode: {e}")))?;
        let (caption, usage) = match backend {
            Backend::Blip {
                dir,
                prompt,
                max_tokens,
                ..
            } => {
                let model = self.blip_model(&dir).await?;
                let made = tokio::task::spawn_blocking(move || {
                    let mut m = model.lock().unwrap_or_else(|p| p.into_inner());
                    m.caption(&[img], &prompt, max_tokens)
                })
                .await
                .map_err(|e| JobError::retryable("panicked", e.to_string()))?
                .map_err(|e| JobError::permanent("caption_failed", e))?;
                let text = made.into_iter().next().map(|g| g.text).unwrap_or_default();
                (text, TokenUsage::default())
            }
            Backend::Openai { req, max_side, .. } => {
                let jpeg =
                    tokio::task::spawn_blocking(move || openai::prepare_image(&img, max_side))
                        .await
                        .map_err(|e| JobError::retryable("panicked", e.to_string()))?
                        .map_err(|e| JobError::permanent("bad_image", e.to_string()))?;
                let c = self
                    .client
                    .caption(&jpeg, &req)
                    .await
                    .map_err(|e| JobError::retryable("caption_failed", e.to_string()))?;
                (c.text, c.usage)
            }
        };
        Ok(JobOutput::Interrogated(
            atelier_contracts::dataset::InterrogateOutput {
                caption,
                source,
                usage,
            },
        ))
    }

    /// Caption `usable` through the OpenAI-compatible endpoint, `concurrency × 2` at a time.
    async fn openai_images(
        &self,
        ctx: &JobCtx,
        batch: Batch,
        usable: Vec<ImageRecord>,
    ) -> Result<Tally, JobError> {
        let mut tally = Tally::default();
        let n = usable.len() as u64;
        let step = (n / 20).max(1);
        let finished = Arc::new(AtomicU64::new(0));
        let batch = Arc::new(batch);
        let mut results = futures::stream::iter(usable)
            .map(|rec| {
                let (this, ctx, batch, finished) =
                    (self.clone(), ctx.clone(), batch.clone(), finished.clone());
                async move {
                    let r = this.one(&ctx, &batch, &rec).await;
                    let k = finished.fetch_add(1, Ordering::Relaxed) + 1;
                    if k % step == 0 || k == n {
                        ctx.progress(
                            k as f32 / n.max(1) as f32,
                            Some(format!("{k} of {n} images")),
                        )
                        .await;
                    }
                    r
                }
            })
            .buffer_unordered(self.client.concurrency() * 2);
        while let Some(r) = results.next().await {
            match r? {
                One::Done(u) => {
                    tally.captioned += 1;
                    tally.usage.add(u);
                }
                One::Already => tally.already += 1,
                One::Failed(f) => tally.failed.push(f),
                One::OverBudget(why) => tally.over_budget = Some(why),
            }
        }
        Ok(tally)
    }
}

/// Where a captioner's request and token budgets live.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BudgetScope {
    /// One budget per endpoint for every replica, kept on the bus (`atelier_limits`).
    #[default]
    Shared,
    /// Each replica spends its own budget (N replicas may send N times the rate).
    Local,
}

/// The captioner's settings (flags and `ATELIER_*` variables; docs/configuration.md).
#[derive(clap::Args, Debug, Clone, Default)]
#[group(id = "captioner")]
pub struct Config {
    /// The OpenAI-compatible vision endpoint (the augmenter's paraphrases use it too).
    #[command(flatten)]
    pub openai: OpenAiArgs,
    /// Whether `--openai-rpm` and `--openai-tpm` are one budget for all replicas (shared) or per
    /// replica (local).
    #[arg(long, env = "ATELIER_OPENAI_BUDGET", value_enum, default_value_t = BudgetScope::Shared)]
    pub openai_budget: BudgetScope,
    /// A folder of BLIP model folders (Hugging Face layout) for the `blip` backend.
    #[arg(long, env = "ATELIER_BLIP_MODELS")]
    pub blip_models: Option<std::path::PathBuf>,
}

/// Runs the captioner: the `atelier-captioner` binary and `atelier up` both call this.
pub async fn serve(config: Config, launch: atelier_kit::service::Launch) -> anyhow::Result<()> {
    let mut client = Client::new(config.openai.clone())?;
    if config.openai_budget == BudgetScope::Shared {
        let args = &config.openai;
        let key = args
            .api_key
            .clone()
            .or_else(|| std::env::var("OPENAI_API_KEY").ok());
        let shared = shared_budget::SharedBudget::new(
            launch
                .rt
                .bus
                .bucket(atelier_contracts::typed::LIMITS)
                .await?,
            &args.base_url,
            key.as_deref(),
            args.requests_per_minute,
            args.tokens_per_minute,
        )
        .with_in_flight(
            args.max_in_flight,
            std::time::Duration::from_secs_f64(args.timeout_s + 10.0),
        );
        client = client.with_limiter(Arc::new(shared));
    }
    let captioner = Captioner::with_client(client).with_blip_models(config.blip_models);
    launch.run(captioner).await
}
