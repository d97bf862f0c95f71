//! The object store: a local directory (embedded default) or S3 (clusters), through `object_store`.
//!
//! Artifacts are content-addressed: [`Store::put_bytes`] and [`Store::put_stream`] store bytes under
//! `sha256/<2 hex>/<64 hex>`, so writing the same bytes twice — a redelivered job, a re-upload — never
//! creates a second object. Every operation retries transient failures (connection refused, 5xx,
//! timeouts) with exponential backoff for up to `--store-retry-secs`.

use crate::stale_uploads::UPLOADS_PREFIX;
use std::sync::Arc;
use std::time::{Duration, Instant};

use atelier_contracts::{ArtifactKey, ArtifactRef};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use object_store::{
    Attribute, Attributes, BackoffConfig, ClientOptions, GetResult, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, RetryConfig, WriteMultipart,
};
use sha2::{Digest, Sha256};

use crate::config::{StoreArgs, StoreLocation};

/// Bodies up to this size are hashed in memory and written with one PUT; larger ones stream
/// through a multipart upload.
pub const MULTIPART_THRESHOLD: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no object at {0}")]
    NotFound(String),
    #[error("invalid artifact key: {0}")]
    BadKey(#[from] atelier_contracts::KeyError),
    #[error("object is larger than the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("reading the upload failed: {0}")]
    Body(String),
    #[error("object store {op} failed after {attempts} attempt(s) over {elapsed:?}: {source}")]
    Backend {
        op: &'static str,
        attempts: u32,
        elapsed: Duration,
        #[source]
        source: object_store::Error,
    },
}

impl StoreError {
    /// True for failures worth retrying the whole job for (the store was unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Backend { source, .. } if is_transient(source))
    }
}

fn is_transient(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    !matches!(
        e,
        E::NotFound { .. }
            | E::AlreadyExists { .. }
            | E::Precondition { .. }
            | E::NotModified { .. }
            | E::InvalidPath { .. }
            | E::NotSupported { .. }
            | E::NotImplemented
            | E::PermissionDenied { .. }
            | E::Unauthenticated { .. }
            | E::UnknownConfigurationKey { .. }
    )
}

#[derive(Clone)]
pub struct Store {
    pub(crate) inner: Arc<dyn ObjectStore>,
    /// The directory of a local store (its multipart staging files are plain files there).
    pub(crate) local_root: Option<std::path::PathBuf>,
    retry_for: Duration,
    /// Whether the backend keeps a Content-Type attribute (S3 does, a local directory does not).
    attributes: bool,
    description: String,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.description)
    }
}

impl Store {
    pub fn open(args: &StoreArgs) -> anyhow::Result<Self> {
        let retry_for = Duration::from_secs(args.store_retry_secs);
        match args.location().map_err(anyhow::Error::msg)? {
            StoreLocation::Local(dir) => {
                std::fs::create_dir_all(&dir).map_err(|e| {
                    anyhow::anyhow!("creating the store directory {}: {e}", dir.display())
                })?;
                let fs = LocalFileSystem::new_with_prefix(&dir)?.with_automatic_cleanup(true);
                crate::redact::register_root(&dir, "<store>");
                Ok(Self {
                    inner: Arc::new(fs),
                    local_root: Some(dir.clone()),
                    retry_for,
                    attributes: false,
                    description: format!("local store at {}", dir.display()),
                })
            }
            StoreLocation::S3 { bucket, prefix } => {
                let mut b = AmazonS3Builder::from_env()
                    .with_bucket_name(&bucket)
                    .with_region(&args.s3_region)
                    .with_client_options(
                        ClientOptions::new()
                            .with_connect_timeout(Duration::from_secs(3))
                            .with_timeout(Duration::from_secs(60))
                            .with_allow_http(true),
                    )
                    // Short inner retries; the outer loop in `Store::retry` keeps going with backoff.
                    .with_retry(RetryConfig {
                        backoff: BackoffConfig::default(),
                        max_retries: 2,
                        retry_timeout: Duration::from_secs(10),
                    });
                if let Some(ep) = &args.s3_endpoint {
                    b = b.with_endpoint(ep).with_virtual_hosted_style_request(false);
                }
                if let Some(k) = &args.s3_access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(s) = &args.s3_secret_access_key {
                    b = b.with_secret_access_key(s);
                }
                let s3: Arc<dyn ObjectStore> = Arc::new(b.build()?);
                let inner: Arc<dyn ObjectStore> = match &prefix {
                    Some(p) => Arc::new(PrefixStore::new(s3, p.as_str())),
                    None => s3,
                };
                Ok(Self {
                    inner,
                    local_root: None,
                    retry_for,
                    attributes: true,
                    description: format!(
                        "s3://{bucket}/{} at {}",
                        prefix.unwrap_or_default(),
                        args.s3_endpoint.as_deref().unwrap_or("AWS")
                    ),
                })
            }
        }
    }

    /// A store over any `object_store` backend (tests use `InMemory`).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>, retry_for: Duration) -> Self {
        Self {
            inner,
            local_root: None,
            retry_for,
            attributes: false,
            description: "custom store".into(),
        }
    }

    pub fn describe(&self) -> &str {
        &self.description
    }

    pub(crate) async fn retry<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let start = Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut attempts = 0;
        loop {
            attempts += 1;
            match f().await {
                Ok(v) => return Ok(v),
                Err(object_store::Error::NotFound { path, .. }) => {
                    return Err(StoreError::NotFound(path))
                }
                Err(e) if is_transient(&e) && start.elapsed() + delay < self.retry_for => {
                    tracing::warn!(op, attempts, error = %e, ?delay, "object store unavailable; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(source) => {
                    return Err(StoreError::Backend {
                        op,
                        attempts,
                        elapsed: start.elapsed(),
                        source,
                    })
                }
            }
        }
    }

    fn path(key: &ArtifactKey) -> Path {
        // ArtifactKey's character set and segment rules make this infallible.
        Path::parse(key.as_str()).unwrap_or_else(|_| Path::from(key.as_str()))
    }

    fn put_opts(&self, content_type: &str, mode: PutMode) -> PutOptions {
        let mut attributes = Attributes::new();
        if self.attributes {
            attributes.insert(Attribute::ContentType, content_type.to_owned().into());
        }
        PutOptions {
            mode,
            attributes,
            ..Default::default()
        }
    }

    /// Stores `bytes` content-addressed. Returns the reference and whether a new object was written.
    pub async fn put_bytes(
        &self,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<(ArtifactRef, bool), StoreError> {
        let sha = hex::encode(Sha256::digest(&bytes));
        let key = ArtifactKey::for_sha256(&sha);
        let artifact = ArtifactRef {
            key: key.to_string(),
            sha256: sha,
            size: bytes.len() as u64,
            content_type: content_type.to_owned(),
        };
        if self.head(&key).await?.is_some() {
            return Ok((artifact, false));
        }
        self.put_at(&key, bytes, content_type).await?;
        Ok((artifact, true))
    }

    /// Stores a JSON document content-addressed.
    pub async fn put_json<T: serde::Serialize>(
        &self,
        value: &T,
    ) -> Result<(ArtifactRef, bool), StoreError> {
        let mut v =
            serde_json::to_vec_pretty(value).map_err(|e| StoreError::Body(e.to_string()))?;
        v.push(b'\n');
        self.put_bytes(v.into(), "application/json").await
    }

    /// Stores bytes under a caller-chosen key (not content-addressed): for external systems that put
    /// images into the bucket, and for tests acting as one.
    pub async fn put_at(
        &self,
        key: &ArtifactKey,
        bytes: Bytes,
        content_type: &str,
    ) -> Result<(), StoreError> {
        let path = Self::path(key);
        let payload = PutPayload::from_bytes(bytes);
        self.retry("put", || {
            let (inner, path, payload) = (self.inner.clone(), path.clone(), payload.clone());
            let opts = self.put_opts(content_type, PutMode::Overwrite);
            async move { inner.put_opts(&path, payload, opts).await }
        })
        .await
        .map(|_| ())
    }

    /// Streams a body of unknown length into the store, content-addressed, hashing as it goes.
    /// Bodies over [`MULTIPART_THRESHOLD`] go through a multipart upload to a temporary key and are
    /// then copied to their content address. Fails with [`StoreError::TooLarge`] past `limit` bytes.
    pub async fn put_stream<S, E>(
        &self,
        mut body: S,
        content_type: &str,
        limit: u64,
    ) -> Result<(ArtifactRef, bool), StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let mut head = Vec::new();
        let mut total: u64 = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| StoreError::Body(e.to_string()))?;
            total += chunk.len() as u64;
            if total > limit {
                return Err(StoreError::TooLarge { limit });
            }
            head.extend_from_slice(&chunk);
            if head.len() > MULTIPART_THRESHOLD {
                return self.put_multipart(head, body, content_type, limit).await;
            }
        }
        self.put_bytes(head.into(), content_type).await
    }

    async fn put_multipart<S, E>(
        &self,
        head: Vec<u8>,
        mut body: S,
        content_type: &str,
        limit: u64,
    ) -> Result<(ArtifactRef, bool), StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        let tmp = Path::from(format!("{UPLOADS_PREFIX}/{}", uuid::Uuid::now_v7()));
        let backend = |op, source| StoreError::Backend {
            op,
            attempts: 1,
            elapsed: Duration::ZERO,
            source,
        };
        let upload = self
            .retry("put_multipart", || {
                let (inner, tmp) = (self.inner.clone(), tmp.clone());
                let opts = PutMultipartOptions {
                    attributes: self.put_opts(content_type, PutMode::Overwrite).attributes,
                    ..Default::default()
                };
                async move { inner.put_multipart_opts(&tmp, opts).await }
            })
            .await?;
        let mut writer = WriteMultipart::new(upload);
        let mut hasher = Sha256::new();
        let mut total = head.len() as u64;
        hasher.update(&head);
        writer.write(&head);
        let result: Result<(), StoreError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| StoreError::Body(e.to_string()))?;
                total += chunk.len() as u64;
                if total > limit {
                    return Err(StoreError::TooLarge { limit });
                }
                hasher.update(&chunk);
                writer
                    .wait_for_capacity(4)
                    .await
                    .map_err(|e| backend("put_multipart", e))?;
                writer.put(chunk);
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            let _ = writer.abort().await;
            return Err(e);
        }
        writer
            .finish()
            .await
            .map_err(|e| backend("put_multipart", e))?;
        let sha = hex::encode(hasher.finalize());
        let key = ArtifactKey::for_sha256(&sha);
        let created = if self.head(&key).await?.is_some() {
            false
        } else {
            let to = Self::path(&key);
            self.retry("copy", || {
                let (inner, tmp, to) = (self.inner.clone(), tmp.clone(), to.clone());
                async move { inner.copy(&tmp, &to).await }
            })
            .await?;
            true
        };
        self.retry("delete", || {
            let (inner, tmp) = (self.inner.clone(), tmp.clone());
            async move { inner.delete(&tmp).await }
        })
        .await
        .ok();
        Ok((
            ArtifactRef {
                key: key.to_string(),
                sha256: sha,
                size: total,
                content_type: content_type.into(),
            },
            created,
        ))
    }

    /// Metadata of an object, or `None` when it does not exist.
    pub async fn head(&self, key: &ArtifactKey) -> Result<Option<ObjectMeta>, StoreError> {
        let path = Self::path(key);
        match self
            .retry("head", || {
                let (inner, path) = (self.inner.clone(), path.clone());
                async move { inner.head(&path).await }
            })
            .await
        {
            Ok(m) => Ok(Some(m)),
            Err(StoreError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Removes an object (one that is already gone is not an error).
    pub async fn delete(&self, key: &ArtifactKey) -> Result<(), StoreError> {
        let path = Self::path(key);
        let r = self
            .retry("delete", || {
                let (inner, path) = (self.inner.clone(), path.clone());
                async move { inner.delete(&path).await }
            })
            .await;
        match r {
            Err(StoreError::NotFound(_)) => Ok(()),
            other => other,
        }
    }

    /// Opens an object for streaming.
    pub async fn get(&self, key: &ArtifactKey) -> Result<GetResult, StoreError> {
        let path = Self::path(key);
        self.retry("get", || {
            let (inner, path) = (self.inner.clone(), path.clone());
            async move { inner.get(&path).await }
        })
        .await
    }

    /// Reads an object whole, retrying the read (not only the open) on transient failures.
    pub async fn get_bytes(&self, key: &ArtifactKey) -> Result<Bytes, StoreError> {
        let path = Self::path(key);
        self.retry("get", || {
            let (inner, path) = (self.inner.clone(), path.clone());
            async move { inner.get(&path).await?.bytes().await }
        })
        .await
    }

    /// Reads `range` of an object's bytes (a file's header without the rest of it).
    pub async fn get_range(
        &self,
        key: &ArtifactKey,
        range: std::ops::Range<u64>,
    ) -> Result<Bytes, StoreError> {
        let path = Self::path(key);
        self.retry("get", || {
            let (inner, path, range) = (self.inner.clone(), path.clone(), range.clone());
            async move { inner.get_range(&path, range).await }
        })
        .await
    }

    /// Streams an object into the file `dest` (written beside it under a temporary name, then
    /// renamed, so `dest` is either absent or complete); returns the bytes written. For objects
    /// too large to hold in memory (model checkpoints). The whole download is retried on
    /// transient failures.
    pub async fn download(
        &self,
        key: &ArtifactKey,
        dest: &std::path::Path,
    ) -> Result<u64, StoreError> {
        use tokio::io::AsyncWriteExt;
        let path = Self::path(key);
        let tmp = dest.with_file_name(format!(
            ".{}.part{}",
            dest.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default(),
            std::process::id()
        ));
        let local = |e: std::io::Error| object_store::Error::Generic {
            store: "local file",
            source: Box::new(e),
        };
        let written = self
            .retry("download", || {
                let (inner, path, tmp) = (self.inner.clone(), path.clone(), tmp.clone());
                async move {
                    let mut file = tokio::fs::File::create(&tmp).await.map_err(local)?;
                    let mut stream = inner.get(&path).await?.into_stream();
                    let mut n = 0u64;
                    while let Some(chunk) = stream.next().await {
                        let chunk = chunk?;
                        n += chunk.len() as u64;
                        file.write_all(&chunk).await.map_err(local)?;
                    }
                    file.flush().await.map_err(local)?;
                    file.sync_all().await.map_err(local)?;
                    Ok(n)
                }
            })
            .await;
        let n = match written {
            Ok(n) => n,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Err(e) = std::fs::rename(&tmp, dest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(StoreError::Body(format!("{}: {e}", dest.display())));
        }
        Ok(n)
    }

    /// Streams an object through SHA-256 and returns its reference (the digest of the real bytes).
    pub async fn digest(&self, key: &ArtifactKey) -> Result<ArtifactRef, StoreError> {
        let path = Self::path(key);
        self.retry("digest", || {
            let (inner, path) = (self.inner.clone(), path.clone());
            async move {
                let got = inner.get(&path).await?;
                let content_type = got
                    .attributes
                    .get(&Attribute::ContentType)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "application/octet-stream".into());
                let mut stream = got.into_stream();
                let mut hasher = Sha256::new();
                let mut size = 0u64;
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk?;
                    size += chunk.len() as u64;
                    hasher.update(&chunk);
                }
                Ok(ArtifactRef {
                    key: path.to_string(),
                    sha256: hex::encode(hasher.finalize()),
                    size,
                    content_type,
                })
            }
        })
        .await
    }

    /// Copies an object to its content address (no copy when it is already there).
    pub async fn copy_to_content_address(
        &self,
        from: &ArtifactKey,
        sha256: &str,
    ) -> Result<(ArtifactKey, bool), StoreError> {
        let to = ArtifactKey::for_sha256(sha256);
        if to == *from || self.head(&to).await?.is_some() {
            return Ok((to, false));
        }
        let (f, t) = (Self::path(from), Self::path(&to));
        self.retry("copy", || {
            let (inner, f, t) = (self.inner.clone(), f.clone(), t.clone());
            async move { inner.copy(&f, &t).await }
        })
        .await?;
        Ok((to, true))
    }

    /// Keys under a prefix (for tests and maintenance, not hot paths).
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let p = Path::from(prefix);
        self.retry("list", || {
            let (inner, p) = (self.inner.clone(), p.clone());
            async move {
                inner
                    .list(Some(&p))
                    .collect::<Vec<_>>()
                    .await
                    .into_iter()
                    .collect()
            }
        })
        .await
    }

    /// One quick request with no retries: does the store answer?
    pub async fn ping(&self, timeout: Duration) -> bool {
        let probe = Path::from("healthz/probe");
        matches!(
            tokio::time::timeout(timeout, self.inner.head(&probe)).await,
            Ok(Ok(_)) | Ok(Err(object_store::Error::NotFound { .. }))
        )
    }
}

/// The `Content-Type` attribute of a fetched object, if the backend kept one.
pub fn content_type_of(got: &GetResult) -> Option<String> {
    got.attributes
        .get(&Attribute::ContentType)
        .map(|v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let args = StoreArgs {
            store: dir.path().display().to_string(),
            ..Default::default()
        };
        let store = Store::open(&args).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn same_bytes_one_object() {
        let (_d, s) = local();
        let (a, created) = s
            .put_bytes(Bytes::from_static(b"hello"), "text/plain")
            .await
            .unwrap();
        assert!(created);
        assert_eq!(a.sha256, hex::encode(Sha256::digest(b"hello")));
        let (b, created) = s
            .put_bytes(Bytes::from_static(b"hello"), "text/plain")
            .await
            .unwrap();
        assert!(!created);
        assert_eq!(a, b);
        assert_eq!(s.list("sha256").await.unwrap().len(), 1);
        let key = ArtifactKey::parse(&a.key).unwrap();
        assert_eq!(
            s.get_bytes(&key).await.unwrap(),
            Bytes::from_static(b"hello")
        );
        assert_eq!(s.digest(&key).await.unwrap().sha256, a.sha256);
    }

    #[tokio::test]
    async fn large_streams_use_multipart_and_land_content_addressed() {
        let (_d, s) = local();
        let data: Vec<u8> = (0..(MULTIPART_THRESHOLD + 3 * 1024 * 1024))
            .map(|i| (i % 251) as u8)
            .collect();
        let chunks: Vec<Result<Bytes, std::io::Error>> = data
            .chunks(1 << 20)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let (a, created) = s
            .put_stream(
                futures::stream::iter(chunks),
                "application/octet-stream",
                u64::MAX,
            )
            .await
            .unwrap();
        assert!(created);
        assert_eq!(a.size, data.len() as u64);
        assert_eq!(a.sha256, hex::encode(Sha256::digest(&data)));
        assert!(
            s.list("tmp").await.unwrap().is_empty(),
            "temporary upload left behind"
        );
        let key = ArtifactKey::parse(&a.key).unwrap();
        assert_eq!(s.get_bytes(&key).await.unwrap().len(), data.len());
    }

    #[tokio::test]
    async fn stream_limit_is_enforced() {
        let (_d, s) = local();
        let chunks: Vec<Result<Bytes, std::io::Error>> = vec![Ok(Bytes::from(vec![0u8; 100]))];
        let err = s
            .put_stream(futures::stream::iter(chunks), "x/y", 10)
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::TooLarge { limit: 10 }));
    }

    #[tokio::test]
    async fn missing_objects_are_none_not_errors() {
        let (_d, s) = local();
        let key = ArtifactKey::parse("nope/x").unwrap();
        assert!(s.head(&key).await.unwrap().is_none());
        assert!(matches!(
            s.get_bytes(&key).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(s.ping(Duration::from_secs(1)).await);
    }
}
