//! The dataset side as processes: ingest, two competing captioners against an OpenAI-compatible
//! loopback endpoint that injects 429s, 500s and truncated bodies, the quality filter writing
//! versions to S3 (SeaweedFS), exports loaded by Hugging Face `datasets`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use atelier_captioner::vision_server::{Faults, ServerConfig, VisionServer};
use atelier_cli::export::{export, rows, ExportFormat};
use atelier_cli::ingest::ingest_dir;
use atelier_contracts::dataset::{
    CaptionBackend, CaptionRecord, CaptionSpec, Decision, FilterSpec, ModelVerdict, SplitSpec, Tier,
};
use atelier_contracts::{JobOutput, JobRecord, JobSpec, JobState};
use atelier_e2e::*;
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

async fn run(c: &Cluster, client: &atelier_client::Client, spec: JobSpec) -> JobRecord {
    let rec = client.submit(&spec).await.unwrap();
    c.wait_terminal(&[rec.id], Duration::from_secs(120))
        .await
        .unwrap()
        .remove(0)
}

fn caption(dataset: &str, prompt: Option<&str>, images: Vec<String>) -> JobSpec {
    JobSpec::Caption(CaptionSpec {
        dataset: dataset.into(),
        images,
        backend: CaptionBackend::Openai {
            model: None,
            prompt: prompt.map(Into::into),
            max_tokens: 300,
            temperature: 0.2,
            image_max_side: 96,
            batch: false,
        },
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ingest_caption_filter_export_through_the_services() {
    let vision = VisionServer::start(ServerConfig {
        api_key: Some("sk-e2e".into()),
        faults: Faults {
            rate_limit_every: 5,
            retry_after_s: 0.2,
            server_error_every: 7,
            truncate_every: 11,
            ..Default::default()
        },
        model: "scene-describer".into(),
    })
    .await
    .unwrap();
    let mut c = Cluster::start(shared_s3_store(30)).await.unwrap();
    let blip_dir = c.tmp.path().join("blip");
    atelier_captioner::blip::make_tiny(&blip_dir.join("tiny-blip"), 5).unwrap();
    let env = vec![
        ("ATELIER_BLIP_MODELS", blip_dir.display().to_string()),
        ("ATELIER_OPENAI_BASE_URL", vision.base_url()),
        ("ATELIER_OPENAI_API_KEY", "sk-e2e".to_owned()),
        ("ATELIER_OPENAI_MODEL", "scene-describer".to_owned()),
        ("ATELIER_OPENAI_BACKOFF_MS", "20".to_owned()),
        ("ATELIER_OPENAI_CONCURRENCY", "3".to_owned()),
    ];
    c.spawn_service("atelier-ingest", &[]).unwrap();
    c.spawn_service("atelier-captioner", &env).unwrap();
    c.spawn_service("atelier-captioner", &env).unwrap();
    let clip_dir = c.tmp.path().join("clip");
    atelier_embed::clip::make_tiny(&clip_dir, 3).unwrap();
    c.spawn_service(
        "atelier-quality-filter",
        &[("ATELIER_CLIP_MODEL", clip_dir.display().to_string())],
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let client = c.open_gateway(&shutdown).await;

    // A folder of scenes, one duplicate file, one truncated PNG.
    let dir = tempfile::tempdir().unwrap();
    for seed in 0..20u64 {
        std::fs::write(
            dir.path().join(format!("scene-{seed:02}.png")),
            atelier_ingest::samples::scene_bytes(seed, 128, 96, image::ImageFormat::Png),
        )
        .unwrap();
    }
    std::fs::copy(dir.path().join("scene-03.png"), dir.path().join("dup.png")).unwrap();
    let whole = atelier_ingest::samples::scene_bytes(77, 128, 96, image::ImageFormat::Png);
    std::fs::write(dir.path().join("broken.png"), &whole[..whole.len() / 3]).unwrap();
    let report = ingest_dir(
        &client,
        dir.path(),
        "scenes",
        None,
        Duration::from_secs(60),
        false,
    )
    .await
    .unwrap();
    assert_eq!((report.files, report.images, report.recorded), (22, 21, 21));
    assert_eq!(report.flagged.len(), 1, "{:?}", report.flagged);
    assert_eq!(report.flagged[0].0, "broken.png");
    // Every file's bytes went up (the two copies before either was recorded).
    assert_eq!((report.uploaded, report.already_recorded), (22, 0));
    // Again: nothing is sent, every file is already recorded under its path.
    let again = ingest_dir(
        &client,
        dir.path(),
        "scenes",
        None,
        Duration::from_secs(60),
        false,
    )
    .await
    .unwrap();
    assert_eq!((again.files, again.images, again.recorded), (22, 21, 21));
    assert_eq!((again.uploaded, again.already_recorded), (0, 22));
    assert_eq!(again.flagged, report.flagged);

    // Bad input is refused at the gateway, with the reason; an unknown dataset fails the job.
    let err = client
        .submit(&JobSpec::Caption(CaptionSpec {
            dataset: "no such".into(),
            images: vec![],
            backend: CaptionBackend::default(),
            ..Default::default()
        }))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("dataset name"), "{err}");
    let mut bad_policy = FilterSpec {
        dataset: "scenes".into(),
        caption_source: None,
        policy: Default::default(),
        split: Default::default(),
        note: None,
    };
    bad_policy.policy.languages = vec!["english".into()];
    let err = client
        .submit(&JobSpec::Filter(bad_policy))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("639-3"), "{err}");
    let r = run(&c, &client, caption("unknown", None, vec![])).await;
    assert_eq!(r.state, JobState::Failed);
    assert_eq!(r.error.unwrap().code, "unknown_dataset");

    // Caption a few images first, then all: the second job only pays for the rest.
    let mut shas: Vec<String> = Vec::new();
    for seed in 0..5u64 {
        let b = atelier_ingest::samples::scene_bytes(seed, 128, 96, image::ImageFormat::Png);
        shas.push(hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&b)));
    }
    let r = run(&c, &client, caption("scenes", None, shas.clone())).await;
    assert_eq!(r.state, JobState::Succeeded, "{:?}", r.error);
    let Some(JobOutput::Captions(first)) = r.output else {
        panic!()
    };
    assert_eq!((first.captioned, first.already_captioned), (5, 0));
    let r = run(&c, &client, caption("scenes", None, vec![])).await;
    assert_eq!(r.state, JobState::Succeeded, "{:?}", r.error);
    let Some(JobOutput::Captions(all)) = r.output else {
        panic!()
    };
    assert_eq!(
        (
            all.images,
            all.captioned,
            all.already_captioned,
            all.unusable
        ),
        (21, 15, 5, 1)
    );
    assert!(all.failed.is_empty(), "{:?}", all.failed);
    // The endpoint really misbehaved, and the client rode it out.
    let stats = &vision.stats;
    assert!(stats.rate_limited.load(Ordering::Relaxed) >= 3);
    assert!(stats.server_errors.load(Ordering::Relaxed) >= 2);
    assert!(stats.truncated.load(Ordering::Relaxed) >= 1);
    assert_eq!(stats.unauthorized.load(Ordering::Relaxed), 0);
    // Token usage per caption sums to the job's.
    let captions_kv = c.bus.captions_kv().await.unwrap();
    let stored: Vec<(String, CaptionRecord)> =
        atelier_kit::bus::kv_values(&captions_kv, "").await.unwrap();
    assert_eq!(stored.len(), 20);
    let from_second: u64 = stored
        .iter()
        .filter(|(_, c)| c.job == r.id)
        .map(|(_, c)| c.usage.prompt_tokens + c.usage.completion_tokens)
        .sum();
    assert_eq!(
        from_second,
        all.usage.prompt_tokens + all.usage.completion_tokens
    );
    assert!(stored
        .iter()
        .all(|(k, c)| k == &format!("{}.{}", c.image_sha256, all.source_id)));

    // A second caption source is kept beside the first.
    let r = run(
        &c,
        &client,
        caption("scenes", Some("Describe the shapes."), shas[..2].to_vec()),
    )
    .await;
    let Some(JobOutput::Captions(other)) = r.output else {
        panic!("{:?}", r.error)
    };
    assert_ne!(other.source_id, all.source_id);
    assert_eq!(
        atelier_kit::bus::kv_values::<CaptionRecord>(&captions_kv, "")
            .await
            .unwrap()
            .len(),
        22
    );

    // A third source: local BLIP (a tiny random-weight model) on the worker, batched; a re-run
    // costs nothing; an unknown model fails the job with the folder it looked in.
    let blip = |model: &str| {
        JobSpec::Caption(CaptionSpec {
            dataset: "scenes".into(),
            images: shas[..3].to_vec(),
            backend: CaptionBackend::Blip {
                model: model.into(),
                prompt: None,
                max_tokens: 8,
                batch_size: 2,
            },
            ..Default::default()
        })
    };
    let r = run(&c, &client, blip("tiny-blip")).await;
    let Some(JobOutput::Captions(b)) = r.output else {
        panic!("{:?}", r.error)
    };
    assert_eq!((b.captioned, b.already_captioned), (3, 0));
    assert_eq!(b.source.backend, "blip");
    assert_eq!(b.usage.prompt_tokens, 0);
    assert!(b.usage.completion_tokens > 0);
    let r = run(&c, &client, blip("tiny-blip")).await;
    let Some(JobOutput::Captions(again)) = r.output else {
        panic!("{:?}", r.error)
    };
    assert_eq!((again.captioned, again.already_captioned), (0, 3));
    let r = run(&c, &client, blip("no-such-blip")).await;
    assert_eq!(r.state, JobState::Failed);
    assert_eq!(r.error.unwrap().code, "unknown_model");
    let blip_records: Vec<(String, CaptionRecord)> =
        atelier_kit::bus::kv_values(&captions_kv, "").await.unwrap();
    assert_eq!(blip_records.len(), 25);
    assert!(blip_records
        .iter()
        .filter(|(_, r)| r.source.backend == "blip")
        .all(|(_, r)| r.finish_reason.is_some() && r.source_id == b.source_id));

    // Filter into version 1, then version 2 with another policy; splits are stable.
    let filter = |val: f32, min_words: u32| {
        let mut f = FilterSpec {
            dataset: "scenes".into(),
            caption_source: Some(all.source_id.clone()),
            policy: Default::default(),
            split: SplitSpec {
                val,
                test: 0.2,
                seed: "e2e".into(),
            },
            note: None,
        };
        f.policy.min_words = min_words;
        // The tiny CLIP has random weights: record its scores, do not judge by them.
        f.policy.min_clip_score = 0.0;
        JobSpec::Filter(f)
    };
    let r = run(&c, &client, filter(0.2, 3)).await;
    let Some(JobOutput::DatasetVersion(v1)) = r.output else {
        panic!("{:?}", r.error)
    };
    assert_eq!(v1.version, 1);
    assert_eq!(v1.counts.rows, 21);
    // With a CLIP model on the worker every decodable, captioned image has its CLIP score.
    let (_, v1_rows) = {
        let datasets = c.bus.datasets_kv().await.unwrap();
        let m: atelier_contracts::DatasetManifest =
            serde_json::from_slice(&datasets.get("scenes.1").await.unwrap().unwrap()).unwrap();
        let data = c
            .store
            .get_bytes(&atelier_contracts::ArtifactKey::parse(&m.data.key).unwrap())
            .await
            .unwrap();
        let rows: Vec<atelier_contracts::DatasetRow> = String::from_utf8(data.to_vec())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (m, rows)
    };
    assert_eq!(
        v1_rows.iter().filter(|r| r.clip_score.is_some()).count(),
        20,
        "CLIP scores on the 20 decodable, captioned images"
    );
    assert!(v1_rows
        .iter()
        .filter_map(|r| r.clip_score)
        .all(|s| (0.0..=100.0).contains(&s)));
    assert_eq!(v1.counts.signals.get("undecodable"), Some(&1));
    assert_eq!(v1.counts.rejected, 1, "{:?}", v1.counts);
    let r = run(&c, &client, filter(0.2, 1000)).await;
    let Some(JobOutput::DatasetVersion(v2)) = r.output else {
        panic!("{:?}", r.error)
    };
    assert_eq!(v2.version, 2);
    assert_eq!(v2.counts.signals.get("short"), Some(&20));
    let m2 = client.dataset_version("scenes", None).await.unwrap();
    assert_eq!((m2.version, m2.parent), (2, Some(1)));
    let m1 = client.dataset_version("scenes", Some(1)).await.unwrap();
    let rows1 = rows(&client, &m1).await.unwrap();
    let rows2 = rows(&client, &m2).await.unwrap();
    for (a, b) in rows1.iter().zip(&rows2) {
        assert_eq!(a.sha256, b.sha256);
        assert_eq!(a.split, b.split, "an image changed split between versions");
    }
    // The NSFW detector (nudenet's real model, found in .tools/) ran on every decodable image.
    assert!(rows1
        .iter()
        .filter(|r| r.format.is_some())
        .all(|r| r.nsfw.is_some_and(|s| s < 0.5)));
    assert_eq!(rows1.iter().filter(|r| r.nsfw.is_none()).count(), 1);
    assert!(rows2
        .iter()
        .filter(|r| r.caption.is_some())
        .all(|r| r.tier == Some(Tier::Bronze)));
    let err = client
        .dataset_version("scenes", Some(9))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no version 9"), "{err}");
    let listed = client.datasets().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].versions, vec![1, 2]);

    // Version 1's captions scored against the second caption source (the same describer, so the
    // two agree word for word), on the images that source covers.
    let eval = |references: &str| {
        JobSpec::EvalCaptions(atelier_contracts::EvalCaptionsSpec {
            dataset: "scenes".into(),
            version: Some(1),
            references: references.into(),
            references_file: None,
            include_rejected: false,
        })
    };
    let r = run(&c, &client, eval(&other.source_id)).await;
    let Some(JobOutput::CaptionScores(scores)) = r.output else {
        panic!("{:?}", r.error)
    };
    assert_eq!((scores.images, scores.missing_references), (2, 18));
    assert!(scores.corpus["Bleu_1"] > 0.99, "{:?}", scores.corpus);
    assert!(scores.corpus["METEOR"] > 0.9, "{:?}", scores.corpus);
    assert!(scores.corpus["SemSim"] > 0.999, "{:?}", scores.corpus);
    assert_eq!(scores.note, None);
    let per_image: serde_json::Value =
        serde_json::from_slice(&client.download(&scores.per_image.key).await.unwrap()).unwrap();
    assert_eq!(per_image["CIDEr"].as_object().unwrap().len(), 2);
    let r = run(&c, &client, eval("00000000deadbeef")).await;
    assert_eq!(r.state, JobState::Failed);
    assert_eq!(r.error.unwrap().code, "no_references");

    // Human references from an uploaded CSV: three images by image_id (one with two
    // references, one a caption with a comma and quotes), one by sha256, one unknown id.
    let kept_rows: Vec<_> = rows1
        .iter()
        .filter(|r| {
            r.decision != atelier_contracts::dataset::Decision::Reject && r.caption.is_some()
        })
        .collect();
    let mut csv = String::from("image_id,caption\n");
    for r in &kept_rows[..3] {
        csv += &format!(
            "{},\"{}\"\n",
            r.image_id,
            r.caption.clone().unwrap().replace('"', "\"\"")
        );
    }
    csv += &format!(
        "{},\"a scene, \"\"roughly\"\" drawn\"\n",
        kept_rows[0].image_id
    );
    csv += &format!(
        "{},{}\n",
        kept_rows[3].sha256, "shapes on a plain background"
    );
    csv += "no-such-image,whatever\n";
    let up = client
        .upload(csv.into_bytes().into(), "text/csv")
        .await
        .unwrap();
    let human = JobSpec::EvalCaptions(atelier_contracts::EvalCaptionsSpec {
        dataset: "scenes".into(),
        version: Some(1),
        references: String::new(),
        references_file: Some(up.artifact.key.clone()),
        include_rejected: false,
    });
    let r = run(&c, &client, human).await;
    let Some(JobOutput::CaptionScores(scores)) = r.output else {
        panic!("{:?}", r.error)
    };
    assert_eq!(scores.images, 4);
    assert_eq!(scores.missing_references as usize, kept_rows.len() - 4);
    assert_eq!(scores.references, up.artifact.key);
    assert!(
        scores.corpus["Bleu_1"] > 0.5 && scores.corpus["Bleu_1"] < 1.0,
        "{:?}",
        scores.corpus
    );

    // Exports, loaded by Hugging Face datasets.
    let kept: BTreeMap<String, Vec<String>> = {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in rows1.iter().filter(|r| r.tier.is_some()) {
            let split = match r.split.unwrap() {
                atelier_contracts::dataset::Split::Train => "train",
                atelier_contracts::dataset::Split::Val => "validation",
                atelier_contracts::dataset::Split::Test => "test",
            };
            m.entry(split.into())
                .or_default()
                .push(r.caption.clone().unwrap());
        }
        m.values_mut().for_each(|v| v.sort());
        m
    };
    assert_eq!(kept.values().map(Vec::len).sum::<usize>(), 20);
    let out = tempfile::tempdir().unwrap();
    for (format, name) in [
        (ExportFormat::Jsonl, "jsonl"),
        (ExportFormat::Webdataset, "webdataset"),
        (ExportFormat::Llava, "llava"),
        (ExportFormat::Parquet, "parquet"),
    ] {
        let dir = out.path().join(name);
        export(
            &client,
            &m1,
            format,
            &[Tier::Gold, Tier::Silver, Tier::Bronze],
            &dir,
            4,
            false,
        )
        .await
        .unwrap();
        let seen = hf_load(name, &dir);
        for (split, texts) in &kept {
            let s = &seen[split];
            assert_eq!(s["rows"], texts.len(), "{name} {split}: {s}");
            let got: Vec<String> = serde_json::from_value(s["texts"].clone()).unwrap();
            assert_eq!(&got, texts, "{name} {split}");
            if name != "llava" {
                assert_eq!(s["size"], serde_json::json!([128, 96]), "{name}");
            }
        }
        if name == "webdataset" {
            assert!(seen["train"]["keys_match"].as_bool().unwrap());
        }
        if name == "llava" {
            assert!(seen["train"]["well_formed"].as_bool().unwrap());
        }
        if name == "parquet" {
            assert_eq!(seen["train"]["image_feature"], "Image");
        }
        // A second export into a non-empty folder is refused, not mixed.
        let err = export(&client, &m1, format, &[Tier::Gold], &dir, 4, false)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("not empty"), "{err}");
    }

    // The same export as a job through the gateway, into the object store; run again, it keeps
    // every shard it finds written.
    let spec = atelier_contracts::dataset::ExportSpec {
        dataset: "scenes".into(),
        version: Some(m1.version),
        format: atelier_contracts::dataset::ExportFormat::Webdataset,
        tiers: vec![Tier::Gold, Tier::Silver, Tier::Bronze],
        shard_size: Some(4),
    };
    let mut outputs = Vec::new();
    for _ in 0..2 {
        let id = client.export(&spec).await.unwrap().id;
        let r = c
            .wait_terminal(&[id], Duration::from_secs(120))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(r.state, JobState::Succeeded, "{:?}", r.error);
        let Some(JobOutput::Exported(out)) = r.output else {
            panic!("{:?}", r.output)
        };
        outputs.push(out);
    }
    let (first, again) = (&outputs[0], &outputs[1]);
    assert_eq!(first.prefix, again.prefix);
    let kept_rows: u64 = first.splits.values().sum();
    assert_eq!(
        kept_rows as usize,
        kept.values().map(Vec::len).sum::<usize>()
    );
    assert!(
        first.shards_written > 1 && first.shards_skipped == 0,
        "{first:?}"
    );
    assert_eq!(
        (again.shards_written, again.shards_skipped),
        (0, first.shards_written)
    );
    let card = client
        .download(&format!("{}/README.md", first.prefix))
        .await
        .unwrap();
    assert!(card.starts_with(b"---\nconfigs:"));
    let shard = client
        .download(&format!("{}/train/00000.tar", first.prefix))
        .await
        .unwrap();
    assert!(tar::Archive::new(&shard[..]).entries().unwrap().count() >= 3);

    // The filter kept its models' verdicts (KV `atelier_verdicts`, keyed by model and content):
    // version 2 reused version 1's, and a later version reads them instead of running the models
    // again, which a verdict changed by hand shows.
    for (a, b) in rows1.iter().zip(&rows2) {
        assert_eq!(
            (a.nsfw, a.clip_score),
            (b.nsfw, b.clip_score),
            "{}",
            a.sha256
        );
    }
    let kept_kv = c.bus.verdicts_kv().await.unwrap();
    let kept: Vec<(String, ModelVerdict)> =
        atelier_kit::bus::kv_values(&kept_kv, "").await.unwrap();
    let count = |prefix: &str| kept.iter().filter(|(k, _)| k.starts_with(prefix)).count();
    assert_eq!((count("nsfw."), count("clip.")), (20, 20), "{kept:?}");
    let target = rows1
        .iter()
        .find(|r| r.decision == Decision::Accept)
        .unwrap();
    let (key, _) = kept
        .iter()
        .find(|(k, _)| k.starts_with("nsfw.") && k.ends_with(&target.sha256))
        .unwrap();
    kept_kv
        .put(
            key,
            serde_json::to_vec(&ModelVerdict {
                schema_version: atelier_contracts::SCHEMA_VERSION,
                score: 0.93,
                label: Some("FEMALE_GENITALIA_EXPOSED".into()),
            })
            .unwrap()
            .into(),
        )
        .await
        .unwrap();
    let r = run(&c, &client, filter(0.2, 3)).await;
    let Some(JobOutput::DatasetVersion(v3)) = r.output else {
        panic!("{:?}", r.error)
    };
    assert_eq!(v3.version, 3);
    let m3 = client.dataset_version("scenes", Some(3)).await.unwrap();
    let rows3 = rows(&client, &m3).await.unwrap();
    for (a, b) in rows1.iter().zip(&rows3) {
        if a.sha256 == target.sha256 {
            assert_eq!(b.nsfw, Some(0.93));
            assert_eq!(b.decision, Decision::Reject);
            assert!(
                b.signals.iter().any(|s| s.name == "nsfw"),
                "{:?}",
                b.signals
            );
        } else {
            assert_eq!(
                (a.nsfw, a.clip_score, a.decision),
                (b.nsfw, b.clip_score, b.decision)
            );
        }
    }
    assert_eq!(v3.counts.rejected, v1.counts.rejected + 1);

    // The folder grows: only the new file goes up; a copy of known bytes under a new name is
    // announced without being sent.
    std::fs::write(
        dir.path().join("scene-new.png"),
        atelier_ingest::samples::scene_bytes(99, 128, 96, image::ImageFormat::Png),
    )
    .unwrap();
    std::fs::copy(
        dir.path().join("scene-05.png"),
        dir.path().join("copy-05.png"),
    )
    .unwrap();
    let grown = ingest_dir(
        &client,
        dir.path(),
        "scenes",
        None,
        Duration::from_secs(60),
        false,
    )
    .await
    .unwrap();
    assert_eq!((grown.files, grown.images, grown.recorded), (24, 22, 22));
    assert_eq!((grown.uploaded, grown.already_recorded), (1, 22));
    let sources = client
        .image(&hex::encode(sha2::Sha256::digest(
            std::fs::read(dir.path().join("copy-05.png")).unwrap(),
        )))
        .await
        .unwrap()
        .unwrap()
        .sources;
    assert!(
        sources
            .iter()
            .any(|s| s.source.as_deref() == Some("copy-05.png")),
        "{sources:?}"
    );
    shutdown.cancel();
}
