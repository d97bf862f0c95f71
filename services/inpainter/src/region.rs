//! "Only masked" inpainting (A1111's `inpaint_full_res`): the part of the init image that is
//! generated — the mask's bounding box grown by the padding, then to the output's aspect ratio,
//! kept inside the image — as A1111's `get_crop_region` and `expand_crop_region` compute it.

/// A rectangle of the init image, in pixels: `[x1, x2) × [y1, y2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    pub x1: u32,
    pub y1: u32,
    pub x2: u32,
    pub y2: u32,
}

impl Region {
    pub fn width(&self) -> u32 {
        self.x2 - self.x1
    }
    pub fn height(&self) -> u32 {
        self.y2 - self.y1
    }
}

/// The box of `mask`'s non-zero pixels grown by `padding` on every side (inside the image);
/// `None` for an empty mask.
pub fn crop_region(mask: &image::GrayImage, padding: u32) -> Option<Region> {
    let (w, h) = mask.dimensions();
    let (mut x1, mut y1, mut x2, mut y2) = (w, h, 0, 0);
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] > 0 {
            x1 = x1.min(x);
            y1 = y1.min(y);
            x2 = x2.max(x + 1);
            y2 = y2.max(y + 1);
        }
    }
    (x2 > x1).then(|| Region {
        x1: x1.saturating_sub(padding),
        y1: y1.saturating_sub(padding),
        x2: (x2 + padding).min(w),
        y2: (y2 + padding).min(h),
    })
}

/// `r` grown along one axis to the aspect ratio `width`/`height` of the output, shifted back
/// inside an image of `image_w`×`image_h` where it would leave it.
pub fn expand_to_ratio(
    r: Region,
    (width, height): (u32, u32),
    (image_w, image_h): (u32, u32),
) -> Region {
    let (mut x1, mut y1, mut x2, mut y2) = (r.x1 as i64, r.y1 as i64, r.x2 as i64, r.y2 as i64);
    let ratio_region = (x2 - x1) as f64 / (y2 - y1) as f64;
    let ratio_out = width as f64 / height as f64;
    let grow = |lo: &mut i64, hi: &mut i64, want: f64, limit: i64| {
        let diff = (want - (*hi - *lo) as f64) as i64;
        *lo -= diff / 2;
        *hi += diff - diff / 2;
        if *hi >= limit {
            let over = *hi - limit;
            *hi -= over;
            *lo -= over;
        }
        if *lo < 0 {
            *hi -= *lo;
            *lo = 0;
        }
        if *hi >= limit {
            *hi = limit;
        }
    };
    if ratio_region > ratio_out {
        grow(
            &mut y1,
            &mut y2,
            (x2 - x1) as f64 / ratio_out,
            image_h as i64,
        );
    } else {
        grow(
            &mut x1,
            &mut x2,
            (y2 - y1) as f64 * ratio_out,
            image_w as i64,
        );
    }
    Region {
        x1: x1 as u32,
        y1: y1 as u32,
        x2: x2 as u32,
        y2: y2 as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_region_is_the_masks_box_padded_and_grown_to_the_outputs_ratio() {
        let mut mask = image::GrayImage::new(200, 100);
        for y in 40..50 {
            for x in 100..140 {
                mask.put_pixel(x, y, image::Luma([255]));
            }
        }
        let r = crop_region(&mask, 4).unwrap();
        assert_eq!(
            r,
            Region {
                x1: 96,
                y1: 36,
                x2: 144,
                y2: 54
            }
        );
        // A square output: the 48 × 18 box grows to 48 × 48 around its centre.
        let sq = expand_to_ratio(r, (64, 64), (200, 100));
        assert_eq!((sq.width(), sq.height()), (48, 48));
        assert_eq!((sq.y1, sq.y2), (21, 69));
        // Near the edge it shifts back inside the image.
        let edge = expand_to_ratio(
            Region {
                x1: 0,
                y1: 90,
                x2: 40,
                y2: 100,
            },
            (1, 1),
            (200, 100),
        );
        assert_eq!(
            edge,
            Region {
                x1: 0,
                y1: 60,
                x2: 40,
                y2: 100
            }
        );
        assert!(crop_region(&image::GrayImage::new(8, 8), 4).is_none());
    }
}
