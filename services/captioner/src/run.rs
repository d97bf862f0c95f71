//! Caption runs: a request over more images than its shard size is split into shard jobs on the
//! captioner's own subject, so every replica takes shards and adding replicas makes a dataset
//! caption faster. The request's job (the run) queues the shards under ids derived from its own
//! (a retried run queues the same shards, never a second set), gives its worker slot back, and
//! follows them: progress, tokens and cost in its record, cancellation passed on to every shard,
//! and at the end one output summing theirs. A shard whose worker dies is redelivered and skips
//! the images it already captioned; a re-run of the dataset skips every captioned image.

use std::collections::BTreeMap;
use std::time::Duration;

use atelier_contracts::dataset::{
    CaptionOutput, CaptionSpec, ShardFailure, ShardOf, MAX_LISTED_FAILURES,
};
use atelier_contracts::images::ImageRecord;
use atelier_contracts::{JobId, JobOutput, JobRecord, JobSpec, JobState};
use atelier_kit::{JobCtx, JobError};
use sha2::{Digest, Sha256};

use crate::spend::{over_cap, Spend};

/// How often a run looks at its shards.
const POLL: Duration = Duration::from_secs(1);

/// The id of shard `index` of `run`: the same on every attempt of the run.
pub fn shard_id(run: JobId, index: u32) -> JobId {
    let mut h = Sha256::new();
    h.update(run.0.as_bytes());
    h.update(index.to_be_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&h.finalize()[..16]);
    JobId(uuid::Uuid::new_v8(bytes))
}

/// Queues the shards of `usable` and follows them to the run's output. `base` is the output
/// without any shard's work (images, unusable, source).
pub async fn run(
    ctx: &JobCtx,
    spec: &CaptionSpec,
    usable: &[ImageRecord],
    shard_size: usize,
    spend: Spend,
    base: CaptionOutput,
) -> Result<JobOutput, JobError> {
    let chunks: Vec<&[ImageRecord]> = usable.chunks(shard_size.max(1)).collect();
    let count = chunks.len() as u32;
    let mut shards = Vec::with_capacity(chunks.len());
    for (index, chunk) in chunks.into_iter().enumerate() {
        let index = index as u32;
        let id = shard_id(ctx.id, index);
        let shard = CaptionSpec {
            dataset: spec.dataset.clone(),
            images: chunk.iter().map(|r| r.sha256.clone()).collect(),
            backend: spec.backend.clone(),
            shard_size: None,
            spend_cap: spec.spend_cap,
            shard: Some(ShardOf {
                run: ctx.id,
                index,
                count,
            }),
        };
        ctx.submit_as(id, JobSpec::Caption(shard)).await?;
        shards.push(id);
    }
    tracing::info!(run = %ctx.id, shards = count, images = usable.len(), "caption run queued its shards");
    // From here on the run only waits: its slot goes to the shards.
    ctx.release_slot();
    let finished = follow(ctx, &shards, &spend, spec).await?;
    summarize(ctx, base, shards, finished, &spend, spec).await
}

/// Waits until every shard has finished, reporting progress; passes a cancellation on.
async fn follow(
    ctx: &JobCtx,
    shards: &[JobId],
    spend: &Spend,
    spec: &CaptionSpec,
) -> Result<BTreeMap<usize, JobRecord>, JobError> {
    let mut finished: BTreeMap<usize, JobRecord> = BTreeMap::new();
    let mut stopping = false;
    loop {
        if ctx.is_cancelled() {
            for (i, id) in shards.iter().enumerate() {
                if !finished.contains_key(&i) {
                    ctx.cancel_job(*id).await?;
                }
            }
            return Err(JobError::Cancelled);
        }
        // One concurrent read of every unfinished shard per look.
        let open: Vec<usize> = (0..shards.len())
            .filter(|i| !finished.contains_key(i))
            .collect();
        let ids: Vec<JobId> = open.iter().map(|&i| shards[i]).collect();
        let mut running = 0.0f32;
        let mut queued = Vec::new();
        for (i, record) in open.into_iter().zip(ctx.records(&ids).await?) {
            match record {
                Some(r) if r.state.is_terminal() => {
                    finished.insert(i, r);
                }
                Some(r) => {
                    if r.state == JobState::Queued {
                        queued.push(r.id);
                    }
                    running += r.progress.as_ref().map_or(0.0, |p| p.fraction);
                }
                None => {}
            }
        }
        let spent = spend.read().await?;
        // A shard that hit the cap ends the run: the others stop sending too (they see the same
        // total); those not started yet are cancelled so they never take a slot.
        if !stopping && over_cap(spec.spend_cap.as_ref(), &spent).is_some() {
            stopping = true;
            for id in queued {
                ctx.cancel_job(id).await?;
            }
        }
        let n = shards.len();
        let fraction = (finished.len() as f32 + running) / n as f32;
        let tokens = spent.usage.prompt_tokens + spent.usage.completion_tokens;
        ctx.progress(
            fraction.min(1.0),
            Some(format!(
                "{} of {n} shards finished; {} images captioned; {tokens} tokens; ${:.4}",
                finished.len(),
                spent.captioned,
                spent.usd
            )),
        )
        .await;
        if finished.len() == n {
            return Ok(finished);
        }
        tokio::select! {
            _ = ctx.cancellation().cancelled() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// The run's output: the shards' outputs summed, its failed shards listed, its spend from the
/// shared total (which counts failed shards' captions too).
async fn summarize(
    ctx: &JobCtx,
    mut out: CaptionOutput,
    shards: Vec<JobId>,
    finished: BTreeMap<usize, JobRecord>,
    spend: &Spend,
    spec: &CaptionSpec,
) -> Result<JobOutput, JobError> {
    for (index, record) in &finished {
        match (&record.state, &record.output) {
            (JobState::Succeeded, Some(JobOutput::Captions(o))) => {
                out.captioned += o.captioned;
                out.already_captioned += o.already_captioned;
                out.failed_total += o.failed_total.max(o.failed.len() as u64);
                let room = MAX_LISTED_FAILURES.saturating_sub(out.failed.len());
                out.failed.extend(o.failed.iter().take(room).cloned());
            }
            _ => out.failed_shards.push(ShardFailure {
                index: *index as u32,
                job: record.id,
                error: record
                    .error
                    .clone()
                    .unwrap_or_else(|| atelier_contracts::ErrorInfo {
                        code: "cancelled".into(),
                        message: format!("shard {index} was {:?}", record.state),
                    }),
            }),
        }
    }
    let spent = spend.read().await?;
    out.usage = spent.usage;
    out.cost_usd = (spent.usd > 0.0).then_some(spent.usd);
    out.shards = shards;
    out.failed
        .sort_by(|a, b| a.image_sha256.cmp(&b.image_sha256));
    if let Some(why) = over_cap(spec.spend_cap.as_ref(), &spent) {
        return Err(JobError::permanent("budget_exhausted", why));
    }
    if !out.failed_shards.is_empty() && out.failed_shards.len() == finished.len() {
        let first = &out.failed_shards[0].error;
        return Err(JobError::permanent(
            "shards_failed",
            format!(
                "every one of the run's {} shards failed; first: {} ({})",
                finished.len(),
                first.message,
                first.code
            ),
        ));
    }
    tracing::info!(run = %ctx.id, captioned = out.captioned, already = out.already_captioned,
        failed_shards = out.failed_shards.len(), "caption run done");
    Ok(JobOutput::Captions(out))
}
