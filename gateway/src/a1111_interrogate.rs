//! A1111's `interrogate`: one image captioned by the captioner (an `interrogate` job), answered
//! as `{"caption": …}`. A1111's `clip` interrogator is a BLIP caption plus CLIP-ranked keywords;
//! here `clip` (and `blip`) is the BLIP caption from the first BLIP model folder in
//! `<models>/blip` (the captioner serves the same folders: `--blip-models`), `blip/NAME` a given
//! one, and `openai` the captioner's OpenAI-compatible endpoint. `deepdanbooru` (a tagger atelier
//! does not have) and any other name are a 422 listing what is available.

use atelier_contracts::dataset::{CaptionBackend, InterrogateSpec};
use atelier_contracts::{JobOutput, JobSpec};
use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};
use serde::Deserialize;
use serde_json::{json, Value};
use utoipa::ToSchema;

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

#[derive(Debug, Deserialize, ToSchema)]
pub struct InterrogateRequest {
    /// Base64 image (a `data:` prefix is accepted).
    #[serde(default)]
    pub image: String,
    /// `clip` (A1111's default), `blip`, `blip/NAME` or `openai`.
    #[serde(default = "clip")]
    pub model: String,
}

fn clip() -> String {
    "clip".into()
}

/// Captions one image (A1111's interrogate).
#[utoipa::path(post, path = "/sdapi/v1/interrogate", tag = "a1111",
    operation_id = "interrogateapi_sdapi_v1_interrogate_post",
    request_body = InterrogateRequest,
    responses((status = 200, description = "{caption}"), (status = 422, body = atelier_contracts::http::ApiErrorBody)),
    security(("bearer" = ["jobs:write"])))]
pub async fn interrogate(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    caller.require(Scope::JobsWrite)?;
    let req: InterrogateRequest = crate::a1111::json_body(&app, &headers, body).await?;
    let backend = backend_for(&app, &req.model)?;
    let (bytes, _) = crate::a1111::decode_b64_image("image", &req.image)?;
    let (art, _) = app
        .store
        .put_bytes(bytes.into(), "application/octet-stream")
        .await
        .map_err(ApiError::from)?;
    let spec = JobSpec::Interrogate(InterrogateSpec {
        image: art.key,
        backend,
    });
    let out = crate::a1111::run_one(
        &app,
        &caller,
        spec,
        "interrogate_failed",
        &["bad_image", "unknown_model", "captioner_not_configured"],
    )
    .await?;
    match out {
        JobOutput::Interrogated(out) => Ok(Json(json!({"caption": out.caption}))),
        _ => Err(ApiError::unavailable("the interrogate job made no caption")),
    }
}

/// BLIP model folders in `<models>/blip`, sorted.
fn blip_models(app: &AppState) -> Vec<String> {
    let Some(root) = app.a1111.models_dir().map(|d| d.join("blip")) else {
        return Vec::new();
    };
    let mut names: Vec<String> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().join("config.json").is_file())
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
}

fn blip(model: String) -> CaptionBackend {
    CaptionBackend::Blip {
        model,
        prompt: None,
        max_tokens: 40,
        batch_size: 1,
    }
}

fn backend_for(app: &AppState, model: &str) -> Result<CaptionBackend, ApiError> {
    let blips = blip_models(app);
    let named = model.strip_prefix("blip/").unwrap_or(model);
    match model {
        "clip" | "blip" if !blips.is_empty() => Ok(blip(blips[0].clone())),
        "openai" => Ok(CaptionBackend::Openai {
            model: None,
            prompt: None,
            max_tokens: 300,
            temperature: 0.2,
            image_max_side: 768,
            batch: false,
        }),
        _ if blips.iter().any(|b| b == named) => Ok(blip(named.to_owned())),
        _ => {
            let mut available: Vec<String> = Vec::new();
            if let Some(first) = blips.first() {
                available.push(format!("clip (BLIP {first})"));
            }
            available.extend(blips.iter().map(|b| format!("blip/{b}")));
            available.push("openai (the captioner's endpoint)".into());
            Err(ApiError::unprocessable(
                "unknown_model",
                format!(
                    "interrogate model {model:?} is not served (no BLIP model folder in <models>/blip for clip, and no tagger for deepdanbooru); available: {}",
                    available.join(", ")
                ),
            ))
        }
    }
}
