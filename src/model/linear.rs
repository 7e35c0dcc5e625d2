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
//!
//! [`Linear::forward_fused`] is `act(x·Wᵀ + b) + residual` (GELU, GEGLU, a residual add):
//! through the sparse kernels it runs in their epilogue (`sparse_linear::plan_epilogue`
//! says what fuses where); on every other path (CPU, dense cuBLAS, the dense fallback) it is
//! the same separate ops the model ran before, in the same order, so CPU results are
//! bit-identical. A GEGLU projection ([`Linear::load_geglu`]) with a 2:4 weight on the sparse
//! kernels is packed with its rows interleaved for the fused GEGLU (once, at load).

use crate::backend::{cuda, Device, Tensor};
use crate::checkpoint::VarBuilder;
use crate::error::{Error, Result};
use crate::format::{DType, Weight};
pub use crate::sparse_linear::LinearAct;
use crate::sparse_linear::{self as sl, SparseLinear};
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
    /// A GEGLU projection (`[2H, in]`: value rows, then gate rows), packed for the fused GEGLU
    /// where it runs on the 2:4 kernels ([`Linear::load_geglu`]).
    geglu: bool,
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
            .field("geglu", &self.geglu)
            .finish()
    }
}

impl Linear {
    /// Loads `weight` `[out, in]` (and `bias` `[out]` when `bias`) under `vb`.
    pub fn load(vb: &VarBuilder, in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        Self::load_as(vb, in_features, out_features, bias, false)
    }

    /// A GEGLU projection (diffusers' `GEGLU.proj`, `[2H, in]` with bias: value rows, then gate
    /// rows) for [`Self::forward_fused`] with [`LinearAct::Geglu`]: a 2:4 weight that runs on
    /// the sparse kernels with `H % 64 == 0` is packed with its rows interleaved for the fused
    /// GEGLU epilogue. Every forward stays canonical.
    pub fn load_geglu(vb: &VarBuilder, in_features: usize, out_features: usize) -> Result<Self> {
        Self::load_as(vb, in_features, out_features, true, true)
    }

    fn load_as(
        vb: &VarBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
        geglu: bool,
    ) -> Result<Self> {
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
        let sparse_gpu = place_geglu(geglu, &weight, sparse_gpu, bias.as_ref(), vb.device())?;
        Ok(Linear {
            name: vb.path("weight"),
            weight,
            bias,
            observer: None,
            device: vb.device().clone(),
            dtype,
            sparse_gpu,
            geglu,
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
            geglu: false,
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
        self.sparse_gpu = place_geglu(self.geglu, &weight, sparse_gpu, self.bias.as_ref(), &self.device)?;
        self.weight = weight;
        Ok(())
    }

    /// Attaches (or, with `None`, removes) an observer of this layer's inputs.
    pub fn set_observer(&mut self, observer: Option<Arc<dyn LinearObserver>>) {
        self.observer = observer;
    }

    /// What [`Self::forward_fused`] runs for `act` with activations in `x_dtype` and a residual
    /// in `residual` ([`epilogue_route`] on this layer's placement).
    pub fn epilogue_plan(
        &self,
        act: LinearAct,
        x_dtype: DType,
        residual: Option<DType>,
    ) -> Result<crate::sparse_linear::EpiloguePlan> {
        epilogue_route(&self.weight, self.sparse_gpu.is_some(), self.geglu, act, x_dtype, residual)
    }

    /// `y = x·Wᵀ + b`, `x[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_fused(x, LinearAct::None, None)
    }

    /// `y = act(x·Wᵀ + b) + residual`: `x[.., in]` → `[.., out]` (`[.., out / 2]` for
    /// [`LinearAct::Geglu`]); `residual` has the output's shape. The sparse kernels run the
    /// activation and the residual in their epilogue where they can; every other path runs
    /// `ops::linear`, then `ops::gelu` / `ops::geglu`, then `ops::add(y, residual)` (module
    /// docs). Errors on shapes that do not fit.
    pub fn forward_fused(&self, x: &Tensor, act: LinearAct, residual: Option<&Tensor>) -> Result<Tensor> {
        if let Some(obs) = &self.observer {
            obs.observe(&self.name, x)?;
        }
        match &self.sparse_gpu {
            Some(layer) => {
                let bias = if layer.owns_bias() { None } else { self.bias.as_ref() };
                layer.forward_fused(x, bias, act, residual)
            }
            None => {
                let (out, _) = self.weight.dims2()?;
                let n_final = if act == LinearAct::Geglu { out / 2 } else { out };
                sl::check_residual(x, n_final, residual)?;
                sl::linear_then_ops(x, &self.weight, self.bias.as_ref(), act, residual)
            }
        }
    }
}

/// For a GEGLU projection whose 2:4 weight [`place_weight`] put on the sparse kernels, the
/// layer re-packed with its rows (and bias) interleaved for the fused GEGLU epilogue
/// ([`SparseLinear::new_geglu`]; `H % 64 == 0`, else unchanged). Kept apart from
/// `place_weight`'s routing so that the fused path follows whatever it decides; the cost is a
/// second packing of those layers at load (16 in the SD2 UNet).
fn place_geglu(
    geglu: bool,
    weight: &Weight,
    placed: Option<Arc<SparseLinear>>,
    bias: Option<&Tensor>,
    device: &Device,
) -> Result<Option<Arc<SparseLinear>>> {
    if !interleaves_geglu(weight, placed.is_some(), geglu)? {
        return Ok(placed);
    }
    drop(placed); // the canonical packing is freed before the interleaved one is made
    Ok(Some(Arc::new(SparseLinear::new_geglu(weight.clone(), bias, device)?)))
}

/// Whether a layer's weight is packed row-interleaved for the fused GEGLU: a GEGLU projection
/// (`geglu_layer`) whose 2:4 weight runs on the sparse kernels, `H % 64 == 0`.
pub fn interleaves_geglu(weight: &Weight, sparse_kernels: bool, geglu_layer: bool) -> Result<bool> {
    Ok(geglu_layer
        && sparse_kernels
        && matches!(weight, Weight::Sparse24(_))
        && sl::geglu_interleavable(weight.dims2()?.0))
}

/// What a fused call on a layer runs (the same decision `SparseLinear::forward_fused` makes at
/// run time, as a pure function the host tests check per model layer): `weight` as stored,
/// `sparse_kernels` when [`place_weight`] put it on the sparse kernels (CUDA), `geglu_layer`
/// for a [`Linear::load_geglu`] projection, the activation, the activations' dtype and the
/// residual's, if any (GPU tensors on the sparse kernels).
pub fn epilogue_route(
    weight: &Weight,
    sparse_kernels: bool,
    geglu_layer: bool,
    act: LinearAct,
    x_dtype: DType,
    residual: Option<DType>,
) -> Result<sl::EpiloguePlan> {
    let kernel = match (sparse_kernels, weight) {
        (true, Weight::Sparse24(_)) => Some(crate::tune::Family::Sparse24),
        (true, Weight::Bitmap(_)) => Some(crate::tune::Family::Unstructured),
        _ => None,
    };
    let interleaved = interleaves_geglu(weight, kernel.is_some(), geglu_layer)?;
    let fusable = residual.map(|r| r == DType::F16 && x_dtype == DType::F16);
    Ok(sl::plan_epilogue(kernel, interleaved, act, fusable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::ArchMode;
    use crate::backend::test_util::{random_bitmap, random_sparse24, TestRng};
    use crate::sparse_linear::EpiloguePlan;
    use crate::tune::EpilogueClass;

    /// The model's fused calls: (layer, is a GEGLU projection, activation, has a residual).
    const LAYERS: [(&str, bool, LinearAct, bool); 4] = [
        ("text encoder fc1 (gelu)", false, LinearAct::Gelu, false),
        ("fc2 / out_proj / to_out.0 / ff.net.2 (+ residual)", false, LinearAct::None, true),
        ("ff.net.0.proj (GEGLU)", true, LinearAct::Geglu, false),
        ("ff.net.0.proj, plain forward", true, LinearAct::None, false),
    ];

    fn plan(
        fused: Option<(bool, bool, bool)>,
        deinterleave: bool,
        act: LinearAct,
        residual: bool,
    ) -> EpiloguePlan {
        let fused = fused.map(|(gelu, geglu, residual)| EpilogueClass { gelu, geglu, residual });
        EpiloguePlan { fused, deinterleave, act, residual }
    }

    /// Every model layer kind x weight format x placement x dtype gets the epilogue the issue
    /// asks for: the sparse kernels fuse GELU, GEGLU (2:4, interleaved) and an f16 residual;
    /// everything else (CPU, dense, dense-mode CUDA, f32 / bf16 residuals, unstructured GEGLU)
    /// runs the separate ops.
    #[test]
    fn epilogue_routing_per_layer_format_device_and_dtype() -> Result<()> {
        use LinearAct::{Geglu, Gelu, None as NoAct};
        let mut rng = TestRng::new(8);
        let (h, c) = (256, 64); // H % 64 == 0: GEGLU interleaves
        let geglu_w24 = Weight::Sparse24(random_sparse24(&mut rng, 2 * h, c, DType::F16));
        let odd_w24 = Weight::Sparse24(random_sparse24(&mut rng, 2 * 96, c, DType::F16)); // H = 96
        let w24 = Weight::Sparse24(random_sparse24(&mut rng, c, c, DType::F16));
        let wbm = Weight::Bitmap(random_bitmap(&mut rng, 2 * h, c, 0.5, DType::F16));
        let dense = Weight::Dense(Tensor::zeros(&[2 * h, c]));
        for dtype in [DType::F16, DType::F32, DType::BF16] {
            let f16 = dtype == DType::F16;
            for (layer, geglu_layer, act, has_res) in LAYERS {
                let res = has_res.then_some(dtype);
                let w = if geglu_layer { &geglu_w24 } else { &w24 };
                // CPU, dense weights and SDSPARSE_GPU_SPARSE=dense: the separate ops only.
                for (wt, kernels) in [(w, false), (&dense, false), (&dense, true), (&wbm, false)] {
                    let got = epilogue_route(wt, kernels, geglu_layer, act, dtype, res)?;
                    assert_eq!(got, plan(None, false, act, has_res), "{layer}, generic, {}", dtype.name());
                }
                let want24 = match (act, has_res, geglu_layer) {
                    (Gelu, _, _) => plan(Some((true, false, false)), false, NoAct, false),
                    (Geglu, _, _) => plan(Some((false, true, false)), false, NoAct, false),
                    (NoAct, true, _) => plan(Some((false, false, f16)), false, NoAct, !f16),
                    (NoAct, false, true) => plan(Some((false, false, false)), true, NoAct, false),
                    (NoAct, false, false) => unreachable!(),
                };
                let got = epilogue_route(w, true, geglu_layer, act, dtype, res)?;
                assert_eq!(got, want24, "{layer}, 2:4 kernels, {}", dtype.name());
                // Unstructured: no GEGLU epilogue, no interleave.
                let want_bm = match act {
                    Geglu => plan(Some((false, false, false)), false, Geglu, false),
                    _ => EpiloguePlan { deinterleave: false, ..want24 },
                };
                let got = epilogue_route(&wbm, true, geglu_layer, act, dtype, res)?;
                assert_eq!(got, want_bm, "{layer}, unstructured kernels, {}", dtype.name());
                if geglu_layer {
                    // H % 64 != 0: not interleaved, GEGLU after the kernel.
                    let got = epilogue_route(&odd_w24, true, true, act, dtype, res)?;
                    assert_eq!(got, plan(Some((false, false, false)), false, act, false), "{layer}, H = 96");
                }
            }
        }
        // A residual with f16 activations but an f32 residual (or the reverse) is not fused.
        let got = epilogue_route(&w24, true, false, NoAct, DType::F16, Some(DType::F32))?;
        assert_eq!(got, plan(Some((false, false, false)), false, NoAct, true));
        Ok(())
    }

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
