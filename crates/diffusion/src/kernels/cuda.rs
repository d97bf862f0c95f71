//! Launching our kernels on candle's CUDA storage. The PTX is compiled by build.rs.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use candle_core::cuda_backend::{kernel_name, Map3, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, Layout, Result, Shape, Tensor, WithDType,
};

const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
const FLASH_MODULE: &str = "atelier_flash_attention";
/// Head dimensions (padded) the flash-attention kernel is compiled for.
const FLASH_DIMS: [usize; 6] = [48, 64, 80, 96, 128, 160];
/// Query rows and keys per block (BR, BC in flash_attention.cu).
const FLASH_TILE: usize = 64;
const GROUP_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/group_norm.ptx"));
const GROUP_NORM_MODULE: &str = "atelier_group_norm";
const THREADS: u32 = 256;
/// Elements one block of the statistics pass reduces: enough blocks for a large image, few
/// partial results to merge.
const CHUNK: usize = 16 * 1024;

struct GroupNorm {
    groups: usize,
    eps: f32,
    silu: bool,
}

pub(super) fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims();
    if dims.len() < 2 || groups == 0 || dims[1] % groups != 0 {
        candle_core::bail!("group norm: {groups} groups do not divide the channels of {dims:?}");
    }
    let x = x.contiguous()?;
    let weight = weight.to_dtype(x.dtype())?.contiguous()?;
    let bias = bias.to_dtype(x.dtype())?.contiguous()?;
    x.apply_op3_no_bwd(
        &weight,
        &bias,
        &GroupNorm {
            groups,
            eps: eps as f32,
            silu,
        },
    )
}

impl CustomOp3 for GroupNorm {
    fn name(&self) -> &'static str {
        "atelier-group-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!(
            "the fused group norm runs on CUDA only; the CPU takes the reference ops"
        )
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let slice = self.map(&s1.slice, l1, &s2.slice, l2, &s3.slice, l3, dev)?;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            l1.shape().clone(),
        ))
    }
}

pub(super) fn contiguous<'a, T>(
    s: &'a CudaSlice<T>,
    l: &Layout,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(s.slice(a..b)),
        None => candle_core::bail!("the {what} must be contiguous"),
    }
}

impl Map3 for GroupNorm {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        xl: &Layout,
        w: &CudaSlice<T>,
        wl: &Layout,
        b: &CudaSlice<T>,
        bl: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let (x, w, b) = (
            contiguous(x, xl, "group norm input")?,
            contiguous(w, wl, "group norm weight")?,
            contiguous(b, bl, "group norm bias")?,
        );
        let dims = xl.shape().dims();
        let (batch, channels) = (dims[0], dims[1]);
        let spatial: usize = dims[2..].iter().product();
        let numel = batch * channels * spatial;
        let runs = batch * self.groups;
        let group_size = channels / self.groups * spatial;
        if numel == 0 {
            // SAFETY: nothing to write.
            return unsafe { dev.alloc::<T>(0) };
        }
        let chunks = group_size.div_ceil(CHUNK).max(1);
        let chunk = group_size.div_ceil(chunks);
        let part = dev.alloc_zeros::<f32>(runs * chunks * 3)?;
        let stats = dev.alloc_zeros::<f32>(runs * 2)?;
        // SAFETY: every element is written by the apply pass.
        let y = unsafe { dev.alloc::<T>(numel)? };

        let partial = dev.get_or_load_custom_func(
            &kernel_name::<T>("gn_partial"),
            GROUP_NORM_MODULE,
            GROUP_NORM_PTX,
        )?;
        let mut l = partial.builder();
        l.arg(&x);
        l.arg(&part);
        candle_core::builder_arg!(l, group_size as u64, chunk as u64);
        let cfg = LaunchConfig {
            grid_dim: (runs as u32, chunks as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match gn_partial's signature; the grid covers runs × chunks.
        unsafe { l.launch(cfg) }.w()?;

        let finalize =
            dev.get_or_load_custom_func("gn_finalize", GROUP_NORM_MODULE, GROUP_NORM_PTX)?;
        let mut l = finalize.builder();
        l.arg(&part);
        l.arg(&stats);
        candle_core::builder_arg!(l, runs as u32, chunks as u32, self.eps);
        let cfg = LaunchConfig {
            grid_dim: ((runs as u32).div_ceil(THREADS), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match gn_finalize's signature.
        unsafe { l.launch(cfg) }.w()?;

        let apply = dev.get_or_load_custom_func(
            &kernel_name::<T>("gn_apply"),
            GROUP_NORM_MODULE,
            GROUP_NORM_PTX,
        )?;
        let mut l = apply.builder();
        l.arg(&x);
        l.arg(&y);
        l.arg(&stats);
        l.arg(&w);
        l.arg(&b);
        candle_core::builder_arg!(
            l,
            numel as u64,
            group_size as u64,
            spatial as u64,
            channels as u64,
            u32::from(self.silu)
        );
        // Grid-stride: a few waves of blocks, each thread several elements.
        let blocks = numel.div_ceil(THREADS as usize).min(65_535 * 4) as u32;
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match gn_apply's signature; y holds numel elements.
        unsafe { l.launch(cfg) }.w()?;
        Ok(y)
    }
}

/// Freed device memory stays in the driver's default pool for the next allocation (as PyTorch's
/// caching allocator keeps it) instead of going back to the driver at every synchronisation.
pub(super) fn keep_freed_memory(device: &candle_core::Device) -> Result<()> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let cu = device.as_cuda_device()?.cuda_stream().context().cu_device();
    let fail = |what: &str, e| candle_core::Error::Msg(format!("{what}: {e:?}"));
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: plain driver calls on a valid device ordinal with out-pointers to locals.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, cu)
            .result()
            .map_err(|e| fail("cuDeviceGetDefaultMemPool", e))?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()
        .map_err(|e| fail("cuMemPoolSetAttribute", e))?;
    }
    Ok(())
}

/// The padded head dimension the flash-attention kernel runs `d` with, if it has one (`d` a
/// multiple of 8 up to 160).
pub(super) fn flash_dim(d: usize) -> Option<usize> {
    if d == 0 || d % 8 != 0 {
        return None;
    }
    FLASH_DIMS.into_iter().find(|&p| p >= d)
}

struct Flash {
    heads: usize,
    scale: f32,
}

/// softmax(q·kᵀ/√d)·v over heads: q [B, N, H·d], k and v [B, M, H·d], f16 or bf16, contiguous
/// with start offsets a multiple of 8 elements (the caller checks).
pub(super) fn flash_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let d = q.dim(2)? / heads;
    q.apply_op3_no_bwd(
        k,
        v,
        &Flash {
            heads,
            scale: 1.0 / (d as f32).sqrt(),
        },
    )
}

impl Map3 for Flash {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        q: &CudaSlice<T>,
        ql: &Layout,
        k: &CudaSlice<T>,
        kl: &Layout,
        v: &CudaSlice<T>,
        vl: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        if !matches!(T::DTYPE, candle_core::DType::F16 | candle_core::DType::BF16) {
            candle_core::bail!("flash attention takes f16 or bf16, not {:?}", T::DTYPE)
        }
        let (b, n, c) = ql.shape().dims3()?;
        let (_, m, _) = kl.shape().dims3()?;
        let d = c / self.heads;
        let Some(dp) = flash_dim(d) else {
            candle_core::bail!("flash attention: no kernel for head dimension {d}")
        };
        let (q, k, v) = (
            contiguous(q, ql, "attention query")?,
            contiguous(k, kl, "attention key")?,
            contiguous(v, vl, "attention value")?,
        );
        // SAFETY: the kernel writes every element of [B, N, H·d].
        let out = unsafe { dev.alloc::<T>(b * n * c)? };
        if out.is_empty() {
            return Ok(out);
        }
        if m == 0 {
            candle_core::bail!("flash attention over no keys");
        }
        let func = dev.get_or_load_custom_func(
            &format!("{}_{dp}", kernel_name::<T>("flash_attention")),
            FLASH_MODULE,
            FLASH_PTX,
        )?;
        let t = FLASH_TILE;
        let smem = (t * dp + 2 * t * dp + t * t) * 2 + (t * t + t * dp + 3 * t) * 4;
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute_enum as Attr;
        func.set_attribute(
            Attr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem as i32,
        )
        .w()?;
        let mut l = func.builder();
        l.arg(&q);
        l.arg(&k);
        l.arg(&v);
        l.arg(&out);
        candle_core::builder_arg!(
            l,
            n as i32,
            m as i32,
            self.heads as i32,
            d as i32,
            self.scale
        );
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(t) as u32, self.heads as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        // SAFETY: arguments match flash_attention_*'s signature; the grid covers every query
        // block, head and batch; the shared memory is what the kernel lays out for `dp`.
        unsafe { l.launch(cfg) }.w()?;
        Ok(out)
    }
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "atelier-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("flash attention runs on CUDA only; the CPU takes the reference ops")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let slice = self.map(&s1.slice, l1, &s2.slice, l2, &s3.slice, l3, dev)?;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            l1.shape().clone(),
        ))
    }
}
