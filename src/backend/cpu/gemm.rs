//! Matrix products on the CPU through the `gemm` crate (packed, SIMD micro-kernels with
//! runtime CPU dispatch, rayon-parallel internally): a safe strided wrapper, `linear` for
//! dense and compressed weights, and batched `matmul`.

use super::sparse;
use crate::error::Result;
use crate::format::Weight;
use gemm::Parallelism;
use rayon::prelude::*;
use std::cell::RefCell;

/// A read-only matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
/// Strides let one buffer serve as a matrix or its transpose without copying.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> View<'a> {
    /// A row-major matrix with `cols` columns.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        View { data, row_stride: cols, col_stride: 1 }
    }
    /// The transpose of a row-major matrix with `cols` columns (so the view has `cols` rows).
    pub fn transposed(data: &'a [f32], cols: usize) -> Self {
        View { data, row_stride: 1, col_stride: cols }
    }
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows > 0 && cols > 0 {
            let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "gemm: {what} view of {rows}x{cols} exceeds its buffer");
        }
    }
}

/// The destination: `rows x cols`, row-major with `row_stride` (≥ cols) between rows.
pub struct Dst<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

/// How the product may use threads: inside a rayon task (already parallel at a coarser
/// level) it stays on the calling thread; otherwise it lets `gemm` split it across the pool
/// (`gemm` itself keeps small products single-threaded).
fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    if rayon::current_thread_index().is_some() || m * n * k < 32 * 32 * 32 {
        Parallelism::None
    } else {
        Parallelism::Rayon(0)
    }
}

/// `dst = scale * lhs[m, k] · rhs[k, n]`, or `dst += ...` when `accumulate`.
pub fn sgemm(dst: Dst<'_>, lhs: View<'_>, rhs: View<'_>, k: usize, scale: f32, accumulate: bool) {
    let (m, n) = (dst.rows, dst.cols);
    if m == 0 || n == 0 {
        return;
    }
    assert!(n <= dst.row_stride || m == 1, "gemm: destination row stride smaller than its width");
    assert!((m - 1) * dst.row_stride + n <= dst.data.len(), "gemm: destination exceeds its buffer");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst.data[r * dst.row_stride..r * dst.row_stride + n].fill(0.0);
            }
        }
        return;
    }
    lhs.check(m, k, "lhs");
    rhs.check(k, n, "rhs");
    // SAFETY: the bounds of all three views were checked above; `dst` is borrowed mutably
    // and cannot alias the shared `lhs`/`rhs` slices.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            1,
            dst.row_stride as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.col_stride as isize,
            lhs.row_stride as isize,
            rhs.data.as_ptr(),
            rhs.col_stride as isize,
            rhs.row_stride as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism(m, n, k),
        );
    }
}

thread_local! {
    /// Scratch for one decompressed sparse weight, reused across calls so that running a
    /// sparse layer does not allocate (and page-fault) tens of megabytes each time. It keeps
    /// the size of the largest layer run on this thread (52 MB for SD2's 1280x10240 GEGLU).
    static DECOMPRESSED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `y[m, n] = x[m, k] · W[n, k]^T (+ bias[n])` for a dense or compressed weight; `dense_w`
/// holds the row-major data of a `Weight::Dense` (without it, `w` is expanded first).
///
/// Compressed weights are expanded, one layer at a time, into a reused scratch buffer and
/// multiplied by the same dense GEMM. At SD2's 35–50% sparsity a sparse inner loop on the
/// CPU cannot beat a packed SIMD GEMM on the expanded tile (irregular gathers cost more than
/// the skipped multiply-adds), expanding one layer costs a memory pass that is small next to
/// the product, and the result equals the dense-with-zeros computation exactly. The model
/// keeps only the compressed form, so no whole-model decompression happens.
pub fn linear(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Weight,
    dense_w: Option<&[f32]>,
    bias: Option<&[f32]>,
) -> Result<Vec<f32>> {
    let n = w.dims2()?.0;
    let mut y = vec![0.0f32; m * n];
    if m * n == 0 {
        return Ok(y);
    }
    let run = |wdata: &[f32], y: &mut [f32]| {
        if let Some(b) = bias {
            for row in y.chunks_exact_mut(n) {
                row.copy_from_slice(b);
            }
        }
        sgemm(
            Dst { data: y, rows: m, cols: n, row_stride: n },
            View::row_major(x, k),
            View::transposed(wdata, k),
            k,
            1.0,
            bias.is_some(),
        );
    };
    if let Some(wdata) = dense_w {
        run(wdata, &mut y);
        return Ok(y);
    }
    DECOMPRESSED.with(|cell| -> Result<()> {
        // The expansion runs rayon tasks; if this thread is a rayon worker it may pick up
        // another `linear` meanwhile, which then finds the scratch taken and allocates.
        let mut own = Vec::new();
        let mut borrowed = cell.try_borrow_mut();
        let scratch = match borrowed.as_deref_mut() {
            Ok(shared) => shared,
            Err(_) => &mut own,
        };
        scratch.resize(n * k, 0.0);
        sparse::decompress_into(w, scratch)?;
        run(scratch, &mut y);
        Ok(())
    })?;
    Ok(y)
}

/// Batched `a[batch, m, k] · b[batch, k, n]`, row-major.
pub fn matmul(a: &[f32], b: &[f32], batch: usize, m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; batch * m * n];
    if m * n == 0 {
        return out;
    }
    let one = |i: usize, o: &mut [f32]| {
        sgemm(
            Dst { data: o, rows: m, cols: n, row_stride: n },
            View::row_major(&a[i * m * k..(i + 1) * m * k], k),
            View::row_major(&b[i * k * n..(i + 1) * k * n], n),
            k,
            1.0,
            false,
        )
    };
    // Many small products: parallel over the batch; few large ones: parallel inside each.
    if batch > 1 && m * n * k < 1 << 21 {
        out.par_chunks_mut(m * n).enumerate().for_each(|(i, o)| one(i, o));
    } else {
        out.chunks_mut(m * n).enumerate().for_each(|(i, o)| one(i, o));
    }
    out
}
