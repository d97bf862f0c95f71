//! A captioner for atelier's generated sample scenes (a background, a disc and a rectangle in
//! six flat colours; `atelier_ingest::samples`), by pixel analysis: the colour of each region,
//! its shape from how much of its bounding box it fills, and where it sits. It is what the
//! loopback vision server answers with, so the demo and the tests caption for real, offline,
//! with captions whose quality can be measured against the scenes' ground truth.

use image::RgbImage;

const PALETTE: [([u8; 3], &str); 6] = [
    ([220, 40, 40], "red"),
    ([40, 160, 60], "green"),
    ([40, 80, 220], "blue"),
    ([240, 200, 40], "yellow"),
    ([250, 250, 250], "white"),
    ([30, 30, 30], "black"),
];

#[derive(Default, Clone, Copy)]
struct Region {
    count: u64,
    min: (u32, u32),
    max: (u32, u32),
    sum: (u64, u64),
}

fn nearest(p: [u8; 3]) -> Option<usize> {
    let (i, d) = PALETTE
        .iter()
        .enumerate()
        .map(|(i, (c, _))| {
            let d: i32 = (0..3).map(|k| (c[k] as i32 - p[k] as i32).pow(2)).sum();
            (i, d)
        })
        .min_by_key(|&(_, d)| d)?;
    (d < 70 * 70).then_some(i)
}

fn place(cx: f64, cy: f64) -> &'static str {
    let col = if cx < 1.0 / 3.0 {
        0
    } else if cx < 2.0 / 3.0 {
        1
    } else {
        2
    };
    let row = if cy < 1.0 / 3.0 {
        0
    } else if cy < 2.0 / 3.0 {
        1
    } else {
        2
    };
    [
        ["upper left", "top", "upper right"],
        ["left", "center", "right"],
        ["lower left", "bottom", "lower right"],
    ][row][col]
}

/// A detailed caption of one scene.
pub fn describe(img: &RgbImage) -> String {
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        return "The image is empty.".into();
    }
    let mut regions = [Region {
        min: (u32::MAX, u32::MAX),
        ..Default::default()
    }; 6];
    for (x, y, p) in img.enumerate_pixels() {
        if let Some(i) = nearest(p.0) {
            let r = &mut regions[i];
            r.count += 1;
            r.min = (r.min.0.min(x), r.min.1.min(y));
            r.max = (r.max.0.max(x), r.max.1.max(y));
            r.sum = (r.sum.0 + x as u64, r.sum.1 + y as u64);
        }
    }
    let total = u64::from(w) * u64::from(h);
    let Some(bg) = (0..6).max_by_key(|&i| regions[i].count) else {
        return "The image is empty.".into();
    };
    if regions[bg].count * 4 < total {
        return "The image shows an abstract pattern of colours.".into();
    }
    let mut objects: Vec<(u64, String, &str)> = (0..6)
        .filter(|&i| i != bg && regions[i].count * 200 >= total)
        .map(|i| {
            let r = regions[i];
            let bbox = u64::from(r.max.0 - r.min.0 + 1) * u64::from(r.max.1 - r.min.1 + 1);
            let fill = r.count as f64 / bbox as f64;
            let shape = if fill > 0.9 { "rectangle" } else { "circle" };
            let (cx, cy) = (
                r.sum.0 as f64 / r.count as f64 / w as f64,
                r.sum.1 as f64 / r.count as f64 / h as f64,
            );
            let size = if r.count * 8 >= total { "large " } else { "" };
            (
                r.count,
                format!("{size}{} {shape}", PALETTE[i].1),
                place(cx, cy),
            )
        })
        .collect();
    objects.sort_by_key(|o| std::cmp::Reverse(o.0));
    let bg_name = PALETTE[bg].1;
    match objects.as_slice() {
        [] => format!("The image shows a plain {bg_name} background with nothing on it."),
        [(_, a, pa)] => format!(
            "The image shows a {a} on a {bg_name} background. The {a} is in the {pa} of the image."
        ),
        [(_, a, pa), (_, b, pb), rest @ ..] => {
            let mut s = format!(
                "The image shows a {a} and a {b} on a {bg_name} background. The {a} is in the {pa} of the image, and the {b} is in the {pb}."
            );
            if !rest.is_empty() {
                s.push_str(&format!(" There are {} more small shapes.", rest.len()));
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn describes_colours_shapes_and_places() {
        let img = RgbImage::from_fn(120, 120, |x, y| {
            let (fx, fy) = (x as f32 - 90.0, y as f32 - 90.0);
            if fx * fx + fy * fy <= 20.0 * 20.0 {
                Rgb([220, 40, 40])
            } else if x < 40 && y < 30 {
                Rgb([40, 80, 220])
            } else {
                Rgb([250, 250, 250])
            }
        });
        let s = describe(&img);
        assert!(s.contains("red circle"), "{s}");
        assert!(s.contains("blue rectangle"), "{s}");
        assert!(s.contains("white background"), "{s}");
        assert!(s.contains("circle is in the lower right"), "{s}");
        assert!(s.contains("rectangle is in the upper left"), "{s}");
        let plain = RgbImage::from_pixel(10, 10, Rgb([30, 30, 30]));
        assert!(describe(&plain).contains("plain black background"));
    }
}
