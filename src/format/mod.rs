//! The compressed weight types and their canonical, hardware-independent layouts.
//!
//! This module is the only place that knows the byte layout of pruned weights on disk
//! (`docs/FORMAT.md`). Kernel-specific reorderings are built from these at load time by
//! the backends.
//!
//! Canonical layouts, for a Linear weight `W[rows = out_features, cols = in_features]`:
//! - [`Sparse24Weight`] (2:4 along `cols`, needs `cols % 4 == 0`): `values[rows, cols/2]`
//!   holds the two kept values of each group of 4 in column order; `meta[rows,
//!   meta_row_bytes(cols)]` holds one 4-bit nibble per group, `idx0 | idx1 << 2` with
//!   `idx0 < idx1` the positions (0..4) of the kept values; group `g` of a row sits in
//!   byte `g / 2`, low nibble for even `g`.
//! - [`BitmapWeight`] (unstructured): `bitmap[rows, ceil(cols/8)]`, bit `c % 8` (LSB first)
//!   of byte `c / 8` set when element `c` is kept; `values` packs the kept elements in
//!   row-major order; `row_offsets[rows + 1]` indexes each row's first value.

pub mod codec;
pub mod writer;

use crate::backend::Tensor;
use half::{bf16, f16};

/// Element type of a stored tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
}

impl DType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

/// A host buffer of values in their stored dtype (kept as stored so that a format round
/// trip is bit-exact).
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl HostData {
    pub fn dtype(&self) -> DType {
        match self {
            HostData::F32(_) => DType::F32,
            HostData::F16(_) => DType::F16,
            HostData::BF16(_) => DType::BF16,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::BF16(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The values widened to f32.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostData::F32(v) => v.clone(),
            HostData::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
            HostData::BF16(v) => v.iter().map(|x| x.to_f32()).collect(),
        }
    }
    /// The values converted to `dtype` (round to nearest even when narrowing).
    pub fn to_dtype(&self, dtype: DType) -> HostData {
        if self.dtype() == dtype {
            return self.clone();
        }
        let f = self.to_f32();
        match dtype {
            DType::F32 => HostData::F32(f),
            DType::F16 => HostData::F16(f.iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => HostData::BF16(f.iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }
    /// Little-endian bytes, as safetensors stores them.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            HostData::F32(v) => bytemuck::cast_slice(v),
            HostData::F16(v) => bytemuck::cast_slice(v),
            HostData::BF16(v) => bytemuck::cast_slice(v),
        }
    }
}

/// Bytes of 2:4 metadata per row: one nibble per group of 4 columns.
pub fn sparse24_meta_row_bytes(cols: usize) -> usize {
    cols.div_ceil(8)
}

/// Bytes of bitmap per row: one bit per column.
pub fn bitmap_row_bytes(cols: usize) -> usize {
    cols.div_ceil(8)
}

/// A weight pruned 2:4 along its input dimension, in the canonical layout (module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct Sparse24Weight {
    pub rows: usize,
    pub cols: usize,
    /// `rows * cols / 2` kept values.
    pub values: HostData,
    /// `rows * sparse24_meta_row_bytes(cols)` bytes of 2-bit positions.
    pub meta: Vec<u8>,
}

/// An unstructured pruned weight: bitmap plus packed kept values (module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct BitmapWeight {
    pub rows: usize,
    pub cols: usize,
    /// `rows * bitmap_row_bytes(cols)` bytes, LSB first.
    pub bitmap: Vec<u8>,
    /// `rows + 1` offsets into `values`.
    pub row_offsets: Vec<u32>,
    /// The kept values, row-major.
    pub values: HostData,
}

/// A Linear (or other 2-D) weight as the model holds it, from loading to the kernel call.
/// The backend picks the kernel by the variant.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Sparse24(Sparse24Weight),
    Bitmap(BitmapWeight),
}

impl Weight {
    /// `(rows, cols)` = `(out_features, in_features)`.
    pub fn dims2(&self) -> crate::Result<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2(),
            Weight::Sparse24(w) => Ok((w.rows, w.cols)),
            Weight::Bitmap(w) => Ok((w.rows, w.cols)),
        }
    }
    pub fn format_name(&self) -> &'static str {
        match self {
            Weight::Dense(_) => "dense",
            Weight::Sparse24(_) => "2:4",
            Weight::Bitmap(_) => "unstructured",
        }
    }
}
