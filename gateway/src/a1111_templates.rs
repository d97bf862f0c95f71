//! Prompt templates for textual-inversion training (A1111's `template_filename`): `[name]` is the
//! embedding, `[filewords]` an image's caption. A1111's stock file names are built in (with
//! atelier's own wording); any other name is a file in `<models>/textual_inversion_templates`.

use crate::api::AppState;
use crate::error::ApiError;

/// A file holds at most this many bytes.
const MAX_BYTES: u64 = 64 * 1024;

const STOCK: &[(&str, &[&str])] = &[
    ("none.txt", &["picture"]),
    (
        "hypernetwork.txt",
        &["[filewords]", "an image of [filewords]"],
    ),
    (
        "style.txt",
        &[
            "a painting in the style of [name]",
            "an illustration in the style of [name]",
            "a picture in the style of [name]",
            "artwork in the style of [name]",
            "a detailed image in the style of [name]",
            "a small image in the style of [name]",
        ],
    ),
    (
        "style_filewords.txt",
        &[
            "[filewords], in the style of [name]",
            "a painting of [filewords], in the style of [name]",
            "an illustration of [filewords], in the style of [name]",
            "[filewords], artwork in the style of [name]",
            "a detailed picture of [filewords], in the style of [name]",
        ],
    ),
    (
        "subject.txt",
        &[
            "a photo of [name]",
            "a picture of [name]",
            "a close-up photo of [name]",
            "an image showing [name]",
            "a cropped photo of [name]",
            "a bright photo of [name]",
        ],
    ),
    (
        "subject_filewords.txt",
        &[
            "a photo of [name], [filewords]",
            "a picture of [name], [filewords]",
            "a close-up photo of [name], [filewords]",
            "an image showing [name], [filewords]",
            "a cropped photo of [name], [filewords]",
        ],
    ),
];

/// The template lines `name` holds (blank lines dropped).
pub fn lines(app: &AppState, name: &str) -> Result<Vec<String>, ApiError> {
    if let Some((_, l)) = STOCK.iter().find(|(n, _)| *n == name) {
        return Ok(l.iter().map(|s| s.to_string()).collect());
    }
    let bad = |why: String| {
        ApiError::unprocessable(
            "unknown_template",
            format!("template_filename {name:?}: {why}"),
        )
    };
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_. ".contains(c))
        && !name.starts_with('.');
    if !plain {
        return Err(bad(
            "a file name in <models>/textual_inversion_templates".into()
        ));
    }
    let path = app
        .a1111
        .models_dir()
        .map(|d| d.join("textual_inversion_templates").join(name));
    let text = match path {
        Some(p) if std::fs::metadata(&p).is_ok_and(|m| m.is_file() && m.len() <= MAX_BYTES) => {
            std::fs::read_to_string(&p).map_err(|e| bad(e.to_string()))?
        }
        _ => {
            let stock: Vec<&str> = STOCK.iter().map(|(n, _)| *n).collect();
            return Err(bad(format!(
                "not one of {} nor a file of at most 64 KiB in <models>/textual_inversion_templates",
                stock.join(", ")
            )));
        }
    };
    let out: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect();
    if out.is_empty() {
        return Err(bad("the file has no lines".into()));
    }
    Ok(out)
}
