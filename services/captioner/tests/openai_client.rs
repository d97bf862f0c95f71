//! The OpenAI-compatible client against the loopback vision server, which speaks the real wire
//! format and injects the failures a real endpoint produces.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use atelier_captioner::openai::{prepare_image, CaptionError, Client, OpenAiArgs, Request};
use atelier_captioner::vision_server::{Faults, ServerConfig, VisionServer};

fn args(url: String) -> OpenAiArgs {
    OpenAiArgs {
        base_url: url,
        api_key: Some("sk-test".into()),
        model: "scene-describer".into(),
        requests_per_minute: 0,
        tokens_per_minute: 0,
        concurrency: 4,
        max_retries: 4,
        timeout_s: 5.0,
        backoff_ms: 10,
        ..Default::default()
    }
}

fn req(max_tokens: u32) -> Request {
    Request {
        model: "scene-describer".into(),
        prompt: atelier_contracts::dataset::SHAREGPT4V_PROMPT.into(),
        max_tokens,
        temperature: 0.2,
    }
}

fn scene_jpeg(seed: u64) -> Vec<u8> {
    let img = image::DynamicImage::ImageRgb8(atelier_ingest::samples::scene(seed, 96, 64));
    prepare_image(&img, 768).unwrap()
}

async fn server(faults: Faults) -> VisionServer {
    VisionServer::start(ServerConfig {
        api_key: Some("sk-test".into()),
        faults,
        model: "scene-describer".into(),
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn captions_a_scene_with_usage() {
    let s = server(Faults::default()).await;
    let c = Client::new(args(s.base_url())).unwrap();
    let got = c.caption(&scene_jpeg(3), &req(300)).await.unwrap();
    let truth = &atelier_ingest::samples::scene_captions(3)[0];
    // The describer names the same colours as the ground truth.
    for colour in truth
        .split_whitespace()
        .filter(|w| ["red", "green", "blue", "yellow", "white", "black"].contains(w))
    {
        assert!(got.text.contains(colour), "{truth:?} vs {:?}", got.text);
    }
    assert_eq!(got.finish_reason.as_deref(), Some("stop"));
    assert_eq!(got.attempts, 1);
    assert!(got.usage.prompt_tokens > 85 && got.usage.completion_tokens > 5);
    assert_eq!(
        got.usage.completion_tokens,
        got.text.split_whitespace().count() as u64
    );
}

#[tokio::test]
async fn retries_429_after_the_servers_retry_after_and_500s_and_broken_bodies() {
    let s = server(Faults {
        rate_limit_every: 2,
        retry_after_s: 0.3,
        ..Default::default()
    })
    .await;
    let c = Client::new(args(s.base_url())).unwrap();
    let jpeg = scene_jpeg(1);
    c.caption(&jpeg, &req(300)).await.unwrap(); // request 1 passes
    let t = Instant::now();
    let got = c.caption(&jpeg, &req(300)).await.unwrap(); // 2 is a 429, 3 passes
    assert_eq!(got.attempts, 2);
    assert!(
        t.elapsed() >= Duration::from_millis(290),
        "did not honour Retry-After: {:?}",
        t.elapsed()
    );
    assert_eq!(s.stats.rate_limited.load(Ordering::Relaxed), 1);

    let s = server(Faults {
        server_error_every: 2,
        truncate_every: 3,
        ..Default::default()
    })
    .await;
    let c = Client::new(args(s.base_url())).unwrap();
    // Requests 1 ok; 2 (500) 3 (truncated) 4 (500) 5 ok.
    c.caption(&jpeg, &req(300)).await.unwrap();
    let got = c.caption(&jpeg, &req(300)).await.unwrap();
    assert_eq!(got.attempts, 4);
    assert_eq!(s.stats.server_errors.load(Ordering::Relaxed), 2);
    assert_eq!(s.stats.truncated.load(Ordering::Relaxed), 1);
}

#[tokio::test]
async fn slow_responses_time_out_and_are_retried() {
    let s = server(Faults {
        slow_every: 1,
        slow_delay: Duration::from_secs(30),
        ..Default::default()
    })
    .await;
    let mut a = args(s.base_url());
    a.timeout_s = 0.3;
    a.max_retries = 1;
    let c = Client::new(a).unwrap();
    let t = Instant::now();
    let err = c.caption(&scene_jpeg(1), &req(300)).await.unwrap_err();
    assert!(
        matches!(err, CaptionError::GaveUp { attempts: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("timed out"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn gives_up_on_a_down_endpoint_and_does_not_retry_a_refusal() {
    let s = server(Faults {
        fail_all: true,
        ..Default::default()
    })
    .await;
    let c = Client::new(args(s.base_url())).unwrap();
    let err = c.caption(&scene_jpeg(1), &req(300)).await.unwrap_err();
    assert!(
        matches!(err, CaptionError::GaveUp { attempts: 5, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("HTTP 500"), "{err}");
    assert_eq!(s.stats.requests.load(Ordering::Relaxed), 5);

    let s = server(Faults::default()).await;
    let mut a = args(s.base_url());
    a.api_key = Some("sk-wrong".into());
    let c = Client::new(a).unwrap();
    let err = c.caption(&scene_jpeg(1), &req(300)).await.unwrap_err();
    assert!(
        matches!(err, CaptionError::Refused { status: 401, .. }),
        "{err}"
    );
    assert_eq!(s.stats.requests.load(Ordering::Relaxed), 1);
    // A request the server cannot read is refused, not retried.
    let c = Client::new(args(s.base_url())).unwrap();
    let err = c.caption(b"not a jpeg", &req(300)).await.unwrap_err();
    assert!(
        matches!(err, CaptionError::Refused { status: 400, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn max_tokens_cuts_the_caption_and_reports_length() {
    let s = server(Faults::default()).await;
    let c = Client::new(args(s.base_url())).unwrap();
    let got = c.caption(&scene_jpeg(2), &req(5)).await.unwrap();
    assert_eq!(got.finish_reason.as_deref(), Some("length"));
    assert_eq!(got.text.split_whitespace().count(), 5);
}

#[tokio::test]
async fn the_request_budget_spaces_requests() {
    let s = server(Faults::default()).await;
    let jpeg = scene_jpeg(1);
    let r300 = req(300);
    let mut a = args(s.base_url());
    a.requests_per_minute = 60; // 1 per second after a burst of 60
    let c = Client::new(a).unwrap();
    let t = Instant::now();
    let tasks: Vec<_> = (0..62).map(|_| c.caption(&jpeg, &r300)).collect();
    let got = futures::future::join_all(tasks).await;
    assert!(got.iter().all(|r| r.is_ok()));
    let el = t.elapsed();
    assert!(
        el >= Duration::from_millis(1900),
        "62 requests at 60/min (burst 60) finished in {el:?}"
    );
}

#[test]
fn openais_api_without_a_key_is_reported_before_any_request() {
    let mut a = args("https://api.openai.com/v1".into());
    a.api_key = None;
    // OPENAI_API_KEY may be set where this runs; only assert when it is not.
    if std::env::var_os("OPENAI_API_KEY").is_none() {
        let why = Client::new(a.clone()).unwrap().unusable().unwrap();
        assert!(why.contains("ATELIER_OPENAI_API_KEY"), "{why}");
    }
    a.api_key = Some("sk-x".into());
    assert_eq!(Client::new(a.clone()).unwrap().unusable(), None);
    a.api_key = None;
    a.base_url = "http://127.0.0.1:11434/v1".into(); // e.g. Ollama: no key needed
    assert_eq!(Client::new(a).unwrap().unusable(), None);
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let mut a = args("ftp://x".into());
    assert!(Client::new(a.clone())
        .err()
        .unwrap()
        .to_string()
        .contains("http://"));
    a.base_url = "not a url".into();
    assert!(Client::new(a)
        .err()
        .unwrap()
        .to_string()
        .contains("--openai-base-url"));
}

/// The Batch API round trip: an input file uploaded, a batch created on it, found again by its
/// file (what a job that died between creating and recording a batch relies on), polled to
/// completion, and its output read back by custom_id; a file with no batch finds none.
#[tokio::test]
async fn a_batch_is_created_found_by_its_file_and_read_back() {
    use atelier_captioner::openai::batch::{read_line, request_line};
    let s = server(Faults::default()).await;
    let mut a = args(s.base_url());
    a.batch_poll_secs = 0.05;
    let c = Client::new(a).unwrap();
    let mut file = Vec::new();
    for seed in 0..3 {
        file.extend(request_line(
            &format!("img-{seed}"),
            &scene_jpeg(seed),
            &req(50),
        ));
    }
    let input = c.upload_batch_file(file).await.unwrap();
    let created = c.create_batch(&input).await.unwrap();
    let found = c.batch_of_file(&input).await.unwrap().unwrap();
    assert_eq!(found.id, created.id);
    let other = c
        .upload_batch_file(request_line("x", &scene_jpeg(9), &req(50)))
        .await
        .unwrap();
    assert!(c.batch_of_file(&other).await.unwrap().is_none());
    let done = loop {
        let b = c.batch(&created.id).await.unwrap();
        if b.is_terminal() {
            break b;
        }
        tokio::time::sleep(c.batch_poll()).await;
    };
    assert_eq!(done.status, "completed");
    let out = c
        .file_content(done.output_file_id.as_deref().unwrap())
        .await
        .unwrap();
    let mut ids: Vec<String> = String::from_utf8_lossy(&out)
        .lines()
        .map(|l| {
            let (id, caption) = read_line(l).unwrap();
            assert!(!caption.unwrap().text.is_empty());
            id
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["img-0", "img-1", "img-2"]);
}
