//! The CUDA backend: context, the embedded kernel fatbin, device storage and launchers.
//! Built without nvcc, every entry point returns a "built without CUDA kernels" error.

use crate::error::{Error, Result};

pub mod attention;
pub mod unstructured;

/// A CUDA device handle (one context per GPU).
#[derive(Debug, Clone)]
pub struct CudaDevice {
    ordinal: usize,
}

impl CudaDevice {
    pub fn name(&self) -> String {
        format!("cuda:{}", self.ordinal)
    }
}

/// f32 data on a GPU.
#[derive(Debug, Clone)]
pub struct CudaStorage {
    device: CudaDevice,
}

impl CudaStorage {
    pub fn device(&self) -> CudaDevice {
        self.device.clone()
    }
    pub fn to_host(&self) -> Result<Vec<f32>> {
        Err(Error::Cuda("not implemented yet".into()))
    }
}
