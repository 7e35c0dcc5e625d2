//! Test helpers shared by unit tests, integration tests and benches: the [`test_device!`] macro
//! (write a test once, run it on the CPU and on the GPU), the GPU-or-skip probe, a seeded RNG and
//! random sparse weights in the canonical layouts.
//!
//! The library uses it too, on purpose: the self-checking dispatch (`crate::tune`,
//! `crate::sparse_linear`) checks each sparse kernel on a user's GPU with the same random inputs
//! and the same bound ([`check_close`], kernel review T1) that the tests use, so a kernel the tests
//! would fail is never picked at run time.
//!
//! On the device machine set `SDSPARSE_REQUIRE_GPU=1` (`.device/check.sh` does): a GPU test then
//! fails instead of skipping when no GPU can be opened, so a broken setup cannot pass silently.
//! `SDSPARSE_CUDA_DEVICE` picks the ordinal (default 0).

use crate::backend::cuda::CudaDevice;
use crate::format::{
    bitmap_row_bytes, sparse24_meta_row_bytes, BitmapWeight, DType, HostData, Sparse24Weight,
};
use half::{bf16, f16};
use std::sync::OnceLock;

/// Defines a CPU and a CUDA test from one function `fn name(device: &Device) -> Result<()>`.
///
/// `test_device!(name)` makes `name::cpu` and `name::cuda` (a module may share a function's
/// name); `test_device!(name, name_cpu, name_cuda)` makes the two tests with the names given
/// (candle's form). The CUDA test prints `skipped: ...` and passes when no GPU can be opened.
///
/// ```ignore
/// fn softmax_rows_sum_to_one(device: &Device) -> Result<()> { ... }
/// test_device!(softmax_rows_sum_to_one);
/// ```
#[doc(hidden)]
#[macro_export]
macro_rules! test_device {
    ($name:ident) => {
        mod $name {
            #[test]
            fn cpu() -> $crate::Result<()> {
                super::$name(&$crate::Device::Cpu)
            }
            #[test]
            fn cuda() -> $crate::Result<()> {
                match $crate::backend::test_util::cuda_device_or_skip(concat!(module_path!(), "::cuda")) {
                    Some(dev) => super::$name(&$crate::Device::Cuda(dev)),
                    None => Ok(()),
                }
            }
        }
    };
    ($name:ident, $cpu:ident, $cuda:ident) => {
        #[test]
        fn $cpu() -> $crate::Result<()> {
            $name(&$crate::Device::Cpu)
        }
        #[test]
        fn $cuda() -> $crate::Result<()> {
            match $crate::backend::test_util::cuda_device_or_skip(stringify!($cuda)) {
                Some(dev) => $name(&$crate::Device::Cuda(dev)),
                None => Ok(()),
            }
        }
    };
}

/// The GPU for tests, or `None` after printing `skipped: <why>` for `test`. Panics instead when
/// `SDSPARSE_REQUIRE_GPU=1`.
pub fn cuda_device_or_skip(test: &str) -> Option<CudaDevice> {
    static DEVICE: OnceLock<Result<CudaDevice, String>> = OnceLock::new();
    let device = DEVICE.get_or_init(|| {
        let ordinal = std::env::var("SDSPARSE_CUDA_DEVICE").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
        CudaDevice::new(ordinal).map_err(|e| e.to_string())
    });
    match device {
        Ok(dev) => {
            // GPU tests measure the sparse kernels afresh and never write the user's cache.
            crate::tune::keep_cache_in_memory_for_tests();
            Some(dev.clone())
        }
        Err(why) => {
            if matches!(std::env::var("SDSPARSE_REQUIRE_GPU").as_deref(), Ok("1") | Ok("true")) {
                panic!("{test}: SDSPARSE_REQUIRE_GPU is set but no GPU: {why}");
            }
            eprintln!("{test}: skipped: no GPU ({why})");
            None
        }
    }
}

/// A small deterministic RNG (SplitMix64) for test data, so tests need no extra crate.
#[derive(Debug, Clone)]
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(seed)
    }
    /// A seed that differs per call site and run, for "fresh random inputs": printed by the
    /// caller on failure so a failing case can be replayed with [`TestRng::new`].
    pub fn fresh_seed() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x5eed);
        nanos ^ (std::process::id() as u64).rotate_left(32)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    /// A value in `±[0.05, 1)`: never zero, so a dropped or misplaced value always shows.
    pub fn nonzero(&mut self) -> f32 {
        let magnitude = 0.05 + 0.95 * self.uniform();
        if self.next_u64() & 1 == 0 {
            magnitude
        } else {
            -magnitude
        }
    }
    /// `n` values in `[-1, 1)`.
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| 2.0 * self.uniform() - 1.0).collect()
    }
    /// `n` f16-representable values in `[-amp, amp)` (what a GPU kernel with f16 operands sees).
    pub fn vec_f16(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| f16::from_f32(amp * (2.0 * self.uniform() - 1.0)).to_f32()).collect()
    }
    /// An RNG on a [`TestRng::fresh_seed`], printing `<tag>: seed <seed>` so a failure can be
    /// replayed with [`TestRng::new`].
    pub fn fresh(tag: &str) -> Self {
        let seed = Self::fresh_seed();
        println!("{tag}: seed {seed}");
        TestRng(seed)
    }
}

/// f32 values as f16 bit patterns (round to nearest), the upload format of the GPU kernels.
pub fn to_f16_bits(v: &[f32]) -> Vec<u16> {
    v.iter().map(|&x| f16::from_f32(x).to_bits()).collect()
}

/// f16 bit patterns as f32 values.
pub fn from_f16_bits(v: &[u16]) -> Vec<f32> {
    v.iter().map(|&b| f16::from_bits(b).to_f32()).collect()
}

/// Whether a GPU test should run kernel variant `name` (its name or `Debug` form): all of them
/// unless `SDSPARSE_GPU_VARIANTS` lists comma-separated prefixes, one of which `name` must
/// start with (case-insensitive: `v2` selects every `v2_pipe_bt*`, `bm128` selects `Bm128` but
/// not `WgmmaBm128`). The device check runs the oracle variants first and each risky
/// variant in its own process this way, so a sticky fault (trap, illegal address) in one
/// variant cannot hide the results of the others (kernel review T2).
pub fn variant_selected(name: &str) -> bool {
    match std::env::var("SDSPARSE_GPU_VARIANTS") {
        Ok(list) if !list.trim().is_empty() => {
            let name = name.to_ascii_lowercase();
            list.split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .any(|s| !s.is_empty() && name.starts_with(&s))
        }
        _ => true,
    }
}

/// Norm-wise bound of the GPU kernel tests (f16 output rounding alone gives ~2.5e-4).
pub const GPU_NORM_TOL: f64 = 2e-3;
/// Element-wise bound of the GPU kernel tests, relative to `|ref| + rms(ref)`.
pub const GPU_ELEM_TOL: f64 = 1e-2;

/// `(norm, element-wise)` bounds of a library GEMM / convolution (cuBLAS(Lt), cuDNN) against
/// the f32 CPU reference when its operands are stored in `dtype` (inputs already rounded to it):
/// f32 with f32 accumulation and no TF32 is 1e-5 / 1e-4; f16 and bf16 outputs add their rounding.
pub fn dtype_tolerances(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::F32 => (1e-5, 1e-4),
        DType::F16 => (2e-3, 1e-2),
        DType::BF16 => (1e-2, 4e-2),
    }
}

/// The kernel check of kernel review T1: `‖out − ref‖ / ‖ref‖ <= norm_tol` AND every element
/// `|out − ref| <= elem_tol · (|ref| + rms(ref))`, so one wrong element or a one-key mask
/// error cannot hide in a norm. NaN (an unwritten, NaN-poisoned output) never passes. Returns
/// the norm-wise error, or a one-line description of the first violation.
pub fn check_close(out: &[f32], reference: &[f32], norm_tol: f64, elem_tol: f64) -> Result<f64, String> {
    if out.len() != reference.len() {
        return Err(format!("{} outputs, {} reference values", out.len(), reference.len()));
    }
    let n = reference.len().max(1) as f64;
    let rms = (reference.iter().map(|&r| (r as f64).powi(2)).sum::<f64>() / n).sqrt();
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        let (o, r) = (o as f64, r as f64);
        if o.is_nan() || (o - r).abs() > elem_tol * (r.abs() + rms) {
            return Err(format!(
                "element {i}: {o} vs reference {r} (bound {elem_tol} x (|ref| + rms {rms:.3e}))"
            ));
        }
    }
    let err = rel_error(out, reference);
    if err > norm_tol {
        return Err(format!("relative error {err:.3e} > {norm_tol:.0e}"));
    }
    Ok(err)
}

/// `values` stored as `dtype`.
pub fn host_data(values: &[f32], dtype: DType) -> HostData {
    match dtype {
        DType::F32 => HostData::F32(values.to_vec()),
        DType::F16 => HostData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
        DType::BF16 => HostData::BF16(values.iter().map(|&v| bf16::from_f32(v)).collect()),
    }
}

/// A random 2:4 weight in the canonical layout (every group keeps 2 random positions of 4,
/// values non-zero). `cols` must be a multiple of 4.
pub fn random_sparse24(rng: &mut TestRng, rows: usize, cols: usize, dtype: DType) -> Sparse24Weight {
    assert!(cols.is_multiple_of(4), "2:4 needs cols % 4 == 0");
    const PAIRS: [(u8, u8); 6] = [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)];
    let meta_row = sparse24_meta_row_bytes(cols);
    let mut meta = vec![0u8; rows * meta_row];
    let mut values = Vec::with_capacity(rows * cols / 2);
    for r in 0..rows {
        for g in 0..cols / 4 {
            let (i0, i1) = PAIRS[rng.below(PAIRS.len())];
            meta[r * meta_row + g / 2] |= (i0 | (i1 << 2)) << (4 * (g % 2));
            values.push(rng.nonzero());
            values.push(rng.nonzero());
        }
    }
    Sparse24Weight { rows, cols, values: host_data(&values, dtype), meta }
}

/// A random unstructured weight in the canonical layout, each element kept with probability
/// `density` (kept values non-zero).
pub fn random_bitmap(
    rng: &mut TestRng,
    rows: usize,
    cols: usize,
    density: f32,
    dtype: DType,
) -> BitmapWeight {
    let row_bytes = bitmap_row_bytes(cols);
    let mut bitmap = vec![0u8; rows * row_bytes];
    let mut row_offsets = Vec::with_capacity(rows + 1);
    let mut values = Vec::new();
    row_offsets.push(0u32);
    for r in 0..rows {
        for c in 0..cols {
            if rng.uniform() < density {
                bitmap[r * row_bytes + c / 8] |= 1 << (c % 8);
                values.push(rng.nonzero());
            }
        }
        row_offsets.push(values.len() as u32);
    }
    BitmapWeight { rows, cols, bitmap, row_offsets, values: host_data(&values, dtype) }
}

/// `‖out − reference‖ / ‖reference‖`; infinite when `out` holds a NaN or the lengths differ, so
/// NaN never passes a threshold.
pub fn rel_error(out: &[f32], reference: &[f32]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|v| v.is_nan()) {
        return f64::INFINITY;
    }
    let (mut diff, mut norm) = (0f64, 0f64);
    for (&o, &r) in out.iter().zip(reference) {
        diff += (o as f64 - r as f64).powi(2);
        norm += (r as f64).powi(2);
    }
    if norm == 0.0 {
        if diff == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (diff / norm).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_close_catches_what_a_norm_misses() {
        // One negated element of a 154 x 1024 result: ~5e-3 norm-wise, under the old 1e-2 bar.
        let mut rng = TestRng::new(3);
        let reference = rng.vec(154 * 1024);
        let mut out = reference.clone();
        let i = (0..out.len()).max_by(|&a, &b| out[a].abs().total_cmp(&out[b].abs())).unwrap();
        out[i] = -out[i];
        assert!(rel_error(&out, &reference) < 1e-2, "the old bar would have passed it");
        let err = check_close(&out, &reference, GPU_NORM_TOL, GPU_ELEM_TOL).unwrap_err();
        assert!(err.starts_with(&format!("element {i}:")), "{err}");
        // f16 rounding of every element passes; NaN and a length mismatch never do.
        let rounded = from_f16_bits(&to_f16_bits(&reference));
        assert!(check_close(&rounded, &reference, GPU_NORM_TOL, GPU_ELEM_TOL).unwrap() < 5e-4);
        let mut nan = rounded.clone();
        nan[7] = f32::NAN;
        assert!(check_close(&nan, &reference, GPU_NORM_TOL, GPU_ELEM_TOL).is_err());
        assert!(check_close(&rounded[1..], &reference, GPU_NORM_TOL, GPU_ELEM_TOL).is_err());
    }

    #[test]
    fn variant_filter_defaults_to_all() {
        // The variable is not set in `cargo test` runs (only the device check sets it).
        if std::env::var_os("SDSPARSE_GPU_VARIANTS").is_none() {
            assert!(variant_selected("v3_wgmma"));
        }
    }
}
