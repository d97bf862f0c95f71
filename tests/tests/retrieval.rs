//! The retrieval side as processes: a retrieval-indexer (tiny random CLIP, the real MiniLM)
//! indexing dataset versions into S3 (SeaweedFS), queries through the gateway over NATS
//! request/reply, incremental re-indexing, a restarted indexer answering from the store without
//! re-embedding, and curation into new versions.

use std::time::Duration;

use atelier_client::Client;
use atelier_contracts::dataset::{Decision, Tier};
use atelier_contracts::{CurateSpec, IndexSpec, JobOutput, JobState, SearchResponse, Space};
use atelier_e2e::*;
use tokio_util::sync::CancellationToken;

/// (scene seed, caption, tier, tag). Seeds 3 and 103 are the same scene as PNG and JPEG.
const ROWS: &[(u64, &str, Tier, &str)] = &[
    (
        1,
        "a brown dog running across a grassy park",
        Tier::Gold,
        "animal",
    ),
    (2, "a small dog sleeping on a sofa", Tier::Silver, "animal"),
    (
        3,
        "a red circle above a blue square on a white background",
        Tier::Gold,
        "shape",
    ),
    (
        103,
        "a red circle above a blue square on a white background",
        Tier::Silver,
        "shape",
    ),
    (
        4,
        "a green triangle beside a yellow star",
        Tier::Bronze,
        "shape",
    ),
    (
        5,
        "a cat sitting on a windowsill in the sun",
        Tier::Gold,
        "animal",
    ),
    (
        6,
        "a bowl of fresh fruit on a wooden table",
        Tier::Silver,
        "food",
    ),
    (7, "a plate of pasta with tomato sauce", Tier::Gold, "food"),
    (
        8,
        "a city skyline at night with bright lights",
        Tier::Bronze,
        "city",
    ),
    (9, "a busy street with cars and buses", Tier::Silver, "city"),
];

async fn index(
    c: &Cluster,
    client: &Client,
    dataset: &str,
    version: u32,
) -> atelier_contracts::IndexOutput {
    let rec = client
        .index(&IndexSpec {
            dataset: dataset.into(),
            version: Some(version),
            spaces: vec![],
        })
        .await
        .unwrap();
    let done = c
        .wait_terminal(&[rec.id], Duration::from_secs(120))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    let Some(JobOutput::Indexed(out)) = done.output else {
        panic!("{:?}", done.output)
    };
    out
}

async fn search(client: &Client, q: &[(&str, &str)]) -> anyhow::Result<SearchResponse> {
    let p: Vec<(String, String)> = q
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    client.search(&p, None).await
}

fn captions(r: &SearchResponse) -> Vec<&str> {
    r.results
        .iter()
        .filter_map(|h| h.caption.as_deref())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn index_search_reindex_restart_and_curate() {
    let Some(minilm) = atelier_embed::find_minilm() else {
        panic!("MiniLM weights missing: run scripts/bootstrap");
    };
    let mut c = Cluster::start(shared_s3_store(30)).await.unwrap();
    let clip_dir = c.tmp.path().join("clip");
    atelier_embed::clip::make_tiny(&clip_dir, 3).unwrap();
    let env = vec![
        ("ATELIER_CLIP_MODEL", clip_dir.display().to_string()),
        ("ATELIER_MINILM_DIR", minilm.display().to_string()),
    ];
    let indexer = c.spawn_service("atelier-retrieval-indexer", &env).unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let v1 = write_version(&c, "things", 1, ROWS).await;

    // Before indexing: a clear 404.
    let err = search(&client, &[("dataset", "things"), ("text", "a dog")])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("404") && err.contains("atelier index"),
        "{err}"
    );

    let out = index(&c, &client, "things", 1).await;
    assert_eq!(out.version, 1);
    for space in Space::ALL {
        let s = &out.spaces[&space];
        assert_eq!(
            (s.count, s.embedded, s.removed),
            (10, 10, 0),
            "{space}: {s:?}"
        );
    }

    // caption→caption with the real MiniLM: the dog captions come first.
    let r = search(
        &client,
        &[
            ("dataset", "things"),
            ("text", "a puppy playing outside on the lawn"),
            ("space", "caption"),
            ("k", "3"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.space, Space::Caption);
    assert_eq!(r.results.len(), 3);
    assert_eq!(
        captions(&r)[0],
        "a brown dog running across a grassy park",
        "{:?}",
        captions(&r)
    );
    assert!(
        captions(&r)[..2].iter().all(|c| c.contains("dog")),
        "{:?}",
        captions(&r)
    );
    assert!(r.results.windows(2).all(|w| w[0].score >= w[1].score));
    // A query image: answered, and gone from the store once answered.
    let query = atelier_ingest::samples::scene_bytes(7, 64, 64, image::ImageFormat::Png);
    let p = [("dataset", "things"), ("k", "3")].map(|(k, v)| (k.to_string(), v.to_string()));
    let r = client
        .search(&p, Some((query.into(), "image/png")))
        .await
        .unwrap();
    assert_eq!(r.results.len(), 3);
    assert!(c.store.list("queries").await.unwrap().is_empty());
    // Filters: tier, tags, source, size; the rejected row is never indexed.
    let r = search(
        &client,
        &[
            ("dataset", "things"),
            ("text", "food"),
            ("space", "caption"),
            ("k", "10"),
            ("tier", "gold"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.results.len(), 4);
    assert!(r.results.iter().all(|h| h.tier == Some(Tier::Gold)));
    let r = search(
        &client,
        &[
            ("dataset", "things"),
            ("text", "x"),
            ("space", "caption"),
            ("k", "20"),
            ("tags", "city"),
            ("source", "web"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        captions(&r),
        vec!["a city skyline at night with bright lights"]
    );
    let r = search(
        &client,
        &[
            ("dataset", "things"),
            ("text", "x"),
            ("k", "20"),
            ("min_width", "135"),
        ],
    )
    .await
    .unwrap();
    assert!(r.results.iter().all(|h| h.width.unwrap() >= 135) && !r.results.is_empty());
    assert!(!r
        .results
        .iter()
        .any(|h| h.caption.as_deref().unwrap().starts_with("rejected")));

    // image→image: the JPEG of the same scene is the PNG's nearest neighbour (the record
    // itself is left out); an uploaded copy of the PNG finds the PNG first.
    let png = v1
        .iter()
        .find(|r| {
            r.format.as_deref() == Some("png")
                && r.caption.as_deref().unwrap().starts_with("a red circle")
        })
        .unwrap();
    let jpg = v1
        .iter()
        .find(|r| r.format.as_deref() == Some("jpeg"))
        .unwrap();
    let r = search(
        &client,
        &[
            ("dataset", "things"),
            ("image_id", &png.image_id),
            ("k", "3"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.results[0].sha256, jpg.sha256, "{r:?}");
    assert!(r.results.iter().all(|h| h.sha256 != png.sha256));
    let p = vec![
        ("dataset".to_string(), "things".to_string()),
        ("k".into(), "2".into()),
    ];
    let r = client
        .search(&p, Some((scene_image(3).into(), "image/png")))
        .await
        .unwrap();
    assert_eq!(r.results[0].sha256, png.sha256);
    assert!(r.results[0].score > 0.999, "{}", r.results[0].score);
    // image→text: CLIP text embeddings of captions.
    let r = search(
        &client,
        &[
            ("dataset", "things"),
            ("image_id", &png.image_id),
            ("space", "clip_text"),
            ("k", "5"),
        ],
    )
    .await
    .unwrap();
    assert_eq!((r.space, r.results.len()), (Space::ClipText, 5));

    // Bad input: each a 4xx with the reason.
    for (q, status, needle) in [
        (vec![("dataset", "nope"), ("text", "a")], "404", "no index"),
        (vec![("dataset", "things"), ("text", "  ")], "422", "empty"),
        (
            vec![("dataset", "things"), ("text", "a"), ("k", "0")],
            "422",
            "k 0",
        ),
        (
            vec![("dataset", "things"), ("text", "a"), ("k", "5000")],
            "422",
            "1 to 1000",
        ),
        (
            vec![("dataset", "things"), ("text", "a"), ("space", "audio")],
            "422",
            "space",
        ),
        (
            vec![("dataset", "things"), ("text", "a"), ("colour", "red")],
            "422",
            "colour",
        ),
        (
            vec![("dataset", "things"), ("image_id", "0123456789abcdef")],
            "404",
            "no indexed record",
        ),
        (vec![("dataset", "things")], "422", "exactly one"),
    ] {
        let err = search(&client, &q).await.unwrap_err().to_string();
        assert!(err.contains(status) && err.contains(needle), "{q:?}: {err}");
    }
    let err = client
        .search(
            &p,
            Some((
                bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\nbroken"),
                "image/png",
            )),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("422") && err.contains("decode"), "{err}");

    // Version 2 drops two rows and adds two: only those are embedded, the dropped ones leave.
    let mut rows2: Vec<_> = ROWS
        .iter()
        .filter(|r| r.0 != 8 && r.0 != 9)
        .copied()
        .collect();
    rows2.push((
        10,
        "a dog catching a frisbee on the beach",
        Tier::Gold,
        "animal",
    ));
    rows2.push((
        11,
        "a red circle above a blue square on a white background",
        Tier::Gold,
        "shape",
    ));
    let v2 = write_version(&c, "things", 2, &rows2).await;
    let out = index(&c, &client, "things", 2).await;
    for space in Space::ALL {
        let s = &out.spaces[&space];
        assert_eq!(
            (s.count, s.embedded, s.removed),
            (10, 2, 2),
            "{space}: {s:?}"
        );
    }
    let r = search(
        &client,
        &[
            ("dataset", "things"),
            ("text", "city"),
            ("space", "caption"),
            ("k", "10"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(r.version, 2);
    assert!(!captions(&r)
        .iter()
        .any(|c| c.contains("city") || c.contains("street")));

    // A restarted indexer answers from the store, and re-indexing embeds nothing.
    c.kill9(indexer);
    c.spawn_service("atelier-retrieval-indexer", &env).unwrap();
    let r = search(
        &client,
        &[
            ("dataset", "things"),
            ("text", "a dog with a frisbee"),
            ("space", "caption"),
            ("k", "1"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(captions(&r), vec!["a dog catching a frisbee on the beach"]);
    let out = index(&c, &client, "things", 2).await;
    assert!(
        out.spaces
            .values()
            .all(|s| s.embedded == 0 && s.count == 10),
        "{out:?}"
    );

    // A graph in another format (older releases stored USearch's bytes): queries and the next
    // index job rebuild it from the embedding segments instead of failing, embedding nothing.
    let kv = c.bus.indexes_kv().await.unwrap();
    let mut m: atelier_contracts::IndexManifest =
        serde_json::from_slice(&kv.get("things").await.unwrap().unwrap()).unwrap();
    let (foreign, _) = c
        .store
        .put_bytes(
            bytes::Bytes::from_static(b"usearch index bytes of an older release"),
            "application/octet-stream",
        )
        .await
        .unwrap();
    m.spaces.get_mut(&Space::Caption).unwrap().graph = foreign;
    kv.put("things", serde_json::to_vec(&m).unwrap().into())
        .await
        .unwrap();
    let r = search(
        &client,
        &[
            ("dataset", "things"),
            ("text", "a dog with a frisbee"),
            ("space", "caption"),
            ("k", "1"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(captions(&r), vec!["a dog catching a frisbee on the beach"]);
    let out = index(&c, &client, "things", 2).await;
    assert!(
        out.spaces
            .values()
            .all(|s| s.embedded == 0 && s.count == 10),
        "{out:?}"
    );
    let m: atelier_contracts::IndexManifest =
        serde_json::from_slice(&kv.get("things").await.unwrap().unwrap()).unwrap();
    let graph = c
        .store
        .get_bytes(
            &atelier_contracts::ArtifactKey::parse(&m.spaces[&Space::Caption].graph.key).unwrap(),
        )
        .await
        .unwrap();
    assert!(graph.starts_with(b"ATLHNSW2"));

    // Curation: a semantic query, a keyword exclusion and caption dedup.
    let spec: CurateSpec = serde_json::from_value(serde_json::json!({
        "dataset": "things",
        "queries": [{"text": "a photo of a dog", "space": "caption", "min_score": 0.35}],
        "keywords": {"none": ["sofa"]},
        "note": "dogs outdoors"
    }))
    .unwrap();
    let out = atelier_cli::search::curate(&client, &spec).await.unwrap();
    assert_eq!((out.parent, out.version), (2, Some(3)));
    let m = client.dataset_version("things", Some(3)).await.unwrap();
    assert_eq!(m.parent, Some(2));
    let got = atelier_cli::export::rows(&client, &m).await.unwrap();
    let mut caps: Vec<&str> = got.iter().filter_map(|r| r.caption.as_deref()).collect();
    caps.sort();
    assert_eq!(
        caps,
        vec![
            "a brown dog running across a grassy park",
            "a dog catching a frisbee on the beach"
        ]
    );
    let cur = m.curation.as_ref().unwrap();
    assert_eq!(cur.spec, spec);
    assert!(cur.graphs.contains_key(&Space::Caption));
    // The same spec on the same version: the same rows (the content-addressed data file).
    let again = atelier_cli::search::curate(&client, &spec).await.unwrap();
    let m4 = client
        .dataset_version("things", again.version)
        .await
        .unwrap();
    assert_eq!(m4.data.key, m.data.key);

    // Dedup: of the three identical red-circle captions, the first by sha256 stays.
    let spec: CurateSpec = serde_json::from_value(serde_json::json!({
        "dataset": "things", "version": 2,
        "dedup": {"space": "caption", "threshold": 0.99}
    }))
    .unwrap();
    let out = atelier_cli::search::curate(&client, &spec).await.unwrap();
    assert_eq!(out.duplicates_removed, 2, "{out:?}");
    assert_eq!(
        out.counts.rows,
        v2.iter().filter(|r| r.decision == Decision::Accept).count() as u64 - 2
    );
    // A seeded limit.
    let spec: CurateSpec = serde_json::from_value(serde_json::json!({
        "dataset": "things", "version": 2, "limit": 4, "seed": "s", "filter": {"tags": ["shape", "animal"]}
    }))
    .unwrap();
    assert!(
        atelier_cli::search::curate(&client, &spec).await.is_err(),
        "no row has both tags"
    );
    let spec: CurateSpec = serde_json::from_value(serde_json::json!({
        "dataset": "things", "version": 2, "limit": 4, "seed": "s"
    }))
    .unwrap();
    let out = atelier_cli::search::curate(&client, &spec).await.unwrap();
    assert_eq!(out.counts.rows, 4);

    // Nothing matched: a 422 that says so, and no version written.
    let before = client.datasets().await.unwrap()[0].versions.len();
    let spec: CurateSpec = serde_json::from_value(serde_json::json!({
        "dataset": "things", "keywords": {"all": ["submarine"]}
    }))
    .unwrap();
    let err = atelier_cli::search::curate(&client, &spec)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("422") && err.contains("matched no row"),
        "{err}"
    );
    assert_eq!(client.datasets().await.unwrap()[0].versions.len(), before);
    // Unknown fields and unknown datasets are refused with the reason.
    let resp = reqwest::Client::new()
        .post(format!(
            "{}/v1/datasets/things/curate",
            client_base(&client)
        ))
        .json(&serde_json::json!({"keywrods": {"all": ["x"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 422);
    assert!(resp.text().await.unwrap().contains("keywrods"));
    let spec: CurateSpec =
        serde_json::from_value(serde_json::json!({"dataset": "ghost", "limit": 1})).unwrap();
    let err = atelier_cli::search::curate(&client, &spec)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("422") && err.contains("ghost"), "{err}");
    shutdown.cancel();
}

fn client_base(c: &Client) -> String {
    c.base().to_owned()
}
