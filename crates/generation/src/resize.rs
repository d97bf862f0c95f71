//! How an init image (and its mask) is brought to the requested size: A1111's resize modes 0
//! (just resize: stretch), 1 (crop and resize: cover, centre crop) and 2 (resize and fill: fit,
//! centre, the margins filled by stretching the image's edge rows or columns).

use atelier_contracts::generate::ResizeMode;
use image::imageops::{self, FilterType};
use image::{ImageBuffer, Pixel};

/// `img` at `w`×`h` as `mode` says.
pub fn resize<P>(
    img: &ImageBuffer<P, Vec<P::Subpixel>>,
    w: u32,
    h: u32,
    mode: ResizeMode,
) -> ImageBuffer<P, Vec<P::Subpixel>>
where
    P: Pixel + 'static,
    P::Subpixel: 'static,
{
    let (iw, ih) = img.dimensions();
    if (iw, ih) == (w, h) {
        return img.clone();
    }
    let ratio = w as f64 / h as f64;
    let src_ratio = iw as f64 / ih as f64;
    let fit = |cover: bool| {
        // Cover: the image's shorter side fills the target; fit: its longer side does.
        if (ratio > src_ratio) == cover {
            (w, ((ih as u64 * w as u64) / iw as u64) as u32)
        } else {
            (((iw as u64 * h as u64) / ih as u64) as u32, h)
        }
    };
    match mode {
        // The latent upscale resizes latents, not pixels; what gets here (a mask) is stretched.
        ResizeMode::JustResize | ResizeMode::LatentUpscale => {
            imageops::resize(img, w, h, FilterType::Lanczos3)
        }
        ResizeMode::CropAndResize => {
            let (sw, sh) = fit(true);
            let scaled = imageops::resize(img, sw.max(1), sh.max(1), FilterType::Lanczos3);
            let (x, y) = ((sw - w.min(sw)) / 2, (sh - h.min(sh)) / 2);
            imageops::crop_imm(&scaled, x, y, w, h).to_image()
        }
        ResizeMode::ResizeAndFill => {
            let (sw, sh) = fit(false);
            let scaled = imageops::resize(img, sw.max(1), sh.max(1), FilterType::Lanczos3);
            let (x, y) = ((w - sw.min(w)) / 2, (h - sh.min(h)) / 2);
            let mut out = ImageBuffer::new(w, h);
            if sh < h && y > 0 {
                // Margins above and below: the top and bottom rows stretched.
                let top = imageops::crop_imm(&scaled, 0, 0, sw, 1).to_image();
                let bottom = imageops::crop_imm(&scaled, 0, sh - 1, sw, 1).to_image();
                imageops::replace(
                    &mut out,
                    &imageops::resize(&top, w, y, FilterType::Nearest),
                    0,
                    0,
                );
                let rest = h - y - sh;
                if rest > 0 {
                    let b = imageops::resize(&bottom, w, rest, FilterType::Nearest);
                    imageops::replace(&mut out, &b, 0, (y + sh) as i64);
                }
            } else if sw < w && x > 0 {
                // Margins left and right: the first and last columns stretched.
                let left = imageops::crop_imm(&scaled, 0, 0, 1, sh).to_image();
                let right = imageops::crop_imm(&scaled, sw - 1, 0, 1, sh).to_image();
                imageops::replace(
                    &mut out,
                    &imageops::resize(&left, x, h, FilterType::Nearest),
                    0,
                    0,
                );
                let rest = w - x - sw;
                if rest > 0 {
                    let r = imageops::resize(&right, rest, h, FilterType::Nearest);
                    imageops::replace(&mut out, &r, (x + sw) as i64, 0);
                }
            }
            imageops::replace(&mut out, &scaled, x as i64, y as i64);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 40 × 20: left half red, right half blue.
    fn wide() -> image::RgbImage {
        image::RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        })
    }

    #[test]
    fn the_three_modes_follow_a1111() {
        let just = resize(&wide(), 20, 20, ResizeMode::JustResize);
        assert_eq!(just.dimensions(), (20, 20));
        assert_eq!(just.get_pixel(2, 10).0, [255, 0, 0]);
        // Crop: the centre 20 × 20 of the 40 × 20 image: red left of its middle, blue right.
        let crop = resize(&wide(), 20, 20, ResizeMode::CropAndResize);
        assert_eq!(crop.get_pixel(2, 10).0, [255, 0, 0]);
        assert_eq!(crop.get_pixel(17, 10).0, [0, 0, 255]);
        // Fill: 40 × 20 fits as 20 × 10 in the middle; the rows above and below repeat its edges.
        let fill = resize(&wide(), 20, 20, ResizeMode::ResizeAndFill);
        assert_eq!(fill.dimensions(), (20, 20));
        assert_eq!(fill.get_pixel(2, 0).0, [255, 0, 0]);
        assert_eq!(fill.get_pixel(17, 19).0, [0, 0, 255]);
        let mask = image::GrayImage::from_pixel(40, 20, image::Luma([255]));
        assert_eq!(
            resize(&mask, 20, 20, ResizeMode::ResizeAndFill)
                .get_pixel(10, 0)
                .0,
            [255]
        );
    }
}
