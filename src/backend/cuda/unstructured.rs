//! Unstructured sparse weights on the GPU: the tiled bitmap layout built at load time from the
//! canonical [`BitmapWeight`], its CPU decode and byte accounting, the CPU reference GEMM, and
//! the launchers of `cuda/unstructured_gemm.cu`.
//!
//! Layout ("load as sparse, compute as dense", as in Flash-LLM / SpInfer; the C side is
//! documented in `cuda/include/sdsparse_unstructured_params.h`): `W[rows, cols]` is cut into
//! 64x64 tiles stored tile-row by tile-row (`tile = tn * tiles_k + tk`), each a 64-word `u64`
//! bitmap (word `r` = tile row `r`, bit `c` = tile column `c`) plus its kept values packed
//! row-major and padded to a multiple of 8 (16 bytes, for `cp.async`); `tile_offsets[tiles + 1]`
//! index the runs. The kernel streams a CTA's tiles along K and expands them in shared memory,
//! so global memory traffic for W is the compressed size: about `(1 - s) + 1/16` of dense f16
//! at sparsity `s` (0.71x at 35%, 0.59x at 47.5%; asserted by `tests/unstructured_gemm.rs`).
//!
//! The GPU part loads the kernels from a fatbin (see [`kernel_image`]) with the raw driver
//! API of cudarc, passing one `#[repr(C)]` parameter struct by value; its size and offsets
//! are asserted here and by `static_assert` in the C header.

use crate::error::{Error, Result};
use crate::format::{bitmap_row_bytes, BitmapWeight};
use half::f16;

/// Output features per tile (the CTA's N block).
pub const TILE_N: usize = 64;
/// Input features per tile (one `u64` bitmap word per tile row).
pub const TILE_K: usize = 64;
/// Each tile's value run starts at a multiple of this many values (16 bytes of f16).
pub const VALUE_ALIGN: usize = 8;

/// Epilogue flags of [`UnstructuredGemmParams::flags`] (`Y = act(X W^T + bias) + residual`).
pub const EPI_BIAS: i32 = 1;
pub const EPI_GELU: i32 = 2;
pub const EPI_RESIDUAL: i32 = 4;

/// An unstructured weight in the GPU's tiled bitmap layout (module docs), still on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct TiledBitmapWeight {
    pub rows: usize,
    pub cols: usize,
    pub tiles_n: usize,
    pub tiles_k: usize,
    /// `tiles_n * tiles_k * 64` words.
    pub bitmap: Vec<u64>,
    /// `tiles_n * tiles_k + 1` offsets into `values`, each a multiple of [`VALUE_ALIGN`].
    pub tile_offsets: Vec<u32>,
    /// The kept values (f16), tile by tile, row-major within a tile, zero padded per tile.
    pub values: Vec<f16>,
}

/// Bytes a weight occupies on the GPU, by part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightBytes {
    pub values: usize,
    pub bitmap: usize,
    pub offsets: usize,
}

impl WeightBytes {
    pub fn total(&self) -> usize {
        self.values + self.bitmap + self.offsets
    }
}

/// Checks that a canonical bitmap weight is self-consistent, so a corrupt file fails with a
/// clear error instead of an out-of-bounds read.
pub(crate) fn validate(w: &BitmapWeight) -> Result<()> {
    let row_bytes = bitmap_row_bytes(w.cols);
    let bad = |what: String| Err(Error::Format(format!("bitmap weight [{}, {}]: {what}", w.rows, w.cols)));
    if w.bitmap.len() != w.rows * row_bytes {
        return bad(format!("bitmap has {} bytes, expected {}", w.bitmap.len(), w.rows * row_bytes));
    }
    if w.row_offsets.len() != w.rows + 1 {
        return bad(format!("{} row offsets, expected {}", w.row_offsets.len(), w.rows + 1));
    }
    if w.row_offsets[0] != 0 || w.row_offsets[w.rows] as usize != w.values.len() {
        return bad(format!("row offsets do not span the {} values", w.values.len()));
    }
    for r in 0..w.rows {
        let row = &w.bitmap[r * row_bytes..(r + 1) * row_bytes];
        let kept: u32 = row.iter().map(|b| b.count_ones()).sum();
        if w.row_offsets[r + 1].checked_sub(w.row_offsets[r]) != Some(kept) {
            return bad(format!("row {r} keeps {kept} values but its offsets say otherwise"));
        }
        // Bits past `cols` in the last byte must be clear.
        if !w.cols.is_multiple_of(8) && row[row_bytes - 1] >> (w.cols % 8) != 0 {
            return bad(format!("row {r} has bits set past column {}", w.cols));
        }
    }
    Ok(())
}

impl TiledBitmapWeight {
    /// Builds the tiled layout from the canonical on-disk layout (values converted to f16).
    pub fn from_bitmap(w: &BitmapWeight) -> Result<TiledBitmapWeight> {
        validate(w)?;
        if w.rows == 0 || w.cols == 0 {
            return Err(Error::Format(format!("bitmap weight has an empty shape [{}, {}]", w.rows, w.cols)));
        }
        let vals: Vec<f16> = w.values.to_f32().iter().map(|&x| f16::from_f32(x)).collect();
        let row_bytes = bitmap_row_bytes(w.cols);
        let (tiles_n, tiles_k) = (w.rows.div_ceil(TILE_N), w.cols.div_ceil(TILE_K));
        let tiles = tiles_n * tiles_k;
        let mut bitmap = vec![0u64; tiles * TILE_N];
        let mut tile_offsets = Vec::with_capacity(tiles + 1);
        let mut values: Vec<f16> = Vec::with_capacity(w.values.len() + tiles * VALUE_ALIGN);
        // Cursor per row into the packed canonical values: tiles of one tile row visit each
        // matrix row's columns left to right, so the cursor only moves forward.
        let mut cursor: Vec<usize> = vec![0; TILE_N];
        for tn in 0..tiles_n {
            for (r, c) in cursor.iter_mut().enumerate() {
                let row = tn * TILE_N + r;
                *c = if row < w.rows { w.row_offsets[row] as usize } else { 0 };
            }
            for tk in 0..tiles_k {
                let tile = tn * tiles_k + tk;
                tile_offsets.push(values.len() as u32);
                for (r, cur) in cursor.iter_mut().enumerate() {
                    let row = tn * TILE_N + r;
                    if row >= w.rows {
                        break;
                    }
                    // The tile's 64 columns are 8 whole canonical bitmap bytes (64 is a multiple
                    // of 8); bytes past the row end read as 0.
                    let mut word = 0u64;
                    for byte in 0..TILE_K / 8 {
                        let b = tk * TILE_K / 8 + byte;
                        if b < row_bytes {
                            word |= (w.bitmap[row * row_bytes + b] as u64) << (8 * byte);
                        }
                    }
                    bitmap[tile * TILE_N + r] = word;
                    let kept = word.count_ones() as usize;
                    values.extend_from_slice(&vals[*cur..*cur + kept]);
                    *cur += kept;
                }
                values.resize(values.len().next_multiple_of(VALUE_ALIGN), f16::ZERO);
            }
        }
        tile_offsets.push(values.len() as u32);
        if values.len() > u32::MAX as usize {
            return Err(Error::Format("bitmap weight too large for 32-bit tile offsets".into()));
        }
        Ok(TiledBitmapWeight { rows: w.rows, cols: w.cols, tiles_n, tiles_k, bitmap, tile_offsets, values })
    }

    /// Decodes the tiled layout back to dense row-major `[rows, cols]` f32 (the CPU check that
    /// the layout holds exactly the weight, without a GPU).
    pub fn to_dense(&self) -> Vec<f32> {
        let mut dense = vec![0.0f32; self.rows * self.cols];
        for tn in 0..self.tiles_n {
            for tk in 0..self.tiles_k {
                let tile = tn * self.tiles_k + tk;
                let mut idx = self.tile_offsets[tile] as usize;
                for r in 0..TILE_N {
                    let word = self.bitmap[tile * TILE_N + r];
                    for c in 0..TILE_K {
                        if word >> c & 1 == 1 {
                            dense[(tn * TILE_N + r) * self.cols + tk * TILE_K + c] =
                                self.values[idx].to_f32();
                            idx += 1;
                        }
                    }
                }
            }
        }
        dense
    }

    /// Bytes on the GPU: f16 values (with per-tile padding), bitmap words, tile offsets.
    pub fn gpu_bytes(&self) -> WeightBytes {
        WeightBytes {
            values: self.values.len() * 2,
            bitmap: self.bitmap.len() * 8,
            offsets: self.tile_offsets.len() * 4,
        }
    }

    /// Bytes of the same weight stored dense in f16.
    pub fn dense_f16_bytes(&self) -> usize {
        self.rows * self.cols * 2
    }

    /// [`Self::gpu_bytes`] over [`Self::dense_f16_bytes`].
    pub fn gpu_bytes_ratio(&self) -> f64 {
        self.gpu_bytes().total() as f64 / self.dense_f16_bytes() as f64
    }
}

/// Builds the canonical [`BitmapWeight`] of a dense `[rows, cols]` matrix, keeping the nonzero
/// entries (values stored as f16). Used by tests and benches to make pruned weights.
pub fn bitmap_from_dense(dense: &[f32], rows: usize, cols: usize) -> BitmapWeight {
    let row_bytes = bitmap_row_bytes(cols);
    let mut bitmap = vec![0u8; rows * row_bytes];
    let mut row_offsets = vec![0u32];
    let mut values = Vec::new();
    for r in 0..rows {
        for c in 0..cols {
            let v = dense[r * cols + c];
            if v != 0.0 {
                bitmap[r * row_bytes + c / 8] |= 1 << (c % 8);
                values.push(f16::from_f32(v));
            }
        }
        row_offsets.push(values.len() as u32);
    }
    BitmapWeight { rows, cols, bitmap, row_offsets, values: crate::format::HostData::F16(values) }
}

/// CPU reference: `Y[m, n] = epilogue(sum_k x[m, k] * w[n, k])` accumulated in f64, with the
/// same epilogue order as the kernel (bias, exact GELU, residual). Inputs are the values the
/// GPU sees (already rounded to f16 by the caller where that applies).
#[allow(clippy::too_many_arguments)]
pub fn reference_gemm(
    x: &[f32],
    w: &[f32],
    m: usize,
    n: usize,
    k: usize,
    bias: Option<&[f32]>,
    gelu: bool,
    residual: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0f64;
            for kk in 0..k {
                acc += x[i * k + kk] as f64 * w[j * k + kk] as f64;
            }
            if let Some(b) = bias {
                acc += b[j] as f64;
            }
            if gelu {
                acc = 0.5 * acc * (1.0 + erf(acc / std::f64::consts::SQRT_2));
            }
            if let Some(r) = residual {
                acc += r[i * n + j] as f64;
            }
            y[i * n + j] = acc as f32;
        }
    }
    y
}

/// erf to ~1e-15 (Abramowitz-Stegun 7.1.26 is too coarse for an f64 reference), via the
/// series for small |x| and the continued fraction for large |x|.
pub fn erf(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 2.5 {
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let (mut term, mut sum, x2) = (ax, ax, ax * ax);
        let mut n = 0.0f64;
        loop {
            n += 1.0;
            term *= -x2 / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 * sum.abs() {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
        let mut f = ax;
        for i in (1..60).rev() {
            f = ax + (i as f64 / 2.0) / f;
        }
        1.0 - (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * f)
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// Relative error `||out - ref|| / ||ref||`; NaN or infinity anywhere in `out` gives infinity,
/// so a NaN can never pass a `< tol` check.
pub fn relative_error(out: &[f32], reference: &[f32]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        num += (o as f64 - r as f64).powi(2);
        den += (r as f64).powi(2);
    }
    if den == 0.0 {
        return if num == 0.0 { 0.0 } else { f64::INFINITY };
    }
    (num / den).sqrt()
}

/// Launch parameters, mirror of `SdsUnstructuredGemmParams` (sdsparse_unstructured_params.h).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct UnstructuredGemmParams {
    pub x: u64,
    pub bitmap: u64,
    pub tile_offsets: u64,
    pub values: u64,
    pub bias: u64,
    pub residual: u64,
    pub y: u64,
    pub workspace: u64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub ldx: i32,
    pub ldy: i32,
    pub ldr: i32,
    pub tiles_k: i32,
    pub flags: i32,
    pub splits: i32,
    pub k_tiles_per_split: i32,
}

const _: () = assert!(std::mem::size_of::<UnstructuredGemmParams>() == 104);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, x) == 0);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, bitmap) == 8);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, tile_offsets) == 16);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, values) == 24);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, bias) == 32);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, residual) == 40);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, y) == 48);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, workspace) == 56);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, m) == 64);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, n) == 68);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, k) == 72);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, ldx) == 76);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, ldy) == 80);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, ldr) == 84);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, tiles_k) == 88);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, flags) == 92);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, splits) == 96);
const _: () = assert!(std::mem::offset_of!(UnstructuredGemmParams, k_tiles_per_split) == 100);

/// The kernel variants of `cuda/unstructured_gemm.cu`, with their launch shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmVariant {
    /// One thread per output; the oracle.
    Naive,
    Bm32,
    Bm64,
    Bm128,
    /// The Bm128 pipeline with wgmma (sm_90a only; a stub elsewhere).
    WgmmaBm128,
}

impl GemmVariant {
    pub const ALL: [GemmVariant; 5] = [
        GemmVariant::Naive,
        GemmVariant::Bm32,
        GemmVariant::Bm64,
        GemmVariant::Bm128,
        GemmVariant::WgmmaBm128,
    ];

    /// The variant's short name (the tuning cache's, `sdsparse_uns_gemm_<name>`).
    pub fn name(self) -> &'static str {
        self.kernel_name().trim_start_matches("sdsparse_uns_gemm_")
    }

    pub fn kernel_name(self) -> &'static str {
        match self {
            GemmVariant::Naive => "sdsparse_uns_gemm_naive",
            GemmVariant::Bm32 => "sdsparse_uns_gemm_bm32",
            GemmVariant::Bm64 => "sdsparse_uns_gemm_bm64",
            GemmVariant::Bm128 => "sdsparse_uns_gemm_bm128",
            GemmVariant::WgmmaBm128 => "sdsparse_uns_gemm_wgmma_bm128",
        }
    }
    /// `(rows per CTA, threads per CTA, dynamic shared bytes)`, mirrored from the kernel's
    /// `GemmConfig` static_asserts.
    pub fn cta(self) -> (usize, u32, u32) {
        match self {
            GemmVariant::Naive => (16, 256, 0),
            GemmVariant::Bm32 => (32, 128, 35840),
            GemmVariant::Bm64 => (64, 128, 45056),
            GemmVariant::Bm128 => (128, 256, 63488),
            GemmVariant::WgmmaBm128 => (128, 256, 58368),
        }
    }
    /// Whether a GPU of compute capability `(major, minor)` runs this variant (the fatbin has
    /// sm_90a SASS, which only Hopper sm_90 runs; wgmma is not in later architectures' SASS;
    /// the mma.sync variants are traps below sm_80, the naive oracle runs on sm_75 too).
    pub fn runs_on(self, cc: (i32, i32)) -> bool {
        match self {
            GemmVariant::WgmmaBm128 => cc == (9, 0),
            GemmVariant::Naive => cc >= (7, 5),
            _ => cc >= (8, 0),
        }
    }
    /// The variant the dispatcher uses for `m` rows: small CTAs where M is small (more CTAs
    /// in flight on a memory-bound shape), large ones where it is compute-bound.
    pub fn for_rows(m: usize) -> GemmVariant {
        match m {
            0..=64 => GemmVariant::Bm32,
            65..=1024 => GemmVariant::Bm64,
            _ => GemmVariant::Bm128,
        }
    }
}

/// How one GEMM is launched: the kernel variant and the split-K factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmPlan {
    pub variant: GemmVariant,
    /// Number of K slices (grid.z); 1 = no split-K.
    pub splits: usize,
    /// k-tiles per slice; `splits == tiles_k.div_ceil(k_tiles_per_split)`.
    pub k_tiles_per_split: usize,
}

impl GemmPlan {
    /// A plan with an explicit split request, normalised so that every slice has work.
    pub fn new(variant: GemmVariant, requested_splits: usize, tiles_k: usize) -> GemmPlan {
        let tiles_k = tiles_k.max(1);
        let requested = if variant == GemmVariant::Naive { 1 } else { requested_splits.clamp(1, tiles_k) };
        let k_tiles_per_split = tiles_k.div_ceil(requested);
        GemmPlan { variant, splits: tiles_k.div_ceil(k_tiles_per_split), k_tiles_per_split }
    }

    /// The dispatcher's choice for `[m, k] x [n, k]^T` on a GPU with `sm_count` SMs: the
    /// variant by M, and split-K only when the grid would leave most SMs idle, capped so that
    /// the f32 partials (written and read once, `splits * M * N * 8` bytes, mostly in L2) stay
    /// below twice the compressed weight bytes the split is meant to stream faster.
    pub fn choose(m: usize, n: usize, k: usize, weight_bytes: usize, sm_count: usize) -> GemmPlan {
        Self::choose_for(GemmVariant::for_rows(m), m, n, k, weight_bytes, sm_count)
    }

    /// The split-K part of [`Self::choose`] for a given variant (the self-checking dispatch,
    /// `crate::tune`, picks the variant by measurement).
    pub fn choose_for(
        variant: GemmVariant,
        m: usize,
        n: usize,
        k: usize,
        weight_bytes: usize,
        sm_count: usize,
    ) -> GemmPlan {
        let tiles_k = k.div_ceil(TILE_K);
        let ctas = n.div_ceil(TILE_N) * m.div_ceil(variant.cta().0);
        if ctas * 2 >= sm_count || tiles_k < 4 {
            return GemmPlan::new(variant, 1, tiles_k);
        }
        let for_occupancy = sm_count.div_ceil(ctas);
        let for_traffic = (2 * weight_bytes / (m * n * 8).max(1)).max(1);
        GemmPlan::new(variant, for_occupancy.min(for_traffic).min(tiles_k / 2), tiles_k)
    }

    /// f32 workspace elements the plan needs.
    pub fn workspace_len(&self, m: usize, n: usize) -> usize {
        if self.splits > 1 {
            self.splits * m * n
        } else {
            0
        }
    }
}

/// The kernel image holding `<name>`: `$SDSPARSE_CUDA_KERNEL_DIR/<name>.fatbin` when that is
/// set, else the fatbin build.rs embedded in the crate, else `target/cuda/<name>.fatbin` under
/// the crate root (written by `tools/build_unstructured_kernels.sh`).
pub fn kernel_image(name: &str) -> Result<Vec<u8>> {
    // The fatbin build.rs embedded holds every cuda/*.cu kernel; a kernel directory set in the
    // environment overrides it (kernels built separately by tools/build_unstructured_kernels.sh).
    if std::env::var_os("SDSPARSE_CUDA_KERNEL_DIR").is_none() {
        if let Some(fatbin) = super::kernels::fatbin() {
            return Ok(fatbin.to_vec());
        }
    }
    // The crate root at run time (staged executables on the device machine run from a copy of
    // the tree with CARGO_MANIFEST_DIR set), else the one this was compiled in.
    let root = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    let dir = std::env::var_os("SDSPARSE_CUDA_KERNEL_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target/cuda"));
    let path = dir.join(format!("{name}.fatbin"));
    std::fs::read(&path).map_err(|e| {
        Error::Cuda(format!(
            "cannot read kernel image {} ({e}); build it with tools/build_unstructured_kernels.sh",
            path.display()
        ))
    })
}

pub use gpu::*;

/// The GPU half: module loading and launchers (cudarc, raw driver API).
mod gpu {
    use super::*;
    use cudarc::driver::{result, sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
    use std::ffi::{c_void, CString};
    use std::sync::Arc;

    pub(crate) fn cuda_err(what: &str, e: impl std::fmt::Debug) -> Error {
        Error::Cuda(format!("{what}: {e:?}"))
    }

    /// The first GPU for a GPU test: `None` (the test skips) when there is no driver or no
    /// device, unless `SDSPARSE_REQUIRE_GPU=1` (set by the device-machine runners), where a
    /// missing GPU is a test failure instead of a silent skip.
    pub fn gpu_for_test() -> Option<Arc<CudaContext>> {
        let ctx = try_gpu_context();
        let required = matches!(std::env::var("SDSPARSE_REQUIRE_GPU").as_deref(), Ok("1") | Ok("true"));
        assert!(ctx.is_some() || !required, "SDSPARSE_REQUIRE_GPU is set but no GPU could be opened");
        // The tensor-core kernels these tests launch are traps below sm_80 (dense-only GPUs).
        if let Some(cc) = ctx.as_ref().and_then(|c| c.compute_capability().ok()) {
            if cc < (8, 0) {
                eprintln!("skipped: the tensor-core kernels need sm_80, this GPU is sm_{}{}", cc.0, cc.1);
                return None;
            }
        }
        ctx
    }

    /// The first GPU, or `None` when there is no driver or no device.
    pub fn try_gpu_context() -> Option<Arc<CudaContext>> {
        // SAFETY: only probes whether the driver library can be opened.
        if !unsafe { sys::is_culib_present() } {
            return None;
        }
        match CudaContext::device_count() {
            Ok(n) if n > 0 => CudaContext::new(0).ok(),
            _ => None,
        }
    }

    /// A module loaded from a fatbin image; unloaded on drop.
    pub struct FatbinModule {
        ctx: Arc<CudaContext>,
        module: sys::CUmodule,
    }

    // SAFETY: a CUmodule handle may be used from any thread once its context is bound.
    unsafe impl Send for FatbinModule {}
    unsafe impl Sync for FatbinModule {}

    impl FatbinModule {
        pub fn load(ctx: &Arc<CudaContext>, image: &[u8]) -> Result<FatbinModule> {
            ctx.bind_to_thread().map_err(|e| cuda_err("bind context", e))?;
            // The driver parses the image in place; keep an owned, 8-byte aligned copy.
            let mut words = vec![0u64; image.len().div_ceil(8) + 1];
            bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..image.len()].copy_from_slice(image);
            // SAFETY: `words` holds a complete fatbin image and outlives the call.
            let module = unsafe { result::module::load_data(words.as_ptr() as *const c_void) }
                .map_err(|e| cuda_err("load kernel module", e))?;
            Ok(FatbinModule { ctx: ctx.clone(), module })
        }

        pub fn function(&self, name: &str) -> Result<sys::CUfunction> {
            let c_name = CString::new(name).map_err(|e| cuda_err("kernel name", e))?;
            // SAFETY: the module is loaded and alive.
            unsafe { result::module::get_function(self.module, c_name) }
                .map_err(|e| cuda_err(&format!("kernel {name}"), e))
        }

        pub fn context(&self) -> &Arc<CudaContext> {
            &self.ctx
        }
    }

    impl Drop for FatbinModule {
        fn drop(&mut self) {
            let _ = self.ctx.bind_to_thread();
            // SAFETY: loaded by `load`, unloaded once.
            let _ = unsafe { result::module::unload(self.module) };
        }
    }

    /// Launches `f` with one by-value parameter struct.
    ///
    /// # Safety
    /// `P` must match the kernel's single parameter, and every device pointer inside it must
    /// be valid for the accesses the kernel makes.
    pub(crate) unsafe fn launch_with_params<P>(
        stream: &CudaStream,
        f: sys::CUfunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        smem: u32,
        params: &P,
    ) -> Result<()> {
        let mut args = [params as *const P as *mut c_void];
        result::launch_kernel(f, grid, block, smem, stream.cu_stream(), &mut args)
            .map_err(|e| cuda_err("kernel launch", e))
    }

    /// A [`TiledBitmapWeight`] uploaded to the GPU.
    pub struct DeviceTiledWeight {
        pub rows: usize,
        pub cols: usize,
        pub tiles_k: usize,
        /// Bytes of the three buffers (for the split-K heuristic).
        pub gpu_bytes: usize,
        pub bitmap: CudaSlice<u64>,
        pub tile_offsets: CudaSlice<u32>,
        /// f16 bit patterns.
        pub values: CudaSlice<u16>,
    }

    impl DeviceTiledWeight {
        pub fn upload(stream: &Arc<CudaStream>, w: &TiledBitmapWeight) -> Result<DeviceTiledWeight> {
            let values: &[u16] = bytemuck::cast_slice(&w.values);
            Ok(DeviceTiledWeight {
                rows: w.rows,
                cols: w.cols,
                tiles_k: w.tiles_k,
                gpu_bytes: w.gpu_bytes().total(),
                bitmap: stream.clone_htod(&w.bitmap).map_err(|e| cuda_err("upload bitmap", e))?,
                tile_offsets: stream
                    .clone_htod(&w.tile_offsets)
                    .map_err(|e| cuda_err("upload offsets", e))?,
                values: stream.clone_htod(values).map_err(|e| cuda_err("upload values", e))?,
            })
        }
    }

    /// The loaded GEMM kernels of `cuda/unstructured_gemm.cu`.
    pub struct UnstructuredGemm {
        module: FatbinModule,
        functions: [sys::CUfunction; 5],
        reduce: sys::CUfunction,
        sm_count: usize,
        compute_capability: (i32, i32),
        /// Let the dispatcher pick the wgmma variant for compute-bound shapes on sm_90.
        prefer_wgmma: bool,
        /// Split-K partial sums, one buffer per stream (keyed by the stream handle), grown on
        /// demand. Per stream because the lock below is released once the two kernels are
        /// *enqueued*: a shared buffer could be overwritten by a GEMM on another stream while
        /// the first one still runs (kernel review U2; event tracking is off, device.rs). On
        /// one stream, stream order serialises the users. Each buffer holds an `Arc` of the
        /// stream it was allocated on, so a handle cannot be reused while its buffer lives.
        workspace: std::sync::Mutex<Vec<(usize, CudaSlice<f32>)>>,
    }

    // SAFETY: function handles are immutable after loading.
    unsafe impl Send for UnstructuredGemm {}
    unsafe impl Sync for UnstructuredGemm {}

    /// Optional epilogue operands: `Y = act(X W^T + bias) + residual`.
    #[derive(Default)]
    pub struct Epilogue<'a> {
        /// f32 `[N]`.
        pub bias: Option<&'a CudaSlice<f32>>,
        pub gelu: bool,
        /// f16 `[M, N]` (contiguous).
        pub residual: Option<&'a CudaSlice<u16>>,
    }

    impl UnstructuredGemm {
        pub fn load(ctx: &Arc<CudaContext>) -> Result<UnstructuredGemm> {
            Self::from_image(ctx, &kernel_image("unstructured_gemm")?)
        }

        pub fn from_image(ctx: &Arc<CudaContext>, image: &[u8]) -> Result<UnstructuredGemm> {
            let module = FatbinModule::load(ctx, image)?;
            let mut functions = [std::ptr::null_mut(); 5];
            for (slot, v) in functions.iter_mut().zip(GemmVariant::ALL) {
                *slot = module.function(v.kernel_name())?;
                let (_, _, smem) = v.cta();
                if smem > 48 * 1024 {
                    // SAFETY: a valid function handle; opting in to > 48 KB dynamic shared memory.
                    unsafe {
                        result::function::set_function_attribute(
                            *slot,
                            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                            smem as i32,
                        )
                    }
                    .map_err(|e| cuda_err("shared memory opt-in", e))?;
                }
            }
            let reduce = module.function("sdsparse_uns_gemm_splitk_reduce")?;
            let sm_count = ctx
                .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| cuda_err("SM count", e))? as usize;
            let compute_capability =
                ctx.compute_capability().map_err(|e| cuda_err("compute capability", e))?;
            Ok(UnstructuredGemm {
                module,
                functions,
                reduce,
                sm_count,
                compute_capability,
                prefer_wgmma: false,
                workspace: std::sync::Mutex::new(Vec::new()),
            })
        }

        pub fn context(&self) -> &Arc<CudaContext> {
            self.module.context()
        }

        /// Streaming multiprocessors of the GPU (for [`GemmPlan::choose`]).
        pub fn sm_count(&self) -> usize {
            self.sm_count
        }

        /// Whether this GPU runs `variant`.
        pub fn supports(&self, variant: GemmVariant) -> bool {
            variant.runs_on(self.compute_capability)
        }

        /// Use the wgmma variant instead of Bm128 where the dispatcher picks Bm128 (sm_90 only;
        /// off by default until the GPU benches show it pays).
        pub fn set_prefer_wgmma(&mut self, prefer: bool) {
            self.prefer_wgmma = prefer && self.supports(GemmVariant::WgmmaBm128);
        }

        /// `y[M, N] = epilogue(x[M, K] . W^T)` with the plan [`GemmPlan::choose`] picks.
        pub fn forward(
            &self,
            stream: &Arc<CudaStream>,
            x: &CudaSlice<u16>,
            m: usize,
            w: &DeviceTiledWeight,
            epilogue: &Epilogue,
            y: &mut CudaSlice<u16>,
        ) -> Result<()> {
            let mut plan = GemmPlan::choose(m, w.rows, w.cols, w.gpu_bytes, self.sm_count);
            if self.prefer_wgmma && plan.variant == GemmVariant::Bm128 {
                plan.variant = GemmVariant::WgmmaBm128;
            }
            self.forward_plan(stream, plan, x, m, w, epilogue, y)
        }

        /// As [`Self::forward`] with an explicit plan (tests and benches).
        #[allow(clippy::too_many_arguments)]
        pub fn forward_plan(
            &self,
            stream: &Arc<CudaStream>,
            plan: GemmPlan,
            x: &CudaSlice<u16>,
            m: usize,
            w: &DeviceTiledWeight,
            epilogue: &Epilogue,
            y: &mut CudaSlice<u16>,
        ) -> Result<()> {
            let (n, k) = (w.rows, w.cols);
            if m == 0 {
                return Ok(());
            }
            if !k.is_multiple_of(8) {
                return Err(Error::Invalid(format!("unstructured GEMM needs in_features % 8 == 0, got {k}")));
            }
            if x.len() < m * k || y.len() < m * n {
                return Err(Error::Shape(format!(
                    "unstructured GEMM [{m}, {k}] x [{n}, {k}]^T: x has {} values, y has {}",
                    x.len(),
                    y.len()
                )));
            }
            if epilogue.bias.is_some_and(|b| b.len() < n)
                || epilogue.residual.is_some_and(|r| r.len() < m * n)
            {
                return Err(Error::Shape(format!(
                    "unstructured GEMM epilogue operands too small for [{m}, {n}]"
                )));
            }
            let to_i32 = |v: usize| {
                i32::try_from(v).map_err(|_| Error::Invalid(format!("GEMM dimension {v} exceeds i32")))
            };
            let (x_ptr, _gx) = x.device_ptr(stream);
            let (b_ptr, _gb) = w.bitmap.device_ptr(stream);
            let (o_ptr, _go) = w.tile_offsets.device_ptr(stream);
            let (v_ptr, _gv) = w.values.device_ptr(stream);
            let bias = epilogue.bias.map(|b| b.device_ptr(stream));
            let residual = epilogue.residual.map(|r| r.device_ptr(stream));
            let (y_ptr, _gy) = y.device_ptr_mut(stream);
            let mut flags = 0;
            if bias.is_some() {
                flags |= EPI_BIAS;
            }
            if epilogue.gelu {
                flags |= EPI_GELU;
            }
            if residual.is_some() {
                flags |= EPI_RESIDUAL;
            }
            let params = UnstructuredGemmParams {
                x: x_ptr,
                bitmap: b_ptr,
                tile_offsets: o_ptr,
                values: v_ptr,
                bias: bias.as_ref().map_or(0, |b| b.0),
                residual: residual.as_ref().map_or(0, |r| r.0),
                y: y_ptr,
                workspace: 0,
                m: to_i32(m)?,
                n: to_i32(n)?,
                k: to_i32(k)?,
                ldx: to_i32(k)?,
                ldy: to_i32(n)?,
                ldr: to_i32(n)?,
                tiles_k: to_i32(w.tiles_k)?,
                flags,
                splits: 1,
                k_tiles_per_split: to_i32(w.tiles_k)?,
            };
            let variant = plan.variant;
            if !self.supports(variant) {
                return Err(Error::Cuda(format!(
                    "{variant:?} does not run on compute capability {:?}",
                    self.compute_capability
                )));
            }
            let (bm, threads, smem) = variant.cta();
            let idx = GemmVariant::ALL.iter().position(|&v| v == variant).unwrap_or(0);
            let (grid, block) = match variant {
                GemmVariant::Naive => ((n.div_ceil(16) as u32, m.div_ceil(16) as u32, 1), (16, 16, 1)),
                _ => {
                    ((n.div_ceil(TILE_N) as u32, m.div_ceil(bm) as u32, plan.splits as u32), (threads, 1, 1))
                }
            };
            if grid.1 > 65535 || grid.2 > 65535 {
                return Err(Error::Invalid(format!("unstructured GEMM grid {grid:?} too large")));
            }
            let mut params = params;
            if plan.splits <= 1 {
                // SAFETY: params mirrors the kernel's struct; the buffers were size-checked above
                // and stay borrowed (with their stream guards) until after the launch.
                return unsafe {
                    launch_with_params(stream, self.functions[idx], grid, block, smem, &params)
                };
            }
            let mut workspaces =
                self.workspace.lock().map_err(|_| Error::Cuda("workspace lock poisoned".into()))?;
            let need = plan.workspace_len(m, n);
            let key = stream.cu_stream() as usize;
            let slot = match workspaces.iter().position(|(s, _)| *s == key) {
                Some(i) => i,
                None => {
                    let ws = stream.alloc_zeros::<f32>(need).map_err(|e| cuda_err("split-K workspace", e))?;
                    workspaces.push((key, ws));
                    workspaces.len() - 1
                }
            };
            if workspaces[slot].1.len() < need {
                // The old buffer is freed in this stream's order, after its last user.
                workspaces[slot].1 =
                    stream.alloc_zeros::<f32>(need).map_err(|e| cuda_err("split-K workspace", e))?;
            }
            let ws = &mut workspaces[slot].1;
            let (ws_ptr, _gws) = ws.device_ptr_mut(stream);
            params.workspace = ws_ptr;
            params.splits = to_i32(plan.splits)?;
            params.k_tiles_per_split = to_i32(plan.k_tiles_per_split)?;
            let reduce_grid = ((m * n).div_ceil(256) as u32, 1, 1);
            // SAFETY: as above; the workspace holds splits * M * N f32, belongs to this stream
            // only, and both launches run in stream order (partials first, then the reduction).
            unsafe {
                launch_with_params(stream, self.functions[idx], grid, block, smem, &params)?;
                launch_with_params(stream, self.reduce, reduce_grid, (256, 1, 1), 0, &params)
            }
        }
    }
}
