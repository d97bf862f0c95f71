//! A1111's extras routes (`extra-single-image`, `extra-batch-images`): an `upscale` job — on the
//! augmenter with A1111's built-in upscalers (Lanczos, Nearest), on the sampler when it names an
//! upscaler model from `<models>/ESRGAN` — waited for, answered in A1111's schema. Face
//! restoration (GFPGAN, CodeFormer) is not served: a visibility above 0 is a 422.

use atelier_contracts::upscale::{UpscaleResize, UpscaleSpec};
use atelier_contracts::{JobOutput, JobSpec};
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

/// The fields both extras routes share (A1111's `ExtrasBaseRequest`, with its defaults).
#[derive(Debug, Deserialize, ToSchema)]
pub struct ExtrasBase {
    /// 0: scale by `upscaling_resize`; 1: to `upscaling_resize_w` × `upscaling_resize_h`.
    #[serde(default)]
    pub resize_mode: u8,
    #[serde(default = "yes")]
    pub show_extras_results: bool,
    #[serde(default)]
    pub gfpgan_visibility: f32,
    #[serde(default)]
    pub codeformer_visibility: f32,
    #[serde(default)]
    pub codeformer_weight: f32,
    #[serde(default = "two")]
    pub upscaling_resize: f32,
    #[serde(default = "side")]
    pub upscaling_resize_w: u32,
    #[serde(default = "side")]
    pub upscaling_resize_h: u32,
    #[serde(default = "yes")]
    pub upscaling_crop: bool,
    #[serde(default = "none")]
    pub upscaler_1: String,
    #[serde(default = "none")]
    pub upscaler_2: String,
    #[serde(default)]
    pub extras_upscaler_2_visibility: f32,
    #[serde(default)]
    pub upscale_first: bool,
}

fn yes() -> bool {
    true
}
fn two() -> f32 {
    2.0
}
fn side() -> u32 {
    512
}
fn none() -> String {
    "None".into()
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ExtrasSingleRequest {
    #[serde(flatten)]
    pub base: ExtrasBase,
    /// Base64 image (a `data:` prefix is accepted).
    pub image: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ExtrasBatchItem {
    pub data: String,
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
pub struct ExtrasBatchRequest {
    #[serde(flatten)]
    pub base: ExtrasBase,
    #[serde(rename = "imageList")]
    pub image_list: Vec<ExtrasBatchItem>,
}

/// Upscales one image (A1111's extras tab).
#[utoipa::path(post, path = "/sdapi/v1/extra-single-image", tag = "a1111",
    operation_id = "extras_single_image_api_sdapi_v1_extra_single_image_post",
    request_body = ExtrasSingleRequest,
    responses((status = 200, description = "{html_info, image}"), (status = 422, body = atelier_contracts::http::ApiErrorBody)),
    security(("bearer" = ["jobs:write"])))]
pub async fn extra_single_image(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let req: ExtrasSingleRequest = crate::a1111::json_body(&app, &headers, body).await?;
    let (images, info) = upscale(&app, &caller, &req.base, &[req.image.as_str()]).await?;
    let image = images.into_iter().next().unwrap_or_default();
    Ok(Json(json!({"html_info": html(&info), "image": image})))
}

/// Upscales several images (A1111's extras tab, batch).
#[utoipa::path(post, path = "/sdapi/v1/extra-batch-images", tag = "a1111",
    operation_id = "extras_batch_images_api_sdapi_v1_extra_batch_images_post",
    request_body = ExtrasBatchRequest,
    responses((status = 200, description = "{html_info, images}"), (status = 422, body = atelier_contracts::http::ApiErrorBody)),
    security(("bearer" = ["jobs:write"])))]
pub async fn extra_batch_images(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let req: ExtrasBatchRequest = crate::a1111::json_body(&app, &headers, body).await?;
    let data: Vec<&str> = req.image_list.iter().map(|i| i.data.as_str()).collect();
    let (images, info) = upscale(&app, &caller, &req.base, &data).await?;
    Ok(Json(json!({"html_info": html(&info), "images": images})))
}

/// A1111's `plaintext_to_html`.
fn html(text: &str) -> String {
    let escaped: Vec<String> = text
        .split('\n')
        .map(|l| {
            l.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
                .replace('\'', "&#x27;")
        })
        .collect();
    format!("<p>{}</p>", escaped.join("<br>\n"))
}

fn spec_of(base: &ExtrasBase) -> Result<UpscaleSpec, ApiError> {
    for (field, v) in [
        ("gfpgan_visibility", base.gfpgan_visibility),
        ("codeformer_visibility", base.codeformer_visibility),
    ] {
        if v > 0.0 {
            return Err(ApiError::unprocessable(
                "unsupported_parameter",
                format!("{field}: atelier has no face restorers (GET /sdapi/v1/face-restorers is empty); send 0"),
            ));
        }
    }
    let resize = match base.resize_mode {
        0 => UpscaleResize::By {
            scale: base.upscaling_resize,
        },
        1 => UpscaleResize::To {
            width: base.upscaling_resize_w,
            height: base.upscaling_resize_h,
            crop: base.upscaling_crop,
        },
        m => {
            return Err(ApiError::unprocessable(
                "invalid_job",
                format!("resize_mode must be 0 (scale by) or 1 (scale to), not {m}"),
            ))
        }
    };
    Ok(UpscaleSpec {
        images: Vec::new(),
        resize,
        upscaler: base.upscaler_1.clone(),
        upscaler_2: (base.extras_upscaler_2_visibility > 0.0 && base.upscaler_2 != "None")
            .then(|| base.upscaler_2.clone()),
        upscaler_2_visibility: base.extras_upscaler_2_visibility,
    })
}

/// Every upscaler the spec names is built in or a model in `<models>/ESRGAN`; else a 422 listing
/// what there is.
fn known_upscalers(app: &AppState, spec: &UpscaleSpec) -> Result<(), ApiError> {
    let models: Vec<String> = app
        .a1111
        .registry()
        .map(|r| r.upscalers().into_iter().map(|(n, _)| n).collect())
        .unwrap_or_default();
    let builtin = atelier_contracts::upscale::UPSCALERS;
    for (field, name) in std::iter::once(("upscaler_1", &spec.upscaler))
        .chain(spec.upscaler_2.iter().map(|u| ("upscaler_2", u)))
    {
        if !builtin.contains(&name.as_str()) && !models.contains(name) {
            let all: Vec<&str> = builtin
                .iter()
                .copied()
                .chain(models.iter().map(String::as_str))
                .collect();
            return Err(ApiError::unprocessable(
                "unknown_upscaler",
                format!(
                    "{field}: {name:?} is not an upscaler here; GET /sdapi/v1/upscalers lists them: {}",
                    all.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Stores the images, runs one `upscale` job, waits, answers the PNGs (base64) and the infotext.
async fn upscale(
    app: &AppState,
    caller: &Caller,
    base: &ExtrasBase,
    images: &[&str],
) -> Result<(Vec<String>, String), ApiError> {
    let mut spec = spec_of(base)?;
    known_upscalers(app, &spec)?;
    let mut decoded = Vec::with_capacity(images.len());
    for (i, b64) in images.iter().enumerate() {
        let field = format!("image {i}");
        decoded.push(crate::a1111::decode_b64_image(&field, b64)?.0);
    }
    // Checked before anything is stored.
    spec.images = vec![format!("sha256/00/{}", "0".repeat(64)); images.len()];
    spec.check()
        .map_err(|e| ApiError::unprocessable("invalid_job", e))?;
    spec.images.clear();
    for bytes in decoded {
        let (art, _) = app
            .store
            .put_bytes(bytes.into(), "application/octet-stream")
            .await
            .map_err(ApiError::from)?;
        spec.images.push(art.key);
    }
    let out = crate::a1111::run_one(
        app,
        caller,
        JobSpec::Upscale(spec),
        "upscale_failed",
        &["bad_image", "invalid_job"],
    )
    .await?;
    let JobOutput::Upscaled(out) = out else {
        return Err(ApiError::unavailable("the upscale job made no images"));
    };
    let mut encoded = Vec::with_capacity(out.images.len());
    if base.show_extras_results {
        for art in &out.images {
            let key = atelier_contracts::ArtifactKey::parse(&art.key)
                .map_err(|e| ApiError::unavailable(format!("bad artifact key: {e}")))?;
            let bytes = app.store.get_bytes(&key).await.map_err(ApiError::from)?;
            encoded.push(base64::engine::general_purpose::STANDARD.encode(&bytes));
        }
    }
    Ok((encoded, out.info))
}
