//! The `Linear` layer every model component shares (`y = x·Wᵀ + b`), and the observer hook
//! through which calibration sees each layer's inputs (Wanda / OWL, `crate::calibrate`).
//!
//! The weight stays in its stored form (dense, 2:4 or unstructured-sparse) from loading to
//! the kernel call. On CUDA ([`place_weight`]) a dense weight is uploaded at load in the
//! activation dtype, and a compressed one is packed once for the sparse GEMM kernels
//! ([`SparseLinear`]; its bias stays f32, what their epilogue reads), or, with
//! `SDSPARSE_GPU_SPARSE=dense`, on a dense-only GPU (below 8.0) or when the kernels cannot take
//! its shape, expanded once to a dense GPU weight in the activation dtype (decompression
//! kernels) that cuBLAS multiplies. Each layer knows its weight's name in its component
//! (`…to_q.weight`), so statistics and pruning decisions are keyed by the names checkpoints use.

use crate::backend::{cuda, ops, Device, Tensor};
use crate::checkpoint::VarBuilder;
use crate::error::{Error, Result};
use crate::format::{DType, Weight};
use crate::sparse_linear::SparseLinear;
use std::sync::Arc;

/// Sees the input of every forward call of the layers it is attached to. Implementations
/// must be cheap to share across threads (the model may run layers in parallel later).
pub trait LinearObserver: Send + Sync {
    /// `layer` is the weight's name in its component (e.g. `encoder.layers.0.mlp.fc1.weight`);
    /// `input` is the layer's input `[.., in_features]` (any leading dims), before the product.
    fn observe(&self, layer: &str, input: &Tensor) -> Result<()>;
}

/// `y = x·Wᵀ + b` over the last dim; the weight stays in its stored (possibly compressed) form.
#[derive(Clone)]
pub struct Linear {
    name: String,
    weight: Weight,
    bias: Option<Tensor>,
    observer: Option<Arc<dyn LinearObserver>>,
    /// Where the layer runs; on CUDA, `weight` is a GPU tensor or `sparse_gpu` is set.
    device: Device,
    /// The activation dtype on `device` (what a dense weight is uploaded in).
    dtype: DType,
    /// The compressed weight packed for the GPU sparse kernels (CUDA only).
    sparse_gpu: Option<Arc<SparseLinear>>,
}

/// Whether compressed weights on CUDA run through the sparse kernels (default) or are expanded
/// once to dense weights in the activation dtype for cuBLAS (`SDSPARSE_GPU_SPARSE=dense`: with
/// f32 activations, exact f32 products; the sparse kernels compute on f16 activations).
pub fn gpu_sparse_kernels() -> bool {
    std::env::var("SDSPARSE_GPU_SPARSE").map(|v| v != "dense").unwrap_or(true)
}

/// Whether a compressed weight of `in_features` columns runs on the sparse GEMM kernels of a GPU
/// in `mode` (`kernels_enabled`: [`gpu_sparse_kernels`]); otherwise it is expanded to dense at
/// load. A dense-only GPU (below 8.0, where the sparse kernels are traps) never takes them.
pub fn uses_sparse_kernels(kernels_enabled: bool, mode: cuda::ArchMode, in_features: usize) -> bool {
    kernels_enabled && mode.sparse_kernels() && in_features.is_multiple_of(8)
}

/// `weight` placed on `device` with activations in `dtype` (see the module docs): the weight to
/// keep and, for the sparse kernels, the packed GPU layer.
pub fn place_weight(
    weight: Weight,
    device: &Device,
    dtype: DType,
) -> Result<(Weight, Option<Arc<SparseLinear>>)> {
    let Device::Cuda(dev) = device else {
        return Ok((weight, None));
    };
    match weight {
        Weight::Dense(t) => Ok((Weight::Dense(cuda::to_cuda_as(&t, dev, dtype)?), None)),
        sparse => {
            let (_, in_features) = sparse.dims2()?;
            if uses_sparse_kernels(gpu_sparse_kernels(), dev.arch_mode(), in_features) {
                let layer = SparseLinear::new(sparse.clone(), device)?;
                Ok((sparse, Some(Arc::new(layer))))
            } else {
                Ok((Weight::Dense(cuda::weight_to_dense(&sparse, device)?.to_dtype(dtype)?), None))
            }
        }
    }
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linear")
            .field("name", &self.name)
            .field("weight", &self.weight)
            .field("bias", &self.bias)
            .field("observed", &self.observer.is_some())
            .field("device", &self.device.name())
            .field("sparse_kernels", &self.sparse_gpu.is_some())
            .finish()
    }
}

impl Linear {
    /// Loads `weight` `[out, in]` (and `bias` `[out]` when `bias`) under `vb`.
    pub fn load(vb: &VarBuilder, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = vb.get_weight("weight", out_features, in_features)?;
        let dtype = vb.activation_dtype();
        let (weight, sparse_gpu) = place_weight(weight, vb.device(), dtype)?;
        // The sparse kernels' epilogue reads an f32 bias; cuBLAS's bias add, one in the
        // activation dtype.
        let bias = match (bias, &sparse_gpu) {
            (false, _) => None,
            (true, Some(_)) => Some(vb.get("bias", &[out_features])?),
            (true, None) => Some(vb.get_act("bias", &[out_features])?),
        };
        Ok(Linear {
            name: vb.path("weight"),
            weight,
            bias,
            observer: None,
            device: vb.device().clone(),
            dtype,
            sparse_gpu,
        })
    }

    /// A linear layer stored as a 1x1 convolution (`use_linear_projection: false`
    /// checkpoints): the same product, applied to channels-last tokens.
    pub fn load_from_conv1x1(vb: &VarBuilder, in_features: usize, out_features: usize) -> Result<Self> {
        let w = vb
            .get_stored("weight", &[out_features, in_features, 1, 1])?
            .reshape(&[out_features, in_features])?;
        let bias = Some(vb.get_act("bias", &[out_features])?);
        Ok(Linear {
            name: vb.path("weight"),
            weight: Weight::Dense(w),
            bias,
            observer: None,
            device: vb.device().clone(),
            dtype: vb.activation_dtype(),
            sparse_gpu: None,
        })
    }

    /// The weight's name in its component (`down_blocks.0.attentions.0.proj_in.weight`).
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Replaces the weight (e.g. by a pruned, compressed form of itself); the shape must
    /// stay `[out, in]`.
    pub fn set_weight(&mut self, weight: Weight) -> Result<()> {
        let (old, new) = (self.weight.dims2()?, weight.dims2()?);
        if old != new {
            return Err(Error::Shape(format!("linear weight {old:?} cannot be replaced by {new:?}")));
        }
        let (weight, sparse_gpu) = place_weight(weight, &self.device, self.dtype)?;
        // The bias goes where the new weight's product wants it (f32 for the sparse kernels).
        if let (Some(b), Device::Cuda(_)) = (&self.bias, &self.device) {
            let want = if sparse_gpu.is_some() { DType::F32 } else { self.dtype };
            self.bias = Some(b.to_dtype(want)?);
        }
        self.weight = weight;
        self.sparse_gpu = sparse_gpu;
        Ok(())
    }

    /// Attaches (or, with `None`, removes) an observer of this layer's inputs.
    pub fn set_observer(&mut self, observer: Option<Arc<dyn LinearObserver>>) {
        self.observer = observer;
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(obs) = &self.observer {
            obs.observe(&self.name, x)?;
        }
        match &self.sparse_gpu {
            Some(layer) => layer.forward(x, self.bias.as_ref()),
            None => ops::linear(x, &self.weight, self.bias.as_ref()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::uses_sparse_kernels;
    use crate::backend::cuda::ArchMode;

    #[test]
    fn sparse_weights_take_the_kernels_only_on_full_gpus() {
        let full = ArchMode::Full;
        assert!(uses_sparse_kernels(true, full, 320));
        // SDSPARSE_GPU_SPARSE=dense, or a shape the kernels cannot take: expanded.
        assert!(!uses_sparse_kernels(false, full, 320));
        assert!(!uses_sparse_kernels(true, full, 77));
        // Below 8.0 (or forced dense-only) always expanded, whatever else holds.
        for mode in [ArchMode::DenseOnly { forced: false }, ArchMode::DenseOnly { forced: true }] {
            assert!(!uses_sparse_kernels(true, mode, 320));
            assert!(!uses_sparse_kernels(false, mode, 320));
        }
    }
}
