//! The pure part of the filter: per record the checks that failed, a decision, a tier and a
//! split, under the dataset's policy.

use atelier_contracts::dataset::{
    CaptionRecord, DatasetRow, Decision, QualityPolicy, Severity, Signal, Split, SplitSpec, Tier,
    VersionCounts,
};
use atelier_contracts::images::ImageRecord;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::{dups, text};

/// One image with the caption chosen for it, the NSFW detector's verdict and the CLIP score
/// of the pair when they ran.
pub struct Input<'a> {
    pub image: &'a ImageRecord,
    pub caption: Option<&'a CaptionRecord>,
    pub nsfw: Option<NsfwScore>,
    pub clip_score: Option<f32>,
}

/// The strongest explicit-class confidence (0 and no label when none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NsfwScore {
    pub score: f32,
    pub label: Option<&'static str>,
}

/// The split of an image: a hash of (seed, sha256) mapped to [0, 1) against the fractions, so
/// an image keeps its split in every version (no train/test leakage between versions) and each
/// tier is split in the same proportions in expectation.
pub fn split_of(split: &SplitSpec, sha256: &str) -> Split {
    let h = Sha256::new()
        .chain_update(split.seed.as_bytes())
        .chain_update([0])
        .chain_update(sha256.as_bytes())
        .finalize();
    let u =
        u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]]) as f64 / 2f64.powi(64);
    if u < f64::from(split.val) {
        Split::Val
    } else if u < f64::from(split.val) + f64::from(split.test) {
        Split::Test
    } else {
        Split::Train
    }
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    let v = xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64;
    (m, v.sqrt())
}

/// Every check, the decision and the tier for each input (in input order), with the counts.
pub fn assess(
    inputs: &[Input<'_>],
    policy: &QualityPolicy,
    split: &SplitSpec,
) -> (Vec<DatasetRow>, VersionCounts) {
    let phashes: Vec<Option<u64>> = inputs
        .iter()
        .map(|i| {
            i.image
                .phash
                .as_deref()
                .and_then(|h| u64::from_str_radix(h, 16).ok())
                .filter(|_| i.image.flag.is_none())
        })
        .collect();
    let dups = if policy.duplicate_max_bits >= 0 {
        dups::earlier_near_duplicates(&phashes, policy.duplicate_max_bits as u32)
    } else {
        vec![None; inputs.len()]
    };
    let word_counts: Vec<u32> = inputs
        .iter()
        .map(|i| {
            i.caption
                .map_or(0, |c| text::words(&c.caption).len() as u32)
        })
        .collect();
    let with_caption: Vec<f64> = inputs
        .iter()
        .zip(&word_counts)
        .filter(|(i, _)| i.caption.is_some_and(|c| !c.caption.trim().is_empty()))
        .map(|(_, &w)| f64::from(w))
        .collect();
    let (mean, sd) = mean_sd(&with_caption);

    let rows: Vec<DatasetRow> = inputs
        .par_iter()
        .enumerate()
        .map(|(k, input)| {
            let img = input.image;
            let mut signals: Vec<Signal> = Vec::new();
            let mut fail = |name: &str, reason: String| {
                let severity = policy.severity_of(name);
                if severity != Severity::Ignore {
                    signals.push(Signal {
                        name: name.into(),
                        reason,
                        severity,
                    });
                }
            };
            // Image.
            match (&img.flag, img.width, img.height) {
                (Some(flag), _, _) => fail("undecodable", flag.clone()),
                (None, Some(w), Some(h)) => {
                    let (short, long) = (w.min(h), w.max(h));
                    if short < policy.min_side {
                        fail(
                            "small",
                            format!("{w}x{h}: shorter side below {}", policy.min_side),
                        );
                    }
                    if short > 0 && long as f32 / short as f32 > policy.max_aspect {
                        fail(
                            "aspect",
                            format!(
                                "{w}x{h}: aspect {:.2} above {}",
                                long as f32 / short as f32,
                                policy.max_aspect
                            ),
                        );
                    }
                }
                _ => fail("undecodable", "no decoded size recorded".into()),
            }
            if let Some(j) = dups[k] {
                fail(
                    "duplicate",
                    format!(
                        "perceptual hash within {} bits of {}",
                        policy.duplicate_max_bits,
                        inputs[j].image.sha256
                    ),
                );
            }
            if let Some(n) = input.nsfw {
                if n.score >= policy.nsfw_threshold {
                    fail(
                        "nsfw",
                        format!(
                            "{} detected at {:.2} (threshold {})",
                            n.label.unwrap_or("explicit content"),
                            n.score,
                            policy.nsfw_threshold
                        ),
                    );
                }
            }
            if let Some(c) = input.clip_score {
                if policy.min_clip_score > 0.0 && c < policy.min_clip_score {
                    fail(
                        "clip_score",
                        format!(
                            "CLIP score {c:.1} of image and caption is below {}",
                            policy.min_clip_score
                        ),
                    );
                }
            }
            // Caption.
            let words = word_counts[k];
            let mut language = None;
            match input.caption {
                None => fail("no_caption", "no caption from the chosen source".into()),
                Some(c) if c.caption.trim().is_empty() => {
                    fail("empty", "the caption is empty".into())
                }
                Some(c) => {
                    let t = c.caption.as_str();
                    if words < policy.min_words {
                        fail(
                            "short",
                            format!("{words} words, below {}", policy.min_words),
                        );
                    }
                    if policy.max_words > 0 && words > policy.max_words {
                        fail(
                            "long",
                            format!("{words} words, above {}", policy.max_words),
                        );
                    }
                    if let Some(r) = text::truncated(t, c.finish_reason.as_deref()) {
                        fail("truncated", r);
                    }
                    if let Some(r) = text::repetition(t, policy.max_repeated_fraction) {
                        fail("repetition", r);
                    }
                    if let Some(r) = text::refusal(t) {
                        fail("refusal", r);
                    }
                    language = text::language(t);
                    if !policy.languages.is_empty() {
                        match language {
                            Some(l) if policy.languages.iter().any(|a| a == l) => {}
                            Some(l) => fail(
                                "language",
                                format!("{l}, not one of {}", policy.languages.join(", ")),
                            ),
                            // Too short or mixed to tell: not held against it.
                            None => {}
                        }
                    }
                    if policy.length_outlier_z > 0.0 && sd > 0.0 {
                        let z = (f64::from(words) - mean) / sd;
                        if z.abs() > f64::from(policy.length_outlier_z) {
                            fail(
                                "length_outlier",
                                format!(
                                    "{words} words, {z:+.1} standard deviations from the mean {mean:.1}"
                                ),
                            );
                        }
                    }
                }
            }
            let decision = if signals.iter().any(|s| s.severity == Severity::Reject) {
                Decision::Reject
            } else if signals.is_empty() {
                Decision::Accept
            } else {
                Decision::Flag
            };
            let tier = match decision {
                Decision::Reject => None,
                Decision::Flag => Some(Tier::Bronze),
                Decision::Accept if words >= policy.gold_min_words => Some(Tier::Gold),
                Decision::Accept => Some(Tier::Silver),
            };
            let split = tier.map(|_| split_of(split, &img.sha256));
            let first = img.sources.first();
            let tags = first
                .and_then(|s| s.metadata.get("tags"))
                .and_then(|t| t.as_array())
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            DatasetRow {
                image_id: img.sha256.chars().take(16).collect(),
                image_key: img.key.clone(),
                sha256: img.sha256.clone(),
                format: img.format.clone(),
                width: img.width,
                height: img.height,
                caption: input.caption.map(|c| c.caption.clone()),
                caption_source: input.caption.map(|c| c.source.clone()),
                language: language.map(str::to_owned),
                nsfw: input.nsfw.map(|n| n.score),
                clip_score: input.clip_score,
                words,
                signals,
                decision,
                tier,
                split,
                tags,
                source: first.and_then(|s| s.source.clone()),
                license: first.and_then(|s| s.license.clone()),
                metadata: first.map(|s| s.metadata.clone()).unwrap_or_default(),
                augmentation: None,
                negatives: Vec::new(),
                paraphrases: Vec::new(),
            }
        })
        .collect();
    let counts = VersionCounts::of_rows(&rows);
    (rows, counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use atelier_contracts::dataset::CaptionSource;
    use atelier_contracts::JobId;

    fn image(n: u8, w: u32, h: u32, phash: u64) -> ImageRecord {
        let sha = format!("{:02x}", n).repeat(32);
        ImageRecord {
            schema_version: 1,
            sha256: sha.clone(),
            key: format!("sha256/{}/{sha}", &sha[..2]),
            size: 100,
            content_type: "image/png".into(),
            datasets: vec!["d".into()],
            sources: vec![],
            format: Some("png".into()),
            width: Some(w),
            height: Some(h),
            exif_orientation: Some(1),
            phash: Some(format!("{phash:016x}")),
            flag: None,
            first_seen: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
        }
    }

    fn caption(img: &ImageRecord, text: &str, finish: &str) -> CaptionRecord {
        CaptionRecord {
            schema_version: 1,
            image_sha256: img.sha256.clone(),
            source_id: "0123456789abcdef".into(),
            source: CaptionSource {
                backend: "openai".into(),
                model: "m".into(),
                prompt: "p".into(),
            },
            caption: text.into(),
            finish_reason: Some(finish.into()),
            usage: Default::default(),
            job: JobId::new(),
            created_at: chrono::Utc::now(),
        }
    }

    const GOOD: &str = "The image shows a red circle and a blue rectangle on a white background.";

    #[test]
    fn signals_decisions_tiers_and_splits() {
        let mut corrupt = image(7, 0, 0, 0);
        corrupt.flag = Some("corrupt: truncated PNG".into());
        corrupt.width = None;
        let imgs = [
            image(1, 128, 128, 0x0f0f_0f0f_0f0f_0f0f),
            image(2, 128, 128, 0x0f0f_0f0f_0f0f_0f0e), // 1 bit from #1
            image(3, 32, 128, 0xffff_0000_ffff_0000),  // small and elongated
            image(4, 128, 96, 0x1234_5678_9abc_def0),
            image(5, 128, 96, 0x0fed_cba9_8765_4321),
            image(6, 128, 96, 0x5555_aaaa_5555_aaaa),
            corrupt,
            image(8, 128, 96, 0x3333_cccc_3333_cccc),
        ];
        let caps = [
            Some(caption(&imgs[0], GOOD, "stop")),
            Some(caption(&imgs[1], GOOD, "stop")),
            Some(caption(&imgs[2], GOOD, "stop")),
            Some(caption(&imgs[3], "I'm sorry, but I can't help with that request.", "stop")),
            Some(caption(
                &imgs[4],
                "The image shows a red circle and a blue rectangle on a white background and the circle is",
                "length",
            )),
            Some(caption(&imgs[5], "Red circle.", "stop")),
            None,
            None,
        ];
        let inputs: Vec<Input<'_>> = imgs
            .iter()
            .zip(&caps)
            .map(|(image, c)| Input {
                image,
                caption: c.as_ref(),
                nsfw: None,
                clip_score: None,
            })
            .collect();
        let policy = QualityPolicy::default();
        let (rows, counts) = assess(&inputs, &policy, &SplitSpec::default());
        let names =
            |i: usize| -> Vec<&str> { rows[i].signals.iter().map(|s| s.name.as_str()).collect() };
        assert!(names(0).is_empty(), "{:?}", rows[0].signals);
        assert_eq!(
            (rows[0].decision, rows[0].tier),
            (Decision::Accept, Some(Tier::Gold))
        );
        assert_eq!(names(1), ["duplicate"]);
        assert!(rows[1].signals[0].reason.contains(&imgs[0].sha256));
        assert_eq!(rows[1].decision, Decision::Reject);
        assert_eq!(rows[1].tier, None);
        assert_eq!(rows[1].split, None);
        assert_eq!(names(2), ["small", "aspect"]);
        assert_eq!(names(3), ["refusal"]);
        assert_eq!(names(4), ["truncated"]);
        assert_eq!(
            (rows[4].decision, rows[4].tier),
            (Decision::Flag, Some(Tier::Bronze))
        );
        assert_eq!(names(5), ["short"]);
        assert_eq!(names(6), ["undecodable", "no_caption"]);
        assert_eq!(names(7), ["no_caption"]);
        assert_eq!(rows[0].language.as_deref(), Some("eng"));
        assert_eq!(counts.rows, 8);
        assert_eq!(
            (counts.accepted, counts.flagged, counts.rejected),
            (1, 2, 5)
        );
        assert_eq!(counts.signals["no_caption"], 2);
        assert_eq!(counts.tiers.values().sum::<u64>(), 3);
        assert_eq!(counts.splits.values().sum::<u64>(), 3);

        // A policy can lower a signal to a flag or ignore it.
        let mut lenient = policy.clone();
        lenient.severity.insert("refusal".into(), Severity::Flag);
        lenient.severity.insert("short".into(), Severity::Ignore);
        let (rows2, _) = assess(&inputs, &lenient, &SplitSpec::default());
        assert_eq!(rows2[3].decision, Decision::Flag);
        assert_eq!(rows2[5].decision, Decision::Accept);
        assert_eq!(rows2[5].tier, Some(Tier::Silver));
    }

    #[test]
    fn nsfw_verdicts_become_a_signal_at_the_threshold() {
        let imgs = [
            image(1, 128, 128, 1),
            image(2, 128, 128, u64::MAX),
            image(3, 128, 128, 0x00ff_00ff_00ff_00ff),
        ];
        let caps: Vec<CaptionRecord> = imgs.iter().map(|i| caption(i, GOOD, "stop")).collect();
        let verdicts = [
            Some(NsfwScore {
                score: 0.81,
                label: Some("BUTTOCKS_EXPOSED"),
            }),
            Some(NsfwScore {
                score: 0.0,
                label: None,
            }),
            None,
        ];
        let inputs: Vec<Input<'_>> = (0..3)
            .map(|k| Input {
                image: &imgs[k],
                caption: Some(&caps[k]),
                nsfw: verdicts[k],
                clip_score: None,
            })
            .collect();
        let (rows, counts) = assess(&inputs, &QualityPolicy::default(), &SplitSpec::default());
        assert_eq!(rows[0].decision, Decision::Reject);
        assert_eq!(rows[0].signals[0].name, "nsfw");
        assert!(rows[0].signals[0]
            .reason
            .contains("BUTTOCKS_EXPOSED detected at 0.81"));
        assert_eq!(rows[0].nsfw, Some(0.81));
        assert_eq!(
            (rows[1].decision, rows[1].nsfw),
            (Decision::Accept, Some(0.0))
        );
        assert_eq!((rows[2].decision, rows[2].nsfw), (Decision::Accept, None));
        assert_eq!(counts.signals["nsfw"], 1);
        let lenient = QualityPolicy {
            nsfw_threshold: 0.9,
            ..Default::default()
        };
        assert_eq!(
            assess(&inputs, &lenient, &SplitSpec::default()).0[0].decision,
            Decision::Accept
        );
    }

    #[test]
    fn low_clip_scores_are_flagged_at_the_threshold() {
        let imgs = [
            image(1, 128, 128, 1),
            image(2, 128, 128, u64::MAX),
            image(3, 128, 128, 0x00ff_00ff_00ff_00ff),
        ];
        let caps: Vec<CaptionRecord> = imgs.iter().map(|i| caption(i, GOOD, "stop")).collect();
        let scores = [Some(12.5), Some(31.0), None];
        let inputs: Vec<Input<'_>> = (0..3)
            .map(|k| Input {
                image: &imgs[k],
                caption: Some(&caps[k]),
                nsfw: None,
                clip_score: scores[k],
            })
            .collect();
        let (rows, counts) = assess(&inputs, &QualityPolicy::default(), &SplitSpec::default());
        assert_eq!(rows[0].decision, Decision::Flag);
        assert_eq!(rows[0].signals[0].name, "clip_score");
        assert!(
            rows[0].signals[0].reason.contains("12.5"),
            "{:?}",
            rows[0].signals
        );
        assert_eq!(rows[0].clip_score, Some(12.5));
        assert_eq!(
            (rows[1].decision, rows[1].clip_score),
            (Decision::Accept, Some(31.0))
        );
        assert_eq!(
            (rows[2].decision, rows[2].clip_score),
            (Decision::Accept, None)
        );
        assert_eq!(counts.signals["clip_score"], 1);
        let off = QualityPolicy {
            min_clip_score: 0.0,
            ..Default::default()
        };
        assert_eq!(
            assess(&inputs, &off, &SplitSpec::default()).0[0].decision,
            Decision::Accept
        );
    }

    #[test]
    fn splits_are_stable_and_follow_the_fractions() {
        let spec = SplitSpec {
            val: 0.1,
            test: 0.2,
            seed: "s".into(),
        };
        let shas: Vec<String> = (0..5000u32).map(|i| format!("{i:064x}")).collect();
        let splits: Vec<Split> = shas.iter().map(|s| split_of(&spec, s)).collect();
        let share = |k: Split| splits.iter().filter(|&&s| s == k).count() as f64 / 5000.0;
        assert!((share(Split::Val) - 0.1).abs() < 0.02);
        assert!((share(Split::Test) - 0.2).abs() < 0.02);
        // The same image keeps its split; another seed reshuffles.
        assert_eq!(split_of(&spec, &shas[17]), splits[17]);
        let other = SplitSpec {
            seed: "t".into(),
            ..spec.clone()
        };
        let moved = shas
            .iter()
            .zip(&splits)
            .filter(|(s, k)| split_of(&other, s) != **k)
            .count();
        assert!(moved > 1000);
    }
}
