//! The server's own paths out of what users read. A job's error is written to its record and its
//! `failed` event, which any caller with the job id reads: a file is named there by the root it
//! lives under (`<models>/sd15/unet/…`, `<tmp>/atelier-loras/…`), never by its absolute path.
//! Logs keep the whole message.
//!
//! Roots: the temporary folder and the home folder always, and any a service registers
//! ([`register_root`]: the model registry, the data directory).

use std::path::Path;
use std::sync::{LazyLock, RwLock};

static ROOTS: LazyLock<RwLock<Vec<(String, String)>>> = LazyLock::new(|| {
    let mut roots = Vec::new();
    add(&mut roots, &std::env::temp_dir(), "<tmp>");
    if let Some(home) = std::env::var_os("HOME").filter(|h| h.len() > 1) {
        add(&mut roots, Path::new(&home), "~");
    }
    RwLock::new(roots)
});

fn add(roots: &mut Vec<(String, String)>, path: &Path, label: &str) {
    let mut forms = vec![path.to_path_buf()];
    if let Ok(c) = path.canonicalize() {
        forms.push(c);
    }
    for p in forms {
        let s = p.to_string_lossy().trim_end_matches('/').to_owned();
        if s.len() > 1 && !roots.iter().any(|(r, _)| *r == s) {
            roots.push((s, label.to_owned()));
        }
    }
    // Longest first: a models folder under the home folder is named as the models folder.
    roots.sort_by_key(|(r, _)| std::cmp::Reverse(r.len()));
}

/// Name files under `path` as `label/…` in job errors from now on.
pub fn register_root(path: &Path, label: &str) {
    let mut roots = ROOTS.write().unwrap_or_else(|p| p.into_inner());
    add(&mut roots, path, label);
}

/// `message` with every registered root replaced by its label.
pub fn paths(message: &str) -> String {
    let roots = ROOTS.read().unwrap_or_else(|p| p.into_inner());
    let mut out = message.to_owned();
    for (root, label) in roots.iter() {
        if out.contains(root.as_str()) {
            out = out.replace(root.as_str(), label);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roots_are_named_by_their_labels() {
        let tmp = std::env::temp_dir().join("atelier-loras/abc.safetensors");
        let msg = format!("{}: No such file or directory", tmp.display());
        assert_eq!(
            paths(&msg),
            "<tmp>/atelier-loras/abc.safetensors: No such file or directory"
        );

        let models = tempfile::tempdir().unwrap();
        let inner = models.path().join("registry");
        std::fs::create_dir_all(&inner).unwrap();
        register_root(&inner, "<models>");
        let msg = format!(
            "unknown model \"x\"; the registry at {} has: a",
            inner.display()
        );
        // The longer, registered root wins over the temporary folder it lives in.
        assert_eq!(
            paths(&msg),
            "unknown model \"x\"; the registry at <models> has: a"
        );
        assert_eq!(paths("no paths here: /v1/jobs"), "no paths here: /v1/jobs");
    }
}
