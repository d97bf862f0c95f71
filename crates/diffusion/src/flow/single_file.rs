//! Single-file FLUX and SD 3 / 3.5 checkpoints as the community downloads them: the original
//! key names (Black Forest Labs' `double_blocks.*` / `single_blocks.*`, Stability's
//! `joint_blocks.*`), bare or under `model.diffusion_model.`, mapped to ours (fused q/k/v and
//! FLUX's fused single-block input cut by rows, the final modulation's halves swapped); a VAE
//! (`vae.` or `first_stage_model.`, LDM names) and text encoders (`text_encoders.clip_l.`,
//! `.clip_g.`, `.t5xxl.`) are read from the file when it has them.

use std::collections::HashMap;

use crate::models::ldm::Source;
use crate::models::load::Header;
use crate::torch::flux::FluxConfig;
use crate::torch::mmdit::Sd3Config;

use super::FlowFamily;

/// The family of a single file and the prefix of its denoiser's keys, from its header.
pub fn family_of(h: &Header) -> Option<(FlowFamily, &'static str)> {
    for prefix in ["", "model.diffusion_model."] {
        if h.shape_of(&format!("{prefix}double_blocks.0.img_attn.qkv.weight"))
            .is_some()
        {
            return Some((FlowFamily::Flux, prefix));
        }
        if h.shape_of(&format!("{prefix}joint_blocks.0.x_block.attn.qkv.weight"))
            .is_some()
        {
            return Some((FlowFamily::Sd3, prefix));
        }
    }
    None
}

fn count_blocks(h: &Header, prefix: &str, probe: impl Fn(usize) -> String) -> usize {
    (0..)
        .take_while(|i| h.shape_of(&format!("{prefix}{}", probe(*i))).is_some())
        .count()
}

fn dim(h: &Header, name: &str, axis: usize) -> Result<usize, String> {
    h.shape_of(name)
        .and_then(|s| s.get(axis).copied())
        .ok_or_else(|| format!("the checkpoint has no {name}"))
}

/// FLUX's config from the tensors' shapes; the RoPE axes are FLUX.1's (16, 56, 56) for its head
/// size of 128, else they must come from a components folder's `transformer/config.json`.
pub fn flux_config(h: &Header, p: &str) -> Result<FluxConfig, String> {
    let inner = dim(h, &format!("{p}img_in.weight"), 0)?;
    let head = dim(
        h,
        &format!("{p}double_blocks.0.img_attn.norm.query_norm.scale"),
        0,
    )?;
    Ok(FluxConfig {
        in_channels: dim(h, &format!("{p}img_in.weight"), 1)?,
        num_layers: count_blocks(h, p, |i| format!("double_blocks.{i}.img_attn.qkv.weight")),
        num_single_layers: count_blocks(h, p, |i| format!("single_blocks.{i}.linear1.weight")),
        num_attention_heads: inner / head,
        attention_head_dim: head,
        joint_attention_dim: dim(h, &format!("{p}txt_in.weight"), 1)?,
        pooled_projection_dim: dim(h, &format!("{p}vector_in.in_layer.weight"), 1)?,
        guidance_embeds: h
            .shape_of(&format!("{p}guidance_in.in_layer.weight"))
            .is_some(),
        ..FluxConfig::default()
    })
}

/// SD 3's config from the tensors' shapes (the head size from the query norm's, else SD 3's 64).
pub fn sd3_config(h: &Header, p: &str) -> Result<Sd3Config, String> {
    let proj = format!("{p}x_embedder.proj.weight");
    let (hidden, patch) = (dim(h, &proj, 0)?, dim(h, &proj, 2)?);
    let head = dim(h, &format!("{p}joint_blocks.0.x_block.attn.ln_q.weight"), 0).unwrap_or(64);
    let grid = dim(h, &format!("{p}pos_embed"), 1)?;
    let n = count_blocks(h, p, |i| {
        format!("joint_blocks.{i}.x_block.attn.qkv.weight")
    });
    Ok(Sd3Config {
        patch_size: patch,
        in_channels: dim(h, &proj, 1)?,
        num_layers: n,
        attention_head_dim: head,
        num_attention_heads: hidden / head,
        joint_attention_dim: dim(h, &format!("{p}context_embedder.weight"), 1)?,
        caption_projection_dim: dim(h, &format!("{p}context_embedder.weight"), 0)?,
        pooled_projection_dim: dim(h, &format!("{p}y_embedder.mlp.0.weight"), 1)?,
        out_channels: dim(h, &format!("{p}final_layer.linear.weight"), 0)? / (patch * patch),
        pos_embed_max_size: (grid as f64).sqrt().round() as usize,
        dual_attention_layers: (0..n)
            .filter(|i| {
                h.shape_of(&format!("{p}joint_blocks.{i}.x_block.attn2.qkv.weight"))
                    .is_some()
            })
            .collect(),
        qk_norm: h
            .shape_of(&format!("{p}joint_blocks.0.x_block.attn.ln_q.weight"))
            .map(|_| "rms_norm".to_string()),
        ..Sd3Config::default()
    })
}

/// `name` split as (head, index, rest) for `head.N.rest`.
fn indexed<'a>(name: &'a str, head: &str) -> Option<(usize, &'a str)> {
    let rest = name.strip_prefix(head)?.strip_prefix('.')?;
    let (i, rest) = rest.split_once('.')?;
    Some((i.parse().ok()?, rest))
}

/// `param` (`weight`/`bias`) of a q/k/v part `part` of the fused `name`.
fn part(name: String, part: usize) -> Source {
    Source::Part {
        name,
        part,
        parts: 3,
    }
}

/// Where FLUX parameter `n` (our name) is stored in a BFL file (without prefix); `dim` is the
/// model width.
pub fn flux_source(n: &str, dim: usize) -> Option<Source> {
    let r = |s: String| Some(Source::Rename(s));
    let (module, param) = n.rsplit_once('.')?;
    let top = [
        ("x_embedder", "img_in"),
        ("context_embedder", "txt_in"),
        (
            "time_text_embed.timestep_embedder.linear_1",
            "time_in.in_layer",
        ),
        (
            "time_text_embed.timestep_embedder.linear_2",
            "time_in.out_layer",
        ),
        (
            "time_text_embed.guidance_embedder.linear_1",
            "guidance_in.in_layer",
        ),
        (
            "time_text_embed.guidance_embedder.linear_2",
            "guidance_in.out_layer",
        ),
        (
            "time_text_embed.text_embedder.linear_1",
            "vector_in.in_layer",
        ),
        (
            "time_text_embed.text_embedder.linear_2",
            "vector_in.out_layer",
        ),
        ("proj_out", "final_layer.linear"),
    ];
    if let Some((_, b)) = top.iter().find(|(a, _)| *a == module) {
        return r(format!("{b}.{param}"));
    }
    if module == "norm_out.linear" {
        return Some(Source::SwappedHalves(format!(
            "final_layer.adaLN_modulation.1.{param}"
        )));
    }
    if let Some((i, m)) = indexed(module, "transformer_blocks") {
        let b = format!("double_blocks.{i}");
        return match m {
            "norm1.linear" => r(format!("{b}.img_mod.lin.{param}")),
            "norm1_context.linear" => r(format!("{b}.txt_mod.lin.{param}")),
            "attn.to_q" | "attn.to_k" | "attn.to_v" => {
                let k = ["attn.to_q", "attn.to_k", "attn.to_v"]
                    .iter()
                    .position(|x| *x == m)?;
                Some(part(format!("{b}.img_attn.qkv.{param}"), k))
            }
            "attn.add_q_proj" | "attn.add_k_proj" | "attn.add_v_proj" => {
                let k = ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
                    .iter()
                    .position(|x| *x == m)?;
                Some(part(format!("{b}.txt_attn.qkv.{param}"), k))
            }
            "attn.norm_q" => r(format!("{b}.img_attn.norm.query_norm.scale")),
            "attn.norm_k" => r(format!("{b}.img_attn.norm.key_norm.scale")),
            "attn.norm_added_q" => r(format!("{b}.txt_attn.norm.query_norm.scale")),
            "attn.norm_added_k" => r(format!("{b}.txt_attn.norm.key_norm.scale")),
            "attn.to_out.0" => r(format!("{b}.img_attn.proj.{param}")),
            "attn.to_add_out" => r(format!("{b}.txt_attn.proj.{param}")),
            "ff.net.0.proj" => r(format!("{b}.img_mlp.0.{param}")),
            "ff.net.2" => r(format!("{b}.img_mlp.2.{param}")),
            "ff_context.net.0.proj" => r(format!("{b}.txt_mlp.0.{param}")),
            "ff_context.net.2" => r(format!("{b}.txt_mlp.2.{param}")),
            _ => None,
        };
    }
    let (i, m) = indexed(module, "single_transformer_blocks")?;
    let b = format!("single_blocks.{i}");
    let rows = |start: usize, len: usize| {
        Some(Source::Rows {
            name: format!("{b}.linear1.{param}"),
            start,
            len,
        })
    };
    match m {
        "attn.to_q" => rows(0, dim),
        "attn.to_k" => rows(dim, dim),
        "attn.to_v" => rows(2 * dim, dim),
        "proj_mlp" => rows(3 * dim, 4 * dim),
        "attn.norm_q" => r(format!("{b}.norm.query_norm.scale")),
        "attn.norm_k" => r(format!("{b}.norm.key_norm.scale")),
        "proj_out" => r(format!("{b}.linear2.{param}")),
        "norm.linear" => r(format!("{b}.modulation.lin.{param}")),
        _ => None,
    }
}

/// Where SD 3 parameter `n` (our name) is stored in a Stability file (without prefix); `last`
/// is the index of the last block (its text side's modulation has swapped halves).
pub fn sd3_source(n: &str, last: usize) -> Option<Source> {
    let r = |s: String| Some(Source::Rename(s));
    if n == "pos_embed.pos_embed" {
        return r("pos_embed".into());
    }
    let (module, param) = n.rsplit_once('.')?;
    let top = [
        ("pos_embed.proj", "x_embedder.proj"),
        (
            "time_text_embed.timestep_embedder.linear_1",
            "t_embedder.mlp.0",
        ),
        (
            "time_text_embed.timestep_embedder.linear_2",
            "t_embedder.mlp.2",
        ),
        ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
        ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
        ("context_embedder", "context_embedder"),
        ("proj_out", "final_layer.linear"),
    ];
    if let Some((_, b)) = top.iter().find(|(a, _)| *a == module) {
        return r(format!("{b}.{param}"));
    }
    if module == "norm_out.linear" {
        return Some(Source::SwappedHalves(format!(
            "final_layer.adaLN_modulation.1.{param}"
        )));
    }
    let (i, m) = indexed(module, "transformer_blocks")?;
    let (x, c) = (
        format!("joint_blocks.{i}.x_block"),
        format!("joint_blocks.{i}.context_block"),
    );
    let qkv =
        |side: &str, attn: &str, k: usize| Some(part(format!("{side}.{attn}.qkv.{param}"), k));
    match m {
        "attn.to_q" => qkv(&x, "attn", 0),
        "attn.to_k" => qkv(&x, "attn", 1),
        "attn.to_v" => qkv(&x, "attn", 2),
        "attn.add_q_proj" => qkv(&c, "attn", 0),
        "attn.add_k_proj" => qkv(&c, "attn", 1),
        "attn.add_v_proj" => qkv(&c, "attn", 2),
        "attn2.to_q" => qkv(&x, "attn2", 0),
        "attn2.to_k" => qkv(&x, "attn2", 1),
        "attn2.to_v" => qkv(&x, "attn2", 2),
        "attn.norm_q" => r(format!("{x}.attn.ln_q.{param}")),
        "attn.norm_k" => r(format!("{x}.attn.ln_k.{param}")),
        "attn.norm_added_q" => r(format!("{c}.attn.ln_q.{param}")),
        "attn.norm_added_k" => r(format!("{c}.attn.ln_k.{param}")),
        "attn2.norm_q" => r(format!("{x}.attn2.ln_q.{param}")),
        "attn2.norm_k" => r(format!("{x}.attn2.ln_k.{param}")),
        "attn.to_out.0" => r(format!("{x}.attn.proj.{param}")),
        "attn2.to_out.0" => r(format!("{x}.attn2.proj.{param}")),
        "attn.to_add_out" => r(format!("{c}.attn.proj.{param}")),
        "ff.net.0.proj" => r(format!("{x}.mlp.fc1.{param}")),
        "ff.net.2" => r(format!("{x}.mlp.fc2.{param}")),
        "ff_context.net.0.proj" => r(format!("{c}.mlp.fc1.{param}")),
        "ff_context.net.2" => r(format!("{c}.mlp.fc2.{param}")),
        "norm1.linear" => r(format!("{x}.adaLN_modulation.1.{param}")),
        "norm1_context.linear" if i == last => Some(Source::SwappedHalves(format!(
            "{c}.adaLN_modulation.1.{param}"
        ))),
        "norm1_context.linear" => r(format!("{c}.adaLN_modulation.1.{param}")),
        _ => None,
    }
}

/// The name map for every parameter in `names`, each stored name under `prefix`.
pub fn map(
    names: impl IntoIterator<Item = String>,
    prefix: &str,
    f: impl Fn(&str) -> Option<Source>,
) -> Result<HashMap<String, Source>, String> {
    let mut out = HashMap::new();
    for n in names {
        let s = f(&n).ok_or_else(|| format!("no single-file name for parameter {n}"))?;
        let s = s.prefixed(prefix);
        out.insert(n, s);
    }
    Ok(out)
}
