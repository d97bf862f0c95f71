//! The job protocol every service runs: a [`Handler`] turns a [`JobSpec`] into a [`JobOutput`];
//! [`Worker`] does the rest.
//!
//! For each delivered [`JobRequest`]:
//! 1. Undecodable payloads, unknown schema versions and jobs for another service are dead-lettered
//!    at once (retrying cannot help).
//! 2. Idempotency: if the job's record is already terminal, the delivery is a duplicate. A succeeded
//!    job's `done` event is re-published (deduplicated by `Nats-Msg-Id: <id>.done`, which also covers
//!    a crash between writing the record and publishing) and the message is acked. No handler runs,
//!    so no second result or artifact is made; artifacts are content-addressed besides.
//! 3. The record moves to `running` (attempts + 1) by compare-and-set; the handler runs with a
//!    [`JobCtx`] carrying the store, progress reporting and a cancellation token that fires when the
//!    record is set to `cancelled` (polled every second).
//! 4. Success writes `succeeded` + output, then publishes `done`; a permanent error writes `failed`
//!    and publishes `failed`; a retryable error naks with backoff until `max_deliver`, then
//!    dead-letters and fails the job.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_contracts::{
    ErrorInfo, JobDone, JobFailed, JobId, JobOutput, JobProgress, JobRecord, JobRequest, JobSpec,
    JobState, Priority, Progress, Service, SCHEMA_VERSION,
};
use futures::future::join_all;
use tokio_util::sync::CancellationToken;

use crate::bus::AskError;
use crate::config::WorkerArgs;
use crate::consumer::{self, ConsumerSpec, Delivery, Outcome, Processor};
use crate::jobstate::{Change, JobStates, StateError};
use crate::kv::Kv;
use crate::store::StoreError;
use crate::telemetry::{Metrics, ServiceLabel};
use crate::{Bus, Store};
use atelier_contracts::typed::{Bucket, Query};

/// Transport hint on a request: the revision of the job record the submitter created. A worker
/// receiving the first delivery rebuilds the queued record from the request and moves it to
/// `running` by compare-and-set against this revision, saving a read; any change since (a
/// cancellation) makes the compare fail and the worker falls back to reading the record.
pub const RECORD_REVISION_HEADER: &str = "Atelier-Record-Revision";

#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error(transparent)]
    State(#[from] crate::jobstate::StateError),
    #[error("could not publish the job: {0}")]
    Bus(anyhow::Error),
    /// The request is larger than a NATS message may be: nothing was written.
    #[error(
        "the job request is {bytes} bytes; the bus carries at most {limit} per message: \
         upload large inputs (POST /v1/uploads) and pass their keys"
    )]
    TooLarge { bytes: usize, limit: usize },
}

/// Room a request leaves in a NATS message for its outbox and record envelopes and headers.
const ENVELOPE_BYTES: usize = 4096;

/// Queues a job as the gateway does: the request into the publish outbox, the record as
/// `queued`, then the request on the bus (with `Nats-Msg-Id` = job id, so a retried publish is
/// dropped by the server), then out of the outbox. Once the record is written the job is
/// accepted: if publishing fails, or the process dies before the outbox entry is removed, the
/// gateways' reconciler publishes the job ([`crate::outbox`]), so an accepted job is never left
/// queued with nothing on the bus. An error means the job may or may not be recorded; a retry
/// under the same id (an `Idempotency-Key`) settles which.
pub async fn enqueue(
    bus: &Bus,
    states: &JobStates,
    request: &JobRequest,
) -> Result<JobRecord, EnqueueError> {
    let key = request.id.to_string();
    let pending = crate::outbox::Pending {
        request: request.clone(),
        since: chrono::Utc::now(),
    };
    let bytes = serde_json::to_vec(&pending).map_err(|e| EnqueueError::Bus(e.into()))?;
    // Every message this job makes (outbox entry, record, request) is about this size; the
    // envelope allowance covers the record's state fields and headers.
    let max_payload = bus.client.server_info().max_payload;
    if max_payload > 0 && bytes.len() + ENVELOPE_BYTES > max_payload {
        return Err(EnqueueError::TooLarge {
            bytes: bytes.len(),
            limit: max_payload.saturating_sub(ENVELOPE_BYTES),
        });
    }
    let outbox = bus.outbox().await.map_err(EnqueueError::Bus)?;
    outbox
        .put(&key, bytes.into())
        .await
        .map_err(|e| EnqueueError::Bus(e.into()))?;
    let record = JobRecord::queued(request);
    // A failed create may still have been written (an acknowledgement lost to a restart): the
    // outbox entry stays, and the reconciler publishes the job if it turns out to be recorded.
    let revision = states.create(&record).await?;
    let subject = request.spec.service().request_subject_for(request.priority);
    let headers = [(RECORD_REVISION_HEADER, revision.to_string())];
    let published = bus
        .publish_json_with(subject, Some(&key), &headers, request)
        .await;
    if let Err(e) = published {
        // Recorded and in the outbox: accepted. The reconciler publishes it (under its id, so a
        // publish that did land is not run twice).
        tracing::warn!(job = %key, error = %format!("{e:#}"), "publishing a job failed; the outbox reconciler will publish it");
        return Ok(record);
    }
    if let Err(e) = outbox.delete(&key).await {
        // Left for the reconciler, which finds the job no longer queued or drops the duplicate.
        tracing::warn!(job = %key, error = %e, "removing a published job from the outbox");
    }
    Ok(record)
}

/// Why a job did not produce an output.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// Worth another delivery (the store or a remote API was unreachable, a GPU ran out of memory).
    #[error("{0:?}")]
    Retryable(ErrorInfo),
    /// Retrying cannot help (bad input, missing artifact, checksum mismatch).
    #[error("{0:?}")]
    Permanent(ErrorInfo),
    /// The job was cancelled while running.
    #[error("cancelled")]
    Cancelled,
}

impl JobError {
    pub fn retryable(code: &str, message: impl Into<String>) -> Self {
        JobError::Retryable(ErrorInfo {
            code: code.into(),
            message: message.into(),
        })
    }
    pub fn permanent(code: &str, message: impl Into<String>) -> Self {
        JobError::Permanent(ErrorInfo {
            code: code.into(),
            message: message.into(),
        })
    }
}

impl From<StoreError> for JobError {
    fn from(e: StoreError) -> Self {
        match &e {
            StoreError::NotFound(_) => JobError::permanent("artifact_not_found", e.to_string()),
            StoreError::BadKey(_) => JobError::permanent("bad_artifact_key", e.to_string()),
            StoreError::TooLarge { .. } => JobError::permanent("artifact_too_large", e.to_string()),
            _ if e.is_transient() => JobError::retryable("store_unavailable", e.to_string()),
            _ => JobError::permanent("store_error", e.to_string()),
        }
    }
}

/// What a handler gets besides its spec.
#[derive(Clone)]
pub struct JobCtx {
    pub id: JobId,
    /// 1 on the first attempt.
    pub attempt: u64,
    pub service: Service,
    /// The queue the job came from; jobs it queues go to the same one.
    pub priority: Priority,
    store: Store,
    bus: Bus,
    states: JobStates,
    cancel: CancellationToken,
    /// The record and revision this worker last wrote, so finishing can skip a read. Taken (and
    /// so invalidated) by anything else that writes the record.
    last_state: Arc<std::sync::Mutex<Option<(JobRecord, u64)>>>,
    /// The last progress fraction reported, held while one report is written and published, so
    /// reports from concurrent tasks of one job reach the record and the bus in order.
    reported: Arc<tokio::sync::Mutex<f32>>,
    /// The concurrency slot this job's delivery holds.
    slot: crate::consumer::Slot,
}

impl JobCtx {
    /// Gives this job's concurrency slot back to the worker: for a job that from now on only
    /// waits on other jobs (a caption run waiting for its shards), so the shards it waits for can
    /// run on this worker too. The job keeps running and its message stays held.
    pub fn release_slot(&self) {
        self.slot.release();
    }

    /// Queues a job of another service on this job's behalf under a chosen `id` (derived, so a
    /// retried attempt queues the same jobs again). `false` when a job with that id exists.
    pub async fn submit_as(&self, id: JobId, spec: JobSpec) -> Result<bool, JobError> {
        let req = JobRequest {
            schema_version: SCHEMA_VERSION,
            id,
            submitted_at: chrono::Utc::now(),
            submitted_by: Some(format!("{}:{}", self.service.name(), self.id)),
            priority: self.priority,
            spec,
        };
        match enqueue(&self.bus, &self.states, &req).await {
            Ok(_) => Ok(true),
            Err(EnqueueError::State(StateError::Exists(_))) => Ok(false),
            Err(e) => Err(JobError::retryable("bus_unavailable", e.to_string())),
        }
    }

    /// The records of jobs `ids`, in order.
    pub async fn records(&self, ids: &[JobId]) -> Result<Vec<Option<JobRecord>>, JobError> {
        self.states
            .get_many(ids)
            .await
            .map_err(|e| JobError::retryable("job_state_unavailable", e.to_string()))
    }

    /// Cancels job `id` unless it has finished (what `DELETE /v1/jobs/{id}` does).
    pub async fn cancel_job(&self, id: JobId) -> Result<(), JobError> {
        self.states
            .cancel(id)
            .await
            .map(drop)
            .map_err(|e| JobError::retryable("job_state_unavailable", e.to_string()))
    }

    /// Fires when the job is cancelled; long handlers should check it between steps.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// The object store (content-addressed artifacts).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A key-value bucket, typed by its values (`atelier_contracts::typed`).
    pub async fn bucket<V: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        bucket: Bucket<V>,
    ) -> Result<Kv<V>, JobError> {
        self.bus
            .bucket(bucket)
            .await
            .map_err(|e| JobError::retryable("kv_unavailable", format!("{e:#}")))
    }

    /// Sends `req` on a request/reply subject and waits up to `timeout` for the reply.
    pub async fn ask<Req: serde::Serialize, Rep: serde::de::DeserializeOwned>(
        &self,
        query: Query<Req, Rep>,
        req: &Req,
        timeout: std::time::Duration,
    ) -> Result<Rep, AskError> {
        self.bus.ask(query, req, timeout).await
    }

    /// Queues a job of another service on this job's behalf (`submitted_by` names this job).
    pub async fn submit(&self, spec: JobSpec) -> Result<JobId, JobError> {
        let req = JobRequest {
            schema_version: SCHEMA_VERSION,
            id: JobId::new(),
            submitted_at: chrono::Utc::now(),
            submitted_by: Some(format!("{}:{}", self.service.name(), self.id)),
            priority: self.priority,
            spec,
        };
        enqueue(&self.bus, &self.states, &req)
            .await
            .map_err(|e| JobError::retryable("bus_unavailable", e.to_string()))?;
        Ok(req.id)
    }

    /// Job `id`'s record each time it changes, from its current one.
    pub async fn watch(
        &self,
        id: JobId,
    ) -> Result<impl futures::Stream<Item = Result<JobRecord, StateError>>, JobError> {
        self.states
            .watch(id)
            .await
            .map_err(|e| JobError::retryable("kv_unavailable", e.to_string()))
    }

    fn take_known(&self) -> Option<(JobRecord, u64)> {
        self.last_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Reports progress: updates the job record (what `GET /v1/jobs/{id}/events` streams) and
    /// publishes `atelier.v1.<service>.progress`. Failures are logged, never fatal.
    pub async fn progress(&self, fraction: f32, message: impl Into<Option<String>>) {
        self.progress_with_preview(fraction, message, None).await
    }

    /// [`JobCtx::progress`] with the artifact key of a preview image.
    pub async fn progress_with_preview(
        &self,
        fraction: f32,
        message: impl Into<Option<String>>,
        preview: Option<String>,
    ) {
        // Progress only moves forward: a report below the last one (a slower task of the same
        // job, a redelivered attempt starting over) keeps the fraction already shown.
        let mut reported = self.reported.lock().await;
        let fraction = fraction.clamp(0.0, 1.0).max(*reported);
        *reported = fraction;
        let progress = Progress {
            fraction,
            message: message.into(),
            preview,
        };
        let p = progress.clone();
        self.take_known();
        let res = self
            .states
            .update(self.id, |r| {
                if r.state == JobState::Running {
                    let shown = r.progress.as_ref().map_or(0.0, |old| old.fraction);
                    // A report without a preview keeps the last one (what an interrupted
                    // image looked like is the latest preview, not none).
                    let last_preview = r.progress.as_ref().and_then(|old| old.preview.clone());
                    r.progress = Some(Progress {
                        fraction: p.fraction.max(shown),
                        preview: p.preview.clone().or(last_preview),
                        ..p.clone()
                    });
                    Change::Write
                } else {
                    Change::Keep
                }
            })
            .await;
        // The event carries what the record shows (an earlier attempt may have shown more),
        // and a preview only when this report made one.
        let progress = match res {
            Ok(JobRecord {
                progress: Some(written),
                ..
            }) => {
                *reported = reported.max(written.fraction);
                Progress {
                    preview: progress.preview.clone(),
                    ..written
                }
            }
            Ok(_) => progress,
            Err(e) => {
                tracing::debug!(job = %self.id, error = %e, "progress not recorded");
                progress
            }
        };
        let event = JobProgress {
            schema_version: SCHEMA_VERSION,
            id: self.id,
            service: self.service,
            progress,
            at: chrono::Utc::now(),
        };
        if let Err(e) = self
            .bus
            .publish_json(self.service.progress_subject(), None, &event)
            .await
        {
            tracing::debug!(job = %self.id, error = %e, "progress event not published");
        }
    }
}

/// A service's work. `handle` is all most services write.
pub trait Handler: Send + Sync + 'static {
    /// The service whose work queue this handler consumes.
    fn service(&self) -> Service;

    /// Jobs handed to [`Handler::handle_batch`] at once (GPU services batch; default 1).
    fn batch_size(&self) -> usize {
        1
    }

    fn handle(
        &self,
        ctx: &JobCtx,
        spec: JobSpec,
    ) -> impl Future<Output = Result<JobOutput, JobError>> + Send;

    /// Handles several jobs at once; the default runs [`Handler::handle`] on each concurrently.
    fn handle_batch(
        &self,
        jobs: Vec<(JobCtx, JobSpec)>,
    ) -> impl Future<Output = Vec<Result<JobOutput, JobError>>> + Send {
        async move {
            join_all(
                jobs.into_iter()
                    .map(|(ctx, spec)| async move { self.handle(&ctx, spec).await }),
            )
            .await
        }
    }
}

/// Runs a [`Handler`] against its service's work queue.
pub struct Worker<H: Handler> {
    handler: H,
    bus: Bus,
    store: Store,
    states: JobStates,
    metrics: Arc<Metrics>,
    instance: String,
}

impl<H: Handler> Worker<H> {
    pub async fn new(
        handler: H,
        bus: Bus,
        store: Store,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let states = JobStates::new(bus.jobs_kv().await?);
        let instance = crate::instance_id(handler.service().name());
        Ok(Self {
            handler,
            bus,
            store,
            states,
            metrics,
            instance,
        })
    }

    /// Consumes until `shutdown`, then drains (finishes and acks what it holds).
    pub async fn run(self, args: WorkerArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
        let spec = ConsumerSpec::requests(
            self.handler.service(),
            self.handler.batch_size(),
            args.clone(),
        );
        let bus = self.bus.clone();
        let metrics = self.metrics.clone();
        let load = Arc::new(crate::queue::Load::default());
        let slots = (args.concurrency.max(1) * spec.batch_size) as u64;
        crate::queue::spawn_reporter(
            bus.clone(),
            spec.service,
            self.instance.clone(),
            slots,
            load.clone(),
            shutdown.clone(),
        );
        let prepared = Prepared {
            worker: self,
            args,
            load,
        };
        consumer::run(bus, spec, Arc::new(prepared), metrics, shutdown).await
    }
}

struct Prepared<H: Handler> {
    worker: Worker<H>,
    args: WorkerArgs,
    /// What this process runs, reported for queue ETAs.
    load: Arc<crate::queue::Load>,
}

/// What step 1–3 decided for one delivery.
enum Plan {
    Settled(Outcome),
    Run(Box<(JobCtx, JobSpec)>),
}

/// The `id` of a payload that is JSON but not a valid [`JobRequest`], if it has one.
fn job_id_in(payload: &[u8]) -> Option<JobId> {
    let v: serde_json::Value = serde_json::from_slice(payload).ok()?;
    JobId::parse(v.get("id")?.as_str()?)
}

/// An error as the job's record and events show it: without the server's paths, and without a
/// backtrace a library captured into its message (with `RUST_BACKTRACE` set).
fn public(mut e: ErrorInfo) -> ErrorInfo {
    if let Some(at) = e.message.find("\n   0: ") {
        e.message.truncate(at);
    }
    e.message = crate::redact::paths(&e.message);
    e
}

fn info(code: &str, message: impl Into<String>) -> ErrorInfo {
    ErrorInfo {
        code: code.into(),
        message: message.into(),
    }
}

impl<H: Handler> Prepared<H> {
    fn service(&self) -> Service {
        self.worker.handler.service()
    }

    async fn plan(&self, d: &Delivery) -> Plan {
        let w = &self.worker;
        let mut request: JobRequest = match serde_json::from_slice(d.payload()) {
            Ok(r) => r,
            Err(e) => {
                let job_id = job_id_in(d.payload());
                return Plan::Settled(Outcome::DeadLetter {
                    reason: info(
                        "undecodable",
                        format!("payload is not a valid JobRequest: {e}"),
                    ),
                    job_id,
                });
            }
        };
        let id = request.id;
        // The queue it was taken from, whatever its publisher wrote in it.
        request.priority = atelier_contracts::subjects::priority_of(&d.msg.subject);
        if request.schema_version != SCHEMA_VERSION || request.spec.service() != self.service() {
            // Published straight onto the bus, such a job has no record yet: give it one, so
            // that failing it below leaves the reason where its publisher looks.
            if let Err(e) = w.states.create(&JobRecord::queued(&request)).await {
                if !matches!(e, crate::jobstate::StateError::Exists(_)) {
                    return Plan::Settled(Outcome::Retry(info(
                        "job_state_unavailable",
                        e.to_string(),
                    )));
                }
            }
        }
        if request.schema_version != SCHEMA_VERSION {
            return Plan::Settled(Outcome::DeadLetter {
                reason: info(
                    "unsupported_schema_version",
                    format!(
                        "schema_version {} is not supported (this worker speaks {SCHEMA_VERSION})",
                        request.schema_version
                    ),
                ),
                job_id: Some(id),
            });
        }
        if request.spec.service() != self.service() {
            return Plan::Settled(Outcome::DeadLetter {
                reason: info(
                    "wrong_service",
                    format!(
                        "a {} job arrived at the {} service",
                        request.spec.kind(),
                        self.service()
                    ),
                ),
                job_id: Some(id),
            });
        }
        let instance = w.instance.clone();
        let attempt = d.delivered;
        let max_deaths = self.args.max_worker_deaths;
        let start_running = |r: &mut JobRecord| {
            if r.state.is_terminal() {
                return Change::Keep;
            }
            // Still `running` from an earlier delivery: that attempt never reached an outcome.
            if r.state == JobState::Running && d.delivered > 1 {
                r.interrupted += 1;
                if r.interrupted > max_deaths {
                    // Counted, and not taken: it is failed below. (Taking it first would show it
                    // running here for a moment, and a death then would go uncounted.)
                    return Change::Write;
                }
            }
            r.state = JobState::Running;
            r.attempts += 1;
            r.worker = Some(instance.clone());
            Change::Write
        };
        let hint = (d.delivered == 1)
            .then(|| {
                d.msg
                    .headers
                    .as_ref()?
                    .get(RECORD_REVISION_HEADER)?
                    .as_str()
                    .parse::<u64>()
                    .ok()
            })
            .flatten()
            .map(|rev| (JobRecord::queued(&request), rev));
        let mut record = w.states.update_from(id, hint, start_running).await;
        if let Err(crate::jobstate::StateError::Missing(_)) = record {
            // Jobs published straight onto the bus (not through the gateway) get their record here.
            match w.states.create(&JobRecord::queued(&request)).await {
                Ok(_) | Err(crate::jobstate::StateError::Exists(_)) => {}
                Err(e) => {
                    return Plan::Settled(Outcome::Retry(info(
                        "job_state_unavailable",
                        e.to_string(),
                    )))
                }
            }
            record = w.states.update_from(id, None, start_running).await;
        }
        let (record, revision) = match record {
            Ok(r) => r,
            Err(e) => {
                return Plan::Settled(Outcome::Retry(info("job_state_unavailable", e.to_string())))
            }
        };
        if record.state == JobState::Running && record.interrupted > self.args.max_worker_deaths {
            return Plan::Settled(self.fail_interrupted(&record).await);
        }
        match record.state {
            JobState::Running if record.worker.as_deref() == Some(w.instance.as_str()) => {}
            JobState::Succeeded => {
                w.metrics.job(self.service().name(), "duplicate");
                return Plan::Settled(match self.publish_done(&record, 0).await {
                    Ok(()) => Outcome::Ack,
                    Err(e) => Outcome::Retry(info("bus_unavailable", e.to_string())),
                });
            }
            _ => {
                w.metrics.job(self.service().name(), "duplicate");
                return Plan::Settled(Outcome::Ack);
            }
        }
        let ctx = JobCtx {
            id,
            attempt: attempt.max(record.attempts),
            service: self.service(),
            priority: request.priority,
            store: w.store.clone(),
            bus: w.bus.clone(),
            states: w.states.clone(),
            cancel: CancellationToken::new(),
            last_state: Arc::new(std::sync::Mutex::new(Some((record, revision)))),
            reported: Default::default(),
            slot: d.slot.clone(),
        };
        Plan::Run(Box::new((ctx, request.spec)))
    }

    /// Fails a job whose attempts keep ending with their worker's death instead of running it
    /// again (a job that needs more memory than the worker has would take it down every time).
    async fn fail_interrupted(&self, record: &JobRecord) -> Outcome {
        let error = info(
            "worker_died",
            format!(
                "{} attempts of this job ended with their worker's death (killed or out of \
                 memory?) and it is not tried again (--max-worker-deaths {}); check what it \
                 needs (resolution, batch size, model) against the worker's memory",
                record.interrupted, self.args.max_worker_deaths
            ),
        );
        tracing::error!(job = %record.id, interrupted = record.interrupted, "failing a job that keeps killing its workers");
        match self.fail(record.id, error).await {
            Ok(()) => {
                self.worker.metrics.job(self.service().name(), "failed");
                Outcome::Ack
            }
            Err(e) => Outcome::Retry(info("job_state_unavailable", e.to_string())),
        }
    }

    async fn publish_done(&self, record: &JobRecord, duration_ms: u64) -> anyhow::Result<()> {
        let Some(output) = record.output.clone() else {
            return Ok(());
        };
        let done = JobDone {
            schema_version: SCHEMA_VERSION,
            id: record.id,
            service: record.service,
            output,
            attempts: record.attempts,
            duration_ms,
            finished_at: record.updated_at,
        };
        self.worker
            .bus
            .publish_json(
                record.service.done_subject(),
                Some(&format!("{}.done", record.id)),
                &done,
            )
            .await
            .map(|_| ())
    }

    async fn fail(&self, id: JobId, error: ErrorInfo) -> anyhow::Result<()> {
        let w = &self.worker;
        let error = public(error);
        let e = error.clone();
        let updated = w
            .states
            .update(id, |r| {
                if r.state.is_terminal() {
                    return Change::Keep;
                }
                r.state = JobState::Failed;
                r.error = Some(e.clone());
                Change::Write
            })
            .await;
        let failed = match updated {
            Ok(record) if record.state == JobState::Failed => Some(JobFailed {
                schema_version: SCHEMA_VERSION,
                id,
                service: record.service,
                error,
                attempts: record.attempts,
                finished_at: record.updated_at,
            }),
            Ok(_) => None,
            // A request of a kind this build does not know, published straight onto the bus: no
            // record can hold it, but its publisher still learns why from the `failed` event.
            Err(crate::jobstate::StateError::Missing(_)) => Some(JobFailed {
                schema_version: SCHEMA_VERSION,
                id,
                service: self.service(),
                error,
                attempts: 0,
                finished_at: chrono::Utc::now(),
            }),
            Err(e) => return Err(e.into()),
        };
        if let Some(failed) = failed {
            w.bus
                .publish_json(
                    failed.service.failed_subject(),
                    Some(&format!("{id}.failed")),
                    &failed,
                )
                .await?;
        }
        Ok(())
    }

    async fn finish(
        &self,
        d: &Delivery,
        ctx: &JobCtx,
        result: Result<JobOutput, JobError>,
        elapsed: Duration,
    ) -> Outcome {
        let w = &self.worker;
        let service = self.service().name();
        let result = if ctx.is_cancelled() {
            Err(JobError::Cancelled)
        } else {
            result
        };
        match result {
            Ok(output) => {
                let out = output.clone();
                let record = w
                    .states
                    .update_from(ctx.id, ctx.take_known(), |r| {
                        if r.state.is_terminal() {
                            return Change::Keep;
                        }
                        r.state = JobState::Succeeded;
                        r.output = Some(out.clone());
                        r.error = None;
                        r.progress = Some(Progress {
                            fraction: 1.0,
                            message: None,
                            preview: None,
                        });
                        Change::Write
                    })
                    .await;
                match record.map(|(r, _)| r) {
                    Ok(r) if r.state == JobState::Succeeded => {
                        match self.publish_done(&r, elapsed.as_millis() as u64).await {
                            Ok(()) => {
                                w.metrics.job(service, "succeeded");
                                Outcome::Ack
                            }
                            // The record says succeeded: the redelivery re-publishes, nothing reruns.
                            Err(e) => Outcome::Retry(info("bus_unavailable", e.to_string())),
                        }
                    }
                    Ok(_) => {
                        w.metrics.job(service, "cancelled");
                        Outcome::Ack
                    }
                    Err(e) => Outcome::Retry(info("job_state_unavailable", e.to_string())),
                }
            }
            Err(JobError::Cancelled) => {
                w.metrics.job(service, "cancelled");
                Outcome::Ack
            }
            Err(JobError::Permanent(error)) => {
                tracing::warn!(job = %ctx.id, code = %error.code, message = %error.message, "job failed");
                match self.fail(ctx.id, error).await {
                    Ok(()) => {
                        w.metrics.job(service, "failed");
                        Outcome::Ack
                    }
                    Err(e) => Outcome::Retry(info("job_state_unavailable", e.to_string())),
                }
            }
            Err(JobError::Retryable(error)) => {
                if d.delivered >= self.args.max_deliver.max(1) {
                    // The consumer dead-letters it; `dead_lettered` fails the job.
                    return Outcome::Retry(error);
                }
                let e = public(error.clone());
                let _ = w
                    .states
                    .update(ctx.id, |r| {
                        if r.state != JobState::Running {
                            return Change::Keep;
                        }
                        r.state = JobState::Queued;
                        r.error = Some(e.clone());
                        Change::Write
                    })
                    .await;
                Outcome::Retry(error)
            }
        }
    }
}

impl<H: Handler> Processor for Prepared<H> {
    async fn process(&self, batch: Vec<Arc<Delivery>>) -> Vec<Outcome> {
        let plans = join_all(batch.iter().map(|d| self.plan(d))).await;
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
        let mut runs = Vec::new();
        for (i, plan) in plans.into_iter().enumerate() {
            match plan {
                Plan::Settled(o) => outcomes.push(Some(o)),
                Plan::Run(run) => {
                    let (ctx, spec) = *run;
                    outcomes.push(None);
                    runs.push((i, ctx, spec));
                }
            }
        }
        if runs.is_empty() {
            return outcomes
                .into_iter()
                .map(|o| o.unwrap_or(Outcome::Ack))
                .collect();
        }
        let w = &self.worker;
        let label = ServiceLabel {
            service: self.service().name().into(),
        };
        w.metrics
            .in_flight
            .get_or_create(&label)
            .inc_by(runs.len() as i64);
        // Cancellation: poll the records of the running jobs once a second.
        let watcher = {
            let states = w.states.clone();
            let watched: Vec<(JobId, CancellationToken)> = runs
                .iter()
                .map(|(_, ctx, _)| (ctx.id, ctx.cancel.clone()))
                .collect();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    for (id, token) in &watched {
                        if let Ok(Some((r, _))) = states.get(*id).await {
                            if r.state == JobState::Cancelled && !token.is_cancelled() {
                                tracing::info!(job = %id, "cancelled while running");
                                token.cancel();
                            }
                        }
                    }
                }
            })
        };
        self.load.started(runs.len() as u64);
        let start = Instant::now();
        let jobs: Vec<(JobCtx, JobSpec)> = runs
            .iter()
            .map(|(_, c, s)| (c.clone(), s.clone()))
            .collect();
        let results = w.handler.handle_batch(jobs).await;
        let elapsed = start.elapsed();
        watcher.abort();
        w.metrics
            .in_flight
            .get_or_create(&label)
            .dec_by(runs.len() as i64);
        let per_job = elapsed.as_secs_f64() / runs.len() as f64;
        self.load
            .finished(runs.len() as u64, Duration::from_secs_f64(per_job));
        let mut results = results.into_iter();
        for (i, ctx, _) in &runs {
            w.metrics.job_seconds.get_or_create(&label).observe(per_job);
            let result = results.next().unwrap_or_else(|| {
                Err(JobError::retryable(
                    "internal",
                    "handler returned too few results",
                ))
            });
            outcomes[*i] = Some(self.finish(&batch[*i], ctx, result, elapsed).await);
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::Ack))
            .collect()
    }

    async fn dead_lettered(&self, d: &Delivery, job_id: Option<JobId>, reason: &ErrorInfo) {
        let id = job_id.or_else(|| job_id_in(d.payload()));
        if let Some(id) = id {
            let mut reason = reason.clone();
            reason.message = format!(
                "{} (dead-lettered after {} deliveries)",
                reason.message, d.delivered
            );
            if let Err(e) = self.fail(id, reason).await {
                tracing::debug!(job = %id, error = %e, "no job record to fail");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn public_errors_lose_backtraces() {
        let e = super::public(super::info(
            "compute_failed",
            "shape mismatch in add\n   0: candle_core::error::Error::bt\n   1: x",
        ));
        assert_eq!(e.message, "shape mismatch in add");
    }
}
