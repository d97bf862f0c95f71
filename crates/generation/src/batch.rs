//! Cross-job batching: txt2img jobs that share a model, LoRAs, embeddings, size, steps,
//! sampler, CFG scale and clip skip, arriving within the batch window of each other, run as one
//! UNet batch ([`StableDiffusion::txt2img_batch`]). Each job keeps its own prompt, seed and
//! batch size and gets the images it would get alone (to float rounding); the group's progress
//! reaches every job; a cancelled job leaves the group (its images are dropped) and the group
//! stops only when every job has been cancelled.
//!
//! A GPU runs a batch of B images in far less than B times one image's time, so a worker that
//! fetches several jobs at once (`--concurrency`) serves them in one pass instead of queueing
//! them on the device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use atelier_diffusion::pipeline::{BatchKey, Txt2Img};
use atelier_kit::shutdown::CancellationToken;
use atelier_kit::{JobCtx, JobError};
use tokio::sync::{mpsc, oneshot};

use crate::{pipeline_err, Generator, Lora, Rendered};

/// What jobs must share to be stacked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    model: PathBuf,
    /// (file, weight bits, name) of each LoRA, in prompt order.
    loras: Vec<(PathBuf, u64, String)>,
    embeddings: Vec<PathBuf>,
    settings: BatchKey,
}

impl GroupKey {
    pub fn new(model: &Path, loras: &[Lora], embeddings: &[PathBuf], req: &Txt2Img) -> Self {
        Self {
            model: model.to_owned(),
            loras: loras
                .iter()
                .map(|(p, w, n)| (p.clone(), w.to_bits(), n.clone()))
                .collect(),
            embeddings: embeddings.to_vec(),
            settings: BatchKey::of(req),
        }
    }
}

struct Member {
    req: Txt2Img,
    cancel: CancellationToken,
    progress: mpsc::UnboundedSender<(usize, usize)>,
    done: oneshot::Sender<Result<(Rendered, usize), JobError>>,
}

struct Group {
    lora_files: Vec<Lora>,
    embeddings: Vec<PathBuf>,
    members: Vec<Member>,
}

pub struct Batcher {
    window: Duration,
    max: usize,
    open: Mutex<HashMap<GroupKey, Group>>,
}

impl Batcher {
    pub fn new(window: Duration, max: usize) -> Self {
        Self {
            window,
            max: max.max(1),
            open: Mutex::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.window.is_zero() && self.max > 1
    }

    /// Runs `req` in the open group of `key` (or opens one that starts after the window, or as
    /// soon as it is full); relays the group's progress to `ctx`. Returns the job's images and
    /// the number of jobs that shared the passes.
    pub async fn run(
        &self,
        gen: &Generator,
        ctx: &JobCtx,
        key: GroupKey,
        req: Txt2Img,
    ) -> Result<(Rendered, usize), JobError> {
        let (ptx, mut prx) = mpsc::unbounded_channel();
        let (dtx, mut drx) = oneshot::channel();
        let member = Member {
            req,
            cancel: ctx.cancellation().clone(),
            progress: ptx,
            done: dtx,
        };
        let opens = {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            match open.get_mut(&key) {
                Some(g) if g.members.len() < self.max => {
                    g.members.push(member);
                    let full = g.members.len() >= self.max;
                    if full {
                        // Full: it starts now, and the next job opens a new group.
                        let g = open.remove(&key);
                        drop(open);
                        if let Some(g) = g {
                            spawn_group(gen.clone(), key.model.clone(), g);
                        }
                    }
                    false
                }
                _ => {
                    let loras = key
                        .loras
                        .iter()
                        .map(|(p, w, n)| (p.clone(), f64::from_bits(*w), n.clone()))
                        .collect();
                    open.insert(
                        key.clone(),
                        Group {
                            lora_files: loras,
                            embeddings: key.embeddings.clone(),
                            members: vec![member],
                        },
                    );
                    true
                }
            }
        };
        if opens {
            // The job that opened the group starts it when the window closes (unless it filled
            // up and started already).
            let (gen, window) = (gen.clone(), self.window);
            let this = gen.batcher.clone();
            tokio::spawn(async move {
                tokio::time::sleep(window).await;
                let g = this
                    .open
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&key);
                if let Some(g) = g {
                    spawn_group(gen, key.model, g);
                }
            });
        }
        loop {
            tokio::select! {
                r = &mut drx => {
                    let r = r.map_err(|_| JobError::retryable("worker_panicked", "the batch ended without an answer"))?;
                    if ctx.is_cancelled() {
                        return Err(JobError::permanent("cancelled", "cancelled between steps"));
                    }
                    return r;
                }
                Some((done, total)) = prx.recv() => {
                    ctx.progress(done as f32 / total.max(1) as f32, Some(format!("step {done}/{total}"))).await;
                }
            }
        }
    }
}

/// Samples a group on a blocking thread and answers each member.
fn spawn_group(gen: Generator, model: PathBuf, group: Group) {
    tokio::task::spawn_blocking(move || {
        let Group {
            lora_files,
            embeddings,
            members,
        } = group;
        let n = members.len();
        let reqs: Vec<Txt2Img> = members.iter().map(|m| m.req.clone()).collect();
        let result = gen
            .prepared(&model, None, &embeddings, &lora_files)
            .and_then(|model| {
                let on_step = |done: usize, total: usize| {
                    for m in &members {
                        let _ = m.progress.send((done, total));
                    }
                    members.iter().any(|m| !m.cancel.is_cancelled())
                };
                let images = model.txt2img_batch(&reqs, on_step).map_err(pipeline_err)?;
                images
                    .into_iter()
                    .map(|imgs| crate::rendered(&imgs, &model.hash))
                    .collect::<Result<Vec<Rendered>, JobError>>()
            });
        tracing::info!(jobs = n, ok = result.is_ok(), "batched txt2img group done");
        match result {
            Ok(rendered) => {
                for (m, r) in members.into_iter().zip(rendered) {
                    let _ = m.done.send(Ok((r, n)));
                }
            }
            Err(e) => {
                for m in members {
                    let _ = m.done.send(Err(e.clone()));
                }
            }
        }
    });
}
