//! A model upscaler run tile by tile on A1111's grid (`split_grid` / `combine_grid`): tiles of
//! `tile` pixels spread evenly with at least `overlap` pixels shared; the upscaled tiles pasted
//! back in order, each one's first `overlap`·scale columns (then rows) faded in over what is
//! there with a linear mask, the rest pasted over it. A side no longer than a tile runs whole.

use image::RgbImage;

use crate::Model;

/// A1111's defaults (`ESRGAN_tile`, `ESRGAN_tile_overlap`).
pub const TILE: u32 = 192;
pub const OVERLAP: u32 = 8;

/// Where tiles start along a side of `len` pixels.
pub fn positions(len: u32, tile: u32, overlap: u32) -> Vec<u32> {
    if len <= tile {
        return vec![0];
    }
    let step = tile - overlap;
    let n = (len - overlap).div_ceil(step);
    let d = match n {
        0 | 1 => 0.0,
        n => (len - tile) as f64 / (n - 1) as f64,
    };
    (0..n)
        .map(|i| ((i as f64 * d) as u32).min(len - tile))
        .collect()
}

/// `model` over `img` tile by tile.
pub fn tiled(
    model: &dyn Model,
    img: &RgbImage,
    tile: u32,
    overlap: u32,
) -> Result<RgbImage, String> {
    let (w, h) = img.dimensions();
    if w <= tile && h <= tile {
        return model.run(img);
    }
    let (tw, th) = (tile.min(w), tile.min(h));
    let mut rows = Vec::new();
    let mut scale = None;
    for y in positions(h, tile, overlap) {
        let mut row = Vec::new();
        for x in positions(w, tile, overlap) {
            let piece = image::imageops::crop_imm(img, x, y, tw, th).to_image();
            let out = model.run(&piece)?;
            let s = out.width() / tw;
            if s == 0 || out.dimensions() != (tw * s, th * s) || scale.is_some_and(|k| k != s) {
                return Err(format!(
                    "the model made a {}x{} tile of a {tw}x{th} one",
                    out.width(),
                    out.height()
                ));
            }
            scale = Some(s);
            row.push((x * s, out));
        }
        rows.push((y, row));
    }
    let s = scale.unwrap_or(1);
    let ov = overlap * s;
    let mut canvas = RgbImage::new(w * s, h * s);
    for (i, (y, row)) in rows.into_iter().enumerate() {
        let mut strip = RgbImage::new(w * s, th * s);
        for (j, (x, t)) in row.into_iter().enumerate() {
            paste(&mut strip, &t, x, 0, (j > 0).then_some(ov), false);
        }
        paste(&mut canvas, &strip, 0, y * s, (i > 0).then_some(ov), true);
    }
    Ok(canvas)
}

/// `src` onto `dst` at (x, y); with `fade`, its first `fade` columns (rows when `vertical`)
/// blended in with alpha ⌊k·255 / fade⌋ as PIL's paste with a mask blends.
fn paste(dst: &mut RgbImage, src: &RgbImage, x: u32, y: u32, fade: Option<u32>, vertical: bool) {
    for (sx, sy, p) in src.enumerate_pixels() {
        let (dx, dy) = (x + sx, y + sy);
        if dx >= dst.width() || dy >= dst.height() {
            continue;
        }
        let k = if vertical { sy } else { sx };
        let q = dst.get_pixel_mut(dx, dy);
        match fade.filter(|f| k < *f) {
            Some(f) => {
                let a = (k as u64 * 255 / f as u64) as i32;
                for c in 0..3 {
                    q[c] = blend(q[c], p[c], a);
                }
            }
            None => *q = *p,
        }
    }
}

/// PIL's `BLEND`: `dst + (src − dst)·a/255`, rounded as PIL rounds.
fn blend(dst: u8, src: u8, a: i32) -> u8 {
    let t = (src as i32 - dst as i32) * a + dst as i32 * 255 + 128;
    ((t + (t >> 8)) >> 8).clamp(0, 255) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nearest2;
    impl Model for Nearest2 {
        fn scale(&self) -> u32 {
            2
        }
        fn run(&self, img: &RgbImage) -> Result<RgbImage, String> {
            let (w, h) = img.dimensions();
            Ok(image::imageops::resize(
                img,
                w * 2,
                h * 2,
                image::imageops::FilterType::Nearest,
            ))
        }
    }

    #[test]
    fn tiles_spread_as_a1111s_grid() {
        // 500 px, 192-px tiles, 8 shared: ⌈492 / 184⌉ = 3 tiles, 154 px apart.
        assert_eq!(positions(500, 192, 8), [0, 154, 308]);
        assert_eq!(positions(192, 192, 8), [0]);
        assert_eq!(positions(100, 192, 8), [0]);
        assert_eq!(positions(193, 192, 8), [0, 1]);
        for len in [193, 300, 376, 377, 1000] {
            let p = positions(len, 192, 8);
            assert_eq!(*p.last().unwrap(), len - 192, "{len}");
            assert!(
                p.windows(2).all(|w| w[1] > w[0] && w[1] - w[0] <= 184),
                "{len}: {p:?}"
            );
        }
    }

    #[test]
    fn a_tile_independent_model_gives_the_whole_image_result() {
        let img = RgbImage::from_fn(450, 260, |x, y| {
            image::Rgb([(x % 251) as u8, (y % 253) as u8, ((x * y) % 255) as u8])
        });
        let whole = Nearest2.run(&img).unwrap();
        assert_eq!(tiled(&Nearest2, &img, TILE, OVERLAP).unwrap(), whole);
    }

    #[test]
    fn overlaps_fade_linearly_as_pil_blends() {
        assert_eq!(blend(0, 255, 0), 0);
        assert_eq!(blend(0, 255, 255), 255);
        assert_eq!(blend(100, 100, 77), 100);
        assert_eq!(blend(0, 255, 128), 128);
        // Two tiles of different constant colour: the second fades in over `overlap` columns.
        struct Shade;
        impl Model for Shade {
            fn scale(&self) -> u32 {
                1
            }
            fn run(&self, img: &RgbImage) -> Result<RgbImage, String> {
                let v = img.get_pixel(0, 0)[0];
                Ok(RgbImage::from_pixel(
                    img.width(),
                    img.height(),
                    image::Rgb([v, v, v]),
                ))
            }
        }
        let img = RgbImage::from_fn(200, 4, |x, _| image::Rgb([if x < 8 { 0 } else { 200 }; 3]));
        let out = tiled(&Shade, &img, 192, 8).unwrap();
        // Tiles at 0 and 8: columns 8..16 fade from the first (0) to the second (200).
        let row: Vec<u8> = (0..24).map(|x| out.get_pixel(x, 0)[0]).collect();
        assert_eq!(&row[..8], &[0; 8]);
        assert_eq!(row[8], 0);
        assert!(row[8..16].windows(2).all(|w| w[1] > w[0]), "{row:?}");
        assert_eq!(&row[16..], &[200; 8]);
    }
}
