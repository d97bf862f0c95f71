//! Quality-filter throughput on this machine: `cargo bench -p atelier-quality-filter --bench checks`.
//!
//! Builds 50,000 records with ShareGPT4V-length captions (a mix of good ones, refusals,
//! repetition loops, truncations and other languages) and times [`assess`] over all of them,
//! median of 5 runs: text-only (no image records' sizes or hashes to check beyond the caption)
//! and full (images too: sizes, aspect, near-duplicates by pHash).

use std::time::{Duration, Instant};

use atelier_contracts::dataset::{CaptionRecord, CaptionSource, QualityPolicy, SplitSpec};
use atelier_contracts::images::ImageRecord;
use atelier_contracts::JobId;
use atelier_quality_filter::{assess, Input};

const N: usize = 50_000;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, xs: &[&'a str]) -> &'a str {
        xs[(self.next() % xs.len() as u64) as usize]
    }
}

fn caption(rng: &mut Rng) -> (String, &'static str) {
    let subj = [
        "a red circle",
        "a tabby cat",
        "two surfers",
        "an old bus",
        "a wooden table",
    ];
    let place = [
        "on a white background",
        "in a sunny kitchen",
        "near the ocean",
        "at a station",
    ];
    let detail = [
        "The lighting is soft and even, with gentle shadows.",
        "In the background there are trees and a clear blue sky.",
        "The colours are muted, mostly browns and greys.",
        "A small sign with illegible text hangs on the wall.",
        "The composition is centred and symmetrical.",
    ];
    match rng.next() % 20 {
        0 => ("I'm sorry, but I can't help with identifying people in images.".into(), "stop"),
        1 => {
            let s = format!("The image shows {} {}. ", rng.pick(&subj), rng.pick(&place));
            (s.repeat(6), "stop")
        }
        2 => (
            format!(
                "The image shows {} {}. {} {} In the",
                rng.pick(&subj),
                rng.pick(&place),
                rng.pick(&detail),
                rng.pick(&detail)
            ),
            "length",
        ),
        3 => (
            "Das Bild zeigt eine Katze auf einem Holztisch in einer hellen Küche, daneben steht eine Tasse Kaffee.".into(),
            "stop",
        ),
        _ => {
            let mut s = format!("The image shows {} {}.", rng.pick(&subj), rng.pick(&place));
            let start = rng.next() as usize;
            for k in 0..(2 + rng.next() as usize % 4) {
                s.push(' ');
                s.push_str(detail[(start + k) % detail.len()]);
            }
            (s, "stop")
        }
    }
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

fn main() {
    let mut rng = Rng(0x1234_5678_9abc_def1);
    let now = chrono::Utc::now();
    let images: Vec<ImageRecord> = (0..N)
        .map(|i| {
            let sha = format!("{:064x}", (i as u128) * 0x9e37_79b9_7f4a_7c15);
            ImageRecord {
                schema_version: 1,
                sha256: sha.clone(),
                key: format!("sha256/{}/{sha}", &sha[..2]),
                size: 1000,
                content_type: "image/jpeg".into(),
                datasets: vec!["bench".into()],
                sources: vec![],
                format: Some("jpeg".into()),
                width: Some(256 + (rng.next() % 768) as u32),
                height: Some(256 + (rng.next() % 768) as u32),
                exif_orientation: Some(1),
                phash: Some(format!("{:016x}", rng.next())),
                flag: None,
                first_seen: now,
                updated_at: now,
            }
        })
        .collect();
    let captions: Vec<CaptionRecord> = images
        .iter()
        .map(|img| {
            let (text, finish) = caption(&mut rng);
            CaptionRecord {
                schema_version: 1,
                image_sha256: img.sha256.clone(),
                source_id: "0123456789abcdef".into(),
                source: CaptionSource {
                    backend: "openai".into(),
                    model: "m".into(),
                    prompt: "p".into(),
                },
                caption: text,
                finish_reason: Some(finish.into()),
                usage: Default::default(),
                job: JobId::new(),
                created_at: now,
            }
        })
        .collect();
    let inputs: Vec<Input<'_>> = images
        .iter()
        .zip(&captions)
        .map(|(image, c)| Input {
            image,
            caption: Some(c),
            nsfw: None,
            clip_score: None,
        })
        .collect();
    let words: usize = captions
        .iter()
        .map(|c| c.caption.split_whitespace().count())
        .sum();
    println!(
        "quality-filter checks: {N} records, {:.1} words per caption on average",
        words as f64 / N as f64
    );
    let split = SplitSpec::default();
    let text_only = QualityPolicy {
        duplicate_max_bits: -1,
        ..Default::default()
    };
    let t = Instant::now();
    for c in &captions {
        std::hint::black_box(atelier_quality_filter::text::language(&c.caption));
    }
    println!(
        "  (language id alone: {:.1} ms)",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    for c in &captions {
        std::hint::black_box(atelier_quality_filter::text::repetition(&c.caption, 0.3));
    }
    println!(
        "  (repetition alone: {:.1} ms)",
        t.elapsed().as_secs_f64() * 1e3
    );
    for (name, policy) in [
        ("text only (no duplicate search)", text_only),
        (
            "full (image checks + near-duplicates ≤4 bits)",
            QualityPolicy::default(),
        ),
    ] {
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..5 {
            let t = Instant::now();
            let (rows, counts) = assess(&inputs, &policy, &split);
            times.push(t.elapsed());
            assert_eq!(rows.len(), N);
            last = Some(counts);
        }
        let m = median(times);
        let counts = last.expect("ran");
        println!(
            "  {name:<48} median {:>8.1} ms  {:>9.0} records/s  (accepted {}, flagged {}, rejected {})",
            m.as_secs_f64() * 1e3,
            N as f64 / m.as_secs_f64(),
            counts.accepted,
            counts.flagged,
            counts.rejected
        );
    }
}
