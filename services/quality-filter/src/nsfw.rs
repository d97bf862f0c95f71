//! NSFW detection with NudeNet's detector (`320n.onnx`, a YOLOv8n with 18 body-part classes, as
//! PyPI's `nudenet` ships it), run through ONNX Runtime's C library loaded at run time (`ort` with
//! `load-dynamic`; the library from PyPI's `onnxruntime` wheel). Preprocessing follows nudenet:
//! pad to a square with black at the right/bottom, resize to 320×320, RGB, scale to [0, 1].
//! An image's NSFW score is the highest confidence of an explicit class among the detector's boxes.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use image::DynamicImage;

/// The detector's classes, in output order.
pub const LABELS: [&str; 18] = [
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
];

/// Classes that make an image NSFW.
pub const EXPLICIT: [&str; 5] = [
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "BUTTOCKS_EXPOSED",
    "ANUS_EXPOSED",
];

/// The model's input side.
pub const SIDE: u32 = 320;
/// Boxes below this confidence are ignored (nudenet's threshold).
pub const MIN_SCORE: f32 = 0.2;

fn in_tools(rel: &str) -> Option<PathBuf> {
    atelier_embed::tools::site_package(rel)
}

/// `ATELIER_NSFW_MODEL`, else nudenet's `320n.onnx` in the project's `.tools/` venv.
pub fn find_model() -> Option<PathBuf> {
    match std::env::var_os("ATELIER_NSFW_MODEL") {
        Some(p) => Some(PathBuf::from(p)).filter(|p| p.is_file()),
        None => in_tools("nudenet/320n.onnx"),
    }
}

/// `ORT_DYLIB_PATH`, else the onnxruntime wheel's `libonnxruntime.so.*` in `.tools/`.
pub fn find_onnxruntime() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let capi = in_tools("onnxruntime/capi")?;
    std::fs::read_dir(capi)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libonnxruntime.so"))
        })
}

static ENVIRONMENT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();

pub struct NsfwDetector {
    session: Mutex<ort::session::Session>,
    input: String,
}

/// One class's strongest box.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub label: &'static str,
    pub score: f32,
}

impl NsfwDetector {
    /// Loads ONNX Runtime (once per process) and the model.
    pub fn load(model: &Path, onnxruntime: &Path) -> Result<Self, String> {
        let env = ENVIRONMENT
            .get_or_init(|| {
                ort::init_from(onnxruntime)
                    .map_err(|e| {
                        format!("loading ONNX Runtime from {}: {e}", onnxruntime.display())
                    })?
                    .with_name("atelier")
                    .build()
                    .map_err(|e| format!("starting ONNX Runtime: {e}"))
            })
            .as_ref()
            .map_err(Clone::clone)?;
        let session = ort::session::Session::builder(env)
            .map_err(|e| e.to_string())?
            .with_intra_threads(2)
            .map_err(|e| e.to_string())?
            .commit_from_file(model)
            .map_err(|e| format!("loading {}: {e}", model.display()))?;
        let input = session
            .inputs()
            .first()
            .map(|i| i.name().to_owned())
            .ok_or_else(|| format!("{} has no inputs", model.display()))?;
        Ok(Self {
            session: Mutex::new(session),
            input,
        })
    }

    /// The 1×3×320×320 input for an image, as nudenet prepares it.
    pub fn preprocess(img: &DynamicImage) -> Vec<f32> {
        let rgb = img.to_rgb8();
        let side = rgb.width().max(rgb.height()).max(1);
        let mut square = image::RgbImage::new(side, side);
        image::imageops::replace(&mut square, &rgb, 0, 0);
        let small =
            image::imageops::resize(&square, SIDE, SIDE, image::imageops::FilterType::Triangle);
        let n = (SIDE * SIDE) as usize;
        let mut out = vec![0f32; 3 * n];
        for (i, p) in small.pixels().enumerate() {
            for c in 0..3 {
                out[c * n + i] = f32::from(p.0[c]) / 255.0;
            }
        }
        out
    }

    /// The raw output (`[1, 4 + classes, boxes]`) for a prepared input.
    pub fn run(&self, input: Vec<f32>) -> Result<(Vec<usize>, Vec<f32>), String> {
        let tensor =
            ort::value::Tensor::from_array(([1usize, 3, SIDE as usize, SIDE as usize], input))
                .map_err(|e| e.to_string())?;
        let mut session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let outputs = session
            .run(ort::inputs![self.input.as_str() => tensor])
            .map_err(|e| format!("running the NSFW detector: {e}"))?;
        let (shape, data) = outputs[0]
            .try_extract_tensor::<f32>()
            .map_err(|e| e.to_string())?;
        Ok((shape.iter().map(|&d| d as usize).collect(), data.to_vec()))
    }

    /// Each class's strongest box (a box counts for its best class, as in nudenet), strongest
    /// first; boxes under [`MIN_SCORE`] are ignored.
    pub fn detect(&self, img: &DynamicImage) -> Result<Vec<Detection>, String> {
        let (shape, data) = self.run(Self::preprocess(img))?;
        let [_, rows, boxes] = shape[..] else {
            return Err(format!("unexpected output shape {shape:?}"));
        };
        if rows != 4 + LABELS.len() {
            return Err(format!("unexpected output shape {shape:?}"));
        }
        let mut best = [0f32; 18];
        for b in 0..boxes {
            let (class, score) = (0..LABELS.len())
                .map(|c| (c, data[(4 + c) * boxes + b]))
                .fold((0, f32::MIN), |a, x| if x.1 > a.1 { x } else { a });
            if score >= MIN_SCORE && score > best[class] {
                best[class] = score;
            }
        }
        let mut found: Vec<Detection> = best
            .iter()
            .enumerate()
            .filter(|(_, &s)| s > 0.0)
            .map(|(c, &score)| Detection {
                label: LABELS[c],
                score,
            })
            .collect();
        found.sort_by(|a, b| b.score.total_cmp(&a.score));
        Ok(found)
    }
}

/// The strongest explicit detection, if any.
pub fn explicit(found: &[Detection]) -> Option<&Detection> {
    found.iter().find(|d| EXPLICIT.contains(&d.label))
}
