//! A client for OpenAI-compatible chat-completions vision endpoints (OpenAI, vLLM, Ollama,
//! LM Studio, …): one image and one text prompt per request, with client-side request and token
//! budgets, a concurrency limit, timeouts, and retries with exponential backoff that honour
//! `Retry-After` (and `retry-after-ms`) on 429 and 503.

pub mod batch;
pub mod budget;

use std::sync::Arc;
use std::time::Duration;

use atelier_contracts::dataset::TokenUsage;
use base64::Engine as _;
use rand::Rng as _;
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::budget::{Limiter, Local};

/// The worker's endpoint configuration (never a job's).
#[derive(Debug, Clone, clap::Args)]
pub struct OpenAiArgs {
    /// Base URL of the OpenAI-compatible API (…/v1).
    #[arg(
        id = "openai_base_url",
        long = "openai-base-url",
        env = "ATELIER_OPENAI_BASE_URL",
        default_value = "https://api.openai.com/v1"
    )]
    pub base_url: String,
    /// API key, sent as `Authorization: Bearer`. Falls back to OPENAI_API_KEY.
    #[arg(
        id = "openai_api_key",
        long = "openai-api-key",
        env = "ATELIER_OPENAI_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Model used when a job names none.
    #[arg(
        id = "openai_model",
        long = "openai-model",
        env = "ATELIER_OPENAI_MODEL",
        default_value = "gpt-4o"
    )]
    pub model: String,
    /// Requests per minute this worker may send (0: no limit).
    #[arg(
        id = "openai_rpm",
        long = "openai-rpm",
        env = "ATELIER_OPENAI_RPM",
        default_value_t = 500
    )]
    pub requests_per_minute: u32,
    /// Tokens (prompt + completion) per minute this worker may spend (0: no limit).
    #[arg(
        id = "openai_tpm",
        long = "openai-tpm",
        env = "ATELIER_OPENAI_TPM",
        default_value_t = 200_000
    )]
    pub tokens_per_minute: u32,
    /// Requests in flight at once.
    #[arg(
        id = "openai_concurrency",
        long = "openai-concurrency",
        env = "ATELIER_OPENAI_CONCURRENCY",
        default_value_t = 8
    )]
    pub concurrency: usize,
    /// Attempts per image after the first, on 429, 5xx, timeouts and broken responses.
    #[arg(
        id = "openai_max_retries",
        long = "openai-max-retries",
        env = "ATELIER_OPENAI_MAX_RETRIES",
        default_value_t = 6
    )]
    pub max_retries: u32,
    /// Seconds one request may take.
    #[arg(
        id = "openai_timeout_s",
        long = "openai-timeout-s",
        env = "ATELIER_OPENAI_TIMEOUT_S",
        default_value_t = 120.0
    )]
    pub timeout_s: f64,
    /// First backoff in milliseconds (doubled per retry, with jitter, capped at 60 s).
    #[arg(
        id = "openai_backoff_ms",
        long = "openai-backoff-ms",
        env = "ATELIER_OPENAI_BACKOFF_MS",
        default_value_t = 1000
    )]
    pub backoff_ms: u64,
    /// Prices in US dollars per million prompt and completion tokens, per model:
    /// `gpt-4o=2.50/10.00,gpt-4o-mini=0.15/0.60`. Runs with a spend cap in dollars need the
    /// model's price; outputs report the cost of models that have one.
    #[arg(
        id = "openai_prices",
        long = "openai-prices",
        env = "ATELIER_OPENAI_PRICES"
    )]
    pub prices: Option<String>,
    /// Requests in flight at once across every replica sharing the budget (0: only
    /// `--openai-concurrency` per worker).
    #[arg(
        id = "openai_max_in_flight",
        long = "openai-max-in-flight",
        env = "ATELIER_OPENAI_MAX_IN_FLIGHT",
        default_value_t = 0
    )]
    pub max_in_flight: u32,
    /// Seconds between looks at a Batch API batch.
    #[arg(
        id = "openai_batch_poll_secs",
        long = "openai-batch-poll-secs",
        env = "ATELIER_OPENAI_BATCH_POLL_SECS",
        default_value_t = 60.0
    )]
    pub batch_poll_secs: f64,
    /// Largest Batch API input file, bytes (the API's limit is 200 MB).
    #[arg(
        id = "openai_batch_max_bytes",
        long = "openai-batch-max-bytes",
        env = "ATELIER_OPENAI_BATCH_MAX_BYTES",
        default_value_t = 190_000_000
    )]
    pub batch_max_bytes: u64,
}

/// US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub prompt: f64,
    pub completion: f64,
}

impl Price {
    /// This price times `factor` (the Batch API's discount).
    pub fn scaled(self, factor: f64) -> Self {
        Self {
            prompt: self.prompt * factor,
            completion: self.completion * factor,
        }
    }

    pub fn cost(&self, usage: TokenUsage) -> f64 {
        (usage.prompt_tokens as f64 * self.prompt
            + usage.completion_tokens as f64 * self.completion)
            / 1e6
    }
}

/// Parses `--openai-prices`.
pub fn parse_prices(s: &str) -> Result<std::collections::HashMap<String, Price>, String> {
    let mut out = std::collections::HashMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let bad = || {
            format!("--openai-prices: {item:?} is not MODEL=PROMPT/COMPLETION (US dollars per million tokens, e.g. gpt-4o=2.50/10.00)")
        };
        let (model, rest) = item.split_once('=').ok_or_else(bad)?;
        let (p, c) = rest.split_once('/').ok_or_else(bad)?;
        let num = |v: &str| {
            v.trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(bad)
        };
        let price = Price {
            prompt: num(p)?,
            completion: num(c)?,
        };
        out.insert(model.trim().to_owned(), price);
    }
    Ok(out)
}

impl Default for OpenAiArgs {
    fn default() -> Self {
        Self {
            base_url: "https://api.openai.com/v1".into(),
            api_key: None,
            model: "gpt-4o".into(),
            requests_per_minute: 500,
            tokens_per_minute: 200_000,
            concurrency: 8,
            max_retries: 6,
            timeout_s: 120.0,
            backoff_ms: 1000,
            prices: None,
            max_in_flight: 0,
            batch_poll_secs: 60.0,
            batch_max_bytes: 190_000_000,
        }
    }
}

/// One caption request's settings.
#[derive(Debug, Clone)]
pub struct Request {
    pub model: String,
    pub prompt: String,
    pub max_tokens: u32,
    pub temperature: f32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub text: String,
    pub finish_reason: Option<String>,
    pub usage: TokenUsage,
    /// Attempts it took (1 when the first succeeded).
    pub attempts: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptionError {
    /// The endpoint refused the request for good (4xx other than 408/409/429): retrying would
    /// not help.
    #[error("the endpoint refused the request: HTTP {status}: {message}")]
    Refused { status: u16, message: String },
    /// Still failing after every retry.
    #[error("gave up after {attempts} attempts; last error: {last}")]
    GaveUp { attempts: u32, last: String },
    #[error("{0}")]
    Config(String),
}

/// Shared by every job a worker runs, so the budgets are per worker, not per job.
pub struct Client {
    http: reqwest::Client,
    args: OpenAiArgs,
    key: Option<String>,
    limiter: Arc<dyn Limiter>,
    prices: std::collections::HashMap<String, Price>,
    slots: Arc<Semaphore>,
}

/// One failed attempt: whether to retry and how long the server asked us to wait.
struct Attempt {
    retry: bool,
    after: Option<Duration>,
    message: String,
    status: Option<u16>,
}

#[derive(Deserialize)]
pub(crate) struct Completion {
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Deserialize)]
struct Choice {
    message: Message,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    #[serde(default)]
    content: Option<serde_json::Value>,
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct Usage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl Client {
    pub fn new(args: OpenAiArgs) -> Result<Self, CaptionError> {
        let url = reqwest::Url::parse(&args.base_url).map_err(|e| {
            CaptionError::Config(format!(
                "--openai-base-url {:?} is not a URL: {e}",
                args.base_url
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(CaptionError::Config(format!(
                "--openai-base-url {:?}: expected http:// or https://",
                args.base_url
            )));
        }
        if !(args.timeout_s > 0.0 && args.timeout_s.is_finite()) {
            return Err(CaptionError::Config(
                "--openai-timeout-s must be positive".into(),
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs_f64(args.timeout_s))
            .connect_timeout(Duration::from_secs(10))
            .build()
            .map_err(|e| CaptionError::Config(format!("HTTP client: {e}")))?;
        let key = args
            .api_key
            .clone()
            .or_else(|| std::env::var("OPENAI_API_KEY").ok())
            .filter(|k| !k.is_empty());
        let prices = parse_prices(args.prices.as_deref().unwrap_or_default())
            .map_err(CaptionError::Config)?;
        Ok(Self {
            http,
            limiter: Arc::new(Local::new(args.requests_per_minute, args.tokens_per_minute)),
            prices,
            slots: Arc::new(Semaphore::new(args.concurrency.max(1))),
            key,
            args,
        })
    }

    /// Why jobs cannot run, when the configuration makes that certain: OpenAI's own API without a
    /// key.
    pub fn unusable(&self) -> Option<String> {
        let official = reqwest::Url::parse(&self.args.base_url)
            .ok()
            .and_then(|u| u.host_str().map(|h| h.ends_with("api.openai.com")))
            .unwrap_or(false);
        (official && self.key.is_none()).then(|| {
            format!(
                "this worker is configured for {} without an API key: set ATELIER_OPENAI_API_KEY (or OPENAI_API_KEY) on the worker, point ATELIER_OPENAI_BASE_URL at another OpenAI-compatible server, or run `atelier up --scene-captioner`",
                self.args.base_url
            )
        })
    }

    /// Draw from `limiter` instead of this process's own budgets (replicas sharing one).
    pub fn with_limiter(mut self, limiter: Arc<dyn Limiter>) -> Self {
        self.limiter = limiter;
        self
    }

    /// The configuration this client was made with.
    pub fn args(&self) -> &OpenAiArgs {
        &self.args
    }

    /// The price of `model`, when `--openai-prices` names it.
    pub fn price(&self, model: &str) -> Option<Price> {
        self.prices.get(model).copied()
    }

    pub fn default_model(&self) -> &str {
        &self.args.model
    }

    pub fn concurrency(&self) -> usize {
        self.args.concurrency.max(1)
    }

    /// Captions one JPEG; waits for budget and a free slot first.
    pub async fn caption(&self, jpeg: &[u8], req: &Request) -> Result<Caption, CaptionError> {
        let content = vision_content(jpeg, req);
        // Reserve the worst case (a typical high-detail image is under 1,200 prompt tokens);
        // corrected with the real usage afterwards.
        self.chat(content, req, 1200.0).await
    }

    /// A text-only completion of `req.prompt` (paraphrases); same budgets, retries and slots.
    pub async fn complete(&self, req: &Request) -> Result<Caption, CaptionError> {
        self.chat(serde_json::Value::String(req.prompt.clone()), req, 0.0)
            .await
    }

    /// One user message with `content`; `extra_tokens` is what the prompt costs beyond its text.
    async fn chat(
        &self,
        content: serde_json::Value,
        req: &Request,
        extra_tokens: f64,
    ) -> Result<Caption, CaptionError> {
        let body = chat_body(content, req);
        let body = serde_json::to_vec(&body).map_err(|e| CaptionError::Config(e.to_string()))?;
        let reserve = f64::from(req.max_tokens) + extra_tokens + req.prompt.len() as f64 / 4.0;
        let url = format!(
            "{}/chat/completions",
            self.args.base_url.trim_end_matches('/')
        );
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let result = {
                let _slot = self
                    .slots
                    .acquire()
                    .await
                    .map_err(|_| CaptionError::Config("client closed".into()))?;
                let lease = self.limiter.take(reserve).await;
                let r = self.attempt(&url, body.clone()).await;
                self.limiter.release(lease).await;
                r
            };
            match result {
                Ok(mut c) => {
                    let used = (c.usage.prompt_tokens + c.usage.completion_tokens) as f64;
                    self.limiter.adjust_tokens(reserve - used).await;
                    c.attempts = attempts;
                    return Ok(c);
                }
                Err(a) => {
                    self.limiter.adjust_tokens(reserve).await;
                    if let (Some(429), Some(after)) = (a.status, a.after) {
                        // Everyone drawing from this budget waits, not only this request.
                        self.limiter.pause(after).await;
                    }
                    if !a.retry {
                        return Err(CaptionError::Refused {
                            status: a.status.unwrap_or(0),
                            message: a.message,
                        });
                    }
                    if attempts > self.args.max_retries {
                        return Err(CaptionError::GaveUp {
                            attempts,
                            last: a.message,
                        });
                    }
                    let wait = a.after.unwrap_or_else(|| self.backoff(attempts));
                    tracing::debug!(attempt = attempts, wait_ms = wait.as_millis() as u64,
                        error = %a.message, "caption request failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base =
            self.args.backoff_ms as f64 * 2f64.powi(attempt.saturating_sub(1).min(16) as i32);
        let jitter = rand::thread_rng().gen_range(0.5..1.0);
        Duration::from_millis((base * jitter).min(60_000.0) as u64)
    }

    async fn attempt(&self, url: &str, body: Vec<u8>) -> Result<Caption, Attempt> {
        let mut rb = self
            .http
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(k) = &self.key {
            rb = rb.bearer_auth(k);
        }
        let transient = |message: String| Attempt {
            retry: true,
            after: None,
            message,
            status: None,
        };
        let resp = rb.send().await.map_err(|e| {
            transient(if e.is_timeout() {
                format!("timed out after {} s", self.args.timeout_s)
            } else {
                format!("request failed: {e}")
            })
        })?;
        let status = resp.status();
        let after = retry_after(resp.headers());
        let text = resp
            .text()
            .await
            .map_err(|e| transient(format!("reading the response: {e}")))?;
        if !status.is_success() {
            let code = status.as_u16();
            let retry = matches!(code, 408 | 409 | 429) || status.is_server_error();
            let message: String = text.chars().take(300).collect();
            return Err(Attempt {
                retry,
                after: if retry { after } else { None },
                message: format!("HTTP {code}: {message}"),
                status: Some(code),
            });
        }
        let c: Completion = serde_json::from_str(&text).map_err(|e| {
            transient(format!(
                "unreadable response ({e}); starts {:?}",
                text.chars().take(80).collect::<String>()
            ))
        })?;
        caption_of(c).map_err(transient)
    }
}

/// The user message content of a vision request: the prompt and the JPEG as a data URL.
pub(crate) fn vision_content(jpeg: &[u8], req: &Request) -> serde_json::Value {
    serde_json::json!([
        {"type": "text", "text": req.prompt},
        {"type": "image_url", "image_url": {
            "url": format!("data:image/jpeg;base64,{}",
                base64::engine::general_purpose::STANDARD.encode(jpeg)),
        }},
    ])
}

/// A chat-completions request body.
pub(crate) fn chat_body(content: serde_json::Value, req: &Request) -> serde_json::Value {
    serde_json::json!({
        "model": req.model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
    })
}

/// The caption in a chat completion.
fn caption_of(c: Completion) -> Result<Caption, String> {
    {
        let choice = c
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| "the response has no choices".to_owned())?;
        let text = match choice.message.content {
            Some(serde_json::Value::String(s)) => s,
            // Some servers return content parts.
            Some(serde_json::Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .collect::<Vec<_>>()
                .join(""),
            _ => choice.message.refusal.unwrap_or_default(),
        };
        let usage = c.usage.map_or(TokenUsage::default(), |u| TokenUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
        });
        Ok(Caption {
            text: text.trim().to_owned(),
            finish_reason: choice.finish_reason,
            usage,
            attempts: 0,
        })
    }
}

/// `retry-after-ms` (OpenAI), else `Retry-After` in seconds or as an HTTP date; capped at 5 min.
fn retry_after(h: &reqwest::header::HeaderMap) -> Option<Duration> {
    let get = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let d = if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()) {
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    } else {
        let v = get("retry-after")?;
        if let Ok(s) = v.parse::<f64>() {
            Duration::from_secs_f64(s.max(0.0))
        } else {
            let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now())
                .to_std()
                .unwrap_or_default()
        }
    };
    Some(d.min(Duration::from_secs(300)))
}

/// Downscales so the longer side is at most `max_side` and encodes as JPEG (quality 90).
pub fn prepare_image(img: &image::DynamicImage, max_side: u32) -> Result<Vec<u8>, String> {
    let (w, h) = (img.width(), img.height());
    let rgb = if w.max(h) > max_side {
        img.resize(max_side, max_side, image::imageops::FilterType::Triangle)
            .to_rgb8()
    } else {
        img.to_rgb8()
    };
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&rgb)
        .map_err(|e| format!("encoding JPEG: {e}"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_milliseconds_and_dates() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        let mut h = reqwest::header::HeaderMap::new();
        let later = (chrono::Utc::now() + chrono::Duration::seconds(30)).to_rfc2822();
        h.insert("retry-after", later.parse().unwrap());
        let d = retry_after(&h).unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        h.insert("retry-after", "99999".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(300)));
    }

    #[test]
    fn images_are_downscaled_to_the_max_side() {
        let img = image::DynamicImage::new_rgb8(300, 120);
        let jpeg = prepare_image(&img, 100).unwrap();
        let back = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((back.width(), back.height()), (100, 40));
        let small = prepare_image(&image::DynamicImage::new_rgba8(20, 10), 100).unwrap();
        assert_eq!(image::load_from_memory(&small).unwrap().width(), 20);
    }
}
