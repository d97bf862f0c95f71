//! The transformer families against diffusers: every check of the `flux-dev`, `sd35` and
//! `flux-lora-peft` cases (components, transformers, VAEs, whole pipelines from given latents,
//! a peft LoRA) within each case's tolerance.

use std::path::PathBuf;

#[test]
fn flux_sd35_and_the_flux_lora_match_diffusers() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance/models");
    let mut failed = Vec::new();
    let mut ran = 0;
    for case in ["flux-dev", "sd35", "flux-lora-peft"] {
        let lines =
            atelier_diffusion::conformance::models::replay_case(&root.join(case)).expect("case");
        for l in lines {
            println!("{l}");
            ran += 1;
            if !l.passed {
                failed.push(l.to_string());
            }
        }
    }
    assert!(ran >= 22, "only {ran} checks ran");
    assert!(failed.is_empty(), "failed: {failed:#?}");
}
