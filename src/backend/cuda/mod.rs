//! The CUDA backend: the GPU handle, the embedded kernel fatbin, device storage and launchers.
//!
//! - [`CudaDevice`] opens a GPU (clear errors for "no driver", "no GPU", "built without CUDA
//!   kernels"), loads the fatbin once, looks kernels up by name and launches them.
//! - [`CudaStorage`] is the f32 data of a GPU tensor.
//! - [`params`] mirrors the kernel parameter structs of `cuda/include/sdsparse_params.h`.
//! - [`decompress`] holds sparse weights on the GPU and expands them to dense.
//! - [`norm`] (group norm + SiLU, layer norm) and [`pointwise`] (GELU, SiLU, GEGLU, broadcast
//!   add, CFG combine, nearest upsampling, concatenation, timestep embedding): the activation
//!   kernels for f32 / f16 / bf16 storage, with host-checked launch plans.
//!
//! A kernel family is a `cuda/<name>.cu` file (compiled by build.rs into the one fatbin), a
//! parameter struct in the header mirrored in `params.rs`, and a launcher file here. In a build
//! without nvcc everything compiles, and [`CudaDevice::new`] returns the "built without CUDA
//! kernels" error, so no GPU path can be reached.

pub mod blas;
pub mod decompress;
mod device;
pub mod graph;
pub mod kernels;
pub mod norm;
pub mod ops;
pub mod params;
pub mod pointwise;
pub mod sparse24;
pub mod tensor_ops;

pub mod attention;
pub mod unstructured;

pub use decompress::weight_to_dense;
pub use device::{CudaDevice, CudaStorage};

use crate::backend::{Storage, Tensor};
use crate::error::Result;

/// A tensor copied to the GPU (shared, not copied, when it is there already). `ops::to_device`
/// can dispatch here: `Device::Cuda(d) => cuda::to_cuda(x, d)`, and for the CPU
/// `Tensor::from_vec(x.to_vec()?, x.shape())` copies back from any device.
pub fn to_cuda(t: &Tensor, device: &CudaDevice) -> Result<Tensor> {
    match t.storage() {
        Storage::Cuda(s) if s.device() == *device => Ok(t.clone()),
        _ => {
            let host = t.to_vec()?;
            Ok(Tensor::from_storage(Storage::Cuda(CudaStorage::from_host(device, &host)?), t.shape()))
        }
    }
}
