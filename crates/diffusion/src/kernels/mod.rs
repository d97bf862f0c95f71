//! Our own GPU kernels. Each replaces a sequence of candle ops inside one of the building blocks
//! of [`crate::models::nn`]; those ops stay as the reference the kernel is checked against (on the
//! CPU, and on the GPU by [`self_check`]), and as the path taken where the kernel does not apply:
//! the CPU, a tensor that records gradients (training), or kernels switched off.
//!
//! Switch: `ATELIER_KERNELS=candle` (or [`set_enabled`]) runs candle's ops only, for comparison;
//! `ATELIER_KERNELS=group_norm,cudnn_conv,flash_attention` names the ones to use ([`set_only`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, DeviceLocation, Result, Tensor};

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cudnn;

/// The kernels that can stand in for candle's ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Fused group norm (+ SiLU), ours (`group_norm.cu`).
    GroupNorm = 1,
    /// Convolution through cuDNN with a plan cached per shape.
    CudnnConv = 2,
    /// Flash attention (f16/bf16, no mask), ours (`flash_attention.cu`).
    FlashAttention = 4,
}

impl Kernel {
    pub const ALL: [Kernel; 3] = [Kernel::GroupNorm, Kernel::CudnnConv, Kernel::FlashAttention];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::GroupNorm => "group_norm",
            Kernel::CudnnConv => "cudnn_conv",
            Kernel::FlashAttention => "flash_attention",
        }
    }

    fn bit(self) -> u8 {
        self as u8
    }
}

const ALL_BITS: u8 = 1 | 2 | 4;
/// Set once an override was made; the low bits are then the kernels in use.
const OVERRIDDEN: u8 = 0x80;
static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// The kernels `ATELIER_KERNELS` asks for: unset / `all` → every one; `candle` / `off` / `none`
/// → none; else a comma-separated list of [`Kernel::name`]s.
pub fn from_env() -> std::result::Result<Vec<Kernel>, String> {
    parse(&std::env::var("ATELIER_KERNELS").unwrap_or_default())
}

fn parse(value: &str) -> std::result::Result<Vec<Kernel>, String> {
    match value.trim() {
        "" | "all" | "on" => return Ok(Kernel::ALL.to_vec()),
        "candle" | "off" | "none" => return Ok(Vec::new()),
        _ => {}
    }
    value
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            Kernel::ALL
                .into_iter()
                .find(|k| k.name() == n)
                .ok_or_else(|| {
                    let names: Vec<_> = Kernel::ALL.iter().map(|k| k.name()).collect();
                    format!(
                        "ATELIER_KERNELS={value}: unknown kernel {n:?}; use all, candle, or a \
                     comma-separated list of {}",
                        names.join(", ")
                    )
                })
        })
        .collect()
}

fn bits() -> u8 {
    let o = OVERRIDE.load(Ordering::Relaxed);
    if o & OVERRIDDEN != 0 {
        return o & ALL_BITS;
    }
    static ENV: OnceLock<u8> = OnceLock::new();
    // A bad value is reported by `cuda_device`; here it means every kernel.
    *ENV.get_or_init(|| match from_env() {
        Ok(ks) => ks.iter().fold(0, |b, k| b | k.bit()),
        Err(_) => ALL_BITS,
    })
}

/// Whether `kernel` replaces candle's ops where it applies.
pub fn kernel_enabled(kernel: Kernel) -> bool {
    bits() & kernel.bit() != 0
}

/// Turns every kernel on or off for this process (benchmarks compare both).
pub fn set_enabled(on: bool) {
    OVERRIDE.store(
        OVERRIDDEN | if on { ALL_BITS } else { 0 },
        Ordering::Relaxed,
    );
}

/// Uses exactly these kernels in this process.
pub fn set_only(kernels: &[Kernel]) {
    let b = kernels.iter().fold(0, |b, k| b | k.bit());
    OVERRIDE.store(OVERRIDDEN | b, Ordering::Relaxed);
}

/// GPU `ordinal` as atelier runs on it: freed device memory stays in the driver's pool for the
/// next allocation (as PyTorch's caching allocator keeps it), instead of going back to the driver
/// at every synchronisation, so steps after the first allocate nothing new. A bad
/// `ATELIER_KERNELS` is reported here, before any model work.
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    from_env().map_err(candle_core::Error::Msg)?;
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    cuda::keep_freed_memory(&device)?;
    Ok(device)
}

/// `--device`: `cpu` (f32) or `cuda` (GPU 0, f16 UNet); an unusable one is an error naming the fix.
pub fn device_named(name: &str) -> anyhow::Result<(Device, DType)> {
    Ok(match name {
        "cpu" => (Device::Cpu, DType::F32),
        "cuda" => (
            cuda_device(0).map_err(|e| {
                anyhow::anyhow!("--device cuda: {e} (build with --features cuda, on a machine with an NVIDIA driver)")
            })?,
            DType::F16,
        ),
        other => anyhow::bail!("--device must be cpu or cuda (got {other:?})"),
    })
}

/// Whether `kernel` may stand in for candle's ops on these tensors: switched on, a CUDA device,
/// a float dtype, nothing that records gradients (our kernels have no backward pass), and the
/// kernel agreed with candle's ops on this GPU ([`verified`]).
fn applies(kernel: Kernel, x: &Tensor, others: &[&Tensor]) -> bool {
    kernel_enabled(kernel)
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && !x.track_op()
        && others.iter().all(|t| !t.track_op())
        && verified(kernel, x.device()).is_ok()
}

/// Before a kernel first stands in for candle's ops on a GPU, this process runs it once against
/// them on small inputs of every dtype. A kernel that disagrees there (on a driver, cuDNN or GPU
/// it was never tried on) stays off for that GPU, with an error in the log, and candle's ops run:
/// a wrong kernel costs speed, never images.
pub fn verified(kernel: Kernel, device: &Device) -> std::result::Result<(), String> {
    type Results = HashMap<(u8, DeviceLocation), std::result::Result<(), String>>;
    static RESULTS: OnceLock<Mutex<Results>> = OnceLock::new();
    let key = (kernel.bit(), device.location());
    let mut results = match RESULTS.get_or_init(Default::default).lock() {
        Ok(r) => r,
        Err(_) => return Err("an earlier kernel check panicked".into()),
    };
    results
        .entry(key)
        .or_insert_with(|| {
            let outcome = match first_use_check(kernel, device) {
                Ok(None) => Ok(()),
                Ok(Some(why)) => Err(why),
                Err(e) => Err(format!("it failed: {e}")),
            };
            if let Err(why) = &outcome {
                tracing::error!(
                    kernel = kernel.name(),
                    "kernel disagrees with candle's ops on {:?} and stays off: {why}",
                    device.location()
                );
            }
            outcome
        })
        .clone()
}

/// The first-use comparison: `Some(what differed)` on a mismatch.
fn first_use_check(kernel: Kernel, device: &Device) -> Result<Option<String>> {
    #[cfg(feature = "cuda")]
    {
        let mismatch = |what: String, dtype: DType, diff: f32, tol: f32| {
            (diff.is_nan() || diff > tol)
                .then(|| format!("{what} in {dtype:?}: max |difference| {diff} > {tol}"))
        };
        match kernel {
            Kernel::GroupNorm => {
                let x = (Tensor::randn(0f32, 1.0, (2, 64, 7, 9), device)? + 2.0)?;
                let w = Tensor::randn(1f32, 0.5, 64, device)?;
                let b = Tensor::randn(0f32, 0.5, 64, device)?;
                for dtype in [DType::F32, DType::F16, DType::BF16] {
                    let (x, w, b) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?, b.to_dtype(dtype)?);
                    for silu in [false, true] {
                        let ours = cuda::group_norm(&x, 8, &w, &b, 1e-6, silu)?;
                        let reference =
                            crate::models::nn::group_norm_ops(&x, 8, &w, &b, 1e-6, silu)?;
                        let diff = crate::models::nn::max_abs_diff(&ours, &reference)?;
                        let what = format!("group norm (silu: {silu})");
                        if let Some(m) = mismatch(what, dtype, diff, tolerance(dtype, 1e-4)) {
                            return Ok(Some(m));
                        }
                    }
                }
            }
            Kernel::CudnnConv => {
                let cases: [([usize; 4], usize, usize, usize, usize); 3] = [
                    ([2, 32, 9, 11], 16, 3, 1, 1),
                    ([1, 8, 10, 10], 8, 3, 2, 0),
                    ([2, 16, 5, 5], 8, 1, 1, 0),
                ];
                for (dims, k, r, stride, padding) in cases {
                    let c = dims[1];
                    let x = Tensor::randn(0f32, 1.0, dims.as_slice(), device)?;
                    let w = (Tensor::randn(0f32, 1.0, (k, c, r, r), device)?
                        / ((c * r * r) as f64).sqrt())?;
                    for dtype in [DType::F32, DType::F16, DType::BF16] {
                        let (x, w) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?);
                        // cuDNN missing or without an algorithm: nothing runs, nothing to check.
                        let Some(ours) = cudnn::conv2d(&x, &w, stride, padding)? else {
                            continue;
                        };
                        let reference = x.conv2d(&w, padding, stride, 1, 1)?;
                        let diff = crate::models::nn::max_abs_diff(&ours, &reference)?;
                        let what = format!("convolution {dims:?} → {k}×{r}×{r}/{stride}");
                        if let Some(m) = mismatch(what, dtype, diff, tolerance(dtype, 1e-3)) {
                            return Ok(Some(m));
                        }
                    }
                }
            }
            Kernel::FlashAttention => {
                // (batch, queries, keys, heads, head dim): SD1.5's 40 and 160, SDXL's 64; key
                // counts that leave a partial block.
                let cases = [
                    (2, 100, 77, 2, 40),
                    (1, 70, 130, 2, 64),
                    (1, 64, 64, 1, 160),
                ];
                for (b, n, m, heads, d) in cases {
                    let (q, k, v) = attention_inputs(device, b, n, m, heads * d)?;
                    for dtype in [DType::F16, DType::BF16] {
                        let (q, k, v) =
                            (q.to_dtype(dtype)?, k.to_dtype(dtype)?, v.to_dtype(dtype)?);
                        let ours = cuda::flash_attention(&q, &k, &v, heads)?;
                        let reference = crate::models::nn::attention_reference(&q, &k, &v, heads)?;
                        let diff = crate::models::nn::max_abs_diff(&ours, &reference)?;
                        let what = format!("attention b{b} n{n} m{m} h{heads} d{d}");
                        if let Some(m) = mismatch(what, dtype, diff, tolerance(dtype, 0.0)) {
                            return Ok(Some(m));
                        }
                    }
                }
            }
        }
        Ok(None)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (kernel, device);
        Ok(None)
    }
}

/// q [b, n, c], k and v [b, m, c], f32: scores of a few units, as trained projections give.
#[cfg(feature = "cuda")]
fn attention_inputs(
    device: &Device,
    b: usize,
    n: usize,
    m: usize,
    c: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    Ok((
        (Tensor::randn(0f32, 1.0, (b, n, c), device)? * 1.5)?,
        (Tensor::randn(0f32, 1.0, (b, m, c), device)? * 1.5)?,
        Tensor::randn(0f32, 1.0, (b, m, c), device)?,
    ))
}

/// Fused group norm (+ SiLU) over [B, C, ...], statistics in f32: `None` where it does not apply
/// and the caller runs the reference ops.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !applies(Kernel::GroupNorm, x, &[weight, bias]) {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        cuda::group_norm(x, groups, weight, bias, eps, silu).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (groups, eps, silu);
        Ok(None)
    }
}

/// Convolution (NCHW, square stride and padding, no bias) through cuDNN: `None` where it does
/// not apply or cuDNN is missing or has no algorithm for the shape, and the caller runs candle's.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Option<Tensor>> {
    if !applies(Kernel::CudnnConv, x, &[weight]) || x.rank() != 4 || weight.rank() != 4 {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        cudnn::conv2d(x, weight, stride, padding)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (stride, padding);
        Ok(None)
    }
}

/// Scaled dot-product attention over heads (q [B, N, H·d], k and v [B, M, H·d]) by our flash
/// kernel: `None` where it does not apply (a mask, gradients, f32, a head dimension it has no
/// build for) and the caller runs the reference ops.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    differentiable: bool,
) -> Result<Option<Tensor>> {
    if mask.is_some()
        || differentiable
        || !matches!(q.dtype(), DType::F16 | DType::BF16)
        || k.dtype() != q.dtype()
        || v.dtype() != q.dtype()
        || !applies(Kernel::FlashAttention, q, &[k, v])
    {
        return Ok(None);
    }
    let (Ok((b, n, c)), Ok((kb, m, kc))) = (q.dims3(), k.dims3()) else {
        return Ok(None);
    };
    if heads == 0
        || c % heads != 0
        || kb != b
        || kc != c
        || v.dims() != [b, m, c]
        || n == 0
        || m == 0
    {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        if cuda::flash_dim(c / heads).is_none() {
            return Ok(None);
        }
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        // 16-byte loads: every row starts on a multiple of 8 elements.
        if [&q, &k, &v]
            .iter()
            .any(|t| t.layout().start_offset() % 8 != 0)
        {
            return Ok(None);
        }
        cuda::flash_attention(&q, &k, &v, heads).map(Some)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(None)
    }
}

/// One comparison of a kernel with its reference ops.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub kernel: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    /// Largest |kernel − reference| over all elements.
    pub max_abs_diff: f32,
    /// The tolerance for this dtype (f16/bf16 rounding of the output, f32 summation order).
    pub tolerance: f32,
    pub pass: bool,
    /// What ran (cuDNN's version and algorithm), or why the kernel could not run.
    pub detail: String,
}

impl Check {
    /// A kernel that could not be compared at all, and why.
    fn failed(kernel: Kernel, detail: String) -> Check {
        Check {
            kernel: kernel.name().into(),
            shape: Vec::new(),
            dtype: String::new(),
            max_abs_diff: f32::NAN,
            tolerance: 0.0,
            pass: false,
            detail,
        }
    }
}

/// Outputs are O(1–10): one or two units in the last place of the dtype; `f32` is the summation
/// order's share.
fn tolerance(dtype: DType, f32: f32) -> f32 {
    match dtype {
        DType::F16 => 2e-2,
        DType::BF16 => 1.5e-1,
        _ => f32,
    }
}

/// Runs every kernel `ATELIER_KERNELS` allows against its reference ops on `device` (shapes of
/// the UNet and the VAE, odd sizes, every dtype). On a device where no kernel applies, returns
/// nothing.
pub fn self_check(device: &Device) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    if !device.is_cuda() {
        return Ok(out);
    }
    let wanted = from_env().map_err(candle_core::Error::Msg)?;
    let was = OVERRIDE.load(Ordering::Relaxed);
    for kernel in &wanted {
        if let Err(why) = verified(*kernel, device) {
            out.push(Check::failed(
                *kernel,
                format!("failed its first-use check, so it stays off: {why}"),
            ));
        }
    }
    let result = (|| -> Result<()> {
        if wanted.contains(&Kernel::GroupNorm) {
            check_group_norm(device, &mut out)?;
        }
        #[cfg(feature = "cuda")]
        if wanted.contains(&Kernel::CudnnConv) {
            check_conv(device, &mut out)?;
        }
        #[cfg(feature = "cuda")]
        if wanted.contains(&Kernel::FlashAttention) {
            check_attention(device, &mut out)?;
        }
        Ok(())
    })();
    OVERRIDE.store(was, Ordering::Relaxed);
    result?;
    Ok(out)
}

/// `f` with candle's ops, then with `kernel`: (kernel's output, reference output).
fn both(kernel: Kernel, f: impl Fn() -> Result<Tensor>) -> Result<(Tensor, Tensor)> {
    set_enabled(false);
    let reference = f()?;
    set_only(&[kernel]);
    let ours = f()?;
    Ok((ours, reference))
}

fn check_group_norm(device: &Device, out: &mut Vec<Check>) -> Result<()> {
    let cases: [(&[usize], usize); 5] = [
        (&[2, 320, 64, 64], 32),
        (&[1, 128, 256, 256], 32),
        (&[2, 64, 7, 9], 8),
        (&[3, 96, 5], 32),
        (&[1, 32, 1, 1], 32),
    ];
    for (dims, groups) in cases {
        let c = dims[1];
        // An offset and a spread per channel, as real activations have.
        let x = Tensor::randn(0f32, 1.0, dims, device)?;
        let mut shape = vec![1, c];
        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
        let shift = Tensor::randn(0f32, 3.0, c, device)?.reshape(shape.as_slice())?;
        let x = x.broadcast_add(&shift)?;
        let weight = Tensor::randn(1f32, 0.5, c, device)?;
        let bias = Tensor::randn(0f32, 0.5, c, device)?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for silu in [false, true] {
                let (x, w, b) = (
                    x.to_dtype(dtype)?,
                    weight.to_dtype(dtype)?,
                    bias.to_dtype(dtype)?,
                );
                let (fused, reference) = both(Kernel::GroupNorm, || {
                    crate::models::nn::group_norm(&x, groups, &w, &b, 1e-6, silu)
                })?;
                let max_abs_diff = crate::models::nn::max_abs_diff(&fused, &reference)?;
                out.push(Check {
                    kernel: if silu {
                        "group_norm_silu"
                    } else {
                        "group_norm"
                    }
                    .into(),
                    shape: dims.to_vec(),
                    dtype: format!("{dtype:?}"),
                    max_abs_diff,
                    tolerance: tolerance(dtype, 1e-4),
                    pass: max_abs_diff <= tolerance(dtype, 1e-4),
                    detail: String::new(),
                });
            }
        }
    }
    Ok(())
}

/// Flash attention against the reference ops with f32 scores: the UNet's self- and cross-attention
/// at 64² latents (SD1.5: 8 heads of 40; SDXL: heads of 64), deeper levels, odd sizes.
#[cfg(feature = "cuda")]
fn check_attention(device: &Device, out: &mut Vec<Check>) -> Result<()> {
    let cases: [(usize, usize, usize, usize, usize); 6] = [
        (2, 4096, 4096, 8, 40),
        (2, 4096, 77, 8, 40),
        (2, 1024, 1024, 8, 80),
        (2, 256, 77, 8, 160),
        (2, 1024, 1024, 10, 64),
        (1, 100, 37, 3, 24),
    ];
    for (b, n, m, heads, d) in cases {
        let (q, k, v) = attention_inputs(device, b, n, m, heads * d)?;
        for dtype in [DType::F16, DType::BF16] {
            let (q, k, v) = (q.to_dtype(dtype)?, k.to_dtype(dtype)?, v.to_dtype(dtype)?);
            let (ours, reference) = both(Kernel::FlashAttention, || {
                crate::models::nn::attention(
                    &q,
                    &k,
                    &v,
                    heads,
                    None,
                    crate::models::nn::Ops::INFERENCE.upcast(),
                )
            })?;
            let max_abs_diff = crate::models::nn::max_abs_diff(&ours, &reference)?;
            out.push(Check {
                kernel: Kernel::FlashAttention.name().into(),
                shape: vec![b, n, m, heads, d],
                dtype: format!("{dtype:?}"),
                max_abs_diff,
                tolerance: tolerance(dtype, 0.0),
                pass: max_abs_diff <= tolerance(dtype, 0.0),
                detail: format!("head dimension padded to {:?}", cuda::flash_dim(d)),
            });
        }
    }
    Ok(())
}

#[cfg(feature = "cuda")]
fn check_conv(device: &Device, out: &mut Vec<Check>) -> Result<()> {
    let version = match cudnn::version() {
        Ok(v) => v,
        Err(why) => {
            out.push(Check::failed(Kernel::CudnnConv, why));
            return Ok(());
        }
    };
    // (input, output channels, kernel, stride, padding): the UNet's 3×3 at 64², the VAE's at
    // 512², a 1×1 shortcut, conv_in's 4 channels, a stride-2 downsample, odd sizes.
    let cases: [([usize; 4], usize, usize, usize, usize); 6] = [
        ([2, 320, 64, 64], 320, 3, 1, 1),
        ([1, 128, 512, 512], 128, 3, 1, 1),
        ([2, 640, 32, 32], 320, 1, 1, 0),
        ([1, 4, 64, 64], 512, 3, 1, 1),
        ([2, 64, 33, 33], 64, 3, 2, 0),
        ([3, 5, 7, 9], 6, 3, 2, 1),
    ];
    for (dims, k, r, stride, padding) in cases {
        let c = dims[1];
        let x = Tensor::randn(0f32, 1.0, dims.as_slice(), device)?;
        // Outputs of unit spread, as trained weights keep them.
        let w = (Tensor::randn(0f32, 1.0, (k, c, r, r), device)? / ((c * r * r) as f64).sqrt())?;
        let b = Tensor::randn(0f32, 0.5, k, device)?;
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (x, w, b) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?, b.to_dtype(dtype)?);
            let (ours, reference) = both(Kernel::CudnnConv, || {
                crate::models::nn::conv2d(&x, &w, Some(&b), stride, padding)
            })?;
            let detail = match cudnn::algorithm(&x, &w, stride, padding)? {
                Some(algo) => format!("cuDNN {version}, {algo}"),
                None => format!("cuDNN {version} offers no algorithm: candle's convolution ran"),
            };
            let ran = !detail.contains("no algorithm");
            let max_abs_diff = crate::models::nn::max_abs_diff(&ours, &reference)?;
            out.push(Check {
                kernel: Kernel::CudnnConv.name().into(),
                shape: vec![dims[0], dims[1], dims[2], dims[3], k, r, stride, padding],
                dtype: format!("{dtype:?}"),
                max_abs_diff,
                tolerance: tolerance(dtype, 1e-3),
                pass: ran && max_abs_diff <= tolerance(dtype, 1e-3),
                detail,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atelier_kernels_names_the_kernels_or_says_what_is_accepted() {
        assert_eq!(parse("").unwrap(), Kernel::ALL.to_vec());
        assert_eq!(parse("all").unwrap(), Kernel::ALL.to_vec());
        assert!(parse("candle").unwrap().is_empty());
        assert!(parse(" off ").unwrap().is_empty());
        assert_eq!(parse("cudnn_conv").unwrap(), vec![Kernel::CudnnConv]);
        assert_eq!(
            parse("flash_attention").unwrap(),
            vec![Kernel::FlashAttention]
        );
        assert_eq!(
            parse("group_norm, cudnn_conv").unwrap(),
            vec![Kernel::GroupNorm, Kernel::CudnnConv]
        );
        let err = parse("group_norm,flash").unwrap_err();
        assert!(
            err.contains("\"flash\"") && err.contains("cudnn_conv"),
            "{err}"
        );
    }

    #[test]
    fn no_kernel_stands_in_on_the_cpu() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (1, 4, 6, 6), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev).unwrap();
        assert!(conv2d(&x, &w, 1, 1).unwrap().is_none());
        assert_eq!(verified(Kernel::CudnnConv, &dev), Ok(()));
    }
}
