//! A local folder as an export's [`Sink`]: each file is written under a temporary name and
//! renamed into place, so a file that exists is whole (what resuming relies on).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::Sink;

pub struct DirSink {
    root: PathBuf,
}

impl DirSink {
    /// Exports into `root`. A new export wants it empty or absent; `resume` continues one that
    /// was interrupted there.
    pub fn new(root: &Path, resume: bool) -> anyhow::Result<Self> {
        let busy = root.exists() && root.read_dir()?.next().is_some();
        if busy && !resume {
            anyhow::bail!(
                "{} exists and is not empty; choose a new --out folder, or --resume an export interrupted there",
                root.display()
            );
        }
        std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    fn path(&self, rel: &str) -> anyhow::Result<PathBuf> {
        let bad = rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
        if bad || rel.starts_with('/') {
            anyhow::bail!("{rel:?} is not a relative path inside the export");
        }
        Ok(self.root.join(rel))
    }
}

impl Sink for DirSink {
    async fn exists(&self, rel: &str) -> anyhow::Result<bool> {
        Ok(self.path(rel)?.is_file())
    }

    async fn put(&self, rel: &str, bytes: Vec<u8>) -> anyhow::Result<()> {
        let path = self.path(rel)?;
        let tmp = path.with_extension(format!(
            "{}.partial",
            path.extension().and_then(|e| e.to_str()).unwrap_or("")
        ));
        tokio::task::spawn_blocking(move || {
            if let Some(d) = path.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(&tmp, &bytes).with_context(|| format!("writing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path).with_context(|| format!("renaming {}", tmp.display()))
        })
        .await?
    }
}
