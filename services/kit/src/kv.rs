//! Typed key-value buckets: a [`Kv<V>`] reads and writes only `V`s, in the one bucket whose
//! values are `V` ([`atelier_contracts::typed`]).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use anyhow::Context as _;
use async_nats::jetstream::kv;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bus::{kv_get_many, kv_put_many, kv_values};

/// An open bucket of `V` values (JSON).
pub struct Kv<V> {
    store: kv::Store,
    value: PhantomData<fn() -> V>,
}

impl<V> Clone for Kv<V> {
    fn clone(&self) -> Self {
        Self {
            store: self.store.clone(),
            value: PhantomData,
        }
    }
}

/// Why a compare-and-set [`Kv::write`] did not write.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The key changed (or exists) since it was read.
    #[error("another writer came first: {0}")]
    Conflict(String),
    #[error("{0:#}")]
    Other(anyhow::Error),
}

const MODIFY_TRIES: usize = 200;

/// Per key this process is modifying, the turn its writers take one after another.
type Turns = Mutex<HashMap<(String, String), Weak<tokio::sync::Mutex<()>>>>;
static TURNS: LazyLock<Turns> = LazyLock::new(Default::default);

/// The turn of this process's writers of `key` in `bucket`: [`Kv::modify`] holds it, so
/// compare-and-set only races other processes (a hundred concurrent writers of one key in one
/// process — every caption of a run adding to its spend — otherwise retried each other past any
/// bound).
fn turn(bucket: &str, key: &str) -> Arc<tokio::sync::Mutex<()>> {
    let mut turns = TURNS.lock().unwrap_or_else(|p| p.into_inner());
    let id = (bucket.to_owned(), key.to_owned());
    if let Some(t) = turns.get(&id).and_then(Weak::upgrade) {
        return t;
    }
    turns.retain(|_, t| t.strong_count() > 0);
    let t = Arc::new(tokio::sync::Mutex::new(()));
    turns.insert(id, Arc::downgrade(&t));
    t
}

/// A key's current value and revision (for compare-and-set writes with [`Kv::write`]).
pub struct Entry<V> {
    /// The value, or why it does not decode as a `V`.
    pub value: Result<V, String>,
    pub revision: u64,
}

impl<V: Serialize + DeserializeOwned> Kv<V> {
    pub(crate) fn new(store: kv::Store) -> Self {
        Self {
            store,
            value: PhantomData,
        }
    }

    /// The value under `key` (None when absent, deleted, or not a `V`, with a warning).
    pub async fn get(&self, key: &str) -> anyhow::Result<Option<V>> {
        Ok(self.entry(key).await?.and_then(|e| match e.value {
            Ok(v) => Some(v),
            Err(why) => {
                tracing::warn!(key = %key, error = %why, "ignoring an undecodable KV value");
                None
            }
        }))
    }

    /// The value under `key` with its revision (None when absent or deleted).
    pub async fn entry(&self, key: &str) -> anyhow::Result<Option<Entry<V>>> {
        let Some(e) = self
            .store
            .entry(key)
            .await
            .with_context(|| format!("reading KV key {key}"))?
        else {
            return Ok(None);
        };
        if e.operation != kv::Operation::Put {
            return Ok(None);
        }
        Ok(Some(Entry {
            value: serde_json::from_slice(&e.value).map_err(|e| e.to_string()),
            revision: e.revision,
        }))
    }

    /// Writes `value` under `key`; returns the new revision.
    pub async fn put(&self, key: &str, value: &V) -> anyhow::Result<u64> {
        let bytes = serde_json::to_vec(value)?;
        self.store
            .put(key, bytes.into())
            .await
            .with_context(|| format!("writing KV key {key}"))
    }

    /// Compare-and-set: writes `value` under `key` only if the key is still at `revision` (None:
    /// only if it does not exist); [`WriteError::Conflict`] when another writer came first.
    pub async fn write(
        &self,
        key: &str,
        value: &V,
        revision: Option<u64>,
    ) -> Result<u64, WriteError> {
        let bytes = serde_json::to_vec(value).map_err(|e| WriteError::Other(e.into()))?;
        match revision {
            Some(rev) => self
                .store
                .update(key, bytes.into(), rev)
                .await
                .map_err(|e| match e.kind() {
                    kv::UpdateErrorKind::WrongLastRevision => WriteError::Conflict(e.to_string()),
                    _ => WriteError::Other(
                        anyhow::Error::new(e).context(format!("updating KV key {key}")),
                    ),
                }),
            None => self
                .store
                .create(key, bytes.into())
                .await
                .map_err(|e| match e.kind() {
                    kv::CreateErrorKind::AlreadyExists => WriteError::Conflict(e.to_string()),
                    _ => WriteError::Other(
                        anyhow::Error::new(e).context(format!("creating KV key {key}")),
                    ),
                }),
        }
    }

    /// Read-modify-write under compare-and-set, retried while other writers come first: `f` sees
    /// the current value (None when absent or undecodable) and returns the value to write (None:
    /// write nothing) and what to answer. This process's writers of `key` take turns; writers in
    /// other processes are raced, with a short random pause after each loss.
    pub async fn modify<T>(
        &self,
        key: &str,
        mut f: impl FnMut(Option<&V>) -> (Option<V>, T),
    ) -> anyhow::Result<T> {
        let turn = turn(&self.store.name, key);
        let _turn = turn.lock().await;
        for attempt in 0..MODIFY_TRIES {
            if attempt > 0 {
                let ms = rand::random::<u64>() % (attempt as u64).min(20);
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            let entry = self.entry(key).await?;
            let revision = entry.as_ref().map(|e| e.revision);
            let current = entry.and_then(|e| e.value.ok());
            let (next, answer) = f(current.as_ref());
            let Some(next) = next else {
                return Ok(answer);
            };
            match self.write(key, &next, revision).await {
                Ok(_) => return Ok(answer),
                Err(WriteError::Conflict(_)) => continue,
                Err(WriteError::Other(e)) => return Err(e),
            }
        }
        anyhow::bail!("KV key {key}: {MODIFY_TRIES} concurrent writers in a row came first")
    }

    /// The values under `keys`, in order (see [`kv_get_many`]).
    pub async fn get_many(&self, keys: &[String]) -> anyhow::Result<Vec<Option<V>>> {
        kv_get_many(&self.store, keys).await
    }

    /// Writes every (key, value) (see [`kv_put_many`]).
    pub async fn put_many(&self, items: &[(String, V)]) -> anyhow::Result<()> {
        kv_put_many(&self.store, items).await
    }

    /// Every value whose key starts with `prefix`, with its key (see [`kv_values`]).
    pub async fn values(&self, prefix: &str) -> anyhow::Result<Vec<(String, V)>> {
        kv_values(&self.store, prefix).await
    }
}

impl Kv<atelier_contracts::images::ImageRecord> {
    /// The image records of `dataset`, sorted by sha256.
    pub async fn of_dataset(
        &self,
        dataset: &str,
    ) -> anyhow::Result<Vec<atelier_contracts::images::ImageRecord>> {
        crate::bus::dataset_images(&self.store, dataset).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nats_server::{NatsServer, NatsServerOptions};
    use async_nats::jetstream;

    #[tokio::test]
    async fn typed_values_and_compare_and_set_writes() {
        let dir = tempfile::tempdir().unwrap();
        let server = NatsServer::start(NatsServerOptions {
            store_dir: dir.path().join("js"),
            port: 0,
            log_file: dir.path().join("nats.log"),
            config: None,
        })
        .unwrap();
        let js = jetstream::new(async_nats::connect(server.url()).await.unwrap());
        let raw = js
            .create_key_value(kv::Config {
                bucket: "t".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let kv: Kv<Vec<u32>> = Kv::new(raw.clone());
        assert!(kv.get("a").await.unwrap().is_none());
        // Create only when absent; a second create is a conflict, not an error of the bus.
        let r1 = kv.write("a", &vec![1], None).await.unwrap();
        assert!(matches!(
            kv.write("a", &vec![2], None).await,
            Err(WriteError::Conflict(_))
        ));
        // Update only at the revision read.
        let r2 = kv.write("a", &vec![1, 2], Some(r1)).await.unwrap();
        assert!(matches!(
            kv.write("a", &vec![9], Some(r1)).await,
            Err(WriteError::Conflict(_))
        ));
        let e = kv.entry("a").await.unwrap().unwrap();
        assert_eq!((e.value.unwrap(), e.revision), (vec![1, 2], r2));
        // A value of another type reads as absent through get, as a reason through entry.
        raw.put("b", "\"text\"".into()).await.unwrap();
        assert!(kv.get("b").await.unwrap().is_none());
        assert!(kv.entry("b").await.unwrap().unwrap().value.is_err());
        raw.delete("a").await.unwrap();
        assert!(kv.entry("a").await.unwrap().is_none());
    }
}
