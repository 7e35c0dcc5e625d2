//! The `Linear` layer every model component shares (`y = x·Wᵀ + b`), and the observer hook
//! through which calibration sees each layer's inputs (Wanda / OWL, `crate::calibrate`).
//!
//! The weight stays in its stored form (dense, 2:4 or unstructured-sparse) from loading to
//! the kernel call. Each layer knows its weight's name in its component (`…to_q.weight`),
//! so statistics and pruning decisions are keyed by the names checkpoints use.

use crate::backend::{ops, Tensor};
use crate::checkpoint::VarBuilder;
use crate::error::{Error, Result};
use crate::format::Weight;
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
}

impl std::fmt::Debug for Linear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Linear")
            .field("name", &self.name)
            .field("weight", &self.weight)
            .field("bias", &self.bias)
            .field("observed", &self.observer.is_some())
            .finish()
    }
}

impl Linear {
    /// Loads `weight` `[out, in]` (and `bias` `[out]` when `bias`) under `vb`.
    pub fn load(vb: &VarBuilder, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        let weight = vb.get_weight("weight", out_features, in_features)?;
        let bias = if bias { Some(vb.get("bias", &[out_features])?) } else { None };
        Ok(Linear { name: vb.path("weight"), weight, bias, observer: None })
    }

    /// A linear layer stored as a 1x1 convolution (`use_linear_projection: false`
    /// checkpoints): the same product, applied to channels-last tokens.
    pub fn load_from_conv1x1(vb: &VarBuilder, in_features: usize, out_features: usize) -> Result<Self> {
        let w = vb
            .get_stored("weight", &[out_features, in_features, 1, 1])?
            .reshape(&[out_features, in_features])?;
        let bias = Some(vb.get("bias", &[out_features])?);
        Ok(Linear { name: vb.path("weight"), weight: Weight::Dense(w), bias, observer: None })
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
        self.weight = weight;
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
        ops::linear(x, &self.weight, self.bias.as_ref())
    }
}
