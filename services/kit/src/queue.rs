//! Where a queued job stands: its position across the service's priority queues and an ETA from
//! what the service's workers report.
//!
//! Each priority has a stream of its own, so within one queue stream sequences count jobs: the
//! jobs ahead of a queued job in its queue are those between the queue consumer's last delivered
//! sequence and the job's own message, found by a binary search over the undelivered messages by
//! job id (ids are UUIDv7, ordered by submission time). Every undelivered job of a higher queue is
//! ahead of it too. Workers put a [`WorkerReport`] (slots, jobs held, mean run time) into the
//! workers bucket every few seconds; the ETA divides the jobs to finish first by the slots.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::{kv, stream};
use atelier_contracts::{JobId, JobRecord, JobState, Priority, QueuePlace, Service, WorkerReport};
use tokio_util::sync::CancellationToken;

use crate::Bus;

/// A report is dropped from the bucket this long after the last write of its worker.
pub const REPORT_TTL: Duration = Duration::from_secs(60);
/// How often a worker reports.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Weight of the newest run time in the mean.
const EWMA_WEIGHT: f64 = 0.2;

/// What a worker process is doing, kept by its consumer loop and reported.
#[derive(Default)]
pub struct Load {
    running: AtomicU64,
    mean_run_s: Mutex<Option<f64>>,
}

impl Load {
    pub fn started(&self, jobs: u64) {
        self.running.fetch_add(jobs, Ordering::Relaxed);
    }

    /// `jobs` ended after `per_job` each.
    pub fn finished(&self, jobs: u64, per_job: Duration) {
        self.running.fetch_sub(jobs, Ordering::Relaxed);
        let secs = per_job.as_secs_f64();
        let mut mean = self.mean_run_s.lock().unwrap_or_else(|p| p.into_inner());
        *mean = Some(match *mean {
            None => secs,
            Some(m) => m + EWMA_WEIGHT * (secs - m),
        });
    }

    fn report(
        &self,
        service: Service,
        instance: &str,
        slots: u64,
        gpus: Vec<atelier_contracts::GpuMemory>,
    ) -> WorkerReport {
        WorkerReport {
            service,
            instance: instance.to_owned(),
            slots,
            running: self.running.load(Ordering::Relaxed),
            mean_run_s: *self.mean_run_s.lock().unwrap_or_else(|p| p.into_inner()),
            rss_bytes: crate::memory::rss_bytes(),
            gpus,
            at: chrono::Utc::now(),
        }
    }
}

fn report_key(service: Service, instance: &str) -> String {
    let instance: String = instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{}.{instance}", service.name())
}

/// Reports `load` every [`REPORT_EVERY`] until `shutdown`, then removes the report.
pub fn spawn_reporter(
    bus: Bus,
    service: Service,
    instance: String,
    slots: u64,
    load: Arc<Load>,
    shutdown: CancellationToken,
) {
    tokio::spawn(async move {
        let key = report_key(service, &instance);
        let gpus = crate::gpus::Gpus::default();
        let mut store: Option<kv::Store> = None;
        loop {
            if store.is_none() {
                store = bus.workers_kv().await.ok();
            }
            if let Some(s) = &store {
                let report = load.report(service, &instance, slots, gpus.read().await);
                if let Ok(bytes) = serde_json::to_vec(&report) {
                    if let Err(e) = s.put(&key, bytes.into()).await {
                        tracing::debug!(error = %e, "worker report not written");
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(REPORT_EVERY) => {}
            }
        }
        if let Some(s) = store {
            let _ = s.delete(&key).await;
        }
    });
}

/// The reports written within the reports' lifetime by the workers of `service` (every
/// service's when `None`).
pub async fn live_reports(
    bus: &Bus,
    service: Option<Service>,
) -> anyhow::Result<Vec<WorkerReport>> {
    let prefix = service.map_or(String::new(), |s| format!("{}.", s.name()));
    let reports: Vec<(String, WorkerReport)> =
        crate::bus::kv_values(&bus.workers_kv().await?, &prefix).await?;
    let fresh = chrono::Utc::now() - chrono::Duration::from_std(REPORT_TTL)?;
    Ok(reports
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r| r.at >= fresh)
        .collect())
}

/// Where queued job `record` stands now; `None` unless it is queued.
pub async fn place(bus: &Bus, record: &JobRecord) -> anyhow::Result<Option<QueuePlace>> {
    if record.state != JobState::Queued {
        return Ok(None);
    }
    let service = record.service;
    let mut position = 0;
    for p in Priority::ORDER {
        let (stream, delivered) = queue(bus, service, p).await?;
        if p == record.priority {
            position += ahead_in_queue(&stream, delivered, record.id).await?;
            break;
        }
        let state = stream.cached_info().state.clone();
        position += state
            .last_sequence
            .saturating_sub(delivered.max(state.first_sequence.saturating_sub(1)));
    }
    let live = live_reports(bus, Some(service)).await?;
    let slots: u64 = live.iter().map(|r| r.slots).sum();
    let running: u64 = live.iter().map(|r| r.running).sum();
    let means: Vec<f64> = live.iter().filter_map(|r| r.mean_run_s).collect();
    let eta_s = (slots > 0 && !means.is_empty()).then(|| {
        let mean = means.iter().sum::<f64>() / means.len() as f64;
        let before = (position + running + 1).saturating_sub(slots);
        before as f64 * mean / slots as f64
    });
    Ok(Some(QueuePlace {
        position,
        running,
        slots,
        eta_s,
    }))
}

/// A priority queue's stream and the last sequence its consumer handed out (before the first
/// message when no worker has bound it yet).
async fn queue(
    bus: &Bus,
    service: Service,
    priority: Priority,
) -> anyhow::Result<(stream::Stream, u64)> {
    let stream = bus
        .js
        .get_stream(service.request_stream_for(priority))
        .await?;
    let first = stream.cached_info().state.first_sequence;
    let delivered = match stream
        .get_consumer::<pull::Config>(&service.consumer_for(priority))
        .await
    {
        // Fetched just now by the lookup: no second request.
        Ok(c) => c.cached_info().delivered.stream_sequence,
        Err(_) => first.saturating_sub(1),
    };
    Ok((stream, delivered))
}

#[derive(serde::Deserialize)]
struct IdOnly {
    id: JobId,
}

/// Undelivered messages of `stream` queued before job `id`: a binary search over
/// `delivered + 1 ..= last` for the first message whose job id is not below `id`.
async fn ahead_in_queue(stream: &stream::Stream, delivered: u64, id: JobId) -> anyhow::Result<u64> {
    let state = &stream.cached_info().state;
    let lo_start = (delivered + 1).max(state.first_sequence);
    let (mut lo, mut hi) = (lo_start, state.last_sequence + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        // A message gone from the middle was taken already: count it as queued earlier.
        let earlier = match stream.get_raw_message(mid).await {
            Ok(m) => serde_json::from_slice::<IdOnly>(&m.payload).map_or(true, |m| m.id < id),
            Err(_) => true,
        };
        if earlier {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    Ok(lo - lo_start)
}
