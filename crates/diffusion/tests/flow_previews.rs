//! Live previews of the transformer families: the first image's latents decoded every N steps
//! (not at the last step, whose image is the result), the result unchanged by them.

use std::path::PathBuf;

use atelier_diffusion::flow::{FlowModel, FlowRequest};
use atelier_diffusion::pipeline::Placement;

#[test]
fn previews_come_every_n_steps_and_change_nothing() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/conformance/models/flux-dev/model");
    let m = FlowModel::load(&dir, Placement::CPU).unwrap();
    let req = FlowRequest {
        prompt: "a lighthouse".into(),
        negative_prompt: String::new(),
        steps: 5,
        cfg_scale: 1.0,
        guidance: 3.5,
        width: 32,
        height: 32,
        seed: 9,
        batch_size: 2,
        max_sequence_length: 32,
        shift: None,
        noise: Default::default(),
        sampler: Default::default(),
    };
    let plain = m.txt2img(&req, |_, _| true).unwrap();
    let mut seen = Vec::new();
    let mut send = |step: usize, img: image::RgbImage| seen.push((step, img));
    let mut steps = Vec::new();
    let with = m
        .txt2img_with_previews(
            &req,
            |d, t| {
                steps.push((d, t));
                true
            },
            Some((2, &mut send)),
        )
        .unwrap();
    let at: Vec<usize> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        at,
        [2, 4],
        "previews of the first image only, not at its last step"
    );
    assert!(seen.iter().all(|(_, i)| i.dimensions() == (32, 32)));
    assert_ne!(
        seen[0].1.as_raw(),
        with[0].image.as_raw(),
        "a preview is the image so far"
    );
    assert_eq!(steps.len(), 10);
    assert_eq!(steps.last(), Some(&(10, 10)));
    for (a, b) in plain.iter().zip(&with) {
        assert_eq!(a.image.as_raw(), b.image.as_raw());
    }
}
