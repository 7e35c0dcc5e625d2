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
        let ok = self.n_pad.is_multiple_of(ROW_PAD)
            && self.k_pad.is_multiple_of(META_BLOCK_K)
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
    if !k.is_multiple_of(4) || dense.len() != n * k {
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

// ---------------------------------------------------------------------------------------
// Launch parameters, dispatch and launchers
// ---------------------------------------------------------------------------------------

use cudarc::driver::{result as cu, sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use std::ffi::{c_void, CString};
use std::sync::Arc;

pub use super::params::Sp24GemmParams;

/// `SP24_FLAG_GELU` of the header.
pub const FLAG_GELU: u32 = 1;
/// `SP24_FLAG_GEGLU` of the header.
pub const FLAG_GEGLU: u32 = 2;
/// Rows per value (or gate) group of the GEGLU row interleave (`SP24_GEGLU_GROUP`).
pub const GEGLU_GROUP: usize = 64;

/// The row order of [`geglu_interleave`] for a GEGLU projection of `n` rows (`n % 128 == 0`):
/// device row `r` holds canonical row `order[r]`.
pub fn geglu_row_order(n: usize) -> Vec<usize> {
    (0..n)
        .map(|r| {
            let (block, j) = (r / (2 * GEGLU_GROUP), r % (2 * GEGLU_GROUP));
            if j < GEGLU_GROUP {
                block * GEGLU_GROUP + j // value row
            } else {
                n / 2 + block * GEGLU_GROUP + j - GEGLU_GROUP // its gate row
            }
        })
        .collect()
}

/// Reorders a GEGLU projection (`[2H, K]`: value rows, then gate rows) for the fused GEGLU
/// epilogue: device row block `b` of 128 holds value rows `64b ..` then gate rows
/// `H + 64b ..` (the bias, if any, is reordered the same way). Done once at load; needs
/// `H % 64 == 0` (SD2: H = 4C).
pub fn geglu_interleave(
    w: &Sparse24Weight,
    bias: Option<&[f32]>,
) -> Result<(Sparse24Weight, Option<Vec<f32>>)> {
    use crate::format::HostData as H;
    let (n, k) = (w.rows, w.cols);
    if n % (2 * GEGLU_GROUP) != 0 || bias.is_some_and(|b| b.len() != n) {
        return Err(Error::Shape(format!("GEGLU interleave: {n} rows must be a multiple of 128 (bias {n})")));
    }
    let order = geglu_row_order(n);
    fn gather<T: Copy>(v: &[T], order: &[usize], row: usize) -> Vec<T> {
        order.iter().flat_map(|&r| v[r * row..(r + 1) * row].iter().copied()).collect()
    }
    let vr = k / 2;
    let values = match &w.values {
        H::F32(v) => H::F32(gather(v, &order, vr)),
        H::F16(v) => H::F16(gather(v, &order, vr)),
        H::BF16(v) => H::BF16(gather(v, &order, vr)),
    };
    let meta = gather(&w.meta, &order, sparse24_meta_row_bytes(k));
    let bias = bias.map(|b| order.iter().map(|&r| b[r]).collect());
    Ok((Sparse24Weight { rows: n, cols: k, values, meta }, bias))
}

/// The kernel variants (variant 0, cuBLAS dense, is launched by the benches directly).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sp24Variant {
    /// 1: `mma.sp` with fragments straight from global memory (the simple oracle).
    Direct,
    /// 2: cp.async pipeline + ldmatrix + `mma.sp`, 128 weight rows x `tokens` per block.
    Pipe { tokens: u32 },
    /// 3: sm_90a TMA + mbarrier + `wgmma.mma_async.sp`, 128 x 128 per block.
    Wgmma,
}

impl Sp24Variant {
    /// Every variant a device of compute capability `cc` can run (tests cover them all): none
    /// below sm_80, where mma.sp does not exist (the kernels are traps there).
    pub fn all_for(cc: (i32, i32)) -> Vec<Sp24Variant> {
        if cc < (8, 0) {
            return Vec::new();
        }
        let mut v = vec![
            Sp24Variant::Direct,
            Sp24Variant::Pipe { tokens: 32 },
            Sp24Variant::Pipe { tokens: 64 },
            Sp24Variant::Pipe { tokens: 128 },
        ];
        if cc == (9, 0) {
            v.push(Sp24Variant::Wgmma);
        }
        v
    }
    pub fn name(&self) -> String {
        match self {
            Sp24Variant::Direct => "v1_direct".into(),
            Sp24Variant::Pipe { tokens } => format!("v2_pipe_bt{tokens}"),
            Sp24Variant::Wgmma => "v3_wgmma".into(),
        }
    }
}

/// Picks variant and tile for a problem. PROVISIONAL: written from the tile shapes (fill the
/// SMs with blocks, Hopper takes `wgmma.sp` once a 128-token tile is mostly used), not yet
/// tuned on a GPU; `benches/gemm_sparse24.rs` measures every variant so the table can be
/// replaced by measured winners per (arch, M, N, K).
pub fn choose_variant(cc: (i32, i32), sm_count: usize, m: usize, n: usize, _k: usize) -> Sp24Variant {
    if cc == (9, 0) && m >= 96 {
        return Sp24Variant::Wgmma;
    }
    let row_blocks = n.div_ceil(128);
    // Largest token tile that still gives every SM a block; small M gets the 32 tile.
    for tokens in [128u32, 64] {
        let blocks = row_blocks * m.div_ceil(tokens as usize);
        if m > tokens as usize / 2 && blocks >= sm_count {
            return Sp24Variant::Pipe { tokens };
        }
    }
    Sp24Variant::Pipe { tokens: 32 }
}

/// Dynamic shared memory of the pipelined variants (asserted equal in the .cu file).
fn pipe_smem_bytes(tokens: u32) -> u32 {
    match tokens {
        128 => 76800,
        64 => 52224,
        _ => 39936,
    }
}
const WGMMA_SMEM_BYTES: u32 = 98368;

/// A packed 2:4 weight on the GPU (f16 values as raw `u16`).
pub struct Sparse24Gpu {
    pub n: usize,
    pub k: usize,
    pub n_pad: usize,
    pub k_pad: usize,
    pub values: CudaSlice<u16>,
    pub meta: CudaSlice<u32>,
}

impl Sparse24Gpu {
    /// Uploads a packed weight (once, at load).
    pub fn upload(stream: &Arc<CudaStream>, p: &Sparse24Packed) -> Result<Sparse24Gpu> {
        p.validate()?;
        let raw: &[u16] = bytemuck::cast_slice(&p.values);
        let values = stream.clone_htod(raw).map_err(cuda_err)?;
        let meta = stream.clone_htod(&p.meta).map_err(cuda_err)?;
        Ok(Sparse24Gpu { n: p.n, k: p.k, n_pad: p.n_pad, k_pad: p.k_pad, values, meta })
    }
}

/// Optional fused epilogue operands: `y = act(acc + bias) + residual`.
#[derive(Default)]
pub struct Sp24Epilogue<'a> {
    /// f32 `[n]` (in device row order, see [`geglu_interleave`]).
    pub bias: Option<&'a CudaSlice<f32>>,
    /// f16 `[m, n_out]` (row stride n_out), added after the activation.
    pub residual: Option<&'a CudaSlice<u16>>,
    pub gelu: bool,
    /// Fused GEGLU on a weight reordered by [`geglu_interleave`]: `n_out = n / 2`.
    pub geglu: bool,
}

fn cuda_err(e: impl std::fmt::Debug) -> Error {
    Error::Cuda(format!("{e:?}"))
}

/// The 2:4 GEMM kernels of one context, loaded from a fatbin that contains
/// `cuda/sparse24_gemm.cu` (the crate's embedded fatbin or `tools/build_sp24_fatbin.sh`'s).
pub struct Sp24Kernels {
    ctx: Arc<CudaContext>,
    module: sys::CUmodule,
    direct: sys::CUfunction,
    pipe32: sys::CUfunction,
    pipe64: sys::CUfunction,
    pipe128: sys::CUfunction,
    wgmma: sys::CUfunction,
    cc: (i32, i32),
    sm_count: usize,
}

// SAFETY: the module and function handles are context-level driver objects that any thread may
// use once the context is current (`load` and every launch bind it); nothing here is mutated
// after `load`. Needed to share one loaded module among the layers of a model.
unsafe impl Send for Sp24Kernels {}
unsafe impl Sync for Sp24Kernels {}

impl Drop for Sp24Kernels {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: the module was loaded by `load` and no function outlives `self`.
            let _ = unsafe { cu::module::unload(self.module) };
        }
    }
}

impl Sp24Kernels {
    /// Loads the kernels from fatbin bytes and opts the big-tile ones into > 48 KiB of
    /// dynamic shared memory.
    pub fn load(ctx: &Arc<CudaContext>, fatbin: &[u8]) -> Result<Sp24Kernels> {
        ctx.bind_to_thread().map_err(cuda_err)?;
        // cuModuleLoadData reads the image in place; keep a NUL-terminated aligned copy.
        let mut image: Vec<u64> = vec![0; fatbin.len().div_ceil(8) + 1];
        bytemuck::cast_slice_mut::<u64, u8>(&mut image)[..fatbin.len()].copy_from_slice(fatbin);
        // SAFETY: `image` is a complete fatbin that lives across the call.
        let module = unsafe { cu::module::load_data(image.as_ptr() as *const c_void) }.map_err(cuda_err)?;
        let get = |name: &str| -> Result<sys::CUfunction> {
            let c = CString::new(name).map_err(cuda_err)?;
            // SAFETY: `module` is loaded; the name is NUL-terminated.
            unsafe { cu::module::get_function(module, c) }
                .map_err(|e| Error::Cuda(format!("kernel {name} not in the fatbin: {e:?}")))
        };
        let kernels = Sp24Kernels {
            ctx: ctx.clone(),
            module,
            direct: get("sdsparse_sp24_v1_direct")?,
            pipe32: get("sdsparse_sp24_v2_pipe_bt32")?,
            pipe64: get("sdsparse_sp24_v2_pipe_bt64")?,
            pipe128: get("sdsparse_sp24_v2_pipe_bt128")?,
            wgmma: get("sdsparse_sp24_v3_wgmma")?,
            cc: ctx.compute_capability().map_err(cuda_err)?,
            sm_count: ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(cuda_err)? as usize,
        };
        let attr = sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
        for (f, bytes) in [
            (kernels.pipe32, pipe_smem_bytes(32)),
            (kernels.pipe64, pipe_smem_bytes(64)),
            (kernels.pipe128, pipe_smem_bytes(128)),
            (kernels.wgmma, WGMMA_SMEM_BYTES),
        ] {
            // SAFETY: valid function handle of the bound context.
            unsafe { cu::function::set_function_attribute(f, attr, bytes as i32) }.map_err(cuda_err)?;
        }
        Ok(kernels)
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// The dispatcher's choice for this device (see [`choose_variant`]).
    pub fn choose(&self, m: usize, n: usize, k: usize) -> Sp24Variant {
        choose_variant(self.cc, self.sm_count, m, n, k)
    }

    /// `y[m, n] = x[m, k] · W^T (+ bias) (gelu) (+ residual)`, f16 as raw `u16`, row
    /// strides k (x) and n (y, residual), on `stream`. Sizes are checked here, so a bad
    /// call is an error, never an out-of-bounds kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        stream: &Arc<CudaStream>,
        variant: Sp24Variant,
        x: &CudaSlice<u16>,
        m: usize,
        w: &Sparse24Gpu,
        epi: &Sp24Epilogue,
        y: &mut CudaSlice<u16>,
    ) -> Result<()> {
        let (n, k) = (w.n, w.k);
        if m == 0 || k % 8 != 0 {
            return Err(Error::Invalid(format!("2:4 GEMM needs M >= 1 and K % 8 == 0 (M {m}, K {k})")));
        }
        if x.len() < m * k {
            return Err(Error::Shape(format!(
                "2:4 GEMM [{m}, {k}] x [{n}, {k}]^T: x has {} elements",
                x.len()
            )));
        }
        let n_out = if epi.geglu { n / 2 } else { n };
        if epi.geglu && (n % (2 * GEGLU_GROUP) != 0 || epi.gelu || variant == Sp24Variant::Direct) {
            return Err(Error::Invalid(format!(
                "fused GEGLU needs N % 128 == 0 ({n}), no separate GELU and a 128-row tile variant (not {})",
                variant.name()
            )));
        }
        if y.len() < m * n_out {
            return Err(Error::Shape(format!("2:4 GEMM: y has {} elements, needs {}", y.len(), m * n_out)));
        }
        if epi.bias.is_some_and(|b| b.len() < n) || epi.residual.is_some_and(|r| r.len() < m * n_out) {
            return Err(Error::Shape(format!(
                "2:4 GEMM epilogue: bias needs {n}, residual {} elements",
                m * n_out
            )));
        }
        if self.cc < (8, 0) {
            return Err(Error::Invalid(format!(
                "the 2:4 kernels need sm_80 (mma.sp), device is sm_{}{}",
                self.cc.0, self.cc.1
            )));
        }
        if variant == Sp24Variant::Wgmma && self.cc != (9, 0) {
            return Err(Error::Invalid(format!(
                "the wgmma.sp variant needs sm_90a, device is sm_{}{}",
                self.cc.0, self.cc.1
            )));
        }
        if m > i32::MAX as usize || w.n_pad * w.k_pad > i32::MAX as usize {
            return Err(Error::Invalid("2:4 GEMM sizes overflow i32".into()));
        }
        self.ctx.bind_to_thread().map_err(cuda_err)?;
        let (x_ptr, _gx) = x.device_ptr(stream);
        let (wv_ptr, _gw) = w.values.device_ptr(stream);
        let (wm_ptr, _gm) = w.meta.device_ptr(stream);
        let bias = epi.bias.map(|b| b.device_ptr(stream));
        let res = epi.residual.map(|r| r.device_ptr(stream));
        let (y_ptr, _gy) = y.device_ptr_mut(stream);
        let mut params = Sp24GemmParams {
            x: x_ptr,
            w_values: wv_ptr,
            w_meta: wm_ptr,
            bias: bias.as_ref().map_or(0, |b| b.0),
            residual: res.as_ref().map_or(0, |r| r.0),
            y: y_ptr,
            m: m as i32,
            n: n as i32,
            k: k as i32,
            n_pad: w.n_pad as i32,
            k_pad: w.k_pad as i32,
            ldx: k as i32,
            ldy: n_out as i32,
            ldr: n_out as i32,
            flags: if epi.gelu { FLAG_GELU } else { 0 } | if epi.geglu { FLAG_GEGLU } else { 0 },
            reserved: 0,
        };
        let cu_stream = stream.cu_stream();
        let pp = &mut params as *mut Sp24GemmParams as *mut c_void;
        // SAFETY (all launches): the argument lists match the kernels' signatures, every
        // pointer is a live allocation of the checked size, and the guards above keep the
        // buffers alive and ordered on `stream` until after the launch is enqueued.
        let launched = match variant {
            Sp24Variant::Direct => {
                let grid = ((w.n_pad / 64) as u32, m.div_ceil(8) as u32, 1);
                unsafe { cu::launch_kernel(self.direct, grid, (128, 1, 1), 0, cu_stream, &mut [pp]) }
            }
            Sp24Variant::Pipe { tokens } => {
                let f = match tokens {
                    32 => self.pipe32,
                    64 => self.pipe64,
                    128 => self.pipe128,
                    _ => {
                        return Err(Error::Invalid(format!(
                            "no 2:4 pipeline kernel for a {tokens}-token tile"
                        )))
                    }
                };
                let grid = (n.div_ceil(128) as u32, m.div_ceil(tokens as usize) as u32, 1);
                unsafe {
                    cu::launch_kernel(f, grid, (256, 1, 1), pipe_smem_bytes(tokens), cu_stream, &mut [pp])
                }
            }
            Sp24Variant::Wgmma => {
                let mut tmap_w = tensor_map_2d(wv_ptr, w.k_pad / 2, w.n_pad, w.k_pad)?;
                let mut tmap_x = tensor_map_2d(x_ptr, k, m, 2 * k)?;
                let grid = (n.div_ceil(128) as u32, m.div_ceil(128) as u32, 1);
                let args = &mut [
                    &mut tmap_w as *mut sys::CUtensorMap as *mut c_void,
                    &mut tmap_x as *mut sys::CUtensorMap as *mut c_void,
                    pp,
                ];
                unsafe { cu::launch_kernel(self.wgmma, grid, (384, 1, 1), WGMMA_SMEM_BYTES, cu_stream, args) }
            }
        };
        launched.map_err(|e| Error::Cuda(format!("launch of 2:4 GEMM {}: {e:?}", variant.name())))
    }
}

/// A 2-D TMA descriptor over a row-major f16 matrix `[rows][cols]` (row stride in bytes),
/// box 8 columns x 128 rows, no swizzle, zero fill out of range (matches the wgmma kernel).
fn tensor_map_2d(ptr: u64, cols: usize, rows: usize, row_stride_bytes: usize) -> Result<sys::CUtensorMap> {
    let mut map = std::mem::MaybeUninit::<sys::CUtensorMap>::zeroed();
    let dims: [u64; 2] = [cols as u64, rows as u64];
    let strides: [u64; 1] = [row_stride_bytes as u64];
    let boxes: [u32; 2] = [8, 128];
    let elem: [u32; 2] = [1, 1];
    // SAFETY: all arrays have tensorRank (2) or rank - 1 entries and outlive the call.
    unsafe {
        sys::cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
            2,
            ptr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_NONE,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .map_err(|e| Error::Cuda(format!("cuTensorMapEncodeTiled [{rows}, {cols}]: {e:?}")))?;
        Ok(map.assume_init())
    }
}
