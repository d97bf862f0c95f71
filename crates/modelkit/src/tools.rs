//! Where the models `scripts/bootstrap` installs live: the project's `.tools/` folder (a Python
//! venv holding PyPI packages' model files). Found from configuration — `ATELIER_TOOLS_DIR` — or
//! from the running executable's place (`target/<profile>/…` sits below the project), never from
//! the working directory: a service behaves the same whichever folder it is started in.

use std::path::PathBuf;

/// The `.tools/` folder: `ATELIER_TOOLS_DIR`, else one beside an ancestor of the executable.
pub fn tools_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ATELIER_TOOLS_DIR") {
        return Some(PathBuf::from(p)).filter(|p| p.is_dir());
    }
    let exe = std::env::current_exe().ok()?;
    exe.ancestors()
        .skip(1)
        .take(5)
        .map(|a| a.join(".tools"))
        .find(|p| p.is_dir())
}

/// `rel` inside the `.tools/` venv's `site-packages` (e.g. `nudenet/320n.onnx`), when present.
pub fn site_package(rel: &str) -> Option<PathBuf> {
    let lib = tools_dir()?.join("lib");
    std::fs::read_dir(lib)
        .ok()?
        .flatten()
        .map(|e| e.path().join("site-packages").join(rel))
        .find(|p| p.exists())
}
