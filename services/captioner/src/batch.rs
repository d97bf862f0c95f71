//! Captions through the endpoint's Batch API (`batch: true`): the job's uncaptioned images go into
//! input files within the API's limits (50,000 requests, `--openai-batch-max-bytes`), each
//! uploaded and made a batch; the batches are recorded in `atelier_batches` under the job's id
//! before the job waits, so an attempt after a restart follows them instead of paying again. The
//! job then gives its worker slot back and polls; each finished batch's output and error files
//! are read back by `custom_id` (the image's sha256) into the same caption records online mode
//! writes. Cancelling the job cancels its batches.

use std::collections::{HashMap, HashSet};

use atelier_contracts::dataset::{CaptionBatches, CaptionFailure, CaptionRecord, SubmittedBatch};
use atelier_contracts::images::ImageRecord;
use atelier_kit::kv::Kv;
use atelier_kit::{JobCtx, JobError};

use crate::openai::batch::{read_line, request_line, BatchInfo, MAX_REQUESTS};
use crate::{prepared_jpeg, store_caption, Batch, Captioner, Tally};

fn endpoint_error(e: crate::openai::CaptionError) -> JobError {
    match e {
        crate::openai::CaptionError::Refused { .. } | crate::openai::CaptionError::Config(_) => {
            JobError::permanent("batch_refused", e.to_string())
        }
        crate::openai::CaptionError::GaveUp { .. } => {
            JobError::retryable("captioner_unavailable", e.to_string())
        }
    }
}

fn kv_error(e: anyhow::Error) -> JobError {
    JobError::retryable("kv_unavailable", format!("{e:#}"))
}

pub(crate) async fn caption(
    c: &Captioner,
    ctx: &JobCtx,
    job: Batch,
    usable: Vec<ImageRecord>,
) -> Result<Tally, JobError> {
    let kv = ctx.bucket(atelier_contracts::typed::BATCHES).await?;
    let key = ctx.id.to_string();
    let mut state = kv.get(&key).await.map_err(kv_error)?.unwrap_or_default();
    settle_unconfirmed(c, &kv, &key, &mut state).await?;
    let mut tally = Tally::default();
    let keys: Vec<String> = usable
        .iter()
        .map(|r| format!("{}.{}", r.sha256, job.sid))
        .collect();
    let have: Vec<Option<CaptionRecord>> = job.captions.get_many(&keys).await.map_err(kv_error)?;
    let submitted: HashSet<String> = state
        .batches
        .iter()
        .flat_map(|b| b.images.iter().cloned())
        .collect();
    let mut pending = Vec::new();
    for (rec, have) in usable.into_iter().zip(have) {
        if have.is_some() {
            tally.already += 1;
        } else if !submitted.contains(&rec.sha256) {
            pending.push(rec);
        }
    }
    submit(c, ctx, &job, pending, &kv, &key, &mut state, &mut tally).await?;
    // From here the job only waits on the endpoint: its slot goes to other jobs.
    ctx.release_slot();
    follow(c, ctx, &job, &kv, &key, &mut state, &mut tally).await?;
    Ok(tally)
}

/// Writes `pending` into input files and creates a batch of each, recording each batch.
#[allow(clippy::too_many_arguments)]
async fn submit(
    c: &Captioner,
    ctx: &JobCtx,
    job: &Batch,
    pending: Vec<ImageRecord>,
    kv: &Kv<CaptionBatches>,
    key: &str,
    state: &mut CaptionBatches,
    tally: &mut Tally,
) -> Result<(), JobError> {
    let max_bytes = c.client.batch_max_bytes();
    let mut file = Vec::new();
    let mut ids = Vec::new();
    for rec in pending {
        if ctx.is_cancelled() {
            return Err(JobError::Cancelled);
        }
        if let Some(s) = &job.spend {
            if let Some(why) = s.exhausted().await? {
                tally.over_budget = Some(why);
                break;
            }
        }
        let jpeg = match prepared_jpeg(ctx, &rec, job.max_side).await? {
            Ok(j) => j,
            Err(error) => {
                tally.failed.push(CaptionFailure {
                    image_sha256: rec.sha256.clone(),
                    error,
                });
                continue;
            }
        };
        let line = request_line(&rec.sha256, &jpeg, &job.req);
        if !ids.is_empty() && (file.len() + line.len() > max_bytes || ids.len() >= MAX_REQUESTS) {
            let full = (std::mem::take(&mut file), std::mem::take(&mut ids));
            create(c, kv, key, state, full).await?;
        }
        file.extend_from_slice(&line);
        ids.push(rec.sha256);
    }
    if !ids.is_empty() {
        create(c, kv, key, state, (file, ids)).await?;
    }
    Ok(())
}

/// Uploads one input file, records it, creates its batch and records that: a job that dies in
/// between finds the batch by its file ([`settle_unconfirmed`]) rather than paying twice.
async fn create(
    c: &Captioner,
    kv: &Kv<CaptionBatches>,
    key: &str,
    state: &mut CaptionBatches,
    (file, images): (Vec<u8>, Vec<String>),
) -> Result<(), JobError> {
    let bytes = file.len();
    let input_file_id = c
        .client
        .upload_batch_file(file)
        .await
        .map_err(endpoint_error)?;
    let requests = images.len();
    state.batches.push(SubmittedBatch {
        id: String::new(),
        input_file_id: input_file_id.clone(),
        images,
        read: false,
    });
    kv.put(key, state).await.map_err(kv_error)?;
    let b = c
        .client
        .create_batch(&input_file_id)
        .await
        .map_err(endpoint_error)?;
    tracing::info!(batch = %b.id, requests, bytes, "created a caption batch");
    if let Some(last) = state.batches.last_mut() {
        last.id = b.id;
    }
    kv.put(key, state).await.map_err(kv_error)?;
    Ok(())
}

/// Batches an earlier attempt recorded only by their input file: the batch made on it, or a new
/// one when the attempt died before creating it.
async fn settle_unconfirmed(
    c: &Captioner,
    kv: &Kv<CaptionBatches>,
    key: &str,
    state: &mut CaptionBatches,
) -> Result<(), JobError> {
    for i in 0..state.batches.len() {
        if !state.batches[i].id.is_empty() {
            continue;
        }
        let file = state.batches[i].input_file_id.clone();
        let found = c
            .client
            .batch_of_file(&file)
            .await
            .map_err(endpoint_error)?;
        let id = match found {
            Some(b) => b.id,
            None => {
                c.client
                    .create_batch(&file)
                    .await
                    .map_err(endpoint_error)?
                    .id
            }
        };
        state.batches[i].id = id;
        kv.put(key, state).await.map_err(kv_error)?;
    }
    Ok(())
}

/// Polls the batches until each has ended and been read.
async fn follow(
    c: &Captioner,
    ctx: &JobCtx,
    job: &Batch,
    kv: &Kv<CaptionBatches>,
    key: &str,
    state: &mut CaptionBatches,
    tally: &mut Tally,
) -> Result<(), JobError> {
    loop {
        let mut done = 0u64;
        let mut total = 0u64;
        for i in 0..state.batches.len() {
            let b = &state.batches[i];
            total += b.images.len() as u64;
            if b.read {
                done += b.images.len() as u64;
                continue;
            }
            if ctx.is_cancelled() {
                for b in state.batches.iter().filter(|b| !b.read) {
                    let _ = c.client.cancel_batch(&b.id).await;
                }
                return Err(JobError::Cancelled);
            }
            let info = c.client.batch(&b.id).await.map_err(endpoint_error)?;
            let counts = info.request_counts.unwrap_or_default();
            done += counts.completed + counts.failed;
            if info.is_terminal() {
                read(c, ctx, job, &state.batches[i], &info, tally).await?;
                state.batches[i].read = true;
                kv.put(key, state).await.map_err(kv_error)?;
            }
        }
        if state.batches.iter().all(|b| b.read) {
            return Ok(());
        }
        ctx.progress(
            done as f32 / total.max(1) as f32,
            Some(format!("{done} of {total} batched requests done")),
        )
        .await;
        tokio::select! {
            _ = ctx.cancellation().cancelled() => {}
            _ = tokio::time::sleep(c.client.batch_poll()) => {}
        }
    }
}

/// Reads an ended batch's output and error files into captions and failures; images with no
/// line at all failed with the batch's own status.
async fn read(
    c: &Captioner,
    ctx: &JobCtx,
    job: &Batch,
    b: &SubmittedBatch,
    info: &BatchInfo,
    tally: &mut Tally,
) -> Result<(), JobError> {
    let mut results: HashMap<String, Result<crate::openai::Caption, String>> = HashMap::new();
    for file in [&info.output_file_id, &info.error_file_id]
        .into_iter()
        .flatten()
    {
        let content = c.client.file_content(file).await.map_err(endpoint_error)?;
        for line in String::from_utf8_lossy(&content).lines() {
            if line.trim().is_empty() {
                continue;
            }
            match read_line(line) {
                Ok((id, r)) => {
                    results.insert(id, r);
                }
                Err(e) => tracing::warn!(batch = %b.id, error = %e, "skipping a batch output line"),
            }
        }
    }
    for sha in &b.images {
        match results.remove(sha) {
            Some(Ok(caption)) => {
                tally.usage.add(caption.usage);
                store_caption(ctx, job, sha, caption).await?;
                tally.captioned += 1;
            }
            Some(Err(error)) => tally.failed.push(CaptionFailure {
                image_sha256: sha.clone(),
                error,
            }),
            None => tally.failed.push(CaptionFailure {
                image_sha256: sha.clone(),
                error: format!(
                    "batch {} ended {} without an answer for it{}",
                    b.id,
                    info.status,
                    info.errors
                        .as_ref()
                        .map(|e| format!(": {e}"))
                        .unwrap_or_default()
                ),
            }),
        }
    }
    Ok(())
}
