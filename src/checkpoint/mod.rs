//! Reading checkpoints: diffusers folders, safetensors by memory map, and tensor-name
//! normalisation so that the names users' (older) checkpoints use are accepted; single-file
//! checkpoints (original layout, `.safetensors` or PyTorch `.ckpt`) mapped to diffusers
//! components ([`single_file`], [`pickle`]); [`ModelSource`] hides which of the two a path is.
//!
//! [`VarBuilder`] is how models get their weights, candle-style: `vb.pp("down_blocks.0")`
//! narrows the name prefix, `vb.get("weight", &[..])` returns an f32 [`Tensor`] checked
//! against the expected shape, `vb.get_stored(..)` the same in the checkpoint's dtype (for
//! the large weights the ops widen at use: convolutions, embedding tables),
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

use crate::backend::{ops, Device, Tensor};
use crate::error::{Error, Result};
use crate::format::Weight;
use std::sync::Arc;

/// Prefixed access to one component's tensors, placed on one device: [`VarBuilder::get`]
/// returns tensors already uploaded to it (weights are uploaded once, at load).
#[derive(Clone)]
pub struct VarBuilder {
    store: Arc<ComponentStore>,
    prefix: String,
    device: Device,
}

impl VarBuilder {
    pub fn new(store: Arc<ComponentStore>) -> Self {
        VarBuilder { store, prefix: String::new(), device: Device::Cpu }
    }

    /// The same builder placing its tensors on `device`.
    pub fn on_device(self, device: &Device) -> Self {
        VarBuilder { device: device.clone(), ..self }
    }

    /// The device the model's tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// `t` moved to this builder's device (for tensors a model reads from the store itself).
    pub fn place(&self, t: Tensor) -> Result<Tensor> {
        match self.device {
            Device::Cpu => Ok(t),
            _ => ops::to_device(&t, &self.device),
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
        VarBuilder { store: self.store.clone(), prefix, device: self.device.clone() }
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

    /// An f32 tensor of exactly `shape` (errors name the tensor and both shapes).
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get_stored(name, shape)?.to_dtype(crate::format::DType::F32)
    }

    /// A tensor of exactly `shape` in its stored dtype (f32, f16 or bf16; not widened), for
    /// weights that `ops::conv2d` / `ops::embedding` / `ops::linear` widen at use.
    pub fn get_stored(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
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
        self.place(t)
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
