//! Dense Linear layers through cuBLASLt: `y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n])`, the bias
//! (and optionally GELU) fused into the GEMM as cuBLASLt epilogues, so a Linear is one launch
//! instead of SGEMM + the broadcast-add kernel.
//!
//! Dtype-generic: activations and weight in f32, f16 or bf16 (`x_dtype`, both the same), output
//! in that dtype or f32, always f32 accumulation and f32 alpha / beta (`CUBLAS_COMPUTE_32F`:
//! for f32 operands that is full f32, no TF32, so the f32 pipeline stays within 1e-4 of the CPU).
//! The bias has the output's dtype (cuBLASLt's default bias type).
//!
//! Row-major to cuBLASLt's column-major, as in `blas.rs`: row-major `y[m, n]` is column-major
//! `yᵀ` (n x m, ld n) `= W · xᵀ` where row-major `W[n, k]` is column-major k x n (ld k) used
//! transposed and row-major `x[m, k]` is column-major k x m (ld k). The bias then runs along
//! the rows of D (one value per output feature), which is cuBLASLt's bias broadcast.
//!
//! GELU: cuBLASLt's `CUBLASLT_EPILOGUE_GELU_BIAS` computes the **tanh approximation**
//! `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (what PyTorch's `_addmm_activation` falls back
//! to for the same epilogue), which differs from SD2's exact erf GELU by up to 4.7e-4. The
//! pipeline therefore uses the bias epilogue and our exact GELU kernel; [`Epilogue::GeluTanhBias`]
//! is for models whose activation is the tanh form (`gelu_pytorch_tanh`), tested against it.
//!
//! [`plan_lt_linear`] checks everything that can be checked without a GPU (unit-tested below);
//! [`lt_linear`] returns [`LtRun::NotSupported`] when cuBLASLt has no algorithm for a layout,
//! and the caller (`ops::linear`) then runs SGEMM + the bias kernel and records why.

use super::decompress::DeviceValues;
use super::device::CudaDevice;
use crate::error::{Error, Result};
use crate::format::DType;
use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::CudaSlice;
use std::collections::HashMap;

/// What cuBLASLt applies to the product before storing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// `y = x · Wᵀ`.
    None,
    /// `y = x · Wᵀ + bias`.
    Bias,
    /// `y = gelu_tanh(x · Wᵀ + bias)` (the tanh approximation, see the module docs).
    GeluTanhBias,
}

impl Epilogue {
    fn has_bias(self) -> bool {
        !matches!(self, Epilogue::None)
    }
    fn sys(self) -> sys::cublasLtEpilogue_t {
        match self {
            Epilogue::None => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            Epilogue::Bias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            Epilogue::GeluTanhBias => sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS,
        }
    }
}

/// One Linear: `y[m, n] = epilogue(x[m, k] · W[n, k]ᵀ (+ bias[n]))`, packed row-major operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LtLinear {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    /// The dtype of `x` and `W`.
    pub x_dtype: DType,
    /// The dtype of `y` (and of the bias): `x_dtype` or f32.
    pub y_dtype: DType,
    pub epilogue: Epilogue,
}

/// A column-major matrix layout: rows, columns, leading dimension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub rows: u64,
    pub cols: u64,
    pub ld: i64,
}

/// The cuBLASLt call for an [`LtLinear`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LtPlan {
    pub in_type: sys::cudaDataType_t,
    pub out_type: sys::cudaDataType_t,
    pub compute: sys::cublasComputeType_t,
    /// cuBLASLt's A (our W, used transposed), B (our x), D (our y).
    pub a: Layout,
    pub b: Layout,
    pub d: Layout,
    pub epilogue: sys::cublasLtEpilogue_t,
}

fn cuda_type(d: DType) -> sys::cudaDataType_t {
    match d {
        DType::F32 => sys::cudaDataType_t::CUDA_R_32F,
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

/// Maps `l` to cuBLASLt and checks it against the operand lengths and the bias (its dtype and
/// length) without a GPU.
pub fn plan_lt_linear(
    l: &LtLinear,
    x_len: usize,
    w_len: usize,
    y_len: usize,
    bias: Option<(DType, usize)>,
) -> Result<LtPlan> {
    if l.m == 0 || l.n == 0 || l.k == 0 {
        return Err(Error::Invalid(format!("cuBLASLt linear: empty product {l:?}")));
    }
    if l.y_dtype != l.x_dtype && l.y_dtype != DType::F32 {
        return Err(Error::Invalid(format!(
            "cuBLASLt linear: {} inputs give {} or f32 outputs, not {}",
            l.x_dtype.name(),
            l.x_dtype.name(),
            l.y_dtype.name()
        )));
    }
    match (l.epilogue.has_bias(), bias) {
        (true, None) => {
            return Err(Error::Invalid(format!("cuBLASLt linear: epilogue {:?} needs a bias", l.epilogue)))
        }
        (false, Some(_)) => {
            return Err(Error::Invalid("cuBLASLt linear: a bias needs a bias epilogue".into()));
        }
        (true, Some((dt, len))) => {
            if dt != l.y_dtype {
                return Err(Error::Invalid(format!(
                    "cuBLASLt linear: the bias is {}, the output {} (they must match)",
                    dt.name(),
                    l.y_dtype.name()
                )));
            }
            if len != l.n {
                return Err(Error::Shape(format!("cuBLASLt linear: bias of {len} for {} outputs", l.n)));
            }
        }
        (false, None) => {}
    }
    let overflow = || Error::Invalid(format!("cuBLASLt linear: {l:?} overflows"));
    for (name, a, b, have) in [("x", l.m, l.k, x_len), ("W", l.n, l.k, w_len), ("y", l.m, l.n, y_len)] {
        let need = a.checked_mul(b).ok_or_else(overflow)?;
        if have < need {
            return Err(Error::Shape(format!(
                "cuBLASLt linear: operand {name} holds {have} elements, the product needs {need}"
            )));
        }
    }
    // The same int limit as the SGEMM path (cuBLASLt takes 64-bit sizes, its kernels index in
    // 32 bits per dimension).
    for (name, v) in [("m", l.m), ("n", l.n), ("k", l.k)] {
        if v > i32::MAX as usize {
            return Err(Error::Invalid(format!(
                "cuBLASLt linear: {name} = {v} is too large (limit 2^31 - 1)"
            )));
        }
    }
    let (m, n, k) = (l.m as u64, l.n as u64, l.k as u64);
    Ok(LtPlan {
        in_type: cuda_type(l.x_dtype),
        out_type: cuda_type(l.y_dtype),
        compute: sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        // W[n, k] row-major = k x n column-major, ld k; op T makes it n x k.
        a: Layout { rows: k, cols: n, ld: k as i64 },
        // x[m, k] row-major = k x m column-major, ld k.
        b: Layout { rows: k, cols: m, ld: k as i64 },
        // y[m, n] row-major = n x m column-major, ld n.
        d: Layout { rows: n, cols: m, ld: n as i64 },
        epilogue: l.epilogue.sys(),
    })
}

/// The alignment cuBLASLt may assume for a device address: the largest power of two dividing
/// it, capped at 256 (cuBLASLt's default assumption is 256, so an operand at an offset must
/// say less or a vectorised kernel could read across it).
pub fn alignment(ptr: u64) -> u32 {
    if ptr == 0 {
        return 256;
    }
    (1u64 << ptr.trailing_zeros().min(8)) as u32
}

/// The result of [`lt_linear`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LtRun {
    Ran,
    /// cuBLASLt has no algorithm for this layout / epilogue: run the fallback.
    NotSupported(String),
}

/// A cuBLASLt handle and its workspace on one device.
pub struct LtHandle {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    /// The heuristic's choice per problem (None: cuBLASLt said NOT_SUPPORTED), with the
    /// operands' alignment, which the choice depends on.
    algos: HashMap<(LtLinear, [u32; 4]), Option<sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: the handle is used only behind the per-device Mutex in `libs.rs`, on the device's one
// stream.
unsafe impl Send for LtHandle {}

const LT_SYMBOLS: &[&str] = &[
    "cublasLtCreate",
    "cublasLtDestroy",
    "cublasLtMatmul",
    "cublasLtMatmulDescCreate",
    "cublasLtMatmulDescSetAttribute",
    "cublasLtMatmulDescDestroy",
    "cublasLtMatrixLayoutCreate",
    "cublasLtMatrixLayoutDestroy",
    "cublasLtMatmulPreferenceCreate",
    "cublasLtMatmulPreferenceSetAttribute",
    "cublasLtMatmulPreferenceDestroy",
    "cublasLtMatmulAlgoGetHeuristic",
];

/// Whether cuBLASLt can be used here, without a GPU: the library loads and has every symbol we
/// call; otherwise why not (one line). Never panics.
pub fn probe() -> std::result::Result<(), String> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err("cuBLASLt could not be loaded (libcublasLt.so.13 not found)".into());
    }
    // SAFETY: the library is present (checked above), so culib() does not panic.
    if let Some(s) = super::libs::missing_symbol!(unsafe { sys::culib() }, LT_SYMBOLS) {
        return Err(format!("cuBLASLt lacks {s} (older than CUDA 13?)"));
    }
    Ok(())
}

impl LtHandle {
    /// Loads cuBLASLt ([`probe`]) and makes a handle and workspace (32 MiB on Hopper, 4 MiB
    /// before, as NVIDIA recommends); any failure is the reason string, never a panic.
    pub fn new(dev: &CudaDevice) -> std::result::Result<LtHandle, String> {
        probe()?;
        dev.context().bind_to_thread().map_err(|e| format!("cannot bind the CUDA context: {e}"))?;
        let handle = std::panic::catch_unwind(lt::create_handle)
            .map_err(|_| "cuBLASLt panicked while creating a handle".to_string())?
            .map_err(|e| format!("cannot create a cuBLASLt handle: {e}"))?;
        let size = if dev.compute_capability().0 >= 9 { 32 << 20 } else { 4 << 20 };
        let workspace = match dev.alloc_zeros::<u8>(size) {
            Ok(w) => w,
            Err(e) => {
                // SAFETY: made just above, not used.
                let _ = unsafe { lt::destroy_handle(handle) };
                return Err(format!("cannot allocate the cuBLASLt workspace: {e}"));
            }
        };
        Ok(LtHandle { handle, workspace, algos: HashMap::new() })
    }
}

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: made in `new`, destroyed once.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Owned cuBLASLt descriptors, destroyed on drop (also on an early error return).
struct Desc(sys::cublasLtMatmulDesc_t);
struct MatLayout(sys::cublasLtMatrixLayout_t);
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by cublasLtMatmulDescCreate, destroyed once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
impl Drop for MatLayout {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

fn lt_err(what: &str) -> impl Fn(lt::CublasError) -> Error + '_ {
    move |e| Error::Cuda(format!("cuBLASLt {what}: {e}"))
}

/// The matmul descriptor (f32 compute and scale, W transposed, the epilogue and bias pointer)
/// and the A / B / D layouts of a plan. Host-only cuBLASLt calls: no GPU needed.
fn descriptors(p: &LtPlan, bias_ptr: Option<u64>) -> Result<(Desc, MatLayout, MatLayout, MatLayout)> {
    let desc =
        Desc(lt::create_matmul_desc(p.compute, sys::cudaDataType_t::CUDA_R_32F).map_err(lt_err("desc"))?);
    let set = |attr, ptr: *const std::ffi::c_void, size| {
        // SAFETY: `desc` is live; `ptr` points to `size` bytes of the attribute's type.
        unsafe { lt::set_matmul_desc_attribute(desc.0, attr, ptr, size) }.map_err(lt_err("desc attribute"))
    };
    use sys::cublasLtMatmulDescAttributes_t as A;
    // cublasOperation_t (an int): CUBLAS_OP_N = 0, CUBLAS_OP_T = 1.
    let (trans, no_trans) = (1i32, 0i32);
    let sz = std::mem::size_of::<i32>();
    set(A::CUBLASLT_MATMUL_DESC_TRANSA, &trans as *const _ as *const _, sz)?;
    set(A::CUBLASLT_MATMUL_DESC_TRANSB, &no_trans as *const _ as *const _, sz)?;
    set(
        A::CUBLASLT_MATMUL_DESC_EPILOGUE,
        &p.epilogue as *const _ as *const _,
        std::mem::size_of_val(&p.epilogue),
    )?;
    if let Some(bp) = bias_ptr {
        set(A::CUBLASLT_MATMUL_DESC_BIAS_POINTER, &bp as *const u64 as *const _, std::mem::size_of::<u64>())?;
    }
    let layout = |t, lay: Layout| -> Result<MatLayout> {
        Ok(MatLayout(lt::create_matrix_layout(t, lay.rows, lay.cols, lay.ld).map_err(lt_err("layout"))?))
    };
    let (la, lb, ld) = (layout(p.in_type, p.a)?, layout(p.in_type, p.b)?, layout(p.out_type, p.d)?);
    Ok((desc, la, lb, ld))
}

/// The heuristic's preferences: the workspace it may use and the operands' real alignment.
fn preference(ws: usize, aligns: [u32; 4]) -> Result<Pref> {
    let pref = Pref(lt::create_matmul_pref().map_err(lt_err("preference"))?);
    use sys::cublasLtMatmulPreferenceAttributes_t as P;
    let set_pref = |attr, ptr: *const std::ffi::c_void, size| {
        // SAFETY: `pref` is live; `ptr` points to `size` bytes of the attribute's type.
        unsafe { lt::set_matmul_pref_attribute(pref.0, attr, ptr, size) }.map_err(lt_err("preference"))
    };
    set_pref(P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws as *const usize as *const _, 8)?;
    for (attr, a) in [
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
        P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
    ]
    .into_iter()
    .zip(aligns)
    {
        set_pref(attr, &a as *const u32 as *const _, 4)?;
    }
    Ok(pref)
}

/// `y = epilogue(x · Wᵀ (+ bias))` on `h`'s device (see [`LtLinear`]); `y` is overwritten.
pub fn lt_linear(
    dev: &CudaDevice,
    h: &mut LtHandle,
    l: &LtLinear,
    x: &DeviceValues,
    w: &DeviceValues,
    bias: Option<&DeviceValues>,
    y: &mut DeviceValues,
) -> Result<LtRun> {
    for (name, v, want) in [("x", x, l.x_dtype), ("W", w, l.x_dtype), ("y", &*y, l.y_dtype)] {
        if v.dtype() != want {
            return Err(Error::Invalid(format!(
                "cuBLASLt linear: {name} is {}, the plan says {}",
                v.dtype().name(),
                want.name()
            )));
        }
    }
    let p = plan_lt_linear(l, x.len(), w.len(), y.len(), bias.map(|b| (b.dtype(), b.len())))?;
    let (a_ptr, b_ptr, d_ptr) = (w.device_ptr(dev), x.device_ptr(dev), y.device_ptr(dev));
    let bias_ptr = bias.map(|b| b.device_ptr(dev));
    if let Some(bp) = bias_ptr {
        if alignment(bp) < 16 {
            return Ok(LtRun::NotSupported(format!("bias at {bp:#x} is not 16-byte aligned")));
        }
    }
    let aligns = [alignment(a_ptr), alignment(b_ptr), alignment(d_ptr), alignment(d_ptr)];
    dev.context().bind_to_thread().map_err(super::device::driver_err("cannot bind the CUDA context"))?;

    let (desc, la, lb, ld) = descriptors(&p, bias_ptr)?;

    let key = (*l, aligns);
    let algo = match h.algos.get(&key) {
        Some(a) => *a,
        None => {
            let pref = preference(h.workspace.len(), aligns)?;
            // SAFETY: every descriptor is live; C and D share one layout (beta = 0).
            let found =
                unsafe { lt::get_matmul_algo_heuristic(h.handle, desc.0, la.0, lb.0, ld.0, ld.0, pref.0) };
            let algo = match found {
                Ok(r) => Some(r.algo),
                Err(lt::CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => None,
                Err(e) => return Err(Error::Cuda(format!("cuBLASLt heuristic for {l:?}: {e}"))),
            };
            h.algos.insert(key, algo);
            algo
        }
    };
    let Some(algo) = algo else {
        return Ok(LtRun::NotSupported(format!(
            "cuBLASLt has no algorithm for {} x {} x {} {} -> {} with {:?} (NOT_SUPPORTED)",
            l.m,
            l.n,
            l.k,
            l.x_dtype.name(),
            l.y_dtype.name(),
            l.epilogue
        )));
    };
    let (alpha, beta) = (1.0f32, 0.0f32);
    let ws_ptr = dev.device_ptr(&h.workspace);
    // SAFETY: plan_lt_linear checked that x, W and y hold the m·k, n·k and m·n elements the
    // product reads and writes and that the bias holds n; the handle, descriptors and workspace
    // are live; the stream is the device's one stream, which orders this call after the kernels
    // that produced x.
    let ran = unsafe {
        lt::matmul(
            h.handle,
            desc.0,
            &alpha as *const f32 as *const _,
            &beta as *const f32 as *const _,
            a_ptr as *const _,
            la.0,
            b_ptr as *const _,
            lb.0,
            d_ptr as *const _,
            ld.0,
            d_ptr as *mut _,
            ld.0,
            &algo,
            ws_ptr as *mut _,
            h.workspace.len(),
            dev.stream().cu_stream() as sys::cudaStream_t,
        )
    };
    match ran {
        Ok(()) => Ok(LtRun::Ran),
        Err(lt::CublasError(sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => {
            Ok(LtRun::NotSupported(format!("cublasLtMatmul refused {l:?} (NOT_SUPPORTED)")))
        }
        Err(e) => Err(Error::Cuda(format!("cuBLASLt matmul {l:?} failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu;
    use crate::backend::test_util::{check_close, dtype_tolerances as tolerances, host_data, TestRng};
    use crate::backend::Device;
    use crate::test_device;

    fn lin(m: usize, n: usize, k: usize, epilogue: Epilogue) -> LtLinear {
        LtLinear { m, n, k, x_dtype: DType::F32, y_dtype: DType::F32, epilogue }
    }

    #[test]
    fn plans_map_row_major_linear_to_cublaslt() {
        let p = plan_lt_linear(
            &lin(154, 96, 64, Epilogue::Bias),
            154 * 64,
            96 * 64,
            154 * 96,
            Some((DType::F32, 96)),
        )
        .unwrap();
        assert_eq!(p.a, Layout { rows: 64, cols: 96, ld: 64 });
        assert_eq!(p.b, Layout { rows: 64, cols: 154, ld: 64 });
        assert_eq!(p.d, Layout { rows: 96, cols: 154, ld: 96 });
        assert_eq!(p.epilogue, sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS);
        // Full f32 accumulation, never TF32, whatever the storage.
        assert_eq!(p.compute, sys::cublasComputeType_t::CUBLAS_COMPUTE_32F);
        // f16 in, f32 out (what the f16 pipeline needs for an f32 residual stream), bias f32.
        let l =
            LtLinear { x_dtype: DType::F16, y_dtype: DType::F32, ..lin(8, 16, 32, Epilogue::GeluTanhBias) };
        let p = plan_lt_linear(&l, 256, 512, 128, Some((DType::F32, 16))).unwrap();
        assert_eq!(
            (p.in_type, p.out_type),
            (sys::cudaDataType_t::CUDA_R_16F, sys::cudaDataType_t::CUDA_R_32F)
        );
        assert_eq!(p.epilogue, sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_GELU_BIAS);
        let l = LtLinear { x_dtype: DType::BF16, y_dtype: DType::BF16, ..lin(8, 16, 32, Epilogue::None) };
        assert_eq!(
            plan_lt_linear(&l, 256, 512, 128, None).unwrap().in_type,
            sys::cudaDataType_t::CUDA_R_16BF
        );
    }

    #[test]
    fn plans_reject_bad_arguments() {
        let ok = |l: &LtLinear, bias| plan_lt_linear(l, 8 * 32, 16 * 32, 8 * 16, bias);
        let l = lin(8, 16, 32, Epilogue::Bias);
        assert!(ok(&l, Some((DType::F32, 16))).is_ok());
        // Bias missing, superfluous, wrong length, wrong dtype.
        assert!(ok(&l, None).is_err());
        assert!(ok(&lin(8, 16, 32, Epilogue::None), Some((DType::F32, 16))).is_err());
        assert!(ok(&l, Some((DType::F32, 15))).is_err());
        assert!(ok(&l, Some((DType::F16, 16))).is_err());
        // f32 inputs cannot give f16 outputs; f16 inputs cannot give bf16.
        assert!(ok(&LtLinear { y_dtype: DType::F16, ..lin(8, 16, 32, Epilogue::None) }, None).is_err());
        let l16 = LtLinear { x_dtype: DType::F16, y_dtype: DType::BF16, ..lin(8, 16, 32, Epilogue::None) };
        assert!(ok(&l16, None).is_err());
        // Short operands, empty and huge products.
        let l = lin(8, 16, 32, Epilogue::None);
        assert!(plan_lt_linear(&l, 8 * 32 - 1, 16 * 32, 8 * 16, None).is_err());
        assert!(plan_lt_linear(&l, 8 * 32, 16 * 32 - 1, 8 * 16, None).is_err());
        assert!(plan_lt_linear(&l, 8 * 32, 16 * 32, 8 * 16 - 1, None).is_err());
        assert!(plan_lt_linear(&lin(0, 16, 32, Epilogue::None), 8, 8, 8, None).is_err());
        let big = usize::MAX;
        assert!(plan_lt_linear(&lin(1 << 31, 1, 1, Epilogue::None), big, big, big, None).is_err());
        assert!(plan_lt_linear(&lin(1 << 40, 1 << 40, 1, Epilogue::None), big, big, big, None).is_err());
    }

    #[test]
    fn alignment_is_the_largest_power_of_two_up_to_256() {
        assert_eq!(alignment(0x7f00_0000_0000), 256);
        assert_eq!(alignment(0x7f00_0000_0100 + 4), 4);
        assert_eq!(alignment(0x7f00_0000_0000 + 2 * 8), 16);
        assert_eq!(alignment(0x7f00_0000_0000 + 128), 128);
        assert_eq!(alignment(0x7f00_0000_0000 + 2), 2);
    }

    /// The descriptors and preferences of real plans accepted by the real cuBLASLt (attribute
    /// types and sizes included). Host-side calls, so this runs without a GPU wherever
    /// cuBLASLt is installed (`LD_LIBRARY_PATH=<site-packages>/nvidia/cu13/lib`); elsewhere it
    /// says so and checks nothing.
    #[test]
    fn cublaslt_accepts_the_descriptors() {
        if let Err(why) = probe() {
            println!("cuBLASLt not installed here, descriptors not checked: {why}");
            return;
        }
        let cases = [
            (lin(154, 96, 64, Epilogue::Bias), Some(DType::F32)),
            (
                LtLinear {
                    x_dtype: DType::F16,
                    y_dtype: DType::F32,
                    ..lin(77, 256, 64, Epilogue::GeluTanhBias)
                },
                Some(DType::F32),
            ),
            (LtLinear { x_dtype: DType::BF16, y_dtype: DType::BF16, ..lin(8, 16, 32, Epilogue::None) }, None),
        ];
        for (l, bias) in cases {
            let p = plan_lt_linear(&l, l.m * l.k, l.n * l.k, l.m * l.n, bias.map(|d| (d, l.n))).unwrap();
            let bias_ptr = bias.map(|_| 0x7f00_0000_0000u64);
            if let Err(e) = descriptors(&p, bias_ptr) {
                panic!("{l:?}: {e}");
            }
            preference(32 << 20, [256, 256, 16, 16]).unwrap();
        }
        println!("cuBLASLt accepts the descriptors of {} plans", cases.len());
    }

    /// The tanh-approximate GELU of cuBLASLt's GELU epilogue.
    pub(crate) fn gelu_tanh(x: f32) -> f32 {
        let x = x as f64;
        (0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())) as f32
    }

    /// The CPU reference of an [`LtLinear`] in f32: `cpu::gemm::matmul` on `Wᵀ`, bias, GELU.
    pub(crate) fn reference(l: &LtLinear, x: &[f32], w: &[f32], bias: Option<&[f32]>) -> Vec<f32> {
        let wt = cpu::layout::permute(w, &[l.n, l.k], &[1, 0]);
        let mut y = cpu::gemm::matmul(x, &wt, 1, l.m, l.k, l.n);
        if let Some(b) = bias {
            for (i, v) in y.iter_mut().enumerate() {
                *v += b[i % l.n];
            }
        }
        if l.epilogue == Epilogue::GeluTanhBias {
            y.iter_mut().for_each(|v| *v = gelu_tanh(*v));
        }
        y
    }

    fn lt_linear_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("lt_linear");
        let cases = [
            // SD2 shapes, scaled: the CLIP MLP's fc1 with GELU, an attention projection without bias,
            // a UNet proj with bias; odd sizes.
            lin(77, 256, 64, Epilogue::GeluTanhBias),
            lin(154, 96, 64, Epilogue::None),
            lin(64, 320, 320, Epilogue::Bias),
            lin(7, 13, 11, Epilogue::Bias),
            LtLinear { x_dtype: DType::F16, y_dtype: DType::F16, ..lin(77, 128, 64, Epilogue::Bias) },
            LtLinear { x_dtype: DType::F16, y_dtype: DType::F32, ..lin(33, 64, 96, Epilogue::GeluTanhBias) },
            LtLinear { x_dtype: DType::BF16, y_dtype: DType::BF16, ..lin(40, 64, 32, Epilogue::Bias) },
        ];
        for l in cases {
            // Inputs representable in the storage dtype, so the reference sees what the GPU sees.
            let round = |v: Vec<f32>| host_data(&v, l.x_dtype).to_f32();
            let x = round(rng.vec(l.m * l.k));
            let w = round(rng.vec(l.n * l.k).into_iter().map(|v| v * 0.25).collect());
            let bias = l.epilogue.has_bias().then(|| host_data(&rng.vec(l.n), l.y_dtype).to_f32());
            let expected = reference(&l, &x, &w, bias.as_deref());
            let got = match device {
                Device::Cpu => expected.clone(),
                Device::Cuda(dev) => {
                    let h = super::super::libs::lt(dev).map_err(Error::Cuda)?;
                    let mut h = h.lock().map_err(|_| Error::Cuda("cuBLASLt handle poisoned".into()))?;
                    let up = |v: &[f32], d| DeviceValues::upload(dev, &host_data(v, d));
                    let b = bias.as_deref().map(|b| up(b, l.y_dtype)).transpose()?;
                    let mut y = DeviceValues::poisoned(dev, l.y_dtype, l.m * l.n)?;
                    let ran = lt_linear(
                        dev,
                        &mut h,
                        &l,
                        &up(&x, l.x_dtype)?,
                        &up(&w, l.x_dtype)?,
                        b.as_ref(),
                        &mut y,
                    )?;
                    println!("lt_linear {l:?}: {ran:?}");
                    if ran != LtRun::Ran {
                        return Err(Error::Cuda(format!("{l:?}: cuBLASLt did not run: {ran:?}")));
                    }
                    y.to_host(dev)?.to_f32()
                }
            };
            // The inputs' dtype is the least precise of the three (y is it or f32).
            let (norm, elem) = tolerances(l.x_dtype);
            check_close(&got, &expected, norm, elem).map_err(|e| Error::Invalid(format!("{l:?}: {e}")))?;
        }
        Ok(())
    }
    test_device!(lt_linear_matches_cpu);

    #[test]
    fn checks_catch_planted_bugs() {
        // The GPU test's reference and bound catch what a wrong epilogue or mapping would give.
        let mut rng = TestRng::new(11);
        let l = lin(77, 256, 64, Epilogue::GeluTanhBias);
        let (x, w, b) = (rng.vec(l.m * l.k), rng.vec(l.n * l.k), rng.vec(l.n));
        let good = reference(&l, &x, &w, Some(&b));
        let (norm, elem) = tolerances(DType::F32);
        assert!(check_close(&good, &good, norm, elem).is_ok());
        // Epilogue forgotten (bias only), GELU forgotten, exact erf GELU instead of tanh (the
        // 4.7e-4 difference is over the f32 bound), W used untransposed (shape-compatible
        // square case), bias broadcast along the wrong axis.
        let bias_only = reference(&LtLinear { epilogue: Epilogue::Bias, ..l }, &x, &w, Some(&b));
        let no_bias = reference(&l, &x, &w, Some(&vec![0.0; l.n]));
        let erf = cpu::elementwise::gelu(&bias_only);
        let sq = lin(64, 64, 64, Epilogue::Bias);
        let (xs, ws, bs) = (rng.vec(64 * 64), rng.vec(64 * 64), rng.vec(64));
        let sq_good = reference(&sq, &xs, &ws, Some(&bs));
        let untransposed = reference(&sq, &xs, &cpu::layout::permute(&ws, &[64, 64], &[1, 0]), Some(&bs));
        let mut wrong_axis = reference(&sq, &xs, &ws, None);
        for (i, v) in wrong_axis.iter_mut().enumerate() {
            *v += bs[i / 64];
        }
        for (name, bad, reference) in [
            ("GELU forgotten", &bias_only, &good),
            ("bias forgotten", &no_bias, &good),
            ("erf GELU", &erf, &good),
            ("W untransposed", &untransposed, &sq_good),
            ("bias along m", &wrong_axis, &sq_good),
        ] {
            assert!(check_close(bad, reference, norm, elem).is_err(), "{name} passed");
        }
    }
}
