//! The building blocks every model here is made of, behind our own functions so faster kernels
//! (flash attention, fused group-norm, cuDNN convolutions) can replace them in one place.
//!
//! Weights are plain tensors taken from a [`VarBuilder`]; nothing here creates a `Var`, so a
//! sampling loop keeps no autograd graph. Training (LoRA) passes [`Ops::differentiable`]: every op
//! then records gradients (candle's fused softmax and layer-norm do not).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// Where a forward pass spends its time, by building block: off by default; when on, every block
/// waits for the device before and after it runs (so the figures are exact per block, and the
/// pass as a whole is a little slower than unprofiled). Recording is per thread.
pub mod profile {
    use std::cell::{Cell, RefCell};
    use std::collections::BTreeMap;
    use std::time::Instant;

    use candle_core::{Device, Result};

    // Per thread: a pass is profiled on the thread that runs it, whatever else runs beside it.
    thread_local! {
        static ON: Cell<bool> = const { Cell::new(false) };
        static TABLE: RefCell<BTreeMap<&'static str, (f64, u64)>> =
            const { RefCell::new(BTreeMap::new()) };
    }

    /// Starts (or stops) recording on this thread, clearing what was recorded.
    pub fn enable(on: bool) {
        TABLE.with(|t| t.borrow_mut().clear());
        ON.with(|o| o.set(on));
    }

    /// What this thread recorded since the last call (or [`enable`]): (block, milliseconds,
    /// calls), by block name.
    pub fn take() -> Vec<(&'static str, f64, u64)> {
        TABLE.with(|t| {
            std::mem::take(&mut *t.borrow_mut())
                .into_iter()
                .map(|(k, (ms, n))| (k, ms, n))
                .collect()
        })
    }

    /// Runs `f`, adding its time to `name` when recording.
    #[inline]
    pub fn scope<T>(name: &'static str, dev: &Device, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if !ON.with(|o| o.get()) {
            return f();
        }
        dev.synchronize()?;
        let start = Instant::now();
        let out = f()?;
        dev.synchronize()?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        TABLE.with(|t| {
            let mut t = t.borrow_mut();
            let e = t.entry(name).or_insert((0.0, 0));
            e.0 += ms;
            e.1 += 1;
        });
        Ok(out)
    }
}

/// How the blocks compute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ops {
    /// Use only ops that carry gradients (training); else the fused inference kernels.
    pub differentiable: bool,
    /// Attention scores in f32 whatever the model's dtype (diffusers' `upcast_attention`: SD 2.x
    /// overflows f16 there); else in the model's dtype, accumulated in f32 by the matmul.
    /// Training always computes them in f32.
    pub upcast_attention: bool,
}

impl Ops {
    pub const INFERENCE: Ops = Ops {
        differentiable: false,
        upcast_attention: false,
    };
    pub const TRAINING: Ops = Ops {
        differentiable: true,
        upcast_attention: true,
    };

    /// These ops with attention scores in f32.
    pub const fn upcast(self) -> Ops {
        Ops {
            upcast_attention: true,
            ..self
        }
    }
}

/// y = x·Wᵀ + b, with an optional low-rank adapter (LoRA) added at run time.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// (down [r, in], up [out, r], scale) adapters applied as x·downᵀ·upᵀ·scale.
    pub adapters: Vec<(Tensor, Tensor, f64)>,
}

impl Linear {
    pub fn new(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            adapters: Vec::new(),
        })
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        profile::scope("linear", x.device(), || self.forward_inner(x))
    }
}

impl Linear {
    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_dim))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        for (down, up, scale) in &self.adapters {
            let d = x2.to_dtype(down.dtype())?.matmul(&down.t()?)?;
            let u = d.matmul(&up.t()?)?.affine(*scale, 0.0)?;
            let u = u.to_dtype(y.dtype())?;
            y = (y + u)?;
        }
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.weight.dim(0)?;
        y.reshape(out)
    }
}

/// 2-D convolution (square kernel), NCHW.
#[derive(Debug, Clone)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    /// (down [r, in, k, k], up [out, r, 1, 1], scale) adapters (LoCon / conv LoRA).
    pub adapters: Vec<(Tensor, Tensor, f64)>,
}

impl Conv2d {
    pub fn new(
        vb: &VarBuilder,
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            weight: vb.get((out_ch, in_ch, kernel, kernel), "weight")?,
            bias: Some(vb.get(out_ch, "bias")?),
            stride,
            padding,
            adapters: Vec::new(),
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        conv2d(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
        )
        .and_then(|y| {
            let mut y = y;
            for (down, up, scale) in &self.adapters {
                let d = conv2d(
                    &x.to_dtype(down.dtype())?,
                    down,
                    None,
                    self.stride,
                    self.padding,
                )?;
                let u = conv2d(&d, up, None, 1, 0)?.affine(*scale, 0.0)?;
                y = (y + u.to_dtype(x.dtype())?)?;
            }
            Ok(y)
        })
    }
}

/// Convolution: the one place a faster kernel (cuDNN with cached algorithms, implicit GEMM) goes.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    profile::scope("conv2d", x.device(), || {
        let y = match crate::kernels::conv2d(x, weight, stride, padding)? {
            Some(y) => y,
            None => x.conv2d(weight, padding, stride, 1, 1)?,
        };
        match bias {
            Some(b) => y.broadcast_add(&b.reshape((1, b.dim(0)?, 1, 1))?),
            None => Ok(y),
        }
    })
}

/// Group normalisation over NCHW (statistics in f32), optionally followed by SiLU.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(vb: &VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(x, self.groups, &self.weight, &self.bias, self.eps, false)
    }

    /// norm, then SiLU (fusable).
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(x, self.groups, &self.weight, &self.bias, self.eps, true)
    }
}

/// Group norm (+ SiLU): the one place a fused kernel goes.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    profile::scope("group_norm", x.device(), || {
        if let Some(y) = crate::kernels::group_norm(x, groups, weight, bias, eps, silu)? {
            return Ok(y);
        }
        group_norm_ops(x, groups, weight, bias, eps, silu)
    })
}

/// The reference: candle's ops, gradients recorded.
pub(crate) fn group_norm_ops(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let xf = x.to_dtype(DType::F32)?.reshape((b, groups, ()))?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let centered = xf.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    let mut shape = vec![1, c];
    shape.extend(std::iter::repeat_n(1, dims.len() - 2));
    let y = normed
        .reshape(dims)?
        .broadcast_mul(&weight.to_dtype(DType::F32)?.reshape(shape.clone())?)?
        .broadcast_add(&bias.to_dtype(DType::F32)?.reshape(shape)?)?;
    let y = if silu { y.silu()? } else { y };
    y.to_dtype(dtype)
}

/// Layer normalisation over the last dimension.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
    pub ops: Ops,
}

impl LayerNorm {
    pub fn new(vb: &VarBuilder, dim: usize, eps: f64, ops: Ops) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
            ops,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        profile::scope("layer_norm", x.device(), || self.forward_inner(x))
    }
}

impl LayerNorm {
    fn forward_inner(&self, x: &Tensor) -> Result<Tensor> {
        if !self.ops.differentiable && x.is_contiguous() {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let centered = xf.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        centered
            .broadcast_div(&(var + self.eps)?.sqrt()?)?
            .broadcast_mul(&self.weight.to_dtype(DType::F32)?)?
            .broadcast_add(&self.bias.to_dtype(DType::F32)?)?
            .to_dtype(dtype)
    }
}

/// Softmax over the last dimension (fused for inference, plain ops for training).
pub fn softmax_last(x: &Tensor, ops: Ops) -> Result<Tensor> {
    if ops.differentiable {
        let max = x.max_keepdim(D::Minus1)?;
        let e = x.broadcast_sub(&max)?.exp()?;
        e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Scaled dot-product attention over heads: q [B, N, H·d], k/v [B, M, H·d] → [B, N, H·d], with an
/// optional additive mask broadcast to [B, H, N, M]. The one place flash attention goes.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    ops: Ops,
) -> Result<Tensor> {
    attention_sliced(q, k, v, heads, mask, ops, 256 * 1024 * 1024 / 4)
}

/// [`attention`] with the f32 score matrix limited to `budget` elements per slice of queries.
pub fn attention_sliced(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    ops: Ops,
    budget: usize,
) -> Result<Tensor> {
    profile::scope("attention", q.device(), || {
        if let Some(out) = crate::kernels::attention(q, k, v, heads, mask, ops.differentiable)? {
            return Ok(out);
        }
        attention_inner(q, k, v, heads, mask, ops, budget)
    })
}

/// The reference the flash kernel is checked against: the plain ops with f32 scores.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> Result<Tensor> {
    attention_inner(q, k, v, heads, None, Ops::INFERENCE.upcast(), usize::MAX)
}

fn attention_inner(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    ops: Ops,
    budget: usize,
) -> Result<Tensor> {
    let (b, n, c) = q.dims3()?;
    let m = k.dim(1)?;
    let d = c / heads;
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, d))?.transpose(1, 2)?.contiguous()
    };
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let dtype = q.dtype();
    // Scores in f32 when asked (and when training); else in f16/bf16 from a matmul that
    // accumulates in f32, with the scale applied to q first, as diffusers' baddbmm does.
    let upcast = ops.differentiable || ops.upcast_attention || dtype == DType::F32;
    let score_dtype = if upcast { DType::F32 } else { dtype };
    let scale = 1.0 / (d as f64).sqrt();
    let kt = k.to_dtype(score_dtype)?.t()?;
    // Sliced over queries so the score matrix stays bounded whatever the image size.
    let rows = (budget / (b * heads * m).max(1)).clamp(1, n);
    let mut outs = Vec::with_capacity(n.div_ceil(rows));
    let mut start = 0;
    while start < n {
        let len = rows.min(n - start);
        let qs = q.narrow(2, start, len)?;
        let mut scores = if upcast {
            qs.to_dtype(DType::F32)?.matmul(&kt)?.affine(scale, 0.0)?
        } else {
            qs.affine(scale, 0.0)?.matmul(&kt)?
        };
        if let Some(mask) = mask {
            let mask = if mask.dim(D::Minus2)? == n && len != n {
                mask.narrow(D::Minus2, start, len)?
            } else {
                mask.clone()
            };
            scores = scores.broadcast_add(&mask.to_dtype(score_dtype)?)?;
        }
        let p = softmax_last(&scores, ops)?.to_dtype(dtype)?;
        outs.push(p.matmul(&v)?);
        start += len;
    }
    let out = if outs.len() == 1 {
        outs.remove(0)
    } else {
        Tensor::cat(&outs, 2)?
    };
    out.transpose(1, 2)?.reshape((b, n, c))
}

/// Largest |a − b| over all elements, in f32 (comparing a kernel or dtype with its reference).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()
}

/// Sinusoidal timestep embedding (diffusers' `Timesteps` with flip_sin_to_cos, shift 0):
/// [B] → [B, dim] as [cos, sin].
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let exponent: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(exponent, (1, half), dev)?;
    let args = t
        .to_dtype(DType::F32)?
        .reshape(((), 1))?
        .broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)
}

/// 2× nearest-neighbour upsampling to an exact size (odd skip sizes included).
pub fn upsample_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    profile::scope("upsample", x.device(), || x.upsample_nearest2d(h, w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sliced_attention_equals_whole() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 37, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 37, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 37, 8), &dev).unwrap();
        let mask: Vec<f32> = (0..37 * 37)
            .map(|i| {
                if i % 37 > i / 37 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, 37, 37), &dev).unwrap();
        for ops in [Ops::INFERENCE, Ops::TRAINING] {
            let whole = attention_sliced(&q, &k, &v, 2, Some(&mask), ops, usize::MAX).unwrap();
            let sliced = attention_sliced(&q, &k, &v, 2, Some(&mask), ops, 2 * 2 * 37 * 5).unwrap();
            let diff = (whole - sliced)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-6, "{diff}");
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        max_abs_diff(a, b).unwrap()
    }

    #[test]
    fn half_precision_scores_match_upcast_ones() {
        // f16 and bf16 attention without upcasting (scores from the f16 matmul, scale applied to
        // q first) against the f32 path, with a causal mask; then upcasting gives the same
        // numbers as before this option existed (f32 in, f32 scores).
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 33, 16), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 40, 16), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 40, 16), &dev).unwrap();
        let mask: Vec<f32> = (0..33 * 40)
            .map(|i| {
                if i % 40 > i / 40 + 7 {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
            .collect();
        let mask = Tensor::from_vec(mask, (1, 1, 33, 40), &dev).unwrap();
        let mask = Some(&mask);
        let reference = attention(&q, &k, &v, 2, mask, Ops::INFERENCE).unwrap();
        for (dtype, tol) in [(DType::F16, 4e-3), (DType::BF16, 3e-2)] {
            let (qh, kh, vh) = (
                q.to_dtype(dtype).unwrap(),
                k.to_dtype(dtype).unwrap(),
                v.to_dtype(dtype).unwrap(),
            );
            let half = attention(&qh, &kh, &vh, 2, mask, Ops::INFERENCE).unwrap();
            assert_eq!(half.dtype(), dtype);
            let d = max_diff(&half, &reference);
            assert!(d < tol, "{dtype:?}: {d}");
            let up = attention(&qh, &kh, &vh, 2, mask, Ops::INFERENCE.upcast()).unwrap();
            let d = max_diff(&up, &reference);
            assert!(d < tol, "{dtype:?} upcast: {d}");
        }
        let up = attention(&q, &k, &v, 2, mask, Ops::INFERENCE.upcast()).unwrap();
        assert_eq!(max_diff(&up, &reference), 0.0);
    }

    #[test]
    fn profile_records_blocks_only_when_on() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 8, 6, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (8, 8, 3, 3), &dev).unwrap();
        let (gw, gb) = (
            Tensor::ones(8, DType::F32, &dev).unwrap(),
            Tensor::zeros(8, DType::F32, &dev).unwrap(),
        );
        let run = || {
            let h = group_norm(&x, 4, &gw, &gb, 1e-6, true).unwrap();
            let h = conv2d(&h, &w, None, 1, 1).unwrap();
            let h = conv2d(&h, &w, None, 1, 1).unwrap();
            upsample_nearest(&h, 12, 12).unwrap()
        };
        profile::enable(false);
        run();
        assert!(profile::take().is_empty());
        profile::enable(true);
        let a = run();
        let table = profile::take();
        profile::enable(false);
        let calls: Vec<(&str, u64)> = table.iter().map(|(k, _, n)| (*k, *n)).collect();
        assert_eq!(
            calls,
            vec![("conv2d", 2), ("group_norm", 1), ("upsample", 1)]
        );
        assert!(table.iter().all(|(_, ms, _)| *ms >= 0.0));
        // Profiling changes nothing in the result.
        assert_eq!(max_diff(&a, &run()), 0.0);
    }

    #[test]
    fn kernels_leave_the_cpu_to_the_reference_ops() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 8, 4, 4), &dev).unwrap();
        let w = Tensor::ones(8, DType::F32, &dev).unwrap();
        let b = Tensor::zeros(8, DType::F32, &dev).unwrap();
        assert!(crate::kernels::group_norm(&x, 4, &w, &b, 1e-6, false)
            .unwrap()
            .is_none());
        assert!(crate::kernels::self_check(&dev).unwrap().is_empty());
        // The reference: zero mean, unit variance per (sample, group).
        let y = group_norm(&x, 4, &w, &b, 0.0, false).unwrap();
        let g = y.reshape((2, 4, 32)).unwrap();
        let mean = g.mean_keepdim(2).unwrap().abs().unwrap().max_all().unwrap();
        let var = g.sqr().unwrap().mean_keepdim(2).unwrap();
        assert!(mean.to_scalar::<f32>().unwrap() < 1e-5);
        assert!(max_diff(&var, &Tensor::ones_like(&var).unwrap()) < 1e-4);
    }

    #[test]
    fn differentiable_layer_norm_and_softmax_match_fused() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 5, 16), &dev).unwrap();
        let a = softmax_last(&x, Ops::INFERENCE).unwrap();
        let b = softmax_last(&x, Ops::TRAINING).unwrap();
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "{diff}");
        let ln = |ops| LayerNorm {
            weight: Tensor::randn(1f32, 0.1, 16, &dev).unwrap(),
            bias: Tensor::zeros(16, DType::F32, &dev).unwrap(),
            eps: 1e-5,
            ops,
        };
        let (l1, mut l2) = (ln(Ops::INFERENCE), ln(Ops::TRAINING));
        l2.weight = l1.weight.clone();
        let diff = (l1.forward(&x).unwrap() - l2.forward(&x).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }
}
