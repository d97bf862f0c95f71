//! Search: [`answer`] turns a [`SearchRequest`] into a [`SearchReply`]; [`serve`] answers them on
//! `atelier.v1.retrieval.query` in the queue group, so replicas share the load.

use std::sync::Arc;

use atelier_contracts::retrieval::IndexManifest;
use atelier_contracts::typed::{INDEXES, SEARCH};
use atelier_contracts::{
    ArtifactKey, ErrorInfo, SearchHit, SearchReply, SearchRequest, SearchResponse, Space,
};
use atelier_kit::kv::Kv;
use atelier_kit::shutdown::CancellationToken;
use atelier_kit::{Bus, Store};

use crate::state::{LoadError, LoadedIndex};
use crate::Indexer;

fn err(code: &str, message: impl Into<String>) -> SearchReply {
    SearchReply::Error(ErrorInfo {
        code: code.to_owned(),
        message: message.into(),
    })
}

fn load_reply(e: LoadError) -> SearchReply {
    match e {
        LoadError::Unavailable(m) => err("unavailable", m),
        LoadError::Corrupt(m) => err("unavailable", format!("the index is unreadable: {m}")),
    }
}

/// The space a request searches.
pub fn space_of(req: &SearchRequest) -> Space {
    req.space.unwrap_or(Space::ClipImage)
}

/// Answers one query.
pub async fn answer(
    indexer: &Indexer,
    indexes: &Kv<IndexManifest>,
    store: &Store,
    req: SearchRequest,
) -> SearchReply {
    if let Err(e) = req.check() {
        return err("invalid_query", e);
    }
    let index = match indexer.cache.get(indexes, store, &req.dataset).await {
        Ok(Some(i)) => i,
        Ok(None) => {
            return err(
                "not_found",
                format!(
                    "dataset {:?} has no index: run `atelier index --dataset {}` first",
                    req.dataset, req.dataset
                ),
            )
        }
        Err(e) => return load_reply(e),
    };
    let space = space_of(&req);
    if !index.spaces.contains_key(&space) {
        let have: Vec<&str> = index.spaces.keys().map(|s| s.name()).collect();
        return err(
            "not_found",
            format!(
                "the index of {:?} has no space {space} (it has: {}); index it with a worker that has the model",
                req.dataset,
                if have.is_empty() { "none".to_owned() } else { have.join(", ") }
            ),
        );
    }
    let (query, exclude) = match query_vector(indexer, store, &index, &req, space).await {
        Ok(v) => v,
        Err(reply) => return reply,
    };
    let filter = req.filter.clone();
    let k = req.k as usize;
    let idx = index.clone();
    let found = tokio::task::spawn_blocking(move || {
        let graph = &idx.spaces[&space];
        graph.search_filtered(&query, k, |key| {
            Some(key) != exclude && idx.rows.get(&key).is_some_and(|r| filter.matches(r))
        })
    })
    .await;
    let hits = match found {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return err("invalid_query", e.to_string()),
        Err(e) => return err("unavailable", e.to_string()),
    };
    let results = hits
        .into_iter()
        .filter_map(|h| {
            let r = index.rows.get(&h.key)?;
            Some(SearchHit {
                image_id: r.image_id.clone(),
                sha256: r.sha256.clone(),
                image_key: r.image_key.clone(),
                score: h.score,
                caption: r.caption.clone(),
                tier: r.tier,
                tags: r.tags.clone(),
                source: r.source.clone(),
                width: r.width,
                height: r.height,
            })
        })
        .collect();
    SearchReply::Ok(SearchResponse {
        dataset: req.dataset,
        version: index.manifest.version,
        space,
        results,
    })
}

/// The query's vector in `space`, and the record to leave out of the results (the query record
/// itself, for `image_id` queries).
async fn query_vector(
    indexer: &Indexer,
    store: &Store,
    index: &Arc<LoadedIndex>,
    req: &SearchRequest,
    space: Space,
) -> Result<(Vec<f32>, Option<u64>), SearchReply> {
    if let Some(id) = &req.image_id {
        let Some((key, _)) = index.row(id) else {
            return Err(err(
                "record_not_found",
                format!("dataset {:?} has no indexed record {id:?}", req.dataset),
            ));
        };
        // image→image and image→text start from the record's image; caption→caption from its caption.
        let from = if space == Space::Caption {
            Space::Caption
        } else {
            Space::ClipImage
        };
        let Some(v) = index.spaces.get(&from).and_then(|g| g.get(key)) else {
            return Err(err(
                "record_not_found",
                format!("record {id:?} has no embedding in space {from}"),
            ));
        };
        return Ok((v, Some(key)));
    }
    // The worker's model must be the one the index was built with.
    indexer
        .models
        .check(space, &index.manifest.spaces[&space].model)
        .map_err(|e| err("model_unavailable", e))?;
    let models = indexer.models.clone();
    if let Some(text) = &req.text {
        let text = text.clone();
        let v = tokio::task::spawn_blocking(move || models.embed_texts(space, &[&text]))
            .await
            .map_err(|e| err("unavailable", e.to_string()))?
            .map_err(|e| err("unavailable", e))?;
        return Ok((v.into_iter().next().unwrap_or_default(), None));
    }
    let Some(image_key) = &req.image_key else {
        return Err(err("invalid_query", "no query given"));
    };
    let key = ArtifactKey::parse(image_key).map_err(|e| err("invalid_query", e.to_string()))?;
    let bytes = match store.get_bytes(&key).await {
        Ok(b) => b,
        Err(e) if e.is_transient() => return Err(err("unavailable", e.to_string())),
        Err(_) => return Err(err("not_found", format!("no image at {image_key}"))),
    };
    let v = tokio::task::spawn_blocking(move || {
        let img = atelier_decode::decode(&bytes, &atelier_decode::Limits::default())
            .map_err(|e| err(e.code(), format!("the query image does not decode: {e}")))?;
        models
            .embed_images(std::slice::from_ref(&img.image))
            .map_err(|e| err("unavailable", e))
    })
    .await
    .map_err(|e| err("unavailable", e.to_string()))??;
    Ok((v.into_iter().next().unwrap_or_default(), None))
}

/// Answers queries until `shutdown`; each query runs on its own task.
pub async fn serve(
    indexer: Indexer,
    bus: Bus,
    store: Store,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let indexes = bus.bucket(INDEXES).await?;
    bus.answer(
        SEARCH,
        shutdown,
        move |req: Result<SearchRequest, String>| {
            let (indexer, indexes, store) = (indexer.clone(), indexes.clone(), store.clone());
            async move {
                match req {
                    Ok(req) => answer(&indexer, &indexes, &store, req).await,
                    Err(e) => err("invalid_query", format!("not a search request: {e}")),
                }
            }
        },
    )
    .await
}
