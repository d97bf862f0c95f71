//! Our own GPU kernels. Each replaces a sequence of candle ops inside one of the building blocks
//! of [`crate::models::nn`]; those ops stay as the reference the kernel is checked against (on the
//! CPU, and on the GPU by [`self_check`]), and as the path taken where the kernel does not apply:
//! the CPU, a tensor that records gradients (training), or kernels switched off.
//!
//! Switch: `ATELIER_KERNELS=candle` (or [`set_enabled`]) runs candle's ops only, for comparison.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};

#[cfg(feature = "cuda")]
mod cuda;

static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Whether our kernels replace candle's ops where they apply (default: yes).
pub fn enabled() -> bool {
    match OVERRIDE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            static ENV: OnceLock<bool> = OnceLock::new();
            *ENV.get_or_init(|| {
                !matches!(
                    std::env::var("ATELIER_KERNELS").as_deref(),
                    Ok("candle") | Ok("off")
                )
            })
        }
    }
}

/// Turns our kernels on or off for this process (benchmarks compare both).
pub fn set_enabled(on: bool) {
    OVERRIDE.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// GPU `ordinal` as atelier runs on it: freed device memory stays in the driver's pool for the
/// next allocation (as PyTorch's caching allocator keeps it), instead of going back to the driver
/// at every synchronisation, so steps after the first allocate nothing new.
pub fn cuda_device(ordinal: usize) -> Result<Device> {
    let device = Device::new_cuda(ordinal)?;
    #[cfg(feature = "cuda")]
    cuda::keep_freed_memory(&device)?;
    Ok(device)
}

/// Whether a fused kernel may stand in for candle's ops on these tensors: a CUDA device, a
/// float dtype, and nothing that records gradients (our kernels have no backward pass).
fn applies(x: &Tensor, others: &[&Tensor]) -> bool {
    enabled()
        && x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::F16 | DType::BF16)
        && !x.track_op()
        && others.iter().all(|t| !t.track_op())
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
    if !applies(x, &[weight, bias]) {
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
}

/// Runs every kernel against its reference ops on `device` (shapes of the UNet and the VAE,
/// odd sizes, every dtype). On a device where no kernel applies, returns nothing.
pub fn self_check(device: &Device) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    if !device.is_cuda() {
        return Ok(out);
    }
    let was = enabled();
    let cases: [(&[usize], usize); 5] = [
        (&[2, 320, 64, 64], 32),
        (&[1, 128, 256, 256], 32),
        (&[2, 64, 7, 9], 8),
        (&[3, 96, 5], 32),
        (&[1, 32, 1, 1], 32),
    ];
    let result = (|| -> Result<()> {
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
                    set_enabled(false);
                    let reference = crate::models::nn::group_norm(&x, groups, &w, &b, 1e-6, silu)?;
                    set_enabled(true);
                    let fused = crate::models::nn::group_norm(&x, groups, &w, &b, 1e-6, silu)?;
                    let max_abs_diff = crate::models::nn::max_abs_diff(&fused, &reference)?;
                    // Outputs are O(10): one or two units in the last place of the dtype.
                    let tolerance = match dtype {
                        DType::F16 => 2e-2,
                        DType::BF16 => 1.5e-1,
                        _ => 1e-4,
                    };
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
                        tolerance,
                        pass: max_abs_diff <= tolerance,
                    });
                }
            }
        }
        Ok(())
    })();
    set_enabled(was);
    result?;
    Ok(out)
}
