//! The AsyncAPI 3.0 document describing every subject, generated from [`crate::subjects`] and the
//! message schemas, for `contracts/asyncapi.yaml` (kept current by a test).

use serde_json::{json, Map, Value};

use crate::subjects::{self, Service};

fn schema_ref(name: &str) -> Value {
    json!({ "$ref": format!("./schemas/{name}.json") })
}

/// The document as JSON (it is rendered to YAML by [`render`]).
pub fn document() -> Value {
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut messages = Map::new();
    for (name, _) in crate::schema::all() {
        messages.insert(
            name.to_owned(),
            json!({ "name": name, "contentType": "application/json", "payload": schema_ref(name) }),
        );
    }
    let mut add =
        |id: String, address: String, message: &str, description: String, action: &str| {
            channels.insert(
                id.clone(),
                json!({
                    "address": address,
                    "description": description,
                    "messages": { message: { "$ref": format!("#/components/messages/{message}") } }
                }),
            );
            operations.insert(
                format!("{action}-{id}"),
                json!({
                    "action": action,
                    "channel": { "$ref": format!("#/channels/{id}") },
                }),
            );
        };
    for s in Service::ALL {
        let n = s.name();
        add(
            format!("{n}-request"),
            s.request_subject(),
            "JobRequest",
            format!(
                "Jobs for the {n} service (the normal-priority queue). Work-queue stream {}, \
                 durable pull consumer {} shared by every replica; explicit ack; redelivered after \
                 ack_wait; dead-lettered after max_deliver.",
                s.request_stream(),
                s.consumer()
            ),
            "send",
        );
        for p in [crate::Priority::High, crate::Priority::Low] {
            add(
                format!("{n}-request-{}", p.name()),
                s.request_subject_for(p),
                "JobRequest",
                format!(
                    "{} jobs for the {n} service: workers take every high job before any normal \
                     one and every normal one before any low one. Stream {}, consumer {}.",
                    if p == crate::Priority::High {
                        "High-priority"
                    } else {
                        "Low-priority"
                    },
                    s.request_stream_for(p),
                    s.consumer_for(p)
                ),
                "send",
            );
        }
        add(
            format!("{n}-progress"),
            s.progress_subject(),
            "JobProgress",
            format!(
                "Progress of running {n} jobs (stream {}).",
                subjects::EVENTS_STREAM
            ),
            "receive",
        );
        add(
            format!("{n}-done"),
            s.done_subject(),
            "JobDone",
            format!(
                "One message per succeeded {n} job, deduplicated by Nats-Msg-Id `<job id>.done`."
            ),
            "receive",
        );
        add(
            format!("{n}-failed"),
            s.failed_subject(),
            "JobFailed",
            format!("One message per failed {n} job."),
            "receive",
        );
        add(
            format!("{n}-dlq"),
            s.dead_letter_subject(),
            "DeadLetter",
            format!(
                "{n} requests that could not be decoded or failed max_deliver times (stream {}).",
                subjects::DLQ_STREAM
            ),
            "receive",
        );
    }
    add(
        "images-ingested".into(),
        subjects::IMAGES_INGESTED.into(),
        "ImagesIngested",
        format!(
            "External systems announce images they put into the bucket (stream {}); the ingest \
             service verifies and records them in KV bucket {}.",
            subjects::IMAGES_STREAM,
            subjects::IMAGES_BUCKET
        ),
        "send",
    );
    add(
        "retrieval-query".into(),
        subjects::RETRIEVAL_QUERY.into(),
        "SearchRequest",
        format!(
            "Core NATS request/reply (no stream): a search query, answered with a SearchReply by \
             one retrieval-indexer replica (queue group {}).",
            subjects::RETRIEVAL_QUERY_GROUP
        ),
        "send",
    );
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "atelier",
            "version": crate::API_VERSION,
            "description": "Subjects and messages of atelier's NATS JetStream bus. Every message is JSON and carries schema_version."
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": { "host": "127.0.0.1:4222", "protocol": "nats", "description": "`atelier up` (embedded)" }
        },
        "channels": channels,
        "operations": operations,
        "components": { "messages": messages }
    })
}

/// The document as YAML, as written to `contracts/asyncapi.yaml`.
pub fn render() -> String {
    format!(
        "# Generated by atelier-contracts (contracts/src/asyncapi.rs); do not edit.\n# Regenerate: ATELIER_BLESS=1 cargo test -p atelier-contracts\n{}",
        serde_yaml::to_string(&document()).expect("a JSON value renders as YAML")
    )
}
