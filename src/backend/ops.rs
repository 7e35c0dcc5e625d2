//! Every op the SD2 pipeline needs, dispatched on the device of the inputs. The CPU
//! versions in `cpu/` are the reference each CUDA kernel is checked against.
//!
//! Conventions: images are `[B, C, H, W]`, token sequences `[B, S, C]`, attention heads
//! `[B, H, S, D]`; "last dim" means the contiguous one.

use super::Tensor;
use crate::error::Result;
use crate::format::Weight;

/// `y[.., N] = x[.., K] · W[N, K]^T (+ bias[N])`, for a dense, 2:4 or bitmap weight. Sparse
/// weights run from their compressed form; results match the dense-with-zeros product.
pub fn linear(x: &Tensor, w: &Weight, bias: Option<&Tensor>) -> Result<Tensor> {
    let _ = (x, w, bias);
    todo!("backend: linear")
}

/// Batched matrix product `a[.., M, K] · b[.., K, N]` (equal leading dims).
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _ = (a, b);
    todo!("backend: matmul")
}

/// 2-D convolution, `x[B, Cin, H, W]`, `w[Cout, Cin, kh, kw]`, optional `bias[Cout]`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let _ = (x, w, bias, stride, padding);
    todo!("backend: conv2d")
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
    let _ = (x, groups, gamma, beta, eps, silu);
    todo!("backend: group_norm")
}

/// Layer norm over the last dim with affine.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    let _ = (x, gamma, beta, eps);
    todo!("backend: layer_norm")
}

/// Softmax attention `softmax(q·kᵀ·scale [+ causal mask]) · v` for `q[B, H, Sq, D]`,
/// `k, v[B, H, Sk, D]`; returns `[B, H, Sq, D]`. Softmax in f32.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32, causal: bool) -> Result<Tensor> {
    let _ = (q, k, v, scale, causal);
    todo!("backend: attention")
}

/// Softmax over the last dim.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let _ = x;
    todo!("backend: softmax_last")
}

/// Exact (erf) GELU.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let _ = x;
    todo!("backend: gelu")
}

/// GEGLU: splits the last dim in halves `[h, g]` and returns `h * gelu(g)`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    let _ = x;
    todo!("backend: geglu")
}

pub fn silu(x: &Tensor) -> Result<Tensor> {
    let _ = x;
    todo!("backend: silu")
}

/// Elementwise `a + b` with numpy-style broadcasting of `b` to `a`'s shape
/// (e.g. `[B, C, H, W] + [B, C, 1, 1]`, `[B, S, C] + [C]`).
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _ = (a, b);
    todo!("backend: add")
}

/// Elementwise `a * b` with the same broadcasting as [`add`].
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let _ = (a, b);
    todo!("backend: mul")
}

/// `x * mul + add` elementwise.
pub fn affine(x: &Tensor, mul: f32, add: f32) -> Result<Tensor> {
    let _ = (x, mul, add);
    todo!("backend: affine")
}

/// Materialised permutation of the axes (`perm[i]` = source axis of output axis `i`).
pub fn permute(x: &Tensor, perm: &[usize]) -> Result<Tensor> {
    let _ = (x, perm);
    todo!("backend: permute")
}

/// Concatenation along `dim`.
pub fn cat(xs: &[&Tensor], dim: usize) -> Result<Tensor> {
    let _ = (xs, dim);
    todo!("backend: cat")
}

/// The slice `start..start+len` along `dim`.
pub fn narrow(x: &Tensor, dim: usize, start: usize, len: usize) -> Result<Tensor> {
    let _ = (x, dim, start, len);
    todo!("backend: narrow")
}

/// Nearest-neighbour 2x upsampling of `[B, C, H, W]`.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let _ = x;
    todo!("backend: upsample_nearest2x")
}

/// Rows of an embedding table `table[V, C]` for `ids` → `[ids.len(), C]`.
pub fn embedding(table: &Tensor, ids: &[u32]) -> Result<Tensor> {
    let _ = (table, ids);
    todo!("backend: embedding")
}

/// Sinusoidal timestep embedding as diffusers' `get_timestep_embedding`
/// (`flip_sin_to_cos`, `downscale_freq_shift`, max period 10000) → `[timesteps.len(), dim]`.
pub fn timestep_embedding(
    timesteps: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f32,
) -> Result<Tensor> {
    let _ = (timesteps, dim, flip_sin_to_cos, freq_shift);
    todo!("backend: timestep_embedding")
}

/// Moves a tensor to `device` (a no-op when it is there already).
pub fn to_device(x: &Tensor, device: &super::Device) -> Result<Tensor> {
    let _ = (x, device);
    todo!("backend: to_device")
}
