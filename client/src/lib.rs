//! The Rust client of atelier's HTTP API: uploads, jobs (submit, follow over Server-Sent Events,
//! cancel), artifacts, datasets and the retrieval routes. The `atelier` CLI, the demo and the
//! end-to-end tests talk to the gateway through it.

use std::time::Duration;

use anyhow::{bail, Context as _};
use atelier_contracts::http::{ApiErrorBody, UploadResponse};
use atelier_contracts::images::ImageRecord;
use atelier_contracts::{JobRecord, JobSpec, Priority, SCHEMA_VERSION};
use bytes::Bytes;
use futures::StreamExt;

#[derive(Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
    /// Sent as `Atelier-Priority` with every job this client submits.
    priority: Priority,
}

impl Client {
    pub fn new(base: &str, key: Option<String>) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            key,
            http,
            priority: Priority::Normal,
        })
    }

    /// This client's jobs wait in the `priority` queue of their service.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// The gateway's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r
    }

    /// Sends a request (built by `make`, so it can be re-sent), retrying 429 and 503 answers
    /// after the gateway's `Retry-After` (or an exponential backoff), up to a minute in all.
    async fn send(
        &self,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> reqwest::Result<reqwest::Response> {
        self.send_with(make, false).await
    }

    /// Sends, retrying 429, 503 and a 409 with `Retry-After` (after it) for up to a minute; with
    /// `retry_transport`, also connection failures and timeouts — only for requests that are safe
    /// to repeat (reads, and submissions carrying an `Idempotency-Key`).
    async fn send_with(
        &self,
        make: impl Fn() -> reqwest::RequestBuilder,
        retry_transport: bool,
    ) -> reqwest::Result<reqwest::Response> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let mut backoff = Duration::from_millis(50);
        loop {
            let resp = match make().send().await {
                Ok(r) => r,
                Err(e)
                    if retry_transport
                        && (e.is_connect() || e.is_timeout() || e.is_request())
                        && std::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let status = resp.status();
            // 409 with Retry-After: the same Idempotency-Key is still being accepted.
            let busy = status == reqwest::StatusCode::TOO_MANY_REQUESTS
                || status == reqwest::StatusCode::SERVICE_UNAVAILABLE
                || (status == reqwest::StatusCode::CONFLICT
                    && resp.headers().contains_key(reqwest::header::RETRY_AFTER));
            if !busy || std::time::Instant::now() >= deadline {
                return Ok(resp);
            }
            let wait = resp
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .map(|s| Duration::from_secs_f64(s.clamp(0.0, 30.0)))
                .unwrap_or(backoff);
            backoff = (backoff * 2).min(Duration::from_secs(5));
            tokio::time::sleep(wait.max(Duration::from_millis(10))).await;
        }
    }

    async fn check(resp: reqwest::Response) -> anyhow::Result<reqwest::Response> {
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ApiErrorBody>(&text) {
            Ok(body) => bail!(
                "gateway answered {status}: {} ({})",
                body.error.message,
                body.error.code
            ),
            Err(_) => bail!("gateway answered {status}: {text}"),
        }
    }

    pub async fn upload(&self, bytes: Bytes, content_type: &str) -> anyhow::Result<UploadResponse> {
        let resp = self
            .send(|| {
                self.req(reqwest::Method::POST, "/v1/uploads")
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .body(bytes.clone())
            })
            .await
            .context("uploading")?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn submit(&self, spec: &JobSpec) -> anyhow::Result<JobRecord> {
        let body = serde_json::json!({ "schema_version": SCHEMA_VERSION, "spec": spec });
        self.post_job("/v1/jobs", &body).await
    }

    /// `POST /v1/txt2img`, `/v1/img2img` or `/v1/inpaint` (`route` is the last segment).
    pub async fn generate(
        &self,
        route: &str,
        spec: &atelier_contracts::GenerateSpec,
    ) -> anyhow::Result<JobRecord> {
        self.post_job(&format!("/v1/{route}"), spec).await
    }

    /// `POST /v1/train/lora`, or `/v1/train/dreambooth` when the spec has a DreamBooth part.
    pub async fn train(&self, spec: &atelier_contracts::TrainSpec) -> anyhow::Result<JobRecord> {
        let route = if spec.dreambooth.is_some() {
            "/v1/train/dreambooth"
        } else {
            "/v1/train/lora"
        };
        self.post_job(route, spec).await
    }

    /// Submits with one `Idempotency-Key` for this logical submission, reused by every retry:
    /// a retry after a lost answer gets the job the first attempt created, never a second one.
    async fn post_job<T: serde::Serialize>(
        &self,
        path: &str,
        body: &T,
    ) -> anyhow::Result<JobRecord> {
        let key = atelier_contracts::JobId::new().to_string();
        let resp = self
            .send_with(
                || {
                    self.req(reqwest::Method::POST, path)
                        .header("Idempotency-Key", &key)
                        .header("Atelier-Priority", self.priority.name())
                        .json(body)
                },
                true,
            )
            .await
            .context("submitting")?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// `GET /v1/search` with `params`, or `POST /v1/search` with `image` as the body.
    pub async fn search(
        &self,
        params: &[(String, String)],
        image: Option<(Bytes, &str)>,
    ) -> anyhow::Result<atelier_contracts::SearchResponse> {
        let resp = self
            .send(|| match &image {
                None => self.req(reqwest::Method::GET, "/v1/search").query(params),
                Some((bytes, ct)) => self
                    .req(reqwest::Method::POST, "/v1/search")
                    .query(params)
                    .header(reqwest::header::CONTENT_TYPE, *ct)
                    .body(bytes.clone()),
            })
            .await
            .context("searching")?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// `POST /v1/datasets/{name}/exports`: an export job into the object store.
    pub async fn export(
        &self,
        spec: &atelier_contracts::dataset::ExportSpec,
    ) -> anyhow::Result<JobRecord> {
        self.post_job(&format!("/v1/datasets/{}/exports", spec.dataset), spec)
            .await
    }

    /// `POST /v1/datasets/{name}/index`.
    pub async fn index(&self, spec: &atelier_contracts::IndexSpec) -> anyhow::Result<JobRecord> {
        self.post_job(&format!("/v1/datasets/{}/index", spec.dataset), spec)
            .await
    }

    /// `POST /v1/datasets/{name}/curate`: the new version's output, or the job's record when
    /// it outlasted the route's wait (202).
    pub async fn curate(
        &self,
        spec: &atelier_contracts::CurateSpec,
    ) -> anyhow::Result<Result<atelier_contracts::CurateOutput, JobRecord>> {
        self.post_waiting(
            &format!("/v1/datasets/{}/curate", spec.dataset),
            spec,
            "curating",
        )
        .await
    }

    /// `POST /v1/datasets/{name}/augment`: the new version's output, or the job's record when
    /// it outlasted the route's wait (202).
    pub async fn augment(
        &self,
        spec: &atelier_contracts::AugmentSpec,
    ) -> anyhow::Result<Result<atelier_contracts::AugmentOutput, JobRecord>> {
        self.post_waiting(
            &format!("/v1/datasets/{}/augment", spec.dataset),
            spec,
            "augmenting",
        )
        .await
    }

    /// POSTs to a route that waits for its job: 201 with the output, or 202 with the record.
    async fn post_waiting<S: serde::Serialize, O: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        spec: &S,
        what: &'static str,
    ) -> anyhow::Result<Result<O, JobRecord>> {
        let resp = self
            .send(|| self.req(reqwest::Method::POST, path).json(spec))
            .await
            .context(what)?;
        let resp = Self::check(resp).await?;
        if resp.status() == reqwest::StatusCode::ACCEPTED {
            return Ok(Err(resp.json().await?));
        }
        Ok(Ok(resp.json().await?))
    }

    pub async fn job(&self, id: &str) -> anyhow::Result<JobRecord> {
        let resp = self
            .send(|| self.req(reqwest::Method::GET, &format!("/v1/jobs/{id}")))
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// A page of this key's jobs, newest first. `query`: `kind`, `state`, `since` (RFC 3339),
    /// `limit`, `cursor` (the previous page's `next_cursor`), `owner` (admin keys).
    pub async fn jobs(
        &self,
        query: &[(&str, &str)],
    ) -> anyhow::Result<atelier_contracts::http::JobPage> {
        let resp = self
            .send(|| self.req(reqwest::Method::GET, "/v1/jobs").query(query))
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn cancel(&self, id: &str) -> anyhow::Result<JobRecord> {
        let resp = self
            .send(|| self.req(reqwest::Method::DELETE, &format!("/v1/jobs/{id}")))
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn download(&self, key: &str) -> anyhow::Result<Bytes> {
        let resp = self
            .send(|| self.req(reqwest::Method::GET, &format!("/v1/artifacts/{key}")))
            .await?;
        Ok(Self::check(resp).await?.bytes().await?)
    }

    /// Streams the artifact `key` into the file `path` (never whole in memory).
    pub async fn download_to_file(&self, key: &str, path: &std::path::Path) -> anyhow::Result<u64> {
        use tokio::io::AsyncWriteExt as _;
        let resp = self
            .send(|| self.req(reqwest::Method::GET, &format!("/v1/artifacts/{key}")))
            .await?;
        let mut body = Self::check(resp).await?.bytes_stream();
        let mut file = tokio::fs::File::create(path)
            .await
            .with_context(|| format!("creating {}", path.display()))?;
        let mut n = 0;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.with_context(|| format!("downloading {key}"))?;
            n += chunk.len() as u64;
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        Ok(n)
    }

    pub async fn image(&self, sha256: &str) -> anyhow::Result<Option<ImageRecord>> {
        let resp = self
            .send(|| self.req(reqwest::Method::GET, &format!("/v1/images/{sha256}")))
            .await?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(Self::check(resp).await?.json().await?))
    }

    /// `POST /v1/images`: announce stored images for ingest.
    pub async fn announce(
        &self,
        ev: &atelier_contracts::images::ImagesIngested,
    ) -> anyhow::Result<()> {
        let resp = self
            .send(|| self.req(reqwest::Method::POST, "/v1/images").json(ev))
            .await
            .context("announcing images")?;
        Self::check(resp).await?;
        Ok(())
    }

    pub async fn datasets(&self) -> anyhow::Result<Vec<atelier_contracts::http::DatasetSummary>> {
        let resp = self
            .send(|| self.req(reqwest::Method::GET, "/v1/datasets"))
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// A version's manifest (`version` None: the latest).
    pub async fn dataset_version(
        &self,
        dataset: &str,
        version: Option<u32>,
    ) -> anyhow::Result<atelier_contracts::DatasetManifest> {
        let v = version.map_or("latest".to_owned(), |v| v.to_string());
        let resp = self
            .send(|| {
                self.req(
                    reqwest::Method::GET,
                    &format!("/v1/datasets/{dataset}/versions/{v}"),
                )
            })
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// Follows `/v1/jobs/{id}/events` and calls `on_update` for each record until a terminal one,
    /// which it returns.
    pub async fn follow(
        &self,
        id: &str,
        mut on_update: impl FnMut(&JobRecord),
    ) -> anyhow::Result<JobRecord> {
        let resp = self
            .send(|| self.req(reqwest::Method::GET, &format!("/v1/jobs/{id}/events")))
            .await?;
        let mut body = Self::check(resp).await?.bytes_stream();
        let mut buf = String::new();
        let mut last = None;
        while let Some(chunk) = body.next().await {
            buf.push_str(&String::from_utf8_lossy(&chunk?));
            // SSE events end with a blank line.
            while let Some(end) = buf.find("\n\n") {
                let event: String = buf.drain(..end + 2).collect();
                let data: String = event
                    .lines()
                    .filter_map(|l| l.strip_prefix("data:"))
                    .map(|d| d.strip_prefix(' ').unwrap_or(d))
                    .collect::<Vec<_>>()
                    .join("\n");
                if event.lines().any(|l| l == "event: job") && !data.is_empty() {
                    let record: JobRecord =
                        serde_json::from_str(&data).context("decoding a job event")?;
                    on_update(&record);
                    let done = record.state.is_terminal();
                    last = Some(record);
                    if done {
                        return Ok(last.expect("just set"));
                    }
                }
            }
        }
        last.filter(|r| r.state.is_terminal())
            .context("the event stream ended before the job finished")
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    #[tokio::test]
    async fn busy_answers_are_retried_after_retry_after() {
        let hits = Arc::new(AtomicU32::new(0));
        let h = hits.clone();
        let app = axum::Router::new().route(
            "/v1/artifacts/{*key}",
            axum::routing::get(move || {
                let h = h.clone();
                async move {
                    if h.fetch_add(1, Ordering::SeqCst) < 2 {
                        (
                            StatusCode::TOO_MANY_REQUESTS,
                            [("retry-after", "0.1")],
                            "slow down",
                        )
                            .into_response()
                    } else {
                        "bytes".into_response()
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let c = super::Client::new(&format!("http://{addr}"), None).unwrap();
        let t = std::time::Instant::now();
        let got = c.download("sha256/ab/x").await.unwrap();
        assert_eq!(&got[..], b"bytes");
        assert_eq!(hits.load(Ordering::SeqCst), 3);
        assert!(t.elapsed() >= std::time::Duration::from_millis(200));
    }
}
