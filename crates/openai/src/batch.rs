//! The Batch API of OpenAI-compatible endpoints: a JSONL file of chat-completions requests
//! uploaded through the Files API (`purpose=batch`), a batch created on it (24-hour window),
//! polled until it ends, and its output and error files downloaded and read back by `custom_id`.
//! Half the price of the same requests sent one by one.

use std::time::Duration;

use serde::Deserialize;

use crate::{caption_of, chat_body, vision_content, Caption, CaptionError, Client, Completion};

/// Requests one input file may hold (OpenAI's limit).
pub const MAX_REQUESTS: usize = 50_000;
/// Bytes one input file may hold (OpenAI's limit: 200 MB).
pub const MAX_FILE_BYTES: usize = 200 * 1000 * 1000;

/// A batch as the endpoint reports it.
#[derive(Debug, Clone, Deserialize)]
pub struct BatchInfo {
    pub id: String,
    /// `validating`, `in_progress`, `finalizing`, `completed`, `failed`, `expired`,
    /// `cancelling`, `cancelled`.
    pub status: String,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
    #[serde(default)]
    pub errors: Option<serde_json::Value>,
}

impl BatchInfo {
    /// Whether the batch will not change any more.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.status.as_str(),
            "completed" | "failed" | "expired" | "cancelled"
        )
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
pub struct RequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

#[derive(Deserialize)]
struct FileObject {
    id: String,
}

/// One line of an output or error file.
#[derive(Deserialize)]
struct OutputLine {
    custom_id: String,
    #[serde(default)]
    response: Option<OutputResponse>,
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OutputResponse {
    status_code: u16,
    #[serde(default)]
    body: serde_json::Value,
}

/// One request line of an input file: the caption request for `jpeg`, answered under
/// `custom_id`.
pub fn request_line(custom_id: &str, jpeg: &[u8], req: &crate::Request) -> Vec<u8> {
    let line = serde_json::json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": chat_body(vision_content(jpeg, req), req),
    });
    let mut v = serde_json::to_vec(&line).unwrap_or_default();
    v.push(b'\n');
    v
}

/// A line of an output or error file: its `custom_id` and the caption, or why there is none.
pub fn read_line(line: &str) -> Result<(String, Result<Caption, String>), String> {
    let l: OutputLine =
        serde_json::from_str(line).map_err(|e| format!("unreadable batch output line: {e}"))?;
    let result = match (l.response, l.error) {
        (Some(r), _) if r.status_code == 200 => serde_json::from_value::<Completion>(r.body)
            .map_err(|e| format!("unreadable completion: {e}"))
            .and_then(caption_of),
        (Some(r), e) => Err(format!(
            "HTTP {}: {}",
            r.status_code,
            e.map_or(r.body.to_string(), |e| e.to_string())
        )),
        (None, Some(e)) => Err(e.to_string()),
        (None, None) => Err("no response and no error".into()),
    };
    Ok((l.custom_id, result))
}

impl Client {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.args.base_url.trim_end_matches('/'))
    }

    /// Sends `make()` until it answers 2xx, retrying 429, 5xx and transport errors with backoff.
    async fn call(
        &self,
        what: &str,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, CaptionError> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut rb = make();
            if let Some(k) = &self.key {
                rb = rb.bearer_auth(k);
            }
            let (retry, message, after) = match rb.send().await {
                Ok(r) if r.status().is_success() => return Ok(r),
                Ok(r) => {
                    let status = r.status();
                    let after = crate::retry_after(r.headers());
                    let text: String = r
                        .text()
                        .await
                        .unwrap_or_default()
                        .chars()
                        .take(300)
                        .collect();
                    let retry = status.as_u16() == 429 || status.is_server_error();
                    if !retry {
                        return Err(CaptionError::Refused {
                            status: status.as_u16(),
                            message: format!("{what}: {text}"),
                        });
                    }
                    (retry, format!("{what}: HTTP {status}: {text}"), after)
                }
                Err(e) => (true, format!("{what}: {e}"), None),
            };
            if !retry || attempts > self.args.max_retries {
                return Err(CaptionError::GaveUp {
                    attempts,
                    last: message,
                });
            }
            tokio::time::sleep(after.unwrap_or_else(|| self.backoff(attempts))).await;
        }
    }

    /// Uploads an input file (`purpose=batch`); its id.
    pub async fn upload_batch_file(&self, jsonl: Vec<u8>) -> Result<String, CaptionError> {
        let url = self.url("/files");
        let resp = self
            .call("uploading the batch input file", || {
                let part = reqwest::multipart::Part::bytes(jsonl.clone())
                    .file_name("atelier-batch.jsonl")
                    .mime_str("application/jsonl")
                    .unwrap_or_else(|_| reqwest::multipart::Part::bytes(jsonl.clone()));
                let form = reqwest::multipart::Form::new()
                    .text("purpose", "batch")
                    .part("file", part);
                self.http.post(&url).multipart(form)
            })
            .await?;
        let f: FileObject = resp
            .json()
            .await
            .map_err(|e| CaptionError::Config(format!("the file upload's answer: {e}")))?;
        Ok(f.id)
    }

    /// Creates a batch of the requests in file `input_file_id` (24-hour window).
    pub async fn create_batch(&self, input_file_id: &str) -> Result<BatchInfo, CaptionError> {
        let url = self.url("/batches");
        let body = serde_json::json!({
            "input_file_id": input_file_id,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
            "metadata": {"created_by": "atelier"},
        });
        let resp = self
            .call("creating the batch", || self.http.post(&url).json(&body))
            .await?;
        resp.json()
            .await
            .map_err(|e| CaptionError::Config(format!("the batch's answer: {e}")))
    }

    /// The batch created on input file `input_file_id`, if there is one (the endpoint's most
    /// recent batches, newest first, up to 10 pages of 100).
    pub async fn batch_of_file(
        &self,
        input_file_id: &str,
    ) -> Result<Option<BatchInfo>, CaptionError> {
        #[derive(Deserialize)]
        struct Page {
            data: Vec<Listed>,
            #[serde(default)]
            has_more: bool,
        }
        #[derive(Deserialize)]
        struct Listed {
            id: String,
            #[serde(default)]
            input_file_id: String,
        }
        let mut after: Option<String> = None;
        for _ in 0..10 {
            let mut url = self.url("/batches?limit=100");
            if let Some(a) = &after {
                url.push_str(&format!("&after={a}"));
            }
            let resp = self.call("listing batches", || self.http.get(&url)).await?;
            let page: Page = resp
                .json()
                .await
                .map_err(|e| CaptionError::Config(format!("the batch list: {e}")))?;
            if let Some(b) = page.data.iter().find(|b| b.input_file_id == input_file_id) {
                return self.batch(&b.id).await.map(Some);
            }
            match page.data.last() {
                Some(last) if page.has_more => after = Some(last.id.clone()),
                _ => break,
            }
        }
        Ok(None)
    }

    pub async fn batch(&self, id: &str) -> Result<BatchInfo, CaptionError> {
        let url = self.url(&format!("/batches/{id}"));
        let resp = self
            .call("reading the batch", || self.http.get(&url))
            .await?;
        resp.json()
            .await
            .map_err(|e| CaptionError::Config(format!("the batch's answer: {e}")))
    }

    pub async fn cancel_batch(&self, id: &str) -> Result<(), CaptionError> {
        let url = self.url(&format!("/batches/{id}/cancel"));
        self.call("cancelling the batch", || self.http.post(&url))
            .await
            .map(drop)
    }

    /// A file's content (an output or error file).
    pub async fn file_content(&self, id: &str) -> Result<bytes::Bytes, CaptionError> {
        let url = self.url(&format!("/files/{id}/content"));
        let resp = self
            .call("downloading a batch file", || self.http.get(&url))
            .await?;
        resp.bytes()
            .await
            .map_err(|e| CaptionError::Config(format!("downloading a batch file: {e}")))
    }

    /// How long to wait between looks at a batch (`--openai-batch-poll-secs`).
    pub fn batch_poll(&self) -> Duration {
        Duration::from_secs_f64(self.args.batch_poll_secs.max(0.05))
    }

    /// The largest input file this client writes (`--openai-batch-max-bytes`, at most 200 MB).
    pub fn batch_max_bytes(&self) -> usize {
        (self.args.batch_max_bytes as usize).clamp(1, MAX_FILE_BYTES)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_and_error_lines_map_back_to_their_ids() {
        let ok = r#"{"id":"b1","custom_id":"img-a","response":{"status_code":200,"body":{"choices":[{"message":{"content":" a red square "},"finish_reason":"stop"}],"usage":{"prompt_tokens":90,"completion_tokens":3}}},"error":null}"#;
        let (id, c) = read_line(ok).unwrap();
        let c = c.unwrap();
        assert_eq!((id.as_str(), c.text.as_str()), ("img-a", "a red square"));
        assert_eq!(c.usage.prompt_tokens + c.usage.completion_tokens, 93);
        let bad = r#"{"id":"b2","custom_id":"img-b","response":{"status_code":500,"body":{"error":{"message":"boom"}}},"error":null}"#;
        let (id, c) = read_line(bad).unwrap();
        assert_eq!(id, "img-b");
        assert!(c.unwrap_err().contains("HTTP 500"));
        let expired = r#"{"id":"b3","custom_id":"img-c","response":null,"error":{"code":"batch_expired","message":"expired"}}"#;
        assert!(read_line(expired)
            .unwrap()
            .1
            .unwrap_err()
            .contains("batch_expired"));
        assert!(read_line("not json").is_err());
    }

    #[test]
    fn request_lines_are_chat_completions_with_the_image() {
        let req = crate::Request {
            model: "m".into(),
            prompt: "Describe.".into(),
            max_tokens: 50,
            temperature: 0.2,
        };
        let line = request_line("img-a", b"\xff\xd8jpeg", &req);
        assert_eq!(line.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["url"], "/v1/chat/completions");
        assert_eq!(v["body"]["model"], "m");
        let url = v["body"]["messages"][0]["content"][1]["image_url"]["url"]
            .as_str()
            .unwrap();
        assert!(url.starts_with("data:image/jpeg;base64,"));
    }
}
