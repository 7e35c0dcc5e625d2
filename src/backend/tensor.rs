//! The tensor type: a shape plus storage on one device, contiguous row-major; views are
//! materialised (simple and fast enough for SD2's shapes).
//!
//! Element types: activations are f32 on the CPU (the f32 reference) and f32, f16 or bf16 on
//! CUDA (`--dtype`; docs/CUDA.md), where every op computes in f32 inside. Weights
//! may stay in the dtype their checkpoint stores (f16 / bf16 / f32, [`CpuStorage`]) so that
//! memory follows the checkpoint's size; the ops that take weights (`ops::linear`,
//! `ops::conv2d`, `ops::embedding`) widen them to f32 at use, which is exact. Every other op
//! reads its inputs with [`Tensor::as_slice`], which refuses non-f32 data with a clear error.

use super::{cuda, Device};
use crate::error::{Error, Result};
use crate::format::{DType, HostData};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use std::borrow::Cow;
use std::sync::Arc;

/// Host data in one of the stored float types. Cloning shares the buffer.
#[derive(Debug, Clone)]
pub enum CpuStorage {
    F32(Arc<Vec<f32>>),
    F16(Arc<Vec<f16>>),
    BF16(Arc<Vec<bf16>>),
}

impl CpuStorage {
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The values as f32: borrowed when stored in f32, widened into a new buffer otherwise
    /// (exact: every f16 / bf16 value is an f32 value).
    pub fn to_f32_cow(&self) -> Cow<'_, [f32]> {
        match self {
            CpuStorage::F32(v) => Cow::Borrowed(v.as_slice()),
            CpuStorage::F16(v) => Cow::Owned(v.as_slice().to_f32_vec()),
            CpuStorage::BF16(v) => Cow::Owned(v.as_slice().to_f32_vec()),
        }
    }
    /// Elements `start..start + out.len()` widened (exactly) into `out`.
    pub fn widen_range_into(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            CpuStorage::F32(v) => out.copy_from_slice(&v[start..end]),
            CpuStorage::F16(v) => v[start..end].convert_to_f32_slice(out),
            CpuStorage::BF16(v) => v[start..end].convert_to_f32_slice(out),
        }
    }
}

#[derive(Debug, Clone)]
pub enum Storage {
    Cpu(CpuStorage),
    Cuda(cuda::CudaStorage),
}

#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

fn numel_of(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn check_len(len: usize, shape: &[usize]) -> Result<()> {
    if len != numel_of(shape) {
        return Err(Error::Shape(format!("{len} values cannot form shape {shape:?}")));
    }
    Ok(())
}

impl Tensor {
    /// A CPU f32 tensor from row-major data; errors when `data.len()` does not match `shape`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        check_len(data.len(), shape)?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Cpu(CpuStorage::F32(Arc::new(data))) })
    }

    /// A CPU f16 tensor (kept in f16; weights of half-precision checkpoints).
    pub fn from_f16_vec(data: Vec<f16>, shape: &[usize]) -> Result<Tensor> {
        check_len(data.len(), shape)?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Cpu(CpuStorage::F16(Arc::new(data))) })
    }

    /// A CPU bf16 tensor (kept in bf16).
    pub fn from_bf16_vec(data: Vec<bf16>, shape: &[usize]) -> Result<Tensor> {
        check_len(data.len(), shape)?;
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Cpu(CpuStorage::BF16(Arc::new(data))) })
    }

    /// A CPU tensor holding `data` in its own dtype.
    pub fn from_host_data(data: HostData, shape: &[usize]) -> Result<Tensor> {
        match data {
            HostData::F32(v) => Tensor::from_vec(v, shape),
            HostData::F16(v) => Tensor::from_f16_vec(v, shape),
            HostData::BF16(v) => Tensor::from_bf16_vec(v, shape),
        }
    }

    pub fn from_storage(storage: Storage, shape: &[usize]) -> Tensor {
        Tensor { shape: shape.to_vec(), storage }
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor::full(0.0, shape)
    }

    pub fn full(value: f32, shape: &[usize]) -> Tensor {
        Tensor {
            shape: shape.to_vec(),
            storage: Storage::Cpu(CpuStorage::F32(Arc::new(vec![value; numel_of(shape)]))),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    pub fn numel(&self) -> usize {
        numel_of(&self.shape)
    }
    pub fn storage(&self) -> &Storage {
        &self.storage
    }
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            Storage::Cuda(s) => Device::Cuda(s.device()),
        }
    }
    /// The element type of the stored data.
    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::Cpu(s) => s.dtype(),
            Storage::Cuda(s) => s.dtype(),
        }
    }
    /// Bytes of element data held (the dtype's width times the element count).
    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype().size_in_bytes()
    }

    /// The data as a CPU f32 slice; errors for a tensor on another device or stored in
    /// another dtype (use [`Tensor::to_vec`] or [`Tensor::to_dtype`] to widen).
    pub fn as_slice(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v.as_slice()),
            Storage::Cpu(s) => Err(Error::Invalid(format!(
                "tensor {:?} is stored in {}; this op reads f32 (widen it with to_dtype(F32) first)",
                self.shape,
                s.dtype().name()
            ))),
            Storage::Cuda(_) => Err(Error::Invalid("tensor is on the GPU; copy it to the CPU first".into())),
        }
    }

    /// The data as f32 on the CPU: borrowed when stored in f32, widened (exactly) into a
    /// transient buffer for f16 / bf16. For the ops that read weights. Errors for GPU tensors.
    pub fn f32_cow(&self) -> Result<Cow<'_, [f32]>> {
        match &self.storage {
            Storage::Cpu(s) => Ok(s.to_f32_cow()),
            Storage::Cuda(_) => Err(Error::Invalid("tensor is on the GPU; copy it to the CPU first".into())),
        }
    }

    /// The data copied to a host f32 vector (from any device; f16 / bf16 widened exactly).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Storage::Cpu(s) => Ok(s.to_f32_cow().into_owned()),
            Storage::Cuda(s) => s.to_host(),
        }
    }

    /// The data converted to `dtype` (a cheap shared clone when it already is): widening is
    /// exact, narrowing rounds to nearest even. GPU tensors are converted on the GPU (the cast
    /// kernels of `cuda/tensor.cu`).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if self.dtype() == dtype {
            return Ok(self.clone());
        }
        let _p = super::profile::scope(super::profile::OpKind::Layout);
        let Storage::Cpu(s) = &self.storage else {
            return cuda::ops::to_dtype(self, dtype);
        };
        let host = match (s, dtype) {
            (CpuStorage::F16(v), DType::F32) => HostData::F32(v.as_slice().to_f32_vec()),
            (CpuStorage::BF16(v), DType::F32) => HostData::F32(v.as_slice().to_f32_vec()),
            _ => self.to_host_data()?.to_dtype(dtype),
        };
        Tensor::from_host_data(host, &self.shape)
    }

    /// The data copied to a host buffer in its own dtype (errors for GPU tensors).
    pub fn to_host_data(&self) -> Result<HostData> {
        match &self.storage {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(HostData::F32(v.as_ref().clone())),
            Storage::Cpu(CpuStorage::F16(v)) => Ok(HostData::F16(v.as_ref().clone())),
            Storage::Cpu(CpuStorage::BF16(v)) => Ok(HostData::BF16(v.as_ref().clone())),
            Storage::Cuda(_) => Err(Error::Invalid("tensor is on the GPU; copy it to the CPU first".into())),
        }
    }

    /// The same data under another shape with the same number of elements.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if numel_of(shape) != self.numel() {
            return Err(Error::Shape(format!("cannot reshape {:?} to {:?}", self.shape, shape)));
        }
        Ok(Tensor { shape: shape.to_vec(), storage: self.storage.clone() })
    }

    pub fn dims2(&self) -> Result<(usize, usize)> {
        match self.shape.as_slice() {
            &[a, b] => Ok((a, b)),
            s => Err(Error::Shape(format!("expected a 2-D tensor, got {s:?}"))),
        }
    }
    pub fn dims3(&self) -> Result<(usize, usize, usize)> {
        match self.shape.as_slice() {
            &[a, b, c] => Ok((a, b, c)),
            s => Err(Error::Shape(format!("expected a 3-D tensor, got {s:?}"))),
        }
    }
    pub fn dims4(&self) -> Result<(usize, usize, usize, usize)> {
        match self.shape.as_slice() {
            &[a, b, c, d] => Ok((a, b, c, d)),
            s => Err(Error::Shape(format!("expected a 4-D tensor, got {s:?}"))),
        }
    }
}
