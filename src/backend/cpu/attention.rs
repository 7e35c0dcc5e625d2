//! Softmax attention on the CPU. Work is split into (batch·head, block of query rows)
//! tasks run in parallel; each task computes its score block `q_blk · kᵀ` with one GEMM into
//! a per-thread scratch buffer, applies the softmax row by row in f32, and multiplies by `v`
//! with a second GEMM straight into the output. Only one `[block, Sk]` score block per thread
//! exists at a time (for SD2's 4096-token self-attention: 2 MB, not a 64 MB `[4096, 4096]`).
//!
//! `attention` takes heads as `[B, H, S, D]`; `attention_interleaved` takes the `[B, S, H·D]`
//! layout of the q/k/v projections directly, through strided GEMM views.

use super::gemm::{sgemm, Dst, View};
use rayon::prelude::*;
use std::cell::RefCell;

/// Query rows per task: enough for an efficient GEMM, small enough that the score block
/// stays in L2/L3 and that there are many tasks to balance across threads.
const QUERY_BLOCK: usize = 128;

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

pub use super::simd::softmax_row;

/// Softmax over rows of length `dim`.
pub fn softmax_last(x: &[f32], dim: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    if dim == 0 {
        return out;
    }
    if x.len() >= super::PAR_MIN_ELEMS {
        out.par_chunks_mut(dim).for_each(softmax_row);
    } else {
        out.chunks_mut(dim).for_each(softmax_row);
    }
    out
}

/// Softmax over rows of `cols` values of `x * scale`. With `causal_q_len = Some(q)`, row `r` is
/// query `r % q` of a `[.., q, cols]` score block and column `j` gets probability 0 when
/// `j > r % q + cols - q` (the causal rule of [`attention`]); a row with no visible column is
/// all zeros. The CPU twin of the CUDA softmax kernel (`cuda/tensor.cu`).
pub fn softmax_scaled(x: &[f32], cols: usize, scale: f32, causal_q_len: Option<usize>) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    if cols == 0 {
        return out;
    }
    for (r, (src, dst)) in x.chunks(cols).zip(out.chunks_mut(cols)).enumerate() {
        let end = match causal_q_len {
            Some(q) if q > 0 => ((r % q + cols + 1) as isize - q as isize).clamp(0, cols as isize) as usize,
            _ => cols,
        };
        if end == 0 {
            continue;
        }
        let m = src[..end].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
        let mut sum = 0.0f32;
        for (d, &v) in dst[..end].iter_mut().zip(&src[..end]) {
            *d = (v * scale - m).exp();
            sum += *d;
        }
        dst[..end].iter_mut().for_each(|d| *d /= sum);
    }
    out
}

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub sq: usize,
    pub sk: usize,
    pub d: usize,
}

/// `softmax(q·kᵀ·scale [+ causal mask]) · v` for `q[B, H, Sq, D]`, `k, v[B, H, Sk, D]`.
/// The causal mask hides key `j` from query `i` when `j > i + (sk − sq)` (aligned at the
/// end, which is the usual mask when `sq == sk`).
pub fn attention(q: &[f32], k: &[f32], v: &[f32], s: AttnShape, scale: f32, causal: bool) -> Vec<f32> {
    let (sq, sk, d) = (s.sq, s.sk, s.d);
    let mut out = vec![0.0f32; s.batch * s.heads * sq * d];
    if out.is_empty() {
        return out;
    }
    let block = QUERY_BLOCK.min(sq);
    out.par_chunks_mut(sq * d).enumerate().for_each(|(h, out_h)| {
        let kh = View::row_major(&k[h * sk * d..(h + 1) * sk * d], d);
        let vh = View::row_major(&v[h * sk * d..(h + 1) * sk * d], d);
        out_h.par_chunks_mut(block * d).enumerate().for_each(|(bi, out_blk)| {
            let r0 = bi * block;
            let rows = out_blk.len() / d;
            let qb = View::row_major(&q[(h * sq + r0) * d..(h * sq + r0 + rows) * d], d);
            let dst = Dst { data: out_blk, rows, cols: d, row_stride: d };
            head_block(qb, kh, vh, dst, s, r0, scale, causal);
        });
    });
    out
}

/// The same attention on head-interleaved sequences, `q[B, Sq, H·D]`, `k, v[B, Sk, H·D]` →
/// `[B, Sq, H·D]`: the layout the projections produce, read and written through strided
/// views so that no head split/merge permutes are materialised.
pub fn attention_interleaved(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    let (sq, sk, d, hd) = (s.sq, s.sk, s.d, s.heads * s.d);
    let mut out = vec![0.0f32; s.batch * sq * hd];
    if out.is_empty() {
        return out;
    }
    let block = QUERY_BLOCK.min(sq);
    // Tasks own a block of query rows of one batch element, for all heads: a contiguous
    // `[rows, H·D]` output region.
    out.par_chunks_mut(sq * hd).enumerate().for_each(|(b, out_b)| {
        out_b.par_chunks_mut(block * hd).enumerate().for_each(|(bi, out_blk)| {
            let r0 = bi * block;
            let rows = out_blk.len() / hd;
            for h in 0..s.heads {
                // Head h of rows first_row.. of batch element b in a [B, n, H·D] buffer.
                fn strided(
                    data: &[f32],
                    b: usize,
                    n: usize,
                    first_row: usize,
                    hd: usize,
                    col: usize,
                ) -> View<'_> {
                    View { data: &data[(b * n + first_row) * hd + col..], row_stride: hd, col_stride: 1 }
                }
                let qb = strided(q, b, sq, r0, hd, h * d);
                let (kh, vh) = (strided(k, b, sk, 0, hd, h * d), strided(v, b, sk, 0, hd, h * d));
                let dst = Dst { data: &mut out_blk[h * d..], rows, cols: d, row_stride: hd };
                head_block(qb, kh, vh, dst, s, r0, scale, causal);
            }
        });
    });
    out
}

/// One head, query rows `r0..r0 + dst.rows`: scores into the thread's scratch block,
/// softmax per row, then `P · v` into `dst`.
#[allow(clippy::too_many_arguments)]
fn head_block(q: View, k: View, v: View, dst: Dst, s: AttnShape, r0: usize, scale: f32, causal: bool) {
    let (rows, sk, d) = (dst.rows, s.sk, s.d);
    if sk == 0 {
        for r in 0..rows {
            dst.data[r * dst.row_stride..r * dst.row_stride + d].fill(0.0);
        }
        return;
    }
    SCORES.with(|cell| {
        let mut scores = cell.borrow_mut();
        if scores.len() < rows * sk {
            scores.resize(rows * sk, 0.0);
        }
        let scores = &mut scores[..rows * sk];
        // kᵀ as a view: element (c, j) = k[j, c].
        let kt = View { data: k.data, row_stride: k.col_stride, col_stride: k.row_stride };
        sgemm(Dst { data: scores, rows, cols: sk, row_stride: sk }, q, kt, d, scale, false);
        for (i, row) in scores.chunks_exact_mut(sk).enumerate() {
            if causal {
                // Keys visible to query r0 + i.
                let visible = (r0 + i + 1 + sk).saturating_sub(s.sq).min(sk);
                row[visible..].fill(f32::NEG_INFINITY);
            }
            softmax_row(row);
        }
        sgemm(dst, View::row_major(scores, sk), v, sk, 1.0, false);
    });
}
