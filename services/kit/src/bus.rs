//! The NATS connection and the JetStream topology every atelier process agrees on.
//!
//! Topology (created idempotently by [`Bus::ensure_topology`]; any process may call it):
//! - `ATELIER_REQ_<SERVICE>` (and `_HIGH`, `_LOW`): work-queue streams on `atelier.v1.<service>.request`
//!   (`.request.high`, `.request.low`), file storage, a
//!   duplicate window so a resubmitted job id is dropped by the server.
//! - `ATELIER_EVENTS`: progress/done/failed events of every service (limits retention, 7 days).
//! - `ATELIER_DLQ`: dead letters (30 days). `ATELIER_IMAGES`: `atelier.v1.images.ingested` (30 days).
//! - No stream uses wildcards, so no two streams' subjects can overlap.
//! - KV `atelier_jobs` (job state), `atelier_images` (image records), `atelier_captions` (captions
//!   per image and source), `atelier_datasets` (dataset version manifests), `atelier_indexes`
//!   (retrieval index manifests) and `atelier_verdicts` (model verdicts per image, reused by filter
//!   jobs).

use std::time::Duration;

use anyhow::Context as _;
use async_nats::jetstream::{self, kv, stream};
use atelier_contracts::subjects::{self, Service};
use atelier_contracts::Priority;

use crate::config::NatsArgs;
use crate::kv::Kv;
use atelier_contracts::typed::{Bucket, Query};

/// Why a [`Bus::ask`] got no usable reply.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("no reply in time")]
    Timeout,
    #[error("no one answered ({0})")]
    NoAnswer(String),
    #[error("the reply does not decode: {0}")]
    Reply(String),
}

/// How long `atelier_jobs` keeps a job record.
pub const JOB_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// The server-side duplicate window of request and event streams (`Nats-Msg-Id`).
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(3600);

#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// The publish outbox's bucket, opened on first use (see [`crate::outbox`]).
    outbox: std::sync::Arc<tokio::sync::OnceCell<kv::Store>>,
    /// The workers bucket, opened on first use (read for every queued job's place).
    workers: std::sync::Arc<tokio::sync::OnceCell<kv::Store>>,
    /// Copies JetStream keeps of every stream and bucket this process declares.
    replicas: usize,
}

impl Bus {
    /// Connects, retrying until the server answers (NATS may start after us).
    pub async fn connect(args: &NatsArgs, name: &str) -> anyhow::Result<Self> {
        args.check_credentials().map_err(anyhow::Error::msg)?;
        let mut opts = async_nats::ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(10)))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    other => tracing::debug!(event = %other, "nats event"),
                }
            });
        if let (Some(u), Some(p)) = (&args.nats_user, &args.nats_password) {
            opts = opts.user_and_password(u.clone(), p.clone());
        }
        let url = args.url();
        if let Some(ca) = &args.nats_tls_ca {
            anyhow::ensure!(
                ca.is_file(),
                "ATELIER_NATS_TLS_CA {} is not a file (a PEM CA certificate)",
                ca.display()
            );
            opts = opts.add_root_certificates(ca.clone()).require_tls(true);
        } else if url.starts_with("tls://") {
            opts = opts.require_tls(true);
        }
        // A cluster's nodes, comma-separated: the client connects to any and fails over.
        let servers = url
            .split(',')
            .map(|u| u.trim().parse::<async_nats::ServerAddr>())
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| {
                format!("NATS URL {url:?}: write nats://host:port[,nats://host:port...]")
            })?;
        let client = tokio::time::timeout(Duration::from_secs(60), opts.connect(servers))
            .await
            .with_context(|| format!("NATS at {url} did not answer within 60 s; is nats-server running? (`atelier up` starts one, or set ATELIER_NATS_URL)"))?
            .with_context(|| format!("connecting to NATS at {url}"))?;
        let js = jetstream::new(client.clone());
        Ok(Self {
            client,
            js,
            outbox: Default::default(),
            workers: Default::default(),
            replicas: args.nats_replicas.clamp(1, 5),
        })
    }

    /// Declares every stream and bucket. Safe to call from every process at start.
    pub async fn ensure_topology(&self) -> anyhow::Result<()> {
        for (s, p) in Service::ALL
            .into_iter()
            .flat_map(|s| Priority::ORDER.map(|p| (s, p)))
        {
            self.ensure_stream(stream::Config {
                name: s.request_stream_for(p),
                subjects: vec![s.request_subject_for(p)],
                retention: stream::RetentionPolicy::WorkQueue,
                storage: stream::StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                num_replicas: self.replicas,
                ..Default::default()
            })
            .await?;
        }
        self.ensure_stream(stream::Config {
            name: subjects::EVENTS_STREAM.into(),
            subjects: subjects::events_subjects(),
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(7 * 24 * 3600),
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: self.replicas,
            ..Default::default()
        })
        .await?;
        self.ensure_stream(stream::Config {
            name: subjects::DLQ_STREAM.into(),
            subjects: subjects::dlq_subjects(),
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(30 * 24 * 3600),
            num_replicas: self.replicas,
            ..Default::default()
        })
        .await?;
        self.ensure_stream(stream::Config {
            name: subjects::IMAGES_STREAM.into(),
            subjects: vec![subjects::IMAGES_INGESTED.into()],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: Duration::from_secs(30 * 24 * 3600),
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: self.replicas,
            ..Default::default()
        })
        .await?;
        let buckets = [
            self.jobs_kv().await?,
            self.images_kv().await?,
            self.captions_kv().await?,
            self.datasets_kv().await?,
            self.indexes_kv().await?,
            self.verdicts_kv().await?,
            self.outbox().await?,
            self.idempotency_kv().await?,
            self.kv(
                subjects::SPEND_BUCKET,
                1,
                Duration::from_secs(7 * 24 * 3600),
            )
            .await?,
            self.kv(subjects::LIMITS_BUCKET, 1, Duration::ZERO).await?,
            self.workers_kv().await?,
            self.kv(
                subjects::BATCHES_BUCKET,
                1,
                Duration::from_secs(30 * 24 * 3600),
            )
            .await?,
        ];
        // Buckets created earlier with another replica count are scaled here, once per process
        // start, not at every open.
        for bucket in buckets {
            let mut stream = self.js.get_stream(&bucket.stream_name).await?;
            self.ensure_replicas(&mut stream).await?;
        }
        Ok(())
    }

    async fn ensure_stream(&self, config: stream::Config) -> anyhow::Result<stream::Stream> {
        let name = config.name.clone();
        let mut stream = self
            .js
            .get_or_create_stream(config)
            .await
            .with_context(|| format!("declaring JetStream stream {name}"))?;
        self.ensure_replicas(&mut stream).await?;
        Ok(stream)
    }

    /// Scales a stream declared earlier with another replica count to this process's.
    async fn ensure_replicas(&self, stream: &mut stream::Stream) -> anyhow::Result<()> {
        let mut config = stream.info().await?.config.clone();
        if config.num_replicas == self.replicas {
            return Ok(());
        }
        tracing::info!(stream = %config.name, from = config.num_replicas, to = self.replicas, "changing replicas");
        config.num_replicas = self.replicas;
        let name = config.name.clone();
        self.js.update_stream(config).await.with_context(|| {
            format!(
                "setting {name} to {} replicas (ATELIER_NATS_REPLICAS)",
                self.replicas
            )
        })?;
        Ok(())
    }

    async fn kv(&self, bucket: &str, history: i64, max_age: Duration) -> anyhow::Result<kv::Store> {
        match self.js.get_key_value(bucket).await {
            Ok(store) => Ok(store),
            Err(_) => match self
                .js
                .create_key_value(kv::Config {
                    bucket: bucket.into(),
                    history,
                    max_age,
                    storage: stream::StorageType::File,
                    num_replicas: self.replicas,
                    ..Default::default()
                })
                .await
            {
                Ok(s) => Ok(s),
                // Another process created it between our get and create.
                Err(_) => self
                    .js
                    .get_key_value(bucket)
                    .await
                    .with_context(|| format!("opening KV bucket {bucket}")),
            },
        }
    }

    /// Worker reports ([`crate::queue`]): an entry lives a minute after its last write.
    pub async fn workers_kv(&self) -> anyhow::Result<kv::Store> {
        self.workers
            .get_or_try_init(|| self.kv(subjects::WORKERS_BUCKET, 1, crate::queue::REPORT_TTL))
            .await
            .cloned()
    }

    pub async fn jobs_kv(&self) -> anyhow::Result<kv::Store> {
        self.kv(subjects::JOBS_BUCKET, 1, JOB_RETENTION).await
    }

    /// The publish outbox (see [`crate::outbox`]; entries are kept a week at most).
    pub async fn outbox(&self) -> anyhow::Result<kv::Store> {
        self.outbox
            .get_or_try_init(|| {
                self.kv(
                    subjects::OUTBOX_BUCKET,
                    1,
                    Duration::from_secs(7 * 24 * 3600),
                )
            })
            .await
            .cloned()
    }

    /// The gateway's `Idempotency-Key` bucket (entries expire after 24 h).
    pub async fn idempotency_kv(&self) -> anyhow::Result<kv::Store> {
        self.kv(
            subjects::IDEMPOTENCY_BUCKET,
            1,
            Duration::from_secs(24 * 3600),
        )
        .await
    }

    /// Job webhooks and their delivery logs (a week).
    pub async fn webhooks_kv(&self) -> anyhow::Result<kv::Store> {
        self.kv(
            subjects::WEBHOOKS_BUCKET,
            1,
            Duration::from_secs(7 * 24 * 3600),
        )
        .await
    }

    pub async fn images_kv(&self) -> anyhow::Result<kv::Store> {
        self.kv(subjects::IMAGES_BUCKET, 1, Duration::ZERO).await
    }

    pub async fn captions_kv(&self) -> anyhow::Result<kv::Store> {
        self.kv(subjects::CAPTIONS_BUCKET, 1, Duration::ZERO).await
    }

    pub async fn datasets_kv(&self) -> anyhow::Result<kv::Store> {
        self.kv(subjects::DATASETS_BUCKET, 1, Duration::ZERO).await
    }

    pub async fn indexes_kv(&self) -> anyhow::Result<kv::Store> {
        self.kv(subjects::INDEXES_BUCKET, 1, Duration::ZERO).await
    }

    pub async fn verdicts_kv(&self) -> anyhow::Result<kv::Store> {
        self.kv(subjects::VERDICTS_BUCKET, 1, Duration::ZERO).await
    }

    /// The bucket `bucket`, typed by its values (created with the topology's settings if it
    /// does not exist yet).
    pub async fn bucket<V: serde::Serialize + serde::de::DeserializeOwned>(
        &self,
        bucket: Bucket<V>,
    ) -> anyhow::Result<Kv<V>> {
        let max_age = if bucket.name == subjects::JOBS_BUCKET {
            JOB_RETENTION
        } else {
            Duration::ZERO
        };
        Ok(Kv::new(self.kv(bucket.name, 1, max_age).await?))
    }

    /// Sends `req` on `query`'s subject and decodes the one reply, within `timeout`.
    pub async fn ask<Req: serde::Serialize, Rep: serde::de::DeserializeOwned>(
        &self,
        query: Query<Req, Rep>,
        req: &Req,
        timeout: Duration,
    ) -> Result<Rep, AskError> {
        let body = serde_json::to_vec(req).map_err(|e| AskError::Reply(e.to_string()))?;
        let msg = tokio::time::timeout(timeout, self.client.request(query.subject, body.into()))
            .await
            .map_err(|_| AskError::Timeout)?
            .map_err(|e| AskError::NoAnswer(e.to_string()))?;
        serde_json::from_slice(&msg.payload).map_err(|e| AskError::Reply(e.to_string()))
    }

    /// Answers `query` as one member of its queue group until `shutdown`: each request runs
    /// `handle` on its own task (a request that does not decode gets `handle(Err(reason))`).
    pub async fn answer<Req, Rep, F, Fut>(
        &self,
        query: Query<Req, Rep>,
        shutdown: tokio_util::sync::CancellationToken,
        handle: F,
    ) -> anyhow::Result<()>
    where
        Req: serde::de::DeserializeOwned + Send + 'static,
        Rep: serde::Serialize + Send + 'static,
        F: Fn(Result<Req, String>) -> Fut + Clone + Send + Sync + 'static,
        Fut: std::future::Future<Output = Rep> + Send + 'static,
    {
        use futures::StreamExt as _;
        let mut sub = self
            .client
            .queue_subscribe(query.subject, query.group.to_owned())
            .await
            .with_context(|| format!("subscribing to {}", query.subject))?;
        tracing::info!(subject = query.subject, "answering requests");
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = sub.next() => match m { Some(m) => m, None => break },
            };
            let Some(reply_to) = msg.reply.clone() else {
                continue;
            };
            let (client, handle) = (self.client.clone(), handle.clone());
            tokio::spawn(async move {
                let req = serde_json::from_slice::<Req>(&msg.payload).map_err(|e| e.to_string());
                let body = serde_json::to_vec(&handle(req).await).unwrap_or_default();
                if let Err(e) = client.publish(reply_to, body.into()).await {
                    tracing::warn!(error = %e, "could not send a reply");
                }
            });
        }
        let _ = sub.unsubscribe().await;
        Ok(())
    }

    /// Publishes to a stream and waits for the server's ack. `msg_id` (if any) becomes
    /// `Nats-Msg-Id`, so a second publish with the same id inside the duplicate window is dropped.
    pub async fn publish_json<T: serde::Serialize>(
        &self,
        subject: String,
        msg_id: Option<&str>,
        value: &T,
    ) -> anyhow::Result<jetstream::publish::PublishAck> {
        self.publish_json_with(subject, msg_id, &[], value).await
    }

    /// [`Bus::publish_json`] with extra headers.
    pub async fn publish_json_with<T: serde::Serialize>(
        &self,
        subject: String,
        msg_id: Option<&str>,
        extra_headers: &[(&str, String)],
        value: &T,
    ) -> anyhow::Result<jetstream::publish::PublishAck> {
        let payload = serde_json::to_vec(value)?;
        let mut headers = async_nats::HeaderMap::new();
        if let Some(id) = msg_id {
            headers.insert("Nats-Msg-Id", id);
        }
        for (k, v) in extra_headers {
            headers.insert(*k, v.as_str());
        }
        let ack = self
            .js
            .publish_with_headers(subject.clone(), headers, payload.into())
            .await
            .with_context(|| format!("publishing to {subject}"))?
            .await
            .with_context(|| format!("waiting for JetStream ack on {subject}"))?;
        Ok(ack)
    }

    /// True when the server answers a JetStream API request within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.js.query_account()).await,
            Ok(Ok(_))
        )
    }
}

/// Every value of a KV bucket whose key starts with `prefix` (all when empty), decoded as JSON,
/// with its key, in key-revision order; undecodable values are skipped with a warning.
///
/// One pass of an ordered consumer delivering each key's last value (as `nats kv ls` does for
/// keys), not a key listing followed by a read per key: a bucket of a million image records is
/// one stream of messages, not a million round trips. A prefix ending in `.` narrows the
/// consumer's subject filter on the server; any other prefix is matched here.
pub async fn kv_values<T: serde::de::DeserializeOwned>(
    store: &kv::Store,
    prefix: &str,
) -> anyhow::Result<Vec<(String, T)>> {
    let mut out = Vec::new();
    kv_for_each(store, prefix, |k, v| out.push((k, v))).await?;
    Ok(out)
}

/// [`kv_values`] without holding them: `f` sees each key's last value as it arrives (a caller
/// keeping a bounded page reads a bucket of any size in bounded memory).
pub async fn kv_for_each<T: serde::de::DeserializeOwned>(
    store: &kv::Store,
    prefix: &str,
    mut f: impl FnMut(String, T),
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let server_side = prefix.ends_with('.')
        && prefix[..prefix.len() - 1]
            .split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">");
    let filter_subject = if server_side {
        format!("{}{prefix}>", store.prefix)
    } else {
        format!("{}>", store.prefix)
    };
    let consumer = store
        .stream
        .create_consumer(jetstream::consumer::push::OrderedConfig {
            // An inbox of our own (the stream does not lend its client); the default prefix,
            // which every atelier user may subscribe to.
            deliver_subject: format!("_INBOX.{}", uuid::Uuid::new_v4().simple()),
            description: Some("atelier kv_values".into()),
            filter_subject,
            deliver_policy: jetstream::consumer::DeliverPolicy::LastPerSubject,
            replay_policy: jetstream::consumer::ReplayPolicy::Instant,
            ..Default::default()
        })
        .await
        .with_context(|| format!("reading KV bucket {}", store.name))?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = consumer
        .messages()
        .await
        .with_context(|| format!("reading KV bucket {}", store.name))?;
    // The last message says it is last (`pending` 0); a stream that stops short of it (values
    // removed while we read) is an error after a quiet spell, not a hang.
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "reading KV bucket {}: no value for 30 s before the last one",
                    store.name
                )
            })?;
        let Some(message) = next else { break };
        let message = message.with_context(|| format!("reading KV bucket {}", store.name))?;
        let pending = message
            .info()
            .map_err(|e| anyhow::anyhow!("reading KV bucket {}: {e}", store.name))?
            .pending;
        let deleted = message
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
        let key = message
            .subject
            .as_str()
            .strip_prefix(store.prefix.as_str())
            .unwrap_or_default();
        if !deleted && key.starts_with(prefix) {
            match serde_json::from_slice(&message.payload) {
                Ok(t) => f(key.to_owned(), t),
                Err(e) => {
                    tracing::warn!(key = %key, error = %e, "skipping an undecodable KV value")
                }
            }
        }
        if pending == 0 {
            break;
        }
    }
    Ok(())
}

/// The values under `keys` (in order; `None` where a key is absent or its value does not decode),
/// reading 64 keys at a time.
pub async fn kv_get_many<T: serde::de::DeserializeOwned>(
    store: &kv::Store,
    keys: &[String],
) -> anyhow::Result<Vec<Option<T>>> {
    use futures::{StreamExt as _, TryStreamExt as _};
    // Owned keys: a stream of borrowed ones makes the caller's future not `Send`.
    futures::stream::iter(keys.to_vec())
        .map(|k| async move {
            let v = store
                .get(&k)
                .await
                .with_context(|| format!("reading KV key {k}"))?;
            anyhow::Ok(v.and_then(|v| match serde_json::from_slice(&v) {
                Ok(t) => Some(t),
                Err(e) => {
                    tracing::warn!(key = %k, error = %e, "ignoring an undecodable KV value");
                    None
                }
            }))
        })
        .buffered(64)
        .try_collect()
        .await
}

/// Writes each (key, value) as JSON, 64 at a time; the first failure is returned after every
/// write was tried.
pub async fn kv_put_many<T: serde::Serialize>(
    store: &kv::Store,
    items: &[(String, T)],
) -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let encoded: Vec<(String, Vec<u8>)> = items
        .iter()
        .map(|(k, v)| Ok((k.clone(), serde_json::to_vec(v)?)))
        .collect::<anyhow::Result<_>>()?;
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(encoded)
        .map(|(k, bytes)| async move {
            store
                .put(&k, bytes.into())
                .await
                .with_context(|| format!("writing KV key {k}"))?;
            anyhow::Ok(())
        })
        .buffer_unordered(64)
        .collect()
        .await;
    results.into_iter().collect()
}

/// The image records of `dataset` (from the `atelier_images` bucket), sorted by sha256.
pub async fn dataset_images(
    images: &kv::Store,
    dataset: &str,
) -> anyhow::Result<Vec<atelier_contracts::images::ImageRecord>> {
    let mut all: Vec<atelier_contracts::images::ImageRecord> = kv_values(images, "")
        .await?
        .into_iter()
        .map(|(_, r)| r)
        .filter(|r: &atelier_contracts::images::ImageRecord| {
            r.datasets.iter().any(|d| d == dataset)
        })
        .collect();
    all.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nats_server::{NatsServer, NatsServerOptions};

    #[tokio::test]
    async fn kv_values_reads_last_values_by_prefix_and_kv_many_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let server = NatsServer::start(NatsServerOptions {
            store_dir: dir.path().join("js"),
            port: 0,
            log_file: dir.path().join("nats.log"),
            config: None,
        })
        .unwrap();
        let client = async_nats::connect(server.url()).await.unwrap();
        let js = jetstream::new(client);
        let store = js
            .create_key_value(kv::Config {
                bucket: "t".into(),
                history: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        // Empty: returns at once.
        assert!(kv_values::<u32>(&store, "").await.unwrap().is_empty());

        let items: Vec<(String, u32)> = (0..2500u32)
            .map(|i| (format!("{}.{i:05}", if i % 2 == 0 { "a" } else { "ab" }), i))
            .collect();
        kv_put_many(&store, &items).await.unwrap();
        // Overwritten, deleted and undecodable values.
        store.put("a.00000", "7777".into()).await.unwrap();
        store.delete("a.00002").await.unwrap();
        store.put("a.00004", "not json".into()).await.unwrap();

        let all: std::collections::BTreeMap<String, u32> =
            kv_values(&store, "").await.unwrap().into_iter().collect();
        assert_eq!(all.len(), 2500 - 2);
        assert_eq!(all["a.00000"], 7777);
        assert_eq!(all["ab.00001"], 1);
        assert!(!all.contains_key("a.00002") && !all.contains_key("a.00004"));
        // "a." is filtered by the server, "a" here: "ab.*" matches only the second.
        let a: Vec<(String, u32)> = kv_values(&store, "a.").await.unwrap();
        assert_eq!(a.len(), 1250 - 2);
        assert!(a.iter().all(|(k, _)| k.starts_with("a.")));
        let a_or_ab: Vec<(String, u32)> = kv_values(&store, "a").await.unwrap();
        assert_eq!(a_or_ab.len(), 2500 - 2);
        assert!(kv_values::<u32>(&store, "zz.").await.unwrap().is_empty());

        let keys: Vec<String> = ["ab.00001", "nope", "a.00002", "a.00004", "a.00006"]
            .map(String::from)
            .to_vec();
        let got: Vec<Option<u32>> = kv_get_many(&store, &keys).await.unwrap();
        assert_eq!(got, vec![Some(1), None, None, None, Some(6)]);
    }
}
