//! The gateway's `/openapi.json` is a document client generators accept: it validates under
//! `openapi-spec-validator` (what generators run first), every operation has its own
//! `operationId`, and it lists every route of A1111's API that `webuiapi` calls.

use atelier_e2e::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openapi_document_validates() {
    let c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let base = c
        .gateway(Vec::new(), Default::default(), shutdown.clone())
        .await
        .unwrap();
    let text = reqwest::get(format!("{base}/openapi.json"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    shutdown.cancel();
    let doc: serde_json::Value = serde_json::from_str(&text).unwrap();

    let mut ids = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let id = op["operationId"].as_str();
            ids.push(id.unwrap_or_else(|| panic!("{method} {path} has no operationId")));
        }
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "operation ids repeat: {ids:?}");

    // The routes webuiapi's methods call, beyond generation.
    for p in [
        "/sdapi/v1/png-info",
        "/sdapi/v1/schedulers",
        "/sdapi/v1/embeddings",
        "/sdapi/v1/loras",
        "/sdapi/v1/memory",
        "/sdapi/v1/refresh-checkpoints",
        "/sdapi/v1/train/hypernetwork",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} is not documented");
    }

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, &text).unwrap();
    let out = std::process::Command::new(tool("python"))
        .args(["-m", "openapi_spec_validator"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openapi-spec-validator refused the document:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
