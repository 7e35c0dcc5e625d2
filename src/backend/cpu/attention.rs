//! Softmax attention on the CPU. Work is split into (batch·head, block of query rows)
//! tasks run in parallel; each task computes its score block `q_blk · kᵀ` with one GEMM into
//! a per-thread scratch buffer, applies the softmax row by row in f32, and multiplies by `v`
//! with a second GEMM straight into the output. Only one `[block, Sk]` score block per thread
//! exists at a time (for SD2's 4096-token self-attention: 4 MB, not a 64 MB `[4096, 4096]`).

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

/// `softmax(q·kᵀ·scale [+ causal mask]) · v` for `q[bh, sq, d]`, `k, v[bh, sk, d]`.
/// The causal mask hides key `j` from query `i` when `j > i + (sk − sq)` (aligned at the
/// end, which is the usual mask when `sq == sk`).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bh: usize,
    sq: usize,
    sk: usize,
    d: usize,
    scale: f32,
    causal: bool,
) -> Vec<f32> {
    let mut out = vec![0.0f32; bh * sq * d];
    if out.is_empty() {
        return out;
    }
    let block = QUERY_BLOCK.min(sq);
    out.par_chunks_mut(sq * d).enumerate().for_each(|(h, out_h)| {
        let (qh, kh, vh) = (
            &q[h * sq * d..(h + 1) * sq * d],
            &k[h * sk * d..(h + 1) * sk * d],
            &v[h * sk * d..(h + 1) * sk * d],
        );
        out_h.par_chunks_mut(block * d).enumerate().for_each(|(bi, out_blk)| {
            let r0 = bi * block;
            let rows = out_blk.len() / d;
            SCORES.with(|cell| {
                let mut scores = cell.borrow_mut();
                if scores.len() < rows * sk {
                    scores.resize(rows * sk, 0.0);
                }
                let scores = &mut scores[..rows * sk];
                if sk == 0 {
                    out_blk.fill(0.0);
                    return;
                }
                sgemm(
                    Dst { data: scores, rows, cols: sk, row_stride: sk },
                    View::row_major(&qh[r0 * d..(r0 + rows) * d], d),
                    View::transposed(kh, d),
                    d,
                    scale,
                    false,
                );
                for (i, row) in scores.chunks_exact_mut(sk).enumerate() {
                    if causal {
                        // Keys visible to query r0 + i.
                        let visible = (r0 + i + 1 + sk).saturating_sub(sq).min(sk);
                        row[visible..].fill(f32::NEG_INFINITY);
                    }
                    softmax_row(row);
                }
                sgemm(
                    Dst { data: out_blk, rows, cols: d, row_stride: d },
                    View::row_major(scores, sk),
                    View::row_major(vh, d),
                    sk,
                    1.0,
                    false,
                );
            });
        });
    });
    out
}
