//! Textual inversion (A1111's `create/embedding` and `train/embedding`): an embedding is a few
//! token vectors per text encoder, found by its name in prompts. The trainer creates one from an
//! initial text and trains it against a dataset with the model frozen; both publish it as
//! `embeddings/NAME.safetensors` in the object store, where samplers look for embeddings.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::ArtifactRef;

/// Create an embedding (trainer): `num_vectors` rows from `init_text`'s token embeddings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateEmbeddingSpec {
    /// The model whose text encoders' token table starts the vectors.
    pub base_model: String,
    /// The embedding's name: what prompts write to use it.
    pub name: String,
    #[serde(default = "d_vectors")]
    pub num_vectors: u32,
    /// Its token embeddings start the vectors (spread over them as A1111 does); empty: zeros.
    #[serde(default = "d_init")]
    pub init_text: String,
    /// Replace an embedding of that name; otherwise one that exists is an error.
    #[serde(default)]
    pub overwrite: bool,
}

fn d_vectors() -> u32 {
    1
}
fn d_init() -> String {
    "*".into()
}
fn d_rate() -> String {
    "0.005".into()
}
fn d_templates() -> Vec<String> {
    vec!["[filewords]".into()]
}

/// The most vectors one embedding may take (A1111's prompt chunk is 75 tokens).
pub const MAX_VECTORS: u32 = 75;

impl CreateEmbeddingSpec {
    pub fn check(&self) -> Result<(), String> {
        if self.base_model.trim().is_empty() {
            return Err("base_model is empty: name a model in the registry".into());
        }
        check_embedding_name(&self.name)?;
        if self.num_vectors == 0 || self.num_vectors > MAX_VECTORS {
            return Err(format!(
                "num_vectors must be 1..={MAX_VECTORS} (got {})",
                self.num_vectors
            ));
        }
        Ok(())
    }
}

/// An embedding name: a file name under `embeddings/` and a word prompts can hold.
pub fn check_embedding_name(name: &str) -> Result<(), String> {
    crate::train::check_file_stem("embedding name", name)
}

/// Textual-inversion training (`TrainSpec.embedding`): the spec's `output_name` is the
/// embedding, created first (`create_embedding`) or made here from `init_text`; only its vectors
/// train, the model stays frozen. `max_train_steps` is the embedding's total step count, as
/// A1111's `steps`: an embedding already trained to step s trains from s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingTrainSpec {
    /// A1111's learning-rate schedule: `0.005`, or `rate:until_step` pairs such as
    /// `0.05:10, 0.02:20, 0.01` (the last rate holds to the end).
    #[serde(default = "d_rate")]
    pub learn_rate: String,
    /// Prompt templates, one picked per image and step: `[name]` becomes the embedding's name,
    /// `[filewords]` the image's caption.
    #[serde(default = "d_templates")]
    pub templates: Vec<String>,
    /// Vectors, when no embedding of this name exists yet.
    #[serde(default = "d_vectors")]
    pub num_vectors: u32,
    /// Initial text, when no embedding of this name exists yet.
    #[serde(default = "d_init")]
    pub init_text: String,
}

impl Default for EmbeddingTrainSpec {
    fn default() -> Self {
        Self {
            learn_rate: d_rate(),
            templates: d_templates(),
            num_vectors: d_vectors(),
            init_text: d_init(),
        }
    }
}

impl EmbeddingTrainSpec {
    pub fn check(&self, max_steps: u32) -> Result<(), String> {
        LearnRate::parse(&self.learn_rate, max_steps)?;
        if self.templates.is_empty() || self.templates.iter().all(|t| t.trim().is_empty()) {
            return Err("embedding.templates is empty: give at least one line, e.g. \"a photo of [name], [filewords]\"".into());
        }
        if self.num_vectors == 0 || self.num_vectors > MAX_VECTORS {
            return Err(format!(
                "embedding.num_vectors must be 1..={MAX_VECTORS} (got {})",
                self.num_vectors
            ));
        }
        Ok(())
    }

    /// The caption template `pick` of the non-empty lines, filled for `name` and `filewords`.
    pub fn prompt(&self, pick: usize, name: &str, filewords: &str) -> String {
        let lines: Vec<&str> = self
            .templates
            .iter()
            .map(|t| t.trim())
            .filter(|t| !t.is_empty())
            .collect();
        let line = lines.get(pick % lines.len().max(1)).copied().unwrap_or("");
        line.replace("[name]", name)
            .replace("[filewords]", filewords)
    }
}

/// A1111's piecewise-constant learning rate: each rate holds until its step (exclusive).
#[derive(Debug, Clone, PartialEq)]
pub struct LearnRate {
    pub rates: Vec<(f64, u32)>,
}

impl LearnRate {
    /// Parse `0.005` or `0.05:10, 0.02:20, 0.01` for a run of `max_steps`; pairs ending at or
    /// before an earlier pair's end are skipped, `:-1` means "to the end", as A1111 reads them.
    pub fn parse(text: &str, max_steps: u32) -> Result<Self, String> {
        let mut rates: Vec<(f64, u32)> = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (rate, until) = match part.split_once(':') {
                Some((r, s)) => (r.trim(), Some(s.trim())),
                None => (part, None),
            };
            let rate: f64 = rate
                .parse()
                .ok()
                .filter(|r: &f64| r.is_finite() && *r > 0.0)
                .ok_or_else(|| format!("learn_rate {text:?}: {rate:?} is not a positive number"))?;
            let until = match until {
                None | Some("-1") => None,
                Some(s) => Some(s.parse::<u32>().map_err(|_| {
                    format!("learn_rate {text:?}: step {s:?} is not a whole number (or -1)")
                })?),
            };
            let last = rates.last().map_or(0, |r| r.1);
            match until {
                Some(s) if s <= last => continue,
                Some(s) if s < max_steps => rates.push((rate, s)),
                _ => {
                    rates.push((rate, max_steps.max(last + 1)));
                    break;
                }
            }
        }
        if rates.is_empty() {
            return Err(format!(
                "learn_rate {text:?} has no rate: write e.g. 0.005 or 0.05:10, 0.005"
            ));
        }
        Ok(Self { rates })
    }

    /// The rate at optimizer step `step` (0-based); past the last pair's end, the last rate.
    pub fn at(&self, step: u32) -> f64 {
        self.rates
            .iter()
            .find(|(_, until)| step < *until)
            .or(self.rates.last())
            .map_or(0.0, |r| r.0)
    }
}

/// What `create_embedding` made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, ToSchema)]
pub struct EmbeddingOutput {
    pub name: String,
    /// The file (content-addressed).
    pub embedding: ArtifactRef,
    /// Where samplers find it: `embeddings/NAME.safetensors`.
    pub published_as: String,
    pub vectors: u32,
    /// Its width per text encoder (768; SDXL: 768 and 1280).
    pub widths: Vec<u32>,
    /// Steps it has been trained (0 when created).
    pub step: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learn_rates_read_as_a1111() {
        let lr = LearnRate::parse("0.005", 100).unwrap();
        assert_eq!(lr.rates, vec![(0.005, 100)]);
        let lr = LearnRate::parse("0.05:10, 0.02:20, 0.01", 100).unwrap();
        assert_eq!(lr.rates, vec![(0.05, 10), (0.02, 20), (0.01, 100)]);
        assert_eq!(
            (lr.at(0), lr.at(9), lr.at(10), lr.at(19)),
            (0.05, 0.05, 0.02, 0.02)
        );
        assert_eq!((lr.at(20), lr.at(99), lr.at(500)), (0.01, 0.01, 0.01));
        // A pair past the run's end ends the schedule there; -1 means to the end.
        let lr = LearnRate::parse("0.05:10, 0.02:500, 0.01", 100).unwrap();
        assert_eq!(lr.rates, vec![(0.05, 10), (0.02, 100)]);
        let lr = LearnRate::parse("0.05:-1, 0.01", 100).unwrap();
        assert_eq!(lr.rates, vec![(0.05, 100)]);
        // A pair that ends before the one before it is skipped.
        let lr = LearnRate::parse("0.05:10, 0.04:5, 0.01", 100).unwrap();
        assert_eq!(lr.rates, vec![(0.05, 10), (0.01, 100)]);
    }

    #[test]
    fn bad_learn_rates_say_what_to_write() {
        for bad in ["", "fast", "0.01:ten", "-0.1", "0:10"] {
            let e = LearnRate::parse(bad, 10).expect_err(bad);
            assert!(e.contains("learn_rate"), "{e}");
        }
    }

    #[test]
    fn templates_fill_name_and_filewords() {
        let spec = EmbeddingTrainSpec {
            templates: vec![
                "a photo of [name]".into(),
                " ".into(),
                "[name], [filewords]".into(),
            ],
            ..Default::default()
        };
        assert_eq!(spec.prompt(0, "tok", "a cat"), "a photo of tok");
        assert_eq!(spec.prompt(1, "tok", "a cat"), "tok, a cat");
        assert_eq!(spec.prompt(2, "tok", "a cat"), "a photo of tok");
        assert!(spec.check(10).is_ok());
    }

    #[test]
    fn create_specs_are_checked() {
        let mut s = CreateEmbeddingSpec {
            base_model: "tiny".into(),
            name: "my-style".into(),
            num_vectors: 4,
            init_text: "painting".into(),
            overwrite: false,
        };
        assert!(s.check().is_ok());
        s.num_vectors = 0;
        assert!(s.check().unwrap_err().contains("num_vectors"));
        s.num_vectors = 2;
        s.name = "../x".into();
        assert!(s.check().unwrap_err().contains("embedding name"));
    }
}
