//! Training data as kohya's sd-scripts prepares it: aspect-ratio buckets (step 64, optional no
//! upscale), resize-to-cover and centre crop, caption dropout, tag dropout and tag shuffling with
//! `keep_tokens`, repeats, and a per-epoch batch order that depends only on (seed, epoch).

use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;

/// Bucket resolutions are multiples of this.
pub const BUCKET_STEP: u32 = 64;

/// kohya's bucket list for a square `resolution`: every (w, h) on the 64 grid within
/// [min, max] whose area is at most resolution², plus the square itself.
pub fn make_buckets(resolution: u32, min: u32, max: u32) -> Vec<(u32, u32)> {
    let max_area = resolution as u64 * resolution as u64;
    let side = (resolution / BUCKET_STEP) * BUCKET_STEP;
    let mut out = vec![(side, side)];
    let mut w = min;
    while w <= max {
        let h = ((max_area / w as u64) as u32 / BUCKET_STEP * BUCKET_STEP).min(max);
        if h >= min {
            out.push((w, h));
            out.push((h, w));
        }
        w += BUCKET_STEP;
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// How images map to training sizes.
#[derive(Debug, Clone)]
pub struct Bucketing {
    pub resolution: u32,
    pub enabled: bool,
    pub min: u32,
    pub max: u32,
    pub no_upscale: bool,
}

impl Bucketing {
    /// The (width, height) an image of `w`×`h` trains at.
    pub fn bucket_for(&self, w: u32, h: u32) -> (u32, u32) {
        let (w, h) = (w.max(1), h.max(1));
        if !self.enabled {
            return (self.resolution, self.resolution);
        }
        let max_area = self.resolution as f64 * self.resolution as f64;
        if self.no_upscale {
            // Keep the image's own size (scaled down to the area budget), floored to the grid.
            let area = w as f64 * h as f64;
            let s = if area > max_area {
                (max_area / area).sqrt()
            } else {
                1.0
            };
            let fit = |v: u32| {
                (((v as f64 * s) as u32) / BUCKET_STEP * BUCKET_STEP)
                    .clamp(BUCKET_STEP, self.max.max(BUCKET_STEP))
            };
            return (fit(w), fit(h));
        }
        let aspect = w as f64 / h as f64;
        make_buckets(self.resolution, self.min, self.max)
            .into_iter()
            .min_by(|a, b| {
                let da = (a.0 as f64 / a.1 as f64 - aspect).abs();
                let db = (b.0 as f64 / b.1 as f64 - aspect).abs();
                da.total_cmp(&db)
                    // Ties: the larger area (less downscaling), then the smaller width.
                    .then((b.0 * b.1).cmp(&(a.0 * a.1)))
                    .then(a.0.cmp(&b.0))
            })
            .unwrap_or((self.resolution, self.resolution))
    }
}

/// Resize `img` to cover `w`×`h` (keeping its aspect) and crop the centre.
pub fn fit_to(img: &image::RgbImage, w: u32, h: u32) -> image::RgbImage {
    let (iw, ih) = img.dimensions();
    if (iw, ih) == (w, h) {
        return img.clone();
    }
    let s = (w as f64 / iw.max(1) as f64).max(h as f64 / ih.max(1) as f64);
    let rw = ((iw as f64 * s).round() as u32).max(w);
    let rh = ((ih as f64 * s).round() as u32).max(h);
    let resized = image::imageops::resize(img, rw, rh, image::imageops::FilterType::Lanczos3);
    let (x, y) = ((rw - w) / 2, (rh - h) / 2);
    image::imageops::crop_imm(&resized, x, y, w, h).to_image()
}

/// kohya's caption options.
#[derive(Debug, Clone, Default)]
pub struct CaptionOps {
    pub dropout: f64,
    pub tag_dropout: f64,
    pub shuffle: bool,
    pub keep_tokens: usize,
}

impl CaptionOps {
    /// The caption a step trains with (kohya's `process_caption`).
    pub fn apply(&self, caption: &str, rng: &mut ChaCha8Rng) -> String {
        if self.dropout > 0.0 && rng.gen::<f64>() < self.dropout {
            return String::new();
        }
        if !self.shuffle && self.tag_dropout <= 0.0 {
            return caption.to_string();
        }
        let tags: Vec<&str> = caption.split(',').map(str::trim).collect();
        let k = self.keep_tokens.min(tags.len());
        let (fixed, rest) = tags.split_at(k);
        let mut rest: Vec<&str> = rest.to_vec();
        if self.shuffle {
            rest.shuffle(rng);
        }
        if self.tag_dropout > 0.0 {
            rest.retain(|_| rng.gen::<f64>() >= self.tag_dropout);
        }
        fixed
            .iter()
            .chain(rest.iter())
            .copied()
            .filter(|t| !t.is_empty())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Captions are literal text: escape what A1111's prompt syntax would read as emphasis or
/// scheduling.
pub fn escape_caption(c: &str) -> String {
    let mut out = String::with_capacity(c.len());
    for ch in c.chars() {
        if matches!(ch, '(' | ')' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// One epoch's batches: example indices grouped by bucket (each example `repeats` times),
/// shuffled within buckets, cut into batches, and the batches shuffled.
pub fn epoch_batches(
    buckets: &[(u32, u32)],
    repeats: &[u32],
    batch_size: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<usize>> {
    let mut by_bucket: std::collections::BTreeMap<(u32, u32), Vec<usize>> = Default::default();
    for (i, b) in buckets.iter().enumerate() {
        for _ in 0..repeats[i] {
            by_bucket.entry(*b).or_default().push(i);
        }
    }
    let mut batches = Vec::new();
    for (_, mut items) in by_bucket {
        items.shuffle(rng);
        for chunk in items.chunks(batch_size.max(1)) {
            batches.push(chunk.to_vec());
        }
    }
    batches.shuffle(rng);
    batches
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn buckets_follow_kohya() {
        let b = make_buckets(512, 256, 1024);
        assert!(b.contains(&(512, 512)));
        assert!(b.contains(&(256, 1024)) && b.contains(&(1024, 256)));
        assert!(b.contains(&(576, 448)) && b.contains(&(448, 576)));
        for (w, h) in &b {
            assert_eq!(w % 64, 0);
            assert_eq!(h % 64, 0);
            assert!(w * h <= 512 * 512, "{w}x{h}");
            assert!((256..=1024).contains(w) && (256..=1024).contains(h));
        }
    }

    #[test]
    fn images_land_in_the_nearest_aspect_bucket() {
        let bk = Bucketing {
            resolution: 512,
            enabled: true,
            min: 256,
            max: 1024,
            no_upscale: false,
        };
        assert_eq!(bk.bucket_for(1000, 1000), (512, 512));
        let (w, h) = bk.bucket_for(1920, 1080);
        assert!(
            w > h && (w as f64 / h as f64 - 16.0 / 9.0).abs() < 0.2,
            "{w}x{h}"
        );
        let (w, h) = bk.bucket_for(600, 1200);
        assert!(h > w, "{w}x{h}");
        let off = Bucketing {
            enabled: false,
            ..bk.clone()
        };
        assert_eq!(off.bucket_for(1920, 1080), (512, 512));
        let keep = Bucketing {
            no_upscale: true,
            ..bk
        };
        // Small images are not upscaled: 300×200 trains at 256×192.
        assert_eq!(keep.bucket_for(300, 200), (256, 192));
        let (w, h) = keep.bucket_for(4000, 3000);
        assert!(w * h <= 512 * 512 && w > h);
    }

    #[test]
    fn fit_covers_and_crops_the_centre() {
        let mut img = image::RgbImage::new(200, 100);
        for (x, _, p) in img.enumerate_pixels_mut() {
            *p = image::Rgb(if (50..150).contains(&x) {
                [255, 0, 0]
            } else {
                [0, 0, 255]
            });
        }
        let out = fit_to(&img, 64, 64);
        assert_eq!(out.dimensions(), (64, 64));
        // The centre half of the width (red) fills the square.
        assert!(out.pixels().all(|p| p.0[0] > 200 && p.0[2] < 60));
    }

    #[test]
    fn captions_drop_and_shuffle_as_kohya() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let ops = CaptionOps {
            shuffle: true,
            keep_tokens: 1,
            ..Default::default()
        };
        let c = "sks dog, red collar, grass, sunny";
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let out = ops.apply(c, &mut rng);
            assert!(out.starts_with("sks dog, "), "{out}");
            let mut tags: Vec<&str> = out.split(", ").collect();
            tags.sort();
            assert_eq!(tags, vec!["grass", "red collar", "sks dog", "sunny"]);
            seen.insert(out);
        }
        assert!(seen.len() > 1, "shuffling never changed the order");
        let drop_all = CaptionOps {
            dropout: 1.0,
            ..Default::default()
        };
        assert_eq!(drop_all.apply(c, &mut rng), "");
        let tags = CaptionOps {
            tag_dropout: 0.5,
            keep_tokens: 1,
            ..Default::default()
        };
        let lens: Vec<usize> = (0..100)
            .map(|_| tags.apply(c, &mut rng).split(", ").count())
            .collect();
        assert!(lens.iter().all(|&n| (1..=4).contains(&n)));
        let mean = lens.iter().sum::<usize>() as f64 / lens.len() as f64;
        assert!((2.0..3.0).contains(&mean), "mean tags kept {mean}");
        assert_eq!(
            CaptionOps::default().apply(c, &mut rng),
            c,
            "no options, no change"
        );
    }

    #[test]
    fn escaping_keeps_captions_literal() {
        assert_eq!(escape_caption("a (red) [cat]"), "a \\(red\\) \\[cat\\]");
    }

    #[test]
    fn epochs_batch_within_buckets_and_repeat() {
        let buckets = vec![(64, 64), (64, 64), (128, 64), (64, 64), (128, 64)];
        let repeats = vec![2, 2, 2, 2, 2];
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let batches = epoch_batches(&buckets, &repeats, 2, &mut rng);
        let mut count = vec![0; 5];
        for b in &batches {
            let first = buckets[b[0]];
            assert!(b.iter().all(|&i| buckets[i] == first), "mixed bucket batch");
            for &i in b {
                count[i] += 1;
            }
        }
        assert_eq!(count, vec![2; 5]);
        let again = epoch_batches(&buckets, &repeats, 2, &mut ChaCha8Rng::seed_from_u64(7));
        assert_eq!(batches, again);
    }
}
