//! Kernel index math on an emulator of the documented PTX semantics: the CPU check that every
//! tensor-core kernel addresses its operands, fragments and metadata the way the PTX ISA says.
//!
//! Each test transcribes a kernel of cuda/*.cu *in program order* (prefetch before compute, so a
//! wrong stage index reads the wrong data), takes every address and fragment formula from the
//! kernels' own header `cuda/include/sdsparse_index.h` (compiled for the host by
//! `tests/kernel_index`), runs the instructions on `ptx_emu` (written from the PTX ISA alone) and
//! compares with a dense f64 reference built from the canonical weights, not from the device
//! layout: for 2:4 this is the real layout check (the CPU round trip in tests/sparse24_gemm.rs
//! reads through the same `meta_position` the packer writes with, review P1).
//!
//! Bounds: norm-wise relative error <= 2e-3 and every element within
//! 1e-2 (|ref| + rms(ref)) (f16 output rounding gives ~2.5e-4), no undefined behaviour recorded
//! (reads of never-written shared memory, invalid metadata, misaligned addresses) and every
//! output of the emulated tiles written. `mutants_are_caught` shows each check failing on a
//! planted layout bug. Big SD2 shapes emulate a few block tiles, not the whole GEMM.
//!
//! Not covered (GPU only, see docs/CUDA.md): barriers, mbarrier phases, async-proxy fences.

// The transcriptions keep the kernels' index loops (`for j in 0..8`), so that they read like the
// .cu code they mirror.
#![allow(clippy::needless_range_loop)]

mod ptx_emu;

use half::f16;
use ptx_emu::*;
use sdsparse::backend::cuda::sparse24::{
    canonical_to_dense, geglu_interleave, meta_position, Sparse24Packed,
};
use sdsparse::backend::cuda::unstructured::{bitmap_from_dense, erf, TiledBitmapWeight};
use sdsparse::backend::test_util::{random_sparse24, TestRng};
use sdsparse::format::DType;
use sdsparse_kernel_index as ix;

/// A planted layout bug, applied at the call site of one header formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutant {
    None,
    /// Metadata register taken from the other lane of the pair (T0 <-> T1).
    MetaLane,
    /// Sparsity selector flipped (0 <-> 1).
    Selector,
    /// wgmma descriptor with LBO and SBO swapped.
    LboSbo,
    /// V read by ldmatrix without .trans.
    VNoTrans,
    /// The ragged mask lets one padding key through (key > seq_kv instead of >=): the bug class
    /// a norm-only 1e-2 bound missed (kernel review T1).
    MaskOffByOne,
    /// The causal mask lets each row see one key past its diagonal.
    CausalDiagonal,
    /// Each query block skips one more K/V tile than `attn_n_tiles` says (a skip bound that
    /// drops a tile some row still sees).
    CausalSkipTooMany,
}

fn i(v: usize) -> i32 {
    v as i32
}
fn u(v: i32) -> usize {
    usize::try_from(v).expect("non-negative index")
}
fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + erf(v * std::f64::consts::FRAC_1_SQRT_2))
}
fn rnd16(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// Result of an emulated kernel: outputs (None = never written) and the recorded UB.
struct Run {
    y: Vec<Option<f32>>,
    ub: Vec<String>,
}

/// Compares the outputs at `cells` (flat indices) with `reference(index)`.
fn check(name: &str, run: &Run, cells: &[usize], reference: impl Fn(usize) -> f64) -> Result<f64, String> {
    if let Some(first) = run.ub.first() {
        return Err(format!("{name}: undefined behaviour ({} events), first: {first}", run.ub.len()));
    }
    let refs: Vec<f64> = cells.iter().map(|&c| reference(c)).collect();
    let rms = (refs.iter().map(|r| r * r).sum::<f64>() / refs.len().max(1) as f64).sqrt();
    let (mut num, mut den) = (0f64, 0f64);
    for (&c, &r) in cells.iter().zip(&refs) {
        let Some(y) = run.y[c] else { return Err(format!("{name}: output {c} never written")) };
        let y = y as f64;
        if y.is_nan() || (y - r).abs() > 1e-2 * (r.abs() + rms) {
            return Err(format!("{name}: output {c} = {y}, reference {r} (rms {rms:.3e})"));
        }
        num += (y - r).powi(2);
        den += r * r;
    }
    let rel = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    if rel > 2e-3 {
        return Err(format!("{name}: relative error {rel:.2e} > 2e-3"));
    }
    println!("{name}: {} outputs, relative error {rel:.2e}", cells.len());
    Ok(rel)
}

// =============================================================================================
// 2:4 sparse GEMM (cuda/sparse24_gemm.cu)
// =============================================================================================

struct Sp24 {
    m: usize,
    n: usize,
    k: usize,
    n_pad: usize,
    k_pad: usize,
    values: Vec<u16>,
    meta: Vec<u32>,
    x: Vec<u16>,
    bias: Option<Vec<f32>>,
    residual: Option<Vec<u16>>,
    gelu: bool,
    geglu: bool,
    /// Output columns (n, or n / 2 for GEGLU) = ldy = ldr.
    ldy: usize,
    /// Dense canonical weight [n][k] (before any GEGLU interleave) for the reference.
    dense: Vec<f32>,
    dense_bias: Option<Vec<f32>>,
}

impl Sp24 {
    fn new(m: usize, n: usize, k: usize, seed: u64, epilogue: bool, geglu: bool) -> Sp24 {
        let mut rng = TestRng::new(seed);
        let w = random_sparse24(&mut rng, n, k, DType::F16);
        let dense = canonical_to_dense(&w);
        let dense_bias = epilogue.then(|| rng.vec(n));
        let (dev_w, bias) = if geglu {
            let (w2, b2) = geglu_interleave(&w, dense_bias.as_deref()).expect("interleave");
            (w2, b2)
        } else {
            (w, dense_bias.clone())
        };
        let packed = Sparse24Packed::pack(&dev_w).expect("pack");
        let ldy = if geglu { n / 2 } else { n };
        let x = rng.vec(m * k).iter().map(|&v| f2h(v)).collect();
        let residual = epilogue.then(|| rng.vec(m * ldy).iter().map(|&v| f2h(v)).collect());
        Sp24 {
            m,
            n,
            k,
            n_pad: packed.n_pad,
            k_pad: packed.k_pad,
            values: packed.values.iter().map(|v| v.to_bits()).collect(),
            meta: packed.meta,
            x,
            bias,
            residual,
            gelu: epilogue && !geglu,
            geglu,
            ldy,
            dense,
            dense_bias,
        }
    }

    /// Dense reference of output (t, col) in f64.
    fn reference(&self, t: usize, col: usize) -> f64 {
        let dot = |j: usize| -> f64 {
            let xr = &self.x[t * self.k..(t + 1) * self.k];
            let w = &self.dense[j * self.k..(j + 1) * self.k];
            let s: f64 = xr.iter().zip(w).map(|(&a, &b)| h2f(a) as f64 * b as f64).sum();
            s + self.dense_bias.as_ref().map_or(0.0, |b| b[j] as f64)
        };
        let mut v = if self.geglu {
            dot(col) * gelu(dot(self.n / 2 + col))
        } else if self.gelu {
            gelu(dot(col))
        } else {
            dot(col)
        };
        if let Some(r) = &self.residual {
            v += h2f(r[t * self.ldy + col]) as f64;
        }
        v
    }

    fn epilogue_one(&self, y: &mut [Option<f32>], t: usize, n: usize, acc: f32) {
        let mut v = acc + self.bias.as_ref().map_or(0.0, |b| b[n]);
        if self.gelu {
            v = gelu(v as f64) as f32;
        }
        if let Some(r) = &self.residual {
            v += h2f(r[t * self.ldy + n]);
        }
        y[t * self.ldy + n] = Some(rnd16(v));
    }

    /// epilogue_tile<BN, BT>: cs[token][feature] (None = never staged) to Y.
    #[allow(clippy::too_many_arguments)]
    fn epilogue_tile(
        &self,
        y: &mut [Option<f32>],
        ub: &mut Vec<String>,
        cs: &[Option<f32>],
        bn: usize,
        bt: usize,
        n0: usize,
        t0: usize,
    ) {
        let cs_ld = u(ix::sds_sp24_cs_ld());
        let mut get = |idx: usize| {
            cs[idx].unwrap_or_else(|| {
                ub.push(format!("epilogue reads unstaged cs[{idx}]"));
                0.0
            })
        };
        if self.geglu {
            let n_out = self.n / 2;
            for item in 0..bt * (bn / 2) {
                let (tr, o) = (item / (bn / 2), item % (bn / 2));
                let (grp, j) = (o / 64, o % 64);
                let vr = grp * 128 + j;
                let gr = vr + 64;
                let (t, no) = (t0 + tr, n0 / 2 + o);
                if t >= self.m || no >= n_out {
                    continue;
                }
                let b = |r: usize| self.bias.as_ref().map_or(0.0, |b| b[n0 + r]);
                let a = get(tr * cs_ld + vr) + b(vr);
                let gate = get(tr * cs_ld + gr) + b(gr);
                let mut v = a * gelu(gate as f64) as f32;
                if let Some(r) = &self.residual {
                    v += h2f(r[t * self.ldy + no]);
                }
                y[t * self.ldy + no] = Some(rnd16(v));
            }
            return;
        }
        for item in 0..bt * (bn / 8) {
            let (tr, nc) = (item / (bn / 8), (item % (bn / 8)) * 8);
            let (t, n) = (t0 + tr, n0 + nc);
            if t >= self.m || n >= self.n {
                continue;
            }
            for j in 0..8 {
                if n + j < self.n {
                    let v = get(tr * cs_ld + nc + j);
                    self.epilogue_one(y, t, n + j, v);
                }
            }
        }
    }

    fn x_pair(&self, tok: usize, k: usize) -> (f32, f32) {
        (h2f(self.x[tok * self.k + k]), h2f(self.x[tok * self.k + k + 1]))
    }
}

/// The block tiles to emulate of a grid: all of them, or the first and the last.
fn blocks(gx: usize, gy: usize, all: bool) -> Vec<(usize, usize)> {
    if all || gx * gy <= 2 {
        (0..gx).flat_map(|x| (0..gy).map(move |y| (x, y))).collect()
    } else {
        vec![(0, 0), (gx - 1, gy - 1)]
    }
}

fn meta_lane(lane: usize, mutant: Mutant) -> usize {
    if mutant == Mutant::MetaLane {
        lane ^ 1
    } else {
        lane
    }
}
fn selector(step: usize, mutant: Mutant) -> u32 {
    (if mutant == Mutant::Selector { step ^ 1 } else { step }) as u32
}

/// sdsparse_sp24_v1_direct: grid (n_pad / 64, ceil(m / 8)), 4 warps of 16 rows x 8 tokens.
fn sp24_v1(p: &Sp24, all: bool, mutant: Mutant) -> (Run, Vec<usize>) {
    let mut emu = Emu::new(16);
    let mut y = vec![None; p.m * p.ldy];
    let mut cells = Vec::new();
    let kc_row = p.k_pad / 2;
    let kblocks = p.k_pad / 64;
    for (bx, by) in blocks(p.n_pad / 64, p.m.div_ceil(8), all) {
        for warp in 0..4 {
            let (row0, t0) = (bx * 64 + warp * 16, by * 8);
            let mut acc = zero_acc();
            for kb in 0..kblocks {
                let meta: [u32; 32] = std::array::from_fn(|lane| {
                    p.meta[ix::sds_sp24_meta_word(i(row0 / 16), i(kblocks), i(kb), i(meta_lane(lane, mutant)))
                        as usize]
                });
                for step in 0..2 {
                    let (kc, kl) = (kb * 32 + step * 16, kb * 64 + step * 32);
                    let a: Frag = std::array::from_fn(|lane| {
                        std::array::from_fn(|r| {
                            let row = row0 + u(ix::sds_frag_a_row(i(lane), i(r)));
                            let c = kc + u(ix::sds_frag_a_col(i(lane), i(r)));
                            (h2f(p.values[row * kc_row + c]), h2f(p.values[row * kc_row + c + 1]))
                        })
                    });
                    let b: Frag = std::array::from_fn(|lane| {
                        let tok = t0 + lane / 4;
                        std::array::from_fn(|r| {
                            let k = kl + u(ix::sds_frag_b_k32(i(lane), i(r)));
                            if tok < p.m && k < p.k {
                                p.x_pair(tok, k)
                            } else {
                                (0.0, 0.0)
                            }
                        })
                    });
                    mma_sp_16832(&mut emu, &a, &b, &mut acc, &meta, selector(step, mutant), "v1");
                }
            }
            for (lane, accl) in acc.iter().enumerate() {
                for (q, &v) in accl.iter().enumerate() {
                    let n = row0 + u(ix::sds_frag_c_row(i(lane), i(q)));
                    let t = t0 + u(ix::sds_frag_c_col(i(lane), i(q)));
                    if n < p.n && t < p.m {
                        p.epilogue_one(&mut y, t, n, v);
                        cells.push(t * p.ldy + n);
                    }
                }
            }
        }
    }
    (Run { y, ub: emu.ub }, cells)
}

/// The output cells of a 128-row block tile (n0, t0) of bt tokens.
fn tile_cells(p: &Sp24, n0: usize, t0: usize, bt: usize) -> Vec<usize> {
    let mut cells = Vec::new();
    for t in t0..(t0 + bt).min(p.m) {
        if p.geglu {
            for c in n0 / 2..(n0 / 2 + 64).min(p.ldy) {
                cells.push(t * p.ldy + c);
            }
        } else {
            for n in n0..(n0 + 128).min(p.n) {
                cells.push(t * p.ldy + n);
            }
        }
    }
    cells
}

/// sdsparse_sp24_v2_pipe_bt{32,64,128}: 3-stage cp.async pipeline, swizzled smem, ldmatrix.
fn sp24_v2(p: &Sp24, bt: usize, all: bool, mutant: Mutant) -> (Run, Vec<usize>) {
    const BN: usize = 128;
    const STAGES: usize = 3;
    let (w_bytes, x_bytes, m_bytes) = (BN * 32 * 2, bt * 64 * 2, 8 * 32 * 4);
    let stage = w_bytes + x_bytes + m_bytes;
    let cs_ld = u(ix::sds_sp24_cs_ld());
    let total = (STAGES * stage).max(bt * cs_ld * 4);
    let (warp_t_tokens, nj) = (bt / 2, bt / 16);
    let ktiles = p.k_pad / 64;
    let mut y = vec![None; p.m * p.ldy];
    let (mut cells, mut ub) = (Vec::new(), Vec::new());
    let neutral = ix::sds_sp24_meta_neutral();

    let load_stage = |emu: &mut Emu, base: usize, n0: usize, t0: usize, kt: usize| {
        let (w_s, x_s, m_s) = (base, base + w_bytes, base + w_bytes + x_bytes);
        for c in 0..BN * 4 {
            let (row, ch) = (c / 4, c % 4);
            let gr = n0 + row;
            let src = gr * (p.k_pad / 2) + kt * 32 + ch * 8;
            let ok = gr < p.n_pad;
            cp_async16(
                emu,
                w_s + u(ix::sds_sp24_v2_w_chunk_off(i(row), i(ch))),
                ok.then(|| &p.values[src..src + 8]),
            );
        }
        for c in 0..bt * 8 {
            let (row, ch) = (c / 8, c % 8);
            let (gt, gk) = (t0 + row, kt * 64 + ch * 8);
            let ok = gt < p.m && gk < p.k;
            let src = gt * p.k + gk;
            cp_async16(
                emu,
                x_s + u(ix::sds_sp24_v2_x_chunk_off(i(row), i(ch))),
                ok.then(|| &p.x[src..src + 8]),
            );
        }
        for c in 0..64 {
            let (rb, q) = (c / 8, c % 8);
            let grb = n0 / 16 + rb;
            if grb < p.n_pad / 16 {
                let w0 = ix::sds_sp24_meta_word(i(grb), i(p.k_pad / 64), i(kt), i(q * 4)) as usize;
                let cells16: Vec<u16> =
                    p.meta[w0..w0 + 4].iter().flat_map(|&w| [w as u16, (w >> 16) as u16]).collect();
                cp_async16(emu, m_s + c * 16, Some(&cells16));
            } else {
                for e in 0..4 {
                    emu.w32(m_s + c * 16 + 4 * e, neutral);
                }
            }
        }
    };

    for (bx, by) in blocks(p.n.div_ceil(BN), p.m.div_ceil(bt), all) {
        let (n0, t0) = (bx * BN, by * bt);
        let mut emu = Emu::new(total);
        let mut acc = vec![vec![vec![zero_acc(); nj]; 2]; 8]; // [warp][i][j]
        for s in 0..STAGES - 1 {
            if s < ktiles {
                load_stage(&mut emu, s * stage, n0, t0, s);
            }
        }
        for kt in 0..ktiles {
            let pf = kt + STAGES - 1;
            if pf < ktiles {
                load_stage(&mut emu, (pf % STAGES) * stage, n0, t0, pf);
            }
            let st = (kt % STAGES) * stage;
            let (w_s, x_s, m_s) = (st, st + w_bytes, st + w_bytes + x_bytes);
            for (warp, accw) in acc.iter_mut().enumerate() {
                let (warp_n, warp_t) = (warp % 4, warp / 4);
                if ix::sds_sp24_v2_warp_live(i(n0), i(warp_n), i(p.n_pad)) == 0 {
                    continue; // only padding rows: no MMA (review S2)
                }
                let meta: Vec<[u32; 32]> = (0..2)
                    .map(|ti| {
                        std::array::from_fn(|lane| {
                            let wd =
                                ix::sds_sp24_v2_meta_smem_word(i(warp_n), i(ti), i(meta_lane(lane, mutant)));
                            emu.r32(m_s + 4 * u(wd), "v2 meta")
                        })
                    })
                    .collect();
                for step in 0..2 {
                    let a: Vec<Frag> = (0..2)
                        .map(|ti| {
                            let addrs = std::array::from_fn(|lane| {
                                let row = ix::sds_sp24_v2_a_row(i(warp_n), i(ti), i(lane));
                                w_s + u(ix::sds_sp24_v2_w_chunk_off(
                                    row,
                                    ix::sds_sp24_v2_a_chunk(i(step), i(lane)),
                                ))
                            });
                            ldmatrix_x4(&mut emu, &addrs, false, "v2 A")
                        })
                        .collect();
                    let b: Vec<Frag> = (0..nj)
                        .map(|j| {
                            let addrs = std::array::from_fn(|lane| {
                                let row = ix::sds_sp24_v2_b_row(i(warp_t), i(warp_t_tokens), i(j), i(lane));
                                x_s + u(ix::sds_sp24_v2_x_chunk_off(
                                    row,
                                    ix::sds_sp24_v2_b_chunk(i(step), i(lane)),
                                ))
                            });
                            ldmatrix_x4(&mut emu, &addrs, false, "v2 B")
                        })
                        .collect();
                    for ti in 0..2 {
                        for j in 0..nj {
                            mma_sp_16832(
                                &mut emu,
                                &a[ti],
                                &b[j],
                                &mut accw[ti][j],
                                &meta[ti],
                                selector(step, mutant),
                                "v2",
                            );
                        }
                    }
                }
            }
        }
        let mut cs = vec![None; total / 4];
        for (warp, accw) in acc.iter().enumerate() {
            let (warp_n, warp_t) = (warp % 4, warp / 4);
            for (ti, acci) in accw.iter().enumerate() {
                for (j, accj) in acci.iter().enumerate() {
                    for (lane, accl) in accj.iter().enumerate() {
                        for (q, &v) in accl.iter().enumerate() {
                            let nr = warp_n * 32 + ti * 16 + u(ix::sds_frag_c_row(i(lane), i(q)));
                            let tr = warp_t * warp_t_tokens + j * 8 + u(ix::sds_frag_c_col(i(lane), i(q)));
                            cs[tr * cs_ld + nr] = Some(v);
                        }
                    }
                }
            }
        }
        p.epilogue_tile(&mut y, &mut ub, &cs, BN, bt, n0, t0);
        ub.extend(emu.ub);
        cells.extend(tile_cells(p, n0, t0, bt));
    }
    (Run { y, ub }, cells)
}

fn desc(addr: usize, lbo: usize, sbo: usize, mutant: Mutant) -> u64 {
    let (l, s) = if mutant == Mutant::LboSbo { (sbo, lbo) } else { (lbo, sbo) };
    ix::sds_wgmma_desc(addr as u32, l as u32, s as u32)
}

/// sdsparse_sp24_v3_wgmma: TMA boxes into core-matrix stages, wgmma.sp m64n128k32.
fn sp24_v3(p: &Sp24, all: bool, mutant: Mutant) -> (Run, Vec<usize>) {
    const STAGES: usize = 4;
    let stage = u(ix::sds_sp24_v3_stage_bytes());
    let chunk = u(ix::sds_sp24_v3_chunk_bytes());
    let sbo = u(ix::sds_sp24_v3_core_sbo());
    let cs_ld = u(ix::sds_sp24_cs_ld());
    let ktiles = p.k_pad / 64;
    let neutral = ix::sds_sp24_meta_neutral();
    let mut y = vec![None; p.m * p.ldy];
    let (mut cells, mut ub) = (Vec::new(), Vec::new());
    for (bx, by) in blocks(p.n.div_ceil(128), p.m.div_ceil(128), all) {
        let (n0, t0) = (bx * 128, by * 128);
        let mut emu = Emu::new(STAGES * stage);
        let mut d = vec![vec![vec![0f32; 64]; 128]; 2];
        for kt in 0..ktiles {
            let s = kt % STAGES;
            for c in 0..4 {
                let dst = u(ix::sds_sp24_v3_tma_a_dst(i(s), i(c)));
                let col = u(ix::sds_sp24_v3_tma_a_col(i(kt), i(c)));
                tma_box_2d(&mut emu, dst, &p.values, (p.k_pad / 2, p.n_pad, p.k_pad / 2), col, n0, 8, 128);
            }
            for c in 0..8 {
                let dst = u(ix::sds_sp24_v3_tma_b_dst(i(s), i(c)));
                let col = u(ix::sds_sp24_v3_tma_b_col(i(kt), i(c)));
                tma_box_2d(&mut emu, dst, &p.x, (p.k, p.m, p.k), col, t0, 8, 128);
            }
            for (cw, dc) in d.iter_mut().enumerate() {
                if ix::sds_sp24_v3_wg_live(i(n0), i(cw), i(p.n_pad)) == 0 {
                    continue; // only padding rows: no wgmma (review S2)
                }
                let meta: [u32; 128] = std::array::from_fn(|t| {
                    let (warp, lane) = (t / 32, t % 32);
                    let rb = ix::sds_sp24_v3_meta_row_block(i(n0), i(cw), i(warp));
                    if u(rb) < p.n_pad / 16 {
                        p.meta[ix::sds_sp24_meta_word(rb, i(ktiles), i(kt), i(meta_lane(lane, mutant)))
                            as usize]
                    } else {
                        neutral
                    }
                });
                for step in 0..2 {
                    let a = u(ix::sds_sp24_v3_a_start(i(s), i(cw), i(step)));
                    let b = u(ix::sds_sp24_v3_b_start(i(s), i(step)));
                    let (da, db) = (desc(a, chunk, sbo, mutant), desc(b, chunk, sbo, mutant));
                    wgmma_sparse_k32(&mut emu, dc, da, db, &meta, selector(step, mutant), 128);
                }
            }
        }
        let mut cs = vec![None; 128 * cs_ld];
        for (cw, dc) in d.iter().enumerate() {
            for (t, dt) in dc.iter().enumerate() {
                let (warp, lane) = (t / 32, t % 32);
                for ii in 0..16 {
                    for q in 0..4 {
                        let nr = 64 * cw + u(ix::sds_wgmma_d_row(i(warp), i(lane), i(q)));
                        let tr = u(ix::sds_wgmma_d_col(i(lane), i(ii), i(q)));
                        // The kernel's statement of the accumulator layout against the PTX one.
                        assert_eq!(wgmma_d_coord(t, 4 * ii + q), (nr - 64 * cw, tr), "wgmma D layout");
                        cs[tr * cs_ld + nr] = Some(dt[4 * ii + q]);
                    }
                }
            }
        }
        p.epilogue_tile(&mut y, &mut ub, &cs, 128, 128, n0, t0);
        ub.extend(emu.ub);
        cells.extend(tile_cells(p, n0, t0, 128));
    }
    (Run { y, ub }, cells)
}

#[derive(Debug, Clone, Copy)]
enum Sp24Kernel {
    V1,
    V2(usize),
    V3,
}

fn run_sp24(p: &Sp24, kernel: Sp24Kernel, all: bool, mutant: Mutant) -> Result<f64, String> {
    let ((run, cells), name) = match kernel {
        Sp24Kernel::V1 => (sp24_v1(p, all, mutant), "v1".to_string()),
        Sp24Kernel::V2(bt) => (sp24_v2(p, bt, all, mutant), format!("v2_bt{bt}")),
        Sp24Kernel::V3 => (sp24_v3(p, all, mutant), "v3".to_string()),
    };
    let name = format!("{name} M={} N={} K={}{}", p.m, p.n, p.k, if p.geglu { " GEGLU" } else { "" });
    check(&name, &run, &cells, |c| p.reference(c / p.ldy, c % p.ldy))
}

const SP24_ALL: [Sp24Kernel; 5] =
    [Sp24Kernel::V1, Sp24Kernel::V2(32), Sp24Kernel::V2(64), Sp24Kernel::V2(128), Sp24Kernel::V3];

#[test]
fn sparse24_header_matches_the_packer() {
    // The packer (Rust) and the kernels (header) must agree on where each nibble lives.
    for k_pad in [64usize, 192, 320] {
        for row in 0..48 {
            for group in 0..k_pad / 4 {
                let (word, shift) = meta_position(row, group, k_pad);
                let (r, gi) = (row % 16, group % 16);
                let lane = ix::sds_sp24_meta_lane(i(r), i(gi));
                let hw = ix::sds_sp24_meta_word(i(row / 16), i(k_pad / 64), i(group / 16), lane);
                assert_eq!(
                    (word, shift),
                    (hw as usize, ix::sds_sp24_meta_shift(i(r), i(gi)) as u32),
                    "row {row} group {group}"
                );
            }
        }
    }
}

#[test]
fn sparse24_small_and_awkward_shapes() {
    // (m, n, k): K off the 64 pad, minimum N/K, n_pad % 128 == 64 (SD2's N = 320: review S1),
    // ragged token tiles.
    for (idx, &(m, n, k, epi)) in [
        (9, 72, 136, true),
        (3, 8, 8, false),
        (20, 200, 72, false),
        (33, 320, 64, true),
        (130, 136, 40, false),
    ]
    .iter()
    .enumerate()
    {
        let p = Sp24::new(m, n, k, 100 + idx as u64, epi, false);
        for kernel in SP24_ALL {
            run_sp24(&p, kernel, true, Mutant::None).unwrap();
        }
    }
}

#[test]
fn sparse24_geglu() {
    let p = Sp24::new(11, 256, 72, 7, true, true);
    for kernel in [Sp24Kernel::V2(32), Sp24Kernel::V2(128), Sp24Kernel::V3] {
        run_sp24(&p, kernel, true, Mutant::None).unwrap();
    }
}

#[test]
fn sparse24_sd2_shapes_first_and_last_tiles() {
    // SD2 widths (N = 320 ... 10240, K = 320 ... 5120) at text (M = 154) and image (M = 8192)
    // token counts; v3 at K = 1280 laps its 4-stage ring 5 times.
    let cases: [(usize, usize, usize, &[Sp24Kernel]); 5] = [
        (154, 320, 1280, &SP24_ALL),
        (154, 1280, 320, &[Sp24Kernel::V2(32), Sp24Kernel::V3]),
        (8192, 640, 640, &[Sp24Kernel::V2(128), Sp24Kernel::V3]),
        (154, 10240, 1280, &[Sp24Kernel::V2(64)]),
        (154, 640, 5120, &[Sp24Kernel::V2(32)]),
    ];
    for (idx, (m, n, k, kernels)) in cases.into_iter().enumerate() {
        let p = Sp24::new(m, n, k, 200 + idx as u64, true, false);
        for &kernel in kernels {
            run_sp24(&p, kernel, false, Mutant::None).unwrap();
        }
    }
}

// =============================================================================================
// Unstructured GEMM (cuda/unstructured_gemm.cu)
// =============================================================================================

struct Uns {
    m: usize,
    n: usize,
    k: usize,
    w: TiledBitmapWeight,
    values: Vec<u16>,
    dense: Vec<f32>,
    x: Vec<u16>,
    bias: Vec<f32>,
    residual: Vec<u16>,
}

impl Uns {
    fn new(m: usize, n: usize, k: usize, sparsity: f32, seed: u64) -> Uns {
        let mut rng = TestRng::new(seed);
        let dense: Vec<f32> =
            (0..n * k).map(|_| if rng.uniform() < sparsity { 0.0 } else { rnd16(rng.nonzero()) }).collect();
        let w = TiledBitmapWeight::from_bitmap(&bitmap_from_dense(&dense, n, k)).expect("tiles");
        let values = w.values.iter().map(|v| v.to_bits()).collect();
        let x = rng.vec(m * k).iter().map(|&v| f2h(v)).collect();
        let bias = rng.vec(n);
        let residual = rng.vec(m * n).iter().map(|&v| f2h(v)).collect();
        Uns { m, n, k, w, values, dense, x, bias, residual }
    }
    fn epilogue(&self, acc: f32, row: usize, col: usize) -> f32 {
        let v = gelu((acc + self.bias[col]) as f64) as f32;
        v + h2f(self.residual[row * self.n + col])
    }
    fn reference(&self, row: usize, col: usize) -> f64 {
        let s: f64 = (0..self.k)
            .map(|kk| h2f(self.x[row * self.k + kk]) as f64 * self.dense[col * self.k + kk] as f64)
            .sum();
        gelu(s + self.bias[col] as f64) + h2f(self.residual[row * self.n + col]) as f64
    }
}

/// load_stage<C, CORE>: X tile, bitmap, packed values of k-tile kt into stage buffers (offsets
/// in halves for xs / vs, bytes for bm).
#[allow(clippy::too_many_arguments)]
fn uns_load_stage(
    emu: &mut Emu,
    p: &Uns,
    bm_rows: usize,
    lds: usize,
    core: bool,
    m0: usize,
    tn: usize,
    kt: usize,
    xs: usize,
    bm: usize,
    vs: usize,
) {
    for chunk in 0..bm_rows * 8 {
        let (r, c8) = (
            u(ix::sds_uns_x_chunk_row(i(chunk), i32::from(core))),
            u(ix::sds_uns_x_chunk_col8(i(chunk), i32::from(core))),
        );
        let (gm, gk) = (m0 + r, kt * 64 + c8 * 8);
        let valid = gm < p.m && gk < p.k;
        let src = gm * p.k + gk;
        let off = if core { u(ix::sds_uns_core_offset(i(r), i(c8 * 8))) } else { r * lds + c8 * 8 };
        cp_async16(emu, 2 * (xs + off), valid.then(|| &p.x[src..src + 8]));
    }
    let tile = tn * p.w.tiles_k + kt;
    for tid in 0..32 {
        let words = &p.w.bitmap[tile * 64 + tid * 2..tile * 64 + tid * 2 + 2];
        let cells: Vec<u16> =
            words.iter().flat_map(|&w| (0..4).map(move |s| (w >> (16 * s)) as u16)).collect();
        cp_async16(emu, bm + tid * 16, Some(&cells));
    }
    let (begin, end) = (p.w.tile_offsets[tile] as usize, p.w.tile_offsets[tile + 1] as usize);
    assert_eq!(begin % 8, 0, "tile value runs are 16 B aligned");
    for c in 0..(end - begin) / 8 {
        cp_async16(emu, 2 * (vs + c * 8), Some(&p.values[begin + c * 8..begin + c * 8 + 8]));
    }
}

/// expand_tile<C, CORE>: the warp-scan decode of one compressed tile into the dense tile `ws`.
fn uns_expand(emu: &mut Emu, warps: usize, lds: usize, core: bool, bm: usize, vs: usize, ws: usize) {
    let words: Vec<u64> = (0..64)
        .map(|r| (0..4).map(|s| u64::from(emu.r16(bm + 8 * r + 2 * s, "bitmap")) << (16 * s)).sum())
        .collect();
    let c0: Vec<u32> = (0..32).map(|l| words[2 * l].count_ones()).collect();
    let pair: Vec<u32> = (0..32).map(|l| c0[l] + words[2 * l + 1].count_ones()).collect();
    let mut incl = pair.clone();
    let mut d = 1;
    while d < 32 {
        let prev = incl.clone();
        for l in d..32 {
            incl[l] += prev[l - d];
        }
        d *= 2;
    }
    if core {
        // The core-layout fill (review U1): lane -> (row 8 rb + lane / 4, pair 4c + lane % 4).
        for warp in 0..warps {
            for rb in (warp..8).step_by(warps) {
                for lane in 0..32 {
                    let r = u(ix::sds_uns_core_fill_row(i(rb), i(lane)));
                    let src = r / 2;
                    let row_start = (incl[src] - pair[src]) + if r & 1 == 1 { c0[src] } else { 0 };
                    let word = words[r];
                    for c in 0..8 {
                        let cp = u(ix::sds_uns_core_fill_pair(i(c), i(lane)));
                        let bits = (word >> (2 * cp)) & 3;
                        let mut idx =
                            (row_start + (word & ix::sds_uns_below_mask(i(cp))).count_ones()) as usize;
                        let lo = if bits & 1 == 1 { emu.r16(2 * (vs + idx), "values") } else { 0 };
                        idx += (bits & 1) as usize;
                        let hi = if bits & 2 == 2 { emu.r16(2 * (vs + idx), "values") } else { 0 };
                        let off = ws + u(ix::sds_uns_core_offset(i(r), i(2 * cp)));
                        emu.w16(2 * off, lo);
                        emu.w16(2 * off + 2, hi);
                    }
                }
            }
        }
        return;
    }
    for warp in 0..warps {
        for r in (warp..64).step_by(warps) {
            let src = r / 2;
            let row_start = (incl[src] - pair[src]) + if r & 1 == 1 { c0[src] } else { 0 };
            let word = words[r];
            for lane in 0..32 {
                let bits = (word >> (2 * lane)) & 3;
                let mut idx = (row_start + (word & ix::sds_uns_below_mask(i(lane))).count_ones()) as usize;
                let lo = if bits & 1 == 1 { emu.r16(2 * (vs + idx), "values") } else { 0 };
                idx += (bits & 1) as usize;
                let hi = if bits & 2 == 2 { emu.r16(2 * (vs + idx), "values") } else { 0 };
                let off = ws + r * lds + 2 * lane;
                emu.w16(2 * off, lo);
                emu.w16(2 * off + 2, hi);
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum UnsKernel {
    Tc(usize, usize, usize),
    Wgmma,
}

/// gemm_tc<C> / gemm_wgmma with `splits` k-slices, then sdsparse_uns_gemm_splitk_reduce.
fn run_uns(p: &Uns, kernel: UnsKernel, splits_req: usize, all: bool, mutant: Mutant) -> Result<f64, String> {
    let (bm_rows, warps_m, warps_n, core) = match kernel {
        UnsKernel::Tc(b, wm, wn) => (b, wm, wn, false),
        UnsKernel::Wgmma => (128, 4, 2, true),
    };
    let tiles_k = p.w.tiles_k;
    let per = tiles_k.div_ceil(splits_req.clamp(1, tiles_k));
    let splits = tiles_k.div_ceil(per);
    let lds = if core { 64 } else { 72 };
    let warps = warps_m * warps_n;
    let (wm, wn) = (bm_rows / warps_m, 64 / warps_n);
    let (mt, nt) = (wm / 16, wn / 8);
    let (x_h, w_h, v_h) = (2 * bm_rows * lds, 64 * lds, 2 * 4096);
    let smem = (x_h + w_h + v_h) * 2 + 2 * 64 * 8;
    let (mn, n) = (p.m * p.n, p.n);
    let mut y = vec![None; mn];
    let mut wsp: Vec<Option<f32>> = vec![None; splits * mn];
    let mut ub = Vec::new();
    let mut cells = Vec::new();
    let mut store_pair = |y: &mut Vec<Option<f32>>, z: usize, row: usize, col: usize, v0: f32, v1: f32| {
        if row >= p.m {
            return;
        }
        for (c, v) in [(col, v0), (col + 1, v1)] {
            if c < n {
                if splits > 1 {
                    wsp[ix::sds_uns_workspace_index(i(z), i(p.m), i(n), i(row), i(c)) as usize] = Some(v);
                } else {
                    y[row * n + c] = Some(rnd16(p.epilogue(v, row, c)));
                }
            }
        }
    };
    for (tn, by) in blocks(p.w.tiles_n, p.m.div_ceil(bm_rows), all) {
        let (m0, n0) = (by * bm_rows, tn * 64);
        for t in m0..(m0 + bm_rows).min(p.m) {
            cells.extend((n0..(n0 + 64).min(n)).map(|c| t * n + c));
        }
        for z in 0..splits {
            let mut emu = Emu::new(smem);
            let (xs, ws, vs, bm) = (0, x_h, x_h + w_h, (x_h + w_h + v_h) * 2);
            let kb = u(ix::sds_uns_split_begin(i(z), i(per)));
            let ke = u(ix::sds_uns_split_end(i(z), i(per), i(tiles_k)));
            let mut acc = vec![vec![vec![zero_acc(); nt]; mt]; warps];
            let mut d = vec![vec![vec![0f32; 32]; 128]; 2];
            if kb < ke {
                uns_load_stage(&mut emu, p, bm_rows, lds, core, m0, tn, kb, xs, bm, vs);
            }
            for kt in kb..ke {
                let s = (kt - kb) & 1;
                if kt + 1 < ke {
                    let o = s ^ 1;
                    uns_load_stage(
                        &mut emu,
                        p,
                        bm_rows,
                        lds,
                        core,
                        m0,
                        tn,
                        kt + 1,
                        xs + o * bm_rows * lds,
                        bm + o * 512,
                        vs + o * 4096,
                    );
                }
                uns_expand(&mut emu, warps, lds, core, bm + s * 512, vs + s * 4096, ws);
                let xst = xs + s * bm_rows * lds;
                if core {
                    let (lbo, sbo) = (ix::sds_uns_core_lbo() as usize, ix::sds_uns_core_sbo() as usize);
                    for (wg, dg) in d.iter_mut().enumerate() {
                        let xa = xst + wg * 64 * 64;
                        for ks in 0..4 {
                            let da = desc(2 * (xa + ks * 128), lbo, sbo, mutant);
                            let db = desc(2 * (ws + ks * 128), lbo, sbo, mutant);
                            wgmma_dense(&mut emu, dg, da, db, 64);
                        }
                    }
                    continue;
                }
                for (warp, accw) in acc.iter_mut().enumerate() {
                    let (warp_m, warp_n) = (warp / warps_n, warp % warps_n);
                    for ks in 0..4 {
                        let a: Vec<Frag> = (0..mt)
                            .map(|ti| {
                                let addrs = std::array::from_fn(|l| {
                                    let row = warp_m * wm + ti * 16 + u(ix::sds_ldm_a_row(i(l)));
                                    2 * (xst + row * lds + ks * 16 + u(ix::sds_ldm_a_col(i(l))))
                                });
                                ldmatrix_x4(&mut emu, &addrs, false, "uns A")
                            })
                            .collect();
                        for j in (0..nt).step_by(2) {
                            let addrs = std::array::from_fn(|l| {
                                let row = warp_n * wn + j * 8 + u(ix::sds_ldm_b_row(i(l)));
                                2 * (ws + row * lds + ks * 16 + u(ix::sds_ldm_b_col(i(l))))
                            });
                            let b = ldmatrix_x4(&mut emu, &addrs, false, "uns B");
                            for ti in 0..mt {
                                mma_16816(&a[ti], &reg(&b, 0), &reg(&b, 1), &mut accw[ti][j]);
                                mma_16816(&a[ti], &reg(&b, 2), &reg(&b, 3), &mut accw[ti][j + 1]);
                            }
                        }
                    }
                }
            }
            if core {
                for (wg, dg) in d.iter().enumerate() {
                    for (t, dt) in dg.iter().enumerate() {
                        let (warp, lane) = (t / 32, t % 32);
                        for j in 0..8 {
                            for h in 0..2 {
                                let row = wg * 64 + u(ix::sds_wgmma_d_row(i(warp), i(lane), i(2 * h)));
                                let col = u(ix::sds_wgmma_d_col(i(lane), i(j), 0));
                                assert_eq!(
                                    wgmma_d_coord(t, 4 * j + 2 * h),
                                    (row - wg * 64, col),
                                    "wgmma D layout"
                                );
                                store_pair(
                                    &mut y,
                                    z,
                                    m0 + row,
                                    n0 + col,
                                    dt[4 * j + 2 * h],
                                    dt[4 * j + 2 * h + 1],
                                );
                            }
                        }
                    }
                }
            } else {
                for (warp, accw) in acc.iter().enumerate() {
                    let (warp_m, warp_n) = (warp / warps_n, warp % warps_n);
                    for (ti, acci) in accw.iter().enumerate() {
                        for (j, accj) in acci.iter().enumerate() {
                            for (lane, al) in accj.iter().enumerate() {
                                for h in 0..2 {
                                    let row =
                                        m0 + warp_m * wm + ti * 16 + u(ix::sds_frag_c_row(i(lane), i(2 * h)));
                                    let col = n0 + warp_n * wn + j * 8 + u(ix::sds_frag_c_col(i(lane), 0));
                                    store_pair(&mut y, z, row, col, al[2 * h], al[2 * h + 1]);
                                }
                            }
                        }
                    }
                }
            }
            ub.extend(emu.ub);
        }
    }
    if splits > 1 {
        // sdsparse_uns_gemm_splitk_reduce over the emulated cells.
        for &c in &cells {
            let parts: Option<Vec<f32>> = (0..splits).map(|z| wsp[z * mn + c]).collect();
            match parts {
                Some(parts) => y[c] = Some(rnd16(p.epilogue(parts.iter().sum(), c / n, c % n))),
                None => ub.push(format!("split-K workspace element {c} never written by some slice")),
            }
        }
    }
    let name = format!("{kernel:?} splits={splits} M={} N={} K={}", p.m, p.n, p.k);
    check(&name, &Run { y, ub }, &cells, |c| p.reference(c / n, c % n))
}

const UNS_ALL: [UnsKernel; 4] =
    [UnsKernel::Tc(32, 1, 4), UnsKernel::Tc(64, 2, 2), UnsKernel::Tc(128, 4, 2), UnsKernel::Wgmma];

#[test]
fn unstructured_small_and_awkward_shapes_with_split_k() {
    let p = Uns::new(33, 70, 136, 0.35, 11);
    for kernel in UNS_ALL {
        for splits in [1, 2, 3] {
            run_uns(&p, kernel, splits, true, Mutant::None).unwrap();
        }
    }
    let tiny = Uns::new(5, 8, 8, 0.5, 12);
    for kernel in UNS_ALL {
        run_uns(&tiny, kernel, 1, true, Mutant::None).unwrap();
    }
}

#[test]
fn unstructured_sd2_shapes_first_and_last_tiles() {
    // Text encoder (M = 154, split-K) and an image-size M; SD2 widths and depths.
    let p = Uns::new(154, 1280, 1280, 0.35, 13);
    run_uns(&p, UnsKernel::Tc(32, 1, 4), 4, false, Mutant::None).unwrap();
    run_uns(&p, UnsKernel::Wgmma, 3, false, Mutant::None).unwrap();
    let p = Uns::new(8192, 320, 640, 0.35, 14);
    run_uns(&p, UnsKernel::Tc(128, 4, 2), 1, false, Mutant::None).unwrap();
    run_uns(&p, UnsKernel::Wgmma, 1, false, Mutant::None).unwrap();
    let p = Uns::new(154, 640, 5120, 0.35, 15);
    run_uns(&p, UnsKernel::Tc(64, 2, 2), 2, false, Mutant::None).unwrap();
}

// =============================================================================================
// Flash attention (cuda/attention.cu)
// =============================================================================================

const D: usize = 64;
const LDS: usize = 72;

#[derive(Debug, Clone, Copy)]
enum Layout {
    /// [B, S, H*D]: the projection output read in place.
    Bshd,
    /// [B, H, S, D].
    Bhsd,
}

/// (stride_b, stride_s, stride_h) in elements.
fn strides(layout: Layout, h: usize, s: usize) -> (usize, usize, usize) {
    match layout {
        Layout::Bshd => (s * h * D, h * D, D),
        Layout::Bhsd => (s * h * D, D, s * D),
    }
}

struct Attn {
    b: usize,
    h: usize,
    sq: usize,
    skv: usize,
    layout: Layout,
    causal: bool,
    q: Vec<u16>,
    k: Vec<u16>,
    v: Vec<u16>,
}

impl Attn {
    fn new(b: usize, h: usize, sq: usize, skv: usize, layout: Layout, seed: u64) -> Attn {
        let mut rng = TestRng::new(seed);
        let mut halves =
            |n: usize, amp: f32| (0..n).map(|_| f2h(amp * (2.0 * rng.uniform() - 1.0))).collect::<Vec<u16>>();
        let q = halves(b * h * sq * D, 2.0);
        let k = halves(b * h * skv * D, 2.0);
        let v = halves(b * h * skv * D, 1.0);
        Attn { b, h, sq, skv, layout, causal: false, q, k, v }
    }
    /// With the causal mask (the text encoder's self-attention).
    fn causal(self) -> Attn {
        Attn { causal: true, ..self }
    }
    /// Keys `[0, end)` visible to query `row`, written out independently of `attn_key_end`.
    fn key_end(&self, row: usize) -> usize {
        if self.causal {
            (row + 1 + self.skv).saturating_sub(self.sq).min(self.skv)
        } else {
            self.skv
        }
    }
    /// The 64 outputs of query `row` of (bb, hh), softmax in f64.
    fn reference_row(&self, bb: usize, hh: usize, row: usize) -> Vec<f64> {
        let (qs, ks) = (strides(self.layout, self.h, self.sq), strides(self.layout, self.h, self.skv));
        let qo = bb * qs.0 + row * qs.1 + hh * qs.2;
        if self.key_end(row) == 0 {
            return vec![0.0; D]; // no visible key: zeros (the scores path's rule)
        }
        let scores: Vec<f64> = (0..self.key_end(row))
            .map(|j| {
                let ko = bb * ks.0 + j * ks.1 + hh * ks.2;
                0.125 * (0..D).map(|x| h2f(self.q[qo + x]) as f64 * h2f(self.k[ko + x]) as f64).sum::<f64>()
            })
            .collect();
        let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - mx).exp()).collect();
        let sum: f64 = e.iter().sum();
        let mut out = vec![0f64; D];
        for (j, &ej) in e.iter().enumerate() {
            let vo = bb * ks.0 + j * ks.1 + hh * ks.2;
            for (d, o) in out.iter_mut().enumerate() {
                *o += ej * h2f(self.v[vo + d]) as f64;
            }
        }
        out.iter().map(|o| o / sum).collect()
    }
}

/// sdsparse_attn_fwd_d64 for the query blocks `qblocks` of every (batch, head).
fn attention(p: &Attn, qblocks: &[usize], mutant: Mutant) -> Result<f64, String> {
    let (qs, ks) = (strides(p.layout, p.h, p.sq), strides(p.layout, p.h, p.skv));
    let mut o: Vec<Option<f32>> = vec![None; p.q.len()];
    let mut ub = Vec::new();
    let mut cells = Vec::new();
    let scale_log2 = 0.125f32 * std::f32::consts::LOG2_E;
    let load_rows =
        |emu: &mut Emu, dst: usize, g: &[u16], base: usize, stride_s: usize, s0: usize, seq: usize| {
            for chunk in 0..64 * D / 8 {
                let (r, c8) = (chunk / 8, chunk % 8);
                let valid = s0 + r < seq;
                let src = base + (s0 + r) * stride_s + c8 * 8;
                cp_async16(emu, 2 * (dst + r * LDS + c8 * 8), valid.then(|| &g[src..src + 8]));
            }
        };
    for bh in 0..p.b * p.h {
        let (bb, hh) = (bh / p.h, bh % p.h);
        for &bx in qblocks {
            let q0 = bx * 64;
            let mut emu = Emu::new((64 + 4 * 64) * LDS * 2);
            let (qsm, ksm, vsm) = (0, [64 * LDS, 128 * LDS], [192 * LDS, 256 * LDS]);
            let (qb, kb, vb) = (bb * qs.0 + hh * qs.2, bb * ks.0 + hh * ks.2, bb * ks.0 + hh * ks.2);
            let causal = i32::from(p.causal);
            let n_tiles = u(ix::sds_attn_n_tiles(i(q0), i(p.sq), i(p.skv), causal))
                - usize::from(mutant == Mutant::CausalSkipTooMany);
            let first_end = u(ix::sds_attn_key_end(i(q0), i(p.sq), i(p.skv), causal));
            load_rows(&mut emu, qsm, &p.q, qb, qs.1, q0, p.sq);
            load_rows(&mut emu, ksm[0], &p.k, kb, ks.1, 0, p.skv);
            load_rows(&mut emu, vsm[0], &p.v, vb, ks.1, 0, p.skv);
            let mut m_run = vec![[[f32::NEG_INFINITY; 2]; 32]; 4];
            let mut l_run = vec![[[0f32; 2]; 32]; 4];
            let mut acc_o = vec![vec![zero_acc(); 8]; 4];
            let mut qa: Vec<Vec<Frag>> = vec![Vec::new(); 4];
            for t in 0..n_tiles {
                let s = t & 1;
                if t + 1 < n_tiles {
                    load_rows(&mut emu, ksm[s ^ 1], &p.k, kb, ks.1, (t + 1) * 64, p.skv);
                    load_rows(&mut emu, vsm[s ^ 1], &p.v, vb, ks.1, (t + 1) * 64, p.skv);
                }
                for warp in 0..4 {
                    if t == 0 {
                        qa[warp] = (0..4)
                            .map(|kk| {
                                let addrs = std::array::from_fn(|l| {
                                    2 * (qsm
                                        + (warp * 16 + u(ix::sds_ldm_a_row(i(l)))) * LDS
                                        + kk * 16
                                        + u(ix::sds_ldm_a_col(i(l))))
                                });
                                ldmatrix_x4(&mut emu, &addrs, false, "Q")
                            })
                            .collect();
                    }
                    let mut sc = vec![zero_acc(); 8];
                    for kk in 0..4 {
                        for j in (0..8).step_by(2) {
                            let addrs = std::array::from_fn(|l| {
                                let key = j * 8 + u(ix::sds_ldm_b_row(i(l)));
                                2 * (ksm[s] + key * LDS + kk * 16 + u(ix::sds_ldm_b_col(i(l))))
                            });
                            let bf = ldmatrix_x4(&mut emu, &addrs, false, "K");
                            mma_16816(&qa[warp][kk], &reg(&bf, 0), &reg(&bf, 1), &mut sc[j]);
                            mma_16816(&qa[warp][kk], &reg(&bf, 2), &reg(&bf, 3), &mut sc[j + 1]);
                        }
                    }
                    let masked = (t + 1) * 64 > first_end;
                    let mut mx = m_run[warp];
                    for (j, scj) in sc.iter_mut().enumerate() {
                        for (l, scl) in scj.iter_mut().enumerate() {
                            for (e, v) in scl.iter_mut().enumerate() {
                                let key = u(ix::sds_attn_key_index(i(t), i(j), i(l), i(e)));
                                let row = q0 + warp * 16 + u(ix::sds_frag_c_row(i(l), i(e)));
                                let mut limit = u(ix::sds_attn_key_end(i(row), i(p.sq), i(p.skv), causal));
                                if mutant == Mutant::MaskOffByOne
                                    || (mutant == Mutant::CausalDiagonal && limit < p.skv)
                                {
                                    limit += 1;
                                }
                                *v = if masked && key >= limit { f32::NEG_INFINITY } else { *v * scale_log2 };
                                mx[l][e / 2] = mx[l][e / 2].max(*v);
                            }
                        }
                    }
                    for sh in [1, 2] {
                        let prev = mx;
                        for l in 0..32 {
                            for r in 0..2 {
                                mx[l][r] = prev[l][r].max(prev[l ^ sh][r]);
                            }
                        }
                    }
                    let mut m_use = [[0f32; 2]; 32];
                    for l in 0..32 {
                        for r in 0..2 {
                            m_use[l][r] = if mx[l][r] == f32::NEG_INFINITY { 0.0 } else { mx[l][r] };
                            let alpha = (m_run[warp][l][r] - m_use[l][r]).exp2();
                            if alpha.is_nan() {
                                ub.push("NaN rescale factor in the online softmax".into());
                            }
                            m_run[warp][l][r] = mx[l][r];
                            l_run[warp][l][r] *= alpha;
                            for oj in acc_o[warp].iter_mut() {
                                oj[l][2 * r] *= alpha;
                                oj[l][2 * r + 1] *= alpha;
                            }
                        }
                    }
                    let mut pa: Vec<Frag> = vec![[[(0.0, 0.0); 4]; 32]; 4];
                    for (j, scj) in sc.iter().enumerate() {
                        for l in 0..32 {
                            let pe: [f32; 4] = std::array::from_fn(|e| (scj[l][e] - m_use[l][e / 2]).exp2());
                            for (e, &pv) in pe.iter().enumerate() {
                                l_run[warp][l][e / 2] += pv;
                            }
                            pa[j / 2][l][u(ix::sds_attn_p_reg(i(j), 0))] = (rnd16(pe[0]), rnd16(pe[1]));
                            pa[j / 2][l][u(ix::sds_attn_p_reg(i(j), 1))] = (rnd16(pe[2]), rnd16(pe[3]));
                        }
                    }
                    for (kk, pak) in pa.iter().enumerate() {
                        for j in (0..8).step_by(2) {
                            let addrs = std::array::from_fn(|l| {
                                let key = kk * 16 + u(ix::sds_ldm_bt_row(i(l)));
                                2 * (vsm[s] + key * LDS + j * 8 + u(ix::sds_ldm_bt_col(i(l))))
                            });
                            let bf = ldmatrix_x4(&mut emu, &addrs, mutant != Mutant::VNoTrans, "V");
                            mma_16816(pak, &reg(&bf, 0), &reg(&bf, 1), &mut acc_o[warp][j]);
                            mma_16816(pak, &reg(&bf, 2), &reg(&bf, 3), &mut acc_o[warp][j + 1]);
                        }
                    }
                }
            }
            let ob = bb * qs.0 + hh * qs.2;
            for warp in 0..4 {
                for l in 0..32 {
                    for r in 0..2 {
                        let lsum: f32 = (0..4).map(|x| l_run[warp][l ^ x][r]).sum();
                        let inv = if lsum > 0.0 { 1.0 / lsum } else { 0.0 };
                        let row = q0 + warp * 16 + u(ix::sds_frag_c_row(i(l), i(2 * r)));
                        if row >= p.sq {
                            continue;
                        }
                        for j in 0..8 {
                            let d = j * 8 + u(ix::sds_frag_c_col(i(l), 0));
                            o[ob + row * qs.1 + d] = Some(rnd16(acc_o[warp][j][l][2 * r] * inv));
                            o[ob + row * qs.1 + d + 1] = Some(rnd16(acc_o[warp][j][l][2 * r + 1] * inv));
                        }
                    }
                }
            }
            ub.extend(emu.ub);
            for row in q0..(q0 + 64).min(p.sq) {
                cells.extend((0..D).map(|d| (bb, hh, row, d)));
            }
        }
    }
    let flat: Vec<usize> =
        cells.iter().map(|&(bb, hh, row, d)| bb * qs.0 + row * qs.1 + hh * qs.2 + d).collect();
    let name =
        format!("attention B={} H={} Sq={} Skv={} {:?} causal {}", p.b, p.h, p.sq, p.skv, p.layout, p.causal);
    let mut rows = std::collections::HashMap::new();
    for &(bb, hh, row, _) in &cells {
        rows.entry((bb, hh, row)).or_insert_with(|| p.reference_row(bb, hh, row));
    }
    let lookup: std::collections::HashMap<usize, (usize, usize, usize, usize)> =
        flat.iter().copied().zip(cells).collect();
    check(&name, &Run { y: o, ub }, &flat, |c| {
        let (bb, hh, row, d) = lookup[&c];
        rows[&(bb, hh, row)][d]
    })
}

#[test]
fn attention_text_context_both_layouts() {
    // Cross-attention to the 77 text tokens: one full and one ragged K/V tile.
    attention(&Attn::new(1, 2, 70, 77, Layout::Bshd, 21), &[0, 1], Mutant::None).unwrap();
    attention(&Attn::new(2, 1, 5, 77, Layout::Bhsd, 22), &[0], Mutant::None).unwrap();
    attention(&Attn::new(1, 1, 3, 1, Layout::Bhsd, 23), &[0], Mutant::None).unwrap();
}

#[test]
fn attention_causal_text_encoder() {
    // The text encoder's causal self-attention, 77 tokens: block 0 visits one tile (its rows
    // straddle keys 0..63), block 1 both; a multiple of the tile (128), a ragged 130 over three
    // blocks (block 2 skips nothing, block 0 skips two tiles), fewer queries than keys (70 / 77)
    // and more (80 / 77: rows 0..2 see no key and are written as zeros, no NaN).
    attention(&Attn::new(1, 2, 77, 77, Layout::Bshd, 41).causal(), &[0, 1], Mutant::None).unwrap();
    attention(&Attn::new(1, 1, 128, 128, Layout::Bhsd, 42).causal(), &[0, 1], Mutant::None).unwrap();
    attention(&Attn::new(1, 1, 130, 130, Layout::Bshd, 43).causal(), &[0, 1, 2], Mutant::None).unwrap();
    attention(&Attn::new(1, 1, 70, 77, Layout::Bhsd, 44).causal(), &[0, 1], Mutant::None).unwrap();
    attention(&Attn::new(1, 1, 80, 77, Layout::Bhsd, 45).causal(), &[0, 1], Mutant::None).unwrap();
    // The tiles visited: every tile a block's last row sees, none past it.
    for (q0, sq, skv, want) in [
        (0, 77, 77, 1),
        (64, 77, 77, 2),
        (0, 130, 130, 1),
        (64, 130, 130, 2),
        (128, 130, 130, 3),
        (0, 80, 77, 1),
        (0, 9, 1, 1),
    ] {
        assert_eq!(ix::sds_attn_n_tiles(q0, sq, skv, 1), want, "q0 {q0} seq {sq}/{skv}");
    }
    assert_eq!(ix::sds_attn_n_tiles(0, 77, 200, 0), 4, "no mask: every tile");
}

#[test]
fn attention_4096_keys_both_layouts() {
    // Self-attention at 64x64 latents: 64 K/V tiles (the double buffer laps 32 times); one query
    // block of the 64 is emulated.
    attention(&Attn::new(1, 1, 4096, 4096, Layout::Bshd, 24), &[63], Mutant::None).unwrap();
    attention(&Attn::new(1, 1, 4096, 4096, Layout::Bhsd, 25), &[0], Mutant::None).unwrap();
}

// =============================================================================================
// Mutation check: a check that cannot fail is worth nothing.
// =============================================================================================

#[test]
fn mutants_are_caught() {
    let sp = Sp24::new(9, 72, 136, 31, false, false);
    for mutant in [Mutant::MetaLane, Mutant::Selector] {
        for kernel in SP24_ALL {
            let got = run_sp24(&sp, kernel, true, mutant);
            println!("{mutant:?} on {kernel:?}: {got:?}");
            assert!(got.is_err(), "{mutant:?} not caught on {kernel:?}: {got:?}");
        }
    }
    let got = run_sp24(&sp, Sp24Kernel::V3, true, Mutant::LboSbo);
    println!("LboSbo on 2:4 v3: {got:?}");
    assert!(got.is_err(), "LBO/SBO swap not caught on 2:4 v3: {got:?}");
    let uns = Uns::new(33, 70, 136, 0.35, 32);
    let got = run_uns(&uns, UnsKernel::Wgmma, 1, true, Mutant::LboSbo);
    println!("LboSbo on unstructured wgmma: {got:?}");
    assert!(got.is_err(), "LBO/SBO swap not caught on unstructured wgmma: {got:?}");
    let att = Attn::new(1, 1, 9, 77, Layout::Bshd, 33);
    let got = attention(&att, &[0], Mutant::VNoTrans);
    println!("VNoTrans on attention: {got:?}");
    assert!(got.is_err(), "V without .trans not caught: {got:?}");
    let got = attention(&att, &[0], Mutant::MaskOffByOne);
    println!("MaskOffByOne on attention: {got:?}");
    assert!(got.is_err(), "one unmasked padding key not caught: {got:?}");
    let causal = Attn::new(1, 1, 77, 77, Layout::Bshd, 34).causal();
    for mutant in [Mutant::CausalDiagonal, Mutant::CausalSkipTooMany] {
        let got = attention(&causal, &[0, 1], mutant);
        println!("{mutant:?} on causal attention: {got:?}");
        assert!(got.is_err(), "{mutant:?} not caught: {got:?}");
    }
    attention(&causal, &[0, 1], Mutant::None).unwrap();
    // And the unmutated runs of the same inputs pass.
    run_sp24(&sp, Sp24Kernel::V3, true, Mutant::None).unwrap();
    run_uns(&uns, UnsKernel::Wgmma, 1, true, Mutant::None).unwrap();
    attention(&att, &[0], Mutant::None).unwrap();
}

#[test]
fn emulator_rejects_invalid_metadata_and_unwritten_reads() {
    // mma.sp with all-zero metadata (0b0000 nibbles) is undefined [SPS]: recorded.
    let mut emu = Emu::new(64);
    let frag = [[(1.0, 1.0); 4]; 32];
    let mut acc = zero_acc();
    mma_sp_16832(&mut emu, &frag, &frag, &mut acc, &[0u32; 32], 0, "zero meta");
    assert!(emu.ub.iter().any(|u| u.contains("undefined for ordered_metadata")), "{:?}", emu.ub);
    let mut emu = Emu::new(64);
    mma_sp_16832(&mut emu, &frag, &frag, &mut acc, &[ix::sds_sp24_meta_neutral(); 32], 1, "neutral meta");
    assert!(emu.ub.is_empty(), "{:?}", emu.ub);
    // A read of a cell nobody wrote is recorded; a zero-filled cp.async counts as written.
    let mut emu = Emu::new(64);
    cp_async16(&mut emu, 16, None);
    assert_eq!(emu.r16(16, "filled"), 0);
    assert!(emu.ub.is_empty());
    emu.r16(0, "never written");
    assert_eq!(emu.ub.len(), 1);
}

// =============================================================================================
// Shared-memory bank conflicts of the fills and fragment loads (review U1)
// =============================================================================================

/// The worst bank conflict of one warp-wide shared-memory access: 32 banks of 4 bytes, requests
/// of `bytes` per lane served in phases of 128 bytes (32 lanes for 4 B, 8 lanes for 16 B); lanes
/// on the same 4-byte word are one access (broadcast). 1 = conflict-free.
fn conflict_ways(addrs: &[usize], bytes: usize) -> usize {
    let lanes_per_phase = 128 / bytes;
    addrs
        .chunks(lanes_per_phase)
        .map(|phase| {
            let mut words: Vec<usize> =
                phase.iter().flat_map(|&a| (a / 4..(a + bytes) / 4).collect::<Vec<_>>()).collect();
            words.sort_unstable();
            words.dedup();
            (0..32).map(|bank| words.iter().filter(|&&w| w % 32 == bank).count()).max().unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

#[test]
fn shared_memory_fills_and_fragment_loads_are_conflict_free() {
    // Unstructured wgmma variant: the core-layout expansion (half2 stores) ...
    for rb in 0..8 {
        for c in 0..8 {
            let addrs: Vec<usize> = (0..32)
                .map(|l| {
                    let (r, cp) = (ix::sds_uns_core_fill_row(rb, l), ix::sds_uns_core_fill_pair(c, l));
                    2 * u(ix::sds_uns_core_offset(r, 2 * cp))
                })
                .collect();
            assert_eq!(conflict_ways(&addrs, 4), 1, "expansion row block {rb} core {c}");
        }
    }
    // ... where the former lane -> column pair assignment on one row gave 8-way conflicts.
    let old: Vec<usize> = (0..32).map(|l| 2 * u(ix::sds_uns_core_offset(5, 2 * l))).collect();
    assert_eq!(conflict_ways(&old, 4), 8, "the checker sees the review's U1 conflicts");
    // ... and the X cp.async copies (16 B per lane), every warp of the 128-row tile.
    for warp in 0..(128 * 8 / 32) {
        let addrs: Vec<usize> = (0..32)
            .map(|l| {
                let chunk = i(32 * warp + l);
                2 * u(ix::sds_uns_core_offset(
                    ix::sds_uns_x_chunk_row(chunk, 1),
                    8 * ix::sds_uns_x_chunk_col8(chunk, 1),
                ))
            })
            .collect();
        assert_eq!(conflict_ways(&addrs, 16), 1, "X fill warp {warp}");
    }
    let old: Vec<usize> = (0..32).map(|c| 2 * u(ix::sds_uns_core_offset(c / 8, 8 * (c % 8)))).collect();
    assert_eq!(conflict_ways(&old, 16), 8, "the former row-major X fill");
    // mma.sync variants (rows padded to 72 halves) and 2:4 v2 (swizzled): every ldmatrix matrix
    // (8 rows of 16 B) is one conflict-free phase.
    for lane_group in 0..4 {
        let lanes = 8 * lane_group..8 * lane_group + 8;
        let uns_a: Vec<usize> = lanes
            .clone()
            .map(|l| 2 * (u(ix::sds_ldm_a_row(i(l))) * 72 + u(ix::sds_ldm_a_col(i(l)))))
            .collect();
        let uns_b: Vec<usize> = lanes
            .clone()
            .map(|l| 2 * (u(ix::sds_ldm_b_row(i(l))) * 72 + u(ix::sds_ldm_b_col(i(l)))))
            .collect();
        assert_eq!((conflict_ways(&uns_a, 16), conflict_ways(&uns_b, 16)), (1, 1));
        for step in 0..2 {
            for warp_n in 0..4 {
                let w: Vec<usize> = lanes
                    .clone()
                    .map(|l| {
                        let row = ix::sds_sp24_v2_a_row(warp_n, 1, i(l));
                        u(ix::sds_sp24_v2_w_chunk_off(row, ix::sds_sp24_v2_a_chunk(step, i(l))))
                    })
                    .collect();
                assert_eq!(conflict_ways(&w, 16), 1, "v2 W step {step} warp_n {warp_n}");
            }
            let x: Vec<usize> = lanes
                .clone()
                .map(|l| {
                    let row = ix::sds_sp24_v2_b_row(1, 32, 2, i(l));
                    u(ix::sds_sp24_v2_x_chunk_off(row, ix::sds_sp24_v2_b_chunk(step, i(l))))
                })
                .collect();
            assert_eq!(conflict_ways(&x, 16), 1, "v2 X step {step}");
        }
    }
}
