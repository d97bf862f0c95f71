//! Listing jobs: a filtered page of the `atelier_jobs` bucket, newest first, read in one pass
//! that holds at most a page of records whatever the bucket's size (records are kept 30 days).
//! Job ids are UUIDv7, so id order is submission order and an id is a stable cursor.

use std::collections::BTreeMap;

use atelier_contracts::{JobId, JobRecord, JobState};
use chrono::{DateTime, Utc};

use crate::jobstate::{JobStates, StateError};

/// Which jobs a listing wants; `None` fields match everything.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    /// Only jobs submitted by this API key name.
    pub owner: Option<String>,
    pub kind: Option<String>,
    pub state: Option<JobState>,
    /// Only jobs submitted at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only jobs older than this one (the previous page's cursor).
    pub before: Option<JobId>,
}

impl JobFilter {
    pub fn matches(&self, r: &JobRecord) -> bool {
        self.owner
            .as_ref()
            .is_none_or(|o| r.submitted_by.as_ref() == Some(o))
            && self.kind.as_ref().is_none_or(|k| *k == r.kind)
            && self.state.is_none_or(|s| s == r.state)
            && self.since.is_none_or(|t| r.created_at >= t)
            && self.before.is_none_or(|b| r.id < b)
    }
}

/// Up to `limit` matching records, newest first, and whether older ones match too.
pub async fn page(
    states: &JobStates,
    filter: &JobFilter,
    limit: usize,
) -> Result<(Vec<JobRecord>, bool), StateError> {
    let keep = limit + 1;
    let mut newest: BTreeMap<JobId, JobRecord> = BTreeMap::new();
    crate::bus::kv_for_each(states.kv(), "", |_, r: JobRecord| {
        if !filter.matches(&r) {
            return;
        }
        // Skip what cannot make the page before building anything.
        if newest.len() == keep && newest.first_key_value().is_some_and(|(k, _)| *k > r.id) {
            return;
        }
        newest.insert(r.id, r);
        if newest.len() > keep {
            newest.pop_first();
        }
    })
    .await
    .map_err(|e| StateError::Nats(format!("{e:#}")))?;
    let more = newest.len() > limit;
    let jobs: Vec<JobRecord> = newest.into_values().rev().take(limit).collect();
    Ok((jobs, more))
}
