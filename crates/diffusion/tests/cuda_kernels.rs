//! Our CUDA kernels against their reference ops, on GPU 0. Built only with `--features cuda`
//! (scripts/build-cuda); it fails where no GPU answers, since that is what it is asked to test.
#![cfg(feature = "cuda")]

use atelier_diffusion::kernels;

#[test]
fn every_kernel_matches_its_reference_ops() {
    let device = kernels::cuda_device(0).expect("a CUDA device (GPU 0) for the kernel tests");
    let checks = kernels::self_check(&device).expect("kernel checks ran");
    assert!(!checks.is_empty(), "no kernel was checked");
    let failed: Vec<_> = checks.iter().filter(|c| !c.pass).collect();
    assert!(failed.is_empty(), "outside tolerance: {failed:#?}");
}
