//! The augmenter's vocabulary: `augment` jobs ([`AugmentSpec`]) turn a dataset version into a new
//! version holding seeded image variants (a chain of [`Transform`]s), caption paraphrases and hard
//! negatives. Each variant row records its parent record and the concrete [`Step`]s applied, so a
//! variant can be rebuilt byte for byte from its parent.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::dataset::{check_dataset_name, VersionCounts};
use crate::retrieval::RowFilter;
use crate::ArtifactRef;

/// img2dataset's resize modes.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// The smaller side becomes `size`, the aspect ratio is kept.
    KeepRatio,
    /// The larger side becomes `size`, the aspect ratio is kept.
    KeepRatioLargest,
    /// The smaller side becomes `size`, then the centre `size`×`size` is cut out.
    #[default]
    CenterCrop,
    /// The larger side becomes `size`, then the image is padded to `size`×`size`.
    Border,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum FlipDirection {
    #[default]
    Horizontal,
    Vertical,
}

/// One step of an augmentation chain as asked. Random steps draw their parameters from the
/// variant's own generator (seeded by the job's seed, the record and the variant number).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Transform {
    /// Resize as img2dataset does (Lanczos3 on the sRGB values).
    Resize {
        size: u32,
        #[serde(default)]
        mode: ResizeMode,
        /// Leave images whose sides are already within `size` alone (img2dataset's
        /// `resize_only_if_bigger`).
        #[serde(default)]
        only_if_bigger: bool,
        /// The padding colour of `border` (RGB).
        #[serde(default = "white")]
        border_color: [u8; 3],
    },
    /// A random crop covering `scale` of the area with aspect ratio within `ratio`
    /// (torchvision's RandomResizedCrop without the resize: follow it with `resize`).
    RandomCrop {
        #[serde(default = "default_crop_scale")]
        scale: [f32; 2],
        #[serde(default = "default_crop_ratio")]
        ratio: [f32; 2],
    },
    /// A mirror image with probability `p`.
    Flip {
        #[serde(default)]
        direction: FlipDirection,
        #[serde(default = "half")]
        p: f32,
    },
    /// A rotation by a uniform angle in ±`degrees` about the centre, keeping the size; corners
    /// filled with `fill`.
    Rotate {
        degrees: f32,
        #[serde(default)]
        fill: [u8; 3],
    },
    /// torchvision's ColorJitter: brightness, contrast and saturation factors drawn from
    /// [1 − x, 1 + x], a hue shift from [−hue, hue] (a fraction of the colour wheel, ≤ 0.5).
    ColorJitter {
        #[serde(default)]
        brightness: f32,
        #[serde(default)]
        contrast: f32,
        #[serde(default)]
        saturation: f32,
        #[serde(default)]
        hue: f32,
    },
    /// A Gaussian blur with σ drawn from `sigma`, with probability `p`.
    Blur {
        sigma: [f32; 2],
        #[serde(default = "one")]
        p: f32,
    },
    /// A JPEG round trip at a quality drawn from `quality` (compression artefacts).
    Jpeg { quality: [u8; 2] },
}

fn white() -> [u8; 3] {
    [255, 255, 255]
}
fn default_crop_scale() -> [f32; 2] {
    [0.08, 1.0]
}
fn default_crop_ratio() -> [f32; 2] {
    [3.0 / 4.0, 4.0 / 3.0]
}
fn half() -> f32 {
    0.5
}
fn one() -> f32 {
    1.0
}

/// Largest side an augmenter writes or resizes to.
pub const MAX_SIDE: u32 = 8192;
/// Most variants per record.
pub const MAX_VARIANTS: u32 = 32;
/// Most steps in a chain.
pub const MAX_STEPS: usize = 16;

impl Transform {
    pub fn check(&self) -> Result<(), String> {
        let prob = |p: f32| {
            if (0.0..=1.0).contains(&p) {
                Ok(())
            } else {
                Err(format!("p {p}: a probability, 0 to 1"))
            }
        };
        match self {
            Transform::Resize { size, .. } => {
                if !(1..=MAX_SIDE).contains(size) {
                    return Err(format!("resize size {size}: 1 to {MAX_SIDE}"));
                }
            }
            Transform::RandomCrop { scale, ratio } => {
                if !(scale[0] > 0.0 && scale[0] <= scale[1] && scale[1] <= 1.0) {
                    return Err(format!(
                        "random_crop scale {scale:?}: an area fraction range, 0 < min ≤ max ≤ 1"
                    ));
                }
                if !(ratio[0] > 0.0 && ratio[0] <= ratio[1] && ratio[1].is_finite()) {
                    return Err(format!(
                        "random_crop ratio {ratio:?}: an aspect ratio range, 0 < min ≤ max"
                    ));
                }
            }
            Transform::Flip { p, .. } => prob(*p)?,
            Transform::Rotate { degrees, .. } => {
                if !(0.0..=180.0).contains(degrees) {
                    return Err(format!("rotate degrees {degrees}: 0 to 180"));
                }
            }
            Transform::ColorJitter {
                brightness,
                contrast,
                saturation,
                hue,
            } => {
                for (name, v) in [
                    ("brightness", brightness),
                    ("contrast", contrast),
                    ("saturation", saturation),
                ] {
                    if !(0.0..=1.0).contains(v) {
                        return Err(format!("color_jitter {name} {v}: 0 to 1"));
                    }
                }
                if !(0.0..=0.5).contains(hue) {
                    return Err(format!("color_jitter hue {hue}: 0 to 0.5"));
                }
            }
            Transform::Blur { sigma, p } => {
                prob(*p)?;
                if !(sigma[0] >= 0.0 && sigma[0] <= sigma[1] && sigma[1] <= 50.0) {
                    return Err(format!("blur sigma {sigma:?}: 0 ≤ min ≤ max ≤ 50"));
                }
            }
            Transform::Jpeg { quality } => {
                if !(quality[0] >= 1 && quality[0] <= quality[1] && quality[1] <= 100) {
                    return Err(format!("jpeg quality {quality:?}: 1 ≤ min ≤ max ≤ 100"));
                }
            }
        }
        Ok(())
    }
}

/// One step as applied, with every random choice made: replaying a variant's steps on its
/// parent's pixels gives the same image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// Resized to `width`×`height` (before a centre crop or border, which are their own steps).
    Resize {
        width: u32,
        height: u32,
    },
    Crop {
        x: u32,
        y: u32,
        width: u32,
        height: u32,
    },
    /// Padded onto a `width`×`height` canvas at (`x`, `y`).
    Pad {
        width: u32,
        height: u32,
        x: u32,
        y: u32,
        color: [u8; 3],
    },
    Flip {
        direction: FlipDirection,
    },
    Rotate {
        degrees: f32,
        fill: [u8; 3],
    },
    /// Factors (1 = unchanged) and a hue shift (fraction of the wheel), applied in this order.
    ColorJitter {
        brightness: f32,
        contrast: f32,
        saturation: f32,
        hue: f32,
    },
    Blur {
        sigma: f32,
    },
    Jpeg {
        quality: u8,
    },
}

/// How each variant's caption is made.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Paraphrase {
    /// The parent's caption as it is.
    #[default]
    Keep,
    /// Seeded rule-based rewriting: synonyms and clause reordering.
    Rules,
    /// The captioner's OpenAI-compatible backend, configured on the augmenter worker.
    Openai,
}

/// The kinds of hard negative captions.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
    ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum NegativeKind {
    /// An object noun replaced by another ("a dog on a sofa" → "a cat on a sofa").
    SwapObject,
    /// A colour replaced by another.
    SwapColour,
    /// A count changed ("two dogs" → "three dogs").
    SwapCount,
    /// A spatial relation reversed ("left of" → "right of", "on" → "under").
    SwapRelation,
    /// Two objects' places exchanged ("a dog chasing a cat" → "a cat chasing a dog").
    SwapOrder,
    /// The caption of another image, near in the dataset's `caption` index.
    Neighbour,
}

impl NegativeKind {
    /// The caption-edit kinds (every kind but `neighbour`).
    pub const EDITS: [NegativeKind; 5] = [
        NegativeKind::SwapObject,
        NegativeKind::SwapColour,
        NegativeKind::SwapCount,
        NegativeKind::SwapRelation,
        NegativeKind::SwapOrder,
    ];
}

/// Hard negatives for contrastive training, attached to every row of the new version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HardNegatives {
    /// Caption edits to try (default: all five); each gives at most one negative per row.
    #[serde(default = "default_edits")]
    pub edits: Vec<NegativeKind>,
    /// Captions of this many nearest other images in the dataset's `caption` index (0: none;
    /// needs `atelier index` on the parent version).
    #[serde(default)]
    pub neighbours: u32,
}

fn default_edits() -> Vec<NegativeKind> {
    NegativeKind::EDITS.to_vec()
}

/// The caption side of an augmentation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CaptionAugment {
    pub paraphrase: Paraphrase,
    /// Model for `openai` paraphrases (default: the worker's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hard_negatives: Option<HardNegatives>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    #[default]
    Jpeg,
    Png,
}

/// How variant images are encoded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ImageOutput {
    pub format: OutputFormat,
    /// JPEG quality (img2dataset's default 95).
    pub quality: u8,
}

impl Default for ImageOutput {
    fn default() -> Self {
        Self {
            format: OutputFormat::Jpeg,
            quality: 95,
        }
    }
}

/// Most hard-negative neighbours per row.
pub const MAX_NEIGHBOURS: u32 = 16;

/// Augment a dataset version into a new one: `variants` seeded variants of each chosen row
/// (the transform chain on its image, its caption paraphrased or kept), the originals kept or
/// not, hard negatives attached. The same spec on the same version gives byte-identical images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AugmentSpec {
    pub dataset: String,
    /// The version augmented (the parent). Default: the latest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// Which kept rows get variants (all by default).
    #[serde(default, skip_serializing_if = "RowFilter::is_empty")]
    pub filter: RowFilter,
    /// Augment flagged rows too (default: accepted rows only).
    #[serde(default)]
    pub include_flagged: bool,
    /// The chain applied to each variant's image, in order (empty: the image is kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transforms: Vec<Transform>,
    /// Variants per row: new rows with their own image when there are transforms, else
    /// paraphrases attached to the original row.
    #[serde(default = "one_variant")]
    pub variants: u32,
    /// Keep the parent's rows in the new version beside their variants.
    #[serde(default = "yes")]
    pub keep_originals: bool,
    #[serde(default)]
    pub captions: CaptionAugment,
    #[serde(default)]
    pub output: ImageOutput,
    #[serde(default = "default_seed")]
    pub seed: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

fn one_variant() -> u32 {
    1
}
fn yes() -> bool {
    true
}
fn default_seed() -> String {
    "atelier".to_owned()
}

impl AugmentSpec {
    pub fn check(&self) -> Result<(), String> {
        check_dataset_name(&self.dataset)?;
        self.filter.check()?;
        if !(1..=MAX_VARIANTS).contains(&self.variants) {
            return Err(format!("variants {}: 1 to {MAX_VARIANTS}", self.variants));
        }
        if self.transforms.len() > MAX_STEPS {
            return Err(format!(
                "transforms: {} given, at most {MAX_STEPS}",
                self.transforms.len()
            ));
        }
        for (i, t) in self.transforms.iter().enumerate() {
            t.check().map_err(|e| format!("transforms[{i}]: {e}"))?;
        }
        if !(1..=100).contains(&self.output.quality) {
            return Err(format!("output.quality {}: 1 to 100", self.output.quality));
        }
        if let Some(n) = &self.captions.hard_negatives {
            if n.neighbours > MAX_NEIGHBOURS {
                return Err(format!(
                    "captions.hard_negatives.neighbours {}: at most {MAX_NEIGHBOURS}",
                    n.neighbours
                ));
            }
            if n.edits.contains(&NegativeKind::Neighbour) {
                return Err(
                    "captions.hard_negatives.edits: `neighbour` is not an edit; ask for neighbours with `neighbours: N`"
                        .to_owned(),
                );
            }
            if n.edits.is_empty() && n.neighbours == 0 {
                return Err("captions.hard_negatives asks for no edit and no neighbour".to_owned());
            }
        }
        if self.transforms.is_empty()
            && self.captions.paraphrase != Paraphrase::Keep
            && !self.keep_originals
        {
            return Err("without transforms the variants are paraphrases attached to the original rows (`paraphrases`), so keep_originals: false would leave nothing".to_owned());
        }
        let makes_variants =
            !self.transforms.is_empty() || self.captions.paraphrase != Paraphrase::Keep;
        if !makes_variants && self.captions.hard_negatives.is_none() {
            return Err(
                "nothing to do: give transforms, a caption paraphrase or hard_negatives".to_owned(),
            );
        }
        Ok(())
    }

    /// Whether the job makes variants (rows or paraphrases); otherwise it only attaches hard
    /// negatives.
    pub fn makes_variants(&self) -> bool {
        !self.transforms.is_empty() || self.captions.paraphrase != Paraphrase::Keep
    }
}

/// What a variant row was made from and how: in its [`DatasetRow`](crate::DatasetRow).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct Augmentation {
    /// The parent record's sha256 (its row in the parent version).
    pub parent: String,
    pub parent_image_id: String,
    /// The variant's number among its parent's (0-based).
    pub variant: u32,
    /// The steps applied to the parent's image, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<Step>,
    /// How the caption was made.
    pub caption: CaptionChange,
    /// The image is mirrored (an odd number of flips in a direction), so the caption's sides were
    /// exchanged to match: left/right for horizontal, top/bottom, above/below, upper/lower for
    /// vertical.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrored: Vec<FlipDirection>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(tag = "by", rename_all = "snake_case")]
pub enum CaptionChange {
    Kept,
    /// The rules applied, in order (e.g. `synonym:photo→picture`, `reorder`).
    Rules {
        edits: Vec<String>,
    },
    Openai {
        model: String,
    },
}

/// Another caption of the same image (caption-only augmentation: no transforms, so no new image).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct Paraphrased {
    pub text: String,
    pub change: CaptionChange,
}

/// A caption that does not describe the row's image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct HardNegative {
    pub text: String,
    pub kind: NegativeKind,
    /// For `neighbour`: the other image's id and its similarity to this row's caption.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct AugmentOutput {
    pub dataset: String,
    pub parent: u32,
    pub version: u32,
    pub manifest: ArtifactRef,
    /// Parent rows that got variants.
    pub augmented_rows: u64,
    /// Variant rows written.
    pub variants: u64,
    /// Hard negatives attached, over all rows.
    pub negatives: u64,
    /// What was left out and why: variants whose image could not be read or transformed, rows
    /// the caption index does not hold (no neighbour negatives).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped: Vec<String>,
    pub counts: VersionCounts,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(v: serde_json::Value) -> Result<AugmentSpec, String> {
        serde_json::from_value::<AugmentSpec>(v).map_err(|e| e.to_string())
    }

    #[test]
    fn specs_parse_with_defaults_and_are_checked() {
        let s = spec(serde_json::json!({
            "dataset": "d",
            "transforms": [{"op": "resize", "size": 64}, {"op": "flip"}, {"op": "jpeg", "quality": [30, 60]}],
        }))
        .unwrap();
        assert!(s.check().is_ok());
        assert_eq!(s.variants, 1);
        assert!(s.keep_originals);
        assert_eq!(
            s.transforms[0],
            Transform::Resize {
                size: 64,
                mode: ResizeMode::CenterCrop,
                only_if_bigger: false,
                border_color: [255; 3]
            }
        );
        assert_eq!(
            s.transforms[1],
            Transform::Flip {
                direction: FlipDirection::Horizontal,
                p: 0.5
            }
        );
        let bad = |v: serde_json::Value, want: &str| {
            let err = spec(v).and_then(|s| s.check()).unwrap_err();
            assert!(err.contains(want), "{err} lacks {want}");
        };
        bad(serde_json::json!({"dataset": "d"}), "nothing to do");
        bad(
            serde_json::json!({"dataset": "d", "transforms": [{"op": "resize", "size": 0}]}),
            "transforms[0]: resize size 0",
        );
        bad(
            serde_json::json!({"dataset": "d", "transforms": [{"op": "blur", "sigma": [3, 1]}]}),
            "blur sigma",
        );
        bad(
            serde_json::json!({"dataset": "d", "transforms": [{"op": "flip", "p": 2}]}),
            "probability",
        );
        bad(
            serde_json::json!({"dataset": "d", "transforms": [{"op": "swirl"}]}),
            "swirl",
        );
        bad(
            serde_json::json!({"dataset": "d", "transforms": [{"op": "flip", "angle": 3}]}),
            "angle",
        );
        bad(
            serde_json::json!({"dataset": "d", "variants": 0, "captions": {"paraphrase": "rules"}}),
            "variants 0",
        );
        bad(
            serde_json::json!({"dataset": "d", "captions": {"hard_negatives": {"edits": [], "neighbours": 0}}}),
            "no edit",
        );
        bad(
            serde_json::json!({"dataset": "d", "captions": {"hard_negatives": {"edits": ["neighbour"]}}}),
            "not an edit",
        );
        let n =
            spec(serde_json::json!({"dataset": "d", "captions": {"hard_negatives": {}}})).unwrap();
        assert!(n.check().is_ok());
        assert!(!n.makes_variants());
        assert_eq!(
            n.captions.hard_negatives.unwrap().edits,
            NegativeKind::EDITS.to_vec()
        );
    }

    #[test]
    fn steps_round_trip_through_json() {
        let steps = vec![
            Step::Resize {
                width: 10,
                height: 8,
            },
            Step::Rotate {
                degrees: -3.5,
                fill: [0, 0, 0],
            },
            Step::Jpeg { quality: 40 },
        ];
        let j = serde_json::to_string(&steps).unwrap();
        assert!(
            j.contains(r#"{"op":"resize","width":10,"height":8}"#),
            "{j}"
        );
        let back: Vec<Step> = serde_json::from_str(&j).unwrap();
        assert_eq!(back, steps);
    }
}
