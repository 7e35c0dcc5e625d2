//! Data movement on the CPU: permutation of axes, concatenation, slicing, nearest 2x
//! upsampling and embedding lookup. All outputs are materialised row-major.

use super::PAR_MIN_ELEMS;
use crate::backend::CpuStorage;
use rayon::prelude::*;

fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// The same permutation on fewer axes: size-1 axes dropped, and output axes that are
/// adjacent in the source merged. `[B, C, H, W] → [B, H, W, C]` becomes `[B, C, HW] →
/// [B, HW, C]`, a batched 2-D transpose. Returns the reduced source shape and permutation.
fn simplify(shape: &[usize], perm: &[usize]) -> (Vec<usize>, Vec<usize>) {
    // Position of each non-trivial source axis among the non-trivial ones.
    let mut rank_of = vec![usize::MAX; shape.len()];
    let mut n = 0;
    for (axis, &size) in shape.iter().enumerate() {
        if size != 1 {
            rank_of[axis] = n;
            n += 1;
        }
    }
    // Groups of output axes, each a run of consecutive source ranks: (first rank, size).
    let mut groups: Vec<(usize, usize, usize)> = Vec::new(); // (first rank, last rank, size)
    for &p in perm.iter().filter(|&&p| shape[p] != 1) {
        match groups.last_mut() {
            Some(g) if rank_of[p] == g.1 + 1 => {
                g.1 += 1;
                g.2 *= shape[p];
            }
            _ => groups.push((rank_of[p], rank_of[p], shape[p])),
        }
    }
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by_key(|&g| groups[g].0);
    let reduced_shape = order.iter().map(|&g| groups[g].2).collect();
    let mut reduced_perm = vec![0; groups.len()];
    for (src_pos, &g) in order.iter().enumerate() {
        reduced_perm[g] = src_pos;
    }
    (reduced_shape, reduced_perm)
}

/// `out` with `out.shape[i] = shape[perm[i]]` (perm validated by `ops`).
pub fn permute(x: &[f32], shape: &[usize], perm: &[usize]) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    if x.is_empty() {
        return out;
    }
    let (shape, perm) = simplify(shape, perm);
    let (shape, perm) = (&shape[..], &perm[..]);
    let rank = shape.len();
    if rank == 0 || perm.iter().enumerate().all(|(i, &p)| i == p) {
        out.copy_from_slice(x);
        return out;
    }
    let in_strides = strides_of(shape);
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let src_strides: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let (inner, inner_stride) = (out_shape[rank - 1], src_strides[rank - 1]);

    // Swapping the last two axes of row-major tiles (e.g. [B, C, HW] → [B, HW, C]) is a
    // batched 2-D transpose: do it in cache-sized blocks instead of striding through memory.
    if rank >= 2
        && perm[rank - 1] == rank - 2
        && perm[rank - 2] == rank - 1
        && perm[..rank - 2].iter().enumerate().all(|(i, &p)| i == p)
    {
        let (r, c) = (shape[rank - 2], shape[rank - 1]);
        let run = |(src, dst): (&[f32], &mut [f32])| transpose_2d(src, dst, r, c);
        if x.len() >= PAR_MIN_ELEMS {
            x.par_chunks(r * c).zip(out.par_chunks_mut(r * c)).for_each(run);
        } else {
            x.chunks(r * c).zip(out.chunks_mut(r * c)).for_each(run);
        }
        return out;
    }

    let outer_shape = &out_shape[..rank - 1];
    let outer_strides = &src_strides[..rank - 1];
    let row = |(o_idx, o): (usize, &mut [f32])| {
        let mut rem = o_idx;
        let mut base = 0;
        for d in (0..outer_shape.len()).rev() {
            base += (rem % outer_shape[d]) * outer_strides[d];
            rem /= outer_shape[d];
        }
        if inner_stride == 1 {
            o.copy_from_slice(&x[base..base + inner]);
        } else {
            for (i, y) in o.iter_mut().enumerate() {
                *y = x[base + i * inner_stride];
            }
        }
    };
    if x.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(inner).enumerate().for_each(row);
    } else {
        out.chunks_mut(inner).enumerate().for_each(row);
    }
    out
}

/// `dst[c, r] = src[r, c]` for a row-major `src[rows, cols]`, in 32x32 blocks.
fn transpose_2d(src: &[f32], dst: &mut [f32], rows: usize, cols: usize) {
    const B: usize = 32;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            for r in r0..(r0 + B).min(rows) {
                for c in c0..(c0 + B).min(cols) {
                    dst[c * rows + r] = src[r * cols + c];
                }
            }
        }
    }
}

/// Concatenation along `dim` of tensors whose shapes differ only at `dim`: each input is
/// `outer` blocks of `len_i · inner` contiguous values.
pub fn cat(xs: &[(&[f32], usize)], outer: usize, inner: usize) -> Vec<f32> {
    let total_len: usize = xs.iter().map(|&(_, len)| len).sum();
    let mut out = Vec::with_capacity(outer * total_len * inner);
    for o in 0..outer {
        for &(data, len) in xs {
            out.extend_from_slice(&data[o * len * inner..(o + 1) * len * inner]);
        }
    }
    out
}

/// The slice `start..start + len` of an axis of size `size`, with `outer` blocks before it
/// and `inner` contiguous values after it.
pub fn narrow(x: &[f32], outer: usize, size: usize, inner: usize, start: usize, len: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(outer * len * inner);
    for o in 0..outer {
        let base = (o * size + start) * inner;
        out.extend_from_slice(&x[base..base + len * inner]);
    }
    out
}

/// Nearest 2x upsampling of `planes` images of `h x w`.
pub fn upsample_nearest2x(x: &[f32], planes: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; planes * 4 * h * w];
    if out.is_empty() {
        return out;
    }
    let plane = |(src, dst): (&[f32], &mut [f32])| {
        for (y, row) in src.chunks_exact(w).enumerate() {
            let (top, bottom) = dst[2 * y * 2 * w..(2 * y + 2) * 2 * w].split_at_mut(2 * w);
            for (pair, &v) in top.chunks_exact_mut(2).zip(row) {
                pair[0] = v;
                pair[1] = v;
            }
            bottom.copy_from_slice(top);
        }
    };
    if out.len() >= PAR_MIN_ELEMS {
        x.par_chunks(h * w).zip(out.par_chunks_mut(4 * h * w)).for_each(plane);
    } else {
        x.chunks(h * w).zip(out.chunks_mut(4 * h * w)).for_each(plane);
    }
    out
}

/// torch's nearest source index for output index `dst` (`nearest_idx` in
/// `UpSample.h`: float scale `in / out`, floor, clamped to the last input).
fn nearest_source(dst: usize, input: usize, output: usize) -> usize {
    if input == output {
        return dst;
    }
    let scale = input as f32 / output as f32;
    ((dst as f32 * scale).floor() as usize).min(input - 1)
}

/// Nearest-neighbour resize of `planes` planes of `in_hw` to `out_hw` (as torch's
/// `interpolate(size=..., mode="nearest")`).
pub fn upsample_nearest_to(
    x: &[f32],
    planes: usize,
    in_hw: (usize, usize),
    out_hw: (usize, usize),
) -> Vec<f32> {
    let ((h, w), (oh, ow)) = (in_hw, out_hw);
    let cols: Vec<usize> = (0..ow).map(|x| nearest_source(x, w, ow)).collect();
    let mut out = vec![0.0f32; planes * oh * ow];
    let plane = |(src, dst): (&[f32], &mut [f32])| {
        for (y, row) in dst.chunks_exact_mut(ow).enumerate() {
            let sy = nearest_source(y, h, oh);
            let srow = &src[sy * w..(sy + 1) * w];
            for (o, &sx) in row.iter_mut().zip(&cols) {
                *o = srow[sx];
            }
        }
    };
    if out.len() >= PAR_MIN_ELEMS {
        x.par_chunks(h * w).zip(out.par_chunks_mut(oh * ow)).for_each(plane);
    } else {
        x.chunks(h * w).zip(out.chunks_mut(oh * ow)).for_each(plane);
    }
    out
}

/// Rows `ids` of `table[_, dim]` widened to f32 (ids validated by `ops`).
pub fn embedding(table: &CpuStorage, dim: usize, ids: &[u32]) -> Vec<f32> {
    // Only the rows asked for are widened: the table (49408 x 1024 for SD2's CLIP) stays
    // in its stored dtype.
    let mut out = vec![0f32; ids.len() * dim];
    for (row, &id) in out.chunks_exact_mut(dim.max(1)).zip(ids) {
        table.widen_range_into(id as usize * dim, row);
    }
    out
}
