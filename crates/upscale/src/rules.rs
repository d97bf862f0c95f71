//! A1111's extras upscale, by its rules.
//!
//! A factor `s` (or, to reach a size, the smallest factor covering it) aims at
//! `floor(w·s / 8)·8 × floor(h·s / 8)·8`. A built-in upscaler resizes to `int(w·s) × int(h·s)`
//! (Lanczos or nearest neighbour); a model runs at its own scale (tile by tile, [`crate::grid`])
//! until the image covers the aim, at most three times; a result other than the aim is resized
//! to it with Lanczos. To
//! a size with `crop`, the result is placed centred on a black canvas of that size (what sticks
//! out is cut). A second upscaler runs on the original the same way and is blended over the first
//! at its visibility. `None` as the first upscaler leaves the image untouched.

use atelier_contracts::upscale::{UpscaleResize, UpscaleSpec, MAX_SIDE};
use image::imageops::{self, FilterType};
use image::RgbImage;

use crate::{grid, Models};

/// The largest side a model pass may make on its way to the aim.
const MAX_PASS_SIDE: u64 = 2 * MAX_SIDE as u64;

/// The upscaled image and A1111's postprocessing infotext; upscaler names that are not built in
/// are `models`'.
pub fn upscale(
    img: &RgbImage,
    spec: &UpscaleSpec,
    models: &dyn Models,
) -> Result<(RgbImage, String), String> {
    if spec.upscaler == "None" {
        return Ok((img.clone(), String::new()));
    }
    let (scale, mut info) = match spec.resize {
        UpscaleResize::By { scale } => (
            scale as f64,
            vec![format!("Postprocess upscale by: {}", trim(scale as f64))],
        ),
        UpscaleResize::To { width, height, .. } => (
            (width as f64 / img.width() as f64).max(height as f64 / img.height() as f64),
            vec![format!("Postprocess upscale to: {width}x{height}")],
        ),
    };
    let mut out = one(img, &spec.upscaler, scale, spec.resize, models)?;
    info.push(format!("Postprocess upscaler: {}", spec.upscaler));
    if let Some(second) = spec.upscaler_2.as_deref().filter(|u| *u != "None") {
        if spec.upscaler_2_visibility > 0.0 {
            let other = one(img, second, scale, spec.resize, models)?;
            out = blend(&out, &other, spec.upscaler_2_visibility);
            info.push(format!("Postprocess upscaler 2: {second}"));
        }
    }
    if let UpscaleResize::To {
        crop: true,
        width,
        height,
    } = spec.resize
    {
        info.push(format!("Postprocess crop to: {width}x{height}"));
    }
    Ok((out, info.join(", ")))
}

fn trim(x: f64) -> String {
    let s = format!("{x}");
    s.strip_suffix(".0").map(str::to_owned).unwrap_or(s)
}

/// One upscaler's result at `scale`, cropped when asked.
fn one(
    img: &RgbImage,
    upscaler: &str,
    scale: f64,
    resize: UpscaleResize,
    models: &dyn Models,
) -> Result<RgbImage, String> {
    let (w, h) = (img.width() as f64, img.height() as f64);
    let aim = (
        ((w * scale) / 8.0).floor() * 8.0,
        ((h * scale) / 8.0).floor() * 8.0,
    );
    let first = ((w * scale) as u32, (h * scale) as u32);
    for side in [aim.0, aim.1, first.0 as f64, first.1 as f64] {
        if side > MAX_SIDE as f64 {
            return Err(format!(
                "the upscaled image would be {}x{}; at most {MAX_SIDE} on a side",
                first.0, first.1
            ));
        }
    }
    if aim.0 < 1.0 || aim.1 < 1.0 || first.0 == 0 || first.1 == 0 {
        return Err(format!(
            "a {}x{} image at scale {scale} is smaller than 8 pixels on a side",
            img.width(),
            img.height()
        ));
    }
    let aim = (aim.0 as u32, aim.1 as u32);
    let mut out = match upscaler {
        "Lanczos" => imageops::resize(img, first.0, first.1, FilterType::Lanczos3),
        "Nearest" => imageops::resize(img, first.0, first.1, FilterType::Nearest),
        name => by_model(img, name, aim, models)?,
    };
    if out.dimensions() != aim {
        out = imageops::resize(&out, aim.0, aim.1, FilterType::Lanczos3);
    }
    if let UpscaleResize::To {
        width,
        height,
        crop: true,
    } = resize
    {
        out = centred(&out, width, height);
    }
    Ok(out)
}

/// A1111's loop for model upscalers: passes at the model's scale while the image is short of
/// `aim` (three at most, stopping if a pass changes nothing).
fn by_model(
    img: &RgbImage,
    name: &str,
    aim: (u32, u32),
    models: &dyn Models,
) -> Result<RgbImage, String> {
    let model = models.get(name)?;
    let mut cur = img.clone();
    for _ in 0..3 {
        if cur.width() >= aim.0 && cur.height() >= aim.1 {
            break;
        }
        let s = model.scale().max(1) as u64;
        if cur.width() as u64 * s > MAX_PASS_SIDE || cur.height() as u64 * s > MAX_PASS_SIDE {
            return Err(format!(
                "{name} would make a {}x{} image on the way; at most {MAX_PASS_SIDE} on a side",
                cur.width() as u64 * s,
                cur.height() as u64 * s
            ));
        }
        let before = cur.dimensions();
        cur = grid::tiled(model.as_ref(), &cur, grid::TILE, grid::OVERLAP)?;
        if cur.dimensions() == before {
            break;
        }
    }
    Ok(cur)
}

/// `img` on a black `width × height` canvas, its centre on the canvas' (Python's floor division
/// for the offsets, as PIL's paste is given them).
fn centred(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let dx = (width / 2) as i64 - (img.width() / 2) as i64;
    let dy = (height / 2) as i64 - (img.height() / 2) as i64;
    let mut canvas = RgbImage::new(width, height);
    imageops::replace(&mut canvas, img, dx, dy);
    canvas
}

/// PIL's `Image.blend`: `a + alpha·(b − a)`, clamped and truncated.
fn blend(a: &RgbImage, b: &RgbImage, alpha: f32) -> RgbImage {
    let mut out = a.clone();
    for (o, q) in out.iter_mut().zip(b.iter()) {
        let v = *o as f32 + alpha * (*q as f32 - *o as f32);
        *o = v.clamp(0.0, 255.0) as u8;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(resize: UpscaleResize, upscaler: &str) -> UpscaleSpec {
        UpscaleSpec {
            images: vec![],
            resize,
            upscaler: upscaler.into(),
            upscaler_2: None,
            upscaler_2_visibility: 0.0,
        }
    }

    fn upscale_(img: &RgbImage, spec: &UpscaleSpec) -> Result<(RgbImage, String), String> {
        upscale(img, spec, &crate::NoModels)
    }

    fn gradient(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        })
    }

    #[test]
    fn sizes_follow_a1111s_multiples_of_eight() {
        let img = gradient(100, 60);
        let (out, info) =
            upscale_(&img, &spec(UpscaleResize::By { scale: 2.0 }, "Lanczos")).unwrap();
        assert_eq!(out.dimensions(), (200, 120));
        assert_eq!(
            info,
            "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
        );
        // 100·1.5 = 150 → 144; 60·1.5 = 90 → 88.
        let (out, _) = upscale_(&img, &spec(UpscaleResize::By { scale: 1.5 }, "Nearest")).unwrap();
        assert_eq!(out.dimensions(), (144, 88));
    }

    #[test]
    fn nearest_repeats_pixels_where_the_size_is_already_right() {
        let img = gradient(16, 8);
        let (out, _) = upscale_(&img, &spec(UpscaleResize::By { scale: 2.0 }, "Nearest")).unwrap();
        for (x, y, p) in out.enumerate_pixels() {
            assert_eq!(p, img.get_pixel(x / 2, y / 2));
        }
    }

    #[test]
    fn resize_to_covers_then_crops_around_the_centre() {
        let img = gradient(100, 50);
        // Covering 300x300 takes scale 6 (300 / 50): 600x300 aimed at 600x296 (multiples of 8),
        // then its middle 300 columns, 2 black rows above and below as A1111's canvas has.
        let to = UpscaleResize::To {
            width: 300,
            height: 300,
            crop: true,
        };
        let (out, info) = upscale_(&img, &spec(to, "Nearest")).unwrap();
        assert_eq!(out.dimensions(), (300, 300));
        assert!(info.ends_with("Postprocess crop to: 300x300"), "{info}");
        // Column 0 of the crop is column 150 of the 600-wide upscale: source column 25.
        assert_eq!(out.get_pixel(0, 2), img.get_pixel(25, 0));
        assert_eq!(out.get_pixel(0, 0), &image::Rgb([0, 0, 0]));
        assert_eq!(out.get_pixel(299, 298), &image::Rgb([0, 0, 0]));
        let uncropped = UpscaleResize::To {
            width: 300,
            height: 300,
            crop: false,
        };
        assert_eq!(
            upscale_(&img, &spec(uncropped, "Nearest"))
                .unwrap()
                .0
                .dimensions(),
            (600, 296)
        );
    }

    #[test]
    fn a_second_upscaler_blends_in_and_none_leaves_the_image() {
        let img = gradient(40, 40);
        let mut s = spec(UpscaleResize::By { scale: 2.0 }, "Nearest");
        let (nearest, _) = upscale_(&img, &s).unwrap();
        s.upscaler_2 = Some("Lanczos".into());
        s.upscaler_2_visibility = 1.0;
        let (all_lanczos, info) = upscale_(&img, &s).unwrap();
        let (lanczos, _) =
            upscale_(&img, &spec(UpscaleResize::By { scale: 2.0 }, "Lanczos")).unwrap();
        assert_eq!(all_lanczos, lanczos);
        assert!(info.contains("Postprocess upscaler 2: Lanczos"));
        s.upscaler_2_visibility = 0.5;
        let (half, _) = upscale_(&img, &s).unwrap();
        assert_ne!(half, nearest);
        assert_ne!(half, lanczos);
        let (same, info) = upscale_(&img, &spec(UpscaleResize::By { scale: 4.0 }, "None")).unwrap();
        assert_eq!((same, info), (img, String::new()));
    }

    /// A 4x nearest-neighbour "model" that counts its passes over whole images.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl crate::Model for Counting {
        fn scale(&self) -> u32 {
            4
        }
        fn run(&self, img: &RgbImage) -> Result<RgbImage, String> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let (w, h) = img.dimensions();
            Ok(imageops::resize(img, w * 4, h * 4, FilterType::Nearest))
        }
    }

    impl crate::Models for std::sync::Arc<Counting> {
        fn get(&self, name: &str) -> Result<std::sync::Arc<dyn crate::Model>, String> {
            match name {
                "4x-count" => Ok(self.clone()),
                _ => Err(format!("no {name}")),
            }
        }
    }

    #[test]
    fn models_run_until_the_image_covers_the_aim_then_lanczos_meets_it() {
        let img = gradient(40, 24);
        for (scale, passes, size) in [
            (2.0, 1, (80, 48)),
            (4.0, 1, (160, 96)),
            (8.0, 2, (320, 192)),
        ] {
            let m = std::sync::Arc::new(Counting(Default::default()));
            let s = spec(UpscaleResize::By { scale }, "4x-count");
            let (out, info) = upscale(&img, &s, &m).unwrap();
            assert_eq!(out.dimensions(), size, "scale {scale}");
            assert_eq!(
                m.0.load(std::sync::atomic::Ordering::SeqCst),
                passes,
                "scale {scale}"
            );
            assert!(info.contains("Postprocess upscaler: 4x-count"), "{info}");
        }
        // Exactly 4x: the model's own pixels, no resampling after it.
        let m = std::sync::Arc::new(Counting(Default::default()));
        let (out, _) = upscale(
            &img,
            &spec(UpscaleResize::By { scale: 4.0 }, "4x-count"),
            &m,
        )
        .unwrap();
        assert_eq!(out, imageops::resize(&img, 160, 96, FilterType::Nearest));
        // An unknown model is the models' error; with none at all, the worker says it has none.
        let e = upscale(&img, &spec(UpscaleResize::By { scale: 2.0 }, "other"), &m).unwrap_err();
        assert_eq!(e, "no other");
        let e = upscale_(&img, &spec(UpscaleResize::By { scale: 2.0 }, "4x-count")).unwrap_err();
        assert!(e.contains("no upscaler models"), "{e}");
    }

    #[test]
    fn too_big_or_too_small_is_an_error() {
        let img = gradient(4000, 10);
        assert!(upscale_(&img, &spec(UpscaleResize::By { scale: 4.0 }, "Lanczos")).is_err());
        let tiny = gradient(3, 3);
        assert!(upscale_(&tiny, &spec(UpscaleResize::By { scale: 2.0 }, "Lanczos")).is_err());
    }
}
