//! The embedding models a worker has: CLIP (image and text spaces) and MiniLM (caption space),
//! each loaded once, on first use.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use atelier_contracts::Space;
use atelier_embed::clip::ClipEncoder;
use atelier_embed::SentenceEncoder;
use sha2::{Digest, Sha256};

type Slot<T> = Arc<OnceLock<Result<Arc<T>, String>>>;

/// Model folders, their ids (read once, not per query) and their lazily loaded encoders.
#[derive(Clone, Default)]
pub struct Models {
    pub clip_dir: Option<PathBuf>,
    pub minilm_dir: Option<PathBuf>,
    clip_id: Option<String>,
    minilm_id: Option<String>,
    clip: Slot<ClipEncoder>,
    minilm: Slot<SentenceEncoder>,
}

/// `folder-name@12 hex`: the folder's name and a digest of its config and weight sizes, so an
/// index built with one model is never queried with another.
pub fn model_id(dir: &Path) -> String {
    let mut h = Sha256::new();
    for f in ["config.json", "model.safetensors"] {
        let p = dir.join(f);
        if let Ok(meta) = std::fs::metadata(&p) {
            h.update(meta.len().to_le_bytes());
        }
        if f == "config.json" {
            if let Ok(b) = std::fs::read(&p) {
                h.update(&b);
            }
        }
    }
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_owned());
    format!("{name}@{}", &hex::encode(h.finalize())[..12])
}

/// A loaded encoder for one space.
pub enum Encoder {
    Clip(Arc<ClipEncoder>),
    MiniLm(Arc<SentenceEncoder>),
}

impl Models {
    pub fn new(clip_dir: Option<PathBuf>, minilm_dir: Option<PathBuf>) -> Self {
        Self {
            clip_id: clip_dir.as_deref().map(model_id),
            minilm_id: minilm_dir.as_deref().map(model_id),
            clip_dir,
            minilm_dir,
            ..Default::default()
        }
    }

    /// `ATELIER_CLIP_MODEL` and the MiniLM folder `scripts/bootstrap` installs (or `ATELIER_MINILM_DIR`).
    pub fn discover() -> Self {
        Self::new(
            atelier_embed::clip::find_clip(),
            atelier_embed::find_minilm(),
        )
    }

    /// The spaces this worker can embed.
    pub fn spaces(&self) -> Vec<Space> {
        Space::ALL
            .into_iter()
            .filter(|s| self.dir(*s).is_some())
            .collect()
    }

    fn dir(&self, space: Space) -> Option<&PathBuf> {
        match space {
            Space::ClipImage | Space::ClipText => self.clip_dir.as_ref(),
            Space::Caption => self.minilm_dir.as_ref(),
        }
    }

    /// The model id of `space`, or why the worker has none.
    pub fn id(&self, space: Space) -> Result<String, String> {
        match space {
            Space::ClipImage | Space::ClipText => self.clip_id.clone(),
            Space::Caption => self.minilm_id.clone(),
        }
        .ok_or_else(|| missing(space))
    }

    /// Whether this worker embeds `space` with `want`, the model an index was built with; the
    /// reason when not.
    pub fn check(&self, space: Space, want: &str) -> Result<(), String> {
        let have = self.id(space)?;
        if have != want {
            return Err(format!(
                "space {space} was indexed with {want}; this worker has {have}: re-index"
            ));
        }
        Ok(())
    }

    /// The encoder of `space` (loading it on first use).
    pub fn encoder(&self, space: Space) -> Result<Encoder, String> {
        let dev = candle_core::Device::Cpu;
        match space {
            Space::ClipImage | Space::ClipText => {
                let dir = self.clip_dir.as_ref().ok_or_else(|| missing(space))?;
                self.clip
                    .get_or_init(|| {
                        ClipEncoder::load(dir, &dev)
                            .map(Arc::new)
                            .map_err(|e| e.to_string())
                    })
                    .clone()
                    .map(Encoder::Clip)
            }
            Space::Caption => {
                let dir = self.minilm_dir.as_ref().ok_or_else(|| missing(space))?;
                self.minilm
                    .get_or_init(|| {
                        SentenceEncoder::load(dir, &dev)
                            .map(Arc::new)
                            .map_err(|e| e.to_string())
                    })
                    .clone()
                    .map(Encoder::MiniLm)
            }
        }
    }

    /// Embeddings of `texts` in `space` (CLIP's text tower for the CLIP spaces).
    pub fn embed_texts(&self, space: Space, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        match self.encoder(space)? {
            Encoder::Clip(c) => c.embed_texts(texts).map_err(|e| e.to_string()),
            Encoder::MiniLm(m) => m.embed(texts).map_err(|e| e.to_string()),
        }
    }

    /// CLIP image embeddings.
    pub fn embed_images(&self, images: &[image::DynamicImage]) -> Result<Vec<Vec<f32>>, String> {
        match self.encoder(Space::ClipImage)? {
            Encoder::Clip(c) => c.embed_images(images).map_err(|e| e.to_string()),
            Encoder::MiniLm(_) => Err("MiniLM embeds no images".to_owned()),
        }
    }
}

fn missing(space: Space) -> String {
    match space {
        Space::ClipImage | Space::ClipText => format!(
            "space {space} needs a CLIP model: start the retrieval-indexer with --clip-model DIR (or ATELIER_CLIP_MODEL)"
        ),
        Space::Caption => format!(
            "space {space} needs the MiniLM folder: run scripts/bootstrap, or pass --minilm DIR (ATELIER_MINILM_DIR)"
        ),
    }
}
