//! infra/ as far as this machine can check it (no Docker daemon, no Kubernetes): every file parses,
//! references binaries and streams that exist, and the NATS config's per-service permissions work
//! for a real job round trip while denying other services' subjects.

use std::collections::BTreeSet;
use std::time::Duration;

use atelier_contracts::{
    ChecksumSpec, JobId, JobRequest, JobSpec, JobState, Service, SCHEMA_VERSION,
};
use atelier_e2e::*;

/// The server binaries the workspace builds (the `atelier` CLI is not a deployed process).
fn workspace_bins() -> BTreeSet<String> {
    let root = repo_root();
    let mut bins = BTreeSet::from(["atelier-gateway".to_string()]);
    for entry in std::fs::read_dir(root.join("services")).unwrap() {
        let dir = entry.unwrap().path();
        if dir.join("src/main.rs").is_file() {
            bins.insert(format!(
                "atelier-{}",
                dir.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    bins
}

fn yaml_docs(path: &std::path::Path) -> Vec<serde_yaml::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| {
            let mut v = <serde_yaml::Value as serde::Deserialize>::deserialize(d)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            v.apply_merge().unwrap();
            v
        })
        .collect()
}

fn password_env() -> Vec<(String, String)> {
    let mut users = vec!["GATEWAY".to_string(), "PUBLISHER".to_string()];
    users.extend(
        Service::ALL
            .iter()
            .map(|s| s.name().replace('-', "_").to_uppercase()),
    );
    users
        .into_iter()
        .map(|u| {
            (
                format!("ATELIER_NATS_{u}_PASSWORD"),
                format!("pw-{}", u.to_lowercase()),
            )
        })
        .collect()
}

#[test]
fn nats_config_is_valid_and_has_a_user_per_service() {
    let conf = repo_root().join("infra/nats/nats-server.conf");
    let out = std::process::Command::new(tool("nats-server"))
        .arg("-c")
        .arg(&conf)
        .arg("-t")
        .envs(password_env())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&conf).unwrap();
    for s in Service::ALL {
        assert!(
            text.contains(&format!("user: {}\n", s.name())),
            "no NATS user for {s}"
        );
        assert!(
            text.contains(&format!("\"{}\"", s.done_subject())),
            "{s} may not publish its done events"
        );
        assert!(
            text.contains(&format!("\"{}\"", s.dead_letter_subject())),
            "{s} may not publish its dead letters"
        );
    }
}

#[test]
fn compose_k8s_and_dockerfiles_reference_what_exists() {
    let root = repo_root();
    let bins = workspace_bins();
    // Dockerfiles build the binary named by BIN.
    for f in ["Dockerfile", "Dockerfile.gpu"] {
        let text = std::fs::read_to_string(root.join("infra/docker").join(f)).unwrap();
        assert!(
            text.contains("ARG BIN") && text.contains("--bin ${BIN}"),
            "{f} does not build ${{BIN}}"
        );
        assert!(text.contains("ENTRYPOINT"), "{f} has no entrypoint");
    }
    // compose: every built service names an existing binary and Dockerfile.
    let compose = yaml_docs(&root.join("infra/docker/compose.yaml")).remove(0);
    let services = compose["services"].as_mapping().unwrap();
    let mut built = BTreeSet::new();
    for (name, svc) in services {
        if let Some(build) = svc.get("build") {
            let bin = build["args"]["BIN"]
                .as_str()
                .unwrap_or_else(|| panic!("{name:?} has no BIN"));
            assert!(
                bins.contains(bin),
                "compose service {name:?} builds unknown binary {bin}"
            );
            let dockerfile = build["dockerfile"].as_str().unwrap();
            assert!(root.join(dockerfile).is_file(), "{dockerfile} missing");
            built.insert(bin.to_string());
        }
    }
    assert_eq!(built, bins, "every binary has a compose service");
    // NATS as three clustered nodes; services replicate streams and buckets on all three.
    let nodes: Vec<_> = services
        .iter()
        .filter(|(_, svc)| {
            svc["image"]
                .as_str()
                .is_some_and(|i| i.starts_with("nats:"))
        })
        .collect();
    assert_eq!(nodes.len(), 3, "compose runs NATS as three nodes");
    for (name, svc) in &nodes {
        let cmd: Vec<&str> = svc["command"]
            .as_sequence()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            cmd.contains(&"--cluster_name") && cmd.contains(&"--routes"),
            "{name:?} is not clustered"
        );
    }
    assert_eq!(
        services["gateway"]["environment"]["ATELIER_NATS_REPLICAS"],
        "3"
    );
    assert!(root.join("infra/docker/s3.json").is_file());
    // k8s: each Deployment has probes on /healthz; each ScaledObject scales an existing Deployment on
    // a stream and durable consumer the code declares.
    let mut deployments = BTreeSet::new();
    let mut scaled = Vec::new();
    for entry in std::fs::read_dir(root.join("infra/k8s")).unwrap() {
        let path = entry.unwrap().path();
        for doc in yaml_docs(&path) {
            match doc["kind"].as_str() {
                Some("Deployment") => {
                    deployments.insert(doc["metadata"]["name"].as_str().unwrap().to_string());
                    let c = &doc["spec"]["template"]["spec"]["containers"][0];
                    assert_eq!(
                        c["readinessProbe"]["httpGet"]["path"],
                        "/healthz",
                        "{}",
                        path.display()
                    );
                    // Requests and limits for CPU and memory; non-root, read-only, no escalation.
                    for (what, key) in [
                        ("requests", "cpu"),
                        ("requests", "memory"),
                        ("limits", "cpu"),
                        ("limits", "memory"),
                    ] {
                        assert!(
                            c["resources"][what][key].is_string(),
                            "{}: no {what}.{key}",
                            path.display()
                        );
                    }
                    let replicas = c["env"]
                        .as_sequence()
                        .unwrap()
                        .iter()
                        .find(|e| e["name"] == "ATELIER_NATS_REPLICAS");
                    assert_eq!(
                        replicas.map(|e| e["value"].clone()),
                        Some("3".into()),
                        "{}",
                        path.display()
                    );
                    let pod = &doc["spec"]["template"]["spec"]["securityContext"];
                    assert_eq!(pod["runAsNonRoot"], true, "{}", path.display());
                    let sc = &c["securityContext"];
                    assert_eq!(sc["allowPrivilegeEscalation"], false, "{}", path.display());
                    assert_eq!(sc["readOnlyRootFilesystem"], true, "{}", path.display());
                }
                Some("ScaledObject") => scaled.push(doc),
                _ => {}
            }
        }
    }
    let consumers: Vec<(String, String)> = Service::ALL
        .iter()
        .flat_map(|s| {
            atelier_contracts::Priority::ORDER.map(|p| (s.request_stream_for(p), s.consumer_for(p)))
        })
        .chain([(
            atelier_contracts::subjects::IMAGES_STREAM.to_string(),
            Service::Ingest.consumer(),
        )])
        .collect();
    assert!(!scaled.is_empty());
    for so in scaled {
        let target = so["spec"]["scaleTargetRef"]["name"].as_str().unwrap();
        assert!(
            deployments.contains(target),
            "ScaledObject targets unknown Deployment {target}"
        );
        let triggers = so["spec"]["triggers"].as_sequence().unwrap();
        let mut streams = Vec::new();
        for t in triggers {
            assert_eq!(t["type"], "nats-jetstream");
            let pair = (
                t["metadata"]["stream"].as_str().unwrap().to_string(),
                t["metadata"]["consumer"].as_str().unwrap().to_string(),
            );
            assert!(
                consumers.contains(&pair),
                "ScaledObject {target} watches {pair:?}, which the code does not declare"
            );
            streams.push(pair.0);
        }
        // A service with a queue scales on all three of its priority queues.
        if streams[0].starts_with("ATELIER_REQ_") {
            let want: Vec<String> = ["", "_HIGH", "_LOW"]
                .iter()
                .map(|lane| format!("{}{lane}", streams[0]))
                .collect();
            assert_eq!(streams, want, "ScaledObject {target}");
        }
    }
    for d in &deployments {
        assert!(bins.contains(d), "Deployment {d} has no binary");
    }
}

#[test]
fn justfile_has_the_documented_recipes() {
    let out = std::process::Command::new(tool("just"))
        .arg("--summary")
        .current_dir(repo_root())
        .output()
        .unwrap();
    assert!(out.status.success());
    let recipes = String::from_utf8(out.stdout).unwrap();
    for r in ["up", "down", "demo", "test", "bench", "cluster-env"] {
        assert!(
            recipes.split_whitespace().any(|x| x == r),
            "just {r} missing: {recipes}"
        );
    }
}

/// The per-service users of infra/nats/nats-server.conf, for real: services do their jobs, and may
/// not publish outside their own subjects.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_service_nats_permissions_allow_the_work_and_nothing_else() {
    let env = password_env();
    let pw = |user: &str| {
        env.iter()
            .find(|(k, _)| k == &format!("ATELIER_NATS_{user}_PASSWORD"))
            .unwrap()
            .1
            .clone()
    };
    let mut conf =
        std::fs::read_to_string(repo_root().join("infra/nats/nats-server.conf")).unwrap();
    for (k, v) in &env {
        conf = conf.replace(&format!("${k}"), &format!("\"{v}\""));
    }
    let dir = tempfile::tempdir().unwrap();
    let conf_path = dir.path().join("nats.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let gw_pw = pw("GATEWAY");
    let mut c = Cluster::start_with(
        shared_s3_store(30),
        Some(conf_path),
        Some(("gateway", &gw_pw)),
    )
    .await
    .unwrap();
    c.spawn_service(
        "atelier-checksum",
        &[
            ("ATELIER_NATS_USER", "checksum".into()),
            ("ATELIER_NATS_PASSWORD", pw("CHECKSUM")),
        ],
    )
    .unwrap();
    c.spawn_service(
        "atelier-ingest",
        &[
            ("ATELIER_NATS_USER", "ingest".into()),
            ("ATELIER_NATS_PASSWORD", pw("INGEST")),
        ],
    )
    .unwrap();

    // An external publisher submits a job straight onto the bus.
    let (input, _) = c
        .store
        .put_bytes(bytes_of(3, 1000), "application/octet-stream")
        .await
        .unwrap();
    let publisher =
        async_nats::ConnectOptions::with_user_and_password("publisher".into(), pw("PUBLISHER"))
            .connect(c.nats.url())
            .await
            .unwrap();
    let pjs = async_nats::jetstream::new(publisher.clone());
    let id = JobId::new();
    let req = JobRequest {
        schema_version: SCHEMA_VERSION,
        id,
        submitted_at: chrono_now(),
        submitted_by: Some("publisher".into()),
        priority: Default::default(),
        spec: JobSpec::Checksum(ChecksumSpec {
            input: input.key.clone(),
            expected_sha256: Some(input.sha256.clone()),
        }),
    };
    pjs.publish(
        Service::Checksum.request_subject(),
        serde_json::to_vec(&req).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let r = c
        .wait_terminal(&[id], Duration::from_secs(30))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(r.state, JobState::Succeeded, "{r:?}");

    // The captioner and the quality filter do their work as their own users: read image records,
    // list and write captions, list and create dataset versions.
    let vision = atelier_captioner::vision_server::VisionServer::start(Default::default())
        .await
        .unwrap();
    c.spawn_service(
        "atelier-captioner",
        &[
            ("ATELIER_NATS_USER", "captioner".into()),
            ("ATELIER_NATS_PASSWORD", pw("CAPTIONER")),
            ("ATELIER_OPENAI_BASE_URL", vision.base_url()),
        ],
    )
    .unwrap();
    c.spawn_service(
        "atelier-quality-filter",
        &[
            ("ATELIER_NATS_USER", "quality-filter".into()),
            ("ATELIER_NATS_PASSWORD", pw("QUALITY_FILTER")),
        ],
    )
    .unwrap();
    let png = atelier_ingest::samples::scene_bytes(5, 96, 96, image::ImageFormat::Png);
    let (img, _) = c.store.put_bytes(png.into(), "image/png").await.unwrap();
    let ev = atelier_contracts::images::ImagesIngested {
        schema_version: SCHEMA_VERSION,
        dataset: Some("perm".into()),
        images: vec![atelier_contracts::images::IngestedImage {
            key: img.key.clone(),
            sha256: None,
            source: None,
            license: None,
            metadata: Default::default(),
        }],
    };
    pjs.publish(
        atelier_contracts::subjects::IMAGES_INGESTED,
        serde_json::to_vec(&ev).unwrap().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let images = c.bus.images_kv().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while images.get(&img.sha256).await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "image never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The trainer, as its own user, reads the dataset version the filter writes below, submits
    // txt2img jobs for DreamBooth class images to the sampler (as its own user) and watches them.
    let models = c.tmp.path().join("models");
    atelier_diffusion::pipeline::make_tiny_for_training(
        &models.join("tiny"),
        atelier_diffusion::pipeline::Family::Sd1,
        1,
    )
    .unwrap();
    for (bin, user, pw_name) in [
        ("atelier-trainer", "trainer", "TRAINER"),
        ("atelier-sampler", "sampler", "SAMPLER"),
        (
            "atelier-retrieval-indexer",
            "retrieval-indexer",
            "RETRIEVAL_INDEXER",
        ),
        ("atelier-augmenter", "augmenter", "AUGMENTER"),
    ] {
        c.spawn_service(
            bin,
            &[
                ("ATELIER_NATS_USER", user.into()),
                ("ATELIER_NATS_PASSWORD", pw(pw_name)),
                ("ATELIER_MODELS", models.display().to_string()),
            ],
        )
        .unwrap();
    }
    let mut train = atelier_contracts::TrainSpec::new(
        "tiny",
        "perm-lora",
        atelier_contracts::TrainData::Dataset {
            dataset: "perm".into(),
            version: None,
            splits: vec!["train".into(), "val".into(), "test".into()],
            include_flagged: true,
        },
    );
    train.resolution = 64;
    train.min_bucket_reso = 64;
    train.max_bucket_reso = 128;
    train.network.rank = 2;
    train.max_train_steps = 2;
    train.dreambooth = Some(atelier_contracts::DreamBoothSpec {
        instance_prompt: "a sks scene".into(),
        class_prompt: "a scene".into(),
        prior_loss_weight: 1.0,
        num_class_images: 1,
        class_sampler: "euler".into(),
        class_steps: 2,
    });
    for spec in [
        JobSpec::Caption(atelier_contracts::CaptionSpec {
            dataset: "perm".into(),
            images: vec![],
            backend: Default::default(),
            ..Default::default()
        }),
        JobSpec::Filter(atelier_contracts::FilterSpec {
            dataset: "perm".into(),
            caption_source: None,
            policy: Default::default(),
            split: Default::default(),
            note: None,
        }),
        JobSpec::Train(Box::new(train)),
        // The indexer, as its own user, reads the version, writes the index, and writes a
        // curated version.
        JobSpec::Index(atelier_contracts::IndexSpec {
            dataset: "perm".into(),
            version: None,
            spaces: vec![atelier_contracts::Space::Caption],
        }),
        JobSpec::Curate(Box::new(
            serde_json::from_value(serde_json::json!({"dataset": "perm", "limit": 1})).unwrap(),
        )),
        // The augmenter, as its own user, reads the version, writes variant images and a
        // version, and asks the indexer for neighbours.
        JobSpec::Augment(Box::new(
            serde_json::from_value(serde_json::json!({
                "dataset": "perm",
                "transforms": [{"op": "resize", "size": 32}],
                "captions": {"hard_negatives": {"neighbours": 1}}
            }))
            .unwrap(),
        )),
    ] {
        let id = JobId::new();
        let req = JobRequest {
            schema_version: SCHEMA_VERSION,
            id,
            submitted_at: chrono_now(),
            submitted_by: Some("publisher".into()),
            priority: Default::default(),
            spec,
        };
        pjs.publish(
            req.spec.service().request_subject(),
            serde_json::to_vec(&req).unwrap().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let r = c
            .wait_terminal(&[id], Duration::from_secs(180))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(r.state, JobState::Succeeded, "{} {:?}", r.kind, r.error);
    }
    // The filter kept its NSFW verdict on the image for later jobs, as its own user.
    let kept: Vec<(String, atelier_contracts::dataset::ModelVerdict)> =
        atelier_kit::bus::kv_values(&c.bus.verdicts_kv().await.unwrap(), "nsfw.")
            .await
            .unwrap();
    assert!(
        kept.iter().any(|(k, _)| k.ends_with(&img.sha256)),
        "{kept:?}"
    );

    // The publisher may query the index; the indexer answers as its own user.
    let reply = publisher
        .request(
            atelier_contracts::subjects::RETRIEVAL_QUERY,
            serde_json::to_vec(
                &serde_json::json!({"dataset": "perm", "text": "a scene", "space": "caption"}),
            )
            .unwrap()
            .into(),
        )
        .await
        .unwrap();
    let reply: atelier_contracts::SearchReply = serde_json::from_slice(&reply.payload).unwrap();
    assert!(
        matches!(reply, atelier_contracts::SearchReply::Ok(_)),
        "{reply:?}"
    );

    // The publisher may not fake results.
    assert!(
        tokio::time::timeout(Duration::from_secs(2), async {
            pjs.publish(Service::Checksum.done_subject(), "{}".into())
                .await?
                .await
                .map_err(Into::into)
        })
        .await
        .map_or(true, |r: Result<_, async_nats::Error>| r.is_err()),
        "publisher could publish a done event"
    );
    // A service may not publish another service's events or requests.
    let checksum_user =
        async_nats::ConnectOptions::with_user_and_password("checksum".into(), pw("CHECKSUM"))
            .connect(c.nats.url())
            .await
            .unwrap();
    let cjs = async_nats::jetstream::new(checksum_user);
    for subject in [
        Service::Sampler.done_subject(),
        Service::Trainer.request_subject(),
    ] {
        let denied = tokio::time::timeout(Duration::from_secs(2), async {
            cjs.publish(subject.clone(), "{}".into())
                .await?
                .await
                .map_err(async_nats::Error::from)
        })
        .await;
        assert!(
            denied.map_or(true, |r| r.is_err()),
            "checksum user could publish to {subject}"
        );
    }
}

fn chrono_now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

/// `just cluster-env` (scripts/cluster compose-env) writes every credential compose requires,
/// fresh, readable by its owner only, and never replaces an existing file; compose refuses to
/// start without them (`${VAR:?...}`), and publishes its ports on 127.0.0.1 by default.
#[test]
fn cluster_env_writes_every_credential_compose_requires() {
    use std::os::unix::fs::PermissionsExt as _;
    let root = repo_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join(".env");
    let run = || {
        std::process::Command::new(root.join("scripts/cluster"))
            .arg("compose-env")
            .env("ATELIER_COMPOSE_ENV", &out)
            .env("ATELIER_BIN_DIR", bin("atelier").parent().unwrap())
            .output()
            .unwrap()
    };
    let first = run();
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let env: std::collections::HashMap<String, String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let compose = std::fs::read_to_string(root.join("infra/docker/compose.yaml")).unwrap();
    let required: BTreeSet<&str> = compose
        .split("${")
        .skip(1)
        .filter_map(|rest| rest.split_once(":?").map(|(var, _)| var))
        .filter(|var| var.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    assert!(
        required.contains("ATELIER_NATS_GATEWAY_PASSWORD"),
        "{required:?}"
    );
    for var in &required {
        let value = env.get(*var).unwrap_or_else(|| panic!("{var} not written"));
        let secret = var.contains("PASSWORD") || var.contains("SECRET");
        assert!(
            !value.is_empty() && (!secret || value.len() >= 16),
            "{var} is weak: {value:?}"
        );
    }
    assert!(!run().status.success(), "an existing .env was replaced");
    for port in ["4222:4222", "7860:7860"] {
        assert!(
            compose.contains(&format!("${{ATELIER_BIND:-127.0.0.1}}:{port}")),
            "{port} is published beyond loopback by default"
        );
    }
}

/// NATS over TLS with a private CA: services connect with `ATELIER_NATS_TLS_CA` and do their
/// work; a client that does not trust the CA is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_over_tls_with_a_private_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let server = rcgen::CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let file = |name: &str, text: String| {
        let p = tmp.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca_pem = file("ca.pem", ca.pem());
    let cert = file("server.pem", server.pem());
    let key_pem = file("server-key.pem", key.serialize_pem());
    let conf = file(
        "tls.conf",
        format!(
            "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
            cert.display(),
            key_pem.display()
        ),
    );
    let nats = tokio::task::block_in_place(|| {
        atelier_kit::nats_server::NatsServer::start(atelier_kit::nats_server::NatsServerOptions {
            store_dir: tmp.path().join("js"),
            port: 0,
            log_file: tmp.path().join("nats.log"),
            config: Some(conf),
        })
    })
    .unwrap();
    let args = atelier_kit::config::NatsArgs {
        nats_url: Some(nats.url()),
        nats_tls_ca: Some(ca_pem),
        ..Default::default()
    };
    let bus = atelier_kit::Bus::connect(&args, "tls-test").await.unwrap();
    bus.ensure_topology().await.unwrap();
    let kv = bus.jobs_kv().await.unwrap();
    kv.put("probe", "over tls".into()).await.unwrap();
    assert_eq!(kv.get("probe").await.unwrap().unwrap(), "over tls");
    // Without the CA the server's certificate is not trusted.
    let untrusting = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(2))
        .require_tls(true)
        .connect(nats.url())
        .await;
    assert!(untrusting.is_err(), "a client without the CA connected");
}
