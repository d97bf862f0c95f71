//! The rest of A1111's API surface, so every `webuiapi` method gets an answer in A1111's schema:
//! what the model folders hold (embeddings, LoRAs), the schedulers atelier honours, memory, flags,
//! PNG info; empty lists for what atelier has none of (hypernetworks, face restorers,
//! Real-ESRGAN models, scripts, extensions, prompt styles, separate VAEs); `501` with the reason
//! for actions atelier does not take. The registry is read at every call, so the `refresh-*`
//! routes have nothing to rescan and answer as A1111 does.

use atelier_registry::{Entry, EntryKind};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

/// The registry's entries of one kind, local first, then the object store's of other names.
async fn entries(app: &AppState, kind: EntryKind) -> Vec<(Entry, bool)> {
    let mut out: Vec<(Entry, bool)> = app
        .a1111
        .registry()
        .map(|r| r.list())
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.kind == kind)
        .map(|e| (e, true))
        .collect();
    match atelier_registry::store::list(&app.store).await {
        Ok(listed) => {
            for e in listed.into_iter().filter(|e| e.kind == kind) {
                if !out.iter().any(|(l, _)| l.name == e.name) {
                    out.push((e, false));
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "listing the object store's models"),
    }
    out
}

/// A safetensors header in the object store (two ranged reads; at most 1 MiB of header).
async fn store_header(app: &AppState, e: &Entry) -> Option<atelier_registry::header::Header> {
    let key = atelier_contracts::ArtifactKey::parse(&e.path.to_string_lossy()).ok()?;
    let len = app.store.get_range(&key, 0..8).await.ok()?;
    let n = u64::from_le_bytes(len.as_ref().try_into().ok()?);
    if n > 1 << 20 {
        return None;
    }
    let json = app.store.get_range(&key, 8..8 + n).await.ok()?;
    atelier_registry::header::parse(&json)
        .map_err(|err| tracing::warn!(file = %e.name, error = %err, "reading a safetensors header"))
        .ok()
}

/// A local file's safetensors header, off the async threads; `None` when it has none.
async fn header(e: &Entry) -> Option<atelier_registry::header::Header> {
    let path = e.path.clone();
    tokio::task::spawn_blocking(move || atelier_registry::header::read(&path))
        .await
        .ok()?
        .map_err(|err| tracing::warn!(file = %e.name, error = %err, "reading a safetensors header"))
        .ok()
}

/// The schedulers (noise schedules) samplers accept as `scheduler`.
#[utoipa::path(get, path = "/sdapi/v1/schedulers", tag = "a1111", operation_id = "get_schedulers_sdapi_v1_schedulers_get",
    responses((status = 200, description = "[{name, label, aliases, default_rho, need_inner_model}]")), security(("bearer" = ["jobs:read"])))]
pub async fn schedulers(Extension(caller): Extension<Caller>) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    Ok(Json(json!([
        {"name": "automatic", "label": "Automatic", "aliases": null, "default_rho": -1, "need_inner_model": false},
        {"name": "karras", "label": "Karras", "aliases": null, "default_rho": 7.0, "need_inner_model": false},
    ])))
}

/// Upscalers: A1111's built-in `None`, `Lanczos` and `Nearest`, then the ESRGAN-family models in
/// `<models>/ESRGAN` (their scale read from an `Nx`/`xN` in the name, else 4, as A1111 lists
/// ESRGAN files).
#[utoipa::path(get, path = "/sdapi/v1/upscalers", tag = "a1111", operation_id = "get_upscalers_sdapi_v1_upscalers_get",
    responses((status = 200, description = "[{name, model_name, model_path, model_url, scale}]")), security(("bearer" = ["jobs:read"])))]
pub async fn upscalers(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    let item = |name: &str| json!({"name": name, "model_name": null, "model_path": null, "model_url": null, "scale": 4});
    let mut out = vec![item("None"), item("Lanczos"), item("Nearest")];
    for (name, path) in app
        .a1111
        .registry()
        .map(|r| r.upscalers())
        .unwrap_or_default()
    {
        out.push(
            json!({"name": name, "model_name": "ESRGAN", "model_path": path.display().to_string(),
            "model_url": null, "scale": scale_in_name(&name)}),
        );
    }
    Ok(Json(Value::Array(out)))
}

/// The scale an upscaler's file name states (`4x-UltraSharp`, `RealESRGAN_x2plus`), else 4.
fn scale_in_name(name: &str) -> u32 {
    let lower = name.to_ascii_lowercase();
    lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .find_map(|part| {
            let digits = part.strip_suffix('x').or_else(|| part.strip_prefix('x'))?;
            let digits: String = digits.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().ok().filter(|s| (1..=16).contains(s))
        })
        .unwrap_or(4)
}

/// The hires pass's latent upscale modes.
#[utoipa::path(get, path = "/sdapi/v1/latent-upscale-modes", tag = "a1111", operation_id = "get_latent_upscale_modes_sdapi_v1_latent_upscale_modes_get",
    responses((status = 200, description = "[{name}]")), security(("bearer" = ["jobs:read"])))]
pub async fn latent_upscale_modes(
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    Ok(Json(
        json!([{"name": "Latent"}, {"name": "Latent (nearest)"}]),
    ))
}

macro_rules! empty_list {
    ($name:ident, $path:literal, $op:literal, $what:literal) => {
        #[doc = $what]
        #[utoipa::path(get, path = $path, tag = "a1111", operation_id = $op,
            responses((status = 200, description = "[]")), security(("bearer" = ["jobs:read"])))]
        pub async fn $name(Extension(caller): Extension<Caller>) -> Result<Json<Value>, ApiError> {
            caller.require(Scope::JobsRead)?;
            Ok(Json(json!([])))
        }
    };
}

/// Separate VAE files under `<models>/vae` (what the `sd_vae` option picks from).
#[utoipa::path(get, path = "/sdapi/v1/sd-vae", tag = "a1111", operation_id = "get_sd_vaes_sdapi_v1_sd_vae_get",
    responses((status = 200, description = "[{model_name, filename}]")), security(("bearer" = ["jobs:read"])))]
pub async fn sd_vae(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    let vaes = app.a1111.registry().map(|r| r.vaes()).unwrap_or_default();
    Ok(Json(Value::Array(
        vaes.into_iter()
            .map(|(name, _)| json!({"filename": format!("vae/{name}"), "model_name": name}))
            .collect(),
    )))
}
empty_list!(
    hypernetworks,
    "/sdapi/v1/hypernetworks",
    "get_hypernetworks_sdapi_v1_hypernetworks_get",
    "Hypernetworks: none (atelier does not run them)."
);
empty_list!(
    face_restorers,
    "/sdapi/v1/face-restorers",
    "get_face_restorers_sdapi_v1_face_restorers_get",
    "Face restorers: none."
);
empty_list!(
    realesrgan_models,
    "/sdapi/v1/realesrgan-models",
    "get_realesrgan_models_sdapi_v1_realesrgan_models_get",
    "Real-ESRGAN models: none."
);
empty_list!(
    prompt_styles,
    "/sdapi/v1/prompt-styles",
    "get_prompt_styles_sdapi_v1_prompt_styles_get",
    "Prompt styles: none (atelier keeps no styles file)."
);
empty_list!(
    script_info,
    "/sdapi/v1/script-info",
    "get_script_info_sdapi_v1_script_info_get",
    "Scripts' arguments: none (atelier runs no A1111 scripts)."
);
empty_list!(
    extensions,
    "/sdapi/v1/extensions",
    "get_extensions_list_sdapi_v1_extensions_get",
    "Extensions: none."
);

/// Scripts by tab: none.
#[utoipa::path(get, path = "/sdapi/v1/scripts", tag = "a1111", operation_id = "get_scripts_list_sdapi_v1_scripts_get",
    responses((status = 200, description = "{txt2img: [], img2img: []}")), security(("bearer" = ["jobs:read"])))]
pub async fn scripts(Extension(caller): Extension<Caller>) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    Ok(Json(json!({"txt2img": [], "img2img": []})))
}

/// Textual-inversion embeddings in the registry (`embeddings/`) and the object store's (where the
/// trainer publishes them), with their vectors, width and step read from the file's header;
/// files whose shape cannot be read (`.pt`) are `skipped`.
#[utoipa::path(get, path = "/sdapi/v1/embeddings", tag = "a1111", operation_id = "get_embeddings_sdapi_v1_embeddings_get",
    responses((status = 200, description = "{loaded: {name: {step, sd_checkpoint, sd_checkpoint_name, shape, vectors}}, skipped: {...}}")), security(("bearer" = ["jobs:read"])))]
pub async fn embeddings(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    let (mut loaded, mut skipped) = (Map::new(), Map::new());
    for (e, local) in entries(&app, EntryKind::Embedding).await {
        let h = match local {
            true => header(&e).await,
            false if e.path.extension().is_some_and(|x| x == "safetensors") => {
                store_header(&app, &e).await
            }
            false => None,
        };
        let shape = h
            .as_ref()
            .and_then(atelier_registry::header::embedding_shape);
        let meta = |k: &str| h.as_ref().and_then(|h| h.metadata.get(k).cloned());
        let (vectors, width) = shape.unwrap_or((0, 0));
        let item = json!({"step": meta("step").and_then(|s| s.parse::<u64>().ok()),
            "sd_checkpoint": meta("sd_checkpoint"), "sd_checkpoint_name": meta("sd_checkpoint_name"),
            "shape": width, "vectors": vectors});
        match shape {
            Some(_) => loaded.insert(e.name, item),
            None => skipped.insert(e.name, item),
        };
    }
    Ok(Json(json!({"loaded": loaded, "skipped": skipped})))
}

/// LoRAs (the Lora extension's route): the registry's `loras/` and the object store's, with each
/// local file's metadata (kohya's `ss_*` fields).
#[utoipa::path(get, path = "/sdapi/v1/loras", tag = "a1111", operation_id = "get_loras_sdapi_v1_loras_get",
    responses((status = 200, description = "[{name, alias, path, metadata}]")), security(("bearer" = ["jobs:read"])))]
pub async fn loras(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    let mut out = Vec::new();
    for (e, local) in entries(&app, EntryKind::Lora).await {
        let metadata = match local {
            true => header(&e).await.map(|h| h.metadata).unwrap_or_default(),
            false => Default::default(),
        };
        let alias = metadata
            .get("ss_output_name")
            .cloned()
            .unwrap_or_else(|| e.name.clone());
        let path = format!("loras/{}.safetensors", e.name);
        out.push(json!({"name": e.name, "alias": alias, "path": path, "metadata": metadata}));
    }
    Ok(Json(Value::Array(out)))
}

/// Memory: the gateway machine's RAM and the gateway's resident set (A1111's `ram`), each live
/// worker's resident set (`workers`), and the GPUs the workers report (`cuda`: A1111's `system`
/// free/used/total summed over the distinct GPUs, each one under `devices`). The allocator figures
/// A1111 adds under `cuda` (PyTorch's) are not reported.
#[utoipa::path(get, path = "/sdapi/v1/memory", tag = "a1111", operation_id = "get_memory_sdapi_v1_memory_get",
    responses((status = 200, description = "{ram: {free, used, total, process}, cuda: {system: {free, used, total}, devices} | {error}, workers}")), security(("bearer" = ["jobs:read"])))]
pub async fn memory(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    let field = |text: &str, name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = field(&meminfo, "MemTotal:");
    let free = field(&meminfo, "MemAvailable:");
    let used = total.zip(free).map(|(t, f)| t.saturating_sub(f));
    let reports = atelier_kit::queue::live_reports(&app.bus, None)
        .await
        .map_err(|e| ApiError::unavailable(format!("reading the worker reports: {e:#}")))?;
    Ok(Json(json!({
        "ram": {"free": free, "used": used, "total": total, "process": atelier_kit::memory::rss_bytes()},
        "cuda": cuda_of(&reports),
        "workers": reports.iter().map(|r| json!({"service": r.service.name(), "instance": r.instance,
            "rss": r.rss_bytes})).collect::<Vec<_>>(),
    })))
}

/// The distinct GPUs the workers report (by driver id), summed as A1111's `cuda.system`.
fn cuda_of(reports: &[atelier_contracts::WorkerReport]) -> Value {
    let mut seen: Vec<&atelier_contracts::GpuMemory> = Vec::new();
    for g in reports.iter().flat_map(|r| &r.gpus) {
        if !seen.iter().any(|s| s.uuid == g.uuid) {
            seen.push(g);
        }
    }
    if seen.is_empty() {
        return json!({"error": "no live worker reports a GPU (nvidia-smi answers on none of their machines)"});
    }
    let sum = |f: fn(&atelier_contracts::GpuMemory) -> u64| seen.iter().map(|g| f(g)).sum::<u64>();
    json!({
        "system": {"free": sum(|g| g.free), "used": sum(|g| g.used), "total": sum(|g| g.total)},
        "devices": seen,
    })
}

/// The command-line flags A1111 clients look at, as atelier runs.
#[utoipa::path(get, path = "/sdapi/v1/cmd-flags", tag = "a1111", operation_id = "get_cmd_flags_sdapi_v1_cmd_flags_get",
    responses((status = 200, description = "{api, nowebui, ...}")), security(("bearer" = ["jobs:read"])))]
pub async fn cmd_flags(Extension(caller): Extension<Caller>) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    Ok(Json(json!({
        "api": true, "nowebui": true, "api_auth": null, "medvram": false, "lowvram": false,
        "no_half": false, "xformers": false, "hide_ui_dir_config": true, "api_server_stop": false,
    })))
}

macro_rules! refresh {
    ($name:ident, $path:literal, $op:literal, $what:literal) => {
        #[doc = $what]
        #[utoipa::path(post, path = $path, tag = "a1111", operation_id = $op,
            responses((status = 200, description = "null")), security(("bearer" = ["jobs:read"])))]
        pub async fn $name(Extension(caller): Extension<Caller>) -> Result<Json<Value>, ApiError> {
            caller.require(Scope::JobsRead)?;
            Ok(Json(Value::Null))
        }
    };
}

refresh!(
    refresh_checkpoints,
    "/sdapi/v1/refresh-checkpoints",
    "refresh_checkpoints_sdapi_v1_refresh_checkpoints_post",
    "Rescan checkpoints: the registry is read at every request, so there is nothing to do."
);
refresh!(
    refresh_vae,
    "/sdapi/v1/refresh-vae",
    "refresh_vae_sdapi_v1_refresh_vae_post",
    "Rescan VAEs: nothing to do (see `sd-vae`)."
);
refresh!(
    refresh_embeddings,
    "/sdapi/v1/refresh-embeddings",
    "refresh_embeddings_sdapi_v1_refresh_embeddings_post",
    "Rescan embeddings: read at every request, nothing to do."
);
refresh!(
    refresh_loras,
    "/sdapi/v1/refresh-loras",
    "refresh_loras_sdapi_v1_refresh_loras_post",
    "Rescan LoRAs: read at every request, nothing to do."
);

macro_rules! not_taken {
    ($name:ident, $path:literal, $op:literal, $why:literal) => {
        #[doc = $why]
        #[utoipa::path(post, path = $path, tag = "a1111", operation_id = $op,
            responses((status = 501, body = atelier_contracts::http::ApiErrorBody)), security(("bearer" = ["jobs:write"])))]
        pub async fn $name(Extension(caller): Extension<Caller>) -> Result<Json<Value>, ApiError> {
            caller.require(Scope::JobsWrite)?;
            Err(ApiError::new(StatusCode::NOT_IMPLEMENTED, "not_supported", $why))
        }
    };
}

not_taken!(
    create_hypernetwork,
    "/sdapi/v1/create/hypernetwork",
    "create_hypernetwork_sdapi_v1_create_hypernetwork_post",
    "atelier does not make hypernetworks; train a LoRA instead (POST /v1/train/lora)"
);
not_taken!(
    train_hypernetwork,
    "/sdapi/v1/train/hypernetwork",
    "train_hypernetwork_sdapi_v1_train_hypernetwork_post",
    "atelier does not train hypernetworks; train a LoRA instead (POST /v1/train/lora)"
);
not_taken!(unload_checkpoint, "/sdapi/v1/unload-checkpoint", "unloadapi_sdapi_v1_unload_checkpoint_post",
    "workers load and evict checkpoints themselves (ATELIER_MODEL_CACHE, ATELIER_MODEL_CACHE_MB); there is no one model to unload");
not_taken!(
    reload_checkpoint,
    "/sdapi/v1/reload-checkpoint",
    "reloadapi_sdapi_v1_reload_checkpoint_post",
    "workers load checkpoints when a job needs them; there is no one model to reload"
);

/// `POST /sdapi/v1/png-info`'s body.
#[derive(Debug, Deserialize, ToSchema)]
pub struct PngInfoRequest {
    /// Base64 image (a `data:` prefix is accepted).
    pub image: String,
}

/// What a PNG says about how it was made: its `parameters` text (`info`), A1111's parse of it
/// (`parameters`) and its other text chunks (`items`). Other formats have no text: all empty.
#[utoipa::path(post, path = "/sdapi/v1/png-info", tag = "a1111", operation_id = "pnginfoapi_sdapi_v1_png_info_post",
    request_body = PngInfoRequest,
    responses((status = 200, description = "{info, items, parameters}"), (status = 422, body = atelier_contracts::http::ApiErrorBody)), security(("bearer" = ["jobs:read"])))]
pub async fn png_info(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsRead)?;
    let req: PngInfoRequest = crate::a1111::json_body(&app, &headers, body).await?;
    let data = req
        .image
        .split_once(";base64,")
        .map_or(req.image.as_str(), |(_, d)| d);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| {
            ApiError::unprocessable("malformed_base64", format!("image: not base64: {e}"))
        })?;
    let texts = tokio::task::spawn_blocking(move || crate::infotext::png_texts(&bytes))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
        .map_err(|e| ApiError::unprocessable("bad_image", format!("image: {e}")))?;
    let mut info = String::new();
    let mut items = Map::new();
    for (k, v) in texts {
        match k.as_str() {
            "parameters" => info = v,
            _ => {
                items.insert(k, json!(v));
            }
        }
    }
    let parameters = crate::infotext::parse(&info);
    Ok(Json(
        json!({"info": info, "items": items, "parameters": parameters}),
    ))
}

#[cfg(test)]
mod tests {
    use super::scale_in_name;

    #[test]
    fn upscaler_scales_come_from_their_names() {
        for (name, scale) in [
            ("4x-UltraSharp", 4),
            ("ESRGAN_4x", 4),
            ("RealESRGAN_x2plus", 2),
            ("2x_NMKD-Siax", 2),
            ("8x_NMKD-Superscale", 8),
            ("xylophone", 4),
            ("detail", 4),
        ] {
            assert_eq!(scale_in_name(name), scale, "{name}");
        }
    }
}
