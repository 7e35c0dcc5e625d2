//! Test helpers shared by unit tests, integration tests and benches: the [`test_device!`] macro
//! (write a test once, run it on the CPU and on the GPU), the GPU-or-skip probe, a seeded RNG and
//! random sparse weights in the canonical layouts.
//!
//! On the device machine set `SDSPARSE_REQUIRE_GPU=1` (`.device/run_all.sh` does): a GPU test then
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
        Ok(dev) => Some(dev.clone()),
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
