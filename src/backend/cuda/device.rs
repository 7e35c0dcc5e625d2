//! The GPU handle ([`CudaDevice`]: context, stream, the loaded kernel module) and f32 device
//! storage for tensors ([`CudaStorage`]).
//!
//! One [`CudaDevice`] exists per GPU ordinal in the process (a registry hands out clones), so the
//! embedded fatbin is loaded once per device and kernel handles are looked up once by name.
//! All work goes to one stream per device, in order; that is why cudarc's per-buffer event
//! tracking is switched off (it only pays with several streams). Code that adds streams must
//! synchronise them itself.

use super::decompress::DeviceValues;
use super::kernels::{self, NO_KERNELS};
use crate::error::{Error, Result};
use crate::format::DType;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// Turns a cudarc driver error into the crate's error, saying what was being done.
pub(crate) fn driver_err(what: &'static str) -> impl Fn(DriverError) -> Error {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// A GPU: its context, the stream all work is queued on, and the kernel module.
#[derive(Clone)]
pub struct CudaDevice {
    inner: Arc<Inner>,
}

struct Inner {
    ordinal: usize,
    gpu_name: String,
    compute_capability: (i32, i32),
    /// What this GPU runs (all kernels, or the dense cuBLAS path only).
    arch_mode: ArchMode,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    /// The cuBLAS handle on `stream`, made on first use (or why it could not be).
    blas: OnceLock<std::result::Result<Arc<cudarc::cublas::CudaBlas>, String>>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (major, minor) = self.inner.compute_capability;
        write!(f, "CudaDevice(cuda:{}, {}, sm_{major}{minor})", self.inner.ordinal, self.inner.gpu_name)
    }
}

impl PartialEq for CudaDevice {
    fn eq(&self, other: &Self) -> bool {
        self.inner.ordinal == other.inner.ordinal
    }
}

fn registry() -> &'static Mutex<HashMap<usize, CudaDevice>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, CudaDevice>>> = OnceLock::new();
    DEVICES.get_or_init(|| Mutex::new(HashMap::new()))
}

impl CudaDevice {
    /// The GPU with this ordinal, with the kernels loaded. Errors (never panics) when the crate
    /// was built without CUDA kernels, when no driver or GPU is present, or when the GPU is older
    /// than sm_75 ([`arch_mode`]; 7.5 runs the dense path only).
    pub fn new(ordinal: usize) -> Result<CudaDevice> {
        let mut devices = registry().lock().map_err(|_| Error::Cuda("device registry poisoned".into()))?;
        if let Some(dev) = devices.get(&ordinal) {
            return Ok(dev.clone());
        }
        let dev = Self::open(ordinal)?;
        devices.insert(ordinal, dev.clone());
        Ok(dev)
    }

    fn open(ordinal: usize) -> Result<CudaDevice> {
        let fatbin = kernels::fatbin().ok_or_else(|| Error::Cuda(NO_KERNELS.into()))?;
        // cudarc loads libcuda lazily and panics when it is missing, so look first.
        // SAFETY: only probes whether the shared library can be opened.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::Cuda(
                "no CUDA driver: libcuda.so could not be loaded (is there an NVIDIA GPU and driver?)".into(),
            ));
        }
        // A driver too old for the CUDA 13 API can still make cudarc panic on a missing symbol:
        // turn that into an error too.
        let opened = std::panic::catch_unwind(|| -> Result<(Arc<CudaContext>, (i32, i32), String)> {
            let count =
                CudaContext::device_count().map_err(driver_err("cannot initialise the CUDA driver"))?;
            if ordinal >= count.max(0) as usize {
                return Err(Error::Cuda(format!(
                    "no GPU with ordinal {ordinal}: {count} CUDA device(s) found"
                )));
            }
            let ctx = CudaContext::new(ordinal).map_err(driver_err("cannot create a CUDA context"))?;
            let cc = ctx.compute_capability().map_err(driver_err("cannot query the compute capability"))?;
            let name = ctx.name().map_err(driver_err("cannot query the GPU name"))?;
            Ok((ctx, cc, name))
        });
        let (ctx, compute_capability, gpu_name) = opened.map_err(|_| {
            Error::Cuda(
                "the CUDA driver is missing functions this build needs (driver older than CUDA 13?)".into(),
            )
        })??;
        let arch_mode =
            arch_mode(&gpu_name, compute_capability, std::env::var(ARCH_MODE_ENV).ok().as_deref())?;
        // SAFETY: every buffer of this context is used on `stream` only (module docs).
        unsafe { ctx.disable_event_tracking() };
        // A created (non-blocking) stream, not the legacy default stream: only the former can be
        // captured into a CUDA graph (graph.rs).
        let stream = ctx.new_stream().map_err(driver_err("cannot create a CUDA stream"))?;
        let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(fatbin.to_vec())).map_err(|e| {
            Error::Cuda(format!(
                "cannot load the kernels on {gpu_name}: {e} (the driver must support CUDA {})",
                kernels::nvcc_version()
            ))
        })?;
        Ok(CudaDevice {
            inner: Arc::new(Inner {
                ordinal,
                gpu_name,
                compute_capability,
                arch_mode,
                ctx,
                stream,
                module,
                functions: Mutex::new(HashMap::new()),
                blas: OnceLock::new(),
            }),
        })
    }

    /// `cuda:<ordinal>`.
    pub fn name(&self) -> String {
        format!("cuda:{}", self.inner.ordinal)
    }
    pub fn ordinal(&self) -> usize {
        self.inner.ordinal
    }
    /// The GPU's marketing name, e.g. "NVIDIA H200".
    pub fn gpu_name(&self) -> &str {
        &self.inner.gpu_name
    }
    /// `(major, minor)`, e.g. `(9, 0)` for Hopper.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.compute_capability
    }
    /// What this GPU runs: every kernel, or (below 8.0, or forced by [`ARCH_MODE_ENV`]) the
    /// dense cuBLAS path only.
    pub fn arch_mode(&self) -> ArchMode {
        self.inner.arch_mode
    }
    /// The one line saying this GPU is in the dense-only mode (`None` when it runs everything).
    pub fn arch_note(&self) -> Option<String> {
        self.inner.arch_mode.note(&self.inner.gpu_name, self.inner.compute_capability)
    }
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.inner.ctx
    }
    /// The stream all of this device's work goes to (pass it to cuBLAS handles too).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// The cuBLAS handle of this device (created on first use, bound to [`Self::stream`]).
    /// cuBLAS is loaded dynamically: a missing `libcublas` is this one-line error, not a panic.
    pub fn blas(&self) -> Result<Arc<cudarc::cublas::CudaBlas>> {
        let made = self.inner.blas.get_or_init(|| {
            // SAFETY: only probes whether the shared library can be opened.
            if !unsafe { cudarc::cublas::sys::is_culib_present() } {
                return Err("cuBLAS could not be loaded (libcublas.so.13 not found; install the CUDA 13 \
                            runtime libraries, e.g. pip install nvidia-cublas)"
                    .to_string());
            }
            let stream = self.inner.stream.clone();
            match std::panic::catch_unwind(move || cudarc::cublas::CudaBlas::new(stream)) {
                Ok(Ok(b)) => Ok(Arc::new(b)),
                Ok(Err(e)) => Err(format!("cannot create a cuBLAS handle: {e}")),
                Err(_) => {
                    Err("cuBLAS is missing functions this build needs (older than CUDA 13?)".to_string())
                }
            }
        });
        made.clone().map_err(Error::Cuda)
    }

    /// A kernel of the embedded fatbin by its `extern "C"` name (looked up once, then cached).
    pub fn function(&self, name: &str) -> Result<CudaFunction> {
        let mut functions =
            self.inner.functions.lock().map_err(|_| Error::Cuda("kernel cache poisoned".into()))?;
        if let Some(f) = functions.get(name) {
            return Ok(f.clone());
        }
        let f = self
            .inner
            .module
            .load_function(name)
            .map_err(|e| Error::Cuda(format!("kernel {name} is not in the fatbin: {e}")))?;
        functions.insert(name.to_string(), f.clone());
        Ok(f)
    }

    /// Launches a kernel that takes one parameter struct by value (the convention of every
    /// kernel in `cuda/`, see `params.rs`).
    ///
    /// # Safety
    /// The device pointers inside `params` must point to live allocations of this device that are
    /// large enough for what the kernel reads and writes with these sizes, and `cfg` must be a
    /// launch shape the kernel supports.
    pub unsafe fn launch<P: DeviceRepr>(&self, kernel: &str, cfg: LaunchConfig, params: &P) -> Result<()> {
        let f = self.function(kernel)?;
        let mut builder = self.stream().launch_builder(&f);
        builder.arg(params);
        builder.launch(cfg).map(|_| ()).map_err(|e| Error::Cuda(format!("launch of {kernel} failed: {e}")))
    }

    /// `(free, total)` bytes of GPU memory.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.inner.ctx.bind_to_thread().map_err(driver_err("cannot bind the CUDA context"))?;
        cudarc::driver::result::mem_get_info().map_err(driver_err("cannot query GPU memory"))
    }

    /// The error of a failed allocation of `bytes`: out-of-memory says how much was needed and
    /// how much is free, in one line ([`oom_message`]).
    fn alloc_error(&self, bytes: usize) -> impl Fn(DriverError) -> Error + '_ {
        move |e| {
            if e.0 == cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                Error::Cuda(oom_message(&self.inner.gpu_name, bytes, self.memory_info().ok()))
            } else {
                Error::Cuda(format!("device allocation of {bytes} bytes failed: {e}"))
            }
        }
    }

    /// Waits for all queued work; reports errors of earlier asynchronous launches.
    pub fn synchronize(&self) -> Result<()> {
        self.stream().synchronize().map_err(driver_err("kernel execution failed"))
    }

    /// The raw device address of a buffer, for parameter structs.
    pub fn device_ptr<T>(&self, buf: &impl DevicePtr<T>) -> u64 {
        // Event tracking is off, so the returned guard has nothing to record.
        let (ptr, _guard) = buf.device_ptr(self.stream());
        ptr
    }
    /// The raw device address of a buffer the kernel writes.
    pub fn device_ptr_mut<T>(&self, buf: &mut impl DevicePtrMut<T>) -> u64 {
        let (ptr, _guard) = buf.device_ptr_mut(self.stream());
        ptr
    }

    /// Copies host data to a new device buffer.
    pub fn htod<T: DeviceRepr>(&self, data: &[T]) -> Result<CudaSlice<T>> {
        if data.is_empty() {
            return Err(Error::Cuda("cannot allocate an empty device buffer".into()));
        }
        self.stream().clone_htod(data).map_err(self.alloc_error(std::mem::size_of_val(data)))
    }
    /// Copies a device buffer to a new host vector (waits for queued work first).
    pub fn dtoh<T: DeviceRepr>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        let host = self.stream().clone_dtoh(buf).map_err(driver_err("device to host copy failed"))?;
        self.synchronize()?;
        Ok(host)
    }
    /// A new zero-filled device buffer of `len` elements.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        if len == 0 {
            return Err(Error::Cuda("cannot allocate an empty device buffer".into()));
        }
        self.stream().alloc_zeros(len).map_err(self.alloc_error(len * std::mem::size_of::<T>()))
    }
    /// A new device buffer of `len` elements whose every byte is 0xFF: NaN for f32, f16 and bf16,
    /// so a test that finds an element the kernel never wrote sees a NaN.
    pub fn alloc_poisoned<T: DeviceRepr>(&self, len: usize) -> Result<CudaSlice<T>> {
        if len == 0 {
            return Err(Error::Cuda("cannot allocate an empty device buffer".into()));
        }
        // SAFETY: the memory is fully initialised by the memset right after.
        let mut buf = unsafe { self.stream().alloc::<T>(len) }
            .map_err(self.alloc_error(len * std::mem::size_of::<T>()))?;
        self.fill_bytes(&mut buf, 0xFF)?;
        Ok(buf)
    }
    /// Sets every byte of `buf` to `byte` (stream-ordered).
    pub fn fill_bytes<T>(&self, buf: &mut CudaSlice<T>, byte: u8) -> Result<()> {
        let bytes = buf.num_bytes();
        let ptr = self.device_ptr_mut(buf);
        // SAFETY: `ptr` addresses `bytes` bytes of a live allocation of this context.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, bytes, self.stream().cu_stream()) }
            .map_err(driver_err("device memset failed"))
    }
}

/// The oldest GPU admitted: CUDA 13, which builds the kernels, has no target older than sm_75
/// (Turing: T4, RTX 20xx), so on a 7.0 / 7.2 (Volta) GPU not one of our kernels loads, and with
/// them goes every non-GEMM op of the pipeline (norms, activations, softmax, im2col are ours).
/// Such a GPU is refused with one line naming the minimum (`--device auto` then runs on the CPU
/// with that line as its note; docs/CUDA.md).
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (7, 5);

/// The first compute capability that runs every kernel: the sparse GEMMs and the flash
/// attention use sm_80 instructions (mma.sync m16n8k16, mma.sp, cp.async); for sm_75 they are
/// built as traps (`cuda/include/sdsparse_arch.h`) and never launched.
pub const FULL_COMPUTE_CAPABILITY: (i32, i32) = (8, 0);

/// The environment variable that forces [`ArchMode::DenseOnly`] on any GPU (`dense-only`), so
/// the dense-only routing can be tested on an sm_80+ GPU; `auto` or unset: by the compute
/// capability.
pub const ARCH_MODE_ENV: &str = "SDSPARSE_GPU_ARCH_MODE";

/// What a GPU runs, by its compute capability ([`arch_mode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchMode {
    /// sm_80 and newer (8.0 / 8.6 / 8.9 / 9.0 by SASS, 10.x / 12.x by the compute_80 PTX): every
    /// kernel: the 2:4 and unstructured sparse GEMMs, the flash attention.
    Full,
    /// sm_75 (or [`ARCH_MODE_ENV`]`=dense-only`): no tensor-core kernel of ours runs. Sparse
    /// Linear weights are expanded to dense at load (`model::linear::place_weight`), every
    /// Linear and matmul runs on cuBLAS(Lt), attention on the scores path (cuBLAS batched GEMM
    /// + our f32 softmax); norms, activations and tensor kernels are ours as on any GPU.
    DenseOnly {
        /// Chosen by [`ARCH_MODE_ENV`] on a GPU that could run everything.
        forced: bool,
    },
}

impl ArchMode {
    /// Whether the sparse GEMM kernels (2:4, unstructured) may run.
    pub fn sparse_kernels(self) -> bool {
        self == ArchMode::Full
    }
    /// Whether the flash attention kernel may run.
    pub fn flash_attention(self) -> bool {
        self == ArchMode::Full
    }
    /// The one line `generate` prints for a dense-only GPU (`None` for [`ArchMode::Full`]).
    pub fn note(self, gpu: &str, cc: (i32, i32)) -> Option<String> {
        let what = "sparse weights are expanded to dense and run on cuBLAS; attention uses cuBLAS + softmax";
        match self {
            ArchMode::Full => None,
            ArchMode::DenseOnly { forced: false } => {
                Some(format!("GPU: {gpu} (sm_{}{}) is below 8.0: {what}", cc.0, cc.1))
            }
            ArchMode::DenseOnly { forced: true } => Some(format!(
                "GPU: {gpu} (sm_{}{}) in dense-only mode ({ARCH_MODE_ENV}=dense-only): {what}",
                cc.0, cc.1
            )),
        }
    }
}

/// The mode of a GPU of compute capability `cc` (`forced`: the value of [`ARCH_MODE_ENV`]), or
/// the one-line refusal of a GPU older than [`MIN_COMPUTE_CAPABILITY`] or of a bad override.
/// A pure function of its arguments, so the decision is unit-tested without a GPU.
pub fn arch_mode(gpu: &str, cc: (i32, i32), forced: Option<&str>) -> Result<ArchMode> {
    if cc < MIN_COMPUTE_CAPABILITY {
        return Err(Error::Cuda(format!(
            "{gpu} has compute capability {}.{}; CUDA 13, which builds sdsparse's kernels, supports 7.5 (Turing) \
             or newer, and without the kernels no GPU path can run (use --device cpu)",
            cc.0, cc.1
        )));
    }
    let by_capability =
        if cc < FULL_COMPUTE_CAPABILITY { ArchMode::DenseOnly { forced: false } } else { ArchMode::Full };
    match forced.map(str::trim) {
        None | Some("") | Some("auto") => Ok(by_capability),
        Some("dense-only") => Ok(ArchMode::DenseOnly { forced: by_capability == ArchMode::Full }),
        Some(other) => Err(Error::Cuda(format!("{ARCH_MODE_ENV} must be auto or dense-only, got {other:?}"))),
    }
}

/// Refuses activations a GPU cannot compute in: bf16 needs 8.0 (Turing has no bf16 tensor
/// cores; cuBLAS / cuDNN bf16 there is unverified and would be emulated), so below it `--dtype
/// bf16` is one line naming the alternatives. f16 and f32 run everywhere.
pub fn check_activation_dtype(gpu: &str, cc: (i32, i32), dtype: DType) -> Result<()> {
    if dtype == DType::BF16 && cc < FULL_COMPUTE_CAPABILITY {
        return Err(Error::Invalid(format!(
            "--dtype bf16 needs compute capability 8.0 (Ampere) or newer; {gpu} has {}.{} (use --dtype f16 or f32)",
            cc.0, cc.1
        )));
    }
    Ok(())
}

/// The one-line out-of-GPU-memory error: the GPU, the bytes a failed allocation asked for, and
/// `(free, total)` when the driver could still say.
pub(crate) fn oom_message(gpu: &str, bytes: usize, free_total: Option<(usize, usize)>) -> String {
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    let free = match free_total {
        Some((free, total)) => format!("{:.1} MiB of {:.1} MiB free", mib(free), mib(total)),
        None => "free memory unknown".into(),
    };
    format!(
        "out of GPU memory on {gpu}: {:.1} MiB more needed, {free} (try a smaller --width / --height)",
        mib(bytes)
    )
}

/// Tensor data on a GPU: a typed buffer ([`DeviceValues`]; f32 is what the ops produce today,
/// f16 / bf16 storage is the next step). Cloning shares the buffer (tensors are immutable once
/// made).
#[derive(Clone)]
pub struct CudaStorage {
    device: CudaDevice,
    data: Arc<DeviceValues>,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CudaStorage({} {} on {})", self.data.len(), self.data.dtype().name(), self.device.name())
    }
}

impl CudaStorage {
    /// Wraps an f32 device buffer (e.g. a kernel's output).
    pub fn from_slice(device: &CudaDevice, data: CudaSlice<f32>) -> CudaStorage {
        Self::from_values(device, DeviceValues::F32(data))
    }
    /// Wraps a typed device buffer.
    pub fn from_values(device: &CudaDevice, data: DeviceValues) -> CudaStorage {
        CudaStorage { device: device.clone(), data: Arc::new(data) }
    }
    /// Copies host values to the device (f32).
    pub fn from_host(device: &CudaDevice, data: &[f32]) -> Result<CudaStorage> {
        Ok(Self::from_slice(device, device.htod(data)?))
    }
    pub fn device(&self) -> CudaDevice {
        self.device.clone()
    }
    /// The storage element type.
    pub fn dtype(&self) -> DType {
        self.data.dtype()
    }
    /// The typed device buffer, for launchers.
    pub fn values(&self) -> &DeviceValues {
        &self.data
    }
    /// The f32 device buffer, for launchers that take f32 only (cuBLAS SGEMM).
    pub fn slice(&self) -> Result<&CudaSlice<f32>> {
        match self.data.as_ref() {
            DeviceValues::F32(s) => Ok(s),
            other => Err(Error::Cuda(format!("expected f32 device storage, found {}", other.dtype().name()))),
        }
    }
    pub fn len(&self) -> usize {
        self.data.len()
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Copies the values to the host, widened to f32.
    pub fn to_host(&self) -> Result<Vec<f32>> {
        Ok(self.data.to_host(&self.device)?.to_f32())
    }
}

#[cfg(test)]
mod tests {
    use super::{arch_mode, check_activation_dtype, ArchMode, ARCH_MODE_ENV};
    use crate::format::DType;

    const FULL: ArchMode = ArchMode::Full;
    const DENSE: ArchMode = ArchMode::DenseOnly { forced: false };
    const FORCED: ArchMode = ArchMode::DenseOnly { forced: true };

    #[test]
    fn volta_is_refused_in_one_line_naming_cuda_13s_minimum() {
        for (gpu, cc) in [("Tesla V100", (7, 0)), ("Jetson AGX Xavier", (7, 2)), ("Tesla P100", (6, 0))] {
            let e = arch_mode(gpu, cc, None).unwrap_err().to_string();
            let shown = format!("{}.{}", cc.0, cc.1);
            assert!(e.contains(gpu) && e.contains(&shown) && e.contains("7.5"), "{e}");
            assert!(e.contains("CUDA 13") && e.contains("--device cpu") && !e.contains('\n'), "{e}");
            // Forcing a mode does not admit it either.
            assert!(arch_mode(gpu, cc, Some("dense-only")).is_err());
        }
    }

    #[test]
    fn turing_runs_dense_only_and_ampere_or_newer_everything() {
        assert_eq!(arch_mode("Tesla T4", (7, 5), None).unwrap(), DENSE);
        // SASS for 8.0 / 8.6 / 8.9 / 9.0; 10.x and 12.x JIT the compute_80 PTX.
        for cc in [(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)] {
            assert_eq!(arch_mode("GPU", cc, None).unwrap(), FULL, "{cc:?}");
            assert_eq!(arch_mode("GPU", cc, Some("auto")).unwrap(), FULL, "{cc:?}");
        }
        let t4 = arch_mode("Tesla T4", (7, 5), None).unwrap();
        assert!(!t4.sparse_kernels() && !t4.flash_attention());
        assert!(FULL.sparse_kernels() && FULL.flash_attention());
    }

    #[test]
    fn the_override_forces_dense_only_and_nothing_else() {
        assert_eq!(arch_mode("NVIDIA H200", (9, 0), Some("dense-only")).unwrap(), FORCED);
        assert_eq!(arch_mode("NVIDIA H200", (9, 0), Some(" dense-only ")).unwrap(), FORCED);
        // On a GPU that is dense-only anyway, the override changes nothing (not "forced").
        assert_eq!(arch_mode("Tesla T4", (7, 5), Some("dense-only")).unwrap(), DENSE);
        assert_eq!(arch_mode("NVIDIA H200", (9, 0), Some("")).unwrap(), FULL);
        // Full cannot be forced on a Turing GPU, and a typo is an error, not silently ignored.
        for bad in ["full", "dense", "sparse"] {
            let e = arch_mode("NVIDIA H200", (9, 0), Some(bad)).unwrap_err().to_string();
            assert!(e.contains(ARCH_MODE_ENV) && e.contains(bad) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn dense_only_says_so_in_one_line() {
        let n = DENSE.note("Tesla T4", (7, 5)).unwrap();
        assert_eq!(
            n,
            "GPU: Tesla T4 (sm_75) is below 8.0: sparse weights are expanded to dense and run on cuBLAS; \
             attention uses cuBLAS + softmax"
        );
        let f = FORCED.note("NVIDIA H200", (9, 0)).unwrap();
        assert!(f.contains("sm_90") && f.contains(ARCH_MODE_ENV) && !f.contains('\n'), "{f}");
        assert_eq!(FULL.note("NVIDIA H200", (9, 0)), None);
    }

    #[test]
    fn bf16_below_8_0_is_refused_in_one_line() {
        let e = check_activation_dtype("Tesla T4", (7, 5), DType::BF16).unwrap_err().to_string();
        assert!(
            e.contains("bf16") && e.contains("Tesla T4") && e.contains("7.5") && e.contains("8.0"),
            "{e}"
        );
        assert!(!e.contains('\n'));
        for dtype in [DType::F16, DType::F32] {
            assert!(check_activation_dtype("Tesla T4", (7, 5), dtype).is_ok());
        }
        for cc in [(8, 0), (8, 9), (9, 0), (12, 0)] {
            assert!(check_activation_dtype("GPU", cc, DType::BF16).is_ok());
        }
    }

    use super::oom_message;

    #[test]
    fn out_of_memory_is_one_line_with_needed_and_free() {
        let m = oom_message("NVIDIA H200", 3 << 30, Some((1 << 29, 141 << 30)));
        assert_eq!(
            m,
            "out of GPU memory on NVIDIA H200: 3072.0 MiB more needed, 512.0 MiB of 144384.0 MiB free \
             (try a smaller --width / --height)"
        );
        assert!(!m.contains('\n'));
        assert!(oom_message("GPU", 1 << 20, None).contains("1.0 MiB more needed, free memory unknown"));
    }
}
