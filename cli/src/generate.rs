//! `atelier generate`: txt2img, img2img and inpainting here, on the CPU, without services.

use std::path::PathBuf;

use anyhow::Context as _;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A diffusers folder or a single-file .safetensors checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.0)]
    pub cfg_scale: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    /// Our name (euler_a, dpmpp_2m_karras, ...) or A1111's ("Euler a", ...).
    #[arg(long, default_value = "euler_a")]
    pub sampler: String,
    /// A1111's "Clip skip" (1: the last layer; prompt and negative prompt alike).
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// Count --clip-skip as diffusers' `clip_skip=k` instead (layer k + 1 from the end, for the
    /// prompt only; 0 skips nothing).
    #[arg(long)]
    pub diffusers_clip_skip: bool,
    /// Noise source: cpu (torch's CPU generator, as diffusers, ComfyUI and A1111's "CPU") or nv
    /// (A1111's "NV").
    #[arg(long, default_value = "cpu", value_parser = parse_source)]
    pub randn_source: atelier_diffusion::noise::RandnSource,
    /// A1111's variation seed (image i uses subseed + i).
    #[arg(long)]
    pub subseed: Option<u64>,
    /// A1111's variation strength, 0..=1.
    #[arg(long, default_value_t = 0.0)]
    pub subseed_strength: f64,
    /// img2img: the starting image.
    #[arg(long)]
    pub init: Option<PathBuf>,
    #[arg(long, default_value_t = 0.75)]
    pub strength: f64,
    /// inpaint: the mask (white is repainted).
    #[arg(long)]
    pub mask: Option<PathBuf>,
    #[arg(long, default_value_t = 4.0)]
    pub mask_blur: f32,
    /// LoRA files to apply, as PATH or PATH:WEIGHT.
    #[arg(long)]
    pub lora: Vec<String>,
    /// Folder for the PNGs.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

fn parse_source(s: &str) -> Result<atelier_diffusion::noise::RandnSource, String> {
    atelier_diffusion::noise::RandnSource::parse(s)
        .ok_or_else(|| format!("unknown noise source {s:?}: use cpu or nv"))
}

pub fn run(g: GenerateArgs) -> anyhow::Result<()> {
    use atelier_diffusion::lora::{LoraFile, LoraMode};
    use atelier_diffusion::pipeline::{Init, StableDiffusion, Txt2Img};
    use atelier_inpainter::mask::Mask;
    let sampler = crate::models::sampler(&g.sampler)?;
    let req = Txt2Img {
        prompt: g.prompt,
        negative_prompt: g.negative_prompt,
        steps: g.steps,
        cfg_scale: g.cfg_scale,
        seed: g.seed,
        width: g.width,
        height: g.height,
        batch_size: g.batch_size,
        sampler,
        clip_skip: g.clip_skip,
        clip_skip_convention: if g.diffusers_clip_skip {
            atelier_diffusion::pipeline::ClipSkipConvention::Diffusers
        } else {
            atelier_diffusion::pipeline::ClipSkipConvention::A1111
        },
        noise: atelier_diffusion::pipeline::NoiseOptions {
            source: g.randn_source,
            subseed: g.subseed,
            subseed_strength: g.subseed_strength,
            eta_noise_seed_delta: 0,
        },
    };
    req.validate().map_err(anyhow::Error::msg)?;
    let placement = atelier_diffusion::pipeline::Placement::from_env()?;
    let mut model = StableDiffusion::load(&g.model, placement)?;
    for l in &g.lora {
        let (path, weight) = match l.rsplit_once(':') {
            Some((p, w)) if w.parse::<f64>().is_ok() => (p, w.parse::<f64>()?),
            _ => (l.as_str(), 1.0),
        };
        let file = LoraFile::load(std::path::Path::new(path)).map_err(anyhow::Error::msg)?;
        let (m, applied) = model.with_lora(&file, weight, LoraMode::Merge)?;
        eprintln!(
            "{path}: {} layers applied, {} unmatched",
            applied.matched,
            applied.unmatched.len()
        );
        model = m;
    }
    let read = |p: &std::path::Path| -> anyhow::Result<image::DynamicImage> {
        image::open(p).with_context(|| format!("reading {}", p.display()))
    };
    let progress = |done: usize, total: usize| {
        eprint!("\rstep {done}/{total}");
        true
    };
    let images = match &g.init {
        None => model.txt2img(&req, progress)?,
        Some(init) => {
            let repaint = match &g.mask {
                Some(m) => Some(
                    Mask {
                        image: read(m)?.to_luma8(),
                        blur: g.mask_blur,
                        invert: false,
                        fill: Default::default(),
                        region: None,
                    }
                    .repaint(),
                ),
                None => None,
            };
            let init = Init {
                image: read(init)?.to_rgb8(),
                strength: g.strength,
                repaint,
                latents: None,
                latent_resize: false,
            };
            model.img2img(&req, &init, progress)?
        }
    };
    eprintln!();
    std::fs::create_dir_all(&g.out)?;
    for img in images {
        let path = g.out.join(format!("{}-{}.png", model.name, img.seed));
        std::fs::write(&path, img.png()?)?;
        println!("{}", path.display());
    }
    Ok(())
}
