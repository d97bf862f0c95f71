//! Generated sample images for the demo and the tests: a coloured background with a few shapes,
//! deterministic from a seed (no weights or data sets can be downloaded here).

use std::io::Cursor;

use image::{DynamicImage, ImageBuffer, ImageFormat, Rgb, RgbImage};

const COLOURS: [[u8; 3]; 6] = [
    [220, 40, 40],
    [40, 160, 60],
    [40, 80, 220],
    [240, 200, 40],
    [250, 250, 250],
    [30, 30, 30],
];

/// A `w`×`h` scene: background, one disc and one rectangle, placed and coloured by `seed`.
pub fn scene(seed: u64, w: u32, h: u32) -> RgbImage {
    let pick = |k: u64| {
        COLOURS
            [((seed.wrapping_mul(2654435761).wrapping_add(k * 97)) % COLOURS.len() as u64) as usize]
    };
    let (bg, disc, rect) = (pick(0), pick(1), pick(2));
    let (cx, cy) = ((seed * 37 % w as u64) as f32, (seed * 53 % h as u64) as f32);
    let r = (w.min(h) / 4) as f32;
    let (rx, ry) = (
        (seed * 71 % w as u64) as u32 / 2,
        (seed * 29 % h as u64) as u32 / 2,
    );
    ImageBuffer::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let c = if (fx - cx).powi(2) + (fy - cy).powi(2) <= r * r {
            disc
        } else if x >= rx && x < rx + w / 3 && y >= ry && y < ry + h / 4 {
            rect
        } else {
            bg
        };
        Rgb(c)
    })
}

/// [`scene`] encoded in `format`.
pub fn scene_bytes(seed: u64, w: u32, h: u32, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(scene(seed, w, h))
        .write_to(&mut out, format)
        .expect("encoding an in-memory image cannot fail");
    out.into_inner()
}

const NAMES: [&str; 6] = ["red", "green", "blue", "yellow", "white", "black"];

/// Ground-truth captions of [`scene`]`(seed, ..)`: five phrasings (as COCO has five references
/// per image) naming the background, disc and rectangle colours.
pub fn scene_captions(seed: u64) -> Vec<String> {
    let pick = |k: u64| {
        NAMES[((seed.wrapping_mul(2654435761).wrapping_add(k * 97)) % NAMES.len() as u64) as usize]
    };
    let (bg, disc, rect) = (pick(0), pick(1), pick(2));
    vec![
        format!("a {disc} circle and a {rect} rectangle on a {bg} background"),
        format!("a {rect} rectangle and a {disc} circle on a plain {bg} background"),
        format!("a {bg} background with a {disc} disc and a {rect} rectangle"),
        format!("the image shows a {disc} circle and a {rect} rectangle over a {bg} background"),
        format!("simple shapes: a {disc} round disc and a {rect} box on {bg}"),
    ]
}
