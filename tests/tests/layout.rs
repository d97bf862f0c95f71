//! The dependency rules of the layout (ARCHITECTURE.md, "Invariants"), read from `cargo metadata`:
//! the gateway never reaches the ML engine or a service; no service depends on another service;
//! libraries under `crates/` depend on no service.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use atelier_e2e::repo_root;
use serde_json::Value;

/// The workspace's packages and the resolved graph of normal and build dependencies.
struct Graph {
    /// Package id → (name, manifest folder relative to the repository root; None outside it).
    packages: BTreeMap<String, (String, Option<PathBuf>)>,
    /// Package id → ids it depends on (dev-dependencies left out: they never ship).
    edges: BTreeMap<String, Vec<String>>,
}

fn graph() -> Graph {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(repo_root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: Value = serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let root = repo_root();
    let packages = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| {
            let manifest = Path::new(p["manifest_path"].as_str().expect("manifest_path"));
            let folder = manifest
                .parent()
                .and_then(|d| d.strip_prefix(&root).ok())
                .map(Path::to_path_buf);
            let name = p["name"].as_str().expect("name").to_string();
            (p["id"].as_str().expect("id").to_string(), (name, folder))
        })
        .collect();
    let edges = meta["resolve"]["nodes"]
        .as_array()
        .expect("resolve.nodes")
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .expect("deps")
                .iter()
                .filter(|d| {
                    d["dep_kinds"]
                        .as_array()
                        .expect("dep_kinds")
                        .iter()
                        .any(|k| k["kind"].as_str() != Some("dev"))
                })
                .map(|d| d["pkg"].as_str().expect("pkg").to_string())
                .collect();
            (n["id"].as_str().expect("id").to_string(), deps)
        })
        .collect();
    Graph { packages, edges }
}

impl Graph {
    fn id(&self, name: &str) -> &str {
        self.packages
            .iter()
            .find(|(_, (n, f))| n == name && f.is_some())
            .map(|(id, _)| id.as_str())
            .unwrap_or_else(|| panic!("no workspace package {name}"))
    }

    fn name(&self, id: &str) -> &str {
        &self.packages[id].0
    }

    fn folder(&self, id: &str) -> Option<&Path> {
        self.packages[id].1.as_deref()
    }

    /// Every package `name` reaches, with the path that reaches it.
    fn closure(&self, name: &str) -> BTreeMap<String, Vec<String>> {
        let start = self.id(name).to_string();
        let mut seen = BTreeMap::from([(start.clone(), vec![name.to_string()])]);
        let mut todo = vec![start];
        while let Some(id) = todo.pop() {
            let path = seen[&id].clone();
            for dep in self.edges.get(&id).into_iter().flatten() {
                if !seen.contains_key(dep) {
                    let mut p = path.clone();
                    p.push(self.name(dep).to_string());
                    seen.insert(dep.clone(), p);
                    todo.push(dep.clone());
                }
            }
        }
        seen
    }

    /// Workspace packages whose folder is directly under `dir` (e.g. `services`).
    fn members_under(&self, dir: &str) -> Vec<String> {
        self.packages
            .iter()
            .filter(|(_, (_, f))| f.as_deref().and_then(Path::parent) == Some(Path::new(dir)))
            .map(|(_, (n, _))| n.clone())
            .collect()
    }

    fn is_service(&self, id: &str) -> bool {
        self.folder(id)
            .is_some_and(|f| f.starts_with("services") && !f.ends_with("kit"))
    }
}

#[test]
fn the_gateway_reaches_no_ml_engine_and_no_service() {
    let g = graph();
    let engine: BTreeSet<&str> = [
        "atelier-diffusion",
        "atelier-embed",
        "atelier-generation",
        "atelier-ann",
        "atelier-caption-eval",
        "atelier-openai",
    ]
    .into();
    let mut bad = Vec::new();
    for (id, path) in g.closure("atelier-gateway") {
        let name = g.name(&id);
        if name.starts_with("candle")
            || name == "tch"
            || name == "torch-sys"
            || name == "ort"
            || name.starts_with("ort-")
            || engine.contains(name)
            || g.is_service(&id)
        {
            bad.push(path.join(" -> "));
        }
    }
    assert!(
        bad.is_empty(),
        "the gateway must stay an HTTP server without the ML engine or a service: {bad:#?}"
    );
}

#[test]
fn no_service_depends_on_another_service_and_no_library_on_a_service() {
    let g = graph();
    let services = g.members_under("services");
    let libraries = g.members_under("crates");
    assert!(services.len() >= 10, "services/ holds {services:?}");
    assert!(libraries.len() >= 4, "crates/ holds {libraries:?}");
    let mut bad = Vec::new();
    for name in services.iter().chain(&libraries) {
        for (id, path) in g.closure(name) {
            if g.name(&id) != name && g.is_service(&id) {
                bad.push(path.join(" -> "));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "shared code belongs in a library under crates/, not in a service: {bad:#?}"
    );
}

#[test]
fn services_reach_the_bus_only_through_the_kit() {
    let g = graph();
    let mut bad = Vec::new();
    for name in g
        .members_under("services")
        .iter()
        .chain(&g.members_under("crates"))
    {
        if name == "atelier-kit" {
            continue;
        }
        for dep in g.edges.get(g.id(name)).into_iter().flatten() {
            if g.name(dep) == "async-nats" {
                bad.push(name.clone());
            }
        }
    }
    assert!(
        bad.is_empty(),
        "these reach NATS directly; use JobCtx's typed buckets and queries (atelier_contracts::typed): {bad:?}"
    );
}

#[test]
fn the_data_services_do_not_link_the_diffusion_engine() {
    let g = graph();
    let mut bad = Vec::new();
    for name in [
        "atelier-embed",
        "atelier-captioner",
        "atelier-quality-filter",
        "atelier-retrieval-indexer",
        "atelier-augmenter",
    ] {
        if let Some(path) = g
            .closure(name)
            .into_iter()
            .find_map(|(id, path)| (g.name(&id) == "atelier-diffusion").then_some(path))
        {
            bad.push(path.join(" -> "));
        }
    }
    assert!(
        bad.is_empty(),
        "what the CLIP/MiniLM side shares with the engine belongs in atelier-modelkit: {bad:#?}"
    );
}
