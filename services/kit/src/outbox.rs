//! The publish outbox: what makes "accepted" mean "will run". [`crate::worker::enqueue`] writes
//! the request here before it records the job and publishes it, and removes it once published.
//! A process that dies in between (or a bus that fails mid-publish) leaves the entry behind, and
//! [`reconcile`] — run by every gateway at start and then periodically — publishes any job still
//! `queued` again under its own id as `Nats-Msg-Id`: JetStream drops a second copy of a request it
//! already holds (within the streams' duplicate window, an hour), so nothing runs twice.
//!
//! The outbox only ever holds submissions in flight or interrupted, so a pass reads a handful of
//! entries, never the job table.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use atelier_contracts::{JobRequest, JobState};

use crate::jobstate::JobStates;
use crate::Bus;

/// One submission not yet known to be on the bus.
#[derive(Serialize, Deserialize)]
pub struct Pending {
    pub request: JobRequest,
    pub since: DateTime<Utc>,
}

/// Entries younger than this belong to a submission still in progress.
pub const IN_FLIGHT: Duration = Duration::from_secs(10);

/// What one pass did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reconciled {
    /// Queued jobs whose request was published again.
    pub republished: usize,
    /// Entries dropped: the job had moved on, or was never recorded (never accepted).
    pub cleared: usize,
}

/// One pass over the outbox: entries older than `min_age` are settled.
pub async fn reconcile(
    bus: &Bus,
    states: &JobStates,
    min_age: Duration,
) -> anyhow::Result<Reconciled> {
    let outbox = bus.outbox().await?;
    let mut keys = outbox.keys().await?;
    let mut done = Reconciled::default();
    let cutoff = Utc::now() - chrono::Duration::from_std(min_age)?;
    while let Some(key) = keys.next().await {
        let key = key?;
        let Some(bytes) = outbox.get(&key).await? else {
            continue;
        };
        let Ok(p) = serde_json::from_slice::<Pending>(&bytes) else {
            tracing::warn!(%key, "dropping an outbox entry that does not decode");
            outbox.delete(&key).await?;
            continue;
        };
        if p.since > cutoff {
            continue;
        }
        let id = p.request.id;
        match states.get(id).await? {
            Some((record, revision)) if record.state == JobState::Queued => {
                let subject = p
                    .request
                    .spec
                    .service()
                    .request_subject_for(p.request.priority);
                let headers = [(crate::worker::RECORD_REVISION_HEADER, revision.to_string())];
                bus.publish_json_with(subject, Some(&id.to_string()), &headers, &p.request)
                    .await?;
                tracing::info!(job = %id, "republished a queued job left in the outbox");
                done.republished += 1;
            }
            _ => done.cleared += 1,
        }
        outbox.delete(&key).await?;
    }
    Ok(done)
}

/// [`reconcile`] now and every `every` until `shutdown` (failures are logged and retried).
pub fn spawn_reconciler(bus: Bus, states: JobStates, every: Duration, shutdown: CancellationToken) {
    tokio::spawn(async move {
        loop {
            match reconcile(&bus, &states, IN_FLIGHT).await {
                Ok(r) if r != Reconciled::default() => tracing::info!(?r, "outbox reconciled"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reconciling the outbox"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}
