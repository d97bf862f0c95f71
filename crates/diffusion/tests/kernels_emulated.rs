//! Our CUDA kernels' own source (`src/kernels/*.cu`), compiled as C++ and run on the CPU by the
//! emulator in `tests/emulator/` (a thread per CUDA thread, barriers for `__syncthreads` and
//! `__syncwarp`, shuffles and WMMA by their documented semantics), against an f64 reference. This
//! checks every index, padding, reduction and tile step of a kernel on a machine without a GPU;
//! the GPU itself is checked by `tests/cuda_kernels.rs` and on first use by `kernels::verified`.

use std::path::Path;
use std::process::Command;

/// Builds `tests/emulator/NAME.cc` with the C++ compiler (`CXX`, else `c++`), runs it, and
/// returns its report: one line per case, each PASS or FAIL.
fn emulate(name: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/emulator");
    let out = tempfile::tempdir().expect("a temporary folder");
    let exe = out.path().join(name);
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let build = Command::new(&cxx)
        .args(["-std=c++20", "-O2", "-pthread", "-I"])
        .arg(&dir)
        .arg("-o")
        .arg(&exe)
        .arg(dir.join(format!("{name}.cc")))
        .output()
        .unwrap_or_else(|e| panic!("the kernel emulator needs a C++20 compiler ({cxx}: {e})"));
    assert!(
        build.status.success(),
        "{cxx} could not build {name}:\n{}",
        String::from_utf8_lossy(&build.stderr)
    );
    let run = Command::new(&exe).output().expect("the emulator ran");
    let report = String::from_utf8_lossy(&run.stdout).into_owned();
    println!("{report}");
    assert!(
        run.status.success() && !report.contains("FAIL"),
        "{name} failed:\n{report}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    report
}

#[test]
fn flash_attention_kernel_matches_exact_attention() {
    let report = emulate("flash_attention_test");
    // Every padded head width the kernel is compiled for, in f16 and bf16.
    for width in [
        "padded 48",
        "padded 64",
        "padded 80",
        "padded 96",
        "padded 128",
        "padded 160",
    ] {
        for dtype in ["F16", "BF16"] {
            assert!(
                report
                    .lines()
                    .any(|l| l.contains(width) && l.contains(dtype) && l.ends_with("PASS")),
                "no passing {width} {dtype} case:\n{report}"
            );
        }
    }
}

#[test]
fn group_norm_kernel_matches_exact_group_norm() {
    let report = emulate("group_norm_test");
    let passed = report.lines().filter(|l| l.ends_with("PASS")).count();
    assert_eq!(passed, 36, "{report}");
    // The partial statistics of one group merged from several blocks.
    assert!(report.contains("chunks 10"), "{report}");
}
