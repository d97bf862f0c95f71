//! At full size, every model's parameter names and shapes equal those real diffusers/transformers
//! checkpoints hold (tests/conformance/checkpoints/diffusers-layout-keys.json).
use std::collections::BTreeMap;
use std::path::PathBuf;

use atelier_diffusion::models::config::ClipConfig;
use atelier_diffusion::models::config::{UNetConfig, VaeConfig};
use atelier_diffusion::torch::clip::ClipTextModel;
use atelier_diffusion::torch::unet::UNet;
use atelier_diffusion::torch::vae::Vae;
use atelier_diffusion::torch::weights::Recorder;

fn layout() -> serde_json::Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/conformance/checkpoints/diffusers-layout-keys.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn expected(doc: &serde_json::Value, component: &str) -> BTreeMap<String, Vec<usize>> {
    serde_json::from_value(doc["components"][component].clone()).unwrap()
}

fn compare(component: &str, got: BTreeMap<String, Vec<usize>>, want: BTreeMap<String, Vec<usize>>) {
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(10)
        .collect();
    let extra: Vec<_> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(10)
        .collect();
    let wrong: Vec<_> = want
        .iter()
        .filter_map(|(k, s)| got.get(k).filter(|g| *g != s).map(|g| (k, g, s)))
        .take(10)
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && wrong.is_empty(),
        "{component}: missing {missing:?}\nextra {extra:?}\nwrong shapes (name, ours, theirs) {wrong:?}"
    );
    let params: usize = got.values().map(|s| s.iter().product::<usize>()).sum();
    eprintln!("{component}: {} tensors, {params} parameters", got.len());
}

fn unet(doc: &serde_json::Value, config_key: &str, component: &str, in_channels: Option<usize>) {
    let mut cfg: UNetConfig = serde_json::from_value(doc["configs"][config_key].clone()).unwrap();
    if let Some(c) = in_channels {
        cfg.in_channels = c;
    }
    let rec = Recorder::default();
    UNet::new(&rec.weights(), cfg).unwrap();
    compare(component, rec.shapes(), expected(doc, component));
}

#[test]
fn sd15_unet_and_inpainting_unet() {
    let doc = layout();
    unet(&doc, "sd15/unet", "sd15/unet", None);
    unet(&doc, "sd15/unet", "sd15-inpainting/unet", Some(9));
}

#[test]
fn sd2_unet() {
    unet(&layout(), "sd2/unet", "sd2/unet", None);
}

#[test]
fn sdxl_unet() {
    let doc = layout();
    let rec = Recorder::default();
    let cfg: UNetConfig = serde_json::from_value(doc["configs"]["sdxl/unet"].clone()).unwrap();
    UNet::new(&rec.weights(), cfg).unwrap();
    let shapes = rec.shapes();
    let params: usize = shapes.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(params, 2_567_463_684);
    compare("sdxl/unet", shapes, expected(&doc, "sdxl/unet"));
}

#[test]
fn vae() {
    let doc = layout();
    let cfg: VaeConfig = serde_json::from_value(doc["configs"]["vae"].clone()).unwrap();
    let rec = Recorder::default();
    Vae::new(&rec.weights(), cfg).unwrap();
    let shapes = rec.shapes();
    let params: usize = shapes.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(params, 83_653_863);
    compare("sd15/vae", shapes, expected(&doc, "sd15/vae"));
}

#[test]
fn text_encoders() {
    let doc = layout();
    for (config, component, projection) in [
        ("clip_l", "sd15/text_encoder", false),
        ("openclip_h", "sd2/text_encoder", false),
        ("clip_l", "sdxl/text_encoder", false),
        ("openclip_bigg", "sdxl/text_encoder_2", true),
    ] {
        let cfg: ClipConfig = serde_json::from_value(doc["configs"][config].clone()).unwrap();
        let rec = Recorder::default();
        ClipTextModel::new(&rec.weights(), cfg, projection).unwrap();
        compare(component, rec.shapes(), expected(&doc, component));
    }
}
