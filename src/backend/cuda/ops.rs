//! The `On::Cuda` arms of `backend::ops`: every op of the SD2 pipeline on GPU tensors, built
//! from the launchers of this module's siblings (activation kernels, tensor kernels, cuBLAS).
//!
//! `backend::ops` validates shapes before it gets here (the same one-line errors on every
//! device), so these functions only translate shapes into launches. Outputs are allocated
//! NaN-poisoned (all bytes 0xFF), so an element a kernel fails to write shows up as NaN in the
//! pipeline's finiteness checks instead of as a plausible stale value.
//!
//! Activation dtype (f32, f16 or bf16; docs/CUDA.md): every op writes its output in the dtype
//! of its activation input; a dense Linear / conv weight, uploaded at load in the activation
//! dtype, decides its product's dtype (an f32 input from the host — latents, the timestep
//! embedding — is cast to it there, so the pipeline's f32 boundaries need no special code);
//! other operands in another dtype (a bias, a second addend, K / V) are cast to the
//! activation's. GEMMs: SGEMM for f32, `cublasGemmStridedBatchedEx` with f32 accumulation for
//! f16 / bf16 ([`blas::gemm`]); norms and softmax compute in f32 inside the kernels (their
//! `gamma` / `beta` are f32).

use super::attention::{self, AttentionShape, HeadLayout};
use super::blas::{self, Gemm};
use super::decompress::DeviceValues;
use super::device::{ArchMode, CudaDevice, CudaStorage};
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

/// `t` in `dtype` on its GPU: shared when it already is, else converted by the cast kernels
/// (f32 ↔ f16 / bf16 directly, f16 ↔ bf16 through f32; round to nearest even).
pub fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let from = t.dtype();
    if from == dtype {
        return Ok(t.clone());
    }
    if from != DType::F32 && dtype != DType::F32 {
        return to_dtype(&to_dtype(t, DType::F32)?, dtype);
    }
    let dev = device_of(t)?;
    let mut y = output(&dev, dtype, t.numel())?;
    tensor_ops::cast(&dev, t.numel(), values(t)?, &mut y)?;
    Ok(wrap(&dev, y, t.shape()))
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
    if m == 0 {
        return Err(Error::Shape(format!("linear: empty input {:?}", x.shape())));
    }
    // The weight's dtype (the activation dtype it was uploaded in) decides the product's.
    let x = to_dtype(x, w_t.dtype())?;
    if let Some(y) = linear_cublaslt(&dev, &x, w_t, bias, (m, n, k), out_shape)? {
        return Ok(y);
    }
    let xv = values(&x)?;
    let mut y = output(&dev, xv.dtype(), m * n)?;
    blas::gemm(&dev, &Gemm::new(m, n, k, true), xv, values(w_t)?, &mut y)?;
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
    let b = to_dtype(b, av.dtype())?;
    let mut y = output(&dev, av.dtype(), batch * m * n)?;
    blas::gemm(&dev, &Gemm::batched(batch, m, n, k, false), av, values(&b)?, &mut y)?;
    Ok(wrap(&dev, y, out_shape))
}

/// Convolution through cuDNN ([`conv2d_cudnn`]) when it loads, else (or with
/// `SDSPARSE_GPU_CONV=im2col`) as im2col (our kernel, all images into one column buffer) + one
/// batched cuBLAS GEMM (in the weight's dtype) with the weight shared across the batch; a 1x1 stride-1 convolution
/// skips im2col.
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, s: ConvShape) -> Result<Tensor> {
    let dev = device_of(x)?;
    // As for Linear: the weight's dtype decides (cuDNN and im2col run in it).
    let x = to_dtype(x, w.dtype())?;
    if let Some(y) = conv2d_cudnn(&dev, &x, w, bias, s)? {
        return Ok(y);
    }
    let (ho, wo) = s.out_hw();
    let plane = ho * wo;
    let kdim = s.c_in * s.kh * s.kw;
    let xv = values(&x)?;
    let mut y = output(&dev, xv.dtype(), s.batch * s.c_out * plane)?;
    let pointwise = s.kh == 1 && s.kw == 1 && s.stride == 1 && s.padding == 0;
    // Row-major per image: y[c_out, plane] = W[c_out, kdim] · col[kdim, plane].
    let g =
        Gemm { stride_a: 0, stride_b: kdim * plane, ..Gemm::batched(s.batch, s.c_out, plane, kdim, false) };
    if pointwise {
        blas::gemm(&dev, &g, values(w)?, xv, &mut y)?;
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
        blas::gemm(&dev, &g, values(w)?, &col, &mut y)?;
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
        values(&to_dtype(gamma, DType::F32)?)?,
        values(&to_dtype(beta, DType::F32)?)?,
        &mut y,
    )?;
    Ok(wrap(&dev, y, x.shape()))
}

/// Layer norm over the last dim `dim`.
pub fn layer_norm(x: &Tensor, dim: usize, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let dev = device_of(x)?;
    let xv = values(x)?;
    let mut y = output(&dev, xv.dtype(), x.numel())?;
    let (gamma, beta) = (to_dtype(gamma, DType::F32)?, to_dtype(beta, DType::F32)?);
    norm::layer_norm(&dev, x.numel() / dim, dim, eps, xv, values(&gamma)?, values(&beta)?, &mut y)?;
    Ok(wrap(&dev, y, x.shape()))
}

/// Which attention path runs for activations of `dtype` on a GPU in `mode` (the choice
/// [`attention`] makes, a pure function so the routing is unit-tested on the host):
/// - f16, head dim 64, with or without the causal mask: our flash kernel (`attention.rs`,
///   `cuda/attention.cu`): f16 Q/K/V/O, `Q·Kᵀ` on tensor cores into f32 accumulators, f32 online
///   softmax, P rounded to f16 for `P·V` (the UNet's heads and the text encoder's causal ones);
/// - otherwise (f32, bf16, any other head dim — the VAE's single 512-wide head —, a dense-only
///   GPU (below 8.0, [`ArchMode::DenseOnly`]: the flash kernel is a trap there), or
///   `SDSPARSE_GPU_ATTENTION=softmax`): the scores path.
///
/// Neither path stores scores in f16, so `upcast_attention` (SD2.1 768-v, whose f16 scores
/// overflow in diffusers without it) needs no flag here: both compute `Q·Kᵀ` and the softmax in
/// f32 for every block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionPath {
    Flash,
    Scores,
}

/// `causal` does not change the choice (both paths take the mask); it stays an argument so the
/// routing test states that for the text encoder's shape.
pub fn attention_path(mode: ArchMode, dtype: DType, head_dim: usize, causal: bool) -> AttentionPath {
    let _ = causal;
    let forced = std::env::var("SDSPARSE_GPU_ATTENTION").is_ok_and(|v| v == "softmax");
    if mode.flash_attention() && dtype == DType::F16 && head_dim == attention::HEAD_DIM && !forced {
        AttentionPath::Flash
    } else {
        AttentionPath::Scores
    }
}

/// The scores path on `[B, H, S, D]` tensors: `S = scale · Q·Kᵀ` into f32 (SGEMM, or GemmEx
/// with f16 / bf16 inputs and an f32 result), the softmax kernel reading f32 scores (causal
/// mask folded in) and writing P in the activation dtype, `P·V` (cuBLAS). Any head dim; the scores take B·H·Sq·Sk f32
/// values of GPU memory (64 MiB for the VAE's 4096 positions).
fn attention_scores(
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
    let mut scores = output(&dev, DType::F32, bh * s.sq * s.sk)?;
    let qk = Gemm { alpha: scale, ..Gemm::batched(bh, s.sq, s.sk, s.d, true) };
    blas::gemm(&dev, &qk, qv, values(k)?, &mut scores)?;
    // P straight in the activation dtype (the f32 → f16 / bf16 softmax kernels).
    let mut probs = output(&dev, qv.dtype(), bh * s.sq * s.sk)?;
    tensor_ops::softmax(&dev, (bh * s.sq, s.sk), 1.0, causal.then_some(s.sq), &scores, &mut probs)?;
    drop(scores);
    let mut out = output(&dev, qv.dtype(), bh * s.sq * s.d)?;
    blas::gemm(&dev, &Gemm::batched(bh, s.sq, s.d, s.sk, false), &probs, values(v)?, &mut out)?;
    Ok(wrap(&dev, out, &[s.batch, s.heads, s.sq, s.d]))
}

/// The flash kernel on f16 operands addressed through `layouts` (Q, K, V, O), with the causal
/// mask when `causal`; the output is a new buffer in O's layout.
#[allow(clippy::too_many_arguments)]
fn attention_flash(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    scale: f32,
    causal: bool,
    layouts: [HeadLayout; 4],
    out_shape: &[usize],
) -> Result<Tensor> {
    let dev = device_of(q)?;
    if !dev.arch_mode().flash_attention() {
        return Err(Error::Cuda(format!("the flash attention kernel does not run on {}", dev.gpu_name())));
    }
    let shape = AttentionShape { batch: s.batch, heads: s.heads, seq_q: s.sq, seq_kv: s.sk, scale, causal };
    let o = output(&dev, DType::F16, s.batch * s.heads * s.sq * s.d)?;
    let (qv, kv, vv) = (values(q)?, values(k)?, values(v)?);
    if [qv.dtype(), kv.dtype(), vv.dtype()] != [DType::F16; 3] {
        return Err(Error::Invalid("flash attention takes f16 Q, K, V".into()));
    }
    let lens = [qv.len(), kv.len(), vv.len(), o.len()];
    if let Some((mut params, grid)) = attention::plan_attention(&shape, lens, layouts)? {
        params.q = qv.device_ptr(&dev);
        params.k = kv.device_ptr(&dev);
        params.v = vv.device_ptr(&dev);
        params.o = o.device_ptr(&dev);
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: grid,
            block_dim: (attention::FLASH_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: plan_attention checked that every buffer holds what its layout addresses for
        // this shape; the buffers live until after the launch (queued on the device's stream).
        unsafe { dev.launch("sdsparse_attn_fwd_d64", cfg, &params)? };
    }
    Ok(wrap(&dev, o, out_shape))
}

/// Attention on `[B, H, S, D]` tensors, in the dtype of `q` (K and V cast to it), through the
/// path [`attention_path`] picks.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let (k, v) = (to_dtype(k, q.dtype())?, to_dtype(v, q.dtype())?);
    match attention_path(device_of(q)?.arch_mode(), q.dtype(), s.d, causal) {
        AttentionPath::Flash => {
            let l = |seq| HeadLayout::bhsd(s.heads, seq);
            attention_flash(q, &k, &v, s, scale, causal, [l(s.sq), l(s.sk), l(s.sk), l(s.sq)], q.shape())
        }
        AttentionPath::Scores => attention_scores(q, &k, &v, s, scale, causal),
    }
}

/// [`attention`] on head-interleaved `[B, S, H·D]` tensors: the flash kernel reads and writes
/// that layout in place; the scores path splits and merges the heads with the strided-copy
/// kernel.
pub fn attention_interleaved(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: AttnShape,
    scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let (k, v) = (to_dtype(k, q.dtype())?, to_dtype(v, q.dtype())?);
    if attention_path(device_of(q)?.arch_mode(), q.dtype(), s.d, causal) == AttentionPath::Flash {
        let l = |seq| HeadLayout::bshd(s.heads, seq);
        return attention_flash(q, &k, &v, s, scale, causal, [l(s.sq), l(s.sk), l(s.sk), l(s.sq)], q.shape());
    }
    let split = |t: &Tensor, len: usize| permute(&t.reshape(&[s.batch, len, s.heads, s.d])?, &[0, 2, 1, 3]);
    let out = attention_scores(&split(q, s.sq)?, &split(&k, s.sk)?, &split(&v, s.sk)?, s, scale, causal)?;
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
    let b = to_dtype(b, av.dtype())?;
    let mut y = output(&dev, av.dtype(), a.numel())?;
    tensor_ops::binary(&dev, op, (a.shape(), b.shape()), av, values(&b)?, &mut y)?;
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
        let t = to_dtype(t, av.dtype())?;
        let mut y = output(&dev, av.dtype(), outer * (a_inner + b_inner))?;
        pointwise::concat(&dev, outer, a_inner, b_inner, av, values(&t)?, &mut y)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::pointwise::test_support::rounded;
    use crate::backend::ops as dispatch;
    use crate::backend::test_util::{check_close, TestRng};
    use crate::test_device;

    #[test]
    fn attention_routing() {
        use AttentionPath::*;
        let full = ArchMode::Full;
        // The UNet's heads (head dim 64) in f16: the flash kernel.
        assert_eq!(attention_path(full, DType::F16, 64, false), Flash);
        // The text encoder's causal heads (77 tokens, 16 x 64 in SD2): the flash kernel, which
        // takes the mask (`SdsAttentionParams::causal`).
        assert_eq!(attention_path(full, DType::F16, 64, true), Flash);
        assert_eq!(attention_path(full, DType::BF16, 64, true), Scores);
        // The VAE mid-block's single 512-wide head, and any other head dim.
        assert_eq!(attention_path(full, DType::F16, 512, false), Scores);
        assert_eq!(attention_path(full, DType::F16, 40, false), Scores);
        // The flash kernel is f16-only.
        assert_eq!(attention_path(full, DType::BF16, 64, false), Scores);
        assert_eq!(attention_path(full, DType::F32, 64, false), Scores);
    }

    #[test]
    fn dense_only_gpus_never_take_the_flash_kernel() {
        // A Turing GPU (by capability) and a forced dense-only one: every shape, every dtype,
        // causal or not, goes to the scores path (cuBLAS + the f32 softmax).
        for mode in [ArchMode::DenseOnly { forced: false }, ArchMode::DenseOnly { forced: true }] {
            for dtype in [DType::F16, DType::F32, DType::BF16] {
                for head_dim in [40, 64, 512] {
                    for causal in [false, true] {
                        assert_eq!(attention_path(mode, dtype, head_dim, causal), AttentionPath::Scores);
                    }
                }
            }
        }
    }

    /// `values` as a tensor of `shape` on `device` in `dtype` (on the CPU: f32, rounded to
    /// `dtype`, the CPU twin's input).
    fn on(device: &Device, values: &[f32], shape: &[usize], dtype: DType) -> Result<Tensor> {
        let t = Tensor::from_vec(rounded(values, dtype), shape)?;
        match device {
            Device::Cpu => Ok(t),
            Device::Cuda(dev) => crate::backend::cuda::to_cuda_as(&t, dev, dtype),
        }
    }

    /// The bound of a GPU op with `dtype` activations against the f32 CPU reference on the same
    /// (rounded) inputs: the output's rounding (f16 2^-11, bf16 2^-8) plus f32 accumulation
    /// order; f32 activations are held to 1e-5 / 1e-4.
    fn bounds(dtype: DType) -> (f64, f64) {
        match dtype {
            DType::F32 => (1e-5, 1e-4),
            DType::F16 => (2e-3, 1e-2),
            DType::BF16 => (1e-2, 4e-2),
        }
    }

    /// Runs `op` on `device` (inputs in `dtype`) and on the CPU (f32 inputs rounded to
    /// `dtype`), and checks that the GPU output is in `dtype`, finite and within [`bounds`].
    fn compare(
        what: &str,
        device: &Device,
        dtype: DType,
        inputs: &[(&[f32], &[usize])],
        op: impl Fn(&[Tensor]) -> Result<Tensor>,
    ) -> Result<()> {
        let cpu = inputs.iter().map(|(v, s)| on(&Device::Cpu, v, s, dtype)).collect::<Result<Vec<_>>>()?;
        let expected = op(&cpu)?.to_vec()?;
        let got = match device {
            Device::Cpu => expected.clone(),
            Device::Cuda(_) => {
                let gpu = inputs.iter().map(|(v, s)| on(device, v, s, dtype)).collect::<Result<Vec<_>>>()?;
                let y = op(&gpu)?;
                if y.dtype() != dtype {
                    return Err(Error::Invalid(format!(
                        "{what}: output in {}, activations in {}",
                        y.dtype().name(),
                        dtype.name()
                    )));
                }
                y.to_vec()?
            }
        };
        let (norm, elem) = bounds(dtype);
        let err = check_close(&got, &expected, norm, elem)
            .map_err(|e| Error::Invalid(format!("{what} ({}): {e}", dtype.name())))?;
        println!("{what} ({}): relative error {err:.2e}", dtype.name());
        Ok(())
    }

    /// Every op whose CUDA arm changed for half-precision activations, in f32, f16 and bf16, on
    /// fresh random inputs against the f32 CPU reference: Linear (GemmEx, bias in the
    /// activation dtype, an f32 host input cast to the weight's dtype), conv (im2col in the
    /// activation dtype, 1x1 and strided), group / layer norm (f32 statistics and parameters),
    /// attention through both paths (flash for f16 head dim 64, in [B, H, S, D] and
    /// head-interleaved layouts; the scores path with the causal mask and for the VAE's
    /// 512-wide single head), matmul and the casts.
    fn half_ops_match_cpu(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("half_ops");
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let (x, w, b) = (rng.vec(154 * 320), rng.vec(640 * 320), rng.vec(640));
            compare("linear", device, dtype, &[(&x, &[2, 77, 320]), (&w, &[640, 320]), (&b, &[640])], |t| {
                dispatch::linear(&t[0], &Weight::Dense(t[1].clone()), Some(&t[2]))
            })?;
            // An f32 input (from the host) meets a weight in the activation dtype.
            compare("linear, f32 input", device, dtype, &[(&x, &[154, 320]), (&w, &[640, 320])], |t| {
                dispatch::linear(&t[0].to_dtype(DType::F32)?, &Weight::Dense(t[1].clone()), None)
            })?;
            let (x, w, b) = (rng.vec(2 * 8 * 9 * 11), rng.vec(16 * 8 * 9), rng.vec(16));
            for (stride, pad) in [(1, 1), (2, 1), (1, 0)] {
                compare(
                    &format!("conv2d 3x3 stride {stride} pad {pad}"),
                    device,
                    dtype,
                    &[(&x, &[2, 8, 9, 11]), (&w, &[16, 8, 3, 3]), (&b, &[16])],
                    |t| dispatch::conv2d(&t[0], &t[1], Some(&t[2]), stride, pad),
                )?;
            }
            let w1 = rng.vec(16 * 8);
            compare("conv2d 1x1", device, dtype, &[(&x, &[2, 8, 9, 11]), (&w1, &[16, 8, 1, 1])], |t| {
                dispatch::conv2d(&t[0], &t[1], None, 1, 0)
            })?;
            let x: Vec<f32> = rng.vec(2 * 32 * 35).iter().map(|v| 0.5 + 2.0 * v).collect();
            let (g, b) = (rng.vec(32), rng.vec(32));
            for silu in [false, true] {
                let norm_on = |t: &Tensor, dev: &Device| -> Result<Tensor> {
                    // gamma / beta are f32 on every device (what the norm kernels read).
                    let p = |v: &[f32]| dispatch::to_device(&Tensor::from_vec(v.to_vec(), &[32])?, dev);
                    dispatch::group_norm(t, 8, &p(&g)?, &p(&b)?, 1e-5, silu)
                };
                compare(&format!("group_norm silu {silu}"), device, dtype, &[(&x, &[2, 32, 5, 7])], |t| {
                    norm_on(&t[0], &t[0].device())
                })?;
            }
            let x = rng.vec(77 * 320);
            let (g, b) = (rng.vec(320), rng.vec(320));
            compare("layer_norm", device, dtype, &[(&x, &[77, 320])], |t| {
                let p =
                    |v: &[f32]| dispatch::to_device(&Tensor::from_vec(v.to_vec(), &[320])?, &t[0].device());
                dispatch::layer_norm(&t[0], &p(&g)?, &p(&b)?, 1e-5)
            })?;
            // Attention: UNet-like heads (flash in f16), the causal text encoder (flash in f16:
            // 77 tokens, a multiple of the 64-key tile, a ragged 130 over three query blocks,
            // and 70 queries over 77 keys, where the mask aligns at the end), the VAE head.
            for (b_, h, sq, sk, d, causal) in [
                (2, 5, 70, 77, 64, false),
                (2, 5, 77, 77, 64, true),
                (1, 2, 128, 128, 64, true),
                (1, 2, 130, 130, 64, true),
                (1, 2, 70, 77, 64, true),
                (1, 1, 256, 256, 512, false),
            ] {
                let (q, k, v) =
                    (rng.vec(b_ * h * sq * d), rng.vec(b_ * h * sk * d), rng.vec(b_ * h * sk * d));
                compare(
                    &format!("attention [{b_}, {h}, {sq}/{sk}, {d}] causal {causal}"),
                    device,
                    dtype,
                    &[(&q, &[b_, h, sq, d]), (&k, &[b_, h, sk, d]), (&v, &[b_, h, sk, d])],
                    |t| dispatch::attention(&t[0], &t[1], &t[2], 1.0 / (d as f32).sqrt(), causal),
                )?;
            }
            let (q, k, v) = (rng.vec(2 * 70 * 320), rng.vec(2 * 77 * 320), rng.vec(2 * 77 * 320));
            compare(
                "attention_heads [2, 70/77, 5 x 64]",
                device,
                dtype,
                &[(&q, &[2, 70, 320]), (&k, &[2, 77, 320]), (&v, &[2, 77, 320])],
                |t| dispatch::attention_heads(&t[0], &t[1], &t[2], 5, 0.125, false),
            )?;
            // The text encoder's call: head-interleaved [B, 77, 16 x 64], causal.
            let (q, k, v) = (rng.vec(2 * 77 * 1024), rng.vec(2 * 77 * 1024), rng.vec(2 * 77 * 1024));
            compare(
                "attention_heads [2, 77/77, 16 x 64] causal",
                device,
                dtype,
                &[(&q, &[2, 77, 1024]), (&k, &[2, 77, 1024]), (&v, &[2, 77, 1024])],
                |t| dispatch::attention_heads(&t[0], &t[1], &t[2], 16, 0.125, true),
            )?;
            let (a, bm) = (rng.vec(3 * 17 * 40), rng.vec(3 * 40 * 23));
            compare("matmul", device, dtype, &[(&a, &[3, 17, 40]), (&bm, &[3, 40, 23])], |t| {
                dispatch::matmul(&t[0], &t[1])
            })?;
        }
        Ok(())
    }
    test_device!(half_ops_match_cpu);

    /// `upcast_attention`: scores past f16's largest finite value (65504). Query `i` equals key
    /// `i` (32 · ±1 in all 64 dims, so their dot product is 65536): stored in f16, that score
    /// would be inf and the softmax NaN (diffusers' reason for the flag). Both of our paths
    /// keep scores in f32, so the result is finite and matches the f32 reference (each output
    /// row is V's row `i`: the softmax is one-hot).
    fn attention_scores_past_f16_range(device: &Device) -> Result<()> {
        let mut rng = TestRng::fresh("upcast");
        let (h, s, d) = (2, 96, 64);
        let signs: Vec<f32> =
            (0..h * s * d).map(|_| if rng.uniform() < 0.5 { -32.0 } else { 32.0 }).collect();
        let v = rng.vec(h * s * d);
        for dtype in [DType::F16, DType::BF16] {
            for causal in [false, true] {
                compare(
                    &format!("attention with scores of 65536, causal {causal}"),
                    device,
                    dtype,
                    &[(&signs, &[1, h, s, d]), (&signs, &[1, h, s, d]), (&v, &[1, h, s, d])],
                    |t| dispatch::attention(&t[0], &t[1], &t[2], 0.125, causal),
                )?;
            }
        }
        Ok(())
    }
    test_device!(attention_scores_past_f16_range);
}
