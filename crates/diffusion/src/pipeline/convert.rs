//! diffusers folder → single-file checkpoint (the original LDM key names).

use std::path::Path;

use candle_core::{Device, Tensor};

use super::load::{model_err, read_json, SingleFileConfig, META_KEY};
use super::{Family, PResult};
use crate::models::config::ClipConfig;
use crate::models::config::UNetConfig;
use crate::models::config::VaeConfig;
use crate::models::load::component_weights;
use crate::schedulers::ScheduleConfig;

/// Convert a diffusers folder written by [`make_tiny`] (or any diffusers folder) into one
/// single-file checkpoint with the original LDM key names; its configs travel in the file's
/// metadata and the tokenizer folders are copied beside it.
pub fn write_single_file(diffusers: &Path, out: &Path) -> PResult<()> {
    use crate::models::ldm;
    let index: serde_json::Value = read_json(&diffusers.join("model_index.json"))?;
    let sdxl = index["_class_name"]
        .as_str()
        .unwrap_or_default()
        .contains("XL");
    let unet: UNetConfig = read_json(&diffusers.join("unet/config.json"))?;
    let vae: VaeConfig = read_json(&diffusers.join("vae/config.json"))?;
    let mut text = vec![read_json::<ClipConfig>(
        &diffusers.join("text_encoder/config.json"),
    )?];
    if sdxl {
        text.push(read_json(&diffusers.join("text_encoder_2/config.json"))?);
    }
    let family = Family::of_diffusers(sdxl, &text[0]);
    let prefixes = match family {
        Family::Sd1 => &ldm::SD1,
        Family::Sd2 => &ldm::SD2,
        Family::Sdxl => &ldm::SDXL,
    };
    let load = |dir: &Path| -> PResult<std::collections::BTreeMap<String, Tensor>> {
        let files = component_weights(dir)?;
        let mut all = std::collections::BTreeMap::new();
        for f in files {
            for (k, v) in candle_core::safetensors::load(&f, &Device::Cpu)? {
                all.insert(k, v);
            }
        }
        Ok(all)
    };
    let mut out_tensors = std::collections::BTreeMap::new();
    let t = load(&diffusers.join("unet"))?;
    let map = ldm::map_names(t.keys().cloned(), |n| {
        ldm::unet_name(n, &unet).map(|s| ldm::Source::Rename(format!("{}{s}", prefixes.unet)))
    })
    .map_err(|e| model_err(diffusers, e))?;
    out_tensors.extend(ldm::to_single_file(&t, &map)?);
    let t = load(&diffusers.join("vae"))?;
    let levels = vae.block_out_channels.len();
    let map = ldm::map_names(t.keys().cloned(), |n| {
        ldm::vae_name(n, levels).map(|s| ldm::Source::Rename(format!("{}{s}", prefixes.vae)))
    })
    .map_err(|e| model_err(diffusers, e))?;
    out_tensors.extend(ldm::to_single_file(&t, &map)?);
    for (i, (prefix, openclip)) in prefixes.text.iter().enumerate() {
        let dir = diffusers.join(if i == 0 {
            "text_encoder"
        } else {
            "text_encoder_2"
        });
        let t = load(&dir)?;
        let t: std::collections::BTreeMap<String, Tensor> = t
            .into_iter()
            .filter(|(k, _)| !k.ends_with("position_ids"))
            .collect();
        let map = ldm::map_names(t.keys().cloned(), |n| {
            if *openclip {
                ldm::openclip_source(n, prefix)
            } else {
                Some(ldm::hf_clip_source(n, prefix))
            }
        })
        .map_err(|e| model_err(&dir, e))?;
        out_tensors.extend(ldm::to_single_file(&t, &map)?);
    }
    let schedule: ScheduleConfig =
        read_json(&diffusers.join("scheduler/scheduler_config.json")).unwrap_or_default();
    let cfg = SingleFileConfig {
        family,
        unet,
        vae,
        text,
        schedule,
    };
    let mut meta = std::collections::HashMap::new();
    meta.insert(
        META_KEY.to_string(),
        serde_json::to_string(&cfg).map_err(|e| model_err(out, e))?,
    );
    meta.insert("format".to_string(), "pt".to_string());
    crate::models::load::save_with_metadata(&out_tensors, meta, out)?;
    let parent = out.parent().unwrap_or(Path::new("."));
    for tk in ["tokenizer", "tokenizer_2"] {
        let src = diffusers.join(tk);
        if src.is_dir() {
            let dst = parent.join(tk);
            std::fs::create_dir_all(&dst).map_err(|e| model_err(&dst, e))?;
            for entry in std::fs::read_dir(&src)
                .map_err(|e| model_err(&src, e))?
                .flatten()
            {
                std::fs::copy(entry.path(), dst.join(entry.file_name()))
                    .map_err(|e| model_err(&dst, e))?;
            }
        }
    }
    Ok(())
}
