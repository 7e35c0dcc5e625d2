//! Convolutions through cuDNN (cudarc's `cudnn` module, loaded at run time like cuBLAS):
//! forward cross-correlation of NCHW tensors with an `[C_out, C_in, kh, kw]` filter, the
//! algorithm chosen by `cudnnGetConvolutionForwardAlgorithm_v7` (cached per shape), its
//! workspace held by the handle and grown on demand, and the bias fused through
//! `cudnnConvolutionBiasActivationForward` (identity activation) where cuDNN allows it (the
//! identity activation is only supported with `IMPLICIT_PRECOMP_GEMM`); elsewhere the caller
//! adds the bias with the broadcast-add kernel.
//!
//! Dtype-generic: f32, f16 or bf16 storage, always f32 compute (`CUDNN_DATA_FLOAT` in the
//! convolution descriptor). f32 runs with `CUDNN_FMA_MATH`: cuDNN's default math allows TF32 on
//! Ampere and later, which would cost the f32 pipeline its 1e-4 agreement with the CPU;
//! f16 / bf16 run with tensor-op math.
//!
//! cuDNN is a separate download many machines lack: [`DnnHandle::new`] returns why it cannot
//! be used (library absent, symbols missing, version older than 9, no handle) and never panics;
//! `ops::conv2d` then runs im2col + cuBLAS and the usage record says so (`libs.rs`).
//! [`plan_conv`] checks shapes, dtypes and lengths without a GPU (unit-tested below).

use super::decompress::DeviceValues;
use super::device::CudaDevice;
use crate::backend::cpu::conv::ConvShape;
use crate::error::{Error, Result};
use crate::format::DType;
use cudarc::cudnn::result as dnn;
use cudarc::cudnn::sys;
use cudarc::driver::CudaSlice;
use std::collections::HashMap;

/// The most workspace an algorithm may take (larger ones are skipped for the next in cuDNN's
/// order); the SD2 VAE's 512-channel 3x3 layers at 64x64 need far less with the usual choices.
pub const WORKSPACE_CAP: usize = 256 << 20;

/// The cuDNN call for a convolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConvPlan {
    /// `[n, c, h, w]` of the input, `[k, c, kh, kw]` of the filter, `[n, k, ho, wo]` of the output.
    pub x: [i32; 4],
    pub w: [i32; 4],
    pub y: [i32; 4],
    pub pad: i32,
    pub stride: i32,
    pub data: sys::cudnnDataType_t,
    pub math: sys::cudnnMathType_t,
    pub bias: bool,
}

fn data_type(d: DType) -> sys::cudnnDataType_t {
    match d {
        DType::F32 => sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        DType::F16 => sys::cudnnDataType_t::CUDNN_DATA_HALF,
        DType::BF16 => sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
    }
}

/// Maps `s` to cuDNN and checks it against the buffer lengths and the bias (dtype, length).
pub fn plan_conv(
    s: ConvShape,
    dtype: DType,
    (x_len, w_len, y_len): (usize, usize, usize),
    bias: Option<(DType, usize)>,
) -> Result<ConvPlan> {
    let bad = |why: String| Error::Shape(format!("cuDNN conv {s:?}: {why}"));
    if [s.batch, s.c_in, s.h, s.w, s.c_out, s.kh, s.kw].contains(&0) || s.stride == 0 {
        return Err(bad("empty dimension or zero stride".into()));
    }
    if s.h + 2 * s.padding < s.kh || s.w + 2 * s.padding < s.kw {
        return Err(bad("the kernel is larger than the padded input".into()));
    }
    let (ho, wo) = s.out_hw();
    let overflow = || bad("too large".into());
    let numel = |d: [usize; 4]| d.iter().try_fold(1usize, |a, &v| a.checked_mul(v)).ok_or_else(overflow);
    let dims = [
        ("input", [s.batch, s.c_in, s.h, s.w], x_len),
        ("filter", [s.c_out, s.c_in, s.kh, s.kw], w_len),
        ("output", [s.batch, s.c_out, ho, wo], y_len),
    ];
    let mut out = [[0i32; 4]; 3];
    for (i, (name, d, have)) in dims.into_iter().enumerate() {
        let need = numel(d)?;
        // cuDNN's legacy API indexes tensors with 32-bit ints.
        if need > i32::MAX as usize {
            return Err(bad(format!("the {name} has {need} elements (cuDNN's limit is 2^31 - 1)")));
        }
        if have < need {
            return Err(bad(format!("the {name} buffer holds {have} elements, {need} needed")));
        }
        out[i] = d.map(|v| v as i32); // each <= the product, so fits
    }
    if let Some((dt, len)) = bias {
        if dt != dtype || len != s.c_out {
            return Err(bad(format!(
                "bias of {len} {} for {} output channels of {}",
                dt.name(),
                s.c_out,
                dtype.name()
            )));
        }
    }
    let pad = i32::try_from(s.padding).map_err(|_| overflow())?;
    let stride = i32::try_from(s.stride).map_err(|_| overflow())?;
    Ok(ConvPlan {
        x: out[0],
        w: out[1],
        y: out[2],
        pad,
        stride,
        data: data_type(dtype),
        math: if dtype == DType::F32 {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
        },
        bias: bias.is_some(),
    })
}

/// `cudnnGetVersion()` as `(major, minor, patch)`: cuDNN 9 encodes `major·10000 + minor·100 +
/// patch`, cuDNN 8 and older `major·1000 + minor·100 + patch`.
pub fn decode_version(v: usize) -> (usize, usize, usize) {
    if v >= 90000 {
        (v / 10000, (v % 10000) / 100, v % 100)
    } else {
        (v / 1000, (v % 1000) / 100, v % 100)
    }
}

/// Which forward algorithm to run: the first of cuDNN's (fastest-first) list that succeeded,
/// fits [`WORKSPACE_CAP`], and, for f32, does not use tensor-op math (TF32).
pub fn pick_algorithm(
    perf: &[sys::cudnnConvolutionFwdAlgoPerf_t],
    dtype: DType,
) -> Option<(sys::cudnnConvolutionFwdAlgo_t, usize)> {
    perf.iter()
        .find(|p| {
            p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                && p.memory <= WORKSPACE_CAP
                && (dtype != DType::F32
                    || matches!(
                        p.mathType,
                        sys::cudnnMathType_t::CUDNN_FMA_MATH | sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
                    ))
        })
        .map(|p| (p.algo, p.memory))
}

/// The result of [`cudnn_conv`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnnRun {
    /// It ran; with `fused_bias` the bias is in `y`, otherwise the caller adds it.
    Ran { algo: String, fused_bias: bool },
    /// cuDNN has no algorithm for this case: run the fallback.
    NotSupported(String),
}

/// How the forward algorithm is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AlgoChoice {
    /// `cudnnGetConvolutionForwardAlgorithm_v7`: cuDNN's heuristics, nothing run (the default).
    Heuristic,
    /// `cudnnFindConvolutionForwardAlgorithm`: every candidate timed once per shape
    /// (`SDSPARSE_GPU_CONV_ALGO=find`).
    Find,
    /// This algorithm (tests: to exercise the fused-bias and plain paths deliberately).
    Fixed(sys::cudnnConvolutionFwdAlgo_t),
}

/// Options of [`cudnn_conv`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvOptions {
    pub algo: AlgoChoice,
    /// Fuse the bias where cuDNN allows it (else the caller adds it).
    pub fuse_bias: bool,
}

impl ConvOptions {
    /// The default, or `SDSPARSE_GPU_CONV_ALGO=heuristic|find` (anything else is an error).
    pub fn from_env() -> Result<ConvOptions> {
        Self::parse(std::env::var("SDSPARSE_GPU_CONV_ALGO").ok().as_deref())
    }
    /// [`Self::from_env`] on a given value.
    pub fn parse(value: Option<&str>) -> Result<ConvOptions> {
        let algo = match value.map(str::trim) {
            None | Some("") | Some("heuristic") => AlgoChoice::Heuristic,
            Some("find") => AlgoChoice::Find,
            Some(v) => {
                return Err(Error::Invalid(format!(
                    "SDSPARSE_GPU_CONV_ALGO={v:?}: expected heuristic or find"
                )))
            }
        };
        Ok(ConvOptions { algo, fuse_bias: true })
    }
}

type AlgoKey = ([i32; 4], [i32; 4], i32, i32, DType, AlgoChoice);

/// A cuDNN handle on the device's stream, its workspace and the algorithm cache.
pub struct DnnHandle {
    handle: sys::cudnnHandle_t,
    version: String,
    workspace: Option<CudaSlice<u8>>,
    algos: HashMap<AlgoKey, Option<(sys::cudnnConvolutionFwdAlgo_t, usize)>>,
}

// SAFETY: the handle is used only behind the per-device Mutex in `libs.rs` (cuDNN handles must
// not be used by two threads at once), on the device's one stream.
unsafe impl Send for DnnHandle {}

const DNN_SYMBOLS: &[&str] = &[
    "cudnnGetVersion",
    "cudnnCreate",
    "cudnnDestroy",
    "cudnnSetStream",
    "cudnnCreateTensorDescriptor",
    "cudnnSetTensor4dDescriptor",
    "cudnnDestroyTensorDescriptor",
    "cudnnCreateFilterDescriptor",
    "cudnnSetFilter4dDescriptor",
    "cudnnDestroyFilterDescriptor",
    "cudnnCreateConvolutionDescriptor",
    "cudnnSetConvolution2dDescriptor",
    "cudnnSetConvolutionMathType",
    "cudnnDestroyConvolutionDescriptor",
    "cudnnGetConvolution2dForwardOutputDim",
    "cudnnGetConvolutionForwardAlgorithm_v7",
    "cudnnFindConvolutionForwardAlgorithm",
    "cudnnGetConvolutionForwardWorkspaceSize",
    "cudnnConvolutionForward",
    "cudnnConvolutionBiasActivationForward",
    "cudnnCreateActivationDescriptor",
    "cudnnSetActivationDescriptor",
    "cudnnDestroyActivationDescriptor",
];

/// Whether cuDNN can be used here, without a GPU: the library loads, has every symbol we call
/// and is version 9 or newer. Its version ("9.10.2"), or why not (one line). Never panics.
pub fn probe() -> std::result::Result<String, String> {
    // SAFETY: only probes whether the shared library can be opened.
    if !unsafe { sys::is_culib_present() } {
        return Err("cuDNN not found (libcudnn.so.9 could not be loaded; it is a separate install, \
                        e.g. pip install nvidia-cudnn-cu13 with its lib folder on LD_LIBRARY_PATH)"
            .into());
    }
    // SAFETY: the library is present (checked above), so culib() does not panic.
    if let Some(s) = super::libs::missing_symbol!(unsafe { sys::culib() }, DNN_SYMBOLS) {
        return Err(format!("cuDNN lacks {s} (cuDNN 9 needed)"));
    }
    let (major, minor, patch) = decode_version(dnn::get_version());
    if major < 9 {
        return Err(format!("cuDNN {major}.{minor}.{patch} is too old (cuDNN 9 needed)"));
    }
    Ok(format!("{major}.{minor}.{patch}"))
}

impl DnnHandle {
    /// Loads cuDNN ([`probe`]) and makes a handle on `dev`'s stream; any failure is the reason.
    pub fn new(dev: &CudaDevice) -> std::result::Result<DnnHandle, String> {
        let version = probe()?;
        dev.context().bind_to_thread().map_err(|e| format!("cannot bind the CUDA context: {e}"))?;
        let handle = std::panic::catch_unwind(dnn::create_handle)
            .map_err(|_| "cuDNN panicked while creating a handle".to_string())?
            .map_err(|e| format!("cannot create a cuDNN {version} handle: {e}"))?;
        // SAFETY: a live handle and the device's live stream.
        if let Err(e) = unsafe { dnn::set_stream(handle, dev.stream().cu_stream() as sys::cudaStream_t) } {
            // SAFETY: made above, not used.
            let _ = unsafe { dnn::destroy_handle(handle) };
            return Err(format!("cannot set the cuDNN stream: {e}"));
        }
        Ok(DnnHandle { handle, version, workspace: None, algos: HashMap::new() })
    }

    /// e.g. "9.10.2".
    pub fn version(&self) -> &str {
        &self.version
    }
}

impl Drop for DnnHandle {
    fn drop(&mut self) {
        // SAFETY: made in `new`, destroyed once.
        let _ = unsafe { dnn::destroy_handle(self.handle) };
    }
}

/// Owned descriptors, destroyed on drop.
struct TensorDesc(sys::cudnnTensorDescriptor_t);
struct FilterDesc(sys::cudnnFilterDescriptor_t);
struct ConvDesc(sys::cudnnConvolutionDescriptor_t);
struct ActDesc(sys::cudnnActivationDescriptor_t);
impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateTensorDescriptor, destroyed once.
        let _ = unsafe { dnn::destroy_tensor_descriptor(self.0) };
    }
}
impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { dnn::destroy_filter_descriptor(self.0) };
    }
}
impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { dnn::destroy_convolution_descriptor(self.0) };
    }
}
impl Drop for ActDesc {
    fn drop(&mut self) {
        // SAFETY: as above.
        let _ = unsafe { sys::cudnnDestroyActivationDescriptor(self.0) };
    }
}

fn not_supported(e: &dnn::CudnnError) -> bool {
    format!("{:?}", e.0).starts_with("CUDNN_STATUS_NOT_SUPPORTED")
}

fn dnn_err(what: &'static str) -> impl Fn(dnn::CudnnError) -> Error {
    move |e| Error::Cuda(format!("cuDNN {what}: {e}"))
}

fn tensor(data: sys::cudnnDataType_t, dims: [i32; 4]) -> Result<TensorDesc> {
    let d = TensorDesc(dnn::create_tensor_descriptor().map_err(dnn_err("tensor descriptor"))?);
    // SAFETY: a live descriptor.
    unsafe { dnn::set_tensor4d_descriptor(d.0, sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, data, dims) }
        .map_err(dnn_err("tensor descriptor"))?;
    Ok(d)
}

/// The descriptors of a planned convolution.
struct Descriptors {
    x: TensorDesc,
    y: TensorDesc,
    w: FilterDesc,
    conv: ConvDesc,
}

/// Builds `p`'s descriptors and checks that cuDNN's own output shape
/// (`cudnnGetConvolution2dForwardOutputDim`) is the planned one, so a descriptor mistake is an
/// error, not a wrong image. Host-only cuDNN calls: no GPU or handle needed.
fn descriptors(p: &ConvPlan) -> Result<Descriptors> {
    let xd = tensor(p.data, p.x)?;
    let yd = tensor(p.data, p.y)?;
    let wd = FilterDesc(dnn::create_filter_descriptor().map_err(dnn_err("filter descriptor"))?);
    let cd = ConvDesc(dnn::create_convolution_descriptor().map_err(dnn_err("convolution descriptor"))?);
    // SAFETY: live descriptors; the values were checked by plan_conv.
    unsafe {
        dnn::set_filter4d_descriptor(wd.0, p.data, sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, p.w)
            .map_err(dnn_err("filter descriptor"))?;
        dnn::set_convolution2d_descriptor(
            cd.0,
            p.pad,
            p.pad,
            p.stride,
            p.stride,
            1,
            1,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
        )
        .map_err(dnn_err("convolution descriptor"))?;
        dnn::set_convolution_math_type(cd.0, p.math).map_err(dnn_err("math type"))?;
    }
    // cuDNN's own idea of the output shape must be ours (a descriptor mistake shows here, not
    // as a wrong image).
    let mut o = [0i32; 4];
    // SAFETY: live descriptors, four writable ints.
    unsafe {
        sys::cudnnGetConvolution2dForwardOutputDim(
            cd.0, xd.0, wd.0, &mut o[0], &mut o[1], &mut o[2], &mut o[3],
        )
    }
    .result()
    .map_err(dnn_err("output dimensions"))?;
    if o != p.y {
        return Err(Error::Cuda(format!(
            "cuDNN conv: cuDNN computes output {o:?} for input {:?} and filter {:?}, we planned {:?}",
            p.x, p.w, p.y
        )));
    }

    Ok(Descriptors { x: xd, y: yd, w: wd, conv: cd })
}

/// `y = conv(x, w) (+ bias)` on `h`'s device; `y` is overwritten. See the module docs.
#[allow(clippy::too_many_arguments)]
pub fn cudnn_conv(
    dev: &CudaDevice,
    h: &mut DnnHandle,
    opts: ConvOptions,
    s: ConvShape,
    x: &DeviceValues,
    w: &DeviceValues,
    bias: Option<&DeviceValues>,
    y: &mut DeviceValues,
) -> Result<DnnRun> {
    let dtype = x.dtype();
    if w.dtype() != dtype || y.dtype() != dtype {
        return Err(Error::Invalid(format!(
            "cuDNN conv: input {}, filter {}, output {} (one dtype needed)",
            dtype.name(),
            w.dtype().name(),
            y.dtype().name()
        )));
    }
    let p = plan_conv(s, dtype, (x.len(), w.len(), y.len()), bias.map(|b| (b.dtype(), b.len())))?;
    dev.context().bind_to_thread().map_err(super::device::driver_err("cannot bind the CUDA context"))?;
    let Descriptors { x: xd, y: yd, w: wd, conv: cd } = descriptors(&p)?;

    let key = (p.x, p.w, p.pad, p.stride, dtype, opts.algo);
    let chosen = match h.algos.get(&key) {
        Some(c) => *c,
        None => {
            let c = match opts.algo {
                AlgoChoice::Fixed(a) => Some((a, 0)),
                search => {
                    let mut perf = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; 8];
                    let mut count = 0i32;
                    // SAFETY: live handle and descriptors; `perf` has room for the 8 requested
                    // results (Find allocates and frees its own buffers).
                    unsafe {
                        if search == AlgoChoice::Find {
                            sys::cudnnFindConvolutionForwardAlgorithm(
                                h.handle,
                                xd.0,
                                wd.0,
                                cd.0,
                                yd.0,
                                8,
                                &mut count,
                                perf.as_mut_ptr(),
                            )
                            .result()
                        } else {
                            dnn::get_convolution_forward_algorithm(
                                h.handle,
                                xd.0,
                                wd.0,
                                cd.0,
                                yd.0,
                                8,
                                &mut count,
                                perf.as_mut_ptr(),
                            )
                        }
                    }
                    .map_err(dnn_err("algorithm search"))?;
                    pick_algorithm(&perf[..count.clamp(0, 8) as usize], dtype)
                }
            };
            h.algos.insert(key, c);
            c
        }
    };
    let Some((algo, _)) = chosen else {
        return Ok(DnnRun::NotSupported(format!(
            "cuDNN has no forward algorithm for {s:?} in {} within {} MiB of workspace",
            dtype.name(),
            WORKSPACE_CAP >> 20
        )));
    };
    // SAFETY: live handle and descriptors.
    let ws_bytes = match unsafe {
        dnn::get_convolution_forward_workspace_size(h.handle, xd.0, wd.0, cd.0, yd.0, algo)
    } {
        Ok(b) => b,
        Err(e) if not_supported(&e) => {
            return Ok(DnnRun::NotSupported(format!("cuDNN: {algo:?} does not support {s:?}: {e}")))
        }
        Err(e) => return Err(Error::Cuda(format!("cuDNN workspace size: {e}"))),
    };
    if ws_bytes > 0 && h.workspace.as_ref().is_none_or(|b| b.len() < ws_bytes) {
        h.workspace = None; // free the old one first
        h.workspace = Some(dev.alloc_zeros::<u8>(ws_bytes)?);
    }
    let ws_ptr = h.workspace.as_ref().filter(|_| ws_bytes > 0).map(|b| dev.device_ptr(b)).unwrap_or(0);
    let (x_ptr, w_ptr, y_ptr) = (x.device_ptr(dev), w.device_ptr(dev), y.device_ptr(dev));
    let (one, zero) = (1.0f32, 0.0f32); // f32 scaling parameters for every storage dtype here
    let algo_name = format!("{algo:?}").trim_start_matches("CUDNN_CONVOLUTION_FWD_ALGO_").to_string();

    if let (Some(b), true, sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM) =
        (bias, opts.fuse_bias, algo)
    {
        let bd = tensor(p.data, [1, p.y[1], 1, 1])?;
        let ad = ActDesc(dnn::create_activation_descriptor().map_err(dnn_err("activation descriptor"))?);
        // SAFETY: a live descriptor.
        unsafe {
            dnn::set_activation_descriptor(
                ad.0,
                sys::cudnnActivationMode_t::CUDNN_ACTIVATION_IDENTITY,
                sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                0.0,
            )
        }
        .map_err(dnn_err("activation descriptor"))?;
        // z aliases y with alpha2 = 0; y is zeroed first so the NaN poison cannot leak in
        // through 0 · NaN.
        if let DeviceValues::F32(s) = y {
            dev.fill_bytes(s, 0)?;
        } else if let DeviceValues::F16(s) = y {
            dev.fill_bytes(s, 0)?;
        } else if let DeviceValues::BF16(s) = y {
            dev.fill_bytes(s, 0)?;
        }
        // SAFETY: plan_conv checked every buffer against its descriptor; the workspace holds
        // `ws_bytes`; all on the device's one stream.
        let fused = unsafe {
            dnn::convolution_bias_activation_forward(
                h.handle,
                &one as *const f32 as *const _,
                xd.0,
                x_ptr as *const _,
                wd.0,
                w_ptr as *const _,
                cd.0,
                algo,
                ws_ptr as *mut _,
                ws_bytes,
                &zero as *const f32 as *const _,
                yd.0,
                y_ptr as *const _,
                bd.0,
                b.device_ptr(dev) as *const _,
                ad.0,
                yd.0,
                y_ptr as *mut _,
            )
        };
        match fused {
            Ok(()) => return Ok(DnnRun::Ran { algo: algo_name, fused_bias: true }),
            Err(e) if not_supported(&e) => {} // the unfused call below, bias added by the caller
            Err(e) => return Err(Error::Cuda(format!("cuDNN conv + bias {s:?} ({algo_name}) failed: {e}"))),
        }
    }
    // SAFETY: as above.
    let ran = unsafe {
        dnn::convolution_forward(
            h.handle,
            &one as *const f32 as *const _,
            xd.0,
            x_ptr as *const _,
            wd.0,
            w_ptr as *const _,
            cd.0,
            algo,
            ws_ptr as *mut _,
            ws_bytes,
            &zero as *const f32 as *const _,
            yd.0,
            y_ptr as *mut _,
        )
    };
    match ran {
        Ok(()) => Ok(DnnRun::Ran { algo: algo_name, fused_bias: false }),
        Err(e) if not_supported(&e) => {
            Ok(DnnRun::NotSupported(format!("cuDNN refused {s:?} ({algo_name}): {e}")))
        }
        Err(e) => Err(Error::Cuda(format!("cuDNN conv {s:?} ({algo_name}) failed: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu;
    use crate::backend::test_util::{check_close, dtype_tolerances as tolerances, host_data, TestRng};
    use crate::backend::Device;
    use crate::test_device;

    fn shape(
        batch: usize,
        c_in: usize,
        hw: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> ConvShape {
        ConvShape { batch, c_in, h: hw, w: hw, c_out, kh: k, kw: k, stride, padding }
    }
    fn lens(s: ConvShape) -> (usize, usize, usize) {
        let (ho, wo) = s.out_hw();
        (s.batch * s.c_in * s.h * s.w, s.c_out * s.c_in * s.kh * s.kw, s.batch * s.c_out * ho * wo)
    }

    #[test]
    fn plans_describe_nchw_and_check_arguments() {
        // SD2's 3x3 pad-1 conv, its stride-2 downsample, a 1x1 shortcut.
        let s = shape(2, 64, 32, 128, 3, 1, 1);
        let p = plan_conv(s, DType::F32, lens(s), Some((DType::F32, 128))).unwrap();
        assert_eq!((p.x, p.w, p.y), ([2, 64, 32, 32], [128, 64, 3, 3], [2, 128, 32, 32]));
        assert_eq!((p.pad, p.stride, p.bias), (1, 1, true));
        // f32 never runs on tensor cores (TF32); f16 / bf16 do, with f32 compute.
        assert_eq!(p.math, sys::cudnnMathType_t::CUDNN_FMA_MATH);
        assert_eq!(p.data, sys::cudnnDataType_t::CUDNN_DATA_FLOAT);
        let p = plan_conv(s, DType::F16, lens(s), None).unwrap();
        assert_eq!(
            (p.data, p.math),
            (sys::cudnnDataType_t::CUDNN_DATA_HALF, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
        );
        let s2 = shape(1, 8, 17, 8, 3, 2, 1);
        assert_eq!(plan_conv(s2, DType::BF16, lens(s2), None).unwrap().y, [1, 8, 9, 9]);
        let s1 = shape(2, 8, 5, 16, 1, 1, 0);
        assert_eq!(plan_conv(s1, DType::F32, lens(s1), None).unwrap().y, [2, 16, 5, 5]);

        // Short buffers, bias of the wrong length or dtype, empty dims, zero stride, a kernel
        // larger than the padded input, more than 2^31 elements.
        let (x, w, y) = lens(s);
        assert!(plan_conv(s, DType::F32, (x - 1, w, y), None).is_err());
        assert!(plan_conv(s, DType::F32, (x, w - 1, y), None).is_err());
        assert!(plan_conv(s, DType::F32, (x, w, y - 1), None).is_err());
        assert!(plan_conv(s, DType::F32, lens(s), Some((DType::F32, 127))).is_err());
        assert!(plan_conv(s, DType::F32, lens(s), Some((DType::F16, 128))).is_err());
        assert!(plan_conv(shape(0, 64, 32, 128, 3, 1, 1), DType::F32, lens(s), None).is_err());
        assert!(plan_conv(shape(2, 64, 32, 128, 3, 0, 1), DType::F32, lens(s), None).is_err());
        assert!(plan_conv(shape(1, 1, 2, 1, 5, 1, 1), DType::F32, (4, 25, 1), None).is_err());
        let huge = shape(64, 512, 2048, 512, 3, 1, 1);
        assert!(plan_conv(huge, DType::F16, (usize::MAX, usize::MAX, usize::MAX), None).is_err());
    }

    #[test]
    fn algorithm_choice_parses() {
        assert_eq!(
            ConvOptions::parse(None).unwrap(),
            ConvOptions { algo: AlgoChoice::Heuristic, fuse_bias: true }
        );
        assert_eq!(ConvOptions::parse(Some("find")).unwrap().algo, AlgoChoice::Find);
        assert_eq!(ConvOptions::parse(Some(" heuristic ")).unwrap().algo, AlgoChoice::Heuristic);
        let e = ConvOptions::parse(Some("fastest")).unwrap_err().to_string();
        assert!(e.contains("SDSPARSE_GPU_CONV_ALGO") && e.contains("expected heuristic or find"), "{e}");
    }

    #[test]
    fn versions_decode_and_algorithms_are_picked_safely() {
        assert_eq!(decode_version(91002), (9, 10, 2));
        assert_eq!(decode_version(90100), (9, 1, 0));
        assert_eq!(decode_version(8907), (8, 9, 7));
        use sys::cudnnConvolutionFwdAlgo_t as A;
        use sys::cudnnMathType_t as M;
        use sys::cudnnStatus_t as S;
        let perf = |algo, status, memory, math| sys::cudnnConvolutionFwdAlgoPerf_t {
            algo,
            status,
            time: -1.0,
            memory,
            determinism: sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
            mathType: math,
            reserved: [0; 3],
        };
        let list = [
            perf(A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD, S::CUDNN_STATUS_NOT_SUPPORTED, 0, M::CUDNN_FMA_MATH),
            perf(
                A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
                S::CUDNN_STATUS_SUCCESS,
                WORKSPACE_CAP + 1,
                M::CUDNN_FMA_MATH,
            ),
            perf(
                A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
                S::CUDNN_STATUS_SUCCESS,
                0,
                M::CUDNN_TENSOR_OP_MATH,
            ),
            perf(
                A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                S::CUDNN_STATUS_SUCCESS,
                1 << 20,
                M::CUDNN_FMA_MATH,
            ),
        ];
        // f32: the failed, the too-hungry and the TF32 entries are skipped.
        assert_eq!(
            pick_algorithm(&list, DType::F32),
            Some((A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, 1 << 20))
        );
        // f16 may use tensor cores.
        assert_eq!(pick_algorithm(&list, DType::F16), Some((A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, 0)));
        assert_eq!(pick_algorithm(&list[..3], DType::F32), None);
        assert_eq!(pick_algorithm(&[], DType::F32), None);
    }

    /// cuDNN's own output shape against our plan, for SD2's convolution kinds in every dtype.
    /// Descriptors are host-side in cuDNN, so this runs without a GPU wherever cuDNN is
    /// installed (`LD_LIBRARY_PATH=<site-packages>/nvidia/cudnn/lib cargo test --lib dnn::`);
    /// elsewhere it says so and checks nothing.
    #[test]
    fn cudnn_descriptors_agree_with_plans() {
        let version = match probe() {
            Ok(v) => v,
            Err(why) => {
                println!("cuDNN not installed here, descriptors not checked: {why}");
                return;
            }
        };
        let shapes = [
            shape(2, 4, 64, 320, 3, 1, 1),   // UNet conv_in
            shape(2, 320, 64, 320, 3, 2, 1), // Downsample2D
            shape(1, 512, 64, 512, 3, 1, 1), // VAE decoder block
            shape(1, 4, 64, 4, 1, 1, 0),     // post_quant_conv
            shape(1, 8, 17, 8, 3, 2, 1),     // odd input, stride 2
            shape(3, 5, 7, 6, 3, 1, 0),      // no padding
        ];
        for s in shapes {
            for dtype in [DType::F32, DType::F16, DType::BF16] {
                let p = plan_conv(s, dtype, lens(s), None).unwrap();
                if let Err(e) = descriptors(&p) {
                    panic!("cuDNN {version}: {s:?} {}: {e}", dtype.name());
                }
            }
        }
        // A plan one output row short (a wrong out_hw) is refused by cuDNN's own shape.
        let s = shapes[1];
        let mut bad = plan_conv(s, DType::F32, lens(s), None).unwrap();
        bad.y[2] -= 1;
        let e = descriptors(&bad).err().expect("a wrong output shape passed").to_string();
        assert!(e.contains("cuDNN computes output [2, 320, 32, 32]"), "{e}");
        println!("cuDNN {version}: descriptors agree with the plans for {} shapes x 3 dtypes", shapes.len());
    }

    /// cuDNN against the CPU reference convolution (`cpu::conv::conv2d`, direct), fresh random
    /// inputs, with and without bias, in every storage dtype.
    fn cudnn_conv_matches_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("cudnn_conv");
        let mut fused = 0;
        let cases = [
            (shape(2, 32, 16, 48, 3, 1, 1), true, DType::F32),
            (shape(1, 16, 17, 16, 3, 2, 1), true, DType::F32),
            (shape(2, 24, 9, 40, 1, 1, 0), false, DType::F32),
            (shape(1, 4, 8, 8, 3, 1, 1), true, DType::F32),
            (shape(2, 32, 16, 32, 3, 1, 1), true, DType::F16),
            (shape(1, 16, 12, 24, 3, 1, 1), false, DType::BF16),
        ];
        for (s, with_bias, dtype) in cases {
            let round = |v: Vec<f32>| host_data(&v, dtype).to_f32();
            let (xl, wl, yl) = lens(s);
            let x = round(rng.vec(xl));
            let w = round(rng.vec(wl).into_iter().map(|v| v * 0.2).collect());
            let b = with_bias.then(|| round(rng.vec(s.c_out)));
            let expected = cpu::conv::conv2d(&x, &w, b.as_deref(), s);
            let Device::Cuda(dev) = device else {
                // The CPU variant checks the reference against itself (as the other GPU tests).
                let (norm, elem) = tolerances(dtype);
                check_close(&expected, &expected, norm, elem).map_err(Error::Invalid)?;
                continue;
            };
            let h = match super::super::libs::dnn(dev) {
                Ok(h) => h,
                Err(why) if std::env::var("SDSPARSE_REQUIRE_CUDNN").as_deref() != Ok("1") => {
                    // Not "skipped": the device check counts that word as no GPU.
                    println!("cudnn_conv_matches_cpu: cuDNN unavailable, not checked: {why}");
                    return Ok(());
                }
                Err(why) => return Err(Error::Cuda(why)),
            };
            let mut h = h.lock().map_err(|_| Error::Cuda("cuDNN handle poisoned".into()))?;
            let up = |v: &[f32]| DeviceValues::upload(dev, &host_data(v, dtype));
            let (xd, wd) = (up(&x)?, up(&w)?);
            let bd = b.as_deref().map(up).transpose()?;
            // cuDNN's own choice (what the pipeline runs), timed search, and the algorithm that
            // allows the fused bias, fused and not: every path of `cudnn_conv`.
            let precomp = AlgoChoice::Fixed(
                sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
            );
            let variants = [
                ConvOptions { algo: AlgoChoice::Heuristic, fuse_bias: true },
                ConvOptions { algo: AlgoChoice::Find, fuse_bias: true },
                ConvOptions { algo: precomp, fuse_bias: true },
                ConvOptions { algo: precomp, fuse_bias: false },
            ];
            for opts in variants {
                let mut y = DeviceValues::poisoned(dev, dtype, yl)?;
                let ran = cudnn_conv(dev, &mut h, opts, s, &xd, &wd, bd.as_ref(), &mut y)?;
                println!("cudnn {} {s:?} {} {opts:?}: {ran:?}", h.version(), dtype.name());
                let mut got = y.to_host(dev)?.to_f32();
                match ran {
                    DnnRun::Ran { fused_bias: false, .. } => {
                        if let Some(b) = &b {
                            let plane = yl / (s.batch * s.c_out);
                            for (i, v) in got.iter_mut().enumerate() {
                                *v += b[(i / plane) % s.c_out];
                            }
                        }
                    }
                    DnnRun::Ran { fused_bias: true, .. } => fused += 1,
                    // cuDNN's own choices must run; a fixed algorithm may be unsupported for a dtype.
                    DnnRun::NotSupported(why) if matches!(opts.algo, AlgoChoice::Fixed(_)) => {
                        println!("  not supported by cuDNN, not checked: {why}");
                        continue;
                    }
                    DnnRun::NotSupported(why) => return Err(Error::Cuda(format!("{s:?} {opts:?}: {why}"))),
                }
                let (norm, elem) = tolerances(dtype);
                check_close(&got, &expected, norm, elem)
                    .map_err(|e| Error::Invalid(format!("{s:?} {} {opts:?}: {e}", dtype.name())))?;
            }
        }
        if matches!(device, Device::Cuda(_)) {
            println!("cudnn_conv_matches_cpu: the fused-bias path ran {fused} times");
        }
        Ok(())
    }
    test_device!(cudnn_conv_matches_cpu);
}
