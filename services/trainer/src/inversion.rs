//! `create_embedding` jobs: a textual-inversion embedding made from an initial text's token
//! embeddings and published at `embeddings/NAME.safetensors`, where training continues it and
//! samplers find it by name.

use atelier_contracts::embedding::{CreateEmbeddingSpec, EmbeddingOutput};
use atelier_contracts::{ArtifactKey, JobOutput};
use atelier_diffusion::pipeline::StableDiffusion;
use atelier_diffusion::torch::inversion::TrainableEmbedding;
use atelier_kit::{JobCtx, JobError};

use crate::Trainer;

/// The object at `key`, or `None` when there is none.
pub(crate) async fn get_if_any(
    ctx: &JobCtx,
    key: &ArtifactKey,
) -> Result<Option<Vec<u8>>, JobError> {
    match ctx.store().get_bytes(key).await {
        Ok(b) => Ok(Some(b.to_vec())),
        Err(atelier_kit::store::StoreError::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Trainer {
    pub(crate) async fn create_embedding(
        &self,
        ctx: &JobCtx,
        spec: CreateEmbeddingSpec,
    ) -> Result<JobOutput, JobError> {
        spec.check()
            .map_err(|e| JobError::permanent("invalid_job", e))?;
        let key = ArtifactKey::parse(&format!("embeddings/{}.safetensors", spec.name))
            .map_err(|e| JobError::permanent("invalid_job", format!("name: {e}")))?;
        if !spec.overwrite && get_if_any(ctx, &key).await?.is_some() {
            return Err(JobError::permanent(
                "embedding_exists",
                format!(
                    "an embedding named {:?} exists ({key}); pick another name or overwrite it",
                    spec.name
                ),
            ));
        }
        let path = self
            .registry
            .checkpoint(&spec.base_model)
            .map_err(|e| JobError::permanent("unknown_model", e))?;
        ctx.progress(0.0, Some(format!("loading {}", spec.base_model)))
            .await;
        let placement = self.placement;
        let sp = spec.clone();
        let made = tokio::task::spawn_blocking(move || -> Result<_, JobError> {
            let model = StableDiffusion::load(&path, placement)
                .map_err(|e| JobError::permanent("model_load_failed", e.to_string()))?;
            let compute = |e: atelier_diffusion::torch::Error| {
                JobError::permanent("invalid_job", e.to_string())
            };
            let emb = TrainableEmbedding::from_text(
                &model,
                &sp.name,
                &sp.init_text,
                sp.num_vectors as usize,
            )
            .map_err(compute)?;
            let widths = emb.vectors.iter().map(|v| v.size()[1] as u32).collect();
            let file = emb
                .file(model.family, 0, (&model.name, &model.hash))
                .map_err(compute)?;
            Ok((file, widths))
        })
        .await
        .map_err(|e| JobError::retryable("worker_panicked", e.to_string()))?;
        let (file, widths) = made?;
        let (embedding, _) = ctx
            .store()
            .put_bytes(file.clone().into(), "application/octet-stream")
            .await?;
        ctx.store()
            .put_at(&key, file.into(), "application/octet-stream")
            .await?;
        Ok(JobOutput::Embedding(EmbeddingOutput {
            name: spec.name,
            embedding,
            published_as: key.as_str().to_string(),
            vectors: spec.num_vectors,
            widths,
            step: 0,
        }))
    }
}
