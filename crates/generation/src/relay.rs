//! What a generation on a blocking thread reports while it runs — each step, and a preview PNG
//! every so many steps — relayed to the job's progress events as it comes.

use atelier_kit::{JobCtx, JobError};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::Rendered;

/// The blocking side: where steps and previews are sent.
pub(crate) struct Reports {
    steps: UnboundedSender<(usize, usize)>,
    previews: UnboundedSender<(usize, Vec<u8>)>,
}

/// The job's side: what it relays.
pub(crate) struct Relay {
    steps: UnboundedReceiver<(usize, usize)>,
    previews: UnboundedReceiver<(usize, Vec<u8>)>,
}

pub(crate) fn channel() -> (Reports, Relay) {
    let (st, sr) = unbounded_channel();
    let (pt, pr) = unbounded_channel();
    (
        Reports {
            steps: st,
            previews: pt,
        },
        Relay {
            steps: sr,
            previews: pr,
        },
    )
}

impl Reports {
    pub fn step(&self, done: usize, total: usize) {
        let _ = self.steps.send((done, total));
    }

    /// The preview as a PNG (one that cannot be encoded is skipped).
    pub fn preview(&self, step: usize, img: image::RgbImage) {
        let mut png = Vec::new();
        if image::DynamicImage::ImageRgb8(img)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .is_ok()
        {
            let _ = self.previews.send((step, png));
        }
    }
}

impl Relay {
    /// Relays until `work` ends, then answers its result.
    pub async fn run(
        mut self,
        ctx: &JobCtx,
        work: tokio::task::JoinHandle<Result<Rendered, JobError>>,
        steps: usize,
    ) -> Result<Rendered, JobError> {
        let mut last_total = steps;
        tokio::pin!(work);
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                Some((done, total)) = self.steps.recv() => {
                    last_total = total;
                    ctx.progress(done as f32 / total.max(1) as f32, Some(format!("step {done}/{total}"))).await;
                }
                Some((step, png)) = self.previews.recv() => {
                    // A preview that cannot be stored is skipped; the job goes on.
                    if let Ok((r, _)) = ctx.store().put_bytes(png.into(), "image/png").await {
                        let total = last_total.max(1);
                        ctx.progress_with_preview(
                            step as f32 / total as f32,
                            Some(format!("step {step}/{total} (preview)")),
                            Some(r.key),
                        )
                        .await;
                    }
                }
            }
        };
        result.map_err(|e| JobError::retryable("worker_panicked", e.to_string()))?
    }
}
