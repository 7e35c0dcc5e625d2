//! Elementwise ops on the CPU: activations (exact GELU, GEGLU, SiLU; their inner loops are
//! the kernels of `simd`), `x·a + b`, and binary ops with numpy broadcasting, split across
//! threads with rayon for large tensors.

use super::{simd, PAR_CHUNK, PAR_MIN_ELEMS};
use rayon::prelude::*;

pub use super::simd::{exp as exp_fast, silu as silu_scalar};

/// `out = kernel(x)` over slices, split into parallel chunks for large inputs.
fn map_slices<F: Fn(&[f32], &mut [f32]) + Sync>(x: &[f32], kernel: F) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    if x.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK)).for_each(|(o, xs)| kernel(xs, o));
    } else {
        kernel(x, &mut out);
    }
    out
}

/// `out[i] = f(x[i])`, in parallel for large inputs.
pub fn map<F: Fn(f32) -> f32 + Sync>(x: &[f32], f: F) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    let run = |(o, xs): (&mut [f32], &[f32])| {
        for (y, &v) in o.iter_mut().zip(xs) {
            *y = f(v);
        }
    };
    if x.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(PAR_CHUNK).zip(x.par_chunks(PAR_CHUNK)).for_each(run);
    } else {
        run((&mut out, x));
    }
    out
}

/// Exact (erf) GELU.
pub fn gelu(x: &[f32]) -> Vec<f32> {
    map_slices(x, |xs, o| simd::gated_gelu(None, xs, o))
}

pub fn silu(x: &[f32]) -> Vec<f32> {
    map_slices(x, |xs, o| simd::affine_silu(xs, 1.0, 0.0, o))
}

pub fn affine(x: &[f32], mul: f32, add: f32) -> Vec<f32> {
    map(x, |v| v * mul + add)
}

/// Classifier-free guidance: `uncond + guidance * (cond - uncond)` elementwise, in the order
/// diffusers writes it.
pub fn cfg_combine(uncond: &[f32], cond: &[f32], guidance: f32) -> Vec<f32> {
    uncond.iter().zip(cond).map(|(&u, &c)| u + guidance * (c - u)).collect()
}

/// GEGLU over rows of length `2·half`: `h · gelu(g)` for the halves `[h, g]` of each row.
pub fn geglu(x: &[f32], half: usize) -> Vec<f32> {
    let rows = if half == 0 { 0 } else { x.len() / (2 * half) };
    let mut out = vec![0.0f32; rows * half];
    if rows == 0 {
        return out;
    }
    let row = |(o, xs): (&mut [f32], &[f32])| {
        let (h, g) = xs.split_at(half);
        simd::gated_gelu(Some(h), g, o);
    };
    if x.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(half).zip(x.par_chunks(2 * half)).for_each(row);
    } else {
        out.chunks_mut(half).zip(x.chunks(2 * half)).for_each(row);
    }
    out
}

/// `f(a, b)` elementwise with `b` broadcast to `a`'s shape; `b_shape` has `a_shape`'s rank
/// (left-padded with ones) and each of its dims equals `a`'s or is 1 (checked by `ops`).
///
/// The trailing dims are grouped into the longest run where `b` either matches `a` or is
/// broadcast throughout, so the inner loop is a plain slice-with-slice or slice-with-scalar
/// loop and index arithmetic happens once per run.
pub fn broadcast_binary<F: Fn(f32, f32) -> f32 + Sync>(
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    f: F,
) -> Vec<f32> {
    let mut out = vec![0.0f32; a.len()];
    if a.is_empty() {
        return out;
    }
    if a.len() == b.len() {
        // Same shape (residual connections): one flat parallel loop.
        let run = |(o, (xs, ys)): (&mut [f32], (&[f32], &[f32]))| {
            for ((y, &av), &bv) in o.iter_mut().zip(xs).zip(ys) {
                *y = f(av, bv);
            }
        };
        if a.len() >= PAR_MIN_ELEMS {
            out.par_chunks_mut(PAR_CHUNK)
                .zip(a.par_chunks(PAR_CHUNK).zip(b.par_chunks(PAR_CHUNK)))
                .for_each(run);
        } else {
            run((&mut out, (a, b)));
        }
        return out;
    }
    let rank = a_shape.len();
    // Row-major strides of b, zeroed on broadcast dims.
    let mut b_strides = vec![0usize; rank];
    let mut s = 1;
    for d in (0..rank).rev() {
        b_strides[d] = if b_shape[d] == 1 { 0 } else { s };
        s *= b_shape[d];
    }
    // The inner run: trailing dims where b matches (or, alternatively, is all broadcast).
    let matching = |d: usize| b_shape[d] == a_shape[d];
    let broadcast = |d: usize| b_shape[d] == 1;
    let last_kind_matching = (0..rank).rev().find(|&d| a_shape[d] != 1).is_none_or(matching);
    let mut split = rank;
    while split > 0 {
        let d = split - 1;
        let ok = if last_kind_matching { matching(d) } else { broadcast(d) };
        if !ok {
            break;
        }
        split -= 1;
    }
    let inner: usize = a_shape[split..].iter().product();
    let outer_shape = &a_shape[..split];
    let outer_strides = &b_strides[..split];
    let block = |(o_idx, (o, xs)): (usize, (&mut [f32], &[f32]))| {
        let mut rem = o_idx;
        let mut boff = 0;
        for d in (0..outer_shape.len()).rev() {
            boff += (rem % outer_shape[d]) * outer_strides[d];
            rem /= outer_shape[d];
        }
        if last_kind_matching {
            for ((y, &av), &bv) in o.iter_mut().zip(xs).zip(&b[boff..boff + inner]) {
                *y = f(av, bv);
            }
        } else {
            let bv = b[boff];
            for (y, &av) in o.iter_mut().zip(xs) {
                *y = f(av, bv);
            }
        }
    };
    if a.len() >= PAR_MIN_ELEMS && inner >= 256 {
        out.par_chunks_mut(inner).zip(a.par_chunks(inner)).enumerate().for_each(block);
    } else {
        out.chunks_mut(inner).zip(a.chunks(inner)).enumerate().for_each(block);
    }
    out
}
