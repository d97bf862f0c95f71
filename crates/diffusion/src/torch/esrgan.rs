//! ESRGAN-family upscalers (RRDBNet: ESRGAN, Real-ESRGAN x4plus/x2plus and the community's
//! 4x-* models) on libtorch, loaded from `.pth` or `.safetensors` in either key layout — the
//! original ESRGAN's (`model.0`, `model.1.sub.N.RDBk.convj.0`, …) or BasicSR's (`conv_first`,
//! `body.N.rdbk.convj`, …; Real-ESRGAN's files wrap it in `params_ema`). The layer counts, width,
//! growth channels and scale are read from the tensors: a first convolution taking 12 or 48
//! channels means the input is pixel-unshuffled by 2 or 4 (Real-ESRGAN's x2 and x1 models).
//!
//! Images go in and out as A1111 feeds such models: channels in BGR order, in [0, 1], the output
//! clamped and truncated to bytes.

use std::collections::HashMap;
use std::path::Path;

use image::RgbImage;
use tch::{Device, Kind, Tensor};

use super::weights::from_candle;
use super::{msg, Result};

/// A 3×3, stride-1, padding-1 convolution.
struct Conv {
    w: Tensor,
    b: Tensor,
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Tensor {
        x.conv2d(&self.w, Some(&self.b), [1, 1], [1, 1], [1, 1], 1)
    }
}

fn lrelu(x: &Tensor) -> Tensor {
    x.maximum(&(x * 0.2))
}

/// An RRDBNet.
pub struct Esrgan {
    conv_first: Conv,
    /// Per RRDB, three dense blocks of five convolutions.
    body: Vec<[[Conv; 5]; 3]>,
    conv_body: Conv,
    ups: Vec<Conv>,
    conv_hr: Conv,
    conv_last: Conv,
    unshuffle: i64,
    /// Output size ÷ input size.
    pub scale: u32,
    device: Device,
}

// SAFETY: `tch::Tensor` is `Send` but not `Sync` because some of its methods change a tensor
// through a shared reference (in-place ops, gradients). An `Esrgan`'s tensors are private, never
// require gradients, and its methods only read them to allocate new tensors (libtorch's ops are
// safe to call concurrently on shared inputs); nothing changes them after loading.
unsafe impl Sync for Esrgan {}

impl Esrgan {
    /// Load a `.pth` (a state dict, or one under `params_ema`/`params`) or `.safetensors` file.
    pub fn load(path: &Path, device: Device) -> Result<Self> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let what = path.display();
        let tensors: Vec<(String, candle_core::Tensor)> = match ext.as_str() {
            "safetensors" => candle_core::safetensors::load(path, &candle_core::Device::Cpu)
                .map_err(|e| msg(format!("{what}: {e}")))?
                .into_iter()
                .collect(),
            "pth" | "pt" => ["params_ema", "params"]
                .iter()
                .map(|k| candle_core::pickle::read_all_with_key(path, Some(k)))
                .chain(std::iter::once(candle_core::pickle::read_all(path)))
                .find_map(|r| r.ok().filter(|t| !t.is_empty()))
                .ok_or_else(|| msg(format!("{what}: no tensors in this PyTorch file")))?,
            _ => {
                return Err(msg(format!(
                    "{what}: upscaler models are .pth or .safetensors"
                )))
            }
        };
        let map = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, from_candle(&t.to_dtype(candle_core::DType::F32)?)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Self::from_tensors(normalize(map)?, device).map_err(|e| msg(format!("{what}: {e}")))
    }

    /// An RRDBNet from tensors named as BasicSR names them.
    pub fn from_tensors(mut t: HashMap<String, Tensor>, device: Device) -> Result<Self> {
        let blocks = (0..)
            .take_while(|i| t.contains_key(&format!("body.{i}.rdb1.conv1.weight")))
            .count();
        let n_ups = (1..)
            .take_while(|i| t.contains_key(&format!("conv_up{i}.weight")))
            .count();
        let mut conv = |name: &str| take_conv(&mut t, name, device);
        let conv_first = conv("conv_first")?;
        let unshuffle = match conv_first.w.size()[1] {
            3 => 1,
            12 => 2,
            48 => 4,
            c => {
                return Err(msg(format!(
                    "a first convolution over {c} channels (expected 3, 12 or 48)"
                )))
            }
        };
        let mut body = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let mut rdb = |k: usize| -> Result<[Conv; 5]> {
                let c = (1..=5)
                    .map(|j| conv(&format!("body.{i}.rdb{k}.conv{j}")))
                    .collect::<Result<Vec<_>>>()?;
                c.try_into()
                    .map_err(|_| msg("five convolutions per dense block"))
            };
            body.push([rdb(1)?, rdb(2)?, rdb(3)?]);
        }
        let conv_body = conv("conv_body")?;
        let ups = (1..=n_ups)
            .map(|i| conv(&format!("conv_up{i}")))
            .collect::<Result<Vec<_>>>()?;
        let conv_hr = conv("conv_hr")?;
        let conv_last = conv("conv_last")?;
        let up = 1u32 << ups.len();
        if up < unshuffle as u32 || conv_last.w.size()[0] != 3 {
            return Err(msg(
                "not an RGB upscaler (its last convolution or scale does not fit)",
            ));
        }
        Ok(Self {
            conv_first,
            body,
            conv_body,
            ups,
            conv_hr,
            conv_last,
            unshuffle,
            scale: up / unshuffle as u32,
            device,
        })
    }

    /// [1, 3, H, W] in [0, 1] → [1, 3, H·scale, W·scale] (not clamped).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let x = match self.unshuffle {
            1 => x.shallow_clone(),
            s => x.pixel_unshuffle(s),
        };
        let feat = self.conv_first.forward(&x);
        let mut h = feat.shallow_clone();
        for rrdb in &self.body {
            let input = h.shallow_clone();
            for rdb in rrdb {
                h = dense(rdb, &h);
            }
            h = h * 0.2 + input;
        }
        let mut feat = feat + self.conv_body.forward(&h);
        for up in &self.ups {
            let (fh, fw) = (feat.size()[2], feat.size()[3]);
            feat = lrelu(&up.forward(&feat.upsample_nearest2d([fh * 2, fw * 2], None, None)));
        }
        self.conv_last.forward(&lrelu(&self.conv_hr.forward(&feat)))
    }

    /// One image through the model whole (A1111's `upscale_without_tiling`).
    pub fn upscale_whole(&self, img: &RgbImage) -> Result<RgbImage> {
        let (w, h) = img.dimensions();
        let u = self.unshuffle as u32;
        if w % u != 0 || h % u != 0 {
            return Err(msg(format!(
                "this model takes sides that are multiples of {u}, not {w}x{h}"
            )));
        }
        let bgr: Vec<u8> = img.pixels().flat_map(|p| [p[2], p[1], p[0]]).collect();
        let x = Tensor::from_slice(&bgr)
            .view([h as i64, w as i64, 3])
            .permute([2, 0, 1])
            .unsqueeze(0)
            .to_kind(Kind::Float)
            .to_device(self.device)
            / 255.0;
        let y = tch::no_grad(|| self.forward(&x));
        let y = (y.squeeze_dim(0).clamp(0.0, 1.0) * 255.0)
            .to_kind(Kind::Uint8)
            .permute([1, 2, 0])
            .contiguous()
            .to_device(Device::Cpu);
        let (oh, ow) = (y.size()[0] as u32, y.size()[1] as u32);
        let n = (oh * ow * 3) as usize;
        let mut bytes = vec![0u8; n];
        y.f_copy_data(&mut bytes, n)?;
        for p in bytes.chunks_exact_mut(3) {
            p.swap(0, 2);
        }
        RgbImage::from_raw(ow, oh, bytes).ok_or_else(|| msg("the model's output has no pixels"))
    }
}

/// The 3×3 convolution `name` (its weight and bias), moved to `device`.
fn take_conv(t: &mut HashMap<String, Tensor>, name: &str, device: Device) -> Result<Conv> {
    let mut take = |leaf: &str| {
        t.remove(&format!("{name}.{leaf}"))
            .ok_or_else(|| msg(format!("not an ESRGAN model: no {name}.{leaf}")))
    };
    let (w, b) = (take("weight")?, take("bias")?);
    match w.size().as_slice() {
        [o, _, 3, 3] if b.size() == [*o] => Ok(Conv {
            w: w.to_device(device),
            b: b.to_device(device),
        }),
        s => Err(msg(format!(
            "{name}.weight is {s:?}, not a 3×3 convolution"
        ))),
    }
}

/// A residual dense block: each convolution sees the input and every earlier output.
fn dense(c: &[Conv; 5], x: &Tensor) -> Tensor {
    let mut feats = vec![x.shallow_clone()];
    for conv in &c[..4] {
        let y = lrelu(&conv.forward(&Tensor::cat(&feats, 1)));
        feats.push(y);
    }
    c[4].forward(&Tensor::cat(&feats, 1)) * 0.2 + x
}

/// Tensors in BasicSR's names, whichever layout the file uses. The original ESRGAN's
/// `model.N` indices: 0 the first convolution, 1 the trunk (`sub.i` blocks, then the trunk's
/// convolution), then the upsampling convolutions, the HR convolution and the last, in order.
fn normalize(t: HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    if t.contains_key("conv_first.weight") {
        return Ok(t);
    }
    if !t.contains_key("model.0.weight") {
        return Err(msg(
            "not an ESRGAN model (neither conv_first.weight nor model.0.weight)",
        ));
    }
    let blocks = (0..)
        .take_while(|i| t.contains_key(&format!("model.1.sub.{i}.RDB1.conv1.0.weight")))
        .count();
    let mut tail: Vec<usize> = t
        .keys()
        .filter_map(|k| {
            k.strip_prefix("model.")?
                .strip_suffix(".weight")?
                .parse()
                .ok()
        })
        .filter(|&n| n > 1)
        .collect();
    tail.sort_unstable();
    if tail.len() < 2 {
        return Err(msg("an ESRGAN model without its HR and last convolutions"));
    }
    let mut names: HashMap<String, String> = HashMap::new();
    names.insert("model.0".into(), "conv_first".into());
    names.insert(format!("model.1.sub.{blocks}"), "conv_body".into());
    let n = tail.len();
    for (i, idx) in tail.iter().enumerate() {
        let name = match n - i {
            1 => "conv_last".to_string(),
            2 => "conv_hr".to_string(),
            _ => format!("conv_up{}", i + 1),
        };
        names.insert(format!("model.{idx}"), name);
    }
    let mut out = HashMap::new();
    for (k, v) in t {
        let (stem, leaf) = k
            .rsplit_once('.')
            .ok_or_else(|| msg(format!("unexpected key {k}")))?;
        let new = match names.get(stem) {
            Some(n) => n.clone(),
            None => rrdb_name(stem).ok_or_else(|| msg(format!("unexpected key {k}")))?,
        };
        out.insert(format!("{new}.{leaf}"), v);
    }
    Ok(out)
}

/// `model.1.sub.I.RDBK.convJ.0` → `body.I.rdbK.convJ`.
fn rrdb_name(stem: &str) -> Option<String> {
    let rest = stem.strip_prefix("model.1.sub.")?;
    let mut parts = rest.split('.');
    let i: usize = parts.next()?.parse().ok()?;
    let k: usize = parts.next()?.strip_prefix("RDB")?.parse().ok()?;
    let j: usize = parts.next()?.strip_prefix("conv")?.parse().ok()?;
    (parts.next()? == "0" && parts.next().is_none()).then(|| format!("body.{i}.rdb{k}.conv{j}"))
}
