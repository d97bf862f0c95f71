//! `GET /v1/jobs` and cancelling, key by key: each key lists and cancels only its own jobs, an
//! `admin` key every key's; pages are newest first and their cursors cover every job once; bad
//! queries are 422s naming the parameter.

use std::collections::HashSet;

use atelier_contracts::{ChecksumSpec, JobSpec, JobState};
use atelier_e2e::*;
use tokio_util::sync::CancellationToken;

fn checksum(i: usize) -> JobSpec {
    JobSpec::Checksum(ChecksumSpec {
        input: format!("sha256/00/{i:064}"),
        expected_sha256: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_list_and_cancel_their_own_jobs() {
    let c = Cluster::local().await.unwrap();
    let shutdown = CancellationToken::new();
    let (alice_key, alice) =
        atelier_gateway::auth::generate_key("alice", "jobs:read+jobs:write").unwrap();
    let (bob_key, bob) =
        atelier_gateway::auth::generate_key("bob", "jobs:read+jobs:write").unwrap();
    let (admin_key, admin) = atelier_gateway::auth::generate_key("ops", "*").unwrap();
    let base = c
        .gateway(
            vec![alice, bob, admin],
            Default::default(),
            shutdown.clone(),
        )
        .await
        .unwrap();
    let client = |k: &str| atelier_client::Client::new(&base, Some(k.to_owned())).unwrap();
    let (alice, bob, admin) = (client(&alice_key), client(&bob_key), client(&admin_key));
    // No worker runs: the jobs stay queued.
    let mut alices = Vec::new();
    for i in 0..5 {
        alices.push(alice.submit(&checksum(i)).await.unwrap().id);
    }
    let mut bobs = Vec::new();
    for i in 5..7 {
        bobs.push(bob.submit(&checksum(i)).await.unwrap().id);
    }

    let page = alice.jobs(&[]).await.unwrap();
    let ids: Vec<_> = page.jobs.iter().map(|r| r.id).collect();
    let mut newest_first = alices.clone();
    newest_first.reverse();
    assert_eq!(ids, newest_first, "alice sees her jobs, newest first");
    assert!(page.next_cursor.is_none());
    assert!(page
        .jobs
        .iter()
        .all(|r| r.submitted_by.as_deref() == Some("alice")));

    // Pages of 2: every job once, in order.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = vec![("limit", "2")];
        if let Some(c) = &cursor {
            q.push(("cursor", c.as_str()));
        }
        let p = alice.jobs(&q).await.unwrap();
        assert!(p.jobs.len() <= 2);
        seen.extend(p.jobs.iter().map(|r| r.id));
        match p.next_cursor {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen, newest_first);

    let count = |p: atelier_contracts::http::JobPage| p.jobs.len();
    assert_eq!(
        count(
            alice
                .jobs(&[("state", "queued"), ("kind", "checksum")])
                .await
                .unwrap()
        ),
        5
    );
    assert_eq!(count(alice.jobs(&[("kind", "caption")]).await.unwrap()), 0);
    assert_eq!(
        count(
            alice
                .jobs(&[("since", "2999-01-01T00:00:00Z")])
                .await
                .unwrap()
        ),
        0
    );
    assert_eq!(count(admin.jobs(&[]).await.unwrap()), 7);
    let bobs_page = admin.jobs(&[("owner", "bob")]).await.unwrap();
    assert_eq!(
        bobs_page.jobs.iter().map(|r| r.id).collect::<HashSet<_>>(),
        bobs.iter().copied().collect::<HashSet<_>>()
    );

    // Errors name the parameter.
    let http = reqwest::Client::new();
    for (query, needle, status) in [
        ("limit=0", "limit", 422),
        ("state=bogus", "state", 422),
        ("color=red", "color", 422),
        ("cursor=nope", "cursor", 422),
        ("owner=bob", "admin", 403),
    ] {
        let r = http
            .get(format!("{base}/v1/jobs?{query}"))
            .bearer_auth(&alice_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), status, "{query}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert!(
            body["error"]["message"].as_str().unwrap().contains(needle),
            "{query}: {body}"
        );
    }

    // Cancelling: only the submitter or an admin.
    let err = bob.cancel(&alices[0].to_string()).await.unwrap_err();
    assert!(format!("{err:#}").contains("another key"), "{err:#}");
    assert_eq!(
        alice.job(&alices[0].to_string()).await.unwrap().state,
        JobState::Queued
    );
    assert_eq!(
        alice.cancel(&alices[0].to_string()).await.unwrap().state,
        JobState::Cancelled
    );
    assert_eq!(
        admin.cancel(&bobs[0].to_string()).await.unwrap().state,
        JobState::Cancelled
    );
    assert_eq!(
        count(alice.jobs(&[("state", "cancelled")]).await.unwrap()),
        1
    );
    shutdown.cancel();
}
