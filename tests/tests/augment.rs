//! The augmenter as a process: seeded variants of a dataset version written to S3 (SeaweedFS)
//! and rebuilt byte for byte from their recorded steps, paraphrases by rules and through an
//! OpenAI-compatible endpoint, hard negatives from caption edits and from the retrieval
//! index's neighbours, and bad input.

use std::collections::HashMap;
use std::time::Duration;

use atelier_client::Client;
use atelier_contracts::augment::{CaptionChange, NegativeKind, Paraphrase};
use atelier_contracts::dataset::{Decision, Tier};
use atelier_contracts::{AugmentSpec, DatasetRow, IndexSpec, JobState};
use atelier_e2e::*;
use tokio_util::sync::CancellationToken;

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
        4,
        "a green triangle to the left of a yellow star",
        Tier::Bronze,
        "shape",
    ),
    (
        5,
        "a cat sitting on a windowsill in the sun",
        Tier::Gold,
        "animal",
    ),
];

async fn rows_of(client: &Client, dataset: &str, version: u32) -> Vec<DatasetRow> {
    let m = client
        .dataset_version(dataset, Some(version))
        .await
        .unwrap();
    let data = client.download(&m.data.key).await.unwrap();
    std::str::from_utf8(&data)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn spec(v: serde_json::Value) -> AugmentSpec {
    serde_json::from_value(v).unwrap()
}

/// An OpenAI-compatible chat endpoint that answers every prompt with a fixed rewording of the
/// caption it quotes (the augmenter's `openai` paraphrase path, end to end over HTTP).
async fn fake_llm() -> String {
    use axum::routing::post;
    async fn complete(
        axum::Json(body): axum::Json<serde_json::Value>,
    ) -> axum::Json<serde_json::Value> {
        let prompt = body["messages"][0]["content"].as_str().unwrap_or_default();
        let caption = prompt.rsplit("Caption: ").next().unwrap_or_default();
        axum::Json(serde_json::json!({
            "choices": [{"message": {"content": format!("\"In other words: {caption}\"")}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 40, "completion_tokens": 12}
        }))
    }
    let app = axum::Router::new().route("/v1/chat/completions", post(complete));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn augment_variants_paraphrases_negatives_and_bad_input() {
    let Some(minilm) = atelier_embed::find_minilm() else {
        panic!("MiniLM weights missing: run scripts/bootstrap");
    };
    let mut c = Cluster::start(shared_s3_store(30)).await.unwrap();
    let llm = fake_llm().await;
    c.spawn_service(
        "atelier-retrieval-indexer",
        &[("ATELIER_MINILM_DIR", minilm.display().to_string())],
    )
    .unwrap();
    c.spawn_service(
        "atelier-augmenter",
        &[
            ("ATELIER_OPENAI_BASE_URL", llm),
            ("ATELIER_OPENAI_MODEL", "para-1".into()),
        ],
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;
    let v1 = write_version(&c, "aug", 1, ROWS).await;
    let rec = client
        .index(&IndexSpec {
            dataset: "aug".into(),
            version: Some(1),
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

    // Two variants per kept row, rule paraphrases, every kind of negative.
    let chain = serde_json::json!([
        {"op": "random_crop", "scale": [0.5, 1.0]},
        {"op": "resize", "size": 48, "mode": "center_crop"},
        {"op": "flip"},
        {"op": "rotate", "degrees": 10},
        {"op": "color_jitter", "brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.05},
        {"op": "blur", "sigma": [0.2, 1.0], "p": 0.5},
        {"op": "jpeg", "quality": [40, 90]}
    ]);
    let s = spec(serde_json::json!({
        "dataset": "aug", "version": 1, "variants": 2, "seed": "s1", "transforms": chain,
        "captions": {"paraphrase": "rules", "hard_negatives": {"neighbours": 2}},
        "note": "two variants"
    }));
    let out = atelier_cli::augment::run(&client, &s).await.unwrap();
    assert_eq!((out.parent, out.version), (1, 2));
    assert_eq!(out.augmented_rows, 5, "{out:?}");
    assert_eq!(out.variants, 10, "{:?}", out.skipped);
    let v2 = rows_of(&client, "aug", 2).await;
    assert_eq!(
        v2.len(),
        6 + 10,
        "originals (with the rejected one) and variants"
    );
    assert!(v2.windows(2).all(|w| w[0].sha256 < w[1].sha256));
    let parents: HashMap<&str, &DatasetRow> = v1.iter().map(|r| (r.sha256.as_str(), r)).collect();
    let manifest = client.dataset_version("aug", Some(2)).await.unwrap();
    assert_eq!(manifest.parent, Some(1));
    assert_eq!(manifest.augmentation.as_deref(), Some(&s));
    let mut per_parent: HashMap<&str, u32> = HashMap::new();
    let mut mirrored_seen = 0;
    for r in v2.iter().filter(|r| r.augmentation.is_some()) {
        let a = r.augmentation.as_ref().unwrap();
        let parent = parents[a.parent.as_str()];
        *per_parent.entry(a.parent.as_str()).or_default() += 1;
        assert_eq!((r.width, r.height), (Some(48), Some(48)));
        assert_eq!(
            r.split, parent.split,
            "a variant stays in its parent's split"
        );
        assert_eq!(r.decision, Decision::Accept);
        // The stored image is the recorded steps applied to the parent, byte for byte.
        let stored = client.download(&r.image_key).await.unwrap();
        let parent_img =
            image::load_from_memory(&client.download(&parent.image_key).await.unwrap())
                .unwrap()
                .to_rgb8();
        let replayed = atelier_augmenter::ops::apply_all(parent_img, &a.steps).unwrap();
        assert_eq!(
            atelier_augmenter::ops::encode_jpeg(&replayed, 95).unwrap(),
            stored.to_vec(),
            "variant {} of {}",
            a.variant,
            a.parent_image_id
        );
        let CaptionChange::Rules { edits } = &a.caption else {
            panic!("{:?}", a.caption)
        };
        assert!(!edits.is_empty());
        assert_ne!(r.caption, parent.caption, "{edits:?}");
        // A mirrored image's caption has its sides exchanged.
        let flips = a
            .steps
            .iter()
            .filter(|s| matches!(s, atelier_contracts::augment::Step::Flip { .. }))
            .count();
        let caption = r.caption.as_deref().unwrap();
        if parent.caption.as_deref() == Some(ROWS[3].1) {
            if flips == 1 {
                mirrored_seen += 1;
                assert_eq!(
                    a.mirrored,
                    [atelier_contracts::augment::FlipDirection::Horizontal]
                );
                assert!(
                    caption.contains("right") && !caption.contains("left"),
                    "{caption}"
                );
            } else {
                assert!(a.mirrored.is_empty());
                assert!(caption.contains("left"), "{caption}");
            }
        }
    }
    assert!(
        mirrored_seen >= 1,
        "the seed gives the left/right row a mirrored variant"
    );
    assert_eq!(per_parent.len(), 5);
    assert!(per_parent.values().all(|n| *n == 2));
    // Negatives: caption edits that change what the caption says, and other rows' captions.
    let shapes = v2
        .iter()
        .find(|r| r.augmentation.is_none() && r.caption.as_deref() == Some(ROWS[2].1))
        .unwrap();
    let kinds: Vec<NegativeKind> = shapes.negatives.iter().map(|n| n.kind).collect();
    for k in [
        NegativeKind::SwapColour,
        NegativeKind::SwapRelation,
        NegativeKind::SwapOrder,
        NegativeKind::SwapObject,
        NegativeKind::SwapCount,
    ] {
        assert!(kinds.contains(&k), "{k:?} missing: {:?}", shapes.negatives);
    }
    let relation = shapes
        .negatives
        .iter()
        .find(|n| n.kind == NegativeKind::SwapRelation)
        .unwrap();
    assert_eq!(
        relation.text,
        "a red circle below a blue square on a white background"
    );
    let neighbours: Vec<_> = shapes
        .negatives
        .iter()
        .filter(|n| n.kind == NegativeKind::Neighbour)
        .collect();
    assert_eq!(neighbours.len(), 2, "{:?}", shapes.negatives);
    for n in &neighbours {
        assert_ne!(n.image_id.as_deref(), Some(shapes.image_id.as_str()));
        assert_ne!(n.text, ROWS[2].1);
        assert!(ROWS.iter().any(|r| r.1 == n.text));
    }
    // The nearest caption to one shape caption is the other shape caption (real MiniLM).
    assert_eq!(neighbours[0].text, ROWS[3].1);
    let rejected = v2.iter().find(|r| r.decision == Decision::Reject).unwrap();
    assert!(rejected.negatives.is_empty() && rejected.augmentation.is_none());

    // The same spec again: the same rows, so the same content-addressed data file.
    let again = atelier_cli::augment::run(&client, &s).await.unwrap();
    assert_eq!(again.version, 3);
    let m3 = client.dataset_version("aug", Some(3)).await.unwrap();
    assert_eq!(m3.data.key, manifest.data.key, "same spec, same bytes");
    // Another seed: other variants.
    let mut other = s.clone();
    other.seed = "s2".into();
    let o = atelier_cli::augment::run(&client, &other).await.unwrap();
    let m4 = client
        .dataset_version("aug", Some(o.version))
        .await
        .unwrap();
    assert_ne!(m4.data.key, manifest.data.key);

    // Caption-only augmentation through the OpenAI-compatible endpoint: paraphrases on the
    // original rows, no new images.
    let p = atelier_cli::augment::run(
        &client,
        &spec(serde_json::json!({
            "dataset": "aug", "version": 1, "captions": {"paraphrase": "openai"},
            "filter": {"tags": ["animal"]}
        })),
    )
    .await
    .unwrap();
    assert_eq!((p.augmented_rows, p.variants), (3, 3));
    let vp = rows_of(&client, "aug", p.version).await;
    assert_eq!(vp.len(), v1.len());
    for r in &vp {
        if r.tags == ["animal"] {
            assert_eq!(r.paraphrases.len(), 1);
            assert_eq!(
                r.paraphrases[0].text,
                format!("In other words: {}", r.caption.as_deref().unwrap())
            );
            assert_eq!(
                r.paraphrases[0].change,
                CaptionChange::Openai {
                    model: "para-1".into()
                }
            );
        } else {
            assert!(r.paraphrases.is_empty());
        }
    }
    assert_eq!(
        atelier_contracts::augment::CaptionAugment::default().paraphrase,
        Paraphrase::Keep
    );

    // A curated version (rows of the indexed version) augments with neighbours too.
    let cur = atelier_cli::search::curate(
        &client,
        &serde_json::from_value(serde_json::json!({"dataset": "aug", "version": 1, "limit": 3}))
            .unwrap(),
    )
    .await
    .unwrap();
    let n = atelier_cli::augment::run(
        &client,
        &spec(serde_json::json!({
            "dataset": "aug", "captions": {"hard_negatives": {"edits": [], "neighbours": 1}}
        })),
    )
    .await
    .unwrap();
    assert_eq!(n.parent, cur.version.unwrap());
    assert_eq!(n.negatives, 3, "{n:?}");
    // Variants are not in the index (it holds version 1): they get no neighbours, and the
    // output says so and what to run.
    let v = atelier_cli::augment::run(
        &client,
        &spec(serde_json::json!({
            "dataset": "aug", "version": 2,
            "captions": {"hard_negatives": {"edits": [], "neighbours": 1}}
        })),
    )
    .await
    .unwrap();
    assert_eq!(v.negatives, 5, "{v:?}");
    assert!(
        v.skipped
            .iter()
            .any(|s| s.contains("10 rows are not in the caption index")
                && s.contains("atelier index --dataset aug --version 2")),
        "{:?}",
        v.skipped
    );

    // Bad input: a 4xx with the reason, and no version written.
    let before = client.dataset_version("aug", None).await.unwrap().version;
    for (body, want) in [
        (
            serde_json::json!({"transforms": [{"op": "swirl"}]}),
            "swirl",
        ),
        (
            serde_json::json!({"transforms": [{"op": "resize", "size": 0}]}),
            "resize size 0",
        ),
        (serde_json::json!({"variants": 3}), "nothing to do"),
        (
            serde_json::json!({"transforms": [{"op": "flip"}], "colour": 1}),
            "colour",
        ),
        (
            serde_json::json!({"transforms": [{"op": "flip"}], "filter": {"tags": ["none-such"]}}),
            "no kept row",
        ),
        (
            serde_json::json!({"transforms": [{"op": "flip"}], "version": 99}),
            "no version 99",
        ),
    ] {
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/datasets/aug/augment", client.base()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        assert_eq!(status, 422, "{body}: {text}");
        assert!(text.contains(want), "{body}: {text}");
    }
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/datasets/nope/augment", client.base()))
        .json(&serde_json::json!({"transforms": [{"op": "flip"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    assert_eq!(
        client.dataset_version("aug", None).await.unwrap().version,
        before
    );
    shutdown.cancel();
}
