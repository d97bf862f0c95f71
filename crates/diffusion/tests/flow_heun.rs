//! Heun (flow matching) against diffusers' `FlowMatchHeunDiscreteScheduler` in its SD 3 pipeline:
//! whole txt2img runs of the conformance case's tiny `sd35` model from given latents, recorded by
//! `tests/data/flow_heun_reference.py` (diffusers 0.42.1), within the model cases' tolerance; Euler
//! on the same inputs lands elsewhere, so the check tells the two apart.

use std::path::PathBuf;

use atelier_diffusion::flow::{FlowModel, FlowRequest, FlowSampler};
use atelier_diffusion::pipeline::Placement;
use atelier_diffusion::torch::weights::{from_candle, to_candle};
use candle_core::Device;

fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    atelier_diffusion::conformance::models::diff(a, b).unwrap()
}

#[test]
fn heun_matches_diffusers_flow_match_heun() {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let file = here.join("tests/data/flow_heun_reference.safetensors");
    let t = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let meta = atelier_diffusion::models::load::read_metadata(&file).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&meta["cases"]).unwrap();
    let m = FlowModel::load(
        &here.join("../../tests/conformance/models/sd35/model"),
        Placement::CPU,
    )
    .unwrap();
    assert_eq!(cases.len(), 2);
    for (i, c) in cases.iter().enumerate() {
        let n = |k: &str| c[k].as_f64().unwrap();
        let mut req = FlowRequest {
            prompt: c["prompt"].as_str().unwrap().into(),
            negative_prompt: c["negative_prompt"].as_str().unwrap().into(),
            steps: n("steps") as usize,
            cfg_scale: n("cfg"),
            guidance: 0.0,
            width: n("width") as usize,
            height: n("height") as usize,
            seed: 0,
            batch_size: 1,
            max_sequence_length: 32,
            shift: None,
            noise: Default::default(),
            sampler: FlowSampler::Heun,
        };
        let latents = from_candle(&t[&format!("{i}.latents")]).unwrap();
        let want = t[&format!("{i}.image")].unsqueeze(0).unwrap();
        let got = to_candle(&m.txt2img_pixels(&req, Some(&latents), |_, _| true).unwrap()).unwrap();
        let d = max_diff(&got, &want);
        println!("case {i}: Heun max |diff| {d:.3e}");
        assert!(d < 3e-4, "case {i}: Heun max |diff| {d}");
        req.sampler = FlowSampler::Euler;
        let euler =
            to_candle(&m.txt2img_pixels(&req, Some(&latents), |_, _| true).unwrap()).unwrap();
        assert!(
            max_diff(&euler, &want) > 1e-2,
            "case {i}: Euler would pass too"
        );
    }
}
