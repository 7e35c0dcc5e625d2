//! The tensor type: a shape plus storage on one device. Data are always f32 and contiguous
//! row-major; views are materialised (simple and fast enough for SD2's shapes).

use super::{cuda, Device};
use crate::error::{Error, Result};
use std::sync::Arc;

#[derive(Debug, Clone)]
pub enum Storage {
    Cpu(Arc<Vec<f32>>),
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

impl Tensor {
    /// A CPU tensor from row-major data; errors when `data.len()` does not match `shape`.
    pub fn from_vec(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
        if data.len() != numel_of(shape) {
            return Err(Error::Shape(format!("{} values cannot form shape {:?}", data.len(), shape)));
        }
        Ok(Tensor { shape: shape.to_vec(), storage: Storage::Cpu(Arc::new(data)) })
    }

    pub fn from_storage(storage: Storage, shape: &[usize]) -> Tensor {
        Tensor { shape: shape.to_vec(), storage }
    }

    pub fn zeros(shape: &[usize]) -> Tensor {
        Tensor { shape: shape.to_vec(), storage: Storage::Cpu(Arc::new(vec![0.0; numel_of(shape)])) }
    }

    pub fn full(value: f32, shape: &[usize]) -> Tensor {
        Tensor { shape: shape.to_vec(), storage: Storage::Cpu(Arc::new(vec![value; numel_of(shape)])) }
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

    /// The data as a CPU slice; errors for a tensor on another device.
    pub fn as_slice(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.as_slice()),
            Storage::Cuda(_) => Err(Error::Invalid("tensor is on the GPU; copy it to the CPU first".into())),
        }
    }

    /// The data copied to a host vector (from any device).
    pub fn to_vec(&self) -> Result<Vec<f32>> {
        match &self.storage {
            Storage::Cpu(v) => Ok(v.as_ref().clone()),
            Storage::Cuda(s) => s.to_host(),
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
