//! The loss curve as a PNG: raw per-step loss (light) and its exponential moving average (dark)
//! on a linear step axis, with horizontal grid lines at quarters of the loss range.

use atelier_contracts::LossPoint;

const W: u32 = 640;
const H: u32 = 360;
const MARGIN: u32 = 24;

/// PNG bytes of the plot; an empty history gives an empty frame.
pub fn loss_png(history: &[LossPoint]) -> Result<Vec<u8>, String> {
    let mut img = image::RgbImage::from_pixel(W, H, image::Rgb([255, 255, 255]));
    let (x0, x1, y0, y1) = (MARGIN, W - MARGIN, MARGIN, H - MARGIN);
    for q in 0..=4 {
        let y = y0 + (y1 - y0) * q / 4;
        for x in x0..=x1 {
            img.put_pixel(x, y, image::Rgb([225, 225, 225]));
        }
    }
    for y in y0..=y1 {
        img.put_pixel(x0, y, image::Rgb([0, 0, 0]));
    }
    for x in x0..=x1 {
        img.put_pixel(x, y1, image::Rgb([0, 0, 0]));
    }
    let finite: Vec<&LossPoint> = history.iter().filter(|p| p.loss.is_finite()).collect();
    if !finite.is_empty() {
        let lo = finite.iter().map(|p| p.loss).fold(f64::INFINITY, f64::min);
        let hi = finite
            .iter()
            .map(|p| p.loss)
            .fold(f64::NEG_INFINITY, f64::max);
        let span = (hi - lo).max(1e-12);
        let last = finite.last().map_or(1, |p| p.step).max(1) as f64;
        let first = finite.first().map_or(0, |p| p.step) as f64;
        let to_xy = |step: u32, loss: f64| -> (f64, f64) {
            let fx = if last > first {
                (step as f64 - first) / (last - first)
            } else {
                0.5
            };
            let fy = (loss - lo) / span;
            (
                x0 as f64 + fx * (x1 - x0) as f64,
                y1 as f64 - fy * (y1 - y0) as f64,
            )
        };
        let raw: Vec<(f64, f64)> = finite.iter().map(|p| to_xy(p.step, p.loss)).collect();
        polyline(&mut img, &raw, [150, 180, 230]);
        let mut ema = finite[0].loss;
        let smooth: Vec<(f64, f64)> = finite
            .iter()
            .map(|p| {
                ema = 0.9 * ema + 0.1 * p.loss;
                to_xy(p.step, ema)
            })
            .collect();
        polyline(&mut img, &smooth, [20, 50, 160]);
    }
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .map_err(|e| e.to_string())?;
    Ok(out)
}

fn polyline(img: &mut image::RgbImage, pts: &[(f64, f64)], colour: [u8; 3]) {
    if pts.len() == 1 {
        put(img, pts[0].0, pts[0].1, colour);
    }
    for w in pts.windows(2) {
        let ((ax, ay), (bx, by)) = (w[0], w[1]);
        let n = ((bx - ax).abs().max((by - ay).abs()).ceil() as usize).max(1);
        for i in 0..=n {
            let t = i as f64 / n as f64;
            put(img, ax + (bx - ax) * t, ay + (by - ay) * t, colour);
        }
    }
}

fn put(img: &mut image::RgbImage, x: f64, y: f64, colour: [u8; 3]) {
    let (x, y) = (x.round(), y.round());
    if x >= 0.0 && y >= 0.0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, image::Rgb(colour));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falling_loss_is_drawn_from_top_left_to_bottom_right() {
        let h: Vec<LossPoint> = (1..=50)
            .map(|s| LossPoint {
                step: s,
                loss: 1.0 / s as f64,
                lr: 1e-4,
            })
            .collect();
        let png = loss_png(&h).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (W, H));
        let dark = |x: u32| {
            (0..H)
                .filter(|&y| {
                    img.get_pixel(x, y).0 == [150, 180, 230]
                        || img.get_pixel(x, y).0 == [20, 50, 160]
                })
                .collect::<Vec<_>>()
        };
        let left = dark(MARGIN + 1);
        let right = dark(W - MARGIN - 1);
        assert!(!left.is_empty() && !right.is_empty());
        assert!(
            left.iter().min() < right.iter().min(),
            "the curve should fall"
        );
        assert!(loss_png(&[]).is_ok());
    }
}
