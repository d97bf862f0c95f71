//! Partial uploads a crash left behind: `put_stream` stages large bodies under
//! [`UPLOADS_PREFIX`] and removes them when done, so anything older than an upload can take is
//! debris. Gateways remove it at start. (On S3, parts of a multipart upload that was never
//! completed are not objects: a bucket lifecycle rule aborting incomplete multipart uploads after
//! a day removes them; docs/cluster.md says so.)

use std::time::{Duration, SystemTime};

use crate::store::{Store, StoreError};

/// Where `put_stream` stages bodies before they are copied to their content address.
pub const UPLOADS_PREFIX: &str = "tmp/uploads";

impl Store {
    /// Removes staged uploads last written more than `older_than` ago; returns how many.
    pub async fn remove_stale_uploads(&self, older_than: Duration) -> Result<usize, StoreError> {
        let cutoff = SystemTime::now() - older_than;
        // A local store: its directory holds every staged file, including the multipart staging
        // files (`<key>#<n>`) listings do not show.
        if let Some(root) = &self.local_root {
            return Ok(remove_old_files(&root.join(UPLOADS_PREFIX), cutoff));
        }
        let mut removed = 0;
        for meta in self.list(UPLOADS_PREFIX).await? {
            if SystemTime::from(meta.last_modified) < cutoff {
                let path = meta.location.clone();
                self.retry("delete", || {
                    let (inner, path) = (self.inner.clone(), path.clone());
                    async move { inner.delete(&path).await }
                })
                .await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The files in a local store's staging directory older than `cutoff`.
fn remove_old_files(dir: &std::path::Path, cutoff: SystemTime) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < cutoff && e.path().is_file())
        })
        .filter(|e| std::fs::remove_file(e.path()).is_ok())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_staged_uploads_go_and_fresh_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let args = crate::config::StoreArgs {
            store: dir.path().display().to_string(),
            ..Default::default()
        };
        let store = Store::open(&args).unwrap();
        let staged = dir.path().join(UPLOADS_PREFIX);
        std::fs::create_dir_all(&staged).unwrap();
        let old = SystemTime::now() - Duration::from_secs(7200);
        for name in ["a#1", "b"] {
            let f = std::fs::File::create(staged.join(name)).unwrap();
            f.set_modified(old).unwrap();
        }
        std::fs::write(staged.join("c#2"), b"in progress").unwrap();
        let removed = store
            .remove_stale_uploads(Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(removed, 2);
        let left: Vec<_> = std::fs::read_dir(&staged)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["c#2"]);
    }
}
