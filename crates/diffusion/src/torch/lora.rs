//! LoRA files (kohya/A1111 and diffusers/peft layouts, parsed by [`crate::lora::LoraFile`]) merged
//! into the libtorch models' weights.

use tch::{Kind, Tensor};

use super::nn::{Adapter, Conv2d, Linear};
use super::unet::{Proj, ResnetBlock, SpatialTransformer, UNet};
use super::weights::from_candle;
use super::{msg, Result, TorchModels};
use crate::lora::{underscore, unet_index, Applied, LoraFile, LoraLayer, LoraMode, Part};

/// A layer a LoRA can adapt.
pub enum Target<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv2d),
}

type Targets<'a> = Vec<(String, Target<'a>)>;

fn resnet<'a>(r: &'a mut ResnetBlock, p: &str, v: &mut Targets<'a>) {
    v.push((format!("{p}.conv1"), Target::Conv(&mut r.conv1)));
    v.push((format!("{p}.conv2"), Target::Conv(&mut r.conv2)));
    if let Some(c) = &mut r.conv_shortcut {
        v.push((format!("{p}.conv_shortcut"), Target::Conv(c)));
    }
    if let Some(l) = &mut r.time_emb_proj {
        v.push((format!("{p}.time_emb_proj"), Target::Linear(l)));
    }
}

fn proj<'a>(p: &'a mut Proj) -> Target<'a> {
    match p {
        Proj::Conv(c) => Target::Conv(c),
        Proj::Linear(l) => Target::Linear(l),
    }
}

fn transformer<'a>(s: &'a mut SpatialTransformer, p: &str, v: &mut Targets<'a>) {
    v.push((format!("{p}.proj_in"), proj(&mut s.proj_in)));
    v.push((format!("{p}.proj_out"), proj(&mut s.proj_out)));
    for (k, b) in s.blocks.iter_mut().enumerate() {
        let q = format!("{p}.transformer_blocks.{k}");
        for (an, a) in [("attn1", &mut b.attn1), ("attn2", &mut b.attn2)] {
            v.push((format!("{q}.{an}.to_q"), Target::Linear(&mut a.to_q)));
            v.push((format!("{q}.{an}.to_k"), Target::Linear(&mut a.to_k)));
            v.push((format!("{q}.{an}.to_v"), Target::Linear(&mut a.to_v)));
            v.push((format!("{q}.{an}.to_out.0"), Target::Linear(&mut a.to_out)));
        }
        v.push((format!("{q}.ff.net.0.proj"), Target::Linear(&mut b.ff_proj)));
        v.push((format!("{q}.ff.net.2"), Target::Linear(&mut b.ff_out)));
    }
}

/// Every linear and convolution layer of the UNet with its diffusers path.
pub fn unet_targets(u: &mut UNet) -> Targets<'_> {
    let mut v: Targets<'_> = vec![
        ("conv_in".into(), Target::Conv(&mut u.conv_in)),
        ("conv_out".into(), Target::Conv(&mut u.conv_out)),
        (
            "time_embedding.linear_1".into(),
            Target::Linear(&mut u.time_1),
        ),
        (
            "time_embedding.linear_2".into(),
            Target::Linear(&mut u.time_2),
        ),
    ];
    if let Some(l) = &mut u.add_1 {
        v.push(("add_embedding.linear_1".into(), Target::Linear(l)));
    }
    if let Some(l) = &mut u.add_2 {
        v.push(("add_embedding.linear_2".into(), Target::Linear(l)));
    }
    for (side, blocks) in [("down_blocks", &mut u.down), ("up_blocks", &mut u.up)] {
        for (i, b) in blocks.iter_mut().enumerate() {
            let p = format!("{side}.{i}");
            for (j, r) in b.resnets.iter_mut().enumerate() {
                resnet(r, &format!("{p}.resnets.{j}"), &mut v);
            }
            for (j, a) in b.attentions.iter_mut().enumerate() {
                transformer(a, &format!("{p}.attentions.{j}"), &mut v);
            }
            if let Some(c) = &mut b.sampler {
                let name = if side == "down_blocks" {
                    "downsamplers"
                } else {
                    "upsamplers"
                };
                v.push((format!("{p}.{name}.0.conv"), Target::Conv(c)));
            }
        }
    }
    for (j, r) in u.mid_resnets.iter_mut().enumerate() {
        resnet(r, &format!("mid_block.resnets.{j}"), &mut v);
    }
    transformer(&mut u.mid_attention, "mid_block.attentions.0", &mut v);
    v
}

/// up·down·scale shaped as `weight`; a 1×1 adapter on a k×k kernel acts at its centre.
fn delta(weight: &Tensor, layer: &LoraLayer, s: f64) -> Result<Tensor> {
    let (down, up) = (from_candle(&layer.down)?, from_candle(&layer.up)?);
    let w = weight.size();
    let r = down.size()[0];
    let d = up.reshape([w[0], r]).matmul(&down.reshape([r, -1]));
    let d = match w.len() {
        2 => d.f_reshape([w[0], w[1]])?,
        _ => {
            let k = down.size().get(2).copied().unwrap_or(1);
            let d = d.f_reshape([w[0], w[1], k, k])?;
            if k == w[2] {
                d
            } else {
                let pad = (w[2] - 1) / 2;
                d.constant_pad_nd([pad, w[2] - 1 - pad, pad, w[3] - 1 - pad])
            }
        }
    };
    Ok(d * s)
}

/// The layer's adapter for a weight of `weight`'s shape, on its device, in f32.
pub(crate) fn adapter(weight: &Tensor, layer: &LoraLayer, s: f64) -> Result<Adapter> {
    let (down, up) = (from_candle(&layer.down)?, from_candle(&layer.up)?);
    let w = weight.size();
    let r = down.size()[0];
    let fits = down.size()[1] == w[1] && up.numel() as i64 == w[0] * r;
    if !fits {
        return Err(msg(format!(
            "LoRA shape {:?}/{:?} does not fit a layer of shape {w:?}",
            layer.down.dims(),
            layer.up.dims()
        )));
    }
    let dev = weight.device();
    let (down, up) = match w.len() {
        2 => (down.reshape([r, w[1]]), up.reshape([w[0], r])),
        _ => {
            let k = down.size().get(2).copied().unwrap_or(1);
            (down.reshape([r, w[1], k, k]), up.reshape([w[0], r, 1, 1]))
        }
    };
    Ok(Adapter {
        down: down.to_device(dev),
        up: up.to_device(dev),
        scale: s,
    })
}

pub(crate) fn merge(weight: &mut Tensor, layer: &LoraLayer, s: f64) -> Result<()> {
    let d = delta(weight, layer, s).map_err(|e| {
        msg(format!(
            "LoRA shape {:?}/{:?} does not fit a layer of shape {:?}: {e}",
            layer.down.dims(),
            layer.up.dims(),
            weight.size()
        ))
    })?;
    let kind = weight.kind();
    *weight = (weight.to_kind(Kind::Float) + d.to_device(weight.device())).to_kind(kind);
    Ok(())
}

/// Merge `file` at `weight` into the UNet and text encoders.
pub fn merge_file(m: &mut TorchModels, file: &LoraFile, weight: f64) -> Result<Applied> {
    apply_file(m, file, weight, LoraMode::Merge)
}

/// A layer the file adapts: a linear layer's or a convolution's weight and adapters.
fn parts<'a>(t: &'a mut Target<'_>) -> (&'a mut Tensor, &'a mut Vec<Adapter>) {
    match t {
        Target::Linear(l) => (&mut l.weight, &mut l.adapters),
        Target::Conv(c) => (&mut c.weight, &mut c.adapters),
    }
}

/// Apply `file` at `weight` to the UNet and text encoders, merged into the weights or as
/// run-time adapters (the same predictions either way); UNet layers may be named by their
/// diffusers or (SDXL LoRAs from kohya's scripts) LDM paths.
pub fn apply_file(
    m: &mut TorchModels,
    file: &LoraFile,
    weight: f64,
    mode: LoraMode,
) -> Result<Applied> {
    let cfg = m.unet.config.clone();
    let mut targets = unet_targets(&mut m.unet);
    let index = unet_index(targets.iter().map(|(p, _)| p.as_str()), &cfg);
    let mut applied = Applied::default();
    for ((part, key), layer) in &file.layers {
        let s = weight * layer.scale;
        let (mut unet_target, mut text_linear) = (None, None);
        match part {
            Part::Unet => unet_target = index.get(key).map(|&i| parts(&mut targets[i].1)),
            Part::Transformer => {}
            Part::Text(n) => {
                text_linear = m.text.get_mut(*n).and_then(|model| {
                    model
                        .linears_mut()
                        .into_iter()
                        .find(|(p, _)| {
                            underscore(p.strip_prefix("text_model.").unwrap_or(p)) == *key
                        })
                        .map(|(_, l)| (&mut l.weight, &mut l.adapters))
                })
            }
        }
        let Some((w, adapters)) = unet_target.or(text_linear) else {
            applied.unmatched.push(key.clone());
            continue;
        };
        let done = match mode {
            LoraMode::Merge => merge(w, layer, s),
            LoraMode::Runtime => adapter(w, layer, s).map(|a| adapters.push(a)),
        };
        done.map_err(|e| msg(format!("{key}: {e}")))?;
        applied.matched += 1;
    }
    if applied.matched == 0 {
        return Err(msg(format!(
            "no layer of this LoRA matches the model (first keys: {:?}): is it for another architecture?",
            applied.unmatched.iter().take(3).collect::<Vec<_>>()
        )));
    }
    Ok(applied)
}
