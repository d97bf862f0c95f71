//! Which fields of an A1111 `txt2img`/`img2img` request atelier honours. A field it does not
//! honour is accepted only at a value under which A1111 would make the same image (its default, or
//! a value that has no effect with the chosen sampler); any other value is a 422 naming the field
//! and why — never silently ignored. Fields A1111 does not know are refused the same way.

use atelier_contracts::samplers::SamplerKind;
use serde_json::{Map, Value};

use crate::error::ApiError;

/// Fields atelier reads (or that change nothing about the image: saving, sending, restoring
/// settings).
const HONOURED: &[&str] = &[
    "prompt",
    "negative_prompt",
    "seed",
    "subseed",
    "subseed_strength",
    "sampler_name",
    "sampler_index",
    "scheduler",
    "batch_size",
    "n_iter",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "override_settings",
    "override_settings_restore_afterwards",
    "do_not_save_samples",
    "do_not_save_grid",
    "save_images",
    "send_images",
    "force_task_id",
    "infotext",
    "enable_hr",
    "comments",
    "user",
    // FLUX / SD 3 (Forge's distilled CFG; diffusers' max_sequence_length; the sigma shift)
    "distilled_cfg_scale",
    "max_sequence_length",
    "shift",
    // img2img
    "init_images",
    "mask",
    "denoising_strength",
    "mask_blur",
    "inpainting_mask_invert",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "resize_mode",
    "include_init_images",
    "image_cfg_scale",
];

/// Fields atelier does not honour, accepted at the values [`unsupported`] lets through.
const AT_DEFAULT: &[&str] = &[
    "restore_faces",
    "tiling",
    "styles",
    "seed_resize_from_h",
    "seed_resize_from_w",
    "s_churn",
    "s_tmin",
    "s_tmax",
    "s_noise",
    "script_name",
    "script_args",
    "alwayson_scripts",
    "refiner_checkpoint",
    "refiner_switch_at",
    "disable_extra_networks",
    "firstpass_image",
    "latent_mask",
    "initial_noise_multiplier",
    "mask_blur_x",
    "mask_blur_y",
    "eta",
];

/// Hires fix's fields: read by A1111 only with `enable_hr`.
const HIRES: &[&str] = &[
    "hr_scale",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_resize_x",
    "hr_resize_y",
    "hr_checkpoint_name",
    "hr_sampler_name",
    "hr_scheduler",
    "hr_prompt",
    "hr_negative_prompt",
    "hr_cfg",
    "hr_distilled_cfg",
    "firstphase_width",
    "firstphase_height",
];

fn is_off(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

fn is_num(v: &Value, want: f64) -> bool {
    v.is_null() || v.as_f64() == Some(want)
}

/// Why `field`'s value `v` would make another image than atelier makes, if it would.
fn unsupported(field: &str, v: &Value, body: &Map<String, Value>) -> Option<String> {
    let why = |what: &str| Some(format!("{field}: {what}"));
    match field {
        "hr_upscaler" if enabled(body, "enable_hr") && !(is_off(v) || v.as_str().is_some_and(|u| atelier_contracts::generate::HIRES_UPSCALERS.contains(&u))) => why(
            &format!("the hires upscalers are {}", atelier_contracts::generate::HIRES_UPSCALERS.join(", ")),
        ),
        "hr_checkpoint_name" if !(is_off(v) || v.as_str() == Some("Use same checkpoint")) => why("the hires pass uses the first pass's checkpoint"),
        "hr_sampler_name" if !(is_off(v) || v.as_str() == Some("Use same sampler")) => why("the hires pass uses the first pass's sampler"),
        "hr_scheduler" if !(is_off(v) || v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("Use same scheduler") || s.eq_ignore_ascii_case("automatic"))) => why("the hires pass uses the first pass's scheduler"),
        "hr_cfg" | "hr_distilled_cfg" if !is_off(v) && body.get("cfg_scale") != Some(v) => why("the hires pass uses the first pass's CFG scale"),
        "firstphase_width" | "firstphase_height" if !is_off(v) => why("the old hires fix's first-pass size is not supported; use hr_scale or hr_resize_x/hr_resize_y"),
        "restore_faces" if !is_off(v) => why("atelier has no face restorer"),
        "tiling" if !is_off(v) => why("tiling (seamless textures) is not supported"),
        "styles" if !is_off(v) => why("atelier keeps no prompt styles; put the style's text in the prompt"),
        "seed_resize_from_h" | "seed_resize_from_w" if !(is_off(v) || v.as_i64() == Some(-1)) => {
            why("resizing the seed is not supported")
        }
        "s_churn" | "s_tmin" | "s_tmax" if !is_off(v) => why("sampler noise settings are fixed at A1111's defaults (0)"),
        "s_noise" if !is_num(v, 1.0) => why("sampler noise settings are fixed at A1111's defaults (1)"),
        "script_name" | "script_args" if !is_off(v) => why("atelier runs no A1111 scripts"),
        "alwayson_scripts" if !scripts_off(v) => why("atelier runs no A1111 extensions (ControlNet, ADetailer, ...)"),
        "refiner_checkpoint" | "refiner_switch_at" if !is_off(v) => why("the SDXL refiner pass is not supported"),
        "disable_extra_networks" if !is_off(v) => why("LoRA and embedding syntax in prompts is always applied"),
        "firstpass_image" | "latent_mask" if !is_off(v) => why("not supported"),
        "initial_noise_multiplier" if !is_num(v, 1.0) => why("only 1 is supported"),
        "mask_blur_x" | "mask_blur_y" if !blur_matches(v, body) => why("only a blur equal in x and y (mask_blur) is supported"),
        "eta" if !eta_matches(v, body) => why("eta is fixed: 1 for ancestral and SDE samplers, 0 for DDIM"),
        _ if HONOURED.contains(&field) || HIRES.contains(&field) || AT_DEFAULT.contains(&field) => None,
        _ if v.is_null() => None,
        _ => why("not a field of A1111's API that atelier knows"),
    }
}

/// `alwayson_scripts` that run nothing: empty, or extensions given no arguments (webuiapi sends
/// `{"ControlNet": {"args": []}}` whenever it thinks ControlNet is installed).
fn scripts_off(v: &Value) -> bool {
    match v {
        Value::Object(o) => o.values().all(|s| is_off(&s["args"]) || is_off(s)),
        other => is_off(other),
    }
}

fn enabled(body: &Map<String, Value>, field: &str) -> bool {
    body.get(field).is_some_and(|v| !is_off(v))
}

fn has_mask(body: &Map<String, Value>) -> bool {
    body.get("mask").is_some_and(|m| !is_off(m))
}

fn blur_matches(v: &Value, body: &Map<String, Value>) -> bool {
    let blur = body.get("mask_blur").and_then(Value::as_f64).unwrap_or(4.0);
    v.is_null() || v.as_f64() == Some(blur) || !has_mask(body)
}

/// Eta matters to DDIM (atelier: 0) and to ancestral and SDE samplers (atelier: 1).
fn eta_matches(v: &Value, body: &Map<String, Value>) -> bool {
    let Some(eta) = v.as_f64() else {
        return true;
    };
    let name = ["sampler_name", "sampler_index"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_str))
        .unwrap_or("Euler a");
    match SamplerKind::parse(name) {
        Some(SamplerKind::Ddim) => eta == 0.0,
        Some(k) if k.is_stochastic() && k != SamplerKind::Ddpm && k != SamplerKind::Lcm => {
            eta == 1.0
        }
        _ => true,
    }
}

/// The request's first field atelier would not honour, as a 422 naming it.
pub fn check(body: &Map<String, Value>) -> Result<(), ApiError> {
    let mut problems: Vec<String> = body
        .iter()
        .filter_map(|(k, v)| unsupported(k, v, body))
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    problems.sort();
    Err(ApiError::unprocessable(
        "unsupported_parameter",
        problems.join("; "),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check_json(v: Value) -> Result<(), String> {
        check(v.as_object().unwrap()).map_err(|e| e.message)
    }

    #[test]
    fn webuiapis_defaults_pass() {
        let txt2img: Value = serde_json::from_str(
            r#"{"enable_hr": false, "hr_scale": 2, "hr_upscaler": "Latent", "hr_second_pass_steps": 0,
            "hr_resize_x": 0, "hr_resize_y": 0, "denoising_strength": 0.7, "firstphase_width": 0, "firstphase_height": 0,
            "prompt": "a cat", "styles": [], "seed": -1, "subseed": -1, "subseed_strength": 0.0,
            "seed_resize_from_h": 0, "seed_resize_from_w": 0, "batch_size": 1, "n_iter": 1, "steps": 20,
            "cfg_scale": 7.0, "width": 512, "height": 512, "restore_faces": false, "tiling": false,
            "do_not_save_samples": false, "do_not_save_grid": false, "negative_prompt": "", "eta": 1.0,
            "s_churn": 0, "s_tmax": 0, "s_tmin": 0, "s_noise": 1, "override_settings": {},
            "override_settings_restore_afterwards": true, "sampler_name": "Euler a", "sampler_index": "Euler a",
            "script_name": null, "script_args": [], "send_images": true, "save_images": false,
            "alwayson_scripts": {"ControlNet": {"args": []}}}"#,
        )
        .unwrap();
        assert_eq!(check_json(txt2img), Ok(()));
    }

    #[test]
    fn what_would_change_the_image_is_named() {
        let e = check_json(
            json!({"enable_hr": true, "hr_upscaler": "R-ESRGAN 4x+", "restore_faces": true}),
        )
        .unwrap_err();
        assert!(
            e.contains("hr_upscaler: the hires upscalers are Latent")
                && e.contains("restore_faces"),
            "{e}"
        );
        assert_eq!(
            check_json(json!({"enable_hr": true, "hr_upscaler": "Lanczos"})),
            Ok(())
        );
        let e = check_json(json!({"sampler_name": "DDIM", "eta": 1.0})).unwrap_err();
        assert!(e.starts_with("eta:"), "{e}");
        assert_eq!(
            check_json(json!({"sampler_name": "Euler", "eta": 0.3})),
            Ok(())
        );
        let e =
            check_json(json!({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": true}]}}}))
                .unwrap_err();
        assert!(e.starts_with("alwayson_scripts"), "{e}");
        assert!(check_json(json!({"teleport": 1}))
            .unwrap_err()
            .contains("teleport"));
        assert_eq!(check_json(json!({"teleport": null})), Ok(()));
        // Inpainting's fields are honoured.
        assert_eq!(
            check_json(json!({"mask": "x", "inpainting_fill": 0, "inpaint_full_res": true})),
            Ok(())
        );
    }
}

/// Fields an `infotext` sets, as A1111 applies it: each field it names that the request did
/// not set itself; its settings (clip skip, ENSD, noise source, model) into `override_settings`
/// unless already there.
pub fn apply_infotext(body: &mut Map<String, Value>, img2img: bool) {
    let Some(text) = body
        .get("infotext")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return;
    };
    let params = crate::infotext::parse(&text);
    let number = |v: &Value| -> Option<Value> {
        let s = v.as_str()?.trim();
        s.parse::<i64>()
            .map(Value::from)
            .ok()
            .or_else(|| s.parse::<f64>().ok().map(Value::from))
    };
    let text_value = |v: &Value| v.as_str().map(|s| Value::from(s.to_owned()));
    let mut fields: Vec<(&str, &str, bool)> = vec![
        ("Prompt", "prompt", false),
        ("Negative prompt", "negative_prompt", false),
        ("Steps", "steps", true),
        ("Sampler", "sampler_name", false),
        ("Schedule type", "scheduler", false),
        ("CFG scale", "cfg_scale", true),
        ("Seed", "seed", true),
        ("Size-1", "width", true),
        ("Size-2", "height", true),
        ("Variation seed", "subseed", true),
        ("Variation seed strength", "subseed_strength", true),
    ];
    if img2img {
        fields.push(("Denoising strength", "denoising_strength", true));
    }
    for (label, field, numeric) in fields {
        if body.contains_key(field) {
            continue;
        }
        let value = params
            .get(label)
            .and_then(|v| if numeric { number(v) } else { text_value(v) });
        if let Some(v) = value {
            body.insert(field.to_owned(), v);
        }
    }
    let settings = [
        ("Clip skip", "CLIP_stop_at_last_layers", true),
        ("ENSD", "eta_noise_seed_delta", true),
        ("RNG", "randn_source", false),
        ("Model", "sd_model_checkpoint", false),
    ];
    let over = body
        .entry("override_settings")
        .or_insert_with(|| Value::Object(Map::new()));
    if over.is_null() {
        *over = Value::Object(Map::new());
    }
    if let Some(over) = over.as_object_mut() {
        for (label, setting, numeric) in settings {
            let value = params
                .get(label)
                .and_then(|v| if numeric { number(v) } else { text_value(v) });
            if let Some(v) = value {
                over.entry(setting).or_insert(v);
            }
        }
    }
}

#[cfg(test)]
mod infotext_tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_infotext_fills_what_the_request_left_out() {
        let mut body = json!({
            "infotext": "a red fox\nNegative prompt: blur\nSteps: 12, Sampler: DPM++ 2M, CFG scale: 5.5, Seed: 77, Size: 64x96, Clip skip: 2, Model: tiny",
            "steps": 3,
        })
        .as_object()
        .unwrap()
        .clone();
        apply_infotext(&mut body, false);
        assert_eq!(body["prompt"], "a red fox");
        assert_eq!(body["negative_prompt"], "blur");
        assert_eq!(body["steps"], 3, "the request's own value wins");
        assert_eq!(body["sampler_name"], "DPM++ 2M");
        assert_eq!(body["cfg_scale"], 5.5);
        assert_eq!(body["seed"], 77);
        assert_eq!(
            (body["width"].clone(), body["height"].clone()),
            (json!(64), json!(96))
        );
        assert_eq!(body["override_settings"]["CLIP_stop_at_last_layers"], 2);
        assert_eq!(body["override_settings"]["sd_model_checkpoint"], "tiny");
        assert_eq!(check(&body).map_err(|e| e.message), Ok(()));
    }
}
