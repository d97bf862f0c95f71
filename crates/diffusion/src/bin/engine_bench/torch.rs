//! The items on the libtorch engine.

use atelier_diffusion::pipeline::{Family, SingleFileConfig};
use atelier_diffusion::schedulers::{NoiseSchedule, ScheduleConfig};
use atelier_diffusion::torch::unet::{AddedCond, UNet};
use atelier_diffusion::torch::vae::Vae;
use atelier_diffusion::torch::weights::Weights;
use atelier_modelkit::shapes::RandomWeights;
use tch::{Device, Kind, Tensor};

use super::common::{euler_sigmas, euler_timestep, time, Args};

fn setup(args: &Args) -> anyhow::Result<(Device, Kind)> {
    let device = if args.cuda {
        atelier_diffusion::torch::open_cuda();
        anyhow::ensure!(tch::Cuda::is_available(), "libtorch sees no CUDA device");
        Device::Cuda(0)
    } else {
        Device::Cpu
    };
    let kind = match args.dtype.as_str() {
        "f16" => Kind::Half,
        "bf16" => Kind::BFloat16,
        _ => Kind::Float,
    };
    Ok((device, kind))
}

fn random(seed: u64, kind: Kind, device: Device) -> Weights {
    Weights::from_backend(RandomWeights::unrecorded(seed), kind, device)
}

fn unet(family: Family, device: Device, kind: Kind) -> anyhow::Result<UNet> {
    let cfg = SingleFileConfig::standard(family, 4);
    Ok(UNet::new(&random(7, kind, device), cfg.unet)?)
}

fn vae(device: Device) -> anyhow::Result<Vae> {
    let cfg = SingleFileConfig::standard(Family::Sd1, 4);
    Ok(Vae::new(&random(8, Kind::Float, device), cfg.vae)?)
}

pub fn run(args: &Args) -> anyhow::Result<f64> {
    let (dev, kind) = setup(args)?;
    let sync = move || {
        if let Device::Cuda(i) = dev {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let s = args.latent as i64;
    if args.item == "lora_step" {
        return lora_step(args, dev, kind, sync);
    }
    let _guard = tch::no_grad_guard();
    match args.item.as_str() {
        "unet_sd15" | "unet_sdxl" => {
            let sdxl = args.item == "unet_sdxl";
            let u = unet(if sdxl { Family::Sdxl } else { Family::Sd1 }, dev, kind)?;
            let x = Tensor::randn([2, 4, s, s], (kind, dev));
            let ctx = Tensor::randn([2, 77, u.config.cross_attention_dim as i64], (kind, dev));
            let t = Tensor::from_slice(&[500f32, 500.]).to_device(dev);
            let px = (s * 8) as f32;
            let added = sdxl.then(|| AddedCond {
                text_embeds: Tensor::randn([2, 1280], (kind, dev)),
                time_ids: Tensor::from_slice(&[px, px, 0., 0., px, px])
                    .repeat([2])
                    .view([2, 6])
                    .to_device(dev),
            });
            time(
                args,
                || {
                    let _ = u.forward(&x, &t, &ctx, added.as_ref())?;
                    Ok(())
                },
                sync,
            )
        }
        "vae_decode" => {
            let v = vae(dev)?;
            let z = Tensor::randn([1, 4, s, s], (Kind::Float, dev));
            time(
                args,
                || {
                    let _ = v.decode(&z);
                    Ok(())
                },
                sync,
            )
        }
        _ => txt2img(args, dev, kind, sync),
    }
}

fn txt2img(args: &Args, dev: Device, kind: Kind, sync: impl Fn()) -> anyhow::Result<f64> {
    let u = unet(Family::Sd1, dev, kind)?;
    let v = vae(dev)?;
    let s = args.latent as i64;
    let ctx = Tensor::randn([2, 77, 768], (kind, dev));
    let sigmas = euler_sigmas(args.steps);
    time(
        args,
        || {
            let mut x = Tensor::randn([1, 4, s, s], (Kind::Float, dev)) * sigmas[0];
            for i in 0..args.steps {
                let sigma = sigmas[i];
                let inp = Tensor::cat(&[&x, &x], 0) / (sigma * sigma + 1.0).sqrt();
                let t = Tensor::full([2], euler_timestep(i, args.steps), (Kind::Float, dev));
                let eps = u.forward(&inp, &t, &ctx, None)?.to_kind(Kind::Float);
                let parts = eps.chunk(2, 0);
                let guided = &parts[0] + (&parts[1] - &parts[0]) * 7.5;
                x += guided * (sigmas[i + 1] - sigma);
            }
            drop(v.decode(&(x * 0.18215)));
            Ok(())
        },
        sync,
    )
}

fn lora_step(args: &Args, dev: Device, kind: Kind, sync: impl Fn()) -> anyhow::Result<f64> {
    use atelier_diffusion::schedulers::PredictionType;
    use atelier_diffusion::train::{
        stream, AdamW, AdamWParams, Batch, LoraConfig, LoraNetwork, Objective, UnetTargets,
    };
    let mut u = unet(Family::Sd1, dev, kind)?;
    let cfg = LoraConfig {
        rank: args.rank,
        alpha: args.rank as f64,
        conv_rank: None,
        conv_alpha: 1.0,
        unet_targets: UnetTargets::Attention,
        text_encoder: false,
    };
    let lora = LoraNetwork::attach_parts(&mut u, Vec::new(), Family::Sd1, &cfg, 1)?;
    let (vars, _): (Vec<&Tensor>, Vec<_>) = lora.vars().into_iter().unzip();
    let mut opt = AdamW::new(AdamWParams::default(), &vars);
    let lrs = vec![1e-4; vars.len()];
    let schedule = NoiseSchedule::new(ScheduleConfig::default());
    let objective = Objective {
        prediction: PredictionType::Epsilon,
        min_snr_gamma: None,
        noise_offset: 0.0,
        min_timestep: 0,
        max_timestep: 1000,
    };
    let (b, s) = (args.batch as i64, args.latent as i64);
    let batch = Batch {
        latents: Tensor::randn([b, 4, s, s], (Kind::Float, dev)),
        context: Tensor::randn([b, 77, 768], (kind, dev)),
        added: None,
        weights: vec![1.0; args.batch],
    };
    let mut i = 0u64;
    time(
        args,
        || {
            i += 1;
            lora.zero_grad();
            let mut rng = stream(1, 2, i);
            if args.checkpointing {
                objective.backward_checkpointed(&u, &schedule, &batch, &mut rng, 1.0)?;
            } else {
                objective
                    .loss(&u, &schedule, &batch, &mut rng)?
                    .f_backward()?;
            }
            opt.step(&vars, &lora.grads(), &lrs)?;
            Ok(())
        },
        sync,
    )
}
