//! Image transforms on 8-bit RGB: [`plan`] turns a requested chain into concrete [`Step`]s with a
//! seeded generator (no pixels needed, only the size), and [`apply`] runs steps on pixels.
//!
//! Determinism: every random choice is made in `plan` from a ChaCha8 stream, and `apply` is pure
//! integer or scalar f32 arithmetic in a fixed order (no threads split a step), so the same
//! parent, spec and seed give the same bytes. Resizing goes through `fast_image_resize`'s
//! fixed-point Lanczos3 convolution, whose SIMD and scalar paths give the same result (a test
//! checks this), so the machine's CPU does not change the output either.

use atelier_contracts::augment::{FlipDirection, ResizeMode, Step, Transform};
use fast_image_resize as fr;
use image::RgbImage;
use rand::Rng;

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("resize to {width}x{height}: {message}")]
    Resize {
        width: u32,
        height: u32,
        message: String,
    },
    #[error("crop {width}x{height} at ({x}, {y}) lies outside the {iw}x{ih} image")]
    Crop {
        x: u32,
        y: u32,
        width: u32,
        height: u32,
        iw: u32,
        ih: u32,
    },
    #[error("the image would be {width}x{height}: {why}")]
    Size {
        width: u32,
        height: u32,
        why: String,
    },
    #[error("JPEG round trip: {0}")]
    Jpeg(String),
}

/// The size a step leaves, from the size it gets.
pub fn output_size(step: &Step, w: u32, h: u32) -> (u32, u32) {
    match *step {
        Step::Resize { width, height } => (width, height),
        Step::Crop { width, height, .. } | Step::Pad { width, height, .. } => (width, height),
        Step::Flip { .. }
        | Step::Rotate { .. }
        | Step::ColorJitter { .. }
        | Step::Blur { .. }
        | Step::Jpeg { .. } => (w, h),
    }
}

fn scaled(v: u32, scale: f64) -> u32 {
    ((f64::from(v) * scale).round() as u32).max(1)
}

fn uniform(rng: &mut impl Rng, lo: f32, hi: f32) -> f32 {
    if hi > lo {
        rng.gen_range(lo..=hi)
    } else {
        lo
    }
}

/// The concrete steps of `chain` for an image of `w`×`h`, drawing from `rng`.
pub fn plan(chain: &[Transform], w: u32, h: u32, rng: &mut impl Rng) -> Vec<Step> {
    let (mut w, mut h) = (w, h);
    let mut out = Vec::new();
    for t in chain {
        let steps = plan_one(t, w, h, rng);
        for s in steps {
            (w, h) = output_size(&s, w, h);
            out.push(s);
        }
    }
    out
}

fn plan_one(t: &Transform, w: u32, h: u32, rng: &mut impl Rng) -> Vec<Step> {
    match *t {
        Transform::Resize {
            size,
            mode,
            only_if_bigger,
            border_color,
        } => {
            let (small, large) = (w.min(h), w.max(h));
            let mut steps = Vec::new();
            let side = match mode {
                ResizeMode::KeepRatio | ResizeMode::CenterCrop => small,
                ResizeMode::KeepRatioLargest | ResizeMode::Border => large,
            };
            let (mut rw, mut rh) = (w, h);
            if side != size && !(only_if_bigger && side <= size) {
                let scale = f64::from(size) / f64::from(side);
                (rw, rh) = (scaled(w, scale), scaled(h, scale));
                // The side that sets the scale lands exactly on `size`.
                if side == small {
                    if w <= h {
                        rw = size;
                    } else {
                        rh = size;
                    }
                } else if w >= h {
                    rw = size;
                } else {
                    rh = size;
                }
                steps.push(Step::Resize {
                    width: rw,
                    height: rh,
                });
            }
            match mode {
                ResizeMode::CenterCrop => {
                    let (cw, ch) = (rw.min(size), rh.min(size));
                    if (cw, ch) != (rw, rh) {
                        steps.push(Step::Crop {
                            x: (rw - cw) / 2,
                            y: (rh - ch) / 2,
                            width: cw,
                            height: ch,
                        });
                    }
                }
                ResizeMode::Border => {
                    let (pw, ph) = (rw.max(size), rh.max(size));
                    if (pw, ph) != (rw, rh) {
                        steps.push(Step::Pad {
                            width: pw,
                            height: ph,
                            x: (pw - rw) / 2,
                            y: (ph - rh) / 2,
                            color: border_color,
                        });
                    }
                }
                ResizeMode::KeepRatio | ResizeMode::KeepRatioLargest => {}
            }
            steps
        }
        Transform::RandomCrop { scale, ratio } => {
            let area = f64::from(w) * f64::from(h);
            let (lr0, lr1) = (f64::from(ratio[0]).ln(), f64::from(ratio[1]).ln());
            for _ in 0..10 {
                let target = area * f64::from(uniform(rng, scale[0], scale[1]));
                let aspect = if lr1 > lr0 {
                    rng.gen_range(lr0..=lr1).exp()
                } else {
                    lr0.exp()
                };
                let cw = (target * aspect).sqrt().round() as u32;
                let ch = (target / aspect).sqrt().round() as u32;
                if cw > 0 && ch > 0 && cw <= w && ch <= h {
                    if (cw, ch) == (w, h) {
                        return Vec::new();
                    }
                    let x = rng.gen_range(0..=w - cw);
                    let y = rng.gen_range(0..=h - ch);
                    return vec![Step::Crop {
                        x,
                        y,
                        width: cw,
                        height: ch,
                    }];
                }
            }
            // torchvision's fallback: the centre crop with the ratio clamped into range.
            let in_ratio = f64::from(w) / f64::from(h);
            let (cw, ch) = if in_ratio < f64::from(ratio[0]) {
                (
                    w,
                    ((f64::from(w) / f64::from(ratio[0])).round() as u32).clamp(1, h),
                )
            } else if in_ratio > f64::from(ratio[1]) {
                (
                    ((f64::from(h) * f64::from(ratio[1])).round() as u32).clamp(1, w),
                    h,
                )
            } else {
                (w, h)
            };
            if (cw, ch) == (w, h) {
                return Vec::new();
            }
            vec![Step::Crop {
                x: (w - cw) / 2,
                y: (h - ch) / 2,
                width: cw,
                height: ch,
            }]
        }
        Transform::Flip { direction, p } => {
            if rng.gen::<f32>() < p {
                vec![Step::Flip { direction }]
            } else {
                Vec::new()
            }
        }
        Transform::Rotate { degrees, fill } => {
            let d = uniform(rng, -degrees, degrees);
            if d == 0.0 {
                Vec::new()
            } else {
                vec![Step::Rotate { degrees: d, fill }]
            }
        }
        Transform::ColorJitter {
            brightness,
            contrast,
            saturation,
            hue,
        } => {
            let factor = |rng: &mut _, x: f32| uniform(rng, (1.0 - x).max(0.0), 1.0 + x);
            let step = Step::ColorJitter {
                brightness: factor(rng, brightness),
                contrast: factor(rng, contrast),
                saturation: factor(rng, saturation),
                hue: uniform(rng, -hue, hue),
            };
            if step
                == (Step::ColorJitter {
                    brightness: 1.0,
                    contrast: 1.0,
                    saturation: 1.0,
                    hue: 0.0,
                })
            {
                Vec::new()
            } else {
                vec![step]
            }
        }
        Transform::Blur { sigma, p } => {
            if rng.gen::<f32>() < p {
                let s = uniform(rng, sigma[0], sigma[1]);
                if s > 0.0 {
                    return vec![Step::Blur { sigma: s }];
                }
            }
            Vec::new()
        }
        Transform::Jpeg { quality } => vec![Step::Jpeg {
            quality: rng.gen_range(quality[0]..=quality[1]),
        }],
    }
}

/// Applies one step.
pub fn apply(img: RgbImage, step: &Step) -> Result<RgbImage, OpError> {
    match *step {
        Step::Resize { width, height } => resize(&img, width, height),
        Step::Crop {
            x,
            y,
            width,
            height,
        } => crop(&img, x, y, width, height),
        Step::Pad {
            width,
            height,
            x,
            y,
            color,
        } => pad(&img, width, height, x, y, color),
        Step::Flip { direction } => Ok(match direction {
            FlipDirection::Horizontal => image::imageops::flip_horizontal(&img),
            FlipDirection::Vertical => image::imageops::flip_vertical(&img),
        }),
        Step::Rotate { degrees, fill } => Ok(rotate(&img, degrees, fill)),
        Step::ColorJitter {
            brightness,
            contrast,
            saturation,
            hue,
        } => Ok(color_jitter(img, brightness, contrast, saturation, hue)),
        Step::Blur { sigma } => Ok(gaussian_blur(&img, sigma)),
        Step::Jpeg { quality } => jpeg_round_trip(&img, quality),
    }
}

/// Applies steps in order.
pub fn apply_all(mut img: RgbImage, steps: &[Step]) -> Result<RgbImage, OpError> {
    for s in steps {
        img = apply(img, s)?;
    }
    Ok(img)
}

/// Lanczos3 resize (fixed-point, SIMD where the CPU has it).
pub fn resize(img: &RgbImage, width: u32, height: u32) -> Result<RgbImage, OpError> {
    resize_with(img, width, height, None)
}

/// [`resize`] on a chosen CPU extension (tests compare the paths).
pub fn resize_with(
    img: &RgbImage,
    width: u32,
    height: u32,
    cpu: Option<fr::CpuExtensions>,
) -> Result<RgbImage, OpError> {
    let err = |message: String| OpError::Resize {
        width,
        height,
        message,
    };
    if width == 0
        || height == 0
        || width > atelier_contracts::augment::MAX_SIDE
        || height > atelier_contracts::augment::MAX_SIDE
    {
        return Err(err(format!(
            "sides must be 1 to {}",
            atelier_contracts::augment::MAX_SIDE
        )));
    }
    if (width, height) == img.dimensions() {
        return Ok(img.clone());
    }
    let src =
        fr::images::ImageRef::new(img.width(), img.height(), img.as_raw(), fr::PixelType::U8x3)
            .map_err(|e| err(e.to_string()))?;
    let mut dst = fr::images::Image::new(width, height, fr::PixelType::U8x3);
    let mut resizer = fr::Resizer::new();
    if let Some(cpu) = cpu {
        if !cpu.is_supported() {
            return Err(err(format!("{cpu:?} is not supported by this CPU")));
        }
        // SAFETY: the extension was checked above to be supported by this CPU.
        unsafe { resizer.set_cpu_extensions(cpu) };
    }
    let opts =
        fr::ResizeOptions::new().resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Lanczos3));
    resizer
        .resize(&src, &mut dst, &opts)
        .map_err(|e| err(e.to_string()))?;
    RgbImage::from_raw(width, height, dst.into_vec()).ok_or_else(|| err("buffer size".into()))
}

pub fn crop(img: &RgbImage, x: u32, y: u32, width: u32, height: u32) -> Result<RgbImage, OpError> {
    let (iw, ih) = img.dimensions();
    if width == 0
        || height == 0
        || x.checked_add(width).is_none_or(|r| r > iw)
        || y.checked_add(height).is_none_or(|b| b > ih)
    {
        return Err(OpError::Crop {
            x,
            y,
            width,
            height,
            iw,
            ih,
        });
    }
    Ok(image::imageops::crop_imm(img, x, y, width, height).to_image())
}

fn pad(
    img: &RgbImage,
    width: u32,
    height: u32,
    x: u32,
    y: u32,
    color: [u8; 3],
) -> Result<RgbImage, OpError> {
    let (iw, ih) = img.dimensions();
    if x.saturating_add(iw) > width
        || y.saturating_add(ih) > height
        || width > atelier_contracts::augment::MAX_SIDE
        || height > atelier_contracts::augment::MAX_SIDE
    {
        return Err(OpError::Size {
            width,
            height,
            why: format!("a {iw}x{ih} image does not fit at ({x}, {y})"),
        });
    }
    let mut out = RgbImage::from_pixel(width, height, image::Rgb(color));
    image::imageops::replace(&mut out, img, i64::from(x), i64::from(y));
    Ok(out)
}

/// Rotation by `degrees` counter-clockwise about the centre, same size, bilinear; outside
/// the source is `fill`.
pub fn rotate(img: &RgbImage, degrees: f32, fill: [u8; 3]) -> RgbImage {
    let (w, h) = img.dimensions();
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let src = img.as_raw();
    let fill_f = fill.map(f32::from);
    let px = |x: i64, y: i64| -> [f32; 3] {
        if x < 0 || y < 0 || x >= i64::from(w) || y >= i64::from(h) {
            fill_f
        } else {
            let i = (y as usize * w as usize + x as usize) * 3;
            [src[i] as f32, src[i + 1] as f32, src[i + 2] as f32]
        }
    };
    let mut out = vec![0u8; src.len()];
    for y in 0..h {
        for x in 0..w {
            let dx = x as f32 + 0.5 - cx;
            let dy = y as f32 + 0.5 - cy;
            // Where this output pixel's centre was before the rotation, in pixel-centre units.
            let sx = dx * cos - dy * sin + cx - 0.5;
            let sy = dx * sin + dy * cos + cy - 0.5;
            let (x0, y0) = (sx.floor(), sy.floor());
            let (tx, ty) = (sx - x0, sy - y0);
            let (x0, y0) = (x0 as i64, y0 as i64);
            let (a, b, c, d) = (
                px(x0, y0),
                px(x0 + 1, y0),
                px(x0, y0 + 1),
                px(x0 + 1, y0 + 1),
            );
            let o = (y as usize * w as usize + x as usize) * 3;
            for k in 0..3 {
                let top = a[k] + (b[k] - a[k]) * tx;
                let bottom = c[k] + (d[k] - c[k]) * tx;
                out[o + k] = (top + (bottom - top) * ty).round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage::from_raw(w, h, out).unwrap_or_else(|| img.clone())
}

fn luma(p: &[u8]) -> f32 {
    0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32
}

fn to_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

/// torchvision's ColorJitter on 8-bit images: brightness, contrast (about the mean grey),
/// saturation (about each pixel's grey), hue (an HSV rotation), each rounded to 8 bits.
pub fn color_jitter(
    mut img: RgbImage,
    brightness: f32,
    contrast: f32,
    saturation: f32,
    hue: f32,
) -> RgbImage {
    if brightness != 1.0 {
        for v in img.iter_mut() {
            *v = to_u8(*v as f32 * brightness);
        }
    }
    if contrast != 1.0 {
        let n = (img.len() / 3).max(1) as f64;
        let mean = (img.chunks_exact(3).map(|p| f64::from(luma(p))).sum::<f64>() / n) as f32;
        for v in img.iter_mut() {
            *v = to_u8((*v as f32 - mean) * contrast + mean);
        }
    }
    if saturation != 1.0 {
        for p in img.chunks_exact_mut(3) {
            let g = luma(p);
            for v in p.iter_mut() {
                *v = to_u8((*v as f32 - g) * saturation + g);
            }
        }
    }
    if hue != 0.0 {
        for p in img.chunks_exact_mut(3) {
            let [r, g, b] = [p[0] as f32, p[1] as f32, p[2] as f32];
            let max = r.max(g).max(b);
            let min = r.min(g).min(b);
            let delta = max - min;
            if delta == 0.0 {
                continue;
            }
            let mut hh = if max == r {
                ((g - b) / delta).rem_euclid(6.0)
            } else if max == g {
                (b - r) / delta + 2.0
            } else {
                (r - g) / delta + 4.0
            } / 6.0;
            hh = (hh + hue).rem_euclid(1.0);
            let s = delta / max;
            let v = max;
            let h6 = hh * 6.0;
            let i = (h6.floor() as i32).rem_euclid(6);
            let f = h6 - h6.floor();
            let pp = v * (1.0 - s);
            let q = v * (1.0 - s * f);
            let t = v * (1.0 - s * (1.0 - f));
            let (r, g, b) = match i {
                0 => (v, t, pp),
                1 => (q, v, pp),
                2 => (pp, v, t),
                3 => (pp, q, v),
                4 => (t, pp, v),
                _ => (v, pp, q),
            };
            p[0] = to_u8(r);
            p[1] = to_u8(g);
            p[2] = to_u8(b);
        }
    }
    img
}

/// A separable Gaussian blur, kernel radius ⌈3σ⌉, reflected edges (torchvision's padding).
pub fn gaussian_blur(img: &RgbImage, sigma: f32) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let radius = (3.0 * sigma).ceil() as usize;
    if radius == 0 || w == 0 || h == 0 {
        return img.clone();
    }
    let mut kernel: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let d = i as f32 - radius as f32;
            (-(d * d) / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let sum: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= sum);
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        if n == 1 {
            return 0;
        }
        let period = 2 * (n - 1);
        let m = i.rem_euclid(period);
        (if m < n { m } else { period - m }) as usize
    };
    let src = img.as_raw();
    let mut tmp = vec![0f32; w * h * 3];
    for y in 0..h {
        let row = &src[y * w * 3..(y + 1) * w * 3];
        for x in 0..w {
            let mut acc = [0f32; 3];
            for (k, kv) in kernel.iter().enumerate() {
                let sx = reflect(x as isize + k as isize - radius as isize, w);
                for c in 0..3 {
                    acc[c] += kv * row[sx * 3 + c] as f32;
                }
            }
            tmp[(y * w + x) * 3..(y * w + x) * 3 + 3].copy_from_slice(&acc);
        }
    }
    let mut out = vec![0u8; w * h * 3];
    for y in 0..h {
        for x in 0..w {
            let mut acc = [0f32; 3];
            for (k, kv) in kernel.iter().enumerate() {
                let sy = reflect(y as isize + k as isize - radius as isize, h);
                let i = (sy * w + x) * 3;
                for c in 0..3 {
                    acc[c] += kv * tmp[i + c];
                }
            }
            for c in 0..3 {
                out[(y * w + x) * 3 + c] = to_u8(acc[c]);
            }
        }
    }
    RgbImage::from_raw(w as u32, h as u32, out).unwrap_or_else(|| img.clone())
}

/// Encodes as JPEG at `quality`.
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, OpError> {
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .encode_image(img)
        .map_err(|e| OpError::Jpeg(e.to_string()))?;
    Ok(buf)
}

/// Encodes as PNG.
pub fn encode_png(img: &RgbImage) -> Result<Vec<u8>, OpError> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .map_err(|e| OpError::Jpeg(format!("PNG: {e}")))?;
    Ok(buf.into_inner())
}

fn jpeg_round_trip(img: &RgbImage, quality: u8) -> Result<RgbImage, OpError> {
    let bytes = encode_jpeg(img, quality)?;
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
        .map(|d| d.to_rgb8())
        .map_err(|e| OpError::Jpeg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn test_image(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 255 / w.max(1)) as u8,
                (y * 255 / h.max(1)) as u8,
                ((x * 7 + y * 13) % 256) as u8,
            ])
        })
    }

    fn rng(n: u64) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(n)
    }

    #[test]
    fn resize_modes_match_img2dataset_geometry() {
        let r = |mode, w, h| {
            let t = Transform::Resize {
                size: 64,
                mode,
                only_if_bigger: false,
                border_color: [255; 3],
            };
            let steps = plan(&[t], w, h, &mut rng(0));
            let mut size = (w, h);
            for s in &steps {
                size = output_size(s, size.0, size.1);
            }
            (steps, size)
        };
        assert_eq!(r(ResizeMode::KeepRatio, 200, 100).1, (128, 64));
        assert_eq!(r(ResizeMode::KeepRatioLargest, 200, 100).1, (64, 32));
        let (steps, size) = r(ResizeMode::CenterCrop, 200, 100);
        assert_eq!(size, (64, 64));
        assert_eq!(
            steps,
            vec![
                Step::Resize {
                    width: 128,
                    height: 64
                },
                Step::Crop {
                    x: 32,
                    y: 0,
                    width: 64,
                    height: 64
                }
            ]
        );
        let (steps, size) = r(ResizeMode::Border, 100, 200);
        assert_eq!(size, (64, 64));
        assert!(matches!(steps[1], Step::Pad { x: 16, y: 0, .. }));
        // Pixels follow the plan.
        let img = apply_all(test_image(100, 200), &steps).unwrap();
        assert_eq!(img.dimensions(), (64, 64));
        assert_eq!(img.get_pixel(0, 10).0, [255, 255, 255], "left border");
        assert_ne!(img.get_pixel(32, 32).0, [255, 255, 255]);
        // Small images stay when only bigger ones are resized.
        let t = Transform::Resize {
            size: 64,
            mode: ResizeMode::KeepRatio,
            only_if_bigger: true,
            border_color: [0; 3],
        };
        assert!(plan(&[t], 40, 30, &mut rng(0)).is_empty());
    }

    #[test]
    fn same_seed_same_bytes_and_steps_replay() {
        let chain: Vec<Transform> = serde_json::from_value(serde_json::json!([
            {"op": "random_crop", "scale": [0.3, 0.9]},
            {"op": "resize", "size": 48},
            {"op": "flip", "p": 0.5},
            {"op": "rotate", "degrees": 20},
            {"op": "color_jitter", "brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.1},
            {"op": "blur", "sigma": [0.5, 1.5]},
            {"op": "jpeg", "quality": [40, 80]}
        ]))
        .unwrap();
        let img = test_image(120, 90);
        let run = |seed| {
            let steps = plan(&chain, 120, 90, &mut rng(seed));
            let out = apply_all(img.clone(), &steps).unwrap();
            (steps, encode_jpeg(&out, 95).unwrap())
        };
        let (s1, b1) = run(7);
        let (s2, b2) = run(7);
        assert_eq!(s1, s2);
        assert_eq!(b1, b2, "same seed, same bytes");
        let (s3, b3) = run(8);
        assert_ne!(s1, s3);
        assert_ne!(b1, b3);
        // The recorded steps, through JSON, rebuild the same image.
        let json = serde_json::to_string(&s1).unwrap();
        let back: Vec<Step> = serde_json::from_str(&json).unwrap();
        let replayed = apply_all(img.clone(), &back).unwrap();
        assert_eq!(encode_jpeg(&replayed, 95).unwrap(), b1);
    }

    #[test]
    fn random_crops_stay_inside_and_respect_the_area() {
        let t = Transform::RandomCrop {
            scale: [0.25, 0.5],
            ratio: [0.75, 1.333],
        };
        for seed in 0..200 {
            let steps = plan(std::slice::from_ref(&t), 300, 200, &mut rng(seed));
            let Step::Crop {
                x,
                y,
                width,
                height,
            } = steps[0]
            else {
                panic!("{steps:?}")
            };
            assert!(x + width <= 300 && y + height <= 200);
            let frac = f64::from(width * height) / 60_000.0;
            assert!((0.24..=0.51).contains(&frac), "{frac}");
        }
    }

    #[test]
    fn flips_rotations_and_colour_do_what_they_say() {
        let img = test_image(40, 30);
        let f = apply(
            img.clone(),
            &Step::Flip {
                direction: FlipDirection::Horizontal,
            },
        )
        .unwrap();
        assert_eq!(f.get_pixel(0, 5), img.get_pixel(39, 5));
        // 180° is a flip in both directions (up to interpolation at exact centres: none here).
        let r = rotate(&img, 180.0, [0; 3]);
        for (x, y) in [(0, 0), (5, 7), (39, 29)] {
            let want = img.get_pixel(39 - x, 29 - y).0;
            let got = r.get_pixel(x, y).0;
            for c in 0..3 {
                assert!(
                    (want[c] as i32 - got[c] as i32).abs() <= 1,
                    "{want:?} {got:?}"
                );
            }
        }
        // A small rotation fills the corners.
        let r = rotate(&img, 30.0, [1, 2, 3]);
        assert_eq!(r.get_pixel(0, 0).0, [1, 2, 3]);
        // Brightness 0 is black; saturation 0 is grey; a full hue turn changes nothing.
        let dark = color_jitter(img.clone(), 0.0, 1.0, 1.0, 0.0);
        assert!(dark.iter().all(|v| *v == 0));
        let grey = color_jitter(img.clone(), 1.0, 1.0, 0.0, 0.0);
        assert!(grey
            .pixels()
            .all(|p| (p.0[0] as i32 - p.0[1] as i32).abs() <= 1
                && (p.0[1] as i32 - p.0[2] as i32).abs() <= 1));
        let red = RgbImage::from_pixel(2, 2, image::Rgb([200, 10, 10]));
        let shifted = color_jitter(red, 1.0, 1.0, 1.0, 1.0 / 3.0);
        assert_eq!(
            shifted.get_pixel(0, 0).0,
            [10, 200, 10],
            "red + 120° = green"
        );
    }

    #[test]
    fn blur_keeps_flat_images_and_smooths_edges() {
        let flat = RgbImage::from_pixel(9, 7, image::Rgb([10, 100, 200]));
        assert_eq!(gaussian_blur(&flat, 2.0), flat);
        let edge = RgbImage::from_fn(20, 4, |x, _| {
            image::Rgb(if x < 10 { [0; 3] } else { [255; 3] })
        });
        let b = gaussian_blur(&edge, 1.5);
        let v9 = b.get_pixel(9, 0).0[0];
        let v10 = b.get_pixel(10, 0).0[0];
        assert!(v9 > 40 && v9 < 128 && v10 > 128 && v10 < 215, "{v9} {v10}");
    }

    #[test]
    fn resize_is_the_same_on_every_cpu_path() {
        let img = test_image(97, 61);
        let base = resize_with(&img, 40, 23, Some(fr::CpuExtensions::None)).unwrap();
        #[cfg(target_arch = "x86_64")]
        for cpu in [fr::CpuExtensions::Sse4_1, fr::CpuExtensions::Avx2] {
            if cpu.is_supported() {
                let got = resize_with(&img, 40, 23, Some(cpu)).unwrap();
                assert_eq!(got, base, "{cpu:?}");
                let up = resize_with(&img, 150, 130, Some(cpu)).unwrap();
                assert_eq!(
                    up,
                    resize_with(&img, 150, 130, Some(fr::CpuExtensions::None)).unwrap(),
                    "{cpu:?} upscale"
                );
            }
        }
        assert_eq!(resize(&img, 40, 23).unwrap(), base);
    }

    #[test]
    fn bad_geometry_is_an_error() {
        let img = test_image(10, 10);
        assert!(crop(&img, 5, 5, 6, 1).is_err());
        assert!(crop(&img, 0, 0, 0, 1).is_err());
        assert!(resize(&img, 0, 4).is_err());
        assert!(apply(
            img,
            &Step::Pad {
                width: 8,
                height: 20,
                x: 0,
                y: 0,
                color: [0; 3]
            }
        )
        .is_err());
    }
}
