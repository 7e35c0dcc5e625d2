//! Every op the SD2 pipeline needs, dispatched on the device of the inputs. The CPU
//! versions in `cpu/` are the reference each CUDA kernel is checked against.
//!
//! Conventions: images are `[B, C, H, W]`, token sequences `[B, S, C]`, attention heads
//! `[B, H, S, D]`; "last dim" means the contiguous one.
//!
//! Each op first validates shapes (device-independent, so every backend reports the same
//! one-line errors), then matches on where its inputs live: `cpu::*` for host tensors,
//! `cuda::ops::*` (our kernels and cuBLAS, `backend/cuda/ops.rs`) for GPU tensors.
//! Mixed-device inputs are an error, never an implicit copy.

use super::cuda::ops as gpu;
use super::cuda::pointwise::Unary;
use super::cuda::tensor_ops::Binary;
use super::profile::{self, OpKind};
use super::{cpu, Device, Storage, Tensor};
use crate::error::{Error, Result};
use crate::format::Weight;

/// Where an op's inputs live.
enum On {
    Cpu,
    Cuda,
}

/// The common device of `inputs`, or an error naming `op` when they differ.
fn placement(op: &str, inputs: &[&Tensor]) -> Result<On> {
    let cuda = inputs.iter().filter(|t| matches!(t.storage(), Storage::Cuda(_))).count();
    match cuda {
        0 => Ok(On::Cpu),
        n if n == inputs.len() => Ok(On::Cuda),
        _ => Err(Error::Invalid(format!("{op}: inputs are on different devices"))),
    }
}

fn cpu_tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape)
}

/// `y[.., N] = x[.., K] · W[N, K]^T (+ bias[N])`, for a dense, 2:4 or bitmap weight. Sparse
/// weights run from their compressed form; results match the dense-with-zeros product.
pub fn linear(x: &Tensor, w: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    let _p = profile::scope(match w {
        Weight::Dense(_) => OpKind::LinearDense,
        Weight::Sparse24(_) => OpKind::Linear24,
        Weight::Bitmap(_) => OpKind::LinearUnstructured,
    });
    let (n, k) = w.dims2()?;
    let x_shape = x.shape();
    if x_shape.last() != Some(&k) {
        return Err(Error::Shape(format!(
            "linear: input {x_shape:?} does not end in the weight's {k} input features (weight [{n}, {k}])"
        )));
    }
    if let Some(b) = bias {
        if b.shape() != [n] {
            return Err(Error::Shape(format!("linear: bias {:?} for {n} output features", b.shape())));
        }
    }
    let mut inputs = vec![x];
    if let Weight::Dense(t) = w {
        inputs.push(t);
    }
    inputs.extend(bias);
    let mut out_shape = x_shape.to_vec();
    *out_shape.last_mut().expect("rank ≥ 1 checked above") = n;
    match placement("linear", &inputs)? {
        On::Cpu => {
            // A dense f16 / bf16 weight is widened for this one product (a transient buffer
            // of one layer, freed on return); f32 weights are borrowed.
            let dense = match w {
                Weight::Dense(t) => Some(t.f32_cow()?),
                _ => None,
            };
            let bias = bias.map(|b| b.as_slice()).transpose()?;
            let m: usize = x_shape[..x_shape.len() - 1].iter().product();
            let y = cpu::gemm::linear(x.as_slice()?, m, k, w, dense.as_deref(), bias)?;
            cpu_tensor(y, &out_shape)
        }
        On::Cuda => gpu::linear(x, w, bias, &out_shape),
    }
}

/// Batched matrix product `a[.., M, K] · b[.., K, N]` (equal leading dims).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Matmul);
    let (sa, sb) = (a.shape(), b.shape());
    let r = sa.len();
    if r < 2 || sb.len() != r || sa[..r - 2] != sb[..r - 2] || sa[r - 1] != sb[r - 2] {
        return Err(Error::Shape(format!("matmul: cannot multiply {sa:?} by {sb:?}")));
    }
    let (m, k, n) = (sa[r - 2], sa[r - 1], sb[r - 1]);
    let batch: usize = sa[..r - 2].iter().product();
    let mut out_shape = sa.to_vec();
    out_shape[r - 1] = n;
    match placement("matmul", &[a, b])? {
        On::Cpu => cpu_tensor(cpu::gemm::matmul(a.as_slice()?, b.as_slice()?, batch, m, k, n), &out_shape),
        On::Cuda => gpu::matmul(a, b, (batch, m, k, n), &out_shape),
    }
}

/// 2-D convolution, `x[B, Cin, H, W]`, `w[Cout, Cin, kh, kw]`, optional `bias[Cout]`. The
/// weight may be stored in f16 / bf16: it is widened (exactly) for this call only.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Conv);
    let (batch, c_in, h, wd) = x.dims4()?;
    let (c_out, wc_in, kh, kw) = w.dims4()?;
    if wc_in != c_in {
        return Err(Error::Shape(format!(
            "conv2d: input {:?} has {c_in} channels, weight {:?}",
            x.shape(),
            w.shape()
        )));
    }
    if stride == 0 || kh == 0 || kw == 0 || h + 2 * padding < kh || wd + 2 * padding < kw {
        return Err(Error::Shape(format!(
            "conv2d: kernel {kh}x{kw} with stride {stride}, padding {padding} does not fit input {:?}",
            x.shape()
        )));
    }
    if let Some(b) = bias {
        if b.shape() != [c_out] {
            return Err(Error::Shape(format!("conv2d: bias {:?} for {c_out} output channels", b.shape())));
        }
    }
    let s = cpu::conv::ConvShape { batch, c_in, h, w: wd, c_out, kh, kw, stride, padding };
    let (ho, wo) = s.out_hw();
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    match placement("conv2d", &inputs)? {
        On::Cpu => {
            let bias = bias.map(|b| b.as_slice()).transpose()?;
            let w = w.f32_cow()?;
            cpu_tensor(cpu::conv::conv2d(x.as_slice()?, &w, bias, s), &[batch, c_out, ho, wo])
        }
        On::Cuda => gpu::conv2d(x, w, bias, s),
    }
}

/// Group norm over `[B, C, ...]` with per-channel affine, optionally fused with SiLU.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f32,
    silu: bool,
) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Norm);
    let shape = x.shape();
    if shape.len() < 2 {
        return Err(Error::Shape(format!("group_norm: input {shape:?} has no channel dim")));
    }
    let c = shape[1];
    if groups == 0 || !c.is_multiple_of(groups) {
        return Err(Error::Shape(format!("group_norm: {c} channels cannot form {groups} groups")));
    }
    if gamma.shape() != [c] || beta.shape() != [c] {
        return Err(Error::Shape(format!(
            "group_norm: gamma {:?} / beta {:?} for {c} channels",
            gamma.shape(),
            beta.shape()
        )));
    }
    let spatial: usize = shape[2..].iter().product();
    match placement("group_norm", &[x, gamma, beta])? {
        On::Cpu => cpu_tensor(
            cpu::norm::group_norm(
                x.as_slice()?,
                c,
                spatial,
                groups,
                gamma.as_slice()?,
                beta.as_slice()?,
                eps,
                silu,
            ),
            shape,
        ),
        On::Cuda => gpu::group_norm(x, (shape[0], c, spatial), groups, gamma, beta, eps, silu),
    }
}

/// Layer norm over the last dim with affine.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Norm);
    let dim = *x.shape().last().ok_or_else(|| Error::Shape("layer_norm: scalar input".into()))?;
    if gamma.shape() != [dim] || beta.shape() != [dim] {
        return Err(Error::Shape(format!(
            "layer_norm: gamma {:?} / beta {:?} for last dim {dim}",
            gamma.shape(),
            beta.shape()
        )));
    }
    match placement("layer_norm", &[x, gamma, beta])? {
        On::Cpu => cpu_tensor(
            cpu::norm::layer_norm(x.as_slice()?, dim, gamma.as_slice()?, beta.as_slice()?, eps),
            x.shape(),
        ),
        On::Cuda => gpu::layer_norm(x, dim, gamma, beta, eps),
    }
}

/// Softmax attention `softmax(q·kᵀ·scale [+ causal mask]) · v` for `q[B, H, Sq, D]`,
/// `k, v[B, H, Sk, D]`; returns `[B, H, Sq, D]`. Softmax in f32. The causal mask hides key
/// `j` from query `i` when `j > i + Sk − Sq` (the usual `j > i` when `Sq == Sk`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, causal: bool) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Attention);
    let (b, h, sq, d) = q.dims4()?;
    let (kb, kh, sk, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.shape() != k.shape() {
        return Err(Error::Shape(format!(
            "attention: q {:?}, k {:?}, v {:?} (expected k, v as [{b}, {h}, Sk, {d}])",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    let s = cpu::attention::AttnShape { batch: b, heads: h, sq, sk, d };
    match placement("attention", &[q, k, v])? {
        On::Cpu => cpu_tensor(
            cpu::attention::attention(q.as_slice()?, k.as_slice()?, v.as_slice()?, s, scale, causal),
            q.shape(),
        ),
        On::Cuda => gpu::attention(q, k, v, s, scale, causal),
    }
}

/// [`attention`] on head-interleaved sequences, as the q/k/v projections produce them:
/// `q[B, Sq, H·D]`, `k, v[B, Sk, H·D]` → `[B, Sq, H·D]`. Equal to splitting the heads
/// (`reshape` to `[B, S, H, D]`, permute to `[B, H, S, D]`), calling [`attention`] and
/// merging them back, without materialising those permutes.
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f32,
    causal: bool,
) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Attention);
    let (b, sq, hd) = q.dims3()?;
    let (kb, sk, khd) = k.dims3()?;
    if heads == 0 || hd % heads != 0 || (kb, khd) != (b, hd) || v.shape() != k.shape() {
        return Err(Error::Shape(format!(
            "attention_heads: q {:?}, k {:?}, v {:?} with {heads} heads (expected k, v as [{b}, Sk, {hd}])",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    let s = cpu::attention::AttnShape { batch: b, heads, sq, sk, d: hd / heads };
    match placement("attention_heads", &[q, k, v])? {
        On::Cpu => cpu_tensor(
            cpu::attention::attention_interleaved(
                q.as_slice()?,
                k.as_slice()?,
                v.as_slice()?,
                s,
                scale,
                causal,
            ),
            q.shape(),
        ),
        On::Cuda => gpu::attention_interleaved(q, k, v, s, scale, causal),
    }
}

/// Softmax over the last dim.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Elementwise);
    let dim = *x.shape().last().ok_or_else(|| Error::Shape("softmax_last: scalar input".into()))?;
    match placement("softmax_last", &[x])? {
        On::Cpu => cpu_tensor(cpu::attention::softmax_last(x.as_slice()?, dim), x.shape()),
        On::Cuda => gpu::softmax_last(x, dim),
    }
}

/// A unary elementwise op: same shape out; `g` is the GPU version.
fn unary(
    op: &str,
    x: &Tensor,
    f: impl Fn(&[f32]) -> Vec<f32>,
    g: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match placement(op, &[x])? {
        On::Cpu => cpu_tensor(f(x.as_slice()?), x.shape()),
        On::Cuda => g(x),
    }
}

/// Exact (erf) GELU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Elementwise);
    unary("gelu", x, cpu::elementwise::gelu, |x| gpu::unary(Unary::Gelu, x))
}

/// GEGLU: splits the last dim in halves `[h, g]` and returns `h * gelu(g)`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Elementwise);
    let shape = x.shape();
    let last = *shape.last().ok_or_else(|| Error::Shape("geglu: scalar input".into()))?;
    if last % 2 != 0 {
        return Err(Error::Shape(format!("geglu: last dim of {shape:?} is odd")));
    }
    let mut out_shape = shape.to_vec();
    *out_shape.last_mut().expect("non-empty") = last / 2;
    match placement("geglu", &[x])? {
        On::Cpu => cpu_tensor(cpu::elementwise::geglu(x.as_slice()?, last / 2), &out_shape),
        On::Cuda => gpu::geglu(x, last / 2, &out_shape),
    }
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Elementwise);
    unary("silu", x, cpu::elementwise::silu, |x| gpu::unary(Unary::Silu, x))
}

/// A binary elementwise op with `b` broadcast to `a` (or `a` to `b` when the op commutes).
fn broadcast_op(
    op: Binary,
    a: &Tensor,
    b: &Tensor,
    commutes: bool,
    f: impl Fn(f32, f32) -> f32 + Sync,
) -> Result<Tensor> {
    let (sa, sb) = (a.shape(), b.shape());
    let fits = |big: &[usize], small: &[usize]| {
        small.len() <= big.len() && small.iter().rev().zip(big.iter().rev()).all(|(&s, &g)| s == g || s == 1)
    };
    let (a, b) = if fits(sa, sb) {
        (a, b)
    } else if commutes && fits(sb, sa) {
        (b, a)
    } else {
        return Err(Error::Shape(format!("{}: cannot broadcast {sb:?} to {sa:?}", op.name())));
    };
    let shape = a.shape();
    let mut b_shape = vec![1usize; shape.len() - b.rank()];
    b_shape.extend_from_slice(b.shape());
    match placement(op.name(), &[a, b])? {
        On::Cpu => cpu_tensor(
            cpu::elementwise::broadcast_binary(a.as_slice()?, shape, b.as_slice()?, &b_shape, f),
            shape,
        ),
        On::Cuda => gpu::binary(op, a, b),
    }
}

/// Elementwise `a + b` with numpy-style broadcasting of `b` to `a`'s shape
/// (e.g. `[B, C, H, W] + [B, C, 1, 1]`, `[B, S, C] + [C]`). As addition commutes, `a` may
/// also be the one broadcast to `b`'s shape.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Elementwise);
    broadcast_op(Binary::Add, a, b, true, |x, y| x + y)
}

/// Elementwise `a * b` with the same broadcasting as [`add`].
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Elementwise);
    broadcast_op(Binary::Mul, a, b, true, |x, y| x * y)
}

/// Elementwise `a - b` with `b` broadcast to `a`'s shape.
pub fn sub(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Elementwise);
    broadcast_op(Binary::Sub, a, b, false, |x, y| x - y)
}

/// Elementwise `a / b` with `b` broadcast to `a`'s shape.
pub fn div(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Elementwise);
    broadcast_op(Binary::Div, a, b, false, |x, y| x / y)
}

/// `x * mul + add` elementwise.
pub fn affine(x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Elementwise);
    unary("affine", x, |v| cpu::elementwise::affine(v, mul, add), |x| gpu::affine(x, mul, add))
}

/// `x * factor` elementwise.
pub fn scale(x: &Tensor, factor: f32) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Elementwise);
    affine(x, factor, 0.0)
}

/// Materialised permutation of the axes (`perm[i]` = source axis of output axis `i`).
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Layout);
    let shape = x.shape();
    let mut seen = vec![false; shape.len()];
    let valid = perm.len() == shape.len()
        && perm.iter().all(|&p| p < seen.len() && !std::mem::replace(&mut seen[p], true));
    if !valid {
        return Err(Error::Shape(format!("permute: {perm:?} is not a permutation of the axes of {shape:?}")));
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    match placement("permute", &[x])? {
        On::Cpu => cpu_tensor(cpu::layout::permute(x.as_slice()?, shape, perm), &out_shape),
        On::Cuda => gpu::permute(x, perm),
    }
}

/// Swaps two axes (a [`permute`] shorthand).
pub fn transpose(x: &Tensor, dim0: usize, dim1: usize) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Layout);
    let rank = x.rank();
    if dim0 >= rank || dim1 >= rank {
        return Err(Error::Shape(format!("transpose: axes {dim0}, {dim1} of {:?}", x.shape())));
    }
    let mut perm: Vec<usize> = (0..rank).collect();
    perm.swap(dim0, dim1);
    permute(x, &perm)
}

/// Concatenation along `dim`.
pub fn cat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Layout);
    let first = xs.first().ok_or_else(|| Error::Shape("cat: no tensors".into()))?;
    let shape = first.shape();
    if dim >= shape.len() {
        return Err(Error::Shape(format!("cat: dim {dim} of {shape:?}")));
    }
    for t in xs {
        let s = t.shape();
        if s.len() != shape.len() || s.iter().zip(shape).enumerate().any(|(i, (a, b))| i != dim && a != b) {
            return Err(Error::Shape(format!("cat along {dim}: {s:?} does not match {shape:?}")));
        }
    }
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let mut out_shape = shape.to_vec();
    out_shape[dim] = xs.iter().map(|t| t.shape()[dim]).sum();
    match placement("cat", xs)? {
        On::Cpu => {
            let parts = xs.iter().map(|t| Ok((t.as_slice()?, t.shape()[dim]))).collect::<Result<Vec<_>>>()?;
            cpu_tensor(cpu::layout::cat(&parts, outer, inner), &out_shape)
        }
        On::Cuda => gpu::cat(xs, dim, outer, inner),
    }
}

/// The slice `start..start+len` along `dim`.
pub fn narrow(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Layout);
    let shape = x.shape();
    if dim >= shape.len() || start.checked_add(len).is_none_or(|end| end > shape[dim]) {
        return Err(Error::Shape(format!("narrow: {start}..{start}+{len} along dim {dim} of {shape:?}")));
    }
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    let mut out_shape = shape.to_vec();
    out_shape[dim] = len;
    match placement("narrow", &[x])? {
        On::Cpu => {
            cpu_tensor(cpu::layout::narrow(x.as_slice()?, outer, shape[dim], inner, start, len), &out_shape)
        }
        On::Cuda => gpu::narrow(x, (outer, shape[dim], inner), start, len, &out_shape),
    }
}

/// Splits `dim` into `n` equal parts (like `torch.chunk` with a divisible size).
pub fn chunk(x: &Tensor, n: usize, dim: usize) -> Result<Vec<Tensor>> {
    let _p = profile::scope(OpKind::Layout);
    let size =
        *x.shape().get(dim).ok_or_else(|| Error::Shape(format!("chunk: dim {dim} of {:?}", x.shape())))?;
    if n == 0 || size % n != 0 {
        return Err(Error::Shape(format!("chunk: dim {dim} of {:?} into {n} equal parts", x.shape())));
    }
    (0..n).map(|i| narrow(x, dim, i * size / n, size / n)).collect()
}

/// Nearest-neighbour 2x upsampling of `[B, C, H, W]`.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Layout);
    let (b, c, h, w) = x.dims4()?;
    match placement("upsample_nearest2x", &[x])? {
        On::Cpu => {
            cpu_tensor(cpu::layout::upsample_nearest2x(x.as_slice()?, b * c, h, w), &[b, c, 2 * h, 2 * w])
        }
        On::Cuda => gpu::upsample_nearest(x, (b, c, h, w), (2 * h, 2 * w)),
    }
}

/// Nearest-neighbour upsampling of `[B, C, H, W]` to `[B, C, out_h, out_w]`, as torch's
/// `F.interpolate(x, size=(out_h, out_w), mode="nearest")`: source index
/// `min(floor(dst * (in / out)), in - 1)` with the scale in f32. diffusers' UNet upsamplers
/// use it with the skip connection's size when the latents are not a multiple of
/// `2^(levels-1)` (`forward_upsample_size`); for `out = 2 * in` it equals
/// [`upsample_nearest2x`].
pub fn upsample_nearest_to(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Layout);
    let (b, c, h, w) = x.dims4()?;
    if out_h == 2 * h && out_w == 2 * w {
        return upsample_nearest2x(x);
    }
    if h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        return Err(Error::Shape(format!("upsample: {:?} to {out_h}x{out_w}", x.shape())));
    }
    match placement("upsample_nearest_to", &[x])? {
        On::Cpu => cpu_tensor(
            cpu::layout::upsample_nearest_to(x.as_slice()?, b * c, (h, w), (out_h, out_w)),
            &[b, c, out_h, out_w],
        ),
        On::Cuda => gpu::upsample_nearest(x, (b, c, h, w), (out_h, out_w)),
    }
}

/// Rows of an embedding table `table[V, C]` for `ids` → `[ids.len(), C]` in f32; the table
/// may be stored in f16 / bf16 (only the rows asked for are widened).
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Embedding);
    let (vocab, dim) = table.dims2()?;
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::Invalid(format!("embedding: id {bad} outside a table of {vocab} rows")));
    }
    match placement("embedding", &[table])? {
        On::Cpu => {
            let Storage::Cpu(data) = table.storage() else {
                return Err(Error::Invalid("embedding: the table is not on the CPU".into()));
            };
            cpu_tensor(cpu::layout::embedding(data, dim, ids), &[ids.len(), dim])
        }
        On::Cuda => gpu::embedding(table, (vocab, dim), ids),
    }
}

/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding`
/// (`flip_sin_to_cos`, `downscale_freq_shift`, max period 10000) → `[timesteps.len(), dim]`.
/// Computed on the host (it is tiny); move it with [`to_device`].
pub fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Embedding);
    if dim / 2 == 0 || (dim / 2) as f32 == freq_shift {
        return Err(Error::Invalid(format!(
            "timestep_embedding: dim {dim} with frequency shift {freq_shift} has no frequencies"
        )));
    }
    cpu_tensor(
        cpu::embed::timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift),
        &[timesteps.len(), dim],
    )
}

/// Classifier-free guidance on the batched UNet output `pred[2, ..]` (`[uncond, cond]`, as
/// diffusers batches it): `uncond + guidance · (cond − uncond)`, shape `[1, ..]`.
pub fn cfg_combine(pred: &Tensor, guidance: f32) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Elementwise);
    let shape = pred.shape();
    if shape.first() != Some(&2) {
        return Err(Error::Shape(format!("cfg_combine: prediction {shape:?} is not a batch of 2")));
    }
    let mut out_shape = shape.to_vec();
    out_shape[0] = 1;
    match placement("cfg_combine", &[pred])? {
        On::Cpu => {
            let (u, c) = pred.as_slice()?.split_at(pred.numel() / 2);
            cpu_tensor(cpu::elementwise::cfg_combine(u, c, guidance), &out_shape)
        }
        On::Cuda => gpu::cfg_combine(pred, guidance, &out_shape),
    }
}

/// Moves a tensor to `device` (a no-op when it is there already).
pub fn to_device(x: &Tensor, device: &Device) -> Result<Tensor> {
    let _p = profile::scope(OpKind::Layout);
    match (x.storage(), device) {
        (Storage::Cpu(_), Device::Cpu) => Ok(x.clone()),
        (Storage::Cuda(_), Device::Cpu) => Tensor::from_vec(x.to_vec()?, x.shape()),
        (_, Device::Cuda(d)) => super::cuda::to_cuda(x, d),
    }
}
