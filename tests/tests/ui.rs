//! The web UI in a real browser (headless Chromium through ChromeDriver) against `atelier up`
//! with an API key and the tiny model: the page asks for the key and keeps it for the tab; the
//! generate page makes an image with live progress and shows it with its infotext, and "reuse
//! these settings" fills the form back; a bad size gets the API's message beside its field; the
//! jobs page lists the job; the datasets page answers; every control is labelled; the generate
//! page fits a phone's width. Screenshots of each page go to `target/ui-screenshots/`.

use std::path::PathBuf;
use std::time::Duration;

use atelier_diffusion::pipeline::{make_tiny, Family};
use atelier_e2e::webdriver::Browser;
use atelier_e2e::*;
use atelier_kit::nats_server::free_port;
use serde_json::json;

fn shots() -> PathBuf {
    repo_root().join("target/ui-screenshots")
}

const SECOND: Duration = Duration::from_secs(1);

/// Every visible form control has a label (a `<label for>`, a wrapping label or `aria-label`).
const UNLABELLED: &str = "return [...document.querySelectorAll('input, select, textarea, button')]
  .filter(e => e.offsetParent !== null)
  .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !(e.tagName === 'BUTTON' && e.textContent.trim()))
  .map(e => e.outerHTML);";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_ui_generates_lists_jobs_and_shows_api_errors_in_a_real_browser() {
    let tmp = tempfile::Builder::new()
        .prefix("atelier-ui-")
        .tempdir()
        .unwrap();
    let data = tmp.path().join("data");
    make_tiny(&data.join("models/tiny"), Family::Sd1, 31).unwrap();
    let (key, entry) = atelier_gateway::auth::generate_key("ui", "*").unwrap();
    let (port, nats_port) = (free_port().unwrap(), free_port().unwrap());
    let mut up = atelier_up_keyed(
        &data,
        port,
        nats_port,
        &tmp.path().join("up.log"),
        Some(&entry),
    )
    .spawn()
    .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
    let b = Browser::start(1280, 900).await.unwrap();

    // The assets need no key; the API does, so the page asks for it.
    b.goto(&format!("{base}/")).await.unwrap();
    let input = b
        .wait_for("dialog[open] #key-input", 10 * SECOND)
        .await
        .unwrap();
    b.fill(&input, &key).await.unwrap();
    b.click(
        &b.find("#key-form button[value=save]")
            .await
            .unwrap()
            .unwrap(),
    )
    .await
    .unwrap();
    let prompt = b.wait_for("#f-prompt", 10 * SECOND).await.unwrap();
    let kept = b
        .run("return sessionStorage.getItem('atelier.key')", json!([]))
        .await
        .unwrap();
    assert_eq!(
        kept,
        json!(key),
        "the key is kept in the tab's session storage"
    );
    let unlabelled = b.run(UNLABELLED, json!([])).await.unwrap();
    assert_eq!(unlabelled, json!([]), "controls without a label");

    // Generate: 4 steps at 64×64, progress, then the image with its infotext.
    b.fill(&prompt, "a red square").await.unwrap();
    for (id, v) in [
        ("#f-steps", "4"),
        ("#f-width", "64"),
        ("#f-height", "64"),
        ("#f-seed", "1234"),
    ] {
        b.fill(&b.find(id).await.unwrap().unwrap(), v)
            .await
            .unwrap();
    }
    b.click(
        &b.find("form[aria-label=Generate] button[type=submit]")
            .await
            .unwrap()
            .unwrap(),
    )
    .await
    .unwrap();
    let img = b
        .wait_for("#results figure img", 120 * SECOND)
        .await
        .unwrap();
    let loaded = b
        .run(
            "return arguments[0].complete && arguments[0].naturalWidth",
            json!([{ "element-6066-11e4-a52e-4f735466cecf": img }]),
        )
        .await
        .unwrap();
    assert_eq!(loaded, json!(64), "the generated image shows at its size");
    let caption = b
        .text(&b.find("#results figcaption").await.unwrap().unwrap())
        .await
        .unwrap();
    assert!(
        caption.contains("seed 1234") && caption.contains("Steps: 4"),
        "{caption}"
    );
    let status = b
        .text(&b.find("#gen-status").await.unwrap().unwrap())
        .await
        .unwrap();
    assert!(status.starts_with("succeeded"), "{status}");
    b.screenshot(&shots().join("generate.png")).await.unwrap();

    // "Reuse these settings" puts the image's settings back in the form.
    b.fill(&prompt, "something else").await.unwrap();
    b.fill(&b.find("#f-seed").await.unwrap().unwrap(), "-1")
        .await
        .unwrap();
    b.click(&b.find("#results figure button").await.unwrap().unwrap())
        .await
        .unwrap();
    let form = b
        .run("return [document.getElementById('f-prompt').value, document.getElementById('f-seed').value, document.getElementById('f-steps').value]", json!([]))
        .await
        .unwrap();
    assert_eq!(form, json!(["a red square", "1234", "4"]));

    // A size the API refuses: its message beside the width field.
    b.fill(&b.find("#f-width").await.unwrap().unwrap(), "100")
        .await
        .unwrap();
    b.click(
        &b.find("form[aria-label=Generate] button[type=submit]")
            .await
            .unwrap()
            .unwrap(),
    )
    .await
    .unwrap();
    let err = b.wait_for("#f-width-error", 10 * SECOND).await.unwrap();
    let msg = b.text(&err).await.unwrap();
    assert!(
        msg.contains("multiples of 8") && msg.contains("invalid_job"),
        "{msg}"
    );
    let beside = b
        .run("return document.getElementById('f-width-error').parentElement.contains(document.getElementById('f-width'))", json!([]))
        .await
        .unwrap();
    assert_eq!(beside, json!(true));
    b.screenshot(&shots().join("generate-error.png"))
        .await
        .unwrap();

    // Jobs: the txt2img job, succeeded.
    b.goto(&format!("{base}/#/jobs")).await.unwrap();
    let row = b
        .wait_for("tr[data-job] td.state-succeeded", 10 * SECOND)
        .await
        .unwrap();
    assert_eq!(b.text(&row).await.unwrap(), "succeeded");
    let kinds = b
        .run("return [...document.querySelectorAll('tr[data-job] td:nth-child(2)')].map(t => t.textContent)", json!([]))
        .await
        .unwrap();
    assert_eq!(kinds, json!(["txt2img"]));
    b.screenshot(&shots().join("jobs.png")).await.unwrap();

    // Datasets: none yet, and the page says how to make one.
    b.goto(&format!("{base}/#/datasets")).await.unwrap();
    let h1 = b.wait_for("main h1", 10 * SECOND).await.unwrap();
    assert_eq!(b.text(&h1).await.unwrap(), "Datasets");
    b.wait_for("main p.muted", 10 * SECOND).await.unwrap();
    b.screenshot(&shots().join("datasets.png")).await.unwrap();

    // A phone's width: the generate page fits without sideways scrolling.
    b.resize(390, 844).await.unwrap();
    b.goto(&format!("{base}/#/generate")).await.unwrap();
    b.wait_for("#f-prompt", 10 * SECOND).await.unwrap();
    let fits = b
        .run(
            "return document.documentElement.scrollWidth <= window.innerWidth",
            json!([]),
        )
        .await
        .unwrap();
    assert_eq!(fits, json!(true), "the page scrolls sideways at 390 px");
    b.screenshot(&shots().join("generate-phone.png"))
        .await
        .unwrap();

    b.quit().await;
    let _ = up.kill();
    let _ = up.wait();
}
