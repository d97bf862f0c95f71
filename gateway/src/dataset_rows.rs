//! A version's rows a page at a time, and image thumbnails, for the gallery.
//!
//! Rows are read from the version's `data.jsonl` by byte ranges: a page starts at its cursor (a
//! byte offset), reads 1 MiB at a time, and stops at the page size or after 16 MiB scanned, so a
//! page of a million-row version costs what a page of a small one does (a filter that matches
//! rarely answers short pages with a cursor to go on from). Thumbnails (at most 256 px a side,
//! JPEG) are made from the image once, under the decode limits and budget, and kept in the object
//! store at `thumbs/256/<sha256 of the image key>.jpg`.

use std::sync::OnceLock;

use atelier_contracts::dataset::DatasetRow;
use atelier_contracts::ArtifactKey;
use atelier_kit::store::StoreError;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use utoipa::{IntoParams, ToSchema};

use crate::api::AppState;
use crate::auth::{Caller, Scope};
use crate::error::ApiError;

const CHUNK: u64 = 1 << 20;
/// Bytes one page may read through (of each file, for a comparison of two).
pub(crate) const MAX_SCAN: u64 = 16 << 20;
/// The longest row line read (a row's caption, paraphrases and negatives together).
const MAX_LINE: usize = 4 << 20;
const THUMB_SIDE: u32 = 256;
/// Images larger than this are not thumbnailed.
const MAX_IMAGE_BYTES: u64 = 64 << 20;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RowQuery {
    /// The previous page's `next_cursor` (a byte offset); the start when absent.
    pub cursor: Option<u64>,
    /// Rows per page, 1..=200 (default 48).
    pub limit: Option<usize>,
    /// `train`, `val` or `test`.
    pub split: Option<String>,
    /// `gold`, `silver` or `bronze`.
    pub tier: Option<String>,
    /// `accept`, `flag` or `reject`.
    pub decision: Option<String>,
    /// Words the caption, tags or source contain (case-insensitive).
    pub q: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RowPage {
    pub rows: Vec<DatasetRow>,
    /// Where the next page starts; absent at the end.
    pub next_cursor: Option<u64>,
    /// Bytes of the version's rows read through so far, of `total_bytes`.
    pub scanned_to: u64,
    pub total_bytes: u64,
}

/// A field's API word (its serde name: `train`, `gold`, `accept`, …).
fn word<T: Serialize>(v: &T) -> Option<String> {
    serde_json::to_value(v).ok()?.as_str().map(str::to_owned)
}

impl RowQuery {
    fn matches(&self, r: &DatasetRow) -> bool {
        let same = |want: &Option<String>, got: Option<String>| {
            want.as_ref().is_none_or(|w| got.as_ref() == Some(w))
        };
        same(&self.split, r.split.as_ref().and_then(word))
            && same(&self.tier, r.tier.as_ref().and_then(word))
            && same(&self.decision, word(&r.decision))
            && self.q.as_deref().is_none_or(|q| {
                let hay = format!(
                    "{} {} {}",
                    r.caption.as_deref().unwrap_or_default(),
                    r.tags.join(" "),
                    r.source.as_deref().unwrap_or_default()
                )
                .to_lowercase();
                q.to_lowercase().split_whitespace().all(|w| hay.contains(w))
            })
    }
}

/// A page of a version's rows, filtered.
#[utoipa::path(
    get, path = "/v1/datasets/{name}/versions/{version}/rows", tag = "datasets",
    params(("name" = String, Path), ("version" = String, Path, description = "A number, or `latest`"), RowQuery),
    responses((status = 200, body = RowPage), (status = 404, body = atelier_contracts::http::ApiErrorBody),
        (status = 422, body = atelier_contracts::http::ApiErrorBody)),
    security(("bearer" = ["artifacts:read"]))
)]
pub async fn rows(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((name, version)): Path<(String, String)>,
    q: Result<Query<RowQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<RowPage>, ApiError> {
    caller.require(Scope::ArtifactsRead)?;
    let Query(q) = q.map_err(|e| ApiError::unprocessable("invalid_query", e.to_string()))?;
    let limit = q.limit.unwrap_or(48);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::unprocessable(
            "invalid_limit",
            format!("limit must be 1..=200, not {limit}"),
        ));
    }
    for (field, v, allowed) in [
        ("split", &q.split, &["train", "val", "test"][..]),
        ("tier", &q.tier, &["gold", "silver", "bronze"][..]),
        ("decision", &q.decision, &["accept", "flag", "reject"][..]),
    ] {
        if let Some(v) = v.as_deref().filter(|v| !allowed.contains(v)) {
            return Err(ApiError::unprocessable(
                "invalid_filter",
                format!("{field} {v:?} is not one of {}", allowed.join(", ")),
            ));
        }
    }
    let m = crate::datasets::find_version(&app, &name, &version).await?;
    let key = ArtifactKey::parse(&m.data.key)
        .map_err(|e| ApiError::unavailable(format!("the version's rows key: {e}")))?;
    let page = scan(&app, &key, m.data.size, &q, limit).await?;
    Ok(Json(page))
}

/// Rows from `q.cursor` on: up to `limit` matches, at most [`MAX_SCAN`] bytes read.
async fn scan(
    app: &AppState,
    key: &ArtifactKey,
    total: u64,
    q: &RowQuery,
    limit: usize,
) -> Result<RowPage, ApiError> {
    let mut reader = RowReader::new(key.clone(), total, q.cursor.unwrap_or(0));
    let mut rows = Vec::new();
    while rows.len() < limit && reader.read_from_start() < MAX_SCAN {
        match reader.next(app).await? {
            Some(row) if q.matches(&row) => rows.push(row),
            Some(_) => {}
            None => break,
        }
    }
    Ok(RowPage {
        rows,
        next_cursor: reader.cursor(),
        scanned_to: reader.offset(),
        total_bytes: total,
    })
}

/// A version's rows one at a time from a byte offset, read 1 MiB at a time.
pub(crate) struct RowReader {
    key: ArtifactKey,
    total: u64,
    start: u64,
    /// File offset of `buf[0]`.
    origin: u64,
    /// Next byte to fetch.
    pos: u64,
    buf: Vec<u8>,
    /// A row read ahead, with the offset it starts at.
    peeked: Option<(u64, DatasetRow)>,
}

impl RowReader {
    pub(crate) fn new(key: ArtifactKey, total: u64, from: u64) -> Self {
        let from = from.min(total);
        Self {
            key,
            total,
            start: from,
            origin: from,
            pos: from,
            buf: Vec::new(),
            peeked: None,
        }
    }

    /// The offset of the next row not taken.
    pub(crate) fn offset(&self) -> u64 {
        self.peeked.as_ref().map_or(self.origin, |p| p.0)
    }

    /// Where to continue; `None` at the end.
    pub(crate) fn cursor(&self) -> Option<u64> {
        let at = self.offset();
        (at < self.total).then_some(at)
    }

    pub(crate) fn read_from_start(&self) -> u64 {
        self.pos - self.start
    }

    /// The next row without taking it.
    pub(crate) async fn peek(&mut self, app: &AppState) -> Result<Option<&DatasetRow>, ApiError> {
        if self.peeked.is_none() {
            let at = self.origin;
            self.peeked = self.read(app).await?.map(|r| (at, r));
        }
        Ok(self.peeked.as_ref().map(|p| &p.1))
    }

    pub(crate) async fn next(&mut self, app: &AppState) -> Result<Option<DatasetRow>, ApiError> {
        self.peek(app).await?;
        Ok(self.peeked.take().map(|p| p.1))
    }

    /// Reads the row at `origin` and moves `origin` past it.
    async fn read(&mut self, app: &AppState) -> Result<Option<DatasetRow>, ApiError> {
        loop {
            if let Some(n) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=n).collect();
                self.origin += line.len() as u64;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return parse(&line).map(Some);
            }
            if self.pos >= self.total {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    self.origin += self.buf.len() as u64;
                    self.buf.clear();
                    return Ok(None);
                }
                let line = std::mem::take(&mut self.buf);
                self.origin += line.len() as u64;
                return parse(&line).map(Some);
            }
            if self.buf.len() > MAX_LINE {
                return Err(ApiError::unavailable("a row of the version is over 4 MiB"));
            }
            let end = (self.pos + CHUNK).min(self.total);
            let bytes = app
                .store
                .get_range(&self.key, self.pos..end)
                .await
                .map_err(ApiError::from)?;
            self.buf.extend_from_slice(&bytes);
            self.pos = end;
        }
    }
}

fn parse(line: &[u8]) -> Result<DatasetRow, ApiError> {
    serde_json::from_slice(line)
        .map_err(|e| ApiError::unavailable(format!("a row of the version does not parse: {e}")))
}

fn thumbs() -> &'static Semaphore {
    static S: OnceLock<Semaphore> = OnceLock::new();
    S.get_or_init(|| Semaphore::new(2))
}

/// An image's thumbnail (JPEG, at most 256 px a side), made once and kept.
#[utoipa::path(
    get, path = "/v1/thumbnails/{key}", tag = "datasets",
    params(("key" = String, Path, description = "The image's artifact key")),
    responses((status = 200, description = "The thumbnail, a JPEG (served as image/jpeg)", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 404, body = atelier_contracts::http::ApiErrorBody),
        (status = 422, body = atelier_contracts::http::ApiErrorBody)),
    security(("bearer" = ["artifacts:read"]))
)]
pub async fn thumbnail(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    caller.require(Scope::ArtifactsRead)?;
    let src = ArtifactKey::parse(&key)
        .map_err(|e| ApiError::bad_request("invalid_key", format!("{key:?}: {e}")))?;
    let cached = ArtifactKey::parse(&format!(
        "thumbs/{THUMB_SIDE}/{}.jpg",
        hex::encode(Sha256::digest(key.as_bytes()))
    ))
    .map_err(|e| ApiError::unavailable(e.to_string()))?;
    match app.store.get_bytes(&cached).await {
        Ok(b) => return Ok(jpeg(b.to_vec())),
        Err(StoreError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let meta = app
        .store
        .head(&src)
        .await
        .map_err(ApiError::from)?
        .ok_or_else(|| ApiError::not_found("artifact_not_found", format!("no artifact {key}")))?;
    if meta.size as u64 > MAX_IMAGE_BYTES {
        return Err(ApiError::unprocessable(
            "image_too_large",
            format!(
                "{key} is {} bytes; thumbnails are made of images up to 64 MiB",
                meta.size
            ),
        ));
    }
    let bytes = app.store.get_bytes(&src).await.map_err(ApiError::from)?;
    let _permit = thumbs()
        .acquire()
        .await
        .map_err(|e| ApiError::unavailable(e.to_string()))?;
    let img = atelier_decode::decode_async(bytes, atelier_decode::Limits::default())
        .await
        .map_err(|e| ApiError::unprocessable("bad_image", format!("{key}: {e}")))?
        .into_image();
    let out = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let rgb = img.to_rgb8();
        let (w, h) = rgb.dimensions();
        let s = (THUMB_SIDE as f64 / w.max(h) as f64).min(1.0);
        let (tw, th) = (
            ((w as f64 * s) as u32).max(1),
            ((h as f64 * s) as u32).max(1),
        );
        let small = image::imageops::thumbnail(&rgb, tw, th);
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 82)
            .encode_image(&small)
            .map_err(|e| e.to_string())?;
        Ok(out)
    })
    .await
    .map_err(|e| ApiError::unavailable(e.to_string()))?
    .map_err(|e| ApiError::unavailable(format!("encoding the thumbnail: {e}")))?;
    app.store
        .put_at(&cached, out.clone().into(), "image/jpeg")
        .await
        .map_err(ApiError::from)?;
    Ok(jpeg(out))
}

fn jpeg(bytes: Vec<u8>) -> Response {
    let mut r = bytes.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("image/jpeg"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=86400"),
    );
    r
}
