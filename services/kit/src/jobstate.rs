//! Job state in the `atelier_jobs` JetStream KV bucket, one [`JobRecord`] per job id.
//!
//! Every change is a compare-and-set on the key's revision ([`JobStates::update`]), so a gateway
//! cancelling a job and a worker finishing it can never overwrite each other: whichever writes
//! second sees the first's state and decides again.

use async_nats::jetstream::kv;
use atelier_contracts::{JobId, JobRecord};
use futures::{Stream, StreamExt};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("job state bucket: {0}")]
    Nats(String),
    #[error("job record {0} is not valid JSON: {1}")]
    Corrupt(JobId, serde_json::Error),
    #[error("job {0} already exists")]
    Exists(JobId),
    #[error("job {0} does not exist")]
    Missing(JobId),
    #[error("job {0} changed concurrently too many times")]
    Contended(JobId),
}

/// What an update closure decided.
pub enum Change {
    /// Write the modified record.
    Write,
    /// Leave the record as it is.
    Keep,
}

#[derive(Clone)]
pub struct JobStates {
    kv: kv::Store,
}

impl JobStates {
    pub fn new(kv: kv::Store) -> Self {
        Self { kv }
    }

    pub(crate) fn kv(&self) -> &kv::Store {
        &self.kv
    }

    fn decode(id: JobId, bytes: &[u8]) -> Result<JobRecord, StateError> {
        serde_json::from_slice(bytes).map_err(|e| StateError::Corrupt(id, e))
    }

    /// Creates the record; fails with [`StateError::Exists`] if the id is taken.
    pub async fn create(&self, record: &JobRecord) -> Result<u64, StateError> {
        let bytes = serde_json::to_vec(record).expect("records serialize");
        match self.kv.create(record.id.to_string(), bytes.into()).await {
            Ok(rev) => Ok(rev),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                Err(StateError::Exists(record.id))
            }
            Err(e) => Err(StateError::Nats(e.to_string())),
        }
    }

    /// Cancels job `id` unless it has finished: queued jobs never start, running ones see it
    /// within a second. Returns the record (its state says which happened).
    pub async fn cancel(&self, id: JobId) -> Result<JobRecord, StateError> {
        self.update(id, |r| {
            if r.state.is_terminal() {
                Change::Keep
            } else {
                r.state = atelier_contracts::JobState::Cancelled;
                Change::Write
            }
        })
        .await
    }

    /// The records of `ids`, in order, read 64 at a time (None: absent or undecodable).
    pub async fn get_many(&self, ids: &[JobId]) -> Result<Vec<Option<JobRecord>>, StateError> {
        let keys: Vec<String> = ids.iter().map(ToString::to_string).collect();
        crate::bus::kv_get_many(&self.kv, &keys)
            .await
            .map_err(|e| StateError::Nats(format!("{e:#}")))
    }

    /// The record and its revision.
    pub async fn get(&self, id: JobId) -> Result<Option<(JobRecord, u64)>, StateError> {
        match self.kv.entry(id.to_string()).await {
            Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                Ok(Some((Self::decode(id, &entry.value)?, entry.revision)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(StateError::Nats(e.to_string())),
        }
    }

    /// Read-modify-write with compare-and-set; retries on concurrent changes. Returns the record as
    /// stored afterwards.
    pub async fn update<F>(&self, id: JobId, f: F) -> Result<JobRecord, StateError>
    where
        F: FnMut(&mut JobRecord) -> Change,
    {
        self.update_from(id, None, f).await.map(|(r, _)| r)
    }

    /// Like [`JobStates::update`], starting from a `(record, revision)` the caller already holds
    /// (saving a read when nobody changed it since). Returns the stored record and its revision.
    pub async fn update_from<F>(
        &self,
        id: JobId,
        mut known: Option<(JobRecord, u64)>,
        mut f: F,
    ) -> Result<(JobRecord, u64), StateError>
    where
        F: FnMut(&mut JobRecord) -> Change,
    {
        for _ in 0..32 {
            let (mut record, rev) = match known.take() {
                Some(k) => k,
                None => self.get(id).await?.ok_or(StateError::Missing(id))?,
            };
            match f(&mut record) {
                Change::Keep => return Ok((record, rev)),
                Change::Write => {
                    record.updated_at = chrono::Utc::now();
                    let bytes = serde_json::to_vec(&record).expect("records serialize");
                    match self
                        .kv
                        .update(id.to_string(), bytes.clone().into(), rev)
                        .await
                    {
                        Ok(new_rev) => return Ok((record, new_rev)),
                        Err(e) => {
                            // Wrong last revision means someone else wrote: read again and redo.
                            // Anything else is a real failure, unless the revision moved anyway
                            // — by this very write (its acknowledgement lost), which must not be
                            // applied twice, or by another.
                            match self.kv.entry(id.to_string()).await {
                                Ok(Some(now)) if now.revision != rev && now.value == bytes => {
                                    return Ok((record, now.revision))
                                }
                                Ok(Some(now)) if now.revision != rev => continue,
                                _ => return Err(StateError::Nats(e.to_string())),
                            }
                        }
                    }
                }
            }
        }
        Err(StateError::Contended(id))
    }

    /// Every version of the record from now on, starting with the current one.
    pub async fn watch(
        &self,
        id: JobId,
    ) -> Result<impl Stream<Item = Result<JobRecord, StateError>>, StateError> {
        let watch = self
            .kv
            .watch_with_history(id.to_string())
            .await
            .map_err(|e| StateError::Nats(e.to_string()))?;
        Ok(watch.filter_map(move |entry| async move {
            match entry {
                Ok(e) if e.operation == kv::Operation::Put => Some(Self::decode(id, &e.value)),
                Ok(_) => None,
                Err(e) => Some(Err(StateError::Nats(e.to_string()))),
            }
        }))
    }
}
