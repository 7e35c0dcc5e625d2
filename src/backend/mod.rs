//! Tensors and devices: the seam between the model (which knows shapes and names) and the
//! kernels (which know device layouts).
//!
//! A [`Tensor`] is an array in row-major (contiguous) order on one [`Device`]: f32 for
//! activations, or a weight kept in its checkpoint's dtype (f16 / bf16 / f32) that the
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
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".to_string(),
            Device::Cuda(d) => d.name(),
        }
    }
}
