//! `atelier augment`: seeded variants, paraphrases and hard negatives of a dataset version, over
//! `POST /v1/datasets/{name}/augment`.

use std::path::PathBuf;

use anyhow::{bail, Context};
use atelier_client::Client;
use atelier_contracts::augment::{
    FlipDirection, HardNegatives, NegativeKind, OutputFormat, Paraphrase, ResizeMode, Transform,
};
use atelier_contracts::{AugmentOutput, AugmentSpec, JobOutput};

#[derive(clap::Args, Debug, Clone)]
pub struct AugmentArgs {
    #[arg(long)]
    pub dataset: String,
    /// An augment spec (JSON or TOML: transforms, variants, keep_originals, captions, output,
    /// filter, include_flagged, seed, note); the flags below add to it.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// The version to augment (default: the latest).
    #[arg(long)]
    pub version: Option<u32>,
    /// A random crop covering at least this fraction of the area (up to all of it), first.
    #[arg(long)]
    pub random_crop: Option<f32>,
    /// Resize to this size (img2dataset's image_size).
    #[arg(long)]
    pub resize: Option<u32>,
    /// keep_ratio, keep_ratio_largest, center_crop or border.
    #[arg(long, default_value = "center_crop")]
    pub resize_mode: String,
    /// A horizontal flip with probability ½.
    #[arg(long)]
    pub flip: bool,
    /// A rotation by up to ± this many degrees.
    #[arg(long)]
    pub rotate: Option<f32>,
    /// Colour jitter: brightness, contrast and saturation by up to ± this fraction, hue by a
    /// quarter of it.
    #[arg(long)]
    pub jitter: Option<f32>,
    /// A Gaussian blur with σ up to this.
    #[arg(long)]
    pub blur: Option<f32>,
    /// A JPEG round trip at a quality in MIN-MAX (e.g. 30-90).
    #[arg(long)]
    pub jpeg_quality: Option<String>,
    /// Variants per row.
    #[arg(long)]
    pub variants: Option<u32>,
    /// Leave the parent's rows out of the new version.
    #[arg(long)]
    pub no_originals: bool,
    /// keep, rules or openai.
    #[arg(long)]
    pub paraphrase: Option<String>,
    /// Attach hard negatives (every caption-edit kind).
    #[arg(long)]
    pub negatives: bool,
    /// Also this many neighbours' captions from the index as negatives.
    #[arg(long)]
    pub neighbours: Option<u32>,
    /// jpeg or png.
    #[arg(long)]
    pub format: Option<String>,
    #[arg(long)]
    pub seed: Option<String>,
    #[arg(long)]
    pub note: Option<String>,
}

fn parse_mode(s: &str) -> anyhow::Result<ResizeMode> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).with_context(|| {
        format!(
            "--resize-mode {s:?}: expected keep_ratio, keep_ratio_largest, center_crop or border"
        )
    })
}

/// The spec from `--spec` and the flags.
pub fn spec(a: &AugmentArgs) -> anyhow::Result<AugmentSpec> {
    let mut v = crate::search::read_spec(a.spec.as_deref())?;
    let obj = v
        .as_object_mut()
        .context("the spec must be a table / object")?;
    obj.insert("dataset".into(), a.dataset.clone().into());
    let mut spec: AugmentSpec = serde_json::from_value(v).context("invalid augment spec")?;
    if a.version.is_some() {
        spec.version = a.version;
    }
    let t = &mut spec.transforms;
    if let Some(min) = a.random_crop {
        t.push(Transform::RandomCrop {
            scale: [min, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
        });
    }
    if let Some(size) = a.resize {
        t.push(Transform::Resize {
            size,
            mode: parse_mode(&a.resize_mode)?,
            only_if_bigger: false,
            border_color: [255; 3],
        });
    }
    if a.flip {
        t.push(Transform::Flip {
            direction: FlipDirection::Horizontal,
            p: 0.5,
        });
    }
    if let Some(degrees) = a.rotate {
        t.push(Transform::Rotate {
            degrees,
            fill: [0; 3],
        });
    }
    if let Some(x) = a.jitter {
        t.push(Transform::ColorJitter {
            brightness: x,
            contrast: x,
            saturation: x,
            hue: (x / 4.0).min(0.5),
        });
    }
    if let Some(s) = a.blur {
        t.push(Transform::Blur {
            sigma: [0.1f32.min(s), s],
            p: 1.0,
        });
    }
    if let Some(q) = &a.jpeg_quality {
        let (lo, hi) = q.split_once('-').unwrap_or((q, q));
        let parse = |s: &str| -> anyhow::Result<u8> {
            s.trim()
                .parse()
                .with_context(|| format!("--jpeg-quality {q:?}: write MIN-MAX, e.g. 30-90"))
        };
        t.push(Transform::Jpeg {
            quality: [parse(lo)?, parse(hi)?],
        });
    }
    if let Some(n) = a.variants {
        spec.variants = n;
    }
    if a.no_originals {
        spec.keep_originals = false;
    }
    if let Some(p) = &a.paraphrase {
        spec.captions.paraphrase = serde_json::from_value::<Paraphrase>(p.as_str().into())
            .with_context(|| format!("--paraphrase {p:?}: expected keep, rules or openai"))?;
    }
    if a.negatives || a.neighbours.is_some() {
        let n = spec.captions.hard_negatives.get_or_insert(HardNegatives {
            edits: if a.negatives {
                NegativeKind::EDITS.to_vec()
            } else {
                Vec::new()
            },
            neighbours: 0,
        });
        if let Some(k) = a.neighbours {
            n.neighbours = k;
        }
    }
    if let Some(f) = &a.format {
        spec.output.format = serde_json::from_value::<OutputFormat>(f.as_str().into())
            .with_context(|| format!("--format {f:?}: expected jpeg or png"))?;
    }
    if let Some(s) = &a.seed {
        spec.seed = s.clone();
    }
    if a.note.is_some() {
        spec.note = a.note.clone();
    }
    spec.check().map_err(anyhow::Error::msg)?;
    Ok(spec)
}

/// Augments and waits for the new version (following the job when the route stops waiting).
pub async fn run(client: &Client, spec: &AugmentSpec) -> anyhow::Result<AugmentOutput> {
    match client.augment(spec).await? {
        Ok(out) => Ok(out),
        Err(record) => {
            let done = client.follow(&record.id.to_string(), |_| {}).await?;
            match (done.output, done.error) {
                (Some(JobOutput::Augmented(out)), _) => Ok(out),
                (_, Some(e)) => bail!("augmentation failed: {} ({})", e.message, e.code),
                _ => bail!("the augment job ended {:?}", done.state),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: AugmentArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<AugmentSpec> {
        let cli = Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))?;
        spec(&cli.a)
    }

    #[test]
    fn flags_build_the_chain_in_order() {
        let s = parse(&[
            "--dataset",
            "d",
            "--random-crop",
            "0.5",
            "--resize",
            "64",
            "--flip",
            "--jitter",
            "0.2",
            "--jpeg-quality",
            "40-80",
            "--variants",
            "2",
            "--paraphrase",
            "rules",
            "--negatives",
            "--neighbours",
            "2",
        ])
        .unwrap();
        let ops: Vec<String> = s
            .transforms
            .iter()
            .map(|t| {
                serde_json::to_value(t).unwrap()["op"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect();
        assert_eq!(
            ops,
            ["random_crop", "resize", "flip", "color_jitter", "jpeg"]
        );
        assert_eq!(s.variants, 2);
        assert_eq!(s.captions.paraphrase, Paraphrase::Rules);
        assert_eq!(s.captions.hard_negatives.unwrap().neighbours, 2);
        let err = parse(&["--dataset", "d", "--resize", "64", "--resize-mode", "fit"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("keep_ratio"), "{err}");
        let err = parse(&["--dataset", "d"]).unwrap_err().to_string();
        assert!(err.contains("nothing to do"), "{err}");
        let err = parse(&["--dataset", "d", "--jpeg-quality", "high"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("MIN-MAX"), "{err}");
    }
}
