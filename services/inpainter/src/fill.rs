//! A1111's "fill" masked content: the masked area painted over with the colours around it. The
//! unmasked pixels (weighted by how unmasked they are) are blurred outward at falling radii
//! (256, 64, 16, 4, 2, 0 pixels; the finer ones composited more often), each layer laid over the
//! last, so the hole takes the surrounding colours, coarse first, then finer near its edge.

use image::{GrayImage, RgbImage, Rgba, RgbaImage};

const LAYERS: [(f32, usize); 6] = [
    (256.0, 1),
    (64.0, 1),
    (16.0, 2),
    (4.0, 4),
    (2.0, 2),
    (0.0, 1),
];

/// `image` with the area where `mask` is white replaced by the surrounding colours.
pub fn fill(image: &RgbImage, mask: &GrayImage) -> RgbImage {
    let (w, h) = image.dimensions();
    // Premultiplied: colour times how much the pixel is kept.
    let mut kept = RgbaImage::new(w, h);
    for (x, y, p) in image.enumerate_pixels() {
        let a = 255 - mask.get_pixel(x, y).0[0];
        let pm = |c: u8| ((c as u32 * a as u32 + 127) / 255) as u8;
        kept.put_pixel(x, y, Rgba([pm(p.0[0]), pm(p.0[1]), pm(p.0[2]), a]));
    }
    // Straight-alpha layers composited over each other ("over"), in f32.
    let mut acc = vec![[0f32; 4]; (w * h) as usize];
    for (radius, repeats) in LAYERS {
        let blurred = if radius > 0.0 {
            image::imageops::fast_blur(&kept, radius.min(w.max(h) as f32))
        } else {
            kept.clone()
        };
        for _ in 0..repeats {
            for (dst, src) in acc.iter_mut().zip(blurred.pixels()) {
                let a = src.0[3] as f32 / 255.0;
                if a <= 0.0 {
                    continue;
                }
                // Un-premultiply the blurred colour, then lay it over.
                for (d, s) in dst.iter_mut().zip(src.0).take(3) {
                    let colour = s as f32 / 255.0 / a;
                    *d = colour.min(1.0) * a + *d * (1.0 - a);
                }
                dst[3] = a + dst[3] * (1.0 - a);
            }
        }
    }
    let mut out = RgbImage::new(w, h);
    for (o, a) in out.pixels_mut().zip(&acc) {
        // The composite is premultiplied by its coverage: divide it back out.
        let cov = a[3].max(1e-6);
        for (o, v) in o.0.iter_mut().zip(a) {
            *o = ((v / cov).clamp(0.0, 1.0) * 255.0).round() as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hole_takes_the_colours_around_it() {
        // Left half red, right half blue, a white square hole over the middle.
        let mut img = RgbImage::from_fn(64, 32, |x, _| {
            if x < 32 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let mut mask = GrayImage::new(64, 32);
        for y in 8..24 {
            for x in 24..40 {
                img.put_pixel(x, y, image::Rgb([255, 255, 255]));
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        let out = fill(&img, &mask);
        let left = out.get_pixel(25, 16).0;
        let right = out.get_pixel(38, 16).0;
        assert!(
            left[0] > 150 && left[2] < 100,
            "left of the hole is red-ish: {left:?}"
        );
        assert!(
            right[2] > 150 && right[0] < 100,
            "right of the hole is blue-ish: {right:?}"
        );
        assert!(
            left[1] < 40 && right[1] < 40,
            "no white left: {left:?} {right:?}"
        );
        // Unmasked pixels stay what they were.
        assert_eq!(out.get_pixel(2, 2).0, [255, 0, 0]);
        assert_eq!(out.get_pixel(62, 30).0, [0, 0, 255]);
    }
}
