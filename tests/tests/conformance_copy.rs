//! The repository's copy of the reference data (`tests/conformance/`) equals the shared folder
//! beside the checkout (`../shared/conformance`) wherever that folder exists: a developer who
//! pulls new reference data runs `scripts/sync-conformance` before the suite passes again. In a
//! user's clone there is no shared folder and only the copy is read.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use atelier_e2e::{conformance_dir, repo_root};

/// Every file under `root`, by its path relative to `root`, with its bytes' SHA-256.
fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    use sha2::{Digest, Sha256};
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(|e| e.expect("readable entry"))
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            let rel = e
                .path()
                .strip_prefix(root)
                .expect("under root")
                .to_path_buf();
            let bytes = std::fs::read(e.path()).expect("readable file");
            (rel, hex::encode(Sha256::digest(&bytes)))
        })
        .collect()
}

#[test]
fn copy_has_every_reference_family() {
    let copy = tree(&conformance_dir());
    for family in [
        "captions",
        "checkpoints",
        "models",
        "noise",
        "prompts",
        "schedulers",
    ] {
        assert!(
            copy.keys().any(|p| p.starts_with(family)),
            "tests/conformance/{family} is missing: run scripts/sync-conformance"
        );
    }
}

#[test]
fn copy_equals_shared_when_present() {
    let shared = repo_root().join("../shared/conformance");
    if !shared.is_dir() {
        eprintln!(
            "no {} beside the checkout: only the copy is used",
            shared.display()
        );
        return;
    }
    let (want, have) = (tree(&shared), tree(&conformance_dir()));
    let differ: Vec<String> = want
        .keys()
        .chain(have.keys())
        .filter(|p| want.get(*p) != have.get(*p))
        .map(|p| p.display().to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(
        differ.is_empty(),
        "tests/conformance differs from ../shared/conformance in {} file(s) ({}): run scripts/sync-conformance",
        differ.len(),
        differ.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
    );
}
