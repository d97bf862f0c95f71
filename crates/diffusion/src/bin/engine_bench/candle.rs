//! The items on the candle engine.

use atelier_diffusion::models::nn::Ops;
use atelier_diffusion::models::shapes::RandomWeights;
use atelier_diffusion::models::unet::{AddedCond, UNet};
use atelier_diffusion::models::vae::Vae;
use atelier_diffusion::pipeline::{Family, SingleFileConfig};
use candle_core::{DType, Device, Tensor};

use super::common::{euler_sigmas, euler_timestep, time, Args};

fn setup(args: &Args) -> anyhow::Result<(Device, DType)> {
    let device = if args.cuda {
        atelier_diffusion::kernels::cuda_device(0)?
    } else {
        Device::Cpu
    };
    let dtype = match args.dtype.as_str() {
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => DType::F32,
    };
    Ok((device, dtype))
}

fn unet(family: Family, device: &Device, dtype: DType, ops: Ops) -> anyhow::Result<UNet> {
    let cfg = SingleFileConfig::standard(family, 4);
    let w = RandomWeights::unrecorded(7)
        .var_builder(device)
        .set_dtype(dtype);
    Ok(UNet::new(w, cfg.unet, ops)?)
}

fn vae(device: &Device) -> anyhow::Result<Vae> {
    let cfg = SingleFileConfig::standard(Family::Sd1, 4);
    Ok(Vae::new(
        RandomWeights::unrecorded(8).var_builder(device),
        cfg.vae,
    )?)
}

pub fn run(args: &Args) -> anyhow::Result<f64> {
    let (dev, dtype) = setup(args)?;
    let sync = || {
        let _ = dev.synchronize();
    };
    let s = args.latent;
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
    match args.item.as_str() {
        "unet_sd15" | "unet_sdxl" => {
            let sdxl = args.item == "unet_sdxl";
            let family = if sdxl { Family::Sdxl } else { Family::Sd1 };
            let u = unet(family, &dev, dtype, Ops::INFERENCE)?;
            let x = randn(&[2, 4, s, s])?.to_dtype(dtype)?;
            let ctx = randn(&[2, 77, u.config.cross_attention_dim])?.to_dtype(dtype)?;
            let t = Tensor::new(&[500f32, 500.], &dev)?;
            let added = sdxl.then(|| -> anyhow::Result<AddedCond> {
                let px = (s * 8) as f32;
                Ok(AddedCond {
                    text_embeds: randn(&[2, 1280])?.to_dtype(dtype)?,
                    time_ids: Tensor::new(&[[px, px, 0., 0., px, px]; 2], &dev)?,
                })
            });
            let added = added.transpose()?;
            time(
                args,
                || {
                    u.forward(&x, &t, &ctx, added.as_ref())?;
                    Ok(())
                },
                sync,
            )
        }
        "vae_decode" => {
            let v = vae(&dev)?;
            let z = randn(&[1, 4, s, s])?;
            time(
                args,
                || {
                    v.decode(&z)?;
                    Ok(())
                },
                sync,
            )
        }
        "txt2img" => txt2img(args, &dev, dtype),
        _ => lora_step(args, &dev, dtype),
    }
}

fn txt2img(args: &Args, dev: &Device, dtype: DType) -> anyhow::Result<f64> {
    let u = unet(Family::Sd1, dev, dtype, Ops::INFERENCE)?;
    let v = vae(dev)?;
    let s = args.latent;
    let ctx = Tensor::randn(0f32, 1.0, (2, 77, 768), dev)?.to_dtype(dtype)?;
    let sigmas = euler_sigmas(args.steps);
    let sync = || {
        let _ = dev.synchronize();
    };
    time(
        args,
        || {
            let mut x = (Tensor::randn(0f32, 1.0, (1, 4, s, s), dev)? * sigmas[0])?;
            for i in 0..args.steps {
                let sigma = sigmas[i];
                let inp = (Tensor::cat(&[&x, &x], 0)? / (sigma * sigma + 1.0).sqrt())?;
                let t = Tensor::full(euler_timestep(i, args.steps) as f32, 2, dev)?;
                let eps = u
                    .forward(&inp.to_dtype(dtype)?, &t, &ctx, None)?
                    .to_dtype(DType::F32)?;
                let (un, co) = (eps.narrow(0, 0, 1)?, eps.narrow(0, 1, 1)?);
                let guided = (&un + ((co - &un)? * 7.5)?)?;
                x = (x + (guided * (sigmas[i + 1] - sigma))?)?;
            }
            drop(v.decode(&(x * 0.18215)?)?);
            Ok(())
        },
        sync,
    )
}

fn lora_step(_: &Args, _: &Device, _: DType) -> anyhow::Result<f64> {
    anyhow::bail!(
        "the trainer runs on libtorch: candle's LoRA training left the tree (its last figures, \
         2026-12-06, are in docs/benchmarks.md)"
    )
}
