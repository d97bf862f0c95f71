//! With the `cuda` feature, compiles our own kernels (`src/kernels/*.cu`) to PTX with nvcc; the
//! driver compiles the PTX for the GPU it runs on. Without the feature this does nothing.

use std::path::PathBuf;
use std::process::Command;

/// Each `src/kernels/NAME.cu` becomes `$OUT_DIR/NAME.ptx`.
const KERNELS: &[&str] = &["group_norm", "flash_attention"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/kernels");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    // PTX for the oldest architecture we support runs on every newer one; CUDA_COMPUTE_CAP
    // (as candle's kernels read it) may raise it.
    let cap: String = std::env::var("CUDA_COMPUTE_CAP")
        .unwrap_or_else(|_| "80".into())
        .chars()
        .filter(char::is_ascii_digit)
        .collect();
    let cap = if cap.is_empty() { "80".into() } else { cap };
    for name in KERNELS {
        let src = format!("src/kernels/{name}.cu");
        let ptx = out.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                "-std=c++17",
                &format!("-arch=compute_{cap}"),
            ])
            .arg("-o")
            .arg(&ptx)
            .arg(&src)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("nvcc failed on {src} ({s}); see the messages above"),
            Err(e) => panic!(
                "the cuda feature needs nvcc ({nvcc}: {e}); scripts/build-cuda installs CUDA's \
                 nvcc from PyPI into .tools/cuda and sets NVCC"
            ),
        }
    }
}
