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
//! result converted back. Host tensors (f32) go to the GPU and come back widened to f32. The
//! CUDA path has not yet run on a GPU (see
//! `docs/CUDA.md`); its test compares it with the CPU path and skips without a GPU.

use crate::backend::cuda::decompress::{DeviceValues, F16Bits};
use crate::backend::cuda::sparse24::{Sp24Epilogue, Sp24Kernels, Sparse24Gpu, Sparse24Packed};
use crate::backend::cuda::unstructured::{DeviceTiledWeight, Epilogue, TiledBitmapWeight, UnstructuredGemm};
use crate::backend::cuda::{self, kernels, CudaDevice, CudaStorage};
use crate::backend::{ops, Device, Storage, Tensor};
use crate::error::{Error, Result};
use crate::format::{BitmapWeight, DType, Sparse24Weight, Weight};
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
    Cuda24 { device: CudaDevice, kernels: Arc<Sp24Kernels>, weight: Sparse24Gpu },
    CudaBitmap { device: CudaDevice, gemm: Arc<UnstructuredGemm>, weight: DeviceTiledWeight },
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

fn sparse24_kernels(dev: &CudaDevice) -> Result<Arc<Sp24Kernels>> {
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
                        Imp::Cuda24 { device: dev.clone(), kernels, weight }
                    }
                    Weight::Bitmap(w) => {
                        let gemm = unstructured_gemm(dev)?;
                        let weight =
                            DeviceTiledWeight::upload(dev.stream(), &TiledBitmapWeight::from_bitmap(w)?)?;
                        Imp::CudaBitmap { device: dev.clone(), gemm, weight }
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
            Imp::Cuda24 { device, kernels, weight } => {
                let (xd, bd) = operands(device, x, bias)?;
                let mut yd = f16_output(device, m * n)?;
                let epi = Sp24Epilogue { bias: bd.as_deref(), ..Default::default() };
                let x_bits = F16Bits::of(device, f16_values(&xd)?);
                let mut y_bits = F16Bits::of_mut(device, &mut yd);
                kernels.gemm(
                    device.stream(),
                    kernels.choose(m, n, k),
                    &x_bits,
                    m,
                    weight,
                    &epi,
                    &mut y_bits,
                )?;
                drop((x_bits, y_bits));
                result(device, x, yd, &out_shape)
            }
            Imp::CudaBitmap { device, gemm, weight } => {
                let (xd, bd) = operands(device, x, bias)?;
                let mut yd = f16_output(device, m * n)?;
                let epi = Epilogue { bias: bd.as_deref(), ..Default::default() };
                let x_bits = F16Bits::of(device, f16_values(&xd)?);
                let mut y_bits = F16Bits::of_mut(device, &mut yd);
                gemm.forward(device.stream(), &x_bits, m, weight, &epi, &mut y_bits)?;
                drop((x_bits, y_bits));
                result(device, x, yd, &out_shape)
            }
        }
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
