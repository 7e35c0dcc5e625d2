//! The CUDA backend: the GPU handle, the embedded kernel fatbin, device storage and launchers.
//!
//! - [`CudaDevice`] opens a GPU (clear errors for "no driver", "no GPU", "built without CUDA
//!   kernels", "older than 7.5"), loads the fatbin once, looks kernels up by name and launches
//!   them; its [`ArchMode`] says whether the tensor-core kernels (sparse GEMMs, flash attention)
//!   may run (8.0+) or only the dense cuBLAS path (7.5, or `SDSPARSE_GPU_ARCH_MODE=dense-only`).
//! - [`CudaStorage`] is the data of a GPU tensor in f32, f16 or bf16 (the activation dtype,
//!   `--dtype`; weights are uploaded in it, see [`to_cuda_as`]).
//! - [`params`] mirrors the kernel parameter structs of `cuda/include/sdsparse_params.h`.
//! - [`decompress`] holds sparse weights on the GPU and expands them to dense.
//! - [`norm`] (group norm + SiLU, layer norm) and [`pointwise`] (GELU, SiLU, GEGLU, broadcast
//!   add, CFG combine, nearest upsampling, concatenation, timestep embedding): the activation
//!   kernels for f32 / f16 / bf16 storage, with host-checked launch plans.
//! - [`lt`] (dense Linear through cuBLASLt with bias / GELU epilogues) and [`dnn`] (convolutions
//!   through cuDNN), both loaded at run time; [`libs`] chooses them or the cuBLAS fallbacks and
//!   records which ran.
//!
//! A kernel family is a `cuda/<name>.cu` file (compiled by build.rs into the one fatbin), a
//! parameter struct in the header mirrored in `params.rs`, and a launcher file here. In a build
//! without nvcc everything compiles, and [`CudaDevice::new`] returns the "built without CUDA
//! kernels" error, so no GPU path can be reached.

pub mod blas;
pub mod decompress;
mod device;
pub mod dnn;
pub mod graph;
pub mod kernels;
pub mod libs;
pub mod lt;
pub mod norm;
pub mod ops;
pub mod params;
pub mod pointwise;
pub mod sparse24;
pub mod tensor_ops;

pub mod attention;
pub mod unstructured;

pub use decompress::weight_to_dense;
pub use device::{
    arch_mode, check_activation_dtype, ArchMode, CudaDevice, CudaStorage, ARCH_MODE_ENV,
    FULL_COMPUTE_CAPABILITY, MIN_COMPUTE_CAPABILITY,
};

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

/// A tensor copied to the GPU in `dtype` (the activation dtype the weights are uploaded in):
/// converted on the host before the copy (so an f16 upload moves 2 bytes per value and no f32
/// copy is ever made on the device), or on the device when it is there already.
pub fn to_cuda_as(t: &Tensor, device: &CudaDevice, dtype: crate::format::DType) -> Result<Tensor> {
    match t.storage() {
        Storage::Cuda(s) if s.device() == *device => t.to_dtype(dtype),
        _ => {
            let host = t.to_host_data()?.to_dtype(dtype);
            let values = decompress::DeviceValues::upload(device, &host)?;
            Ok(Tensor::from_storage(Storage::Cuda(CudaStorage::from_values(device, values)), t.shape()))
        }
    }
}
