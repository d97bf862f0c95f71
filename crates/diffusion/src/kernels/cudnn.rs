//! Convolutions through NVIDIA's cuDNN, opened at run time (no cuDNN is needed to build, and a
//! machine without it runs candle's convolution instead).
//!
//! candle's own `cudnn` feature asks cuDNN for an algorithm on every call, which cost more than
//! the convolutions themselves (a 581 ms UNet step on an H200). Here each convolution shape gets a
//! plan once — descriptors, algorithm, workspace size — kept for the life of the process, as
//! PyTorch caches its choices. Algorithms come from cuDNN's heuristics (deterministic: the same
//! shapes pick the same algorithm in every process), or with `ATELIER_CUDNN_FIND=1` from timing
//! every candidate once per shape, as `torch.backends.cudnn.benchmark` does.
//!
//! Library: `ATELIER_CUDNN_LIB` (a path), else `libcudnn.so.9` / `libcudnn.so` from the loader's
//! search path. Workspace limit: `ATELIER_CUDNN_WORKSPACE_MIB` (default 1024).

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Mutex, OnceLock};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, ValidAsZeroBits,
};
use candle_core::cuda_backend::{Map2, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};

type Status = c_int;
type Handle = *mut c_void;
type Desc = *mut c_void;

const SUCCESS: Status = 0;
const NCHW: c_int = 0;
const DATA_FLOAT: c_int = 0;
const DATA_HALF: c_int = 2;
const DATA_BFLOAT16: c_int = 9;
const CROSS_CORRELATION: c_int = 1;
const DEFAULT_MATH: c_int = 0;
const TENSOR_OP_MATH: c_int = 1;
const FMA_MATH: c_int = 3;
const DETERMINISTIC: c_int = 1;
const ALGORITHMS: c_int = 8;
const ALGO_NAMES: [&str; 8] = [
    "implicit_gemm",
    "implicit_precomp_gemm",
    "gemm",
    "direct",
    "fft",
    "fft_tiling",
    "winograd",
    "winograd_nonfused",
];

/// `cudnnConvolutionFwdAlgoPerf_t`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct AlgoPerf {
    algo: c_int,
    status: Status,
    time: f32,
    memory: usize,
    determinism: c_int,
    math_type: c_int,
    reserved: [c_int; 3],
}

/// The part of cuDNN 9's (legacy) convolution API we call.
struct Api {
    _lib: libloading::Library,
    /// The sub-libraries `libcudnn.so.9` forwards to, held open: cuDNN aborts the process when
    /// one is missing at the first call, so their absence must be found before it.
    _parts: Vec<libloading::Library>,
    version: usize,
    create: unsafe extern "C" fn(*mut Handle) -> Status,
    set_stream: unsafe extern "C" fn(Handle, *mut c_void) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    create_tensor: unsafe extern "C" fn(*mut Desc) -> Status,
    set_tensor_4d: unsafe extern "C" fn(Desc, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
    create_filter: unsafe extern "C" fn(*mut Desc) -> Status,
    set_filter_4d: unsafe extern "C" fn(Desc, c_int, c_int, c_int, c_int, c_int, c_int) -> Status,
    create_conv: unsafe extern "C" fn(*mut Desc) -> Status,
    #[allow(clippy::type_complexity)]
    set_conv_2d: unsafe extern "C" fn(
        Desc,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
    ) -> Status,
    set_conv_math: unsafe extern "C" fn(Desc, c_int) -> Status,
    #[allow(clippy::type_complexity)]
    get_algorithms: unsafe extern "C" fn(
        Handle,
        Desc,
        Desc,
        Desc,
        Desc,
        c_int,
        *mut c_int,
        *mut AlgoPerf,
    ) -> Status,
    #[allow(clippy::type_complexity)]
    find_algorithms: unsafe extern "C" fn(
        Handle,
        Desc,
        *const c_void,
        Desc,
        *const c_void,
        Desc,
        Desc,
        *mut c_void,
        c_int,
        *mut c_int,
        *mut AlgoPerf,
        *mut c_void,
        usize,
    ) -> Status,
    #[allow(clippy::type_complexity)]
    workspace_size:
        unsafe extern "C" fn(Handle, Desc, Desc, Desc, Desc, c_int, *mut usize) -> Status,
    #[allow(clippy::type_complexity)]
    forward: unsafe extern "C" fn(
        Handle,
        *const c_void,
        Desc,
        *const c_void,
        Desc,
        *const c_void,
        Desc,
        c_int,
        *mut c_void,
        usize,
        *const c_void,
        Desc,
        *mut c_void,
    ) -> Status,
}

impl Api {
    fn open() -> std::result::Result<Api, String> {
        let given = std::env::var("ATELIER_CUDNN_LIB")
            .ok()
            .filter(|p| !p.is_empty());
        let candidates = match &given {
            Some(path) => vec![path.clone()],
            None => vec!["libcudnn.so.9".to_string(), "libcudnn.so".to_string()],
        };
        let dir = given
            .as_deref()
            .and_then(|p| std::path::Path::new(p).parent())
            .map(std::path::Path::to_path_buf);
        let mut tried = Vec::new();
        for name in &candidates {
            // SAFETY: loading cuDNN runs its initialisers, which only set up its own state.
            match unsafe { libloading::Library::new(name) } {
                Ok(lib) => {
                    let parts = Api::parts(dir.as_deref())?;
                    return Api::bind(lib, parts);
                }
                Err(e) => tried.push(format!("{name}: {e}")),
            }
        }
        Err(format!(
            "cuDNN not found ({}); install it (PyTorch's wheels ship it as nvidia-cudnn-cu13) and \
             put its lib folder on LD_LIBRARY_PATH, or name the file in ATELIER_CUDNN_LIB",
            tried.join("; ")
        ))
    }

    /// Opens cuDNN 9's sub-libraries the convolution API lives in, from
    /// `dir` (where `ATELIER_CUDNN_LIB` points) or the loader's search path.
    fn parts(
        dir: Option<&std::path::Path>,
    ) -> std::result::Result<Vec<libloading::Library>, String> {
        let mut parts = Vec::new();
        for name in [
            "libcudnn_graph.so.9",
            "libcudnn_ops.so.9",
            "libcudnn_cnn.so.9",
        ] {
            let mut paths = Vec::new();
            if let Some(d) = dir {
                paths.push(d.join(name).to_string_lossy().into_owned());
            }
            paths.push(name.to_string());
            // SAFETY: as for the main library.
            match paths
                .iter()
                .find_map(|p| unsafe { libloading::Library::new(p) }.ok())
            {
                Some(lib) => parts.push(lib),
                None => {
                    return Err(format!(
                        "cuDNN 9 is incomplete: {name} not found beside libcudnn.so.9 or on the \
                         library path"
                    ))
                }
            }
        }
        Ok(parts)
    }

    fn bind(
        lib: libloading::Library,
        parts: Vec<libloading::Library>,
    ) -> std::result::Result<Api, String> {
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the field's type is the symbol's C signature in cuDNN 9's headers.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("cuDNN lacks {}: {e}", $name))?
            };
        }
        let get_version: unsafe extern "C" fn() -> usize = sym!("cudnnGetVersion");
        // SAFETY: takes nothing, returns a number.
        let version = unsafe { get_version() };
        if version < 90000 {
            return Err(format!("cuDNN {version} is older than 9.0"));
        }
        Ok(Api {
            version,
            create: sym!("cudnnCreate"),
            set_stream: sym!("cudnnSetStream"),
            error_string: sym!("cudnnGetErrorString"),
            create_tensor: sym!("cudnnCreateTensorDescriptor"),
            set_tensor_4d: sym!("cudnnSetTensor4dDescriptor"),
            create_filter: sym!("cudnnCreateFilterDescriptor"),
            set_filter_4d: sym!("cudnnSetFilter4dDescriptor"),
            create_conv: sym!("cudnnCreateConvolutionDescriptor"),
            set_conv_2d: sym!("cudnnSetConvolution2dDescriptor"),
            set_conv_math: sym!("cudnnSetConvolutionMathType"),
            get_algorithms: sym!("cudnnGetConvolutionForwardAlgorithm_v7"),
            find_algorithms: sym!("cudnnFindConvolutionForwardAlgorithmEx"),
            workspace_size: sym!("cudnnGetConvolutionForwardWorkspaceSize"),
            forward: sym!("cudnnConvolutionForward"),
            _lib: lib,
            _parts: parts,
        })
    }

    /// Points `handle` at candle's stream for this thread; what follows is enqueued there.
    ///
    /// # Safety
    /// `handle` is a live cuDNN handle.
    unsafe fn use_stream(&self, handle: Handle, stream: &CudaStream) -> Result<()> {
        self.check(
            "cudnnSetStream",
            (self.set_stream)(handle, stream.cu_stream().cast()),
        )
    }

    fn check(&self, what: &str, status: Status) -> Result<()> {
        if status == SUCCESS {
            return Ok(());
        }
        // SAFETY: cuDNN returns a static string for every status.
        let msg = unsafe { CStr::from_ptr((self.error_string)(status)) };
        candle_core::bail!("cuDNN {what}: {} ({status})", msg.to_string_lossy())
    }
}

fn api() -> std::result::Result<&'static Api, &'static str> {
    static API: OnceLock<std::result::Result<Api, String>> = OnceLock::new();
    API.get_or_init(Api::open).as_ref().map_err(String::as_str)
}

/// cuDNN's version (e.g. 92801 for 9.28.1), or why it could not be opened.
pub(super) fn version() -> std::result::Result<usize, String> {
    api().map(|a| a.version).map_err(str::to_string)
}

/// One convolution shape: what the plan depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    ordinal: usize,
    dtype: DType,
    x: [usize; 4],
    w: [usize; 4],
    stride: usize,
    padding: usize,
    /// f32 may use TF32 tensor cores (candle's reduced-precision f32 matmul switch).
    tf32: bool,
}

impl Key {
    /// The output's dims, or `None` for a convolution that does not fit its input.
    fn output(&self) -> Option<[usize; 4]> {
        let [n, c, h, w] = self.x;
        let [k, wc, r, s] = self.w;
        let (p, st) = (self.padding, self.stride);
        if wc != c || h + 2 * p < r || w + 2 * p < s || st == 0 {
            return None;
        }
        Some([n, k, (h + 2 * p - r) / st + 1, (w + 2 * p - s) / st + 1])
    }
}

/// Descriptors, algorithm and workspace for one shape; cuDNN's descriptors are host-side structs,
/// only read once made.
struct Plan {
    x: Desc,
    w: Desc,
    conv: Desc,
    y: Desc,
    y_dims: [usize; 4],
    algo: c_int,
    workspace: usize,
}

#[derive(Default)]
struct State {
    /// One cuDNN handle per GPU; calls through it are serialised by the mutex (they only enqueue
    /// work on the caller's stream).
    handles: HashMap<usize, usize>,
    /// `None`: cuDNN offers nothing for this shape, so candle's convolution runs it.
    plans: HashMap<Key, Option<Plan>>,
}

// SAFETY: the raw pointers are cuDNN handles and descriptors, used only under the mutex.
unsafe impl Send for State {}

fn state() -> &'static Mutex<State> {
    static STATE: OnceLock<Mutex<State>> = OnceLock::new();
    STATE.get_or_init(Default::default)
}

fn lock() -> Result<std::sync::MutexGuard<'static, State>> {
    state()
        .lock()
        .map_err(|_| candle_core::Error::Msg("cuDNN state poisoned by an earlier panic".into()))
}

fn data_type(dtype: DType) -> Option<c_int> {
    match dtype {
        DType::F32 => Some(DATA_FLOAT),
        DType::F16 => Some(DATA_HALF),
        DType::BF16 => Some(DATA_BFLOAT16),
        _ => None,
    }
}

fn workspace_limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("ATELIER_CUDNN_WORKSPACE_MIB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(1024)
            << 20
    })
}

fn find_mode() -> bool {
    static FIND: OnceLock<bool> = OnceLock::new();
    *FIND.get_or_init(|| {
        matches!(
            std::env::var("ATELIER_CUDNN_FIND").as_deref(),
            Ok("1") | Ok("true") | Ok("on")
        )
    })
}

fn int(v: usize) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| candle_core::Error::Msg(format!("{v} exceeds cuDNN's int")))
}

impl State {
    fn handle(&mut self, api: &Api, dev: &CudaDevice) -> Result<Handle> {
        let stream = dev.cuda_stream();
        let ordinal = stream.context().ordinal();
        if let Some(h) = self.handles.get(&ordinal) {
            return Ok(*h as Handle);
        }
        stream.context().bind_to_thread().w()?;
        let mut h: Handle = std::ptr::null_mut();
        // SAFETY: out-pointer to a local; the device's context is current on this thread.
        api.check("cudnnCreate", unsafe { (api.create)(&mut h) })?;
        self.handles.insert(ordinal, h as usize);
        Ok(h)
    }

    /// The plan for `key`, made on first use. A shape cuDNN cannot plan (an unsupported
    /// configuration, no memory for timing algorithms) stays with candle's convolution, with a
    /// warning once.
    fn plan(&mut self, api: &Api, dev: &CudaDevice, key: Key) -> Result<Option<&Plan>> {
        if !self.plans.contains_key(&key) {
            let plan = match self
                .handle(api, dev)
                .and_then(|handle| make_plan(api, handle, dev, &key))
            {
                Ok(plan) => plan,
                Err(e) => {
                    tracing::warn!("convolution {key:?} runs on candle's kernels: {e}");
                    None
                }
            };
            self.plans.insert(key, plan);
        }
        Ok(self.plans.get(&key).and_then(Option::as_ref))
    }
}

fn make_plan(api: &Api, handle: Handle, dev: &CudaDevice, key: &Key) -> Result<Option<Plan>> {
    let Some(dt) = data_type(key.dtype) else {
        return Ok(None);
    };
    let [n, c, h, w] = key.x;
    let [k, _, r, s] = key.w;
    let Some(y_dims) = key.output() else {
        return Ok(None);
    };
    // cuDNN's 4-d descriptors index with int: larger tensors stay with candle.
    let limit = c_int::MAX as usize;
    if key.x.iter().product::<usize>() > limit || y_dims.iter().product::<usize>() > limit {
        return Ok(None);
    }
    let stream = dev.cuda_stream();
    let null = std::ptr::null_mut;
    let (mut xd, mut wd, mut cd, mut yd): (Desc, Desc, Desc, Desc) =
        (null(), null(), null(), null());
    // SAFETY: descriptor constructors and setters with out-pointers to locals and plain ints.
    unsafe {
        api.check("tensor descriptor", (api.create_tensor)(&mut xd))?;
        api.check("tensor descriptor", (api.create_tensor)(&mut yd))?;
        api.check("filter descriptor", (api.create_filter)(&mut wd))?;
        api.check("convolution descriptor", (api.create_conv)(&mut cd))?;
        api.check(
            "input shape",
            (api.set_tensor_4d)(xd, NCHW, dt, int(n)?, int(c)?, int(h)?, int(w)?),
        )?;
        api.check(
            "output shape",
            (api.set_tensor_4d)(
                yd,
                NCHW,
                dt,
                int(y_dims[0])?,
                int(y_dims[1])?,
                int(y_dims[2])?,
                int(y_dims[3])?,
            ),
        )?;
        api.check(
            "filter shape",
            (api.set_filter_4d)(wd, dt, NCHW, int(k)?, int(c)?, int(r)?, int(s)?),
        )?;
        let pad = int(key.padding)?;
        let stride = int(key.stride)?;
        // Products and sums in f32 whatever the storage type.
        api.check(
            "convolution",
            (api.set_conv_2d)(
                cd,
                pad,
                pad,
                stride,
                stride,
                1,
                1,
                CROSS_CORRELATION,
                DATA_FLOAT,
            ),
        )?;
        let math = match key.dtype {
            DType::F32 if key.tf32 => DEFAULT_MATH,
            DType::F32 => FMA_MATH,
            _ => TENSOR_OP_MATH,
        };
        api.check("math type", (api.set_conv_math)(cd, math))?;
    }

    let mut perf = [AlgoPerf::default(); ALGORITHMS as usize];
    let mut returned: c_int = 0;
    stream.context().bind_to_thread().w()?;
    // SAFETY: the descriptors were made above; `perf` holds ALGORITHMS entries.
    unsafe {
        api.check(
            "cudnnGetConvolutionForwardAlgorithm_v7",
            (api.get_algorithms)(
                handle,
                xd,
                wd,
                cd,
                yd,
                ALGORITHMS,
                &mut returned,
                perf.as_mut_ptr(),
            ),
        )?;
    }
    let limit = workspace_limit();
    let usable =
        |p: &AlgoPerf| p.status == SUCCESS && p.memory <= limit && p.determinism == DETERMINISTIC;
    let mut candidates: Vec<AlgoPerf> = perf[..returned.clamp(0, ALGORITHMS) as usize]
        .iter()
        .copied()
        .filter(usable)
        .collect();
    if find_mode() && !candidates.is_empty() {
        if let Some(fastest) = find_fastest(api, handle, dev, key, &y_dims, [xd, wd, cd, yd])? {
            candidates.insert(0, fastest);
        }
    }
    let Some(best) = candidates.first() else {
        return Ok(None);
    };
    let mut workspace = 0usize;
    // SAFETY: valid descriptors and an algorithm cuDNN offered for them.
    unsafe {
        api.check(
            "workspace size",
            (api.workspace_size)(handle, xd, wd, cd, yd, best.algo, &mut workspace),
        )?;
    }
    Ok(Some(Plan {
        x: xd,
        w: wd,
        conv: cd,
        y: yd,
        y_dims,
        algo: best.algo,
        workspace,
    }))
}

/// Times every algorithm on scratch buffers of the right sizes (values do not change the time).
fn find_fastest(
    api: &Api,
    handle: Handle,
    dev: &CudaDevice,
    key: &Key,
    y_dims: &[usize; 4],
    [xd, wd, cd, yd]: [Desc; 4],
) -> Result<Option<AlgoPerf>> {
    let bytes = key.dtype.size_in_bytes();
    let stream = dev.cuda_stream();
    let x = dev.alloc_zeros::<u8>(key.x.iter().product::<usize>() * bytes)?;
    let w = dev.alloc_zeros::<u8>(key.w.iter().product::<usize>() * bytes)?;
    let mut y = dev.alloc_zeros::<u8>(y_dims.iter().product::<usize>() * bytes)?;
    let ws_len = workspace_limit().max(1);
    let Ok(mut ws) = dev.alloc_zeros::<u8>(ws_len) else {
        return Ok(None);
    };
    let mut perf = [AlgoPerf::default(); ALGORITHMS as usize];
    let mut returned: c_int = 0;
    {
        let (xp, _gx) = x.device_ptr(&stream);
        let (wp, _gw) = w.device_ptr(&stream);
        let (yp, _gy) = y.device_ptr_mut(&stream);
        let (wsp, _gws) = ws.device_ptr_mut(&stream);
        // SAFETY: buffers sized for these descriptors, on the handle's stream.
        unsafe {
            api.use_stream(handle, &stream)?;
            api.check(
                "cudnnFindConvolutionForwardAlgorithmEx",
                (api.find_algorithms)(
                    handle,
                    xd,
                    xp as *const c_void,
                    wd,
                    wp as *const c_void,
                    cd,
                    yd,
                    yp as *mut c_void,
                    ALGORITHMS,
                    &mut returned,
                    perf.as_mut_ptr(),
                    wsp as *mut c_void,
                    ws_len,
                ),
            )?;
        }
    }
    // Results come sorted by time.
    Ok(perf[..returned.clamp(0, ALGORITHMS) as usize]
        .iter()
        .copied()
        .find(|p| p.status == SUCCESS && p.determinism == DETERMINISTIC))
}

fn key(x: &Tensor, w: &Tensor, stride: usize, padding: usize) -> Result<Option<(Key, CudaDevice)>> {
    let (Ok(xd), Ok(wd)) = (x.dims4(), w.dims4()) else {
        return Ok(None);
    };
    if x.dtype() != w.dtype() || data_type(x.dtype()).is_none() {
        return Ok(None);
    }
    let dev = x.device().as_cuda_device()?.clone();
    let key = Key {
        ordinal: dev.cuda_stream().context().ordinal(),
        dtype: x.dtype(),
        x: [xd.0, xd.1, xd.2, xd.3],
        w: [wd.0, wd.1, wd.2, wd.3],
        stride,
        padding,
        tf32: candle_core::cuda::gemm_reduced_precision_f32(),
    };
    Ok(Some((key, dev)))
}

/// y = conv(x, w) through cuDNN (no bias), or `None` where cuDNN is missing or offers no
/// algorithm for this shape (the caller runs candle's convolution).
pub(super) fn conv2d(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Option<Tensor>> {
    let api = match api() {
        Ok(api) => api,
        Err(why) => {
            static WARNED: OnceLock<()> = OnceLock::new();
            WARNED.get_or_init(|| {
                tracing::warn!("convolutions run on candle's kernels: {why}");
            });
            return Ok(None);
        }
    };
    let Some((key, dev)) = key(x, w, stride, padding)? else {
        return Ok(None);
    };
    if lock()?.plan(api, &dev, key)?.is_none() {
        return Ok(None);
    }
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    x.apply_op2_no_bwd(&w, &Conv { key }).map(Some)
}

/// The algorithm cuDNN runs for this convolution (planning it if needed), for reports.
pub(super) fn algorithm(
    x: &Tensor,
    w: &Tensor,
    stride: usize,
    padding: usize,
) -> Result<Option<&'static str>> {
    let Ok(api) = api() else {
        return Ok(None);
    };
    let Some((key, dev)) = key(x, w, stride, padding)? else {
        return Ok(None);
    };
    Ok(lock()?
        .plan(api, &dev, key)?
        .and_then(|p| ALGO_NAMES.get(p.algo as usize).copied()))
}

struct Conv {
    key: Key,
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "atelier-cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("the cuDNN convolution runs on CUDA only; the CPU takes candle's")
    }

    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let Some([n, k, h, w]) = self.key.output() else {
            candle_core::bail!("convolution {:?} does not fit its input", self.key)
        };
        let slice = self.map(&s1.slice, l1, &s2.slice, l2, dev)?;
        Ok((
            CudaStorage {
                slice,
                device: dev.clone(),
            },
            Shape::from((n, k, h, w)),
        ))
    }
}

impl Map2 for Conv {
    fn f<T: DeviceRepr + WithDType + ValidAsZeroBits>(
        &self,
        x: &CudaSlice<T>,
        xl: &Layout,
        w: &CudaSlice<T>,
        wl: &Layout,
        dev: &CudaDevice,
    ) -> Result<CudaSlice<T>> {
        let x = super::cuda::contiguous(x, xl, "convolution input")?;
        let w = super::cuda::contiguous(w, wl, "convolution weight")?;
        let api = api().map_err(|e| candle_core::Error::Msg(e.into()))?;
        let mut state = lock()?;
        let handle = state.handle(api, dev)?;
        let Some(plan) = state.plan(api, dev, self.key)? else {
            candle_core::bail!("cuDNN offers no algorithm for {:?}", self.key)
        };
        let numel: usize = plan.y_dims.iter().product();
        // SAFETY: cuDNN writes every output element (beta = 0).
        let mut y = unsafe { dev.alloc::<T>(numel)? };
        // SAFETY: scratch space; cuDNN reads nothing it did not write.
        let mut ws = unsafe { dev.alloc::<u8>(plan.workspace.max(1))? };
        let stream = dev.cuda_stream();
        let (alpha, beta) = (1f32, 0f32);
        {
            let (xp, _gx) = x.device_ptr(&stream);
            let (wp, _gw) = w.device_ptr(&stream);
            let (yp, _gy) = y.device_ptr_mut(&stream);
            let (wsp, _gws) = ws.device_ptr_mut(&stream);
            // SAFETY: the plan's descriptors describe these buffers (contiguous NCHW / KCRS of
            // its dtype); alpha and beta are f32 as cuDNN wants for f32/f16/bf16 data; the work
            // is enqueued on candle's stream for this thread.
            unsafe {
                api.use_stream(handle, &stream)?;
                api.check(
                    "cudnnConvolutionForward",
                    (api.forward)(
                        handle,
                        (&alpha as *const f32).cast(),
                        plan.x,
                        xp as *const c_void,
                        plan.w,
                        wp as *const c_void,
                        plan.conv,
                        plan.algo,
                        wsp as *mut c_void,
                        plan.workspace,
                        (&beta as *const f32).cast(),
                        plan.y,
                        yp as *mut c_void,
                    ),
                )?;
            }
        }
        Ok(y)
    }
}
