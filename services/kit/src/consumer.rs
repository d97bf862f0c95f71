//! The JetStream pull loop shared by every consumer in atelier.
//!
//! One durable pull consumer per service: every replica of the service binds the same durable, so
//! replicas compete for messages and scaling out is running more processes. The loop:
//!
//! - fetches only as many messages as it has free slots (`--concurrency` × batch size), so a busy
//!   replica leaves work to idle ones; `max_ack_pending` bounds unacked work across replicas;
//! - hands batches of up to `batch_size` deliveries to a [`Processor`];
//! - sends in-progress acks (`+WPI`) every third of `ack_wait` while a batch runs, so long jobs are
//!   not redelivered, while a killed process's jobs are redelivered after `ack_wait`;
//! - settles each delivery as the processor says: ack, nak with exponential backoff, or dead-letter
//!   (publish a [`DeadLetter`] to `atelier.v1.dlq.<service>`, then terminate the message);
//! - enforces `max_deliver` itself (the server-side limit is unlimited), so a message whose every
//!   delivery crashed its worker is dead-lettered, not silently dropped;
//! - on shutdown stops fetching, finishes and settles what it holds, and returns.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::consumer::{pull, AckPolicy};
use async_nats::jetstream::{self, AckKind};
use atelier_contracts::{DeadLetter, ErrorInfo, JobId, Priority, Service, SCHEMA_VERSION};
use futures::{FutureExt as _, StreamExt};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::WorkerArgs;
use crate::telemetry::{Metrics, ServiceLabel};
use crate::Bus;

/// One durable a loop consumes: a stream and the subject it takes from it.
#[derive(Debug, Clone)]
pub struct Lane {
    pub stream: String,
    pub durable: String,
    pub filter_subject: String,
}

/// Which durables a loop consumes, in the order it takes from them.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    pub service: Service,
    /// With more than one, the loop takes nothing from a lane while an earlier one has messages.
    pub lanes: Vec<Lane>,
    pub batch_size: usize,
    pub args: WorkerArgs,
}

impl ConsumerSpec {
    /// The work queues of a service: high, normal, low priority.
    pub fn requests(service: Service, batch_size: usize, args: WorkerArgs) -> Self {
        let lanes = Priority::ORDER
            .map(|p| Lane {
                stream: service.request_stream_for(p),
                durable: service.consumer_for(p),
                filter_subject: service.request_subject_for(p),
            })
            .to_vec();
        Self {
            service,
            lanes,
            batch_size: batch_size.max(1),
            args,
        }
    }
}

/// One message as handed to a processor.
pub struct Delivery {
    pub msg: jetstream::Message,
    /// 1 for the first delivery.
    pub delivered: u64,
    pub stream_sequence: u64,
    /// The concurrency slot the delivery's batch holds.
    pub slot: Slot,
}

/// A batch's share of `--concurrency`, held until the batch is settled or released earlier by a
/// job that only waits on others (a run waiting for its shards): the loop then fetches more.
#[derive(Clone, Default)]
pub struct Slot(Arc<std::sync::Mutex<Option<tokio::sync::OwnedSemaphorePermit>>>);

impl Slot {
    fn holding(permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        Self(Arc::new(std::sync::Mutex::new(Some(permit))))
    }

    /// Gives the slot back to the loop (the batch's messages stay held and heartbeated).
    pub fn release(&self) {
        let permit = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        drop(permit);
    }
}

impl Delivery {
    pub fn payload(&self) -> &[u8] {
        &self.msg.payload
    }
}

/// How a delivery is settled.
#[derive(Debug, Clone)]
pub enum Outcome {
    Ack,
    /// Try again after a backoff, or dead-letter if this was delivery `max_deliver`.
    Retry(ErrorInfo),
    /// Never retry: publish to the dead-letter stream and terminate.
    DeadLetter {
        reason: ErrorInfo,
        job_id: Option<JobId>,
    },
}

/// What a consumer does with its deliveries.
pub trait Processor: Send + Sync + 'static {
    /// Processes a batch (at most the spec's `batch_size`) and returns one outcome per delivery, in
    /// order.
    fn process(&self, batch: Vec<Arc<Delivery>>) -> impl Future<Output = Vec<Outcome>> + Send;

    /// Called once a delivery has been dead-lettered (for example to mark its job failed).
    fn dead_lettered(
        &self,
        _delivery: &Delivery,
        _job_id: Option<JobId>,
        _reason: &ErrorInfo,
    ) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Binds a lane's durable consumer, creating it or updating its settings (`ack_wait`,
/// `max_ack_pending`) to this process's; with replicas configured differently, the last started wins.
pub async fn bind(
    bus: &Bus,
    spec: &ConsumerSpec,
    lane: &Lane,
) -> anyhow::Result<jetstream::consumer::Consumer<pull::Config>> {
    let stream = bus.js.get_stream(&lane.stream).await.map_err(|e| {
        anyhow::anyhow!(
            "stream {} is missing ({e}); was the topology declared?",
            lane.stream
        )
    })?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(lane.durable.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: spec.args.ack_wait(),
            // Unlimited on the server: the loop enforces `max_deliver` so nothing is dropped
            // without a dead letter.
            max_deliver: -1,
            max_ack_pending: spec.args.max_ack_pending,
            filter_subject: lane.filter_subject.clone(),
            ..Default::default()
        })
        .await
        .map_err(|e| {
            anyhow::anyhow!("binding consumer {} on {}: {e}", lane.durable, lane.stream)
        })?;
    Ok(consumer)
}

async fn bind_all(bus: &Bus, spec: &ConsumerSpec) -> anyhow::Result<Vec<PullConsumer>> {
    let mut out = Vec::with_capacity(spec.lanes.len());
    for lane in &spec.lanes {
        out.push(bind(bus, spec, lane).await?);
    }
    Ok(out)
}

type PullConsumer = jetstream::consumer::Consumer<pull::Config>;

/// Runs the loop until `shutdown`, then drains. Errors only if the consumer cannot be bound.
pub async fn run<P: Processor>(
    bus: Bus,
    spec: ConsumerSpec,
    processor: Arc<P>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut consumers = bind_all(&bus, &spec).await?;
    let mut wake = match spec.lanes.len() {
        0 => anyhow::bail!("consumer of {} has no lanes", spec.service),
        1 => None,
        _ => Some(Wake::subscribe(&bus, &spec).await?),
    };
    // Fetches in a row that failed; a few mean the consumer may be gone (a JetStream that lost
    // its state, a stream recreated), so it is bound again.
    let mut failures = 0u32;
    let concurrency = spec.args.concurrency.max(1);
    let slots = Arc::new(Semaphore::new(concurrency));
    let mut tasks = JoinSet::new();
    let label = ServiceLabel {
        service: spec.service.name().into(),
    };
    tracing::info!(
        service = %spec.service, lanes = spec.lanes.len(), consumer = %spec.lanes[0].durable,
        concurrency, batch = spec.batch_size, "consuming"
    );
    'outer: loop {
        while let Some(done) = tasks.try_join_next() {
            log_join(done);
        }
        let first = tokio::select! {
            _ = shutdown.cancelled() => break 'outer,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break 'outer },
        };
        let mut permits = vec![first];
        while permits.len() < 256 {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let want = permits.len() * spec.batch_size;
        // With the bus down the fetch request waits for its timeout: shutdown must not.
        let fetched = tokio::select! {
            _ = shutdown.cancelled() => break 'outer,
            b = fetch(&consumers, want, wake.as_mut()) => b,
        };
        let mut messages = match fetched {
            Ok(m) => m,
            Err(e) => {
                metrics.fetch_errors.get_or_create(&label).inc();
                tracing::warn!(error = %e, "fetch failed; retrying");
                drop(permits);
                failures += 1;
                rebind_after_failures(&bus, &spec, &mut consumers, &mut failures).await;
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = tokio::time::sleep(Duration::from_millis(500)) => continue,
                }
            }
        };
        // Messages already delivered to this request are processed even during shutdown (the
        // request lasts at most a second): dropping them would delay them by `ack_wait`.
        let mut pending: Vec<(jetstream::Message, u64, u64)> = Vec::new();
        while let Some(next) = messages.next().await {
            let msg = match next {
                Ok(m) => m,
                Err(e) => {
                    metrics.fetch_errors.get_or_create(&label).inc();
                    tracing::debug!(error = %e, "fetch ended with an error");
                    failures += 1;
                    break;
                }
            };
            failures = 0;
            let (delivered, stream_sequence) = match msg.info() {
                Ok(i) => (i.delivered.max(1) as u64, i.stream_sequence),
                Err(_) => (1, 0),
            };
            pending.push((msg, delivered, stream_sequence));
            if pending.len() >= spec.batch_size {
                let Some(permit) = permits.pop() else { break };
                let batch = std::mem::take(&mut pending);
                spawn_batch(&mut tasks, &bus, &spec, &processor, &metrics, batch, permit);
            }
        }
        rebind_after_failures(&bus, &spec, &mut consumers, &mut failures).await;
        if !pending.is_empty() {
            let permit = match permits.pop() {
                Some(p) => p,
                None => match slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break 'outer,
                },
            };
            spawn_batch(
                &mut tasks, &bus, &spec, &processor, &metrics, pending, permit,
            );
        }
    }
    tracing::info!(service = %spec.service, in_flight = tasks.len(), "draining");
    while let Some(done) = tasks.join_next().await {
        log_join(done);
    }
    tracing::info!(service = %spec.service, "drained");
    Ok(())
}

type Fetched = futures::stream::BoxStream<'static, Result<jetstream::Message, anyhow::Error>>;

/// Up to `want` messages. One lane: a pull request open for a second, its messages handed on as
/// they arrive. Several: the first lane (in priority order) that has messages now gives them;
/// when none has, the loop waits for a publish on any lane's subject ([`Wake`]) and looks again.
async fn fetch(
    consumers: &[PullConsumer],
    want: usize,
    wake: Option<&mut Wake>,
) -> anyhow::Result<Fetched> {
    let Some(wake) = wake else {
        let one = consumers.first().context("no consumer")?;
        let batch = one
            .batch()
            .max_messages(want)
            .expires(Duration::from_millis(1000))
            .messages()
            .await?;
        return Ok(batch.map(|m| m.map_err(|e| anyhow::anyhow!(e))).boxed());
    };
    loop {
        wake.drain();
        for c in consumers {
            let taken = take_now(c, want).await?;
            if !taken.is_empty() {
                return Ok(futures::stream::iter(taken.into_iter().map(Ok)).boxed());
            }
        }
        let woken = tokio::select! {
            subject = wake.next() => subject,
            _ = tokio::time::sleep(IDLE_POLL) => None,
        };
        // A publish reaches its subscribers a moment before its stream has stored it: a pull
        // for one message on the woken lane, held by the server until the message is there
        // (another replica may take it first: the pull then expires and the loop looks again).
        let lane = woken.and_then(|s| wake.lanes.iter().position(|l| *l == s));
        if let Some(c) = lane.and_then(|i| consumers.get(i)) {
            let mut one = c
                .batch()
                .max_messages(1)
                .expires(WAKE_PULL)
                .messages()
                .await?;
            if let Some(Ok(m)) = one.next().await {
                return Ok(futures::stream::iter([Ok(m)]).boxed());
            }
        }
    }
}

/// How long the pull after a wake waits for the woken lane's message.
const WAKE_PULL: Duration = Duration::from_millis(100);

/// With several lanes, how long the loop waits without a publish before looking again (a
/// message retried after a backoff is not published again).
const IDLE_POLL: Duration = Duration::from_millis(250);

/// The messages `consumer` has ready now, up to `want` (a no-wait pull). The server keeps a
/// no-wait pull open while the consumer has messages it may not deliver yet (`max_ack_pending`
/// reached): waiting for those would hold the messages already taken, unprocessed, so the pull is
/// given up after a short wait (dropping it removes its interest; the server then forgets it).
async fn take_now(consumer: &PullConsumer, want: usize) -> anyhow::Result<Vec<jetstream::Message>> {
    let mut batch = consumer.fetch().max_messages(want).messages().await?;
    let mut taken = Vec::new();
    loop {
        let wait = if taken.is_empty() {
            FIRST_WAIT
        } else {
            NEXT_WAIT
        };
        let Ok(next) = tokio::time::timeout(wait, batch.next()).await else {
            break;
        };
        match next {
            None => break,
            Some(Ok(m)) => taken.push(m),
            // What was delivered before the error is processed; the rest is fetched again.
            Some(Err(e)) if !taken.is_empty() => {
                tracing::debug!(error = %e, "fetch ended with an error");
                break;
            }
            Some(Err(e)) => return Err(anyhow::anyhow!(e)),
        }
    }
    Ok(taken)
}

/// How long a no-wait pull may take to answer at all, and then between messages.
const FIRST_WAIT: Duration = Duration::from_millis(250);
const NEXT_WAIT: Duration = Duration::from_millis(25);

/// Core-NATS subscriptions to every lane's subject: a publish on any lane wakes a loop that
/// found every lane empty (JetStream has no pull request spanning several consumers).
struct Wake {
    subs: futures::stream::SelectAll<async_nats::Subscriber>,
    /// Each lane's subject, in the lanes' order.
    lanes: Vec<String>,
}

impl Wake {
    async fn subscribe(bus: &Bus, spec: &ConsumerSpec) -> anyhow::Result<Self> {
        let mut subs = futures::stream::SelectAll::new();
        for lane in &spec.lanes {
            subs.push(bus.client.subscribe(lane.filter_subject.clone()).await?);
        }
        let lanes = spec
            .lanes
            .iter()
            .map(|l| l.filter_subject.clone())
            .collect();
        Ok(Self { subs, lanes })
    }

    /// Forgets the publishes seen so far (the lanes are about to be looked at).
    fn drain(&mut self) {
        while let Some(Some(_)) = self.subs.next().now_or_never() {}
    }

    /// The subject of the next publish on any lane.
    async fn next(&mut self) -> Option<String> {
        match self.subs.next().await {
            Some(m) => Some(m.subject.to_string()),
            // Every subscription closed (the connection is gone): fall back to polling.
            None => std::future::pending().await,
        }
    }
}

/// After [`REBIND_AFTER`] failed fetches in a row, binds the consumers again (creating them if
/// they are gone; their streams must exist). Errors are logged: the loop keeps trying.
async fn rebind_after_failures(
    bus: &Bus,
    spec: &ConsumerSpec,
    consumers: &mut Vec<PullConsumer>,
    failures: &mut u32,
) {
    if *failures < REBIND_AFTER {
        return;
    }
    *failures = 0;
    match bind_all(bus, spec).await {
        Ok(c) => {
            tracing::info!(service = %spec.service, "bound the consumers again after failed fetches");
            *consumers = c;
        }
        Err(e) => tracing::warn!(error = %e, "binding the consumers again"),
    }
}

const REBIND_AFTER: u32 = 3;

/// A batch task that panicked leaves its messages unacked: they are redelivered after `ack_wait`
/// and, if the panic repeats, dead-lettered after `max_deliver`. Say so in the log.
fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            tracing::error!(error = %e, "a handler panicked; its jobs will be redelivered");
        }
    }
}

fn spawn_batch<P: Processor>(
    tasks: &mut JoinSet<()>,
    bus: &Bus,
    spec: &ConsumerSpec,
    processor: &Arc<P>,
    metrics: &Arc<Metrics>,
    batch: Vec<(jetstream::Message, u64, u64)>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let (bus, spec, processor, metrics) = (
        bus.clone(),
        spec.clone(),
        processor.clone(),
        metrics.clone(),
    );
    let slot = Slot::holding(permit);
    let batch = batch
        .into_iter()
        .map(|(msg, delivered, stream_sequence)| {
            Arc::new(Delivery {
                msg,
                delivered,
                stream_sequence,
                slot: slot.clone(),
            })
        })
        .collect();
    tasks.spawn(async move {
        handle_batch(&bus, &spec, &*processor, &metrics, batch).await;
        slot.release();
    });
}

async fn handle_batch<P: Processor>(
    bus: &Bus,
    spec: &ConsumerSpec,
    processor: &P,
    metrics: &Metrics,
    batch: Vec<Arc<Delivery>>,
) {
    let max = spec.args.max_deliver.max(1);
    let (live, exhausted): (Vec<_>, Vec<_>) = batch.into_iter().partition(|d| d.delivered <= max);
    for d in exhausted {
        let reason = ErrorInfo {
            code: "max_deliver_exceeded".into(),
            message: format!(
                "delivered {} times (max_deliver {max}); the worker stopped or crashed during every attempt",
                d.delivered
            ),
        };
        dead_letter(bus, spec, processor, metrics, &d, None, reason).await;
    }
    if live.is_empty() {
        return;
    }
    let heartbeat = {
        let msgs = live.clone();
        let every = spec.args.ack_wait() / 3;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                for d in &msgs {
                    let _ = d.msg.ack_with(AckKind::Progress).await;
                }
            }
        })
    };
    let outcomes = processor.process(live.clone()).await;
    heartbeat.abort();
    for (i, d) in live.iter().enumerate() {
        let outcome = outcomes.get(i).cloned().unwrap_or_else(|| {
            Outcome::Retry(ErrorInfo {
                code: "internal".into(),
                message: "processor returned no outcome for this delivery".into(),
            })
        });
        match outcome {
            Outcome::Ack => {
                if let Err(e) = d.msg.ack().await {
                    tracing::warn!(error = %e, seq = d.stream_sequence, "ack failed; the job may be redelivered (idempotent)");
                }
            }
            Outcome::Retry(reason) if d.delivered >= max => {
                dead_letter(bus, spec, processor, metrics, d, None, reason).await;
            }
            Outcome::Retry(reason) => {
                metrics.job(spec.service.name(), "retried");
                let delay = spec.args.backoff(d.delivered);
                tracing::warn!(seq = d.stream_sequence, delivered = d.delivered, ?delay, code = %reason.code, message = %reason.message, "will retry");
                let _ = d.msg.ack_with(AckKind::Nak(Some(delay))).await;
            }
            Outcome::DeadLetter { reason, job_id } => {
                dead_letter(bus, spec, processor, metrics, d, job_id, reason).await;
            }
        }
    }
}

async fn dead_letter<P: Processor>(
    bus: &Bus,
    spec: &ConsumerSpec,
    processor: &P,
    metrics: &Metrics,
    d: &Delivery,
    job_id: Option<JobId>,
    reason: ErrorInfo,
) {
    let payload = d.payload();
    let cap = payload.len().min(64 * 1024);
    let letter = DeadLetter {
        schema_version: SCHEMA_VERSION,
        service: spec.service,
        subject: d.msg.subject.to_string(),
        stream_sequence: d.stream_sequence,
        deliveries: d.delivered,
        job_id,
        reason: reason.clone(),
        payload: String::from_utf8_lossy(&payload[..cap]).into_owned(),
        at: chrono::Utc::now(),
    };
    // One dead letter per stream message, even if this process dies between publish and term.
    let stream = d
        .msg
        .info()
        .map(|i| i.stream.to_owned())
        .unwrap_or_else(|_| spec.lanes[0].stream.clone());
    let msg_id = format!("dlq.{stream}.{}", d.stream_sequence);
    match bus
        .publish_json(spec.service.dead_letter_subject(), Some(&msg_id), &letter)
        .await
    {
        Ok(_) => {
            tracing::error!(
                service = %spec.service, seq = d.stream_sequence, deliveries = d.delivered,
                code = %reason.code, message = %reason.message, "dead-lettered"
            );
            metrics.job(spec.service.name(), "dead_lettered");
            processor.dead_lettered(d, job_id, &reason).await;
            let _ = d.msg.ack_with(AckKind::Term).await;
        }
        Err(e) => {
            tracing::error!(error = %e, "could not publish a dead letter; leaving the message for redelivery");
            let _ = d
                .msg
                .ack_with(AckKind::Nak(Some(Duration::from_secs(5))))
                .await;
        }
    }
}
