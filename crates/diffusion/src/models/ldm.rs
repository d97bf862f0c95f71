//! Single-file checkpoints with the original LDM key names (`model.diffusion_model.*`,
//! `first_stage_model.*`, `cond_stage_model.*`, `conditioner.embedders.*`) as SD 1.x, SD 2.x and
//! SDXL are distributed: a name map from our (diffusers) parameter names to the stored tensors,
//! for loading, and its inverse, for writing such files.

use std::collections::{BTreeMap, HashMap};

use super::config::UNetConfig;

/// Where a model parameter lives in a single-file checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Stored under another name (1×1 conv / linear reshapes are allowed on load).
    Rename(String),
    /// Rows `part`·n..(part+1)·n of a fused q/k/v projection (OpenCLIP's `in_proj_*`).
    Part {
        name: String,
        part: usize,
        parts: usize,
    },
    /// Stored transposed (OpenCLIP's `text_projection`).
    Transposed(String),
    /// Rows `start..start + len` of a fused tensor of unequal parts (FLUX's single blocks'
    /// `linear1`: q, k, v and the MLP's input in one).
    Rows {
        name: String,
        start: usize,
        len: usize,
    },
    /// Stored with its two halves of rows in the other order (the original SD 3 / FLUX final
    /// modulation: shift, scale; diffusers': scale, shift).
    SwappedHalves(String),
}

impl Source {
    /// The same source with its stored name under `prefix`.
    pub fn prefixed(mut self, prefix: &str) -> Self {
        match &mut self {
            Source::Rename(n)
            | Source::Transposed(n)
            | Source::SwappedHalves(n)
            | Source::Part { name: n, .. }
            | Source::Rows { name: n, .. } => *n = format!("{prefix}{n}"),
        }
        self
    }

    /// The stored tensor's name.
    pub fn stored(&self) -> &str {
        match self {
            Source::Rename(n)
            | Source::Transposed(n)
            | Source::SwappedHalves(n)
            | Source::Part { name: n, .. }
            | Source::Rows { name: n, .. } => n,
        }
    }
}

fn resnet_unet(rest: &str) -> String {
    let (head, tail) = rest.split_once('.').unwrap_or((rest, ""));
    let mapped = match head {
        "norm1" => "in_layers.0",
        "conv1" => "in_layers.2",
        "time_emb_proj" => "emb_layers.1",
        "norm2" => "out_layers.0",
        "conv2" => "out_layers.3",
        "conv_shortcut" => "skip_connection",
        other => other,
    };
    format!("{mapped}.{tail}")
}

fn split_idx(rest: &str) -> Option<(usize, &str)> {
    let (i, tail) = rest.split_once('.')?;
    Some((i.parse().ok()?, tail))
}

/// The LDM name of a UNet parameter (without the `model.diffusion_model.` prefix).
pub fn unet_name(name: &str, cfg: &UNetConfig) -> Option<String> {
    let l = cfg.layers_per_block;
    let simple = [
        ("conv_in.", "input_blocks.0.0."),
        ("time_embedding.linear_1.", "time_embed.0."),
        ("time_embedding.linear_2.", "time_embed.2."),
        ("add_embedding.linear_1.", "label_emb.0.0."),
        ("add_embedding.linear_2.", "label_emb.0.2."),
        ("conv_norm_out.", "out.0."),
        ("conv_out.", "out.2."),
    ];
    for (a, b) in simple {
        if let Some(rest) = name.strip_prefix(a) {
            return Some(format!("{b}{rest}"));
        }
    }
    if let Some(rest) = name.strip_prefix("down_blocks.") {
        let (i, rest) = split_idx(rest)?;
        if let Some(r) = rest.strip_prefix("resnets.") {
            let (j, r) = split_idx(r)?;
            return Some(format!(
                "input_blocks.{}.0.{}",
                i * (l + 1) + j + 1,
                resnet_unet(r)
            ));
        }
        if let Some(r) = rest.strip_prefix("attentions.") {
            let (j, r) = split_idx(r)?;
            return Some(format!("input_blocks.{}.1.{r}", i * (l + 1) + j + 1));
        }
        if let Some(r) = rest.strip_prefix("downsamplers.0.conv.") {
            return Some(format!("input_blocks.{}.0.op.{r}", (i + 1) * (l + 1)));
        }
        return None;
    }
    if let Some(rest) = name.strip_prefix("mid_block.") {
        return Some(if let Some(r) = rest.strip_prefix("resnets.0.") {
            format!("middle_block.0.{}", resnet_unet(r))
        } else if let Some(r) = rest.strip_prefix("resnets.1.") {
            format!("middle_block.2.{}", resnet_unet(r))
        } else {
            format!("middle_block.1.{}", rest.strip_prefix("attentions.0.")?)
        });
    }
    if let Some(rest) = name.strip_prefix("up_blocks.") {
        let (i, rest) = split_idx(rest)?;
        let has_attn = cfg
            .up_block_types
            .get(i)
            .is_some_and(|t| t.starts_with("CrossAttn"));
        if let Some(r) = rest.strip_prefix("resnets.") {
            let (j, r) = split_idx(r)?;
            return Some(format!(
                "output_blocks.{}.0.{}",
                i * (l + 1) + j,
                resnet_unet(r)
            ));
        }
        if let Some(r) = rest.strip_prefix("attentions.") {
            let (j, r) = split_idx(r)?;
            return Some(format!("output_blocks.{}.1.{r}", i * (l + 1) + j));
        }
        if let Some(r) = rest.strip_prefix("upsamplers.0.conv.") {
            let k = if has_attn { 2 } else { 1 };
            return Some(format!("output_blocks.{}.{k}.conv.{r}", i * (l + 1) + l));
        }
    }
    None
}

fn resnet_vae(rest: &str) -> String {
    rest.replacen("conv_shortcut.", "nin_shortcut.", 1)
}

/// The LDM name of a VAE parameter (without `first_stage_model.`). `levels` is the number of
/// resolution levels (decoder blocks are numbered in reverse there).
pub fn vae_name(name: &str, levels: usize) -> Option<String> {
    for side in ["encoder.", "decoder."] {
        let Some(rest) = name.strip_prefix(side) else {
            continue;
        };
        let mapped = if let Some(r) = rest.strip_prefix("conv_norm_out.") {
            format!("norm_out.{r}")
        } else if let Some(r) = rest.strip_prefix("mid_block.resnets.0.") {
            format!("mid.block_1.{}", resnet_vae(r))
        } else if let Some(r) = rest.strip_prefix("mid_block.resnets.1.") {
            format!("mid.block_2.{}", resnet_vae(r))
        } else if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
            let (head, tail) = r.split_once('.')?;
            let h = match head {
                "group_norm" => "norm".to_string(),
                "to_q" => "q".to_string(),
                "to_k" => "k".to_string(),
                "to_v" => "v".to_string(),
                "to_out" => {
                    let t = tail.strip_prefix("0.")?;
                    return Some(format!("{side}mid.attn_1.proj_out.{t}"));
                }
                _ => return None,
            };
            format!("mid.attn_1.{h}.{tail}")
        } else if let Some(r) = rest.strip_prefix("down_blocks.") {
            let (i, r) = split_idx(r)?;
            if let Some(r) = r.strip_prefix("resnets.") {
                let (j, r) = split_idx(r)?;
                format!("down.{i}.block.{j}.{}", resnet_vae(r))
            } else {
                format!(
                    "down.{i}.downsample.conv.{}",
                    r.strip_prefix("downsamplers.0.conv.")?
                )
            }
        } else if let Some(r) = rest.strip_prefix("up_blocks.") {
            let (i, r) = split_idx(r)?;
            let li = levels.checked_sub(1 + i)?;
            if let Some(r) = r.strip_prefix("resnets.") {
                let (j, r) = split_idx(r)?;
                format!("up.{li}.block.{j}.{}", resnet_vae(r))
            } else {
                format!(
                    "up.{li}.upsample.conv.{}",
                    r.strip_prefix("upsamplers.0.conv.")?
                )
            }
        } else {
            rest.to_string()
        };
        return Some(format!("{side}{mapped}"));
    }
    Some(name.to_string()) // quant_conv, post_quant_conv
}

/// An OpenCLIP text tower's name for a transformers CLIP parameter (`prefix` is e.g.
/// `conditioner.embedders.1.model.`).
pub fn openclip_source(name: &str, prefix: &str) -> Option<Source> {
    let name = name.strip_prefix("text_model.").unwrap_or(name);
    let r = |s: String| Some(Source::Rename(format!("{prefix}{s}")));
    match name {
        "embeddings.token_embedding.weight" => return r("token_embedding.weight".into()),
        "embeddings.position_embedding.weight" => return r("positional_embedding".into()),
        "final_layer_norm.weight" => return r("ln_final.weight".into()),
        "final_layer_norm.bias" => return r("ln_final.bias".into()),
        "text_projection.weight" => {
            return Some(Source::Transposed(format!("{prefix}text_projection")))
        }
        _ => {}
    }
    let rest = name.strip_prefix("encoder.layers.")?;
    let (i, rest) = split_idx(rest)?;
    let base = format!("{prefix}transformer.resblocks.{i}.");
    let part = |p: usize, kind: &str| {
        Some(Source::Part {
            name: format!("{base}attn.in_proj_{kind}"),
            part: p,
            parts: 3,
        })
    };
    match rest {
        "self_attn.q_proj.weight" => part(0, "weight"),
        "self_attn.k_proj.weight" => part(1, "weight"),
        "self_attn.v_proj.weight" => part(2, "weight"),
        "self_attn.q_proj.bias" => part(0, "bias"),
        "self_attn.k_proj.bias" => part(1, "bias"),
        "self_attn.v_proj.bias" => part(2, "bias"),
        _ => {
            let (head, tail) = rest.split_once('.')?;
            let (head, tail) = match head {
                "self_attn" => ("attn.out_proj", tail.strip_prefix("out_proj.")?),
                "layer_norm1" => ("ln_1", tail),
                "layer_norm2" => ("ln_2", tail),
                "mlp" => match tail.split_once('.')? {
                    ("fc1", t) => ("mlp.c_fc", t),
                    ("fc2", t) => ("mlp.c_proj", t),
                    _ => return None,
                },
                _ => return None,
            };
            Some(Source::Rename(format!("{base}{head}.{tail}")))
        }
    }
}

/// The single-file key prefixes of each component, per family.
pub struct Prefixes {
    pub unet: &'static str,
    pub vae: &'static str,
    /// (prefix, OpenCLIP format) per text encoder, in pipeline order.
    pub text: &'static [(&'static str, bool)],
}

pub const SD1: Prefixes = Prefixes {
    unet: "model.diffusion_model.",
    vae: "first_stage_model.",
    text: &[("cond_stage_model.transformer.", false)],
};
pub const SD2: Prefixes = Prefixes {
    unet: "model.diffusion_model.",
    vae: "first_stage_model.",
    text: &[("cond_stage_model.model.", true)],
};
pub const SDXL: Prefixes = Prefixes {
    unet: "model.diffusion_model.",
    vae: "first_stage_model.",
    text: &[
        ("conditioner.embedders.0.transformer.", false),
        ("conditioner.embedders.1.model.", true),
    ],
};

/// A transformers-format CLIP parameter under a single-file prefix (`text_model.` kept).
pub fn hf_clip_source(name: &str, prefix: &str) -> Source {
    let name = if name.starts_with("text_model.") || name.starts_with("text_projection") {
        name.to_string()
    } else {
        format!("text_model.{name}")
    };
    Source::Rename(format!("{prefix}{name}"))
}

/// Build the full map for a list of parameter names with `f`.
pub fn map_names(
    names: impl IntoIterator<Item = String>,
    f: impl Fn(&str) -> Option<Source>,
) -> Result<HashMap<String, Source>, String> {
    let mut out = HashMap::new();
    for n in names {
        let s = f(&n).ok_or_else(|| format!("no single-file name for parameter {n}"))?;
        out.insert(n, s);
    }
    Ok(out)
}

/// Invert a map to write a single file: fused q/k/v parts are concatenated, transposed tensors
/// transposed back.
pub fn to_single_file(
    tensors: &BTreeMap<String, candle_core::Tensor>,
    map: &HashMap<String, Source>,
) -> candle_core::Result<BTreeMap<String, candle_core::Tensor>> {
    let mut out = BTreeMap::new();
    let mut fused: BTreeMap<String, Vec<Option<candle_core::Tensor>>> = BTreeMap::new();
    for (name, t) in tensors {
        match map.get(name) {
            Some(Source::Rename(n)) => {
                out.insert(n.clone(), t.clone());
            }
            Some(Source::Transposed(n)) => {
                out.insert(n.clone(), t.t()?.contiguous()?);
            }
            Some(Source::SwappedHalves(n)) => {
                let h = t.dim(0)? / 2;
                out.insert(
                    n.clone(),
                    candle_core::Tensor::cat(&[t.narrow(0, h, h)?, t.narrow(0, 0, h)?], 0)?,
                );
            }
            Some(Source::Rows { name: n, .. }) => {
                return Err(candle_core::Error::Msg(format!(
                    "{name}: fused rows of {n} are read, not written"
                )));
            }
            Some(Source::Part {
                name: n,
                part,
                parts,
            }) => {
                let slot = fused.entry(n.clone()).or_insert_with(|| vec![None; *parts]);
                slot[*part] = Some(t.clone());
            }
            None => {
                return Err(candle_core::Error::Msg(format!(
                    "no single-file name for {name}"
                )));
            }
        }
    }
    for (n, parts) in fused {
        let parts: Vec<candle_core::Tensor> = parts
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| candle_core::Error::Msg(format!("{n}: missing q/k/v part")))?;
        out.insert(n, candle_core::Tensor::cat(&parts, 0)?);
    }
    Ok(out)
}
