//! LoRAs on the transformer families: diffusers/peft files (`transformer.<module>.lora_A/B`, as
//! diffusers' and ai-toolkit's FLUX trainers write them) by the module's diffusers path, and
//! kohya's FLUX files (`lora_unet_double_blocks_0_img_attn_qkv.lora_down`, …) by the original
//! model's module names, where one fused layer (`qkv`, single blocks' `linear1`) covers several
//! of ours: its up matrix is cut by rows into each layer's share.

use crate::lora::{underscore, Applied, LoraFile, LoraLayer, LoraMode, Part};
use crate::torch::lora::{adapter, merge};
use crate::torch::nn::Linear;

use super::{Denoiser, FlowModel};

/// One of our layers a file's layer reaches: its diffusers path and the rows of the up matrix
/// that belong to it (None: all; a fraction of the total, for fused layers).
struct Share {
    path: String,
    /// (first part, parts, of total parts).
    rows: Option<(usize, usize, usize)>,
    /// The file's two halves of rows are swapped in ours (BFL's final modulation is shift,
    /// scale; diffusers' is scale, shift).
    swap_halves: bool,
}

fn whole(path: String) -> Vec<Share> {
    vec![Share {
        path,
        rows: None,
        swap_halves: false,
    }]
}

/// Rows split in parts proportional to `parts` (out of their sum).
fn split(paths: &[String], parts: &[usize]) -> Vec<Share> {
    let total: usize = parts.iter().sum();
    let mut start = 0;
    paths
        .iter()
        .zip(parts)
        .map(|(p, &n)| {
            let s = Share {
                path: p.clone(),
                rows: Some((start, n, total)),
                swap_halves: false,
            };
            start += n;
            s
        })
        .collect()
}

/// The diffusers layers a kohya FLUX key (original module names, underscored) stands for.
fn kohya_flux(key: &str) -> Option<Vec<Share>> {
    let tt = "time_text_embed";
    let simple = [
        ("img_in", "x_embedder".to_string()),
        ("txt_in", "context_embedder".to_string()),
        (
            "time_in_in_layer",
            format!("{tt}.timestep_embedder.linear_1"),
        ),
        (
            "time_in_out_layer",
            format!("{tt}.timestep_embedder.linear_2"),
        ),
        ("vector_in_in_layer", format!("{tt}.text_embedder.linear_1")),
        (
            "vector_in_out_layer",
            format!("{tt}.text_embedder.linear_2"),
        ),
        (
            "guidance_in_in_layer",
            format!("{tt}.guidance_embedder.linear_1"),
        ),
        (
            "guidance_in_out_layer",
            format!("{tt}.guidance_embedder.linear_2"),
        ),
        ("final_layer_linear", "proj_out".to_string()),
    ];
    if let Some((_, p)) = simple.iter().find(|(k, _)| *k == key) {
        return Some(whole(p.clone()));
    }
    if key == "final_layer_adaLN_modulation_1" {
        return Some(vec![Share {
            path: "norm_out.linear".into(),
            rows: None,
            swap_halves: true,
        }]);
    }
    if let Some(rest) = key.strip_prefix("double_blocks_") {
        let (i, module) = rest.split_once('_')?;
        let b = format!("transformer_blocks.{i}");
        let qkv = |names: [&str; 3]| split(&names.map(|n| format!("{b}.attn.{n}")), &[1, 1, 1]);
        return Some(match module {
            "img_attn_qkv" => qkv(["to_q", "to_k", "to_v"]),
            "txt_attn_qkv" => qkv(["add_q_proj", "add_k_proj", "add_v_proj"]),
            "img_attn_proj" => whole(format!("{b}.attn.to_out.0")),
            "txt_attn_proj" => whole(format!("{b}.attn.to_add_out")),
            "img_mlp_0" => whole(format!("{b}.ff.net.0.proj")),
            "img_mlp_2" => whole(format!("{b}.ff.net.2")),
            "txt_mlp_0" => whole(format!("{b}.ff_context.net.0.proj")),
            "txt_mlp_2" => whole(format!("{b}.ff_context.net.2")),
            "img_mod_lin" => whole(format!("{b}.norm1.linear")),
            "txt_mod_lin" => whole(format!("{b}.norm1_context.linear")),
            _ => return None,
        });
    }
    let rest = key.strip_prefix("single_blocks_")?;
    let (i, module) = rest.split_once('_')?;
    let b = format!("single_transformer_blocks.{i}");
    Some(match module {
        "linear1" => split(
            &["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"].map(|n| format!("{b}.{n}")),
            &[1, 1, 1, 4],
        ),
        "linear2" => whole(format!("{b}.proj_out")),
        "modulation_lin" => whole(format!("{b}.norm.linear")),
        _ => return None,
    })
}

/// The file's layer cut to one share's rows.
fn cut(layer: &LoraLayer, share: &Share) -> Result<LoraLayer, String> {
    let e = |e: candle_core::Error| e.to_string();
    let rows = layer.up.dim(0).map_err(e)?;
    let mut up = match share.rows {
        None => layer.up.clone(),
        Some((start, len, total)) => {
            if rows % total != 0 {
                return Err(format!("{rows} rows do not split into {total} equal parts"));
            }
            let (s, n) = (start * rows / total, len * rows / total);
            layer.up.narrow(0, s, n).map_err(e)?
        }
    };
    if share.swap_halves {
        let half = rows / 2;
        up = candle_core::Tensor::cat(
            &[
                up.narrow(0, half, half).map_err(e)?,
                up.narrow(0, 0, half).map_err(e)?,
            ],
            0,
        )
        .map_err(e)?;
    }
    Ok(LoraLayer {
        down: layer.down.clone(),
        up,
        scale: layer.scale,
    })
}

impl FlowModel {
    /// A copy of the model with `file` at `weight` (the copy shares every weight it leaves alone).
    pub fn with_lora(
        &self,
        file: &LoraFile,
        weight: f64,
        mode: LoraMode,
    ) -> Result<(Self, Applied), String> {
        let mut m = self.clone();
        let mut linears = match &mut m.denoiser {
            Denoiser::Flux(f) => f.linears_mut(),
            Denoiser::Sd3(s) => s.linears_mut(),
        };
        let mut applied = Applied::default();
        for ((part, key), layer) in &file.layers {
            let shares = match (part, m.family) {
                (Part::Transformer, _) => Some(whole(key.clone())),
                (Part::Unet, super::FlowFamily::Flux) => kohya_flux(key),
                _ => None,
            };
            let Some(shares) = shares else {
                applied.unmatched.push(key.clone());
                continue;
            };
            for share in &shares {
                let target = underscore(&share.path);
                let Some((_, lin)) = linears.iter_mut().find(|(p, _)| underscore(p) == target)
                else {
                    applied.unmatched.push(format!("{key} ({})", share.path));
                    continue;
                };
                let piece = cut(layer, share).map_err(|e| format!("{key}: {e}"))?;
                apply(lin, &piece, weight * layer.scale, mode)
                    .map_err(|e| format!("{key}: {e}"))?;
                applied.matched += 1;
            }
        }
        drop(linears);
        if applied.matched == 0 {
            return Err(format!(
                "no layer of this LoRA matches the {} model (first keys: {:?}): is it for another architecture?",
                m.family.label(),
                applied.unmatched.iter().take(3).collect::<Vec<_>>()
            ));
        }
        Ok((m, applied))
    }
}

fn apply(lin: &mut Linear, layer: &LoraLayer, s: f64, mode: LoraMode) -> Result<(), String> {
    match mode {
        LoraMode::Merge => merge(&mut lin.weight, layer, s),
        LoraMode::Runtime => adapter(&lin.weight, layer, s).map(|a| lin.adapters.push(a)),
    }
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_flux_names_reach_our_layers() {
        let s = kohya_flux("double_blocks_3_img_attn_qkv").unwrap();
        let paths: Vec<&str> = s.iter().map(|x| x.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "transformer_blocks.3.attn.to_q",
                "transformer_blocks.3.attn.to_k",
                "transformer_blocks.3.attn.to_v"
            ]
        );
        let s = kohya_flux("single_blocks_10_linear1").unwrap();
        assert_eq!(s.len(), 4);
        assert_eq!(s[3].path, "single_transformer_blocks.10.proj_mlp");
        // q, k, v take 1/7 of the rows each, the MLP 4/7.
        let up = candle_core::Tensor::arange(0f32, 28.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((28, 1))
            .unwrap();
        let layer = LoraLayer {
            down: candle_core::Tensor::ones(
                (1, 4),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap(),
            up,
            scale: 1.0,
        };
        let rows = |sh: &Share| {
            cut(&layer, sh)
                .unwrap()
                .up
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(rows(&s[1]), [4.0, 5.0, 6.0, 7.0]);
        assert_eq!(rows(&s[3]).len(), 16);
        assert_eq!(rows(&s[3])[0], 12.0);
        let m = kohya_flux("final_layer_adaLN_modulation_1").unwrap();
        let small = LoraLayer {
            up: layer.up.narrow(0, 0, 4).unwrap(),
            ..layer.clone()
        };
        assert_eq!(
            cut(&small, &m[0])
                .unwrap()
                .up
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            [2.0, 3.0, 0.0, 1.0]
        );
        assert!(kohya_flux("double_blocks_0_unknown").is_none());
    }
}
