//! 2:4 sparse GEMM on sparse tensor cores: the device layout of a 2:4 weight, its CPU
//! decode (so the packing is tested without a GPU), the dispatch table and the launchers
//! of the kernels in `cuda/sparse24_gemm.cu`.
//!
//! The GEMM is `Y[M,N] = X[M,K] · W[N,K]^T (+ bias) (+ GELU) (+ residual)` with X, Y f16,
//! W pruned 2:4 along K and f32 accumulation. The sparse operand of `mma.sp` / `wgmma.sp`
//! is A, so the kernels compute `Y^T = W · X^T`: W rows are the MMA's M dimension and the
//! tokens (rows of X) its N dimension.
//!
//! Device layout ([`Sparse24Packed`]), built once at load from the canonical layout of
//! `format::Sparse24Weight`:
//! - `values[n_pad, k_pad/2]` f16: the canonical kept values, zero padded. The A fragment
//!   of `mma.sp.m16n8k32` over these compressed rows is the dense m16n8k16 fragment, so the
//!   values need no reordering (only padding to whole tiles).
//! - `meta[n_pad/16][k_pad/64][32]` u32: the 4-bit group nibbles regrouped so that lane
//!   `l` of a warp loads word `l` of a (16-row, 64-column) block and passes it unchanged to
//!   two `mma.sp` instructions: sparsity selector 0 for columns 0..32 and 1 for 32..64.
//!   Per the PTX ISA (sparse m16n8k32 f16 metadata figure, reused by `wgmma.sp` m64nNk32),
//!   with selector `s` the lanes `4g + 2s + h` (g = 0..8, h = 0..2) supply the metadata:
//!   bits `[15:0]` hold row `g`, bits `[31:16]` row `g + 8`, columns `16h .. 16h + 16` of
//!   the 32-column step, 4 bits per group of 4 (low group lowest), each nibble
//!   `idx0 | idx1 << 2` with `idx0 < idx1` as `::ordered_metadata` requires.
//!
//! Padding: `k_pad` = K rounded up to 64 (one metadata block), `n_pad` = N rounded up to
//! 64 (one `wgmma` M tile). Padded groups carry zero values and the valid nibble `0b0100`.

use crate::error::{Error, Result};
use crate::format::{sparse24_meta_row_bytes, Sparse24Weight};
use half::f16;

/// Logical K columns covered by one metadata word block (two m16n8k32 steps).
pub const META_BLOCK_K: usize = 64;
/// Weight rows covered by one metadata word block (one m16 tile).
pub const META_BLOCK_ROWS: usize = 16;
/// Row padding of the device layout (the M of one `wgmma` instruction).
pub const ROW_PAD: usize = 64;
/// Nibble stored for padded groups: kept positions 0 and 1 (values are zero).
const PAD_NIBBLE: u32 = 0b0100;

/// A 2:4 weight in the layout the sparse tensor-core kernels read (module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Sparse24Packed {
    /// Logical rows (out features, N of the GEMM).
    pub n: usize,
    /// Logical columns (in features, K of the GEMM).
    pub k: usize,
    pub n_pad: usize,
    pub k_pad: usize,
    /// `n_pad * k_pad / 2` kept values, row-major.
    pub values: Vec<f16>,
    /// `(n_pad / 16) * (k_pad / 64) * 32` metadata words.
    pub meta: Vec<u32>,
}

/// Where the nibble of group `group` (columns `4 * group .. 4 * group + 4`) of weight row
/// `row` sits in the device metadata: `(word index, bit shift)`.
pub fn meta_position(row: usize, group: usize, k_pad: usize) -> (usize, u32) {
    let row_block = row / META_BLOCK_ROWS; // which 16-row m16 tile
    let r = row % META_BLOCK_ROWS;
    let g = r % 8; // mma groupID whose lanes hold rows g and g + 8
    let upper = r / 8; // row g + 8 lives in bits [31:16]
    let k_block = group / (META_BLOCK_K / 4); // which 64-column block (16 groups)
    let gi = group % (META_BLOCK_K / 4); // group inside the block
    let step = gi / 8; // k32 step: sparsity selector 0 or 1
    let half = (gi % 8) / 4; // columns 0..16 or 16..32 of the step
    let j = gi % 4; // group inside those 16 columns
    let lane = 4 * g + 2 * step + half;
    let blocks_per_row = k_pad / META_BLOCK_K;
    let word = (row_block * blocks_per_row + k_block) * 32 + lane;
    (word, (16 * upper + 4 * j) as u32)
}

/// Checks a nibble of the canonical format: two distinct positions, ascending.
fn nibble_is_valid(nib: u8) -> bool {
    let (i0, i1) = (nib & 3, (nib >> 2) & 3);
    i0 < i1
}

impl Sparse24Packed {
    /// Builds the device layout from the canonical on-disk layout (done once at load).
    pub fn pack(w: &Sparse24Weight) -> Result<Sparse24Packed> {
        let (n, k) = (w.rows, w.cols);
        if n == 0 || k == 0 || k % 4 != 0 {
            return Err(Error::Format(format!("2:4 weight [{n}, {k}]: needs N, K > 0 and K % 4 == 0")));
        }
        if w.values.len() != n * k / 2 {
            return Err(Error::Format(format!(
                "2:4 weight [{n}, {k}]: {} values, expected {}",
                w.values.len(),
                n * k / 2
            )));
        }
        let meta_row = sparse24_meta_row_bytes(k);
        if w.meta.len() != n * meta_row {
            return Err(Error::Format(format!(
                "2:4 weight [{n}, {k}]: {} metadata bytes, expected {}",
                w.meta.len(),
                n * meta_row
            )));
        }
        let n_pad = n.div_ceil(ROW_PAD) * ROW_PAD;
        let k_pad = k.div_ceil(META_BLOCK_K) * META_BLOCK_K;
        let src = w.values.to_f32();
        let mut values = vec![f16::ZERO; n_pad * k_pad / 2];
        for r in 0..n {
            for c in 0..k / 2 {
                values[r * k_pad / 2 + c] = f16::from_f32(src[r * k / 2 + c]);
            }
        }
        let groups_pad = k_pad / 4;
        let mut meta = vec![0u32; (n_pad / META_BLOCK_ROWS) * (k_pad / META_BLOCK_K) * 32];
        for r in 0..n_pad {
            for g in 0..groups_pad {
                let nib = if r < n && g < k / 4 {
                    let byte = w.meta[r * meta_row + g / 2];
                    let nib = if g % 2 == 0 { byte & 0xf } else { byte >> 4 };
                    if !nibble_is_valid(nib) {
                        return Err(Error::Format(format!(
                            "2:4 weight [{n}, {k}]: row {r} group {g} has invalid metadata nibble {nib:#06b}"
                        )));
                    }
                    u32::from(nib)
                } else {
                    PAD_NIBBLE
                };
                let (word, shift) = meta_position(r, g, k_pad);
                meta[word] |= nib << shift;
            }
        }
        Ok(Sparse24Packed { n, k, n_pad, k_pad, values, meta })
    }

    /// Decodes the device layout back to the dense `[n, k]` weight (f32), reading only
    /// `values` and `meta` as the kernels do: the CPU check of the packing.
    pub fn decode_dense(&self) -> Vec<f32> {
        let mut dense = vec![0f32; self.n * self.k];
        for r in 0..self.n {
            for g in 0..self.k / 4 {
                let (word, shift) = meta_position(r, g, self.k_pad);
                let nib = (self.meta[word] >> shift) & 0xf;
                let (i0, i1) = ((nib & 3) as usize, ((nib >> 2) & 3) as usize);
                let base = r * self.k_pad / 2 + 2 * g;
                dense[r * self.k + 4 * g + i0] += self.values[base].to_f32();
                dense[r * self.k + 4 * g + i1] += self.values[base + 1].to_f32();
            }
        }
        dense
    }

    /// Checks the invariants the kernels rely on without reading the canonical weight:
    /// sizes, padding to whole blocks, every nibble ordered (`idx0 < idx1`).
    pub fn validate(&self) -> Result<()> {
        let ok = self.n_pad % ROW_PAD == 0
            && self.k_pad % META_BLOCK_K == 0
            && self.n <= self.n_pad
            && self.k <= self.k_pad
            && self.values.len() == self.n_pad * self.k_pad / 2
            && self.meta.len() == (self.n_pad / META_BLOCK_ROWS) * (self.k_pad / META_BLOCK_K) * 32;
        if !ok {
            return Err(Error::Format(format!(
                "packed 2:4 weight [{}, {}]: inconsistent sizes",
                self.n, self.k
            )));
        }
        for (i, w) in self.meta.iter().enumerate() {
            for s in 0..8 {
                if !nibble_is_valid(((w >> (4 * s)) & 0xf) as u8) {
                    return Err(Error::Format(format!(
                        "packed 2:4 weight: metadata word {i} nibble {s} invalid"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Prunes a dense row-major `[n, k]` matrix to 2:4 along k (keep the two largest
/// magnitudes of each group, ties to the lower index) in the canonical layout. Used by
/// tests and benches to make operands; the pruning pass of `convert` lives in `prune/`.
pub fn prune_dense_24(dense: &[f32], n: usize, k: usize) -> Result<Sparse24Weight> {
    if k % 4 != 0 || dense.len() != n * k {
        return Err(Error::Shape(format!(
            "prune 2:4: {} values for [{n}, {k}] (K % 4 must be 0)",
            dense.len()
        )));
    }
    let meta_row = sparse24_meta_row_bytes(k);
    let mut values = Vec::with_capacity(n * k / 2);
    let mut meta = vec![0u8; n * meta_row];
    for r in 0..n {
        for g in 0..k / 4 {
            let grp = &dense[r * k + 4 * g..r * k + 4 * g + 4];
            let mut order = [0usize, 1, 2, 3];
            // Stable sort by descending magnitude keeps the lower index on ties.
            order.sort_by(|&a, &b| grp[b].abs().total_cmp(&grp[a].abs()));
            let (i0, i1) = (order[0].min(order[1]), order[0].max(order[1]));
            values.push(f16::from_f32(grp[i0]));
            values.push(f16::from_f32(grp[i1]));
            let nib = (i0 | (i1 << 2)) as u8;
            meta[r * meta_row + g / 2] |= if g % 2 == 0 { nib } else { nib << 4 };
        }
    }
    Ok(Sparse24Weight { rows: n, cols: k, values: crate::format::HostData::F16(values), meta })
}

/// Dense equivalent of a canonical 2:4 weight (f32 `[rows, cols]`), straight from the
/// on-disk layout: the reference the device decode must match.
pub fn canonical_to_dense(w: &Sparse24Weight) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let meta_row = sparse24_meta_row_bytes(k);
    let vals = w.values.to_f32();
    let mut dense = vec![0f32; n * k];
    for r in 0..n {
        for g in 0..k / 4 {
            let byte = w.meta[r * meta_row + g / 2];
            let nib = if g % 2 == 0 { byte & 0xf } else { byte >> 4 };
            let (i0, i1) = ((nib & 3) as usize, ((nib >> 2) & 3) as usize);
            dense[r * k + 4 * g + i0] = vals[r * k / 2 + 2 * g];
            dense[r * k + 4 * g + i1] = vals[r * k / 2 + 2 * g + 1];
        }
    }
    dense
}
