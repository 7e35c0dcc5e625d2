//! 2-D convolution on the CPU: im2col into a bounded tile of output rows, then one GEMM
//! `out[Cout, tile] = W[Cout, Cin·kh·kw] · col[Cin·kh·kw, tile]` per tile. 1x1 stride-1
//! convolutions skip im2col (the input already is the column matrix).
//!
//! Tiling bounds the column buffer (a full 3x3 im2col of a 512x512x128 VAE activation would
//! take 1.2 GB) while keeping each GEMM wide enough to run at full speed.
//!
//! 3x3 stride-1 convolutions (nearly all of the VAE decoder and most of the UNet) take the
//! Winograd F(2x2, 3x3) path instead (Lavin & Gray, "Fast Algorithms for Convolutional Neural
//! Networks", 2016): 16 GEMMs `M[e] = U[e] · V[e]` on transformed 4x4 input tiles replace the
//! 9·Cin-deep im2col GEMM, 2.25x fewer multiply-adds, and the transformed input (16 values per
//! 2x2 outputs, 4x the input instead of im2col's 9x) is built one strip of tile rows at a time.
//! The transform matrices hold only 0, ±1 and ±1/2, so the result stays within a few f32
//! roundings of the direct sum. The transformed weights (16/9 of the layer, f32) are made per
//! call and dropped, so no weight copy stays resident.

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

/// `out[b, co, oy, ox] = bias[co] + Σ weight[co, ci, ky, kx] · x[b, ci, oy·stride + ky − pad,
/// ox·stride + kx − pad]` (zero outside the image): `x` is `[batch, c_in, h, w]`, `weight`
/// `[c_out, c_in, kh, kw]`, the result `[batch, c_out, ho, wo]`, all row-major f32.
/// Dispatches to Winograd F(2x2, 3x3) where it pays ([`use_winograd`]), otherwise im2col + GEMM.
pub fn conv2d(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Vec<f32> {
    if use_winograd(s) {
        winograd_f23(x, weight, bias, s)
    } else {
        conv2d_im2col(x, weight, bias, s)
    }
}

/// Whether `conv2d` takes the Winograd path: 3x3, stride 1, and enough channels that the
/// 16 small GEMMs (depth `c_in`) run near full speed and the transforms stay a small share
/// (measured on SD2 shapes: `benches/conv_cpu.rs`, docs/BENCHMARKS.md).
pub fn use_winograd(s: ConvShape) -> bool {
    let (ho, wo) = s.out_hw();
    s.kh == 3
        && s.kw == 3
        && s.stride == 1
        && s.c_in >= WINOGRAD_MIN_CHANNELS
        && s.c_out >= WINOGRAD_MIN_CHANNELS
        && ho.div_ceil(2) * wo.div_ceil(2) >= WINOGRAD_MIN_TILES
}

/// Below this many input / output channels im2col + GEMM is as fast (the GEMMs get too shallow).
const WINOGRAD_MIN_CHANNELS: usize = 32;
/// Below this many 2x2 output tiles per image the 16 GEMMs are too narrow to amortise reading
/// the transformed weights (measured: 1280 channels at 16x16 ran at half im2col's speed).
const WINOGRAD_MIN_TILES: usize = 256;

/// The reference path: im2col into bounded tiles of output rows, one GEMM per tile.
pub fn conv2d_im2col(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Vec<f32> {
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

/// Target size of one strip's transformed input + products, in f32 values (16 MB).
const WINOGRAD_STRIP_VALUES: usize = 1 << 22;

/// Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions with any padding. Tile `t = (ty, tx)`
/// covers outputs `(2ty..2ty+2, 2tx..2tx+2)` and reads the 4x4 input patch at
/// `(2ty − pad, 2tx − pad)`. Layouts (chosen so each parallel task owns one contiguous chunk):
/// `U[co][e][ci]` (transformed weights), `V[ci][e][t]` (transformed input of one strip),
/// `M[co][e][t]` (the 16 products), `e = 4·row + col` of the 4x4 transformed tile.
pub fn winograd_f23(x: &[f32], weight: &[f32], bias: Option<&[f32]>, s: ConvShape) -> Vec<f32> {
    assert!(s.kh == 3 && s.kw == 3 && s.stride == 1, "winograd_f23: 3x3 stride-1 only");
    let (ho, wo) = s.out_hw();
    let (cin, cout) = (s.c_in, s.c_out);
    let mut out = vec![0.0f32; s.batch * cout * ho * wo];
    if out.is_empty() {
        return out;
    }
    if cin == 0 {
        for (i, plane) in out.chunks_exact_mut(ho * wo).enumerate() {
            plane.fill(bias.map_or(0.0, |b| b[i % cout]));
        }
        return out;
    }
    let (th, tw) = (ho.div_ceil(2), wo.div_ceil(2));

    // U = G g Gᵀ per (co, ci), G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]].
    let mut u = vec![0.0f32; cout * 16 * cin];
    u.par_chunks_mut(16 * cin).enumerate().for_each(|(co, uc)| {
        for ci in 0..cin {
            let g = &weight[(co * cin + ci) * 9..(co * cin + ci) * 9 + 9];
            // Rows: a = G g (4x3).
            let mut a = [[0.0f32; 3]; 4];
            for c in 0..3 {
                let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                a[0][c] = g0;
                a[1][c] = 0.5 * (g0 + g1 + g2);
                a[2][c] = 0.5 * (g0 - g1 + g2);
                a[3][c] = g2;
            }
            // Columns: a Gᵀ (4x4).
            for (r, ar) in a.iter().enumerate() {
                let (g0, g1, g2) = (ar[0], ar[1], ar[2]);
                let row = [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2];
                for (c, v) in row.into_iter().enumerate() {
                    uc[(4 * r + c) * cin + ci] = v;
                }
            }
        }
    });

    // Tile rows per strip: V and M together within WINOGRAD_STRIP_VALUES.
    let strip_rows = (WINOGRAD_STRIP_VALUES / (16 * (cin + cout) * tw)).clamp(1, th);
    let max_t = strip_rows * tw;
    let mut v = vec![0.0f32; cin * 16 * max_t];
    let mut m = vec![0.0f32; cout * 16 * max_t];
    let pad = s.padding as isize;
    let (h, w) = (s.h as isize, s.w as isize);

    for b in 0..s.batch {
        let xb = &x[b * cin * s.h * s.w..(b + 1) * cin * s.h * s.w];
        let ob = &mut out[b * cout * ho * wo..(b + 1) * cout * ho * wo];
        let mut ty0 = 0;
        while ty0 < th {
            let ty1 = (ty0 + strip_rows).min(th);
            let nt = (ty1 - ty0) * tw;
            let v = &mut v[..cin * 16 * nt];
            // V = Bᵀ d B, Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]],
            // computed for a whole row of tiles at once so the loops vectorise: first d B
            // along each input row, then Bᵀ across the tile's four rows.
            v.par_chunks_mut(16 * nt).enumerate().for_each(|(ci, vc)| {
                let plane = &xb[ci * s.h * s.w..(ci + 1) * s.h * s.w];
                // Input rows 2·ty0 − pad .. 2·ty1 − pad + 2 of this strip, each as its four
                // horizontally transformed rows hb[row][c][tx].
                let rows = 2 * (ty1 - ty0) + 2;
                let mut hb = vec![0.0f32; rows * 4 * tw];
                let (mut even, mut odd) = (vec![0.0f32; tw + 1], vec![0.0f32; tw + 1]);
                for (r, h4) in hb.chunks_exact_mut(4 * tw).enumerate() {
                    let iy = (2 * ty0 + r) as isize - pad;
                    if iy < 0 || iy >= h {
                        continue; // zero padding rows: hb stays 0
                    }
                    let src = &plane[iy as usize * s.w..(iy as usize + 1) * s.w];
                    // even[k] = row[2k − pad], odd[k] = row[2k + 1 − pad], zero outside.
                    for k in 0..=tw {
                        let (ie, io) = ((2 * k) as isize - pad, (2 * k + 1) as isize - pad);
                        even[k] = if ie >= 0 && ie < w { src[ie as usize] } else { 0.0 };
                        odd[k] = if io >= 0 && io < w { src[io as usize] } else { 0.0 };
                    }
                    let (h0, rest) = h4.split_at_mut(tw);
                    let (h1, rest) = rest.split_at_mut(tw);
                    let (h2, h3) = rest.split_at_mut(tw);
                    for tx in 0..tw {
                        // The tile's columns: d0 = even[tx], d1 = odd[tx], d2 = even[tx+1], d3 = odd[tx+1].
                        h0[tx] = even[tx] - even[tx + 1];
                        h1[tx] = odd[tx] + even[tx + 1];
                        h2[tx] = even[tx + 1] - odd[tx];
                        h3[tx] = odd[tx] - odd[tx + 1];
                    }
                }
                for ty in ty0..ty1 {
                    let r0 = 2 * (ty - ty0); // the tile's first input row within hb
                    let ti = (ty - ty0) * tw;
                    for c in 0..4 {
                        let d = |r: usize| &hb[((r0 + r) * 4 + c) * tw..((r0 + r) * 4 + c + 1) * tw];
                        let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
                        for (e, f) in [(c, 0usize), (4 + c, 1), (8 + c, 2), (12 + c, 3)] {
                            let dst = &mut vc[e * nt + ti..e * nt + ti + tw];
                            match f {
                                0 => dst.iter_mut().enumerate().for_each(|(i, o)| *o = d0[i] - d2[i]),
                                1 => dst.iter_mut().enumerate().for_each(|(i, o)| *o = d1[i] + d2[i]),
                                2 => dst.iter_mut().enumerate().for_each(|(i, o)| *o = d2[i] - d1[i]),
                                _ => dst.iter_mut().enumerate().for_each(|(i, o)| *o = d1[i] - d3[i]),
                            }
                        }
                    }
                }
            });
            // M[e] = U[e] · V[e]: [cout, cin] · [cin, nt] for each of the 16 elements.
            let m = &mut m[..cout * 16 * nt];
            for e in 0..16 {
                sgemm(
                    Dst { data: &mut m[e * nt..], rows: cout, cols: nt, row_stride: 16 * nt },
                    View { data: &u[e * cin..], row_stride: 16 * cin, col_stride: 1 },
                    View { data: &v[e * nt..], row_stride: 16 * nt, col_stride: 1 },
                    cin,
                    1.0,
                    false,
                );
            }
            // Y = Aᵀ M A, Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]], plus bias, a row of tiles at a
            // time; outputs past (ho, wo) (odd sizes) are dropped.
            ob.par_chunks_mut(ho * wo).zip(m.par_chunks(16 * nt)).enumerate().for_each(|(co, (oc, mc))| {
                let bv = bias.map_or(0.0, |b| b[co]);
                let mut sr = vec![0.0f32; 8 * tw]; // s = Aᵀ m: sr[r][c][tx]
                let (mut y0, mut y1) = (vec![0.0f32; tw], vec![0.0f32; tw]);
                for ty in ty0..ty1 {
                    let ti = (ty - ty0) * tw;
                    let g = |e: usize| &mc[e * nt + ti..e * nt + ti + tw];
                    for c in 0..4 {
                        let (m0, m1, m2, m3) = (g(c), g(4 + c), g(8 + c), g(12 + c));
                        let (s0, s1) = sr.split_at_mut(4 * tw);
                        let (s0, s1) = (&mut s0[c * tw..(c + 1) * tw], &mut s1[c * tw..(c + 1) * tw]);
                        for i in 0..tw {
                            s0[i] = m0[i] + m1[i] + m2[i];
                            s1[i] = m1[i] - m2[i] - m3[i];
                        }
                    }
                    for r in 0..2 {
                        let oy = 2 * ty + r;
                        if oy >= ho {
                            break;
                        }
                        let q = |c: usize| &sr[(4 * r + c) * tw..(4 * r + c + 1) * tw];
                        let (q0, q1, q2, q3) = (q(0), q(1), q(2), q(3));
                        for i in 0..tw {
                            y0[i] = q0[i] + q1[i] + q2[i] + bv;
                            y1[i] = q1[i] - q2[i] - q3[i] + bv;
                        }
                        let row = &mut oc[oy * wo..(oy + 1) * wo];
                        for (i, pair) in row.chunks_mut(2).enumerate() {
                            pair[0] = y0[i];
                            if let Some(o) = pair.get_mut(1) {
                                *o = y1[i];
                            }
                        }
                    }
                }
            });
            ty0 = ty1;
        }
    }
    out
}
