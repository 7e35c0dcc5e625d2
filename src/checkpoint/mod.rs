//! Reading checkpoints: diffusers folders, safetensors by memory map, and tensor-name
//! normalisation so that the names users' (older) checkpoints use are accepted; single-file
//! checkpoints (original layout, `.safetensors` or PyTorch `.ckpt`) mapped to diffusers
//! components ([`single_file`], [`pickle`]); [`ModelSource`] hides which of the two a path is.
//!
//! [`VarBuilder`] is how models get their weights, candle-style: `vb.pp("down_blocks.0")`
//! narrows the name prefix, `vb.get("weight", &[..])` returns an f32 [`Tensor`] checked
//! against the expected shape (norm parameters), `vb.get_stored(..)` the same in the
//! checkpoint's dtype on the CPU and in the activation dtype on CUDA (the large weights:
//! convolutions, embedding tables), `vb.get_act(..)` a tensor that joins the activations
//! (biases, position embeddings: f32 on the CPU, the activation dtype on CUDA),
//! `vb.get_weight(..)` returns a Linear [`Weight`] (dense in its stored dtype, or
//! compressed, as stored).

pub mod compressed;
pub mod expected;
mod ldm_yaml;
pub mod pickle;
pub mod single_file;
pub mod source;
mod store;

pub use single_file::{SingleFileModel, SingleFileOptions};
pub use source::ModelSource;
pub use store::{
    aliases, count_nonfinite_bytes, find_weight_files, is_float_dtype, nonfinite_error, unsupported_dtype,
    Backing, ComponentStore, MappedTensor, RawTensor, SafetensorsFile,
};

use crate::backend::{Device, Tensor};
use crate::error::{Error, Result};
use crate::format::{DType, Weight};
use std::sync::Arc;

/// Prefixed access to one component's tensors, placed on one device: [`VarBuilder::get`]
/// returns tensors already uploaded to it (weights are uploaded once, at load).
#[derive(Clone)]
pub struct VarBuilder {
    store: Arc<ComponentStore>,
    prefix: String,
    device: Device,
    /// The activation dtype on CUDA (weights are uploaded in it); f32 on the CPU.
    dtype: DType,
}

impl VarBuilder {
    pub fn new(store: Arc<ComponentStore>) -> Self {
        VarBuilder { store, prefix: String::new(), device: Device::Cpu, dtype: DType::F32 }
    }

    /// The same builder placing its tensors on `device`, with that device's default
    /// activation dtype ([`Device::default_activation_dtype`]).
    pub fn on_device(self, device: &Device) -> Self {
        VarBuilder { device: device.clone(), dtype: device.default_activation_dtype(), ..self }
    }

    /// The same builder with activation dtype `dtype` (CUDA: dense weights, biases and tables
    /// uploaded in it). The CPU computes in f32 only: anything else is a one-line error.
    pub fn with_activation_dtype(self, dtype: DType) -> Result<Self> {
        if matches!(self.device, Device::Cpu) && dtype != DType::F32 {
            return Err(Error::Invalid(format!(
                "{} activations are for CUDA; the CPU backend computes in f32 (use --dtype f32)",
                dtype.name()
            )));
        }
        Ok(VarBuilder { dtype, ..self })
    }

    /// The device the model's tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The activation dtype (f32 on the CPU).
    pub fn activation_dtype(&self) -> DType {
        self.dtype
    }

    /// `t` moved to this builder's device (for weights a model reads from the store itself):
    /// as stored on the CPU, in the activation dtype on CUDA.
    pub fn place(&self, t: Tensor) -> Result<Tensor> {
        match &self.device {
            Device::Cpu => Ok(t),
            Device::Cuda(d) => crate::backend::cuda::to_cuda_as(&t, d, self.dtype),
        }
    }

    /// `t` moved to this builder's device in `dtype` (for tensors whose dtype the kernels fix:
    /// norm parameters are f32).
    fn place_as(&self, t: Tensor, dtype: DType) -> Result<Tensor> {
        match &self.device {
            Device::Cpu => t.to_dtype(dtype),
            Device::Cuda(d) => crate::backend::cuda::to_cuda_as(&t, d, dtype),
        }
    }

    /// Opens a component folder (e.g. `model/unet`).
    pub fn from_dir(dir: &std::path::Path) -> Result<Self> {
        Ok(Self::new(Arc::new(ComponentStore::open(dir)?)))
    }

    /// Pushes a name prefix: `vb.pp("down_blocks").pp(0)` reads `down_blocks.0.*`.
    pub fn pp(&self, name: impl std::fmt::Display) -> VarBuilder {
        let prefix =
            if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        VarBuilder { store: self.store.clone(), prefix, device: self.device.clone(), dtype: self.dtype }
    }

    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.path(name))
    }

    pub fn store(&self) -> &Arc<ComponentStore> {
        &self.store
    }

    /// An f32 tensor of exactly `shape` (errors name the tensor and both shapes), on every
    /// device: norm parameters (the norm kernels read f32 `gamma` / `beta`).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.place_as(self.read(name, shape)?, DType::F32)
    }

    /// A tensor that joins the activations (a bias, a position embedding): f32 on the CPU, the
    /// activation dtype on CUDA (so adding it needs no per-call cast).
    pub fn get_act(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.place_as(self.read(name, shape)?, self.dtype)
    }

    /// A tensor of exactly `shape`: in its stored dtype on the CPU (f32, f16 or bf16; not
    /// widened; `ops::conv2d` / `ops::embedding` / `ops::linear` widen at use), in the
    /// activation dtype on CUDA (the dtype the GEMMs and kernels read).
    pub fn get_stored(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.place(self.read(name, shape)?)
    }

    /// The host tensor `name`, checked to have `shape`.
    fn read(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let full = self.path(name);
        let t = self.store.tensor_stored(&full)?;
        if t.shape() != shape {
            return Err(Error::Shape(format!(
                "{}: tensor {full} has shape {:?}, the model expects {:?}",
                self.store.describe(),
                t.shape(),
                shape
            )));
        }
        Ok(t)
    }

    /// A Linear weight `[out, in]`: dense, or compressed as stored in a sparse checkpoint; in
    /// host memory (`model::Linear` places it: dense weights are uploaded, compressed ones
    /// packed for the sparse kernels).
    pub fn get_weight(&self, name: &str, out_features: usize, in_features: usize) -> Result<Weight> {
        let full = self.path(name);
        let w = self.store.weight(&full)?;
        let dims = w.dims2()?;
        if dims != (out_features, in_features) {
            return Err(Error::Shape(format!(
                "{}: weight {full} has shape {:?}, the model expects {:?}",
                self.store.describe(),
                dims,
                (out_features, in_features)
            )));
        }
        Ok(w)
    }
}
