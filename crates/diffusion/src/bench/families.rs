//! The families' native geometries and what one image costs in each.

use atelier_modelkit::shapes::RandomWeights;
use tch::{Device, Kind, Tensor};

use super::{peak_rss_mib, time_ms, Options, Row};
use crate::models::config::{ClipConfig, VaeConfig};
use crate::pipeline::{Family as UnetFamily, SingleFileConfig};
use crate::torch::clip::ClipTextModel;
use crate::torch::flux::{image_ids, FluxConfig, FluxInput, FluxTransformer};
use crate::torch::mmdit::{Sd3Config, Sd3Transformer};
use crate::torch::t5::{T5Config, T5Encoder};
use crate::torch::unet::{AddedCond, UNet};
use crate::torch::vae::Vae;
use crate::torch::weights::{Recorder, Weights};
use crate::torch::Result;

/// A family the bench runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Sd15,
    Sdxl,
    Sd35Medium,
    FluxDev,
}

pub const FAMILIES: [(&str, Family); 4] = [
    ("sd15", Family::Sd15),
    ("sdxl", Family::Sdxl),
    ("sd35", Family::Sd35Medium),
    ("flux", Family::FluxDev),
];

impl Family {
    pub fn parse(name: &str) -> Option<Self> {
        FAMILIES.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    pub fn label(self) -> &'static str {
        match self {
            Family::Sd15 => "SD 1.5",
            Family::Sdxl => "SDXL",
            Family::Sd35Medium => "SD 3.5 Medium",
            Family::FluxDev => "FLUX.1-dev",
        }
    }
}

/// T5 v1.1 XXL, the third / second text encoder of SD 3.5 and FLUX.
fn t5_xxl() -> T5Config {
    T5Config {
        vocab_size: 32128,
        d_model: 4096,
        d_kv: 64,
        d_ff: 10240,
        num_heads: 64,
        num_layers: 24,
        buckets: 32,
        max_distance: 128,
        eps: 1e-6,
    }
}

/// The 16-channel VAE of SD 3 and FLUX.
fn vae16(scaling_factor: f64, shift: f64) -> VaeConfig {
    VaeConfig {
        latent_channels: 16,
        scaling_factor,
        shift_factor: Some(shift),
        use_quant_conv: false,
        use_post_quant_conv: false,
        sample_size: 1024,
        ..VaeConfig::default()
    }
}

/// One component: how to build it on weights, and what one call of it does.
type Build<'a, T> = &'a dyn Fn(&Weights) -> Result<T>;

/// Parameters of a model built on a [`Recorder`] (no memory taken).
fn count<T>(build: Build<T>) -> Result<u64> {
    let rec = Recorder::default();
    build(&rec.weights())?;
    Ok(rec
        .shapes()
        .values()
        .map(|s| s.iter().product::<usize>() as u64)
        .sum())
}

fn random(opts: &Options, kind: Kind, salt: u64) -> Weights {
    Weights::from_backend(
        RandomWeights::unrecorded(opts.seed + salt),
        kind,
        opts.device,
    )
}

/// Builds the component on random weights, times `call` on it, drops it.
fn timed<T>(
    opts: &Options,
    kind: Kind,
    salt: u64,
    build: Build<T>,
    call: &dyn Fn(&T) -> Result<()>,
) -> Result<f64> {
    let m = build(&random(opts, kind, salt))?;
    let ms = time_ms(opts, || call(&m))?;
    drop(m);
    Ok(ms)
}

fn ids(opts: &Options, vocab: usize, n: i64) -> Tensor {
    Tensor::randint(vocab as i64 - 1, [1, n], (Kind::Int64, opts.device))
}

fn randn(opts: &Options, shape: &[i64]) -> Tensor {
    Tensor::randn(shape, (Kind::Float, opts.device))
}

/// A CLIP text tower: build and time one prompt.
fn clip(opts: &Options, cfg: ClipConfig, proj: bool, salt: u64, params: &mut u64) -> Result<f64> {
    let c2 = cfg.clone();
    let build = move |w: &Weights| ClipTextModel::new(w, c2.clone(), proj);
    *params += count(&build)?;
    let vocab = cfg.vocab_size;
    timed(opts, opts.kind, salt, &build, &|m| {
        m.forward(&ids(opts, vocab, 77)).map(|_| ())
    })
}

fn t5(opts: &Options, tokens: i64, salt: u64, params: &mut u64) -> Result<f64> {
    let build = |w: &Weights| T5Encoder::new(w, t5_xxl());
    *params += count(&build)?;
    timed(opts, opts.kind, salt, &build, &|m| {
        m.forward(&ids(opts, 32128, tokens)).map(|_| ())
    })
}

fn vae(opts: &Options, cfg: VaeConfig, latent: &[i64], params: &mut u64) -> Result<f64> {
    let c2 = cfg.clone();
    let build = move |w: &Weights| Vae::new(w, c2.clone());
    *params += count(&build)?;
    let z = randn(opts, latent);
    timed(opts, Kind::Float, 90, &build, &|m| {
        let _ = m.decode(&z);
        Ok(())
    })
}

pub(super) fn run(family: Family, opts: &Options) -> Result<Row> {
    let mut row = Row {
        family: family.label().into(),
        geometry: String::new(),
        denoiser_params: 0,
        total_params: 0,
        dtype: match opts.kind {
            Kind::BFloat16 => "bf16",
            Kind::Half => "f16",
            _ => "f32",
        }
        .into(),
        step_ms: 0.0,
        image_s: 0.0,
        steps: opts.steps,
        text_ms: 0.0,
        vae_ms: 0.0,
        peak_mib: 0,
        note: String::new(),
    };
    let mut params = 0u64;
    let cfg_batches = match family {
        Family::Sd15 => unet_family(opts, UnetFamily::Sd1, 64, &mut row, &mut params)?,
        Family::Sdxl => unet_family(opts, UnetFamily::Sdxl, 128, &mut row, &mut params)?,
        Family::Sd35Medium => sd35(opts, &mut row, &mut params)?,
        Family::FluxDev => flux(opts, &mut row, &mut params)?,
    };
    row.total_params = params;
    row.image_s =
        (row.text_ms * cfg_batches as f64 + row.step_ms * opts.steps as f64 + row.vae_ms) / 1000.0;
    row.peak_mib = match opts.device {
        Device::Cpu => peak_rss_mib(),
        _ => 0,
    };
    Ok(row)
}

/// SD 1.5 / SDXL: CLIP(s), the UNet on a CFG batch of 2, the 4-channel VAE. Returns the prompts
/// encoded per image (2: prompt and negative).
fn unet_family(
    opts: &Options,
    fam: UnetFamily,
    latent: i64,
    row: &mut Row,
    params: &mut u64,
) -> Result<usize> {
    let cfg = SingleFileConfig::standard(fam, 4);
    for (i, c) in cfg.text.iter().enumerate() {
        row.text_ms += clip(opts, c.clone(), i == 1, 10 + i as u64, params)?;
    }
    let ucfg = cfg.unet.clone();
    let build = move |w: &Weights| UNet::new(w, ucfg.clone());
    row.denoiser_params = count(&build)?;
    *params += row.denoiser_params;
    let x = randn(opts, &[2, 4, latent, latent]);
    let ctx = randn(opts, &[2, 77, cfg.unet.cross_attention_dim as i64]);
    let t = Tensor::from(500f32).to_device(opts.device);
    let added = (fam == UnetFamily::Sdxl).then(|| AddedCond {
        text_embeds: randn(opts, &[2, 1280]),
        time_ids: Tensor::from_slice(&[1024f32, 1024., 0., 0., 1024., 1024.])
            .to_device(opts.device)
            .repeat([2, 1]),
    });
    row.step_ms = timed(opts, opts.kind, 1, &build, &|m| {
        m.forward(&x, &t, &ctx, added.as_ref()).map(|_| ())
    })?;
    row.vae_ms = vae(opts, cfg.vae.clone(), &[1, 4, latent, latent], params)?;
    row.geometry = format!("{0}×{0}, UNet batch 2 (CFG)", latent * 8);
    Ok(2)
}

fn sd35(opts: &Options, row: &mut Row, params: &mut u64) -> Result<usize> {
    let text = SingleFileConfig::standard(UnetFamily::Sdxl, 4).text;
    for (i, c) in text.iter().enumerate() {
        row.text_ms += clip(opts, c.clone(), true, 10 + i as u64, params)?;
    }
    row.text_ms += t5(opts, 256, 12, params)?;
    let cfg = Sd3Config::default();
    let c2 = cfg.clone();
    let build = move |w: &Weights| Sd3Transformer::new(w, c2.clone());
    row.denoiser_params = count(&build)?;
    *params += row.denoiser_params;
    let x = randn(opts, &[2, 16, 128, 128]);
    let ctx = randn(opts, &[2, 77 + 256, cfg.joint_attention_dim as i64]);
    let pooled = randn(opts, &[2, cfg.pooled_projection_dim as i64]);
    let t = Tensor::from_slice(&[500f32, 500.]).to_device(opts.device);
    row.step_ms = timed(opts, opts.kind, 1, &build, &|m| {
        m.forward(&x, &t, &ctx, &pooled).map(|_| ())
    })?;
    row.vae_ms = vae(opts, vae16(1.5305, 0.0609), &[1, 16, 128, 128], params)?;
    row.geometry = "1024×1024, MMDiT batch 2 (CFG), T5 256 tokens".into();
    Ok(2)
}

fn flux(opts: &Options, row: &mut Row, params: &mut u64) -> Result<usize> {
    row.text_ms += clip(opts, ClipConfig::default(), false, 10, params)?;
    row.text_ms += t5(opts, 512, 12, params)?;
    let full = FluxConfig::default();
    let with = |double: usize, single: usize| FluxConfig {
        num_layers: double,
        num_single_layers: single,
        ..FluxConfig::default()
    };
    let build_full = |w: &Weights| FluxTransformer::new(w, full.clone());
    row.denoiser_params = count(&build_full)?;
    *params += row.denoiser_params;
    let x = randn(opts, &[1, 4096, 64]);
    let ctx = randn(opts, &[1, 512, 4096]);
    let pooled = randn(opts, &[1, 768]);
    let (t, g) = (Tensor::from_slice(&[0.5f32]), Tensor::from_slice(&[3.5f32]));
    let img_ids = image_ids(128, 128);
    let txt_ids = Tensor::zeros([512, 3], (Kind::Float, Device::Cpu));
    let call = |m: &FluxTransformer| {
        let _ = m.forward(&FluxInput {
            hidden: &x,
            context: &ctx,
            pooled: &pooled,
            timestep: &t,
            guidance: Some(&g),
            img_ids: &img_ids,
            txt_ids: &txt_ids,
        });
        Ok(())
    };
    let bytes = row.denoiser_params * opts.kind.elt_size_in_bytes() as u64;
    if opts.device == Device::Cpu && bytes > memory_bytes() / 2 {
        let time = |d: usize, s: usize| {
            let c = with(d, s);
            timed(
                opts,
                opts.kind,
                1,
                &move |w: &Weights| FluxTransformer::new(w, c.clone()),
                &call,
            )
        };
        let (base, d2, s2) = (time(1, 1)?, time(2, 1)?, time(1, 2)?);
        let (per_double, per_single) = ((d2 - base).max(0.0), (s2 - base).max(0.0));
        row.step_ms = base
            + (full.num_layers - 1) as f64 * per_double
            + (full.num_single_layers - 1) as f64 * per_single;
        row.note = format!(
            "step from 1 double + 1 single block {base:.0} ms, +{per_double:.0} ms per double, +{per_single:.0} ms per single block (the {:.1} GB of weights exceed half this machine's memory)",
            bytes as f64 / 1e9
        );
    } else {
        row.step_ms = timed(opts, opts.kind, 1, &build_full, &call)?;
    }
    row.vae_ms = vae(opts, vae16(0.3611, 0.1159), &[1, 16, 128, 128], params)?;
    row.geometry = "1024×1024, 4096 image + 512 text tokens, guidance embedded (no CFG)".into();
    Ok(1)
}

/// The machine's memory in bytes (Linux `MemTotal`).
fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb * 1024)
}
