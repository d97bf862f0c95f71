//! Exports without a cluster: a version of PNG and JPEG images exported in every format, shard
//! by shard, each opened by Hugging Face `datasets` from its dataset card (`load_dataset(DIR)`)
//! with every sample's image; an interrupted export resumed without fetching the images of the
//! shards it finished.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use atelier_contracts::dataset::{DatasetManifest, ExportFormat, Tier};
use atelier_e2e::*;
use atelier_export::{DirSink, Options};

/// Images by key, counting fetches.
#[derive(Default)]
struct Mem {
    images: HashMap<String, bytes::Bytes>,
    fetched: AtomicUsize,
}

impl atelier_export::Images for Mem {
    async fn get(&self, key: &str) -> anyhow::Result<bytes::Bytes> {
        self.fetched.fetch_add(1, Ordering::SeqCst);
        self.images
            .get(key)
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no image {key}"))
    }
}

const TRAIN: usize = 24;
const VAL: usize = 6;

/// 30 rows (24 train, 6 validation), PNG and JPEG alternating when `mixed`, plus one rejected
/// row; the data file on disk, the manifest, and the images.
fn version(dir: &std::path::Path, mixed: bool) -> (DatasetManifest, std::path::PathBuf, Mem) {
    let mut mem = Mem::default();
    let mut lines = String::new();
    for i in 0..TRAIN + VAL + 1 {
        let jpeg = mixed && i % 2 == 1;
        let (fmt, format) = if jpeg {
            (image::ImageFormat::Jpeg, "jpeg")
        } else {
            (image::ImageFormat::Png, "png")
        };
        let bytes = atelier_ingest::samples::scene_bytes(i as u64, 64, 48, fmt);
        let key = format!("img/{i}");
        mem.images.insert(key.clone(), bytes.into());
        let row = serde_json::json!({
            "image_id": format!("img{i:03}"),
            "image_key": key,
            "sha256": format!("{i:064x}"),
            "format": format,
            "width": 64, "height": 48,
            "caption": format!("scene number {i}"),
            "words": 3,
            "signals": [],
            "decision": if i == TRAIN + VAL { "reject" } else { "accept" },
            "tier": "gold",
            "split": if i < TRAIN { "train" } else { "val" },
            "tags": [],
        });
        lines += &format!("{row}\n");
    }
    let data = dir.join("data.jsonl");
    std::fs::write(&data, lines).unwrap();
    let manifest: DatasetManifest = serde_json::from_value(serde_json::json!({
        "schema_version": 1, "dataset": "mix", "version": 3,
        "created_at": "2026-12-07T00:00:00Z", "job": atelier_contracts::JobId::new(),
        "policy": {}, "split": {}, "caption_sources": {},
        "counts": {"rows": 31, "accepted": 30, "flagged": 0, "rejected": 1,
                   "tiers": {}, "splits": {}, "signals": {}},
        "data": {"key": "d", "sha256": "0", "size": 0, "content_type": "application/x-ndjson"},
    }))
    .unwrap();
    (manifest, data, mem)
}

fn opts(format: ExportFormat) -> Options {
    Options {
        format,
        tiers: vec![Tier::Gold],
        shard_size: 5,
    }
}

#[tokio::test]
async fn every_format_opens_from_its_card_with_every_image() {
    let tmp = tempfile::tempdir().unwrap();
    let (manifest, data, mem) = version(tmp.path(), true);
    for format in [
        ExportFormat::Webdataset,
        ExportFormat::Parquet,
        ExportFormat::Jsonl,
        ExportFormat::Llava,
    ] {
        let out = tmp.path().join(format.name());
        let sink = DirSink::new(&out, false).unwrap();
        let report = atelier_export::export(&manifest, &data, &mem, &sink, &opts(format))
            .await
            .unwrap();
        assert_eq!(report.splits["train"], TRAIN);
        assert_eq!(report.splits["validation"], VAL);
        // 5 train shards + 2 validation shards.
        assert_eq!(report.shards_written, 7, "{format:?}");
        if format == ExportFormat::Webdataset {
            // One image key for every sample: the JPEGs are re-encoded as PNG.
            assert_eq!(report.transcoded, (TRAIN + VAL) / 2);
            let seen = hf_load("webdataset", &out);
            assert_eq!(seen["train"]["rows"], TRAIN);
            assert!(seen["train"]["keys_match"].as_bool().unwrap());
        }
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(card.starts_with("---\nconfigs:"), "{card}");
        let seen = hf_load("card", &out);
        for (split, n) in [("train", TRAIN), ("validation", VAL)] {
            let s = &seen[split];
            assert_eq!(s["rows"], n, "{format:?} {split}: {seen}");
            if format != ExportFormat::Llava {
                assert_eq!(s["with_image"], n, "{format:?} {split}: {seen}");
                assert_eq!(s["size"], serde_json::json!([64, 48]), "{format:?}");
            }
        }
    }
}

#[tokio::test]
async fn a_single_format_keeps_its_bytes_and_an_interrupted_export_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let (manifest, data, mem) = version(tmp.path(), false);
    let out = tmp.path().join("wds");
    let o = opts(ExportFormat::Webdataset);
    let sink = DirSink::new(&out, false).unwrap();
    let first = atelier_export::export(&manifest, &data, &mem, &sink, &o)
        .await
        .unwrap();
    assert_eq!(first.transcoded, 0);
    // The original bytes, under key.png.
    let mut tar = tar::Archive::new(std::fs::File::open(out.join("train/00000.tar")).unwrap());
    let mut entry = tar.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(entry.path().unwrap().to_str(), Some("img000.png"));
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut entry, &mut got).unwrap();
    assert_eq!(got, mem.images["img/0"]);

    // Interrupted: a shard never finished (a partial file left behind), the card not written.
    std::fs::remove_file(out.join("train/00002.tar")).unwrap();
    std::fs::write(out.join("train/00002.tar.partial"), b"cut off").unwrap();
    std::fs::remove_file(out.join("README.md")).unwrap();
    let err = DirSink::new(&out, false).err().unwrap().to_string();
    assert!(err.contains("--resume"), "{err}");
    let before = mem.fetched.load(Ordering::SeqCst);
    let sink = DirSink::new(&out, true).unwrap();
    let resumed = atelier_export::export(&manifest, &data, &mem, &sink, &o)
        .await
        .unwrap();
    assert_eq!((resumed.shards_written, resumed.shards_skipped), (1, 6));
    assert_eq!(
        mem.fetched.load(Ordering::SeqCst) - before,
        5,
        "only the missing shard's images"
    );
    assert_eq!(
        std::fs::read(out.join("train/00002.tar")).unwrap(),
        {
            let again = tmp.path().join("again");
            let sink = DirSink::new(&again, false).unwrap();
            atelier_export::export(&manifest, &data, &mem, &sink, &o)
                .await
                .unwrap();
            std::fs::read(again.join("train/00002.tar")).unwrap()
        },
        "a resumed shard is the shard an uninterrupted export writes"
    );
    assert_eq!(hf_load("card", &out)["train"]["with_image"], TRAIN);
}

/// A version with nothing to export (here: no row in the tiers asked for; as an uncaptioned
/// dataset would be) is an error that says why, and writes no card whose `configs` name no
/// files (which `load_dataset` fails on with a bare TypeError).
#[tokio::test]
async fn an_export_with_no_rows_says_why_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (manifest, data, mem) = version(tmp.path(), false);
    let out = tmp.path().join("none");
    let sink = DirSink::new(&out, false).unwrap();
    let opts = Options {
        tiers: vec![Tier::Bronze],
        ..opts(ExportFormat::Parquet)
    };
    let e = atelier_export::export(&manifest, &data, &mem, &sink, &opts)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("no rows to export"), "{e}");
    assert!(e.contains("31 rows"), "{e}");
    assert!(!out.join("README.md").exists());
    assert_eq!(mem.fetched.load(Ordering::SeqCst), 0);
}
