//! `atelier train lora|dreambooth`: build a training spec from flags (over an optional JSON or
//! TOML file of kohya-named fields), upload a kohya-style folder (`img.png` + `img.txt`) when
//! given one, submit, and follow the job.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use atelier_contracts::{TrainData, TrainImage, TrainSpec};
use serde_json::{json, Value};

use atelier_client::Client;

/// What every training command takes.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// Base model in the registry.
    #[arg(long)]
    pub model: String,
    /// The LoRA's name: samplers find it as `<lora:NAME:1>` once the job succeeds.
    #[arg(long)]
    pub name: String,
    /// A folder of images with kohya-style captions beside them (`a.png` + `a.txt` or
    /// `a.caption`); uploaded through the gateway.
    #[arg(long, conflicts_with = "dataset")]
    pub images: Option<PathBuf>,
    /// Train on a dataset version (accepted rows of the train split) instead.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Dataset version (default: latest).
    #[arg(long, requires = "dataset")]
    pub version: Option<u32>,
    /// Also train on rows the quality filter flagged.
    #[arg(long, requires = "dataset")]
    pub include_flagged: bool,
    /// A JSON or TOML file of training fields with kohya's names (network.rank, unet_lr,
    /// lr_scheduler, min_snr_gamma, ...); the flags below override it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// network_dim.
    #[arg(long)]
    pub rank: Option<i64>,
    /// network_alpha.
    #[arg(long)]
    pub alpha: Option<f64>,
    /// conv_dim (LoCon on the ResNet convolutions).
    #[arg(long)]
    pub conv_rank: Option<i64>,
    /// max_train_steps.
    #[arg(long)]
    pub steps: Option<u32>,
    /// UNet learning rate.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Also train the text encoder, at this learning rate.
    #[arg(long)]
    pub text_encoder_lr: Option<f64>,
    #[arg(long)]
    pub lr_scheduler: Option<String>,
    /// Training resolution (a multiple of 64).
    #[arg(long)]
    pub resolution: Option<u32>,
    #[arg(long)]
    pub batch_size: Option<u32>,
    #[arg(long)]
    pub repeats: Option<u32>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// Render this prompt with the LoRA (repeatable); every --sample-every steps and at the end.
    #[arg(long = "sample-prompt")]
    pub sample_prompts: Vec<String>,
    #[arg(long)]
    pub sample_every: Option<u32>,
    /// Print the queued job and return instead of following it.
    #[arg(long)]
    pub detach: bool,
}

/// DreamBooth's extra flags.
#[derive(clap::Args, Debug, Clone)]
pub struct DreamBoothArgs {
    /// Caption of every instance image, with the identifier, e.g. "a photo of sks dog".
    #[arg(long)]
    pub instance_prompt: String,
    /// The class the identifier belongs to, e.g. "a photo of dog".
    #[arg(long)]
    pub class_prompt: String,
    #[arg(long, default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    #[arg(long, default_value_t = 100)]
    pub num_class_images: u32,
}

/// Image files with their sidecar captions, uploaded.
pub async fn upload_folder(client: &Client, dir: &Path) -> anyhow::Result<Vec<TrainImage>> {
    let files = crate::ingest::image_files(dir)?;
    if files.is_empty() {
        bail!(
            "{} has no images (jpg, png, webp, bmp, tiff): put the training images there, each with a .txt caption beside it",
            dir.display()
        );
    }
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        let caption = ["txt", "caption"]
            .iter()
            .map(|ext| f.with_extension(ext))
            .find(|p| p.is_file())
            .map(|p| {
                std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
            })
            .transpose()?
            .unwrap_or_default();
        let up = client
            .upload(bytes.into(), crate::ingest::content_type(&f))
            .await
            .with_context(|| format!("uploading {}", f.display()))?;
        out.push(TrainImage {
            image: up.artifact.key,
            caption: caption.trim().to_string(),
        });
    }
    Ok(out)
}

/// The spec the flags describe (`images` already uploaded when the source is a folder).
pub fn build_spec(
    args: &TrainArgs,
    images: Option<Vec<TrainImage>>,
    dreambooth: Option<&DreamBoothArgs>,
) -> anyhow::Result<TrainSpec> {
    let mut v: Value = match &args.config {
        None => json!({}),
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            if p.extension().is_some_and(|e| e == "toml") {
                let t: toml::Value = toml::from_str(&text)
                    .with_context(|| format!("{} is not valid TOML", p.display()))?;
                serde_json::to_value(t)?
            } else {
                serde_json::from_str(&text)
                    .with_context(|| format!("{} is not valid JSON", p.display()))?
            }
        }
    };
    let Some(obj) = v.as_object_mut() else {
        bail!("the config file must hold a table of training fields");
    };
    obj.insert("base_model".into(), json!(args.model));
    obj.insert("output_name".into(), json!(args.name));
    let data = match (images, &args.dataset) {
        (Some(images), _) => TrainData::Images { images },
        (None, Some(d)) => TrainData::Dataset {
            dataset: d.clone(),
            version: args.version,
            splits: vec!["train".into()],
            include_flagged: args.include_flagged,
        },
        (None, None) => match obj.get("data") {
            Some(d) => serde_json::from_value(d.clone()).context("the config's `data`")?,
            None => bail!("say what to train on: --images DIR or --dataset NAME"),
        },
    };
    obj.insert("data".into(), serde_json::to_value(data)?);
    let mut set = |path: &[&str], value: Value| {
        let mut cur = &mut *obj;
        for p in &path[..path.len() - 1] {
            let next = cur.entry(p.to_string()).or_insert_with(|| json!({}));
            if !next.is_object() {
                *next = json!({});
            }
            cur = next.as_object_mut().expect("made an object above");
        }
        cur.insert(path[path.len() - 1].to_string(), value);
    };
    if let Some(r) = args.rank {
        set(&["network", "rank"], json!(r));
    }
    if let Some(a) = args.alpha {
        set(&["network", "alpha"], json!(a));
    }
    if let Some(c) = args.conv_rank {
        set(&["network", "conv_rank"], json!(c));
    }
    if let Some(lr) = args.text_encoder_lr {
        set(&["network", "train_text_encoder"], json!(true));
        set(&["text_encoder_lr"], json!(lr));
    }
    for (k, val) in [
        ("max_train_steps", args.steps.map(|x| json!(x))),
        ("unet_lr", args.lr.map(|x| json!(x))),
        ("lr_scheduler", args.lr_scheduler.as_ref().map(|x| json!(x))),
        ("resolution", args.resolution.map(|x| json!(x))),
        ("batch_size", args.batch_size.map(|x| json!(x))),
        ("repeats", args.repeats.map(|x| json!(x))),
        ("seed", args.seed.map(|x| json!(x))),
        ("sample_every", args.sample_every.map(|x| json!(x))),
    ] {
        if let Some(val) = val {
            set(&[k], val);
        }
    }
    if !args.sample_prompts.is_empty() {
        set(&["sample_prompts"], json!(args.sample_prompts));
    }
    if let Some(db) = dreambooth {
        set(
            &["dreambooth"],
            json!({
                "instance_prompt": db.instance_prompt,
                "class_prompt": db.class_prompt,
                "prior_loss_weight": db.prior_loss_weight,
                "num_class_images": db.num_class_images,
            }),
        );
    }
    let spec: TrainSpec = serde_json::from_value(v).context("the training settings")?;
    if let Err(e) = spec.check() {
        bail!("{e}");
    }
    Ok(spec)
}

/// Upload (when given a folder), submit and, unless detached, follow until the job ends.
pub async fn run(
    client: &Client,
    args: &TrainArgs,
    dreambooth: Option<&DreamBoothArgs>,
) -> anyhow::Result<atelier_contracts::JobRecord> {
    // Check the flags before uploading anything.
    let probe = args.images.as_ref().map(|_| {
        vec![TrainImage {
            image: "uploads/check/only".into(),
            caption: String::new(),
        }]
    });
    build_spec(args, probe, dreambooth)?;
    let images = match &args.images {
        Some(dir) => Some(upload_folder(client, dir).await?),
        None => None,
    };
    let spec = build_spec(args, images, dreambooth)?;
    let record = client.train(&spec).await?;
    eprintln!("training job {} queued", record.id);
    if args.detach {
        return Ok(record);
    }
    client
        .follow(&record.id.to_string(), |r| {
            if let Some(p) = &r.progress {
                eprintln!(
                    "{:?} {:.0}% {}",
                    r.state,
                    p.fraction * 100.0,
                    p.message.as_deref().unwrap_or("")
                );
            }
        })
        .await
}

#[derive(clap::Subcommand)]
pub enum TrainCmd {
    /// LoRA on a dataset version or a folder of captioned images.
    Lora {
        #[command(flatten)]
        train: Box<TrainArgs>,
        #[command(flatten)]
        remote: crate::remote::Remote,
    },
    /// DreamBooth with a LoRA: instance images plus prior preservation with class images the
    /// sampler generates.
    Dreambooth {
        #[command(flatten)]
        train: Box<TrainArgs>,
        #[command(flatten)]
        dreambooth: DreamBoothArgs,
        #[command(flatten)]
        remote: crate::remote::Remote,
    },
}

/// `atelier train lora | dreambooth`.
pub async fn command(cmd: TrainCmd) -> anyhow::Result<()> {
    let (train, dreambooth, remote) = match cmd {
        TrainCmd::Lora { train, remote } => (train, None, remote),
        TrainCmd::Dreambooth {
            train,
            dreambooth,
            remote,
        } => (train, Some(dreambooth), remote),
    };
    let client = remote.client()?;
    let done = run(&client, &train, dreambooth.as_ref()).await?;
    if train.detach {
        crate::remote::print_json(&done)
    } else {
        crate::remote::report(&done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> TrainArgs {
        TrainArgs {
            model: "tiny".into(),
            name: "mine".into(),
            images: None,
            dataset: Some("cats".into()),
            version: Some(2),
            include_flagged: false,
            config: None,
            rank: Some(8),
            alpha: Some(4.0),
            conv_rank: None,
            steps: Some(50),
            lr: Some(2e-4),
            text_encoder_lr: Some(1e-5),
            lr_scheduler: Some("cosine".into()),
            resolution: Some(512),
            batch_size: None,
            repeats: None,
            seed: Some(9),
            sample_prompts: vec!["a cat".into()],
            sample_every: Some(10),
            detach: true,
        }
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("train.toml");
        std::fs::write(
            &cfg,
            "min_snr_gamma = 5.0\nunet_lr = 1.0e-3\n[network]\nrank = 32\nconv_rank = 4\n",
        )
        .unwrap();
        let mut a = args();
        a.config = Some(cfg);
        let s = build_spec(&a, None, None).unwrap();
        assert_eq!(s.network.rank, 8, "flag wins");
        assert_eq!(s.network.conv_rank, Some(4), "file kept");
        assert_eq!(s.min_snr_gamma, Some(5.0));
        assert_eq!(s.unet_lr, 2e-4);
        assert!(s.network.train_text_encoder);
        assert_eq!(s.text_encoder_lr, 1e-5);
        assert_eq!(s.lr_scheduler, "cosine");
        assert!(matches!(
            s.data,
            TrainData::Dataset {
                version: Some(2),
                ..
            }
        ));
        assert_eq!(s.sample_prompts, vec!["a cat".to_string()]);
    }

    #[test]
    fn bad_flags_say_what_to_fix() {
        let mut a = args();
        a.rank = Some(0);
        let e = build_spec(&a, None, None).unwrap_err().to_string();
        assert!(e.contains("network.rank"), "{e}");
        let mut a = args();
        a.resolution = Some(500);
        assert!(build_spec(&a, None, None)
            .unwrap_err()
            .to_string()
            .contains("multiple of 64"));
        let mut a = args();
        a.dataset = None;
        assert!(build_spec(&a, None, None)
            .unwrap_err()
            .to_string()
            .contains("--images DIR or --dataset NAME"));
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("t.json");
        std::fs::write(&cfg, r#"{"network_dim": 8}"#).unwrap();
        let mut a = args();
        a.config = Some(cfg);
        let e = format!("{:#}", build_spec(&a, None, None).unwrap_err());
        assert!(e.contains("network_dim"), "{e}");
    }

    #[test]
    fn dreambooth_flags_make_the_dreambooth_part() {
        let db = DreamBoothArgs {
            instance_prompt: "a photo of sks dog".into(),
            class_prompt: "a photo of dog".into(),
            prior_loss_weight: 0.5,
            num_class_images: 12,
        };
        let s = build_spec(&args(), None, Some(&db)).unwrap();
        let d = s.dreambooth.unwrap();
        assert_eq!(d.num_class_images, 12);
        assert_eq!(d.prior_loss_weight, 0.5);
    }
}
