//! The sparse GEMM ops on their own, for engines that want only the kernels: a pruned Linear
//! weight ([`Sparse24Weight`] or [`BitmapWeight`] in the canonical layouts of `docs/FORMAT.md`)
//! is placed on a device once, then multiplied by activations as often as needed.
//!
//! On the CPU the product runs the reference path of [`crate::backend::ops::linear`] (the one
//! layer expanded into a scratch buffer, then the dense f32 GEMM): exactly the dense-with-zeros
//! result. On CUDA the weight is packed into the kernel layouts at [`SparseLinear::new`] (2:4
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
use crate::backend::cuda::sparse24::{Sp24Epilogue, Sp24Kernels, Sp24Variant, Sparse24Gpu, Sparse24Packed};
use crate::backend::cuda::unstructured::{
    DeviceTiledWeight, Epilogue, GemmPlan, GemmVariant, TiledBitmapWeight, UnstructuredGemm,
};
use crate::backend::cuda::{self, kernels, CudaDevice, CudaStorage};
use crate::backend::profile::{self, OpKind};
use crate::backend::{ops, Device, Storage, Tensor};
use crate::error::{Error, Result};
use crate::format::{BitmapWeight, DType, Sparse24Weight, Weight};
use crate::tune::{self, Choice, Family, GpuKey, KernelProbe, ShapeClass};
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
        Ok(SparseLinear { out_features, in_features, imp })
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
        let mut out_shape = x.shape().to_vec();
        *out_shape.last_mut().expect("rank checked above") = n;
        let m = x.numel() / k.max(1);
        match &self.imp {
            Imp::Cpu(w) => ops::linear(x, w, bias),
            _ if m == 0 => Ok(Tensor::zeros(&out_shape)),
            Imp::CudaDense { device, dense } => {
                dense_fallback(device, dense, x, bias, || Err(Error::Cuda("expanded at placement".into())))
            }
            Imp::Cuda24 { device, kernels, weight, dense } => {
                let class = ShapeClass::new(Family::Sparse24, m, n, k);
                let variant =
                    match dispatch(device, class, &mut || sp24_candidates(kernels, m, n, k), &mut || {
                        Ok(Box::new(Sp24Probe::new(device, kernels, m, n, k)?))
                    })? {
                        Choice::Dense => {
                            return dense_fallback(device, dense, x, bias, || sp24_decode(device, weight))
                        }
                        Choice::Kernel(name) => sp24_variant(kernels, &name)?,
                    };
                let _p = profile::scope(OpKind::Linear24);
                let (xd, bd) = operands(device, x, bias)?;
                let mut yd = f16_output(device, m * n)?;
                let epi = Sp24Epilogue { bias: bd.as_deref(), ..Default::default() };
                let x_bits = F16Bits::of(device, f16_values(&xd)?);
                let mut y_bits = F16Bits::of_mut(device, &mut yd);
                kernels.gemm(device.stream(), variant, &x_bits, m, weight, &epi, &mut y_bits)?;
                drop((x_bits, y_bits));
                result(device, x, yd, &out_shape)
            }
            Imp::CudaBitmap { device, gemm, weight, dense } => {
                let class = ShapeClass::new(Family::Unstructured, m, n, k);
                let variant =
                    match dispatch(device, class, &mut || uns_candidates(gemm, m, n, k), &mut || {
                        Ok(Box::new(UnsProbe::new(device, gemm, m, n, k)?))
                    })? {
                        Choice::Dense => {
                            return dense_fallback(device, dense, x, bias, || uns_decode(device, weight))
                        }
                        Choice::Kernel(name) => uns_variant(&name)?,
                    };
                let _p = profile::scope(OpKind::LinearUnstructured);
                let (xd, bd) = operands(device, x, bias)?;
                let mut yd = f16_output(device, m * n)?;
                let epi = Epilogue { bias: bd.as_deref(), ..Default::default() };
                let x_bits = F16Bits::of(device, f16_values(&xd)?);
                let mut y_bits = F16Bits::of_mut(device, &mut yd);
                let plan = GemmPlan::choose_for(variant, m, n, k, weight.gpu_bytes, gemm.sm_count());
                gemm.forward_plan(device.stream(), plan, &x_bits, m, weight, &epi, &mut y_bits)?;
                drop((x_bits, y_bits));
                result(device, x, yd, &out_shape)
            }
        }
    }
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

/// cuBLAS on the decompressed weight: `x · Wᵀ`, f32 (the reference of the first-use check).
fn cublas_reference(x: &Tensor, dense_w: &Tensor) -> Result<Vec<f32>> {
    ops::linear(x, &Weight::Dense(dense_w.clone()), None)?.to_vec()
}

/// The first-use check of the 2:4 kernels on one shape: a random 2:4 weight `[n, k]`, random
/// activations `[m, k]`, cuBLAS on the weight decompressed by the decompression kernel.
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
}

impl Sp24Probe {
    fn new(
        device: &CudaDevice,
        kernels: &Arc<Sp24Kernels>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<Sp24Probe> {
        let mut rng = crate::backend::test_util::TestRng::new(0x24 ^ (n * 131 + k) as u64);
        let w = crate::backend::test_util::random_sparse24(&mut rng, n, k, crate::format::DType::F16);
        let dense_w = crate::backend::cuda::weight_to_dense(
            &Weight::Sparse24(w.clone()),
            &Device::Cuda(device.clone()),
        )?;
        let (x, x_f32) = random_input(device, m, k)?;
        let w = Sparse24Gpu::upload(device.stream(), &Sparse24Packed::pack(&w)?)?;
        Ok(Sp24Probe { device: device.clone(), kernels: kernels.clone(), m, n, k, x, x_f32, w, dense_w })
    }
    fn launch(&self, variant: Sp24Variant, y: &mut cudarc::driver::CudaSlice<u16>) -> Result<()> {
        self.kernels.gemm(
            self.device.stream(),
            variant,
            &self.x,
            self.m,
            &self.w,
            &Sp24Epilogue::default(),
            y,
        )
    }
}

impl KernelProbe for Sp24Probe {
    fn candidates(&self) -> Vec<String> {
        sp24_candidates(&self.kernels, self.m, self.n, self.k)
    }
    fn reference(&mut self) -> Result<Vec<f32>> {
        cublas_reference(&self.x_f32, &self.dense_w)
    }
    fn run(&mut self, candidate: &str) -> Result<Vec<f32>> {
        let variant = sp24_variant(&self.kernels, candidate)?;
        let mut y = self.device.alloc_zeros::<u16>(self.m * self.n)?;
        self.launch(variant, &mut y)?;
        Ok(self.device.dtoh(&y)?.into_iter().map(|b| f16::from_bits(b).to_f32()).collect())
    }
    fn time_ms(&mut self, candidate: &str) -> Result<f64> {
        let variant = sp24_variant(&self.kernels, candidate)?;
        let mut y = self.device.alloc_zeros::<u16>(self.m * self.n)?;
        let device = self.device.clone();
        time_launches(&device, &mut || self.launch(variant, &mut y))
    }
}

/// The first-use check of the unstructured kernels on one shape (a random bitmap weight at
/// 50% density; otherwise as [`Sp24Probe`]).
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
}

impl UnsProbe {
    fn new(
        device: &CudaDevice,
        gemm: &Arc<UnstructuredGemm>,
        m: usize,
        n: usize,
        k: usize,
    ) -> Result<UnsProbe> {
        let mut rng = crate::backend::test_util::TestRng::new(0xb17 ^ (n * 131 + k) as u64);
        let w = crate::backend::test_util::random_bitmap(&mut rng, n, k, 0.5, crate::format::DType::F16);
        let dense_w =
            crate::backend::cuda::weight_to_dense(&Weight::Bitmap(w.clone()), &Device::Cuda(device.clone()))?;
        let (x, x_f32) = random_input(device, m, k)?;
        let w = DeviceTiledWeight::upload(device.stream(), &TiledBitmapWeight::from_bitmap(&w)?)?;
        Ok(UnsProbe { device: device.clone(), gemm: gemm.clone(), m, n, k, x, x_f32, w, dense_w })
    }
    fn launch(&self, variant: GemmVariant, y: &mut cudarc::driver::CudaSlice<u16>) -> Result<()> {
        let plan =
            GemmPlan::choose_for(variant, self.m, self.n, self.k, self.w.gpu_bytes, self.gemm.sm_count());
        self.gemm.forward_plan(self.device.stream(), plan, &self.x, self.m, &self.w, &Epilogue::default(), y)
    }
}

impl KernelProbe for UnsProbe {
    fn candidates(&self) -> Vec<String> {
        uns_candidates(&self.gemm, self.m, self.n, self.k)
    }
    fn reference(&mut self) -> Result<Vec<f32>> {
        cublas_reference(&self.x_f32, &self.dense_w)
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
    use crate::backend::test_util::{check_close, random_sparse24, TestRng, GPU_ELEM_TOL, GPU_NORM_TOL};
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
        let mut probe = Sp24Probe::new(dev, &kernels, m, n, k)?;
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
        let mut probe = UnsProbe::new(dev, &gemm, m, n, k)?;
        let ms = measure(&mut probe)?;
        println!("unstructured [{m}, {n}, {k}]:");
        report(&ms);
        assert!(ms.iter().all(|m| m.check.is_ok()), "an unstructured variant disagrees: {ms:?}");
        Ok(())
    }
    crate::test_device!(first_use_check_on_real_kernels);

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
}
