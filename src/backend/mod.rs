//! Tensors and devices: the seam between the model (which knows shapes and names) and the
//! kernels (which know device layouts).
//!
//! A [`Tensor`] is an array in row-major (contiguous) order on one [`Device`]: activations in
//! f32 on the CPU and in the activation dtype (f16 by default, bf16 or f32) on CUDA, or a weight kept in its checkpoint's dtype (f16 / bf16 / f32) that the
//! weight-reading ops widen at use ([`CpuStorage`]). Every op
//! in [`ops`] dispatches on the storage: `cpu/` is the reference implementation of every
//! op; `cuda/` holds the GPU launchers (a dummy that returns "built without CUDA kernels"
//! errors when the crate was built without nvcc). Adding a backend is a new storage
//! variant plus a file, not a rewrite of the models.

pub mod cpu;
pub mod cuda;
pub mod ops;
pub mod profile;
mod tensor;
pub mod test_util;

pub use tensor::{CpuStorage, Storage, Tensor};

/// Where a tensor lives and where its ops run.
#[derive(Debug, Clone)]
pub enum Device {
    Cpu,
    Cuda(cuda::CudaDevice),
}

impl Device {
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }
    /// The activation dtype this device computes in unless told otherwise: f16 on CUDA (f32
    /// accumulation, norms and softmax in f32 inside the kernels), f32 on the CPU (the
    /// reference, which computes in f32 only).
    pub fn default_activation_dtype(&self) -> crate::format::DType {
        match self {
            Device::Cpu => crate::format::DType::F32,
            Device::Cuda(_) => crate::format::DType::F16,
        }
    }
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(d) => d.name(),
        }
    }
}
