//! A W3C WebDriver client for the web UI's browser test: Debian's ChromeDriver on a free port
//! driving headless Chromium (both installed by `scripts/bootstrap --test`).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use base64::Engine as _;
use serde_json::{json, Value};

/// The key WebDriver names element references by.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    url: String,
    http: reqwest::Client,
}

impl Browser {
    /// ChromeDriver on a free port and a headless Chromium session at `width` × `height`.
    pub async fn start(width: u32, height: u32) -> anyhow::Result<Self> {
        let port = atelier_kit::nats_server::free_port()?;
        let driver = Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("/usr/bin/chromedriver (scripts/bootstrap --test installs it)")?;
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = http.get(format!("{base}/status")).send().await;
            if let Ok(r) = ready {
                if r.json::<Value>().await?["value"]["ready"] == true {
                    break;
                }
            }
            if Instant::now() > deadline {
                bail!("chromedriver did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                format!("--window-size={width},{height}")]},
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await?
            .json()
            .await?;
        let id = r["value"]["sessionId"]
            .as_str()
            .with_context(|| format!("no WebDriver session: {r}"))?;
        Ok(Self {
            driver,
            url: format!("{base}/session/{id}"),
            http,
        })
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> anyhow::Result<Value> {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if !body.is_null() {
            req = req.json(&body);
        }
        let r: Value = req.send().await?.json().await?;
        if let Some(err) = r["value"]["error"].as_str() {
            bail!("WebDriver {path}: {err}: {}", r["value"]["message"]);
        }
        Ok(r["value"].clone())
    }

    pub async fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.call(reqwest::Method::POST, "/url", json!({"url": url}))
            .await
            .map(drop)
    }

    /// The first element matching `css`, if any.
    pub async fn find(&self, css: &str) -> anyhow::Result<Option<String>> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/elements",
                json!({"using": "css selector", "value": css}),
            )
            .await?;
        Ok(v.as_array()
            .and_then(|a| a.first())
            .and_then(|e| e[ELEMENT].as_str())
            .map(str::to_owned))
    }

    /// Waits up to `timeout` for an element matching `css`.
    pub async fn wait_for(&self, css: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.find(css).await? {
                return Ok(e);
            }
            if Instant::now() > deadline {
                bail!("no {css} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first element matching `css`, or an error naming it.
    pub async fn get(&self, css: &str) -> anyhow::Result<String> {
        self.find(css)
            .await?
            .with_context(|| format!("no element matches {css}"))
    }

    /// Clicks the first element matching `css`.
    pub async fn click_css(&self, css: &str) -> anyhow::Result<()> {
        self.click(&self.get(css).await?).await
    }

    /// Fills the first field matching `css` with `text`.
    pub async fn fill_css(&self, css: &str, text: &str) -> anyhow::Result<()> {
        self.fill(&self.get(css).await?, text).await
    }

    pub async fn click(&self, element: &str) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/click"),
            json!({}),
        )
        .await
        .map(drop)
    }

    /// Clears a form field and types `text` into it.
    pub async fn fill(&self, element: &str, text: &str) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/clear"),
            json!({}),
        )
        .await?;
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            json!({"text": text}),
        )
        .await
        .map(drop)
    }

    /// Focuses `element` and presses Enter on it (what a keyboard user does to a button).
    pub async fn press_enter(&self, element: &str) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            json!({"text": "\u{E007}"}),
        )
        .await
        .map(drop)
    }

    /// Types `text` into `element` without clearing it (a file input takes a path this way).
    pub async fn send_keys(&self, element: &str, text: &str) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            &format!("/element/{element}/value"),
            json!({"text": text}),
        )
        .await
        .map(drop)
    }

    /// A mouse drag over `element` from `from` to `to` (pixels from its centre), in steps.
    pub async fn drag(
        &self,
        element: &str,
        from: (i64, i64),
        to: (i64, i64),
    ) -> anyhow::Result<()> {
        let origin = json!({ELEMENT: element});
        let mut moves = vec![
            json!({"type": "pointerMove", "duration": 0, "origin": origin, "x": from.0, "y": from.1}),
            json!({"type": "pointerDown", "button": 0}),
        ];
        for k in 1..=8 {
            let (x, y) = (
                from.0 + (to.0 - from.0) * k / 8,
                from.1 + (to.1 - from.1) * k / 8,
            );
            moves.push(
                json!({"type": "pointerMove", "duration": 20, "origin": origin, "x": x, "y": y}),
            );
        }
        moves.push(json!({"type": "pointerUp", "button": 0}));
        let actions = json!({"actions": [{"type": "pointer", "id": "mouse",
            "parameters": {"pointerType": "mouse"}, "actions": moves}]});
        self.call(reqwest::Method::POST, "/actions", actions)
            .await
            .map(drop)
    }

    pub async fn text(&self, element: &str) -> anyhow::Result<String> {
        let v = self
            .call(
                reqwest::Method::GET,
                &format!("/element/{element}/text"),
                Value::Null,
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) in the page; its return value.
    pub async fn run(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.call(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
    }

    pub async fn resize(&self, width: u32, height: u32) -> anyhow::Result<()> {
        self.call(
            reqwest::Method::POST,
            "/window/rect",
            json!({"width": width, "height": height}),
        )
        .await
        .map(drop)
    }

    /// A PNG of the viewport, written to `path`.
    pub async fn screenshot(&self, path: &Path) -> anyhow::Result<()> {
        let v = self
            .call(reqwest::Method::GET, "/screenshot", Value::Null)
            .await?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().context("no screenshot")?)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }

    /// Ends the session and the driver.
    pub async fn quit(mut self) {
        let _ = self
            .http
            .delete(&self.url)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
    }
}
