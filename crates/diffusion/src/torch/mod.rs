//! Stable Diffusion's networks on libtorch (PyTorch's kernels, through `tch`): the CLIP text
//! encoders, the UNets (SD 1.x, 2.x, SDXL, 9-channel inpainting) and the VAE, named and shaped as
//! diffusers/transformers name them, loaded from diffusers folders and single files, with
//! kohya/diffusers LoRAs merged or at run time, and LoRA training (`train`, `checkpoint`).
//!
//! Attention runs through libtorch's `scaled_dot_product_attention` (flash and memory-efficient
//! kernels on GPUs, fused kernels on CPUs); group and layer norms and convolutions are libtorch's
//! (oneDNN on CPUs, cuDNN on NVIDIA GPUs).

pub mod checkpoint;
pub mod clip;
pub mod dit;
pub mod esrgan;
pub mod flux;
pub mod inversion;
pub mod lora;
pub mod mmdit;
pub mod models;
pub mod nn;
pub mod t5;
pub mod train;
pub mod unet;
pub mod vae;
pub mod weights;

pub use models::TorchModels;
pub use tch::{no_grad, Cuda, Device, Kind, Tensor};

/// What the libtorch path reports.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Torch(#[from] tch::TchError),
    #[error("{0}")]
    Msg(String),
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Msg(e.to_string())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// An error with a message.
pub(crate) fn msg(m: impl Into<String>) -> Error {
    Error::Msg(m.into())
}

/// The device named by `ATELIER_DEVICE` (`cpu`, `cuda`, `cuda:N`), else the first CUDA GPU when
/// libtorch sees one, else the CPU.
pub fn device() -> Result<Device> {
    match std::env::var("ATELIER_DEVICE").ok().as_deref() {
        None | Some("") => {
            open_cuda();
            Ok(Device::cuda_if_available())
        }
        Some(name) => device_named(name).map_err(|e| msg(format!("ATELIER_DEVICE={name:?}: {e}"))),
    }
}

/// The device `name` says: `cpu`, `cuda` (the first GPU) or `cuda:N`.
pub fn device_named(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => Err(msg(format!(
                "unknown device {other:?}: expected cpu, cuda or cuda:N"
            ))),
        },
    }
}

/// Opens libtorch's CUDA library once, so that its kernels register with libtorch: the linker
/// leaves it out of the binaries (no symbol of it is named), as `import torch` would load it.
/// Where it is missing or CUDA's libraries are, libtorch stays on the CPU.
pub fn open_cuda() -> bool {
    static OPENED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OPENED.get_or_init(|| {
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        // SAFETY: libtorch_cuda's initialisers only register CUDA kernels with the libtorch
        // already loaded; the library is kept open for the life of the process.
        match unsafe { Library::open(Some("libtorch_cuda.so"), RTLD_NOW | RTLD_GLOBAL) } {
            Ok(lib) => {
                std::mem::forget(lib);
                true
            }
            Err(e) => {
                tracing::debug!("libtorch without CUDA: {e}");
                false
            }
        }
    })
}

fn cuda(n: usize) -> Result<Device> {
    open_cuda();
    let count = tch::Cuda::device_count() as usize;
    if n < count {
        Ok(Device::Cuda(n))
    } else {
        Err(msg(format!(
            "CUDA device {n} asked for; libtorch sees {count} (an NVIDIA driver and PyTorch's CUDA libraries are needed)"
        )))
    }
}

/// Runs libtorch operations, turning an error libtorch raises inside them (tch's infallible
/// wrappers panic with it) into an [`Error`].
pub fn guard<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let text = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("libtorch failed");
            // libtorch's messages end with a C++ backtrace; the first line says what went wrong.
            Err(msg(text.lines().next().unwrap_or(text).to_string()))
        }
    }
}
