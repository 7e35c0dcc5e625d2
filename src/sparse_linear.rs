//! The sparse GEMM ops on their own, for engines that want only the kernels: a pruned Linear
//! weight ([`Sparse24Weight`] or [`BitmapWeight`] in the canonical layouts of `docs/FORMAT.md`)
//! is placed on a device once, then multiplied by activations as often as needed.
//!
//! On the CPU the product runs the reference path of [`crate::backend::ops::linear`] (the one
//! layer expanded into a scratch buffer, then the dense f32 GEMM): exactly the dense-with-zeros
//! result. [`SparseLinear::forward_fused`] adds the kernels' fused epilogue,
//! `y = act(x·Wᵀ + b) + residual` with GELU, GEGLU (a 2:4 projection made by
//! [`SparseLinear::new_geglu`], its rows interleaved at load) or an f16 residual, routed by
//! [`plan_epilogue`]; what a kernel cannot fuse runs as the separate ops, in the same order.
//! On CUDA the weight is packed into the kernel layouts at [`SparseLinear::new`] (2:4
//! `mma.sp` metadata order, tiled bitmaps) and uploaded; each [`SparseLinear::forward`] runs
//! the kernel the dispatcher picks on f16 activations (f32 accumulation). GPU tensors (the
//! pipeline's) stay on the device and the result comes in the input's dtype: f16 activations
//! (the CUDA default) go to the kernels as they are, no copy or cast; f32 and bf16 ones are
//! rounded to f16 by the cast kernel (bf16 through f32: the kernels are f16-only) and the f16
//! result converted back. Host tensors (f32) go to the GPU and come back widened to f32. On a
//! dense-only GPU (below 8.0, where the sparse kernels do not run) the weight is expanded to
//! dense f32 on the GPU at `new` and every product is cuBLAS SGEMM. The
//! CUDA path has not yet run on a GPU (see
//! `docs/CUDA.md`); its test compares it with the CPU path and skips without a GPU.

use crate::backend::cuda::decompress::{DeviceValues, F16Bits};
use crate::backend::cuda::sparse24::{
    geglu_interleave, Sp24Epilogue, Sp24Kernels, Sp24Variant, Sparse24Gpu, Sparse24Packed, GEGLU_GROUP,
};
use crate::backend::cuda::unstructured::{
    DeviceTiledWeight, Epilogue, GemmPlan, GemmVariant, TiledBitmapWeight, UnstructuredGemm,
};
use crate::backend::cuda::{self, kernels, CudaDevice, CudaStorage};
use crate::backend::profile::{self, OpKind};
use crate::backend::{ops, Device, Storage, Tensor};
use crate::error::{Error, Result};
use crate::format::{BitmapWeight, DType, Sparse24Weight, Weight};
use crate::tune::{self, Choice, EpilogueClass, Family, GpuKey, KernelProbe, ShapeClass};
use cudarc::driver::CudaSlice;
use half::f16;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// A Linear layer's weight `W[out_features, in_features]` placed on a device:
/// `y[.., N] = x[.., K] · W^T (+ bias[N])`.
///
/// Accepts dense, 2:4 and bitmap weights on the CPU; 2:4 (`in_features % 8 == 0`) and bitmap
/// (`in_features % 8 == 0`) weights on CUDA.
///
/// ```
/// use sdsparse::{BitmapWeight, Device, HostData, SparseLinear, Tensor};
///
/// // W = [[1, 0, 2], [0, 0, 3]] as an unstructured bitmap weight: bit c of row r's mask byte
/// // is set when W[r][c] is kept.
/// let dense = HostData::F32(vec![1.0, 0.0, 2.0, 0.0, 0.0, 3.0]);
/// let w = BitmapWeight::from_dense(&dense, 2, 3, &[0b101, 0b100])?;
/// let layer = SparseLinear::new(w.into(), &Device::Cpu)?;
/// let x = Tensor::from_vec(vec![1.0, 1.0, 1.0], &[1, 3])?;
/// let y = layer.forward(&x, None)?;
/// assert_eq!(y.to_vec()?, vec![3.0, 3.0]);
/// # Ok::<(), sdsparse::Error>(())
/// ```
pub struct SparseLinear {
    out_features: usize,
    in_features: usize,
    imp: Imp,
    /// The device rows are in [`geglu_interleave`] order (a 2:4 GEGLU projection on CUDA).
    interleaved: bool,
    /// A layer made by [`SparseLinear::new_geglu`] holds its bias (f32; on the GPU and in
    /// device row order when `interleaved`); the callers' `bias` must then be `None`.
    own_bias: Option<Option<Tensor>>,
}

/// The activation of a fused Linear, applied to `x·Wᵀ + b` before the residual:
/// `y = act(x·Wᵀ + b) + residual`, the order of the kernels' epilogue and of the model code.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum LinearAct {
    #[default]
    None,
    /// Exact (erf) GELU, torch's default `gelu` (`ops::gelu`).
    Gelu,
    /// GEGLU as diffusers' `GEGLU`: the `2H` outputs split into value `[.., :H]` and gate
    /// `[.., H:]`, result `value * gelu(gate)`, `[.., H]` (`ops::geglu`).
    Geglu,
}

/// What one fused forward call runs: the kernel's epilogue (`fused`, `None` on the generic
/// path: CPU, dense weights, the dense fallback), then the separate ops in this order:
/// de-interleave the columns, the activation, the residual add. A pure function of the layer
/// and the call ([`plan_epilogue`]), tested on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpiloguePlan {
    pub fused: Option<EpilogueClass>,
    /// The product's columns are GEGLU-interleaved (device row order) and no fused GEGLU
    /// consumed them: put them back in canonical order (one permute).
    pub deinterleave: bool,
    /// The activation as a separate op (`ops::gelu` / `ops::geglu`).
    pub act: LinearAct,
    /// The residual as a separate `ops::add(y, residual)`.
    pub residual: bool,
}

/// The routing of a fused Linear (see [`EpiloguePlan`]).
///
/// - `kernel`: the sparse kernel family that computes the product, `None` for the generic path.
/// - `interleaved`: the weight's device rows are in [`geglu_interleave`] order (2:4 only).
/// - `residual`: `None` without one; `Some(fusable)` with one, `fusable` when the residual and
///   the output are both f16 GPU tensors. The kernels add an f16 residual; with f32 / bf16
///   activations (`--dtype`) the residual stream is not rounded to f16 — it is added by a
///   separate op in the activation dtype.
///
/// The 2:4 kernels fuse GELU, GEGLU (interleaved weight only) and the residual; the
/// unstructured kernels GELU and the residual (GEGLU runs as `ops::geglu` after them). The
/// residual is fused only when nothing runs after the kernel.
pub fn plan_epilogue(
    kernel: Option<Family>,
    interleaved: bool,
    act: LinearAct,
    residual: Option<bool>,
) -> EpiloguePlan {
    let Some(family) = kernel else {
        return EpiloguePlan { fused: None, deinterleave: interleaved, act, residual: residual.is_some() };
    };
    let geglu = act == LinearAct::Geglu && interleaved && family == Family::Sparse24;
    let gelu = act == LinearAct::Gelu;
    let post_act = if geglu || gelu { LinearAct::None } else { act };
    let deinterleave = interleaved && !geglu;
    let fuse_residual = residual == Some(true) && post_act == LinearAct::None && !deinterleave;
    EpiloguePlan {
        fused: Some(EpilogueClass { gelu, geglu, residual: fuse_residual }),
        deinterleave,
        act: post_act,
        residual: residual.is_some() && !fuse_residual,
    }
}

/// Whether a GEGLU projection of `out_features` rows can take the fused GEGLU epilogue (its
/// rows interleave in whole groups of 64 value and 64 gate rows: `H % 64 == 0`).
pub fn geglu_interleavable(out_features: usize) -> bool {
    out_features > 0 && out_features.is_multiple_of(2 * GEGLU_GROUP)
}

/// `y[.., N]` with GEGLU-interleaved columns ([`geglu_interleave`]: column `128b + 64s + j` is
/// canonical `s·N/2 + 64b + j`, s = 0 value, 1 gate) back in canonical order: a view
/// `[M, N/128, 2, 64]` permuted to `[M, 2, N/128, 64]`.
pub fn deinterleave_columns(y: &Tensor) -> Result<Tensor> {
    let n = *y.shape().last().ok_or_else(|| Error::Shape("de-interleave: scalar".into()))?;
    if !geglu_interleavable(n) {
        return Err(Error::Shape(format!("de-interleave: {n} columns are not whole 128-row groups")));
    }
    let m = y.numel() / n;
    let g = n / (2 * GEGLU_GROUP);
    let t = ops::permute(&y.reshape(&[m, g, 2, GEGLU_GROUP])?, &[0, 2, 1, 3])?;
    t.reshape(y.shape())
}

/// The separate ops of `plan` after the product `y`: de-interleave, activation, residual add
/// (`ops::add(y, residual)`, the model's order).
fn finish(y: Tensor, plan: &EpiloguePlan, residual: Option<&Tensor>) -> Result<Tensor> {
    let y = if plan.deinterleave { deinterleave_columns(&y)? } else { y };
    let y = match plan.act {
        LinearAct::None => y,
        LinearAct::Gelu => ops::gelu(&y)?,
        LinearAct::Geglu => ops::geglu(&y)?,
    };
    match (plan.residual, residual) {
        (true, Some(r)) => ops::add(&y, r),
        _ => Ok(y),
    }
}

/// The generic fused Linear: `ops::linear`, then the activation and the residual add as
/// separate ops, exactly the model's unfused sequence (bit-identical on the CPU).
pub fn linear_then_ops(
    x: &Tensor,
    w: &Weight,
    bias: Option<&Tensor>,
    act: LinearAct,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let plan = plan_epilogue(None, false, act, residual.map(|_| false));
    finish(ops::linear(x, w, bias)?, &plan, residual)
}

/// Checks a fused call's `residual` against the output shape (`x`'s leading dims, then
/// `n_out`): the kernels read it unbroadcast.
pub fn check_residual(x: &Tensor, n_out: usize, residual: Option<&Tensor>) -> Result<()> {
    if let Some(r) = residual {
        let mut want = x.shape().to_vec();
        if let Some(last) = want.last_mut() {
            *last = n_out;
        }
        if r.shape() != want.as_slice() {
            return Err(Error::Shape(format!("fused Linear: residual {:?}, output {want:?}", r.shape())));
        }
    }
    Ok(())
}

/// Whether `t` is an f16 tensor on `device`.
fn is_f16_on(t: &Tensor, device: &CudaDevice) -> bool {
    matches!(t.storage(), Storage::Cuda(s) if s.device() == *device && s.dtype() == DType::F16)
}

enum Imp {
    Cpu(Weight),
    Cuda24 {
        device: CudaDevice,
        kernels: Arc<Sp24Kernels>,
        weight: Sparse24Gpu,
        dense: OnceLock<Tensor>,
    },
    CudaBitmap {
        device: CudaDevice,
        gemm: Arc<UnstructuredGemm>,
        weight: DeviceTiledWeight,
        dense: OnceLock<Tensor>,
    },
    /// A dense-only GPU (below 8.0, `cuda::ArchMode::DenseOnly`): the sparse kernels do not run
    /// there, so the weight is expanded to dense f32 on the GPU at `new` and multiplied by
    /// cuBLAS (the decompress + cuBLAS fallback from the start; no kernel is ever probed).
    CudaDense {
        device: CudaDevice,
        dense: OnceLock<Tensor>,
    },
}

/// The kernel modules, loaded once per GPU and shared by every layer (a model has hundreds).
struct LoadedKernels {
    sparse24: HashMap<usize, Arc<Sp24Kernels>>,
    unstructured: HashMap<usize, Arc<UnstructuredGemm>>,
}

fn loaded() -> &'static Mutex<LoadedKernels> {
    static LOADED: OnceLock<Mutex<LoadedKernels>> = OnceLock::new();
    LOADED
        .get_or_init(|| Mutex::new(LoadedKernels { sparse24: HashMap::new(), unstructured: HashMap::new() }))
}

/// Refuses the sparse kernels on a GPU that must not run them (below 8.0 they are traps);
/// `SparseLinear::new` routes such GPUs to the dense path before getting here.
fn require_sparse_kernels(dev: &CudaDevice) -> Result<()> {
    if dev.arch_mode().sparse_kernels() {
        return Ok(());
    }
    let (major, minor) = dev.compute_capability();
    Err(Error::Cuda(format!(
        "the sparse GEMM kernels do not run on {} (sm_{major}{minor}, dense-only mode)",
        dev.gpu_name()
    )))
}

fn sparse24_kernels(dev: &CudaDevice) -> Result<Arc<Sp24Kernels>> {
    require_sparse_kernels(dev)?;
    let mut l = loaded().lock().map_err(|_| Error::Cuda("kernel cache poisoned".into()))?;
    if let Some(k) = l.sparse24.get(&dev.ordinal()) {
        return Ok(k.clone());
    }
    let fatbin = kernels::fatbin().ok_or_else(|| Error::Cuda("this build has no CUDA kernels".into()))?;
    let k = Arc::new(Sp24Kernels::load(dev.context(), fatbin)?);
    l.sparse24.insert(dev.ordinal(), k.clone());
    Ok(k)
}

fn unstructured_gemm(dev: &CudaDevice) -> Result<Arc<UnstructuredGemm>> {
    require_sparse_kernels(dev)?;
    let mut l = loaded().lock().map_err(|_| Error::Cuda("kernel cache poisoned".into()))?;
    if let Some(g) = l.unstructured.get(&dev.ordinal()) {
        return Ok(g.clone());
    }
    let g = Arc::new(UnstructuredGemm::load(dev.context())?);
    l.unstructured.insert(dev.ordinal(), g.clone());
    Ok(g)
}

impl From<Sparse24Weight> for Weight {
    fn from(w: Sparse24Weight) -> Weight {
        Weight::Sparse24(w)
    }
}

impl From<BitmapWeight> for Weight {
    fn from(w: BitmapWeight) -> Weight {
        Weight::Bitmap(w)
    }
}

impl SparseLinear {
    /// Places `weight` on `device`: kept as it is for the CPU; packed into the kernel layout,
    /// uploaded, and the kernel module loaded for CUDA (once per layer: build layers once and
    /// reuse them).
    ///
    /// Errors: a malformed weight (sizes, metadata, bitmap and offsets that disagree), a dense
    /// weight or `in_features % 8 != 0` on CUDA, CUDA driver failures.
    pub fn new(weight: Weight, device: &Device) -> Result<SparseLinear> {
        let (out_features, in_features) = weight.dims2()?;
        let imp = match device {
            Device::Cpu => {
                validate_host(&weight)?;
                Imp::Cpu(weight)
            }
            Device::Cuda(dev) if !dev.arch_mode().sparse_kernels() => {
                if matches!(weight, Weight::Dense(_)) {
                    return Err(Error::Invalid(
                        "SparseLinear on CUDA takes 2:4 or bitmap weights; a dense weight runs on the CPU"
                            .into(),
                    ));
                }
                validate_host(&weight)?;
                let dense = OnceLock::from(cuda::weight_to_dense(&weight, device)?);
                Imp::CudaDense { device: dev.clone(), dense }
            }
            Device::Cuda(dev) => {
                if !in_features.is_multiple_of(8) {
                    return Err(Error::Invalid(format!(
                        "the CUDA sparse kernels need in_features % 8 == 0, got {in_features}"
                    )));
                }
                match &weight {
                    Weight::Sparse24(w) => {
                        let kernels = sparse24_kernels(dev)?;
                        let weight = Sparse24Gpu::upload(dev.stream(), &Sparse24Packed::pack(w)?)?;
                        Imp::Cuda24 { device: dev.clone(), kernels, weight, dense: OnceLock::new() }
                    }
                    Weight::Bitmap(w) => {
                        let gemm = unstructured_gemm(dev)?;
                        let weight =
                            DeviceTiledWeight::upload(dev.stream(), &TiledBitmapWeight::from_bitmap(w)?)?;
                        Imp::CudaBitmap { device: dev.clone(), gemm, weight, dense: OnceLock::new() }
                    }
                    Weight::Dense(_) => return Err(Error::Invalid(
                        "SparseLinear on CUDA takes 2:4 or bitmap weights; a dense weight runs on the CPU"
                            .into(),
                    )),
                }
            }
        };
        Ok(SparseLinear { out_features, in_features, imp, interleaved: false, own_bias: None })
    }

    /// A GEGLU projection `W[2H, K]` (rows `..H` the value, `H..` the gate, as diffusers'
    /// `GEGLU.proj`) with its bias `[2H]`, placed for the fused GEGLU epilogue of
    /// [`Self::forward_fused`]: on CUDA a 2:4 weight with `H % 64 == 0` is stored with its rows
    /// and bias interleaved once ([`geglu_interleave`]); any other weight or device is placed
    /// as by [`Self::new`]. Every call gives the canonical result (a call without
    /// [`LinearAct::Geglu`], or the dense fallback, puts the columns back in order).
    ///
    /// The layer holds its bias: pass `None` as the `bias` of [`Self::forward`] and
    /// [`Self::forward_fused`]. Errors as [`Self::new`], and on a bias that is not `[2H]`.
    pub fn new_geglu(weight: Weight, bias: Option<&Tensor>, device: &Device) -> Result<SparseLinear> {
        let (n, _) = weight.dims2()?;
        if let Some(b) = bias.filter(|b| b.shape() != [n]) {
            return Err(Error::Shape(format!("GEGLU projection: bias {:?} for {n} rows", b.shape())));
        }
        match (&weight, device) {
            // Only where the 2:4 kernels run (a dense-only GPU keeps the canonical expansion).
            (Weight::Sparse24(w), Device::Cuda(dev))
                if geglu_interleavable(n) && dev.arch_mode().sparse_kernels() =>
            {
                let host_bias = bias.map(|b| b.to_vec()).transpose()?;
                let (w, b) = geglu_interleave(w, host_bias.as_deref())?;
                let mut layer = SparseLinear::new(Weight::Sparse24(w), device)?;
                let b = b.map(|b| ops::to_device(&Tensor::from_vec(b, &[n])?, device)).transpose()?;
                layer.interleaved = true;
                layer.own_bias = Some(b);
                Ok(layer)
            }
            _ => {
                let mut layer = SparseLinear::new(weight, device)?;
                layer.own_bias = Some(bias.cloned());
                Ok(layer)
            }
        }
    }

    /// Whether the layer holds its bias ([`Self::new_geglu`]).
    pub fn owns_bias(&self) -> bool {
        self.own_bias.is_some()
    }

    /// Whether the device rows are GEGLU-interleaved ([`Self::new_geglu`] on CUDA).
    pub fn is_interleaved(&self) -> bool {
        self.interleaved
    }

    /// `N`, the rows of the weight.
    pub fn out_features(&self) -> usize {
        self.out_features
    }

    /// `K`, the columns of the weight (the activations' last dimension).
    pub fn in_features(&self) -> usize {
        self.in_features
    }

    /// `y[.., N] = x[.., K] · W^T (+ bias[N])`. Host `x` and `bias` give a host result; on
    /// CUDA, GPU tensors `x` and `bias` give a GPU result. Errors on shapes that do not fit the
    /// weight and on CUDA failures.
    pub fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        self.forward_fused(x, bias, LinearAct::None, None)
    }

    /// `y = act(x[.., K] · W^T + bias[N]) + residual`: `[.., N]`, or `[.., N/2]` for
    /// [`LinearAct::Geglu`]; `residual` has the output's shape. On CUDA the sparse kernels run
    /// what their epilogue can ([`plan_epilogue`]: GELU, GEGLU on a [`Self::new_geglu`] 2:4
    /// layer, an f16 residual) and the rest runs as separate ops in the same order; on the CPU
    /// (and in the dense fallback) everything after the product is a separate op.
    /// Errors as [`Self::forward`], and on a residual of another shape or an odd `N` for GEGLU.
    pub fn forward_fused(
        &self,
        x: &Tensor,
        bias: Option<&Tensor>,
        act: LinearAct,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (n, k) = (self.out_features, self.in_features);
        if x.rank() == 0 || x.shape().last() != Some(&k) {
            return Err(Error::Shape(format!(
                "SparseLinear: input {:?} does not end in the weight's {k} input features",
                x.shape()
            )));
        }
        if let Some(b) = bias {
            if b.shape() != [n] {
                return Err(Error::Shape(format!(
                    "SparseLinear: bias {:?} for {n} output features",
                    b.shape()
                )));
            }
        }
        let bias = match (&self.own_bias, bias) {
            (Some(_), Some(_)) => {
                return Err(Error::Invalid(
                    "SparseLinear: this GEGLU projection holds its bias; pass None".into(),
                ))
            }
            (Some(own), None) => own.as_ref(),
            (None, b) => b,
        };
        if act == LinearAct::Geglu && !n.is_multiple_of(2) {
            return Err(Error::Shape(format!("SparseLinear: GEGLU needs an even N, got {n}")));
        }
        let n_final = if act == LinearAct::Geglu { n / 2 } else { n };
        check_residual(x, n_final, residual)?;
        let m = x.numel() / k.max(1);
        let interleaved = self.interleaved;
        match &self.imp {
            Imp::Cpu(w) => linear_then_ops(x, w, bias, act, residual),
            _ if m == 0 => empty_like(x, &out_shape(x, n_final)),
            Imp::CudaDense { device, dense } => {
                let y = dense_fallback(device, dense, x, bias, || {
                    Err(Error::Cuda("expanded at placement".into()))
                })?;
                let plan = plan_epilogue(None, interleaved, act, residual.map(|_| false));
                finish(y, &plan, residual)
            }
            Imp::Cuda24 { device, kernels, weight, dense } => {
                let call = Call { x, bias, act, residual, interleaved, mnk: (m, n, k) };
                let (name, plan, epi) = match call.route(
                    device,
                    Family::Sparse24,
                    dense,
                    &mut || sp24_candidates(kernels, m, n, k),
                    &mut |epi| Ok(Box::new(Sp24Probe::new(device, kernels, m, n, k, epi)?)),
                    || sp24_decode(device, weight),
                )? {
                    Route::Kernel { name, plan, epi } => (name, plan, epi),
                    Route::Done(y) => return Ok(y),
                };
                let variant = sp24_variant(kernels, &name)?;
                let n_out = if epi.geglu { n / 2 } else { n };
                let y = {
                    let _p = profile::scope(OpKind::Linear24);
                    let (xd, bd) = operands(device, x, bias)?;
                    let mut yd = f16_output(device, m * n_out)?;
                    let r_bits = residual_bits(device, residual, epi.residual)?;
                    let kepi = Sp24Epilogue {
                        bias: bd.as_deref(),
                        residual: r_bits.as_deref(),
                        gelu: epi.gelu,
                        geglu: epi.geglu,
                    };
                    let x_bits = F16Bits::of(device, f16_values(&xd)?);
                    let mut y_bits = F16Bits::of_mut(device, &mut yd);
                    kernels.gemm(device.stream(), variant, &x_bits, m, weight, &kepi, &mut y_bits)?;
                    drop((x_bits, y_bits, r_bits));
                    result(device, x, yd, &out_shape(x, n_out))?
                };
                finish(y, &plan, residual)
            }
            Imp::CudaBitmap { device, gemm, weight, dense } => {
                let call = Call { x, bias, act, residual, interleaved, mnk: (m, n, k) };
                let (name, plan, epi) = match call.route(
                    device,
                    Family::Unstructured,
                    dense,
                    &mut || uns_candidates(gemm, m, n, k),
                    &mut |epi| Ok(Box::new(UnsProbe::new(device, gemm, m, n, k, epi)?)),
                    || uns_decode(device, weight),
                )? {
                    Route::Kernel { name, plan, epi } => (name, plan, epi),
                    Route::Done(y) => return Ok(y),
                };
                let variant = uns_variant(&name)?;
                let y = {
                    let _p = profile::scope(OpKind::LinearUnstructured);
                    let (xd, bd) = operands(device, x, bias)?;
                    let mut yd = f16_output(device, m * n)?;
                    let r_bits = residual_bits(device, residual, epi.residual)?;
                    let kepi = Epilogue { bias: bd.as_deref(), gelu: epi.gelu, residual: r_bits.as_deref() };
                    let x_bits = F16Bits::of(device, f16_values(&xd)?);
                    let mut y_bits = F16Bits::of_mut(device, &mut yd);
                    let plan = GemmPlan::choose_for(variant, m, n, k, weight.gpu_bytes, gemm.sm_count());
                    gemm.forward_plan(device.stream(), plan, &x_bits, m, weight, &kepi, &mut y_bits)?;
                    drop((x_bits, y_bits, r_bits));
                    result(device, x, yd, &out_shape(x, n))?
                };
                finish(y, &plan, residual)
            }
        }
    }
}

/// One fused forward call on a sparse-kernel layer (`mnk`: rows, output and input features).
struct Call<'a> {
    x: &'a Tensor,
    bias: Option<&'a Tensor>,
    act: LinearAct,
    residual: Option<&'a Tensor>,
    interleaved: bool,
    mnk: (usize, usize, usize),
}

/// What the self-checking dispatch made of a [`Call`].
enum Route {
    /// Run kernel variant `name` with the fused epilogue `epi`, then what `plan` leaves.
    Kernel { name: String, plan: EpiloguePlan, epi: EpilogueClass },
    /// No variant agreed for the class: the result of decompress + cuBLAS and the separate ops.
    Done(Tensor),
}

impl Call<'_> {
    /// The epilogue to fuse (the residual only when it and the activations are f16 on this GPU),
    /// the shape class with that epilogue, and the dispatch's choice for it (`probe` builds the
    /// first-use check of a variant with that epilogue on; `decode` expands the weight for the
    /// fallback). Shared by the 2:4 and the tiled-bitmap layers.
    fn route(
        &self,
        device: &CudaDevice,
        family: Family,
        dense: &OnceLock<Tensor>,
        candidates: &mut dyn FnMut() -> Vec<String>,
        probe: &mut dyn FnMut(EpilogueClass) -> Result<Box<dyn KernelProbe>>,
        decode: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Route> {
        let (m, n, k) = self.mnk;
        let fusable = self.residual.map(|r| is_f16_on(self.x, device) && is_f16_on(r, device));
        let plan = plan_epilogue(Some(family), self.interleaved, self.act, fusable);
        let epi = plan.fused.unwrap_or_default();
        let class = ShapeClass::new(family, m, n, k).with_epilogue(epi);
        match dispatch(device, class, candidates, &mut || probe(epi))? {
            Choice::Kernel(name) => Ok(Route::Kernel { name, plan, epi }),
            Choice::Dense => {
                let y = dense_fallback(device, dense, self.x, self.bias, decode)?;
                let plan = plan_epilogue(None, self.interleaved, self.act, fusable);
                Ok(Route::Done(finish(y, &plan, self.residual)?))
            }
        }
    }
}

/// The f16 residual as the kernels' `u16` operand when the epilogue adds it (`fused`: the plan
/// put it in the kernel; [`plan_epilogue`] only does so for an f16 GPU tensor), else `None`.
fn residual_bits<'a>(
    device: &CudaDevice,
    residual: Option<&'a Tensor>,
    fused: bool,
) -> Result<Option<F16Bits<'a>>> {
    match residual.filter(|_| fused) {
        Some(r) => Ok(Some(F16Bits::of(device, f16_values(r)?))),
        None => Ok(None),
    }
}

/// The result of a product with no rows: an empty tensor of `shape` where `x` lives (on a GPU
/// in `x`'s dtype, the one-element allocation every empty GPU tensor of the backend has).
fn empty_like(x: &Tensor, shape: &[usize]) -> Result<Tensor> {
    match x.storage() {
        Storage::Cpu(_) => Ok(Tensor::zeros(shape)),
        Storage::Cuda(s) => {
            let dev = s.device();
            let v = DeviceValues::poisoned(&dev, x.dtype(), 1)?;
            Ok(Tensor::from_storage(Storage::Cuda(CudaStorage::from_values(&dev, v)), shape))
        }
    }
}

/// `x`'s shape with the last dim replaced by `n`.
fn out_shape(x: &Tensor, n: usize) -> Vec<usize> {
    let mut shape = x.shape().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = n;
    }
    shape
}

// ---------------------------------------------------------------------------------------
// Self-checking dispatch (crate::tune): the GPU side of the first-use check
// ---------------------------------------------------------------------------------------

/// The tuner's key for this GPU: model, driver version and the embedded kernels' CRC-32.
fn gpu_key(device: &CudaDevice) -> GpuKey {
    static KERNELS: OnceLock<String> = OnceLock::new();
    static DRIVER: OnceLock<i32> = OnceLock::new();
    let kernels = KERNELS.get_or_init(|| format!("{:08x}", kernels::fatbin().map_or(0, crc32fast::hash)));
    let driver = *DRIVER.get_or_init(|| {
        let mut v = 0;
        // SAFETY: writes one int; the driver is loaded (a CudaDevice exists).
        let _ = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
        v
    });
    GpuKey { gpu: device.gpu_name().to_string(), driver, kernels: kernels.clone() }
}

/// The choice for `class`: the tuner's (first-use check, cache), or with `SDSPARSE_TUNE=off`
/// the heuristic's first candidate unchecked. Notes go to stderr, one line each.
fn dispatch(
    device: &CudaDevice,
    class: ShapeClass,
    candidates: &mut dyn FnMut() -> Vec<String>,
    make_probe: &mut dyn FnMut() -> Result<Box<dyn KernelProbe>>,
) -> Result<Choice> {
    if !tune::enabled() {
        let first = candidates().into_iter().next();
        return first
            .map(Choice::Kernel)
            .ok_or_else(|| Error::Cuda(format!("no kernel variant for {class}")));
    }
    let mut tuner = tune::tuner().lock().map_err(|_| Error::Cuda("kernel tuner poisoned".into()))?;
    tuner.choose(&gpu_key(device), class, make_probe, &mut |note| eprintln!("note: {note}"))
}

/// Runs the layer as decompress + cuBLAS (its class had no agreeing kernel): the weight is
/// expanded to dense f32 on the GPU once, then every call is `ops::linear` (SGEMM).
fn dense_fallback(
    device: &CudaDevice,
    dense: &OnceLock<Tensor>,
    x: &Tensor,
    bias: Option<&Tensor>,
    decode: impl FnOnce() -> Result<Tensor>,
) -> Result<Tensor> {
    let w = match dense.get() {
        Some(w) => w.clone(),
        None => {
            let w = decode()?;
            let _ = dense.set(w.clone());
            w
        }
    };
    let gpu = Device::Cuda(device.clone());
    let on_host = matches!(x.storage(), Storage::Cpu(_));
    // In f32 (the expanded weight's dtype), the result back in the input's dtype.
    let xg = ops::to_device(x, &gpu)?.to_dtype(DType::F32)?;
    let bg = bias.map(|b| ops::to_device(b, &gpu)?.to_dtype(DType::F32)).transpose()?;
    let y = ops::linear(&xg, &Weight::Dense(w), bg.as_ref())?;
    if on_host {
        ops::to_device(&y, &Device::Cpu)
    } else {
        y.to_dtype(x.dtype())
    }
}

/// The dense f32 `[n, k]` GPU weight of a packed 2:4 weight (downloaded, decoded as the kernels
/// read it, uploaded: done once per layer, only on fallback).
fn sp24_decode(device: &CudaDevice, w: &Sparse24Gpu) -> Result<Tensor> {
    let values = device.dtoh(&w.values)?.into_iter().map(f16::from_bits).collect();
    let packed = Sparse24Packed {
        n: w.n,
        k: w.k,
        n_pad: w.n_pad,
        k_pad: w.k_pad,
        values,
        meta: device.dtoh(&w.meta)?,
    };
    ops::to_device(&Tensor::from_vec(packed.decode_dense(), &[w.n, w.k])?, &Device::Cuda(device.clone()))
}

/// As [`sp24_decode`] for a tiled bitmap weight.
fn uns_decode(device: &CudaDevice, w: &DeviceTiledWeight) -> Result<Tensor> {
    let tiled = TiledBitmapWeight {
        rows: w.rows,
        cols: w.cols,
        tiles_n: w.rows.div_ceil(crate::backend::cuda::unstructured::TILE_N),
        tiles_k: w.tiles_k,
        bitmap: device.dtoh(&w.bitmap)?,
        tile_offsets: device.dtoh(&w.tile_offsets)?,
        values: device.dtoh(&w.values)?.into_iter().map(f16::from_bits).collect(),
    };
    ops::to_device(&Tensor::from_vec(tiled.to_dense(), &[w.rows, w.cols])?, &Device::Cuda(device.clone()))
}

/// The 2:4 variants this GPU runs, the heuristic's choice for `(m, n, k)` first; the `v1`
/// oracle is left out (it is the correctness reference of the tests, never fast).
fn sp24_candidates(kernels: &Sp24Kernels, m: usize, n: usize, k: usize) -> Vec<String> {
    let first = kernels.choose(m, n, k);
    let mut names = vec![first.name()];
    for v in Sp24Variant::all_for(kernels.compute_capability()) {
        if v != first && v != Sp24Variant::Direct {
            names.push(v.name());
        }
    }
    names
}

fn sp24_variant(kernels: &Sp24Kernels, name: &str) -> Result<Sp24Variant> {
    Sp24Variant::all_for(kernels.compute_capability())
        .into_iter()
        .find(|v| v.name() == name)
        .ok_or_else(|| Error::Cuda(format!("no 2:4 kernel variant {name} on this GPU")))
}

/// The unstructured variants this GPU runs (split-K planned per variant as the dispatcher
/// plans it), the heuristic's first; the naive oracle is left out.
fn uns_candidates(gemm: &UnstructuredGemm, m: usize, _n: usize, _k: usize) -> Vec<String> {
    let first = GemmVariant::for_rows(m);
    let mut names = vec![first.name().to_string()];
    for v in [GemmVariant::Bm32, GemmVariant::Bm64, GemmVariant::Bm128, GemmVariant::WgmmaBm128] {
        if v != first && gemm.supports(v) {
            names.push(v.name().to_string());
        }
    }
    names
}

fn uns_variant(name: &str) -> Result<GemmVariant> {
    GemmVariant::ALL
        .into_iter()
        .find(|v| v.name() == name)
        .ok_or_else(|| Error::Cuda(format!("no unstructured kernel variant {name}")))
}

/// Milliseconds per call of `launch` (CUDA events over 5 calls after one warm-up).
fn time_launches(device: &CudaDevice, launch: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    const REPS: usize = 5;
    let err = |e: cudarc::driver::DriverError| Error::Cuda(format!("timing events: {e}"));
    launch()?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let start = device.context().new_event(flags).map_err(err)?;
    let end = device.context().new_event(flags).map_err(err)?;
    start.record(device.stream()).map_err(err)?;
    for _ in 0..REPS {
        launch()?;
    }
    end.record(device.stream()).map_err(err)?;
    Ok(f64::from(start.elapsed_ms(&end).map_err(err)?) / REPS as f64)
}

/// Random f16 activations `[m, k]` on the GPU (bits) and the same values as an f32 GPU tensor.
fn random_input(device: &CudaDevice, m: usize, k: usize) -> Result<(cudarc::driver::CudaSlice<u16>, Tensor)> {
    let mut rng = crate::backend::test_util::TestRng::new(0x5eed_0000 ^ (m * 31 + k) as u64);
    let x = rng.vec_f16(m * k, 1.0);
    let bits = crate::backend::test_util::to_f16_bits(&x);
    let xt = ops::to_device(&Tensor::from_vec(x, &[m, k])?, &Device::Cuda(device.clone()))?;
    Ok((device.htod(&bits)?, xt))
}

/// The epilogue operands of a first-use check: a random f32 bias `[n]` (on the GPU in the
/// weight's device row order, and canonical for the reference) and, when the class fuses one,
/// a random f16 residual `[m, n_out]` (bits for the kernel, f32 values for the reference).
struct ProbeEpilogue {
    epi: EpilogueClass,
    bias: Tensor,
    bias_dev: CudaSlice<f32>,
    residual: Option<(CudaSlice<u16>, Tensor)>,
}

impl ProbeEpilogue {
    /// `bias` canonical, `bias_dev` as the kernel's rows are ordered.
    fn new(
        device: &CudaDevice,
        rng: &mut crate::backend::test_util::TestRng,
        m: usize,
        n: usize,
        epi: EpilogueClass,
        bias: Vec<f32>,
        bias_dev: &[f32],
    ) -> Result<ProbeEpilogue> {
        let gpu = Device::Cuda(device.clone());
        let n_out = if epi.geglu { n / 2 } else { n };
        let residual = if epi.residual {
            let r = rng.vec_f16(m * n_out, 1.0);
            let bits = device.htod(&crate::backend::test_util::to_f16_bits(&r))?;
            Some((bits, ops::to_device(&Tensor::from_vec(r, &[m, n_out])?, &gpu)?))
        } else {
            None
        };
        Ok(ProbeEpilogue {
            epi,
            bias: ops::to_device(&Tensor::from_vec(bias, &[n])?, &gpu)?,
            bias_dev: device.htod(bias_dev)?,
            residual,
        })
    }

    fn kernel_operands(&self) -> (Option<&CudaSlice<f32>>, Option<&CudaSlice<u16>>) {
        (Some(&self.bias_dev), self.residual.as_ref().map(|r| &r.0))
    }

    /// cuBLAS on the decompressed (canonical) weight with the bias, then the epilogue as the
    /// separate ops the unfused path runs: f32, `[m, n_out]`.
    fn reference(&self, x: &Tensor, dense_w: &Tensor) -> Result<Vec<f32>> {
        let act = match (self.epi.gelu, self.epi.geglu) {
            (true, _) => LinearAct::Gelu,
            (_, true) => LinearAct::Geglu,
            _ => LinearAct::None,
        };
        let r = self.residual.as_ref().map(|r| &r.1);
        linear_then_ops(x, &Weight::Dense(dense_w.clone()), Some(&self.bias), act, r)?.to_vec()
    }
}

/// The first-use check of the 2:4 kernels on one shape class: a random 2:4 weight `[n, k]`
/// (row-interleaved for a GEGLU class), random activations `[m, k]`, the class's epilogue, and
/// cuBLAS on the canonical weight decompressed by the decompression kernel plus the separate
/// epilogue ops as the reference.
struct Sp24Probe {
    device: CudaDevice,
    kernels: Arc<Sp24Kernels>,
    m: usize,
    n: usize,
    k: usize,
    x: cudarc::driver::CudaSlice<u16>,
    x_f32: Tensor,
    w: Sparse24Gpu,
    dense_w: Tensor,
    epi: ProbeEpilogue,
}

impl Sp24Probe {
    fn new(
        device: &CudaDevice,
        kernels: &Arc<Sp24Kernels>,
        m: usize,
        n: usize,
        k: usize,
        epi: EpilogueClass,
    ) -> Result<Sp24Probe> {
        let mut rng = crate::backend::test_util::TestRng::new(0x24 ^ (n * 131 + k) as u64);
        let w = crate::backend::test_util::random_sparse24(&mut rng, n, k, crate::format::DType::F16);
        let dense_w = crate::backend::cuda::weight_to_dense(
            &Weight::Sparse24(w.clone()),
            &Device::Cuda(device.clone()),
        )?;
        let (x, x_f32) = random_input(device, m, k)?;
        let bias = rng.vec(n);
        let (w, bias_dev) = if epi.geglu {
            let (w, b) = geglu_interleave(&w, Some(&bias))?;
            (w, b.unwrap_or_default())
        } else {
            (w, bias.clone())
        };
        let epi = ProbeEpilogue::new(device, &mut rng, m, n, epi, bias, &bias_dev)?;
        let w = Sparse24Gpu::upload(device.stream(), &Sparse24Packed::pack(&w)?)?;
        Ok(Sp24Probe { device: device.clone(), kernels: kernels.clone(), m, n, k, x, x_f32, w, dense_w, epi })
    }
    fn n_out(&self) -> usize {
        if self.epi.epi.geglu {
            self.n / 2
        } else {
            self.n
        }
    }
    fn launch(&self, variant: Sp24Variant, y: &mut cudarc::driver::CudaSlice<u16>) -> Result<()> {
        let (bias, residual) = self.epi.kernel_operands();
        let epi = Sp24Epilogue { bias, residual, gelu: self.epi.epi.gelu, geglu: self.epi.epi.geglu };
        self.kernels.gemm(self.device.stream(), variant, &self.x, self.m, &self.w, &epi, y)
    }
}

impl KernelProbe for Sp24Probe {
    fn candidates(&self) -> Vec<String> {
        sp24_candidates(&self.kernels, self.m, self.n, self.k)
    }
    fn reference(&mut self) -> Result<Vec<f32>> {
        self.epi.reference(&self.x_f32, &self.dense_w)
    }
    fn run(&mut self, candidate: &str) -> Result<Vec<f32>> {
        let variant = sp24_variant(&self.kernels, candidate)?;
        let mut y = self.device.alloc_zeros::<u16>(self.m * self.n_out())?;
        self.launch(variant, &mut y)?;
        Ok(self.device.dtoh(&y)?.into_iter().map(|b| f16::from_bits(b).to_f32()).collect())
    }
    fn time_ms(&mut self, candidate: &str) -> Result<f64> {
        let variant = sp24_variant(&self.kernels, candidate)?;
        let mut y = self.device.alloc_zeros::<u16>(self.m * self.n_out())?;
        let device = self.device.clone();
        time_launches(&device, &mut || self.launch(variant, &mut y))
    }
}

/// The first-use check of the unstructured kernels on one shape class (a random bitmap weight
/// at 50% density; otherwise as [`Sp24Probe`]; no GEGLU epilogue in this family).
struct UnsProbe {
    device: CudaDevice,
    gemm: Arc<UnstructuredGemm>,
    m: usize,
    n: usize,
    k: usize,
    x: cudarc::driver::CudaSlice<u16>,
    x_f32: Tensor,
    w: DeviceTiledWeight,
    dense_w: Tensor,
    epi: ProbeEpilogue,
}

impl UnsProbe {
    fn new(
        device: &CudaDevice,
        gemm: &Arc<UnstructuredGemm>,
        m: usize,
        n: usize,
        k: usize,
        epi: EpilogueClass,
    ) -> Result<UnsProbe> {
        if epi.geglu {
            return Err(Error::Invalid("the unstructured kernels have no GEGLU epilogue".into()));
        }
        let mut rng = crate::backend::test_util::TestRng::new(0xb17 ^ (n * 131 + k) as u64);
        let w = crate::backend::test_util::random_bitmap(&mut rng, n, k, 0.5, crate::format::DType::F16);
        let dense_w =
            crate::backend::cuda::weight_to_dense(&Weight::Bitmap(w.clone()), &Device::Cuda(device.clone()))?;
        let (x, x_f32) = random_input(device, m, k)?;
        let bias = rng.vec(n);
        let epi = ProbeEpilogue::new(device, &mut rng, m, n, epi, bias.clone(), &bias)?;
        let w = DeviceTiledWeight::upload(device.stream(), &TiledBitmapWeight::from_bitmap(&w)?)?;
        Ok(UnsProbe { device: device.clone(), gemm: gemm.clone(), m, n, k, x, x_f32, w, dense_w, epi })
    }
    fn launch(&self, variant: GemmVariant, y: &mut cudarc::driver::CudaSlice<u16>) -> Result<()> {
        let plan =
            GemmPlan::choose_for(variant, self.m, self.n, self.k, self.w.gpu_bytes, self.gemm.sm_count());
        let (bias, residual) = self.epi.kernel_operands();
        let epi = Epilogue { bias, gelu: self.epi.epi.gelu, residual };
        self.gemm.forward_plan(self.device.stream(), plan, &self.x, self.m, &self.w, &epi, y)
    }
}

impl KernelProbe for UnsProbe {
    fn candidates(&self) -> Vec<String> {
        uns_candidates(&self.gemm, self.m, self.n, self.k)
    }
    fn reference(&mut self) -> Result<Vec<f32>> {
        self.epi.reference(&self.x_f32, &self.dense_w)
    }
    fn run(&mut self, candidate: &str) -> Result<Vec<f32>> {
        let variant = uns_variant(candidate)?;
        let mut y = self.device.alloc_zeros::<u16>(self.m * self.n)?;
        self.launch(variant, &mut y)?;
        Ok(self.device.dtoh(&y)?.into_iter().map(|b| f16::from_bits(b).to_f32()).collect())
    }
    fn time_ms(&mut self, candidate: &str) -> Result<f64> {
        let variant = uns_variant(candidate)?;
        let mut y = self.device.alloc_zeros::<u16>(self.m * self.n)?;
        let device = self.device.clone();
        time_launches(&device, &mut || self.launch(variant, &mut y))
    }
}

/// The CPU path checks a compressed weight's internal sizes up front (the CUDA path's packing
/// does the same), so a malformed weight fails at `new`, not inside the first product.
fn validate_host(w: &Weight) -> Result<()> {
    match w {
        Weight::Dense(t) => t.dims2().map(drop),
        Weight::Sparse24(s) => s.validate(),
        Weight::Bitmap(b) => crate::backend::cuda::unstructured::validate(b),
    }
}

/// A device bias: borrowed from a GPU tensor, or uploaded from a host one.
enum DeviceBias<'a> {
    Borrowed(&'a cudarc::driver::CudaSlice<f32>),
    Owned(cudarc::driver::CudaSlice<f32>),
}

impl std::ops::Deref for DeviceBias<'_> {
    type Target = cudarc::driver::CudaSlice<f32>;
    fn deref(&self) -> &Self::Target {
        match self {
            DeviceBias::Borrowed(b) => b,
            DeviceBias::Owned(b) => b,
        }
    }
}

/// The activations as an f16 GPU tensor and the bias as f32 on the GPU (what the kernels'
/// epilogue reads).
type Operands<'a> = (Tensor, Option<DeviceBias<'a>>);

/// `x` in f16 on the GPU: shared when it is an f16 GPU tensor already (the pipeline's CUDA
/// default, no copy), converted by the cast kernels for f32 / bf16 GPU tensors, rounded on the
/// host and uploaded for host tensors. `bias` as f32 on the GPU likewise.
fn operands<'a>(device: &CudaDevice, x: &Tensor, bias: Option<&'a Tensor>) -> Result<Operands<'a>> {
    let xd = cuda::to_cuda_as(x, device, DType::F16)?;
    let bd = match bias.map(|b| (b, b.storage())) {
        None => None,
        Some((_, Storage::Cuda(s))) if s.dtype() == DType::F32 => Some(DeviceBias::Borrowed(s.slice()?)),
        Some((b, _)) => Some(DeviceBias::Owned(device.htod(&b.to_vec()?)?)),
    };
    Ok((xd, bd))
}

/// The f16 buffer of an f16 GPU tensor made by [`operands`].
fn f16_values(t: &Tensor) -> Result<&CudaSlice<f16>> {
    match t.storage() {
        Storage::Cuda(s) => match s.values() {
            DeviceValues::F16(v) => Ok(v),
            other => Err(Error::Cuda(format!("expected f16 activations, found {}", other.dtype().name()))),
        },
        Storage::Cpu(_) => Err(Error::Cuda("expected a GPU tensor".into())),
    }
}

/// A NaN-poisoned f16 output (an element a kernel misses shows as NaN).
fn f16_output(device: &CudaDevice, len: usize) -> Result<CudaSlice<f16>> {
    device.alloc_poisoned(len.max(1))
}

/// The f16 result in `x`'s dtype: a GPU tensor when `x` was one (f16 as it is, else converted
/// by the cast kernels), else a host f32 tensor (waits for the kernel; reports its errors).
fn result(device: &CudaDevice, x: &Tensor, yd: CudaSlice<f16>, shape: &[usize]) -> Result<Tensor> {
    if let Storage::Cuda(_) = x.storage() {
        let y = Tensor::from_storage(
            Storage::Cuda(CudaStorage::from_values(device, DeviceValues::F16(yd))),
            shape,
        );
        return y.to_dtype(x.dtype());
    }
    let y = device.dtoh(&yd)?;
    Tensor::from_vec(y.into_iter().map(|v| v.to_f32()).collect(), shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_util::{
        check_close, random_bitmap, random_sparse24, TestRng, GPU_ELEM_TOL, GPU_NORM_TOL,
    };
    use crate::format::DType;
    use crate::tune::{decide, measure, Measurement};

    /// Wraps a real GPU probe and moves one output element of one variant: the planted bug
    /// the first-use check must catch on the GPU.
    struct Planted<P: KernelProbe> {
        inner: P,
        bad: String,
    }

    impl<P: KernelProbe> KernelProbe for Planted<P> {
        fn candidates(&self) -> Vec<String> {
            self.inner.candidates()
        }
        fn reference(&mut self) -> Result<Vec<f32>> {
            self.inner.reference()
        }
        fn run(&mut self, candidate: &str) -> Result<Vec<f32>> {
            let mut y = self.inner.run(candidate)?;
            if candidate == self.bad {
                y[123] += 1.0 + y[123].abs();
            }
            Ok(y)
        }
        fn time_ms(&mut self, candidate: &str) -> Result<f64> {
            self.inner.time_ms(candidate)
        }
    }

    fn report(ms: &[Measurement]) {
        for m in ms {
            println!("  {:<14} {:?} {:?} ms", m.candidate, m.check, m.ms);
        }
    }

    /// On a GPU: every 2:4 and unstructured variant agrees with cuBLAS on an SD2 shape, the
    /// fastest is chosen, and a variant with a planted one-element bug is rejected (and would
    /// have been the choice: it is planted on the fastest).
    fn first_use_check_on_real_kernels(device: &Device) -> Result<()> {
        let Device::Cuda(dev) = device else { return Ok(()) };
        if !dev.arch_mode().sparse_kernels() {
            // Dense-only GPU: the kernels are refused before anything is loaded or launched.
            assert!(sparse24_kernels(dev).is_err() && unstructured_gemm(dev).is_err());
            return Ok(());
        }
        let (m, n, k) = (154, 320, 1024);
        let kernels = sparse24_kernels(dev)?;
        let mut probe = Sp24Probe::new(dev, &kernels, m, n, k, EpilogueClass::default())?;
        let ms = measure(&mut probe)?;
        println!("2:4 [{m}, {n}, {k}] on {}:", dev.gpu_name());
        report(&ms);
        let Choice::Kernel(best) = decide(&ms) else {
            return Err(Error::Msg(format!("no 2:4 variant agreed with cuBLAS: {ms:?}")));
        };
        let mut planted = Planted { inner: probe, bad: best.clone() };
        let ms2 = measure(&mut planted)?;
        report(&ms2);
        assert!(ms2.iter().any(|m| m.candidate == best && m.check.is_err()), "planted bug not caught");
        assert_ne!(decide(&ms2), Choice::Kernel(best));

        let gemm = unstructured_gemm(dev)?;
        let mut probe = UnsProbe::new(dev, &gemm, m, n, k, EpilogueClass::default())?;
        let ms = measure(&mut probe)?;
        println!("unstructured [{m}, {n}, {k}]:");
        report(&ms);
        assert!(ms.iter().all(|m| m.check.is_ok()), "an unstructured variant disagrees: {ms:?}");

        // The checks with the epilogue on (the classes the fused layers use): every variant
        // agrees with cuBLAS + the separate ops, so the probes' references compose right.
        let geglu = EpilogueClass { geglu: true, ..Default::default() };
        let res = EpilogueClass { residual: true, ..Default::default() };
        let gelu_res = EpilogueClass { gelu: true, residual: true, ..Default::default() };
        for (n, k, epi) in [(2560, 320, geglu), (320, 1280, res), (1024, 256, gelu_res)] {
            let ms = measure(&mut Sp24Probe::new(dev, &kernels, m, n, k, epi)?)?;
            println!("2:4 [{m}, {n}, {k}] {epi:?}:");
            report(&ms);
            assert!(ms.iter().all(|m| m.check.is_ok()), "a 2:4 variant disagrees with {epi:?}: {ms:?}");
        }
        for (n, k, epi) in [(320, 1280, res), (1024, 256, gelu_res)] {
            let ms = measure(&mut UnsProbe::new(dev, &gemm, m, n, k, epi)?)?;
            println!("unstructured [{m}, {n}, {k}] {epi:?}:");
            report(&ms);
            assert!(
                ms.iter().all(|m| m.check.is_ok()),
                "an unstructured variant disagrees with {epi:?}: {ms:?}"
            );
        }
        Ok(())
    }
    crate::test_device!(first_use_check_on_real_kernels);

    /// The GEGLU epilogue of `cuda/sparse24_gemm.cu` (`epilogue_tile` with SP24_FLAG_GEGLU)
    /// on the host: output column `o` reads value row `128 (o / 64) + o % 64` of the product
    /// with the interleaved weight `y_dev[m, n]`, and its gate 64 rows later.
    fn kernel_geglu_epilogue(y_dev: &[f32], m: usize, n: usize) -> Vec<f32> {
        let gelu =
            |v: f64| 0.5 * v * (1.0 + crate::backend::cuda::unstructured::erf(v / std::f64::consts::SQRT_2));
        let mut out = Vec::with_capacity(m * n / 2);
        for t in 0..m {
            for o in 0..n / 2 {
                let vr = (o / GEGLU_GROUP) * 2 * GEGLU_GROUP + o % GEGLU_GROUP;
                let (a, g) = (y_dev[t * n + vr] as f64, y_dev[t * n + vr + GEGLU_GROUP] as f64);
                out.push((a * gelu(g)) as f32);
            }
        }
        out
    }

    /// On the host: the row order of `geglu_interleave` agrees with both consumers of an
    /// interleaved layer's product — the fused GEGLU epilogue's indexing (the kernel path) and
    /// `deinterleave_columns` (the plain forward and the dense fallback, which decodes the
    /// device packing as `sp24_decode` does). Swapping value and gate in `geglu_row_order`, or
    /// any other order, fails here.
    #[test]
    fn geglu_interleave_matches_the_fused_epilogue_and_the_deinterleave() -> Result<()> {
        let mut rng = TestRng::fresh("geglu-interleave");
        let (m, n, k) = (5, 384, 64); // H = 192: three 128-row groups
        let w = random_sparse24(&mut rng, n, k, DType::F16);
        let bias = rng.vec(n);
        let x = Tensor::from_vec(rng.vec_f16(m * k, 1.0), &[m, k])?;
        let bt = Tensor::from_vec(bias.clone(), &[n])?;
        let canonical = SparseLinear::new(w.clone().into(), &Device::Cpu)?.forward(&x, Some(&bt))?;
        let (wi, bi) = geglu_interleave(&w, Some(&bias))?;
        // The interleaved weight as the GPU holds it, decoded from the device packing.
        let decoded = Tensor::from_vec(Sparse24Packed::pack(&wi)?.decode_dense(), &[n, k])?;
        let bi = Tensor::from_vec(bi.expect("bias given"), &[n])?;
        let y_dev = ops::linear(&x, &Weight::Dense(decoded), Some(&bi))?;
        let (tight_norm, tight_elem) = (1e-6, 1e-5);
        let back = deinterleave_columns(&y_dev)?;
        check_close(&back.to_vec()?, &canonical.to_vec()?, tight_norm, tight_elem)
            .map_err(|e| Error::Msg(format!("de-interleaved product: {e}")))?;
        let want = ops::geglu(&canonical)?.to_vec()?;
        let fused = kernel_geglu_epilogue(&y_dev.to_vec()?, m, n);
        check_close(&fused, &want, tight_norm, tight_elem)
            .map_err(|e| Error::Msg(format!("fused GEGLU epilogue model: {e}")))?;
        // The dense fallback's plan on an interleaved layer: de-interleave, then GEGLU.
        let plan = plan_epilogue(None, true, LinearAct::Geglu, None);
        check_close(&finish(y_dev, &plan, None)?.to_vec()?, &want, tight_norm, tight_elem)
            .map_err(|e| Error::Msg(format!("fallback plan: {e}")))?;
        Ok(())
    }

    /// On the CPU a fused call is exactly the separate ops the model ran before (bit for bit),
    /// and bad fused calls are errors.
    #[test]
    fn cpu_fused_forward_is_the_separate_ops() -> Result<()> {
        let mut rng = TestRng::fresh("cpu-fused");
        let (m, n, k) = (6, 256, 32);
        let layer = SparseLinear::new(random_sparse24(&mut rng, n, k, DType::F16).into(), &Device::Cpu)?;
        let x = Tensor::from_vec(rng.vec(2 * m * k), &[2, m, k])?;
        let b = Tensor::from_vec(rng.vec(n), &[n])?;
        let plain = layer.forward(&x, Some(&b))?;
        for (act, n_out) in [(LinearAct::None, n), (LinearAct::Gelu, n), (LinearAct::Geglu, n / 2)] {
            let r = Tensor::from_vec(rng.vec(2 * m * n_out), &[2, m, n_out])?;
            let want = match act {
                LinearAct::None => plain.clone(),
                LinearAct::Gelu => ops::gelu(&plain)?,
                LinearAct::Geglu => ops::geglu(&plain)?,
            };
            assert_eq!(layer.forward_fused(&x, Some(&b), act, None)?.to_vec()?, want.to_vec()?, "{act:?}");
            let want = ops::add(&want, &r)?.to_vec()?;
            assert_eq!(
                layer.forward_fused(&x, Some(&b), act, Some(&r))?.to_vec()?,
                want,
                "{act:?} + residual"
            );
        }
        let wrong = Tensor::zeros(&[2, m, n / 2]);
        assert!(layer.forward_fused(&x, Some(&b), LinearAct::None, Some(&wrong)).is_err());
        let owned = SparseLinear::new_geglu(
            random_sparse24(&mut rng, n, k, DType::F16).into(),
            Some(&b),
            &Device::Cpu,
        )?;
        assert!(owned.owns_bias() && !owned.is_interleaved());
        assert!(owned.forward_fused(&x, Some(&b), LinearAct::Geglu, None).is_err(), "a second bias");
        assert!(SparseLinear::new_geglu(
            random_sparse24(&mut rng, n, k, DType::F16).into(),
            Some(&wrong),
            &Device::Cpu
        )
        .is_err());
        let odd = SparseLinear::new(random_sparse24(&mut rng, 3, k, DType::F16).into(), &Device::Cpu)?;
        assert!(odd.forward_fused(&x, None, LinearAct::Geglu, None).is_err(), "GEGLU on odd N");
        Ok(())
    }

    /// One fused form on the GPU against the CPU reference (f16 activations and residual, the
    /// pipeline's default; `f32`: f32 ones, whose residual is added unfused).
    fn check_fused_form(
        device: &Device,
        rng: &mut TestRng,
        w: Weight,
        act: LinearAct,
        residual: bool,
        f32_acts: bool,
    ) -> Result<()> {
        let (n, k) = w.dims2()?;
        let m = 77;
        let n_out = if act == LinearAct::Geglu { n / 2 } else { n };
        let x = Tensor::from_vec(rng.vec_f16(m * k, 1.0), &[m, k])?;
        let b = Tensor::from_vec(rng.vec(n), &[n])?;
        let r = Tensor::from_vec(rng.vec_f16(m * n_out, 1.0), &[m, n_out])?;
        let r = residual.then_some(r);
        let cpu = SparseLinear::new(w.clone(), &Device::Cpu)?.forward_fused(&x, Some(&b), act, r.as_ref())?;
        let act_dtype = if f32_acts { DType::F32 } else { DType::F16 };
        let to_gpu = |t: &Tensor| -> Result<Tensor> { ops::to_device(t, device)?.to_dtype(act_dtype) };
        let (xg, rg, bg) = (to_gpu(&x)?, r.as_ref().map(to_gpu).transpose()?, ops::to_device(&b, device)?);
        let geglu_layer = act == LinearAct::Geglu;
        let layer = if geglu_layer {
            SparseLinear::new_geglu(w.clone(), Some(&bg), device)?
        } else {
            SparseLinear::new(w.clone(), device)?
        };
        let interleave_expected = geglu_layer && matches!(w, Weight::Sparse24(_)) && geglu_interleavable(n);
        let kernels = matches!(device, Device::Cuda(d) if d.arch_mode().sparse_kernels());
        assert_eq!(layer.is_interleaved(), interleave_expected && kernels);
        let bias = if layer.owns_bias() { None } else { Some(&bg) };
        let y = layer.forward_fused(&xg, bias, act, rg.as_ref())?;
        assert_eq!(y.dtype(), act_dtype);
        let what = format!("{} {act:?} residual {residual} f32 {f32_acts}", w.format_name());
        check_close(&y.to_vec()?, &cpu.to_vec()?, GPU_NORM_TOL, GPU_ELEM_TOL)
            .map_err(|e| Error::Msg(format!("{what}: {e}")))?;
        if geglu_layer {
            // A plain forward on the GEGLU projection is canonical (de-interleaved).
            let cpu = SparseLinear::new(w, &Device::Cpu)?.forward(&x, Some(&b))?;
            let y = layer.forward(&xg, None)?;
            check_close(&y.to_vec()?, &cpu.to_vec()?, GPU_NORM_TOL, GPU_ELEM_TOL)
                .map_err(|e| Error::Msg(format!("{what}, plain forward: {e}")))?;
        }
        Ok(())
    }

    /// On a GPU: every fused form the pipeline uses (2:4 GELU / GEGLU on an interleaved weight /
    /// residual; unstructured GELU / residual / GEGLU after the kernel), with f16 activations,
    /// and the residual with f32 activations, against the CPU's separate ops.
    fn fused_epilogues_match_the_cpu(device: &Device) -> Result<()> {
        let Device::Cuda(_) = device else { return Ok(()) };
        let mut rng = TestRng::fresh("fused-epilogues");
        let (c, h) = (192, 256); // K; GEGLU H (N = 2H = 512, interleaved in 4 groups)
        use LinearAct::{Geglu, Gelu, None as NoAct};
        for (act, residual, n) in [
            (Gelu, false, 4 * c),
            (NoAct, true, c),
            (Gelu, true, c),
            (Geglu, false, 2 * h),
            (Geglu, true, 2 * h),
        ] {
            for f32_acts in [false, true] {
                let w24 = random_sparse24(&mut rng, n, c, DType::F16).into();
                check_fused_form(device, &mut rng, w24, act, residual, f32_acts)?;
                let wbm = random_bitmap(&mut rng, n, c, 0.5, DType::F16).into();
                check_fused_form(device, &mut rng, wbm, act, residual, f32_acts)?;
            }
        }
        Ok(())
    }
    crate::test_device!(fused_epilogues_match_the_cpu);

    /// On a GPU: an interleaved GEGLU projection whose classes fall back to decompress + cuBLAS
    /// (the fused GEGLU and the plain forward) gives the canonical result (f32: 1e-5).
    fn interleaved_geglu_dense_fallback_matches_the_cpu(device: &Device) -> Result<()> {
        let Device::Cuda(dev) = device else { return Ok(()) };
        let (m, n, k) = (33, 640, 96); // a shape no other test uses (the override is per process)
        let mut rng = TestRng::fresh("geglu-fallback");
        let w: Weight = random_sparse24(&mut rng, n, k, DType::F16).into();
        let x = Tensor::from_vec(rng.vec_f16(m * k, 1.0), &[m, k])?;
        let b = Tensor::from_vec(rng.vec(n), &[n])?;
        let cpu_layer = SparseLinear::new(w.clone(), &Device::Cpu)?;
        let layer = SparseLinear::new_geglu(w, Some(&ops::to_device(&b, device)?), device)?;
        if !dev.arch_mode().sparse_kernels() {
            // Dense-only GPU: not interleaved, the expanded weight as it is.
            assert!(!layer.is_interleaved());
            let want = cpu_layer.forward_fused(&x, Some(&b), LinearAct::Geglu, None)?.to_vec()?;
            let got = layer.forward_fused(&x, None, LinearAct::Geglu, None)?.to_vec()?;
            return check_close(&got, &want, 1e-5, 1e-4).map(drop).map_err(Error::Msg);
        }
        assert!(layer.is_interleaved());
        for epi in [EpilogueClass { geglu: true, ..Default::default() }, EpilogueClass::default()] {
            let class = ShapeClass::new(Family::Sparse24, m, n, k).with_epilogue(epi);
            tune::tuner().lock().map_err(|_| Error::Msg("tuner".into()))?.override_choice(
                &gpu_key(dev),
                class,
                Choice::Dense,
            );
        }
        for act in [LinearAct::Geglu, LinearAct::None] {
            let want = cpu_layer.forward_fused(&x, Some(&b), act, None)?.to_vec()?;
            let got = layer.forward_fused(&x, None, act, None)?.to_vec()?;
            check_close(&got, &want, 1e-5, 1e-4).map_err(|e| Error::Msg(format!("fallback {act:?}: {e}")))?;
        }
        Ok(())
    }
    crate::test_device!(interleaved_geglu_dense_fallback_matches_the_cpu);

    /// On a GPU: a shape class forced to the dense fallback runs decompress + cuBLAS and matches
    /// the CPU reference (f32, so 1e-5), and the kernel path matches it within the f16 bound.
    fn dense_fallback_matches_the_reference(device: &Device) -> Result<()> {
        let Device::Cuda(dev) = device else { return Ok(()) };
        let (m, n, k) = (77, 192, 256);
        let mut rng = TestRng::fresh("fallback");
        let w = random_sparse24(&mut rng, n, k, DType::F16);
        let x = Tensor::from_vec(rng.vec_f16(m * k, 1.0), &[m, k])?;
        let bias = Tensor::from_vec(rng.vec(n), &[n])?;
        let cpu = SparseLinear::new(w.clone().into(), &Device::Cpu)?.forward(&x, Some(&bias))?.to_vec()?;
        let layer = SparseLinear::new(w.into(), device)?;
        let class = ShapeClass::new(Family::Sparse24, m, n, k);
        let kernel = layer.forward(&x, Some(&bias))?.to_vec()?;
        check_close(&kernel, &cpu, GPU_NORM_TOL, GPU_ELEM_TOL).map_err(Error::Msg)?;
        tune::tuner().lock().map_err(|_| Error::Msg("tuner".into()))?.override_choice(
            &gpu_key(dev),
            class,
            Choice::Dense,
        );
        let xg = ops::to_device(&x, device)?;
        let bg = ops::to_device(&bias, device)?;
        let dense = layer.forward(&xg, Some(&bg))?.to_vec()?;
        check_close(&dense, &cpu, 1e-5, 1e-4).map_err(Error::Msg)?;
        Ok(())
    }
    crate::test_device!(dense_fallback_matches_the_reference);

    /// No rows in, no rows out, on the input's device and in its dtype (a GPU input used to get
    /// a host tensor back), for both sparse formats and every activation.
    fn empty_input_stays_where_it_is(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("empty input");
        let (n, k) = (64, 128);
        let weights: [Weight; 2] = [
            random_sparse24(&mut rng, n, k, DType::F16).into(),
            crate::backend::test_util::random_bitmap(&mut rng, n, k, 0.5, DType::F16).into(),
        ];
        for w in weights {
            let layer = SparseLinear::new(w, device)?;
            let x = ops::to_device(&Tensor::from_vec(Vec::new(), &[2, 0, k])?, device)?;
            for act in [LinearAct::None, LinearAct::Gelu] {
                let y = layer.forward_fused(&x, None, act, None)?;
                assert_eq!(y.shape(), [2, 0, n]);
                assert_eq!(y.numel(), 0);
                let on_host = matches!(y.storage(), Storage::Cpu(_));
                assert_eq!(on_host, device.is_cpu(), "{act:?} on {}", device.name());
                assert_eq!(y.dtype(), x.dtype());
            }
        }
        Ok(())
    }
    crate::test_device!(empty_input_stays_where_it_is);
}
