//! The Python client (`clients/python`) as its users get it: installed with pip from the
//! repository, then run against `atelier up` by `tests/python/client_check.py` (uploads, jobs
//! submitted with idempotency keys, followed over SSE, listed, cancelled; errors; async too).

use std::process::Command;

use atelier_e2e::*;
use atelier_kit::nats_server::free_port;

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let name = entry.file_name();
        let skip = name == "build" || name == "__pycache__";
        if skip || name.to_string_lossy().ends_with(".egg-info") {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if src.is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_works_against_atelier_up() {
    let tmp = tempfile::tempdir().unwrap();
    let site = tmp.path().join("site");
    // A copy: building writes build/ and *.egg-info beside the sources.
    let source = tmp.path().join("client");
    copy_dir(&repo_root().join("clients/python"), &source);
    let out = Command::new(tool("python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
        ])
        .arg(&site)
        .arg(&source)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pip install ./clients/python failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let (port, nats_port) = (free_port().unwrap(), free_port().unwrap());
    let data = tmp.path().join("data");
    let mut up = atelier_up(&data, port, nats_port, &tmp.path().join("up.log"))
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    wait_healthy(&base).await;
    let out = tokio::process::Command::new(tool("python"))
        .arg(repo_root().join("tests/python/client_check.py"))
        .arg(&base)
        .env("PYTHONPATH", &site)
        .env_remove("ATELIER_API_KEY")
        .output()
        .await
        .unwrap();
    unsafe { libc::kill(up.id() as i32, libc::SIGTERM) };
    let _ = up.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client_check.py failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("sync and async checks passed"), "{stdout}");
}
