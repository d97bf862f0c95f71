//! The ESRGAN loader against PyTorch: random RRDBNets saved by `torch.save` in Real-ESRGAN's
//! layout (BasicSR names under `params_ema`), the original ESRGAN's (`model.N`) and Real-ESRGAN's
//! pixel-unshuffled x2 form give the bytes a reference forward pass in PyTorch gives (fed as
//! AUTOMATIC1111 feeds them: BGR, clamped, truncated), at the scale the tensors imply.

use std::path::Path;

use atelier_diffusion::torch::esrgan::Esrgan;
use atelier_diffusion::torch::Device;

const W: u32 = 20;
const H: u32 = 12;

fn pattern() -> image::RgbImage {
    image::RgbImage::from_fn(W, H, |x, y| {
        image::Rgb([
            ((x * 37 + y * 11) % 256) as u8,
            ((x * 5 + y * 29) % 256) as u8,
            ((x * y * 3) % 256) as u8,
        ])
    })
}

fn reference(dir: &Path) {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.tools/bin/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/esrgan_reference.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(dir)
        .arg(W.to_string())
        .arg(H.to_string())
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/bootstrap --test)", python.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The pattern as A1111 hands it to a model: [1, 3, H, W], BGR, ÷255 in f64 then f32.
fn input() -> atelier_diffusion::torch::Tensor {
    use atelier_diffusion::torch::{Kind, Tensor};
    let bgr: Vec<f64> = pattern()
        .pixels()
        .flat_map(|p| [p[2], p[1], p[0]].map(|v| v as f64 / 255.0))
        .collect();
    Tensor::from_slice(&bgr)
        .view([H as i64, W as i64, 3])
        .permute([2, 0, 1])
        .unsqueeze(0)
        .to_kind(Kind::Float)
}

/// The model's unclamped output against PyTorch's, and how much of it lies inside (0, 1).
fn compare_raw(m: &Esrgan, want: &[u8], what: &str) {
    let want: Vec<f32> = want
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let got = atelier_diffusion::torch::no_grad(|| m.forward(&input()));
    let got: Vec<f32> = Vec::<f32>::try_from(got.flatten(0, -1)).unwrap();
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "{what}: differs from PyTorch by {worst}");
    let inside = want.iter().filter(|v| **v > 0.0 && **v < 1.0).count();
    assert!(
        inside * 10 > want.len() * 9,
        "{what}: the reference is mostly clamped"
    );
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[test]
fn esrgan_files_in_every_layout_match_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    reference(dir.path());
    let img = pattern();
    let want4 = std::fs::read(dir.path().join("x4.rgb")).unwrap();
    for file in ["x4_basicsr.pth", "x4_esrgan.pth"] {
        let m = Esrgan::load(&dir.path().join(file), Device::Cpu).unwrap();
        assert_eq!(m.scale, 4, "{file}");
        compare_raw(&m, &std::fs::read(dir.path().join("x4.f32")).unwrap(), file);
        let out = m.upscale_whole(&img).unwrap();
        assert_eq!(out.dimensions(), (W * 4, H * 4));
        let d = max_diff(out.as_raw(), &want4);
        assert!(d <= 1, "{file}: differs from PyTorch by up to {d}");
    }
    let m = Esrgan::load(&dir.path().join("x2_unshuffle.pth"), Device::Cpu).unwrap();
    assert_eq!(m.scale, 2);
    compare_raw(&m, &std::fs::read(dir.path().join("x2.f32")).unwrap(), "x2");
    let out = m.upscale_whole(&img).unwrap();
    assert_eq!(out.dimensions(), (W * 2, H * 2));
    let d = max_diff(
        out.as_raw(),
        &std::fs::read(dir.path().join("x2.rgb")).unwrap(),
    );
    assert!(d <= 1, "x2: differs from PyTorch by up to {d}");
    // An odd side cannot be unshuffled by 2; the error says so.
    let odd = image::RgbImage::new(5, 4);
    assert!(m
        .upscale_whole(&odd)
        .unwrap_err()
        .to_string()
        .contains("multiples of 2"));
}

#[test]
fn files_that_are_not_esrgan_models_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("other.safetensors");
    let t = candle_core::Tensor::zeros((4, 4), candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("weight", t)]), &path)
        .unwrap();
    let e = Esrgan::load(&path, Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("not an ESRGAN model"), "{e}");
    let e = Esrgan::load(&dir.path().join("x.bin"), Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains(".pth or .safetensors"), "{e}");
}
