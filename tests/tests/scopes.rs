//! Scopes, route by route: every operation `/openapi.json` documents is called with a key of
//! each scope; a key without the documented scope gets 403 `forbidden` (so a read-only key creates
//! nothing), a key with it never does. Prints the routes × scopes table docs/api.md carries.

use std::collections::BTreeMap;

use atelier_e2e::*;
use tokio_util::sync::CancellationToken;

const SCOPES: [&str; 4] = [
    "jobs:read",
    "jobs:write",
    "artifacts:read",
    "artifacts:write",
];

/// A concrete path for a documented one (parameters filled with values of the right shape).
fn concrete(path: &str) -> String {
    path.replace("{id}", "00000000-0000-7000-8000-000000000000")
        .replace("{sha256}", &"0".repeat(64))
        .replace("{name}", "nosuchdataset")
        .replace("{version}", "1")
        .replace("{key}", "sha256/00/00")
        .replace("{*key}", "sha256/00/00")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_answers_only_its_scope() {
    let c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let mut keys = BTreeMap::new();
    let mut entries = Vec::new();
    for s in SCOPES {
        let (key, entry) = atelier_gateway::auth::generate_key(&s.replace(':', "-"), s).unwrap();
        keys.insert(s, key);
        entries.push(entry);
    }
    let base = c
        .gateway(entries, Default::default(), shutdown.clone())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let doc: serde_json::Value = http
        .get(format!("{base}/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut table = Vec::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let Some(needed) = op["security"][0]["bearer"][0].as_str() else {
                continue; // open routes: /healthz, /metrics, /openapi.json
            };
            assert!(
                SCOPES.contains(&needed),
                "{method} {path}: unknown scope {needed}"
            );
            table.push(format!(
                "| `{} {path}` | `{needed}` |",
                method.to_uppercase()
            ));
            for (scope, key) in &keys {
                let url = format!("{base}{}", concrete(path));
                let req = match method.as_str() {
                    "get" => http.get(&url),
                    "post" => http.post(&url).body("not json"),
                    "delete" => http.delete(&url),
                    other => panic!("{other} {path}"),
                };
                let resp = tokio::time::timeout(
                    std::time::Duration::from_secs(20),
                    req.bearer_auth(key).send(),
                )
                .await
                .unwrap_or_else(|_| panic!("{method} {path} with {scope}: no answer"))
                .unwrap();
                let status = resp.status().as_u16();
                if *scope == needed {
                    assert_ne!(status, 403, "{method} {path} refused its own scope {scope}");
                } else {
                    assert_eq!(status, 403, "{method} {path} with {scope} (needs {needed})");
                    let body: serde_json::Value = resp.json().await.unwrap();
                    assert_eq!(body["error"]["code"], "forbidden", "{body}");
                }
            }
        }
    }
    assert!(table.len() >= 25, "{}", table.join("\n"));
    eprintln!("| route | scope |\n|---|---|\n{}", table.join("\n"));
    // Keys with only read scopes wrote nothing: no job records.
    let jobs = c.bus.jobs_kv().await.unwrap();
    let mut listed = jobs.keys().await.unwrap();
    use futures::StreamExt;
    assert!(listed.next().await.is_none(), "a job was created");
    shutdown.cancel();
}
