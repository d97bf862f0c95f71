//! What ingest learns from an image's bytes: format, dimensions after EXIF orientation, the EXIF
//! orientation applied, and a perceptual hash — or, for bytes that are not a usable image, the
//! reason, so the record is flagged instead of the batch failing.
//!
//! Decoding is guarded by `atelier-decode`: the header's dimensions are checked against a pixel
//! limit before any pixel is decoded (a decompression bomb is a few KiB on disk), the decoder runs
//! with an allocation limit (ancillary chunks included), and the decode draws on the process's
//! decode-memory budget. GIFs are analysed by their first frame.

use atelier_decode::{DecodeError, Limits};
use image::{DynamicImage, ImageFormat};

/// PIL's default bomb threshold (2 × 89,478,485), which our users' tools already apply.
pub const DEFAULT_MAX_PIXELS: u64 = atelier_decode::DEFAULT_MAX_PIXELS;

#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    /// `jpeg`, `png`, `webp`, `bmp`, `tiff`, `gif`.
    pub format: String,
    /// After the EXIF orientation is applied.
    pub width: u32,
    pub height: u32,
    /// The EXIF orientation (1–8) that was applied; 1 when none was present.
    pub exif_orientation: u8,
    /// 64-bit DCT perceptual hash, 16 hex digits (Hamming distance ≈ visual difference).
    pub phash: String,
}

/// Why bytes were not accepted as an image; the text goes into the record's `flag`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Rejected {
    #[error("unknown_format: not a JPEG, PNG, WebP, BMP, TIFF or GIF")]
    UnknownFormat,
    #[error("decompression_bomb: {0}")]
    Bomb(DecodeError),
    #[error("too_large: {0}")]
    TooLarge(DecodeError),
    #[error("corrupt: {0}")]
    Corrupt(String),
}

impl From<DecodeError> for Rejected {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::UnknownFormat => Self::UnknownFormat,
            DecodeError::TooManyPixels { .. } => Self::Bomb(e),
            DecodeError::TooManyBytes { .. } | DecodeError::OverBudget { .. } => Self::TooLarge(e),
            DecodeError::Corrupt(why) => Self::Corrupt(why),
        }
    }
}

fn format_name(f: ImageFormat) -> Option<&'static str> {
    Some(match f {
        ImageFormat::Jpeg => "jpeg",
        ImageFormat::Png => "png",
        ImageFormat::WebP => "webp",
        ImageFormat::Bmp => "bmp",
        ImageFormat::Tiff => "tiff",
        ImageFormat::Gif => "gif",
        _ => return None,
    })
}

/// MIME type of a format name from [`ImageInfo::format`].
pub fn content_type(format: &str) -> &'static str {
    match format {
        "jpeg" => "image/jpeg",
        "png" => "image/png",
        "webp" => "image/webp",
        "bmp" => "image/bmp",
        "tiff" => "image/tiff",
        "gif" => "image/gif",
        _ => "application/octet-stream",
    }
}

pub fn analyze(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, Rejected> {
    let limits = Limits::default().with_max_pixels(max_pixels);
    let header = atelier_decode::header(bytes, &limits)?;
    let format = format_name(header.format).ok_or(Rejected::UnknownFormat)?;
    // Decoders accept a file cut off mid-scan; its container must reach the format's end.
    if let Some(why) = crate::complete::incomplete(bytes, format) {
        return Err(Rejected::Corrupt(why));
    }
    let (img, exif_orientation) = atelier_decode::decode_checked(bytes, &header, true)?;
    Ok(ImageInfo {
        format: format.to_owned(),
        width: img.width(),
        height: img.height(),
        exif_orientation,
        phash: format!("{:016x}", phash(&img)),
    })
}

/// DCT perceptual hash: 32×32 grey, 2-D DCT-II, the 8×8 lowest frequencies, each bit set when the
/// coefficient is above their median (the DC term excluded from the median).
pub fn phash(img: &DynamicImage) -> u64 {
    const S: usize = 32;
    let grey = img
        .resize_exact(S as u32, S as u32, image::imageops::FilterType::Triangle)
        .to_luma32f();
    let px: Vec<f32> = grey.pixels().map(|p| p.0[0]).collect();
    let cos: Vec<f32> = (0..8 * S)
        .map(|i| {
            let (u, x) = (i / S, i % S);
            (std::f32::consts::PI * (2 * x + 1) as f32 * u as f32 / (2 * S) as f32).cos()
        })
        .collect();
    let mut coeffs = [0f32; 64];
    for u in 0..8 {
        for v in 0..8 {
            let mut sum = 0f32;
            for y in 0..S {
                let cy = cos[v * S + y];
                for x in 0..S {
                    sum += px[y * S + x] * cos[u * S + x] * cy;
                }
            }
            coeffs[v * 8 + u] = sum;
        }
    }
    let mut rest: Vec<f32> = coeffs[1..].to_vec();
    rest.sort_by(|a, b| a.total_cmp(b));
    let median = rest[rest.len() / 2];
    coeffs
        .iter()
        .enumerate()
        .fold(0u64, |h, (i, &c)| if c > median { h | (1 << i) } else { h })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageBuffer, Rgb, RgbImage};

    fn scene(w: u32, h: u32, seed: u32) -> RgbImage {
        ImageBuffer::from_fn(w, h, |x, y| {
            let v = ((x * 7 + y * 3 + seed * 40) % 256) as u8;
            let block = if (x / 8 + y / 8 + seed).is_multiple_of(2) {
                255
            } else {
                0
            };
            Rgb([v, block, 255 - v])
        })
    }

    fn encode(img: &RgbImage, f: ImageFormat) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        DynamicImage::ImageRgb8(img.clone())
            .write_to(&mut out, f)
            .unwrap();
        out.into_inner()
    }

    /// A JPEG with an APP1 EXIF segment carrying only the orientation tag.
    fn jpeg_with_orientation(img: &RgbImage, orientation: u16) -> Vec<u8> {
        let jpeg = encode(img, ImageFormat::Jpeg);
        let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
        tiff.extend_from_slice(&1u16.to_be_bytes()); // one IFD entry
        tiff.extend_from_slice(&0x0112u16.to_be_bytes()); // Orientation
        tiff.extend_from_slice(&3u16.to_be_bytes()); // SHORT
        tiff.extend_from_slice(&1u32.to_be_bytes()); // count
        tiff.extend_from_slice(&orientation.to_be_bytes());
        tiff.extend_from_slice(&[0, 0]);
        tiff.extend_from_slice(&0u32.to_be_bytes()); // no next IFD
        let mut app1 = b"Exif\0\0".to_vec();
        app1.extend_from_slice(&tiff);
        let mut out = jpeg[..2].to_vec(); // SOI
        out.extend_from_slice(&[0xFF, 0xE1]);
        out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(&app1);
        out.extend_from_slice(&jpeg[2..]);
        out
    }

    #[test]
    fn every_supported_format_is_read() {
        let img = scene(40, 24, 1);
        for (f, name) in [
            (ImageFormat::Png, "png"),
            (ImageFormat::Jpeg, "jpeg"),
            (ImageFormat::Gif, "gif"),
            (ImageFormat::Bmp, "bmp"),
            (ImageFormat::Tiff, "tiff"),
            (ImageFormat::WebP, "webp"),
        ] {
            let info = analyze(&encode(&img, f), DEFAULT_MAX_PIXELS)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(
                (
                    info.format.as_str(),
                    info.width,
                    info.height,
                    info.exif_orientation
                ),
                (name, 40, 24, 1)
            );
        }
    }

    #[test]
    fn exif_orientation_is_applied() {
        let img = scene(40, 24, 2);
        let info = analyze(&jpeg_with_orientation(&img, 6), DEFAULT_MAX_PIXELS).unwrap();
        assert_eq!(
            (info.width, info.height, info.exif_orientation),
            (24, 40, 6)
        );
    }

    #[test]
    fn bombs_truncation_and_garbage_are_rejected_with_reasons() {
        let png = encode(&scene(64, 64, 3), ImageFormat::Png);
        assert!(matches!(
            analyze(&png, 1000),
            Err(Rejected::Bomb(atelier_decode::DecodeError::TooManyPixels {
                width: 64,
                height: 64,
                pixels: 4096,
                limit: 1000
            }))
        ));
        let cut = &png[..png.len() / 2];
        let e = analyze(cut, DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(matches!(e, Rejected::Corrupt(_)), "{e:?}");
        // Cut anywhere after the header, every format is flagged as truncated (decoders alone
        // fill a cut JPEG with grey, and stop reading a PNG once its pixels are in).
        for f in [
            ImageFormat::Jpeg,
            ImageFormat::Png,
            ImageFormat::Gif,
            ImageFormat::WebP,
        ] {
            let whole = encode(&scene(64, 48, 5), f);
            assert!(analyze(&whole, DEFAULT_MAX_PIXELS).is_ok(), "{f:?}");
            for keep in [whole.len() - 1, whole.len() * 9 / 10, whole.len() * 2 / 3] {
                let e = analyze(&whole[..keep], DEFAULT_MAX_PIXELS).unwrap_err();
                assert!(
                    e.to_string().starts_with("corrupt: "),
                    "{f:?} at {keep}: {e}"
                );
            }
        }
        let jpeg = encode(&scene(64, 48, 5), ImageFormat::Jpeg);
        let e = analyze(&jpeg[..jpeg.len() * 2 / 3], DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(e.to_string().contains("truncated JPEG"), "{e}");
        assert_eq!(
            analyze(b"definitely not an image", DEFAULT_MAX_PIXELS).unwrap_err(),
            Rejected::UnknownFormat
        );
        assert!(analyze(&[], DEFAULT_MAX_PIXELS).is_err());
    }

    #[test]
    fn perceptual_hash_is_stable_under_reencoding_and_differs_between_scenes() {
        let a = scene(64, 64, 4);
        let pa = analyze(&encode(&a, ImageFormat::Png), DEFAULT_MAX_PIXELS)
            .unwrap()
            .phash;
        let pj = analyze(&encode(&a, ImageFormat::Jpeg), DEFAULT_MAX_PIXELS)
            .unwrap()
            .phash;
        let pb = analyze(
            &encode(&scene(64, 64, 5), ImageFormat::Png),
            DEFAULT_MAX_PIXELS,
        )
        .unwrap()
        .phash;
        let dist = |x: &str, y: &str| {
            (u64::from_str_radix(x, 16).unwrap() ^ u64::from_str_radix(y, 16).unwrap()).count_ones()
        };
        assert!(
            dist(&pa, &pj) <= 6,
            "PNG vs JPEG of the same image differ by {}",
            dist(&pa, &pj)
        );
        assert!(
            dist(&pa, &pb) >= 12,
            "different scenes differ by only {}",
            dist(&pa, &pb)
        );
    }
}
