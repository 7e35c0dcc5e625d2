//! The `On::Cuda` arms of `backend::ops`: every op of the SD2 pipeline on GPU tensors, built
//! from the launchers of this module's siblings (activation kernels, tensor kernels, cuBLAS).
//!
//! `backend::ops` validates shapes before it gets here (the same one-line errors on every
//! device), so these functions only translate shapes into launches. Outputs are allocated
//! NaN-poisoned (all bytes 0xFF), so an element a kernel fails to write shows up as NaN in the
//! pipeline's finiteness checks instead of as a plausible stale value. Storage is f32 today:
//! the cuBLAS path is SGEMM, and every other kernel is instantiated for f32 / f16 / bf16 so
//! f16 activations need only the storage and GEMM dtype change (docs/CUDA.md).

use super::blas::{self, Gemm};
use super::decompress::DeviceValues;
use super::device::{CudaDevice, CudaStorage};
use super::libs::{self, Choice};
use super::lt::{Epilogue, LtLinear, LtRun};
use super::pointwise::{self, Unary};
use super::tensor_ops::{self, Binary, Im2colShape, StridedView};
use super::{dnn, lt};
use super::{norm, weight_to_dense};
use crate::backend::cpu::attention::AttnShape;
use crate::backend::cpu::conv::ConvShape;
use crate::backend::{Device, Storage, Tensor};
use crate::error::{Error, Result};
use crate::format::{DType, Weight};

/// The device storage of a tensor `ops` placed on CUDA.
fn storage(t: &Tensor) -> Result<&CudaStorage> {
    match t.storage() {
        Storage::Cuda(s) => Ok(s),
        _ => Err(Error::Invalid("expected a GPU tensor".into())),
    }
}

fn values(t: &Tensor) -> Result<&DeviceValues> {
    Ok(storage(t)?.values())
}

fn device_of(t: &Tensor) -> Result<CudaDevice> {
    Ok(storage(t)?.device())
}

/// A poisoned output of `len` elements in `dtype`.
fn output(dev: &CudaDevice, dtype: DType, len: usize) -> Result<DeviceValues> {
    DeviceValues::poisoned(dev, dtype, len.max(1))
}

fn wrap(dev: &CudaDevice, v: DeviceValues, shape: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(CudaStorage::from_values(dev, v)), shape)
}

/// `y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias)`. A dense weight is a GPU tensor (uploaded at load);
/// a compressed weight reaching this op (not placed by `model::Linear`, which runs sparse
/// weights through `SparseLinear`) is expanded on the GPU for this call.
pub fn linear(x: &Tensor, w: &Weight, bias: Option<&Tensor>, out_shape: &[usize]) -> Result<Tensor> {
    let dev = device_of(x)?;
    let (n, k) = w.dims2()?;
    let m = x.numel() / k.max(1);
    let expanded;
    let w_t = match w {
        Weight::Dense(t) => t,
        _ => {
            expanded = weight_to_dense(w, &Device::Cuda(dev.clone()))?;
            &expanded
        }
    };
    let xv = values(x)?;
    if m == 0 {
        return Err(Error::Shape(format!("linear: empty input {:?}", x.shape())));
    }
    if let Some(y) = linear_cublaslt(&dev, x, w_t, bias, (m, n, k), out_shape)? {
        return Ok(y);
    }
    let mut y = output(&dev, xv.dtype(), m * n)?;
    blas::sgemm(&dev, &Gemm::new(m, n, k, true), xv, values(w_t)?, &mut y)?;
    let y = wrap(&dev, y, out_shape);
    match bias {
        Some(b) => binary(Binary::Add, &y, b),
        None => Ok(y),
    }
}

/// `a[batch, m, k] · b[batch, k, n]`.
pub fn matmul(
    a: &Tensor,
    b: &Tensor,
    (batch, m, k, n): (usize, usize, usize, usize),
    out_shape: &[usize],
) -> Result<Tensor> {
    let dev = device_of(a)?;
    let av = values(a)?;
    let mut y = output(&dev, av.dtype(), batch * m * n)?;
    blas::sgemm(&dev, &Gemm::batched(batch, m, n, k, false), av, values(b)?, &mut y)?;
    Ok(wrap(&dev, y, out_shape))
}

/// Convolution through cuDNN ([`conv2d_cudnn`]) when it loads, else (or with
/// `SDSPARSE_GPU_CONV=im2col`) as im2col (our kernel, all images into one column buffer) + one
/// batched cuBLAS SGEMM with the weight shared across the batch; a 1x1 stride-1 convolution
/// skips im2col.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, s: ConvShape) -> Result<Tensor> {
    let dev = device_of(x)?;
    if let Some(y) = conv2d_cudnn(&dev, x, w, bias, s)? {
        return Ok(y);
    }
    let (ho, wo) = s.out_hw();
    let plane = ho * wo;
    let kdim = s.c_in * s.kh * s.kw;
    let xv = values(x)?;
    let mut y = output(&dev, xv.dtype(), s.batch * s.c_out * plane)?;
    let pointwise = s.kh == 1 && s.kw == 1 && s.stride == 1 && s.padding == 0;
    // Row-major per image: y[c_out, plane] = W[c_out, kdim] · col[kdim, plane].
    let g =
        Gemm { stride_a: 0, stride_b: kdim * plane, ..Gemm::batched(s.batch, s.c_out, plane, kdim, false) };
    if pointwise {
        blas::sgemm(&dev, &g, values(w)?, xv, &mut y)?;
    } else {
        let is = Im2colShape {
            c_in: s.c_in,
            h: s.h,
            w: s.w,
            kh: s.kh,
            kw: s.kw,
            stride: s.stride,
            pad: s.padding,
        };
        let mut col = output(&dev, xv.dtype(), s.batch * kdim * plane)?;
        for b in 0..s.batch {
            tensor_ops::im2col(&dev, is, (xv, b), (&mut col, b * kdim * plane))?;
        }
        blas::sgemm(&dev, &g, values(w)?, &col, &mut y)?;
    }
    let y = wrap(&dev, y, &[s.batch, s.c_out, ho, wo]);
    match bias {
        Some(b) => binary(Binary::Add, &y, &b.reshape(&[s.c_out, 1, 1])?),
        None => Ok(y),
    }
}

/// Group norm (+ SiLU) of `x[B, C, spatial..]`.
#[allow(clippy::too_many_arguments)]
pub fn group_norm(
    x: &Tensor,
    (batch, channels, spatial): (usize, usize, usize),
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let dev = device_of(x)?;
    let xv = values(x)?;
    let mut y = output(&dev, xv.dtype(), x.numel())?;
    norm::group_norm(
        &dev,
        (batch, channels, spatial),
        groups,
        eps,
        silu,
        xv,
        values(gamma)?,
        values(beta)?,
        &mut y,
    )?;
    Ok(wrap(&dev, y, x.shape()))
}

/// Layer norm over the last dim `dim`.
pub fn layer_norm(x: &Tensor, dim: usize, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let dev = device_of(x)?;
    let xv = values(x)?;
    let mut y = output(&dev, xv.dtype(), x.numel())?;
    norm::layer_norm(&dev, x.numel() / dim, dim, eps, xv, values(gamma)?, values(beta)?, &mut y)?;
    Ok(wrap(&dev, y, x.shape()))
}

/// Attention on `[B, H, S, D]` tensors: `S = scale · Q·Kᵀ` (cuBLAS, batched over B·H), the f32
/// softmax kernel (with the causal mask), `P·V` (cuBLAS). Exact f32, any head dim (the VAE's
/// single 512-wide head included); the scores take B·H·Sq·Sk f32 values of GPU memory.
/// Our flash kernel (`attention.rs`, f16, head dim 64) is not used by the f32 pipeline.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let dev = device_of(q)?;
    let bh = s.batch * s.heads;
    let qv = values(q)?;
    let mut scores = output(&dev, qv.dtype(), bh * s.sq * s.sk)?;
    let qk = Gemm { alpha: scale, ..Gemm::batched(bh, s.sq, s.sk, s.d, true) };
    blas::sgemm(&dev, &qk, qv, values(k)?, &mut scores)?;
    let mut probs = output(&dev, qv.dtype(), bh * s.sq * s.sk)?;
    tensor_ops::softmax(&dev, (bh * s.sq, s.sk), 1.0, causal.then_some(s.sq), &scores, &mut probs)?;
    drop(scores);
    let mut out = output(&dev, qv.dtype(), bh * s.sq * s.d)?;
    blas::sgemm(&dev, &Gemm::batched(bh, s.sq, s.d, s.sk, false), &probs, values(v)?, &mut out)?;
    Ok(wrap(&dev, out, q.shape()))
}

/// [`attention`] on head-interleaved `[B, S, H·D]` tensors: the heads are split and merged with
/// the strided-copy kernel.
pub fn attention_interleaved(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let split = |t: &Tensor, len: usize| permute(&t.reshape(&[s.batch, len, s.heads, s.d])?, &[0, 2, 1, 3]);
    let out = attention(&split(q, s.sq)?, &split(k, s.sk)?, &split(v, s.sk)?, s, scale, causal)?;
    permute(&out, &[0, 2, 1, 3])?.reshape(q.shape())
}

/// Softmax over the last dim.
pub fn softmax_last(x: &Tensor, dim: usize) -> Result<Tensor> {
    let dev = device_of(x)?;
    let xv = values(x)?;
    let mut y = output(&dev, xv.dtype(), x.numel())?;
    tensor_ops::softmax(&dev, (x.numel() / dim, dim), 1.0, None, xv, &mut y)?;
    Ok(wrap(&dev, y, x.shape()))
}

/// GELU / SiLU.
pub fn unary(op: Unary, x: &Tensor) -> Result<Tensor> {
    let dev = device_of(x)?;
    let xv = values(x)?;
    let mut y = output(&dev, xv.dtype(), x.numel())?;
    pointwise::unary(&dev, op, x.numel(), xv, &mut y)?;
    Ok(wrap(&dev, y, x.shape()))
}

/// GEGLU over rows of `2 · half`.
pub fn geglu(x: &Tensor, half: usize, out_shape: &[usize]) -> Result<Tensor> {
    let dev = device_of(x)?;
    let xv = values(x)?;
    let rows = x.numel() / (2 * half);
    let mut y = output(&dev, xv.dtype(), rows * half)?;
    pointwise::geglu(&dev, rows, half, xv, &mut y)?;
    Ok(wrap(&dev, y, out_shape))
}

/// `a (op) b`, `b` broadcast to `a` (as `ops` arranged them). Broadcasts the kernel cannot
/// express (several separate runs) are a clear error.
pub fn binary(op: Binary, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let dev = device_of(a)?;
    let av = values(a)?;
    let mut y = output(&dev, av.dtype(), a.numel())?;
    tensor_ops::binary(&dev, op, (a.shape(), b.shape()), av, values(b)?, &mut y)?;
    Ok(wrap(&dev, y, a.shape()))
}

/// `x · mul + add`.
pub fn affine(x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    let dev = device_of(x)?;
    let xv = values(x)?;
    let mut y = output(&dev, xv.dtype(), x.numel())?;
    tensor_ops::affine(&dev, x.numel(), mul, add, xv, &mut y)?;
    Ok(wrap(&dev, y, x.shape()))
}

/// Materialised permutation (perm validated by `ops`).
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let dev = device_of(x)?;
    let out_shape: Vec<usize> = perm.iter().map(|&p| x.shape()[p]).collect();
    let view = StridedView::permute(x.shape(), perm);
    strided(&dev, x, &view, &out_shape)
}

fn strided(dev: &CudaDevice, x: &Tensor, view: &StridedView, out_shape: &[usize]) -> Result<Tensor> {
    let xv = values(x)?;
    let mut y = output(dev, xv.dtype(), view.len())?;
    tensor_ops::strided_copy(dev, view, xv, &mut y)?;
    Ok(wrap(dev, y, out_shape))
}

/// The slice `start..start + len` of the middle axis of `x[outer, size, inner]`.
pub fn narrow(
    x: &Tensor,
    (outer, size, inner): (usize, usize, usize),
    start: usize,
    len: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    let dev = device_of(x)?;
    strided(&dev, x, &StridedView::narrow(outer, size, inner, start, len), out_shape)
}

/// Concatenation along a dim with `outer` leading elements and `inner` trailing ones (pairwise
/// through the two-operand concat kernel).
pub fn cat(xs: &[&Tensor], dim: usize, outer: usize, inner: usize) -> Result<Tensor> {
    let first = xs.first().ok_or_else(|| Error::Shape("cat: no tensors".into()))?;
    let dev = device_of(first)?;
    let mut acc: Tensor = (*first).clone();
    for t in &xs[1..] {
        let (a_inner, b_inner) = (acc.shape()[dim] * inner, t.shape()[dim] * inner);
        let av = values(&acc)?;
        let mut y = output(&dev, av.dtype(), outer * (a_inner + b_inner))?;
        pointwise::concat(&dev, outer, a_inner, b_inner, av, values(t)?, &mut y)?;
        let mut shape = acc.shape().to_vec();
        shape[dim] += t.shape()[dim];
        acc = wrap(&dev, y, &shape);
    }
    Ok(acc)
}

/// Nearest upsampling of `x[B, C, h, w]` to `[B, C, out_h, out_w]`.
pub fn upsample_nearest(
    x: &Tensor,
    (b, c, h, w): (usize, usize, usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Tensor> {
    let dev = device_of(x)?;
    let xv = values(x)?;
    let mut y = output(&dev, xv.dtype(), b * c * oh * ow)?;
    pointwise::upsample_nearest(&dev, b * c, (h, w), (oh, ow), xv, &mut y)?;
    Ok(wrap(&dev, y, &[b, c, oh, ow]))
}

/// Rows `ids` of `table[vocab, dim]`.
pub fn embedding(table: &Tensor, (vocab, dim): (usize, usize), ids: &[u32]) -> Result<Tensor> {
    let dev = device_of(table)?;
    let tv = values(table)?;
    let mut y = output(&dev, tv.dtype(), ids.len() * dim)?;
    tensor_ops::embedding(&dev, (vocab, dim), ids, tv, &mut y)?;
    Ok(wrap(&dev, y, &[ids.len(), dim]))
}

/// Classifier-free guidance on a batched `[uncond, cond]` prediction `pred[2, ..]` →
/// `uncond + guidance · (cond − uncond)` with shape `out_shape` (one half of `pred`).
pub fn cfg_combine(pred: &Tensor, guidance: f32, out_shape: &[usize]) -> Result<Tensor> {
    let dev = device_of(pred)?;
    let pv = values(pred)?;
    let n = pred.numel() / 2;
    let mut y = output(&dev, pv.dtype(), n)?;
    pointwise::cfg_combine(&dev, n, guidance, pv, &mut y)?;
    Ok(wrap(&dev, y, out_shape))
}

/// A dense Linear through cuBLASLt with the bias fused as its epilogue, or `None` (recorded
/// with the reason) when cuBLASLt is not loaded, forced off (`SDSPARSE_GPU_LINEAR=sgemm`), or
/// has no algorithm for the layout: the caller then runs SGEMM + the bias kernel. The GELU
/// epilogue is not used here: it is the tanh approximation and SD2's text encoder uses the exact
/// GELU (`lt.rs`).
fn linear_cublaslt(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    (m, n, k): (usize, usize, usize),
    out_shape: &[usize],
) -> Result<Option<Tensor>> {
    let fallback = |why: String| {
        libs::record(dev, |u| {
            u.sgemm_linear_calls += 1;
            u.linear_fallback.get_or_insert(why);
        });
        Ok(None)
    };
    let loaded = libs::lt(dev);
    let handle = match libs::choose("cuBLASLt", libs::LINEAR_VAR, libs::linear_override()?, &loaded)? {
        Choice::Library(h) => h,
        Choice::Fallback(why) => return fallback(why),
    };
    let (xv, wv) = (values(x)?, values(w)?);
    let bv = bias.map(values).transpose()?;
    if wv.dtype() != xv.dtype() || bv.is_some_and(|b| b.dtype() != xv.dtype()) {
        return fallback(format!(
            "weight {} / bias with {} activations",
            wv.dtype().name(),
            xv.dtype().name()
        ));
    }
    let epilogue = if bias.is_some() { Epilogue::Bias } else { Epilogue::None };
    let l = LtLinear { m, n, k, x_dtype: xv.dtype(), y_dtype: xv.dtype(), epilogue };
    let mut y = output(dev, xv.dtype(), m * n)?;
    let mut h = handle.lock().map_err(|_| Error::Cuda("cuBLASLt handle poisoned".into()))?;
    match lt::lt_linear(dev, &mut h, &l, xv, wv, bv, &mut y)? {
        LtRun::Ran => {
            libs::record(dev, |u| match epilogue {
                Epilogue::None => u.lt_calls.0 += 1,
                Epilogue::Bias => u.lt_calls.1 += 1,
                Epilogue::GeluTanhBias => u.lt_calls.2 += 1,
            });
            Ok(Some(wrap(dev, y, out_shape)))
        }
        LtRun::NotSupported(why) => fallback(why),
    }
}

/// A convolution through cuDNN, the bias fused where cuDNN allows it (else the add kernel), or
/// `None` (recorded with the reason) when cuDNN is not loaded, forced off
/// (`SDSPARSE_GPU_CONV=im2col`) or has no algorithm: the caller then runs im2col + cuBLAS.
fn conv2d_cudnn(
    dev: &CudaDevice,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    s: ConvShape,
) -> Result<Option<Tensor>> {
    let fallback = |why: String| {
        libs::record(dev, |u| {
            u.im2col_calls += 1;
            u.conv_fallback.get_or_insert(why);
        });
        Ok(None)
    };
    let loaded = libs::dnn(dev);
    let handle = match libs::choose("cuDNN", libs::CONV_VAR, libs::conv_override()?, &loaded)? {
        Choice::Library(h) => h,
        Choice::Fallback(why) => return fallback(why),
    };
    let xv = values(x)?;
    let (ho, wo) = s.out_hw();
    let mut y = output(dev, xv.dtype(), s.batch * s.c_out * ho * wo)?;
    let mut h = handle.lock().map_err(|_| Error::Cuda("cuDNN handle poisoned".into()))?;
    match dnn::cudnn_conv(
        dev,
        &mut h,
        libs::conv_options()?,
        s,
        xv,
        values(w)?,
        bias.map(values).transpose()?,
        &mut y,
    )? {
        dnn::DnnRun::Ran { fused_bias, .. } => {
            let version = h.version().to_string();
            libs::record(dev, |u| {
                u.cudnn_calls += 1;
                u.cudnn_fused_bias += fused_bias as u64;
                u.cudnn_version.get_or_insert(version);
            });
            let y = wrap(dev, y, &[s.batch, s.c_out, ho, wo]);
            match bias {
                Some(b) if !fused_bias => binary(Binary::Add, &y, &b.reshape(&[s.c_out, 1, 1])?).map(Some),
                _ => Ok(Some(y)),
            }
        }
        dnn::DnnRun::NotSupported(why) => fallback(why),
    }
}
