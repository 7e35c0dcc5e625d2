//! An emulator of the warp- and warpgroup-level PTX instructions the kernels use, written from
//! the PTX ISA (9.1) alone, never from project code: the kernels' index math (compiled from
//! `cuda/include/sdsparse_index.h` by `tests/kernel_index`) runs on it in `tests/ptx_emulation.rs`.
//!
//! Sources, cited by section:
//! - [SPS] 9.7.14.6.1 Sparse matrix storage: selector 0 = threads T0,T1 of each quad, 1 = T2,T3
//!   (m16n8k32 f16); for `::ordered_metadata` only the nibbles 0b0100, 1000, 1001, 1100, 1101,
//!   1110 are meaningful, anything else is undefined behaviour.
//! - [SPF] 9.7.14.6.2.2 fragments of sparse mma.m16n8k32 .f16 (A formulas; B and the metadata
//!   figures 121/122, cross-checked with CUTLASS `ELayout_64x32`, Triton-XLA
//!   `SparseLocalLoadToLLVM` and the MLIR test `sparse-mma-2-4-f16.mlir`: the metadata register of
//!   lane 4g + 2sel + h holds row g in bits [15:0], row g+8 in [31:16], columns 16h..16h+15 of
//!   the k32 step, 2-bit indices little-endian).
//! - [M16] 9.7.14.5.8 fragments of mma.m16n8k16 (f16 A, B; f32 C/D).
//! - [LDM] 9.7.14.5.15 ldmatrix: threads 8q..8q+7 address the rows of matrix q; thread l receives
//!   row l/4, elements 2(l%4) and +1 (`.trans`: column l/4, rows 2(l%4) and +1); 16 B aligned rows.
//! - [CPA] 9.7.9.25.3.1 cp.async: with src-size < cp-size the rest is zero-filled.
//! - [WSM] 9.7.15.5.1.2 wgmma shared-memory layout: K-major no-swizzle canonical layout
//!   ((8,m),(T,2k)):((1T,SBO),(1,LBO)); descriptor bits 0-13 start>>4, 16-29 LBO>>4, 32-45 SBO>>4,
//!   62-63 swizzle mode (0 = none).
//! - [WSP] 9.7.15.6 wgmma.mma_async.sp: warp w of the warpgroup supplies the metadata of rows
//!   16w..16w+15 in the mma.sp m16n8k32 layout (Fig. 176 = Fig. 122).
//! - [WAC] the wgmma m64nN f32 accumulator layout (9.7.15.5.1.1 figure; CUTLASS `CLayout_64xN`).
//! - [TMB] 5.5.3 tensor tiles: tile mode, no interleave, no swizzle: the box lands row-major,
//!   out-of-bound elements are zero filled.
//!
//! Not modelled: concurrency (barriers, mbarrier phases, async-proxy fences, completion), timing,
//! the hardware's f32 accumulation order. Undefined behaviour that is modelled (reads of shared
//! memory never written, invalid metadata nibbles, misaligned addresses) is recorded in
//! [`Emu::ub`], and the tests require it to stay empty.

#![allow(dead_code)]

use half::f16;

/// One lane's four registers of f16 pairs (A or B fragment) as f32 values.
pub type Frag = [[(f32, f32); 4]; 32];
/// One lane's four f32 accumulators, per lane of a warp.
pub type Acc = [[f32; 4]; 32];

pub fn zero_acc() -> Acc {
    [[0.0; 4]; 32]
}

pub fn h2f(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}
pub fn f2h(v: f32) -> u16 {
    f16::from_f32(v).to_bits()
}

/// Shared memory (16-bit cells, `None` = never written) plus the record of undefined behaviour.
pub struct Emu {
    cells: Vec<Option<u16>>,
    pub ub: Vec<String>,
}

impl Emu {
    pub fn new(bytes: usize) -> Emu {
        Emu { cells: vec![None; bytes / 2], ub: Vec::new() }
    }
    fn note(&mut self, what: String) {
        if self.ub.len() < 64 {
            self.ub.push(what);
        }
    }
    pub fn w16(&mut self, addr: usize, bits: u16) {
        assert!(addr.is_multiple_of(2) && addr / 2 < self.cells.len(), "smem write out of range: {addr}");
        self.cells[addr / 2] = Some(bits);
    }
    pub fn r16(&mut self, addr: usize, what: &str) -> u16 {
        assert!(
            addr.is_multiple_of(2) && addr / 2 < self.cells.len(),
            "smem read out of range: {addr} ({what})"
        );
        match self.cells[addr / 2] {
            Some(v) => v,
            None => {
                self.note(format!("{what}: read of never-written shared memory at byte {addr}"));
                0
            }
        }
    }
    pub fn w32(&mut self, addr: usize, v: u32) {
        self.w16(addr, v as u16);
        self.w16(addr + 2, (v >> 16) as u16);
    }
    pub fn r32(&mut self, addr: usize, what: &str) -> u32 {
        assert!(addr.is_multiple_of(4), "misaligned 32-bit shared load at {addr}");
        u32::from(self.r16(addr, what)) | (u32::from(self.r16(addr + 2, what)) << 16)
    }
    pub fn rf(&mut self, addr: usize, what: &str) -> f32 {
        h2f(self.r16(addr, what))
    }
}

/// cp.async.cg 16 B [CPA]: `src = None` is src-size 0, which zero-fills the destination.
pub fn cp_async16(emu: &mut Emu, dst: usize, src: Option<&[u16]>) {
    if !dst.is_multiple_of(16) {
        emu.note(format!("cp.async destination {dst} not 16 B aligned"));
    }
    for j in 0..8 {
        let v = src.map_or(0, |s| s[j]);
        emu.w16(dst + 2 * j, v);
    }
}

/// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16 [LDM]: `addrs[l]` is lane l's row address.
pub fn ldmatrix_x4(emu: &mut Emu, addrs: &[usize; 32], trans: bool, what: &str) -> Frag {
    let mut out = [[(0.0, 0.0); 4]; 32];
    for q in 0..4 {
        let mut m = [[0f32; 8]; 8];
        for (i, row) in m.iter_mut().enumerate() {
            let a = addrs[8 * q + i];
            if !a.is_multiple_of(16) {
                emu.note(format!("{what}: ldmatrix row address {a} not 16 B aligned"));
            }
            for (j, v) in row.iter_mut().enumerate() {
                *v = emu.rf(a + 2 * j, what);
            }
        }
        for (l, o) in out.iter_mut().enumerate() {
            o[q] = if trans {
                let (r, c) = (2 * (l % 4), l / 4);
                (m[r][c], m[r + 1][c])
            } else {
                let (r, c) = (l / 4, 2 * (l % 4));
                (m[r][c], m[r][c + 1])
            };
        }
    }
    out
}

/// The 16x16 matrix of an A fragment of m16n8k16 [M16], also the compressed A of m16n8k32 [SPF]:
/// register i of lane (g, tq) holds (row g + 8(i%2), columns 2tq + 8(i/2), +1).
fn a_matrix(a: &Frag) -> [[f32; 16]; 16] {
    let mut m = [[0f32; 16]; 16];
    for (l, regs) in a.iter().enumerate() {
        let (g, tq) = (l / 4, l % 4);
        for (i, &(lo, hi)) in regs.iter().enumerate() {
            let (r, c) = (g + 8 * (i % 2), 2 * tq + 8 * (i / 2));
            m[r][c] = lo;
            m[r][c + 1] = hi;
        }
    }
    m
}

/// The meaningful `::ordered_metadata` nibbles [SPS].
pub fn ordered_nibble_ok(nib: u32) -> bool {
    matches!(nib, 0b0100 | 0b1000 | 0b1001 | 0b1100 | 0b1101 | 0b1110)
}

/// Expands a compressed 16x16 A to the logical 16x32 with the metadata of one warp [SPF][SPS].
fn sparse_rows(
    emu: &mut Emu,
    ac: &[[f32; 16]; 16],
    meta: &[u32; 32],
    sel: u32,
    what: &str,
) -> [[f32; 32]; 16] {
    let mut al = [[0f32; 32]; 16];
    for (r, row) in al.iter_mut().enumerate() {
        for grp in 0..8 {
            let lane = 4 * (r % 8) + 2 * sel as usize + grp / 4;
            let nib = (meta[lane] >> (16 * (r / 8) + 4 * (grp % 4))) & 0xF;
            if !ordered_nibble_ok(nib) {
                emu.note(format!("{what}: metadata nibble {nib:#06b} (row {r}, group {grp}) is undefined for ordered_metadata"));
            }
            let (i0, i1) = ((nib & 3) as usize, ((nib >> 2) & 3) as usize);
            row[4 * grp + i0] += ac[r][2 * grp];
            row[4 * grp + i1] += ac[r][2 * grp + 1];
        }
    }
    al
}

/// mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 [SPF][SPS].
pub fn mma_sp_16832(emu: &mut Emu, a: &Frag, b: &Frag, c: &mut Acc, meta: &[u32; 32], sel: u32, what: &str) {
    let ac = a_matrix(a);
    let mut bm = [[0f32; 8]; 32];
    for (l, regs) in b.iter().enumerate() {
        let (g, tq) = (l / 4, l % 4);
        for (i, &(lo, hi)) in regs.iter().enumerate() {
            let k = 2 * tq + 8 * i;
            bm[k][g] = lo;
            bm[k + 1][g] = hi;
        }
    }
    let al = sparse_rows(emu, &ac, meta, sel, what);
    for (l, d) in c.iter_mut().enumerate() {
        let (g, tq) = (l / 4, l % 4);
        for (q, dq) in d.iter_mut().enumerate() {
            let (r, n) = (g + 8 * (q / 2), 2 * tq + q % 2);
            *dq += (0..32).map(|k| al[r][k] * bm[k][n]).sum::<f32>();
        }
    }
}

/// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 [M16]: B is (b0, b1) per lane.
pub fn mma_16816(a: &Frag, b0: &[(f32, f32); 32], b1: &[(f32, f32); 32], c: &mut Acc) {
    let am = a_matrix(a);
    let mut bm = [[0f32; 8]; 16];
    for l in 0..32 {
        let (g, tq) = (l / 4, l % 4);
        bm[2 * tq][g] = b0[l].0;
        bm[2 * tq + 1][g] = b0[l].1;
        bm[2 * tq + 8][g] = b1[l].0;
        bm[2 * tq + 9][g] = b1[l].1;
    }
    for (l, d) in c.iter_mut().enumerate() {
        let (g, tq) = (l / 4, l % 4);
        for (q, dq) in d.iter_mut().enumerate() {
            let (r, n) = (g + 8 * (q / 2), 2 * tq + q % 2);
            *dq += (0..16).map(|k| am[r][k] * bm[k][n]).sum::<f32>();
        }
    }
}

/// Register `q` of every lane of an ldmatrix result.
pub fn reg(f: &Frag, q: usize) -> [(f32, f32); 32] {
    std::array::from_fn(|l| f[l][q])
}

/// The fields of a wgmma shared-memory descriptor [WSM]: (start, LBO, SBO) in bytes, swizzle mode.
pub fn desc_decode(desc: u64) -> (usize, usize, usize, u64) {
    let start = ((desc & 0x3FFF) << 4) as usize;
    let lbo = (((desc >> 16) & 0x3FFF) << 4) as usize;
    let sbo = (((desc >> 32) & 0x3FFF) << 4) as usize;
    (start, lbo, sbo, (desc >> 62) & 3)
}

/// Byte address of 16-bit element (row r, k) of a K-major no-swizzle operand [WSM].
pub fn kmajor_addr(desc: u64, r: usize, k: usize) -> usize {
    let (start, lbo, sbo, mode) = desc_decode(desc);
    assert_eq!(mode, 0, "only the no-swizzle layout is modelled");
    start + (r % 8) * 16 + (r / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo
}

/// Thread t (0..127), accumulator v -> (m, n) of a wgmma m64nN f32 result [WAC].
pub fn wgmma_d_coord(t: usize, v: usize) -> (usize, usize) {
    let m = (t / 4) % 8 + 16 * (t / 32) + 8 * ((v / 2) % 2);
    let n = 2 * (t % 4) + v % 2 + 8 * (v / 4);
    (m, n)
}

/// Dense wgmma.mma_async m64nNk16 f16 -> f32, both operands K-major from descriptors:
/// `d[t][v] += sum_k A[m][k] B[n][k]`.
pub fn wgmma_dense(emu: &mut Emu, d: &mut [Vec<f32>], desc_a: u64, desc_b: u64, n: usize) {
    let a: Vec<[f32; 16]> =
        (0..64).map(|r| std::array::from_fn(|k| emu.rf(kmajor_addr(desc_a, r, k), "wgmma A"))).collect();
    let b: Vec<[f32; 16]> =
        (0..n).map(|c| std::array::from_fn(|k| emu.rf(kmajor_addr(desc_b, c, k), "wgmma B"))).collect();
    for (t, dt) in d.iter_mut().enumerate() {
        for (v, dv) in dt.iter_mut().enumerate().take(n / 2) {
            let (m, c) = wgmma_d_coord(t, v);
            *dv += (0..16).map(|k| a[m][k] * b[c][k]).sum::<f32>();
        }
    }
}

/// Sparse wgmma.mma_async.sp m64nNk32 f16 -> f32 [WSP]: A is the compressed 64x16 from its
/// descriptor, `meta[t]` the metadata register of thread t, `sel` the sparsity selector.
pub fn wgmma_sparse_k32(
    emu: &mut Emu,
    d: &mut [Vec<f32>],
    desc_a: u64,
    desc_b: u64,
    meta: &[u32; 128],
    sel: u32,
    n: usize,
) {
    let mut al = Vec::with_capacity(64);
    for w in 0..4 {
        let ac: [[f32; 16]; 16] = std::array::from_fn(|r| {
            std::array::from_fn(|k| emu.rf(kmajor_addr(desc_a, 16 * w + r, k), "wgmma.sp A"))
        });
        let mw: [u32; 32] = std::array::from_fn(|l| meta[32 * w + l]);
        al.extend(sparse_rows(emu, &ac, &mw, sel, "wgmma.sp"));
    }
    let b: Vec<[f32; 32]> =
        (0..n).map(|c| std::array::from_fn(|k| emu.rf(kmajor_addr(desc_b, c, k), "wgmma.sp B"))).collect();
    for (t, dt) in d.iter_mut().enumerate() {
        for (v, dv) in dt.iter_mut().enumerate().take(n / 2) {
            let (m, c) = wgmma_d_coord(t, v);
            *dv += (0..32).map(|k| al[m][k] * b[c][k]).sum::<f32>();
        }
    }
}

/// cp.async.bulk.tensor.2d tile mode, no swizzle/interleave [TMB]: box (`box_c` x `box_r`) at
/// element coordinates (c0 column, c1 row) of a row-major `rows x cols` tensor with row stride
/// `stride`, written row-major to `dst`; out-of-bound elements are zero.
#[allow(clippy::too_many_arguments)]
pub fn tma_box_2d(
    emu: &mut Emu,
    dst: usize,
    gmem: &[u16],
    (cols, rows, stride): (usize, usize, usize),
    c0: usize,
    c1: usize,
    box_c: usize,
    box_r: usize,
) {
    if !dst.is_multiple_of(128) {
        emu.note(format!("TMA destination {dst} not 128 B aligned"));
    }
    for r in 0..box_r {
        for j in 0..box_c {
            let (gc, gr) = (c0 + j, c1 + r);
            let v = if gc < cols && gr < rows { gmem[gr * stride + gc] } else { 0 };
            emu.w16(dst + (r * box_c + j) * 2, v);
        }
    }
}
