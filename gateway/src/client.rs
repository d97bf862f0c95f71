//! A small client for the gateway's HTTP API, used by the CLI (`atelier upload|submit|job|cancel`)
//! and the demo.

use std::time::Duration;

use anyhow::{bail, Context as _};
use atelier_contracts::http::{ApiErrorBody, UploadResponse};
use atelier_contracts::images::ImageRecord;
use atelier_contracts::{JobRecord, JobSpec, SCHEMA_VERSION};
use bytes::Bytes;
use futures::StreamExt;

#[derive(Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
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
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            r = r.bearer_auth(k);
        }
        r
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
            .req(reqwest::Method::POST, "/v1/uploads")
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(bytes)
            .send()
            .await
            .context("uploading")?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn submit(&self, spec: &JobSpec) -> anyhow::Result<JobRecord> {
        let body = serde_json::json!({ "schema_version": SCHEMA_VERSION, "spec": spec });
        let resp = self
            .req(reqwest::Method::POST, "/v1/jobs")
            .json(&body)
            .send()
            .await
            .context("submitting")?;
        Ok(Self::check(resp).await?.json().await?)
    }

    /// `POST /v1/txt2img`, `/v1/img2img` or `/v1/inpaint` (`route` is the last segment).
    pub async fn generate(
        &self,
        route: &str,
        spec: &atelier_contracts::GenerateSpec,
    ) -> anyhow::Result<JobRecord> {
        let resp = self
            .req(reqwest::Method::POST, &format!("/v1/{route}"))
            .json(spec)
            .send()
            .await
            .context("submitting")?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn job(&self, id: &str) -> anyhow::Result<JobRecord> {
        let resp = self
            .req(reqwest::Method::GET, &format!("/v1/jobs/{id}"))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn cancel(&self, id: &str) -> anyhow::Result<JobRecord> {
        let resp = self
            .req(reqwest::Method::DELETE, &format!("/v1/jobs/{id}"))
            .send()
            .await?;
        Ok(Self::check(resp).await?.json().await?)
    }

    pub async fn download(&self, key: &str) -> anyhow::Result<Bytes> {
        let resp = self
            .req(reqwest::Method::GET, &format!("/v1/artifacts/{key}"))
            .send()
            .await?;
        Ok(Self::check(resp).await?.bytes().await?)
    }

    pub async fn image(&self, sha256: &str) -> anyhow::Result<Option<ImageRecord>> {
        let resp = self
            .req(reqwest::Method::GET, &format!("/v1/images/{sha256}"))
            .send()
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
            .req(reqwest::Method::POST, "/v1/images")
            .json(ev)
            .send()
            .await
            .context("announcing images")?;
        Self::check(resp).await?;
        Ok(())
    }

    pub async fn datasets(&self) -> anyhow::Result<Vec<crate::datasets::DatasetSummary>> {
        let resp = self
            .req(reqwest::Method::GET, "/v1/datasets")
            .send()
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
            .req(
                reqwest::Method::GET,
                &format!("/v1/datasets/{dataset}/versions/{v}"),
            )
            .send()
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
            .req(reqwest::Method::GET, &format!("/v1/jobs/{id}/events"))
            .send()
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
