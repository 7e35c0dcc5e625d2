//! 2-D convolution on the CPU: im2col into a bounded tile of output rows, then one GEMM
//! `out[Cout, tile] = W[Cout, Cin·kh·kw] · col[Cin·kh·kw, tile]` per tile. 1x1 stride-1
//! convolutions skip im2col (the input already is the column matrix).
//!
//! Tiling bounds the column buffer (a full 3x3 im2col of a 512x512x128 VAE activation would
//! take 1.2 GB) while keeping each GEMM wide enough to run at full speed.

use super::gemm::{sgemm, Dst, View};
use rayon::prelude::*;

/// Geometry of one convolution (validated by `ops::conv2d`).
#[derive(Debug, Clone, Copy)]
pub struct ConvShape {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    pub fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.padding - self.kh) / self.stride + 1,
            (self.w + 2 * self.padding - self.kw) / self.stride + 1,
        )
    }
}

/// Target size of one im2col tile in f32 values (8 MB: fits the shared L3 of this class of
/// machine and still gives GEMM tiles hundreds of columns wide).
const COL_TILE_VALUES: usize = 1 << 21;

pub fn conv2d(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Vec<f32> {
    let (ho, wo) = s.out_hw();
    let (hw_in, hw_out) = (s.h * s.w, ho * wo);
    let kdim = s.c_in * s.kh * s.kw;
    let mut out = vec![0.0f32; s.batch * s.c_out * hw_out];
    if out.is_empty() {
        return out;
    }
    let pointwise = s.kh == 1 && s.kw == 1 && s.stride == 1 && s.padding == 0;
    let rows_per_tile = (COL_TILE_VALUES / (kdim * wo).max(1)).clamp(1, ho);
    let mut col = if pointwise { Vec::new() } else { vec![0.0f32; kdim * rows_per_tile * wo] };

    for b in 0..s.batch {
        let xb = &x[b * s.c_in * hw_in..(b + 1) * s.c_in * hw_in];
        let ob = &mut out[b * s.c_out * hw_out..(b + 1) * s.c_out * hw_out];
        if let Some(bias) = bias {
            for (row, &v) in ob.chunks_exact_mut(hw_out).zip(bias) {
                row.fill(v);
            }
        }
        if pointwise {
            sgemm(
                Dst { data: ob, rows: s.c_out, cols: hw_out, row_stride: hw_out },
                View::row_major(weight, kdim),
                View::row_major(xb, hw_in),
                kdim,
                1.0,
                bias.is_some(),
            );
            continue;
        }
        let mut y0 = 0;
        while y0 < ho {
            let y1 = (y0 + rows_per_tile).min(ho);
            let n = (y1 - y0) * wo;
            let col = &mut col[..kdim * n];
            im2col(xb, col, s, y0, y1, wo);
            sgemm(
                Dst { data: &mut ob[y0 * wo..], rows: s.c_out, cols: n, row_stride: hw_out },
                View::row_major(weight, kdim),
                View::row_major(col, n),
                kdim,
                1.0,
                bias.is_some(),
            );
            y0 = y1;
        }
    }
    out
}

/// The whole column matrix `[Cin·kh·kw, Ho·Wo]` of one image `x[Cin, H, W]`: the CPU twin of
/// the CUDA im2col kernel (`cuda/tensor.cu`), in the same layout the CPU convolution tiles.
pub fn im2col_image(x: &[f32], s: ConvShape) -> Vec<f32> {
    let (ho, wo) = s.out_hw();
    let mut col = vec![0.0f32; s.c_in * s.kh * s.kw * ho * wo];
    if !col.is_empty() {
        im2col(x, &mut col, s, 0, ho, wo);
    }
    col
}

/// Fills `col[(ci·kh + ky)·kw + kx, (oy − y0)·wo + ox] = x[ci, oy·stride + ky − pad,
/// ox·stride + kx − pad]` (zero outside the image) for output rows `y0..y1`.
fn im2col(x: &[f32], col: &mut [f32], s: ConvShape, y0: usize, y1: usize, wo: usize) {
    let n = (y1 - y0) * wo;
    let pad = s.padding as isize;
    col.par_chunks_mut(n).enumerate().for_each(|(r, dst)| {
        let ci = r / (s.kh * s.kw);
        let ky = (r / s.kw) % s.kh;
        let kx = r % s.kw;
        let plane = &x[ci * s.h * s.w..(ci + 1) * s.h * s.w];
        // Output columns whose input column ox·stride + kx − pad lies inside the image.
        let lo = (pad - kx as isize).max(0) as usize;
        let first_ox = lo.div_ceil(s.stride).min(wo);
        let hi = (s.w as isize - 1 + pad - kx as isize).div_euclid(s.stride as isize) + 1;
        let last_ox = (hi.clamp(0, wo as isize) as usize).max(first_ox);
        for (oy, d) in (y0..y1).zip(dst.chunks_exact_mut(wo)) {
            let iy = (oy * s.stride + ky) as isize - pad;
            if iy < 0 || iy >= s.h as isize {
                d.fill(0.0);
                continue;
            }
            let src = &plane[iy as usize * s.w..(iy as usize + 1) * s.w];
            d[..first_ox].fill(0.0);
            d[last_ox..].fill(0.0);
            if first_ox == last_ox {
                continue;
            }
            let ix0 = first_ox * s.stride + kx - s.padding;
            if s.stride == 1 {
                d[first_ox..last_ox].copy_from_slice(&src[ix0..ix0 + last_ox - first_ox]);
            } else {
                for (i, v) in d[first_ox..last_ox].iter_mut().enumerate() {
                    *v = src[ix0 + i * s.stride];
                }
            }
        }
    });
}
