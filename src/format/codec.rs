//! Encoding and decoding of the canonical sparse layouts (dense ⇄ compressed), the
//! safetensors names and `__metadata__` of a sparse checkpoint, and checksums.
//!
//! A pruned tensor `NAME` is stored as two safetensors entries (`docs/FORMAT.md`):
//! - 2:4: `NAME.sparse24.values` (stored dtype, `[rows, cols/2]`) and `NAME.sparse24.meta`
//!   (u8, `[rows, ceil(cols/8)]`);
//! - unstructured: `NAME.bitmap.mask` (u8, `[rows, ceil(cols/8)]`) and `NAME.bitmap.values`
//!   (stored dtype, `[nnz]`). Row offsets are not stored: they follow from the bitmap's
//!   popcounts and are rebuilt at load (cheaper on disk than 4 bytes per row).
//!
//! The file's `__metadata__` holds `format = "sdsparse"`, `sdsparse_format_version` and
//! `sdsparse` (a JSON [`SparseHeader`]) with one [`LayerRecord`] per pruned tensor: its
//! original shape, pattern, sparsity and the CRC-32 of each stored part, verified at load.

use super::{
    bitmap_row_bytes, sparse24_meta_row_bytes, BitmapWeight, DType, HostData, Sparse24Weight, Weight,
};
use crate::error::{Error, Result};
use half::{bf16, f16};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of the on-disk layout; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// `__metadata__` keys.
pub const META_FORMAT_KEY: &str = "format";
pub const META_FORMAT_VALUE: &str = "sdsparse";
pub const META_VERSION_KEY: &str = "sdsparse_format_version";
pub const META_HEADER_KEY: &str = "sdsparse";

/// Suffixes of the stored parts of a compressed tensor.
pub const S24_VALUES: &str = ".sparse24.values";
pub const S24_META: &str = ".sparse24.meta";
pub const BITMAP_MASK: &str = ".bitmap.mask";
pub const BITMAP_VALUES: &str = ".bitmap.values";
/// Every suffix, for telling stored part names from logical tensor names.
pub const ALL_SUFFIXES: [&str; 4] = [S24_VALUES, S24_META, BITMAP_MASK, BITMAP_VALUES];

/// A sparsity pattern as written in metadata and reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PatternName {
    #[serde(rename = "2:4")]
    Sparse24,
    #[serde(rename = "unstructured")]
    Unstructured,
}

impl PatternName {
    pub fn as_str(self) -> &'static str {
        match self {
            PatternName::Sparse24 => "2:4",
            PatternName::Unstructured => "unstructured",
        }
    }
    /// Suffixes of the two stored parts, in header order.
    pub fn suffixes(self) -> [&'static str; 2] {
        match self {
            PatternName::Sparse24 => [S24_VALUES, S24_META],
            PatternName::Unstructured => [BITMAP_MASK, BITMAP_VALUES],
        }
    }
}

/// What the header says about one pruned tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    pub pattern: PatternName,
    /// The dense tensor's shape (a conv weight keeps its 4 dims; the matrix view is
    /// `[shape[0], numel / shape[0]]`).
    pub shape: Vec<usize>,
    /// Stored dtype of the values (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// Number of pruned (zeroed) elements.
    pub pruned: u64,
    /// `pruned / numel`.
    pub sparsity: f64,
    /// CRC-32 of each stored part's bytes, 8 lowercase hex digits, keyed by suffix.
    pub crc32: BTreeMap<String, String>,
}

/// The `sdsparse` entry of a sparse component file's `__metadata__`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SparseHeader {
    pub format_version: u32,
    /// Component folder name (`unet`, `text_encoder`, ...).
    pub component: String,
    /// `magnitude` or `random`.
    pub method: String,
    /// `layer` or `global`.
    pub scope: String,
    /// Seed of the random method (recorded for every method).
    pub seed: u64,
    /// The dense checkpoint this was converted from (path as given).
    pub source: String,
    /// Pruned tensors by their (unsuffixed) name.
    pub layers: BTreeMap<String, LayerRecord>,
    /// Tensors that were selected for pruning but kept dense, with the reason.
    #[serde(default)]
    pub kept_dense: BTreeMap<String, String>,
}

impl SparseHeader {
    /// Parses the header out of a file's `__metadata__`; `None` for a dense file.
    pub fn from_metadata(
        meta: Option<&std::collections::HashMap<String, String>>,
        file: &str,
    ) -> Result<Option<SparseHeader>> {
        let Some(meta) = meta else { return Ok(None) };
        let Some(json) = meta.get(META_HEADER_KEY) else { return Ok(None) };
        let version: u32 = meta.get(META_VERSION_KEY).and_then(|v| v.parse().ok()).ok_or_else(|| {
            Error::Format(format!("{file}: sparse checkpoint without a valid format version"))
        })?;
        if version != FORMAT_VERSION {
            return Err(Error::Format(format!(
                "{file}: sparse format version {version}, this sdsparse reads version {FORMAT_VERSION}"
            )));
        }
        let h: SparseHeader = serde_json::from_str(json)
            .map_err(|e| Error::Format(format!("{file}: invalid sdsparse metadata ({e})")))?;
        Ok(Some(h))
    }

    /// The `__metadata__` map for a file carrying this header.
    pub fn to_metadata(&self) -> Result<BTreeMap<String, String>> {
        let json = serde_json::to_string(self).map_err(|e| Error::Format(format!("metadata: {e}")))?;
        Ok(BTreeMap::from([
            (META_FORMAT_KEY.to_string(), META_FORMAT_VALUE.to_string()),
            (META_VERSION_KEY.to_string(), FORMAT_VERSION.to_string()),
            (META_HEADER_KEY.to_string(), json),
        ]))
    }
}

/// CRC-32 (IEEE) of bytes as 8 lowercase hex digits.
pub fn crc32_hex(bytes: &[u8]) -> String {
    format!("{:08x}", crc32fast::hash(bytes))
}

/// The matrix view `(rows, cols)` of a tensor shape: rows = first dim (1 for a vector).
pub fn matrix_dims(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [n] => (1, *n),
        [r, ..] => (*r, shape[1..].iter().product()),
    }
}

/// Parses a dtype name as written in metadata.
pub fn dtype_from_name(name: &str) -> Option<DType> {
    match name {
        "f32" => Some(DType::F32),
        "f16" => Some(DType::F16),
        "bf16" => Some(DType::BF16),
        _ => None,
    }
}

/// A buffer of `dtype` values from little-endian bytes.
pub fn host_from_bytes(dtype: DType, bytes: &[u8]) -> HostData {
    let n = bytes.len() / dtype.size_in_bytes();
    let mut out = zeros_like(dtype, n);
    match &mut out {
        HostData::F32(v) => bytemuck::cast_slice_mut::<f32, u8>(v).copy_from_slice(bytes),
        HostData::F16(v) => bytemuck::cast_slice_mut::<f16, u8>(v).copy_from_slice(bytes),
        HostData::BF16(v) => bytemuck::cast_slice_mut::<bf16, u8>(v).copy_from_slice(bytes),
    }
    out
}

fn gather_kept_n<const N: usize>(bytes: &[u8], rows: usize, cols: usize, keep: &[u8]) -> Vec<u8> {
    let rb = bitmap_row_bytes(cols);
    let kept: usize = keep.iter().map(|b| b.count_ones() as usize).sum();
    let mut out = Vec::with_capacity(kept * N);
    for r in 0..rows {
        let row = &bytes[r * cols * N..(r + 1) * cols * N];
        for (byte_i, &m) in keep[r * rb..(r + 1) * rb].iter().enumerate() {
            let c0 = byte_i * 8;
            if m == 0xff && c0 + 8 <= cols {
                out.extend_from_slice(&row[c0 * N..(c0 + 8) * N]);
            } else {
                let mut m = m;
                while m != 0 {
                    let c = c0 + m.trailing_zeros() as usize;
                    if c < cols {
                        out.extend_from_slice(&row[c * N..(c + 1) * N]);
                    }
                    m &= m - 1;
                }
            }
        }
    }
    out
}

/// The bytes of the kept elements (element size `es`) of a dense `[rows, cols]` matrix, in
/// row-major order: the values part of the bitmap format.
pub fn gather_kept_bytes(bytes: &[u8], es: usize, rows: usize, cols: usize, keep: &[u8]) -> Vec<u8> {
    match es {
        2 => gather_kept_n::<2>(bytes, rows, cols, keep),
        4 => gather_kept_n::<4>(bytes, rows, cols, keep),
        _ => gather_kept_n::<1>(bytes, rows * es, cols * es, keep),
    }
}

/// 2:4 values and metadata bytes of a dense `[rows, cols]` matrix (element size `es`)
/// given a keep bitmap with exactly 2 kept per group of 4.
pub fn encode_sparse24_bytes(
    bytes: &[u8],
    es: usize,
    rows: usize,
    cols: usize,
    keep: &[u8],
) -> Result<(Vec<u8>, Vec<u8>)> {
    if !cols.is_multiple_of(4) {
        return Err(Error::Format(format!(
            "2:4 needs the input dimension to be a multiple of 4, got {cols}"
        )));
    }
    if bytes.len() != rows * cols * es || keep.len() != rows * bitmap_row_bytes(cols) {
        return Err(Error::Format("2:4 encode: buffer sizes do not match the shape".into()));
    }
    let mrb = sparse24_meta_row_bytes(cols);
    let krb = bitmap_row_bytes(cols);
    let mut meta = vec![0u8; rows * mrb];
    let mut values = Vec::with_capacity(rows * cols / 2 * es);
    for r in 0..rows {
        let krow = &keep[r * krb..(r + 1) * krb];
        let row = &bytes[r * cols * es..(r + 1) * cols * es];
        for g in 0..cols / 4 {
            // The group's 4 keep bits, then its two positions.
            let nibble_bits = (krow[g / 2] >> (4 * (g % 2))) & 0xf;
            if nibble_bits.count_ones() != 2 {
                return Err(Error::Format(format!(
                    "2:4 encode: row {r} group {g} keeps {} values, expected 2",
                    nibble_bits.count_ones()
                )));
            }
            let i0 = nibble_bits.trailing_zeros() as usize;
            let i1 = (nibble_bits & (nibble_bits - 1)).trailing_zeros() as usize;
            values.extend_from_slice(&row[(4 * g + i0) * es..(4 * g + i0 + 1) * es]);
            values.extend_from_slice(&row[(4 * g + i1) * es..(4 * g + i1 + 1) * es]);
            let nib = (i0 | i1 << 2) as u8;
            meta[r * mrb + g / 2] |= if g.is_multiple_of(2) { nib } else { nib << 4 };
        }
    }
    Ok((values, meta))
}

/// Zeros of `dtype`, `n` of them.
pub fn zeros_like(dtype: DType, n: usize) -> HostData {
    match dtype {
        DType::F32 => HostData::F32(vec![0.0; n]),
        DType::F16 => HostData::F16(vec![f16::ZERO; n]),
        DType::BF16 => HostData::BF16(vec![bf16::ZERO; n]),
    }
}

/// Writes `src[j]` to `dst[pos[j]]` for each `j` (same dtype).
fn scatter(dst: &mut HostData, src: &HostData, pos: impl Iterator<Item = usize>) -> Result<()> {
    match (dst, src) {
        (HostData::F32(d), HostData::F32(s)) => pos.zip(s).for_each(|(p, &x)| d[p] = x),
        (HostData::F16(d), HostData::F16(s)) => pos.zip(s).for_each(|(p, &x)| d[p] = x),
        (HostData::BF16(d), HostData::BF16(s)) => pos.zip(s).for_each(|(p, &x)| d[p] = x),
        _ => return Err(Error::Format("dtype mismatch while decompressing".into())),
    }
    Ok(())
}

/// Whether element `c` of a row is set in an LSB-first row bitmap.
#[inline]
pub fn bit(row: &[u8], c: usize) -> bool {
    row[c / 8] >> (c % 8) & 1 == 1
}

impl Sparse24Weight {
    /// Compresses a dense `[rows, cols]` matrix given its keep bitmap (`bitmap_row_bytes`
    /// layout), which must keep exactly 2 of every group of 4 columns.
    pub fn from_dense(dense: &HostData, rows: usize, cols: usize, keep: &[u8]) -> Result<Self> {
        if dense.len() != rows * cols {
            return Err(Error::Format("2:4 encode: buffer size does not match the shape".into()));
        }
        let dtype = dense.dtype();
        let (values, meta) =
            encode_sparse24_bytes(dense.as_bytes(), dtype.size_in_bytes(), rows, cols, keep)?;
        Ok(Sparse24Weight { rows, cols, values: host_from_bytes(dtype, &values), meta })
    }

    /// Checks sizes and that every nibble names two distinct positions in order.
    pub fn validate(&self) -> Result<()> {
        let (rows, cols) = (self.rows, self.cols);
        if !cols.is_multiple_of(4)
            || self.values.len() != rows * cols / 2
            || self.meta.len() != rows * sparse24_meta_row_bytes(cols)
        {
            return Err(Error::Format(format!(
                "2:4 weight [{rows}, {cols}]: part sizes do not match the shape"
            )));
        }
        let mrb = sparse24_meta_row_bytes(cols);
        for r in 0..rows {
            for g in 0..cols / 4 {
                let nib = (self.meta[r * mrb + g / 2] >> (4 * (g % 2))) & 0xf;
                if (nib & 3) >= (nib >> 2) {
                    return Err(Error::Format(format!("2:4 weight: invalid metadata at row {r} group {g}")));
                }
            }
        }
        Ok(())
    }

    /// Positions (row-major, into the dense matrix) of the stored values, in order.
    fn positions(&self) -> impl Iterator<Item = usize> + '_ {
        let mrb = sparse24_meta_row_bytes(self.cols);
        (0..self.rows).flat_map(move |r| {
            (0..self.cols / 4).flat_map(move |g| {
                let nib = (self.meta[r * mrb + g / 2] >> (4 * (g % 2))) & 0xf;
                let base = r * self.cols + 4 * g;
                [base + (nib & 3) as usize, base + (nib >> 2) as usize]
            })
        })
    }

    /// The dense matrix, zeros in place of pruned values, in the stored dtype.
    pub fn to_dense(&self) -> Result<HostData> {
        self.validate()?;
        let mut out = zeros_like(self.values.dtype(), self.rows * self.cols);
        scatter(&mut out, &self.values, self.positions())?;
        Ok(out)
    }
}

impl BitmapWeight {
    /// Compresses a dense `[rows, cols]` matrix given its keep bitmap.
    pub fn from_dense(dense: &HostData, rows: usize, cols: usize, keep: &[u8]) -> Result<Self> {
        if dense.len() != rows * cols || keep.len() != rows * bitmap_row_bytes(cols) {
            return Err(Error::Format("bitmap encode: buffer sizes do not match the shape".into()));
        }
        let dtype = dense.dtype();
        let bitmap = clear_padding_bits(keep, rows, cols);
        let values = gather_kept_bytes(dense.as_bytes(), dtype.size_in_bytes(), rows, cols, &bitmap);
        Self::from_parts(rows, cols, bitmap, host_from_bytes(dtype, &values))
    }

    /// Rebuilds a weight from its stored parts: computes row offsets from the bitmap and
    /// checks that the number of values matches.
    pub fn from_parts(rows: usize, cols: usize, bitmap: Vec<u8>, values: HostData) -> Result<Self> {
        let rb = bitmap_row_bytes(cols);
        if bitmap.len() != rows * rb {
            return Err(Error::Format(format!("bitmap weight [{rows}, {cols}]: mask has the wrong size")));
        }
        let mut row_offsets = Vec::with_capacity(rows + 1);
        let mut total = 0usize;
        row_offsets.push(0u32);
        for r in 0..rows {
            let row = &bitmap[r * rb..(r + 1) * rb];
            if !cols.is_multiple_of(8) && row[rb - 1] >> (cols % 8) != 0 {
                return Err(Error::Format(format!("bitmap weight: padding bits set in row {r}")));
            }
            total += row.iter().map(|b| b.count_ones() as usize).sum::<usize>();
            row_offsets
                .push(u32::try_from(total).map_err(|_| Error::Format("bitmap weight too large".into()))?);
        }
        if total != values.len() {
            return Err(Error::Format(format!(
                "bitmap weight [{rows}, {cols}]: mask keeps {total} values but {} are stored",
                values.len()
            )));
        }
        Ok(BitmapWeight { rows, cols, bitmap, row_offsets, values })
    }

    /// The dense matrix, zeros in place of pruned values, in the stored dtype.
    pub fn to_dense(&self) -> Result<HostData> {
        let rb = bitmap_row_bytes(self.cols);
        let (rows, cols) = (self.rows, self.cols);
        let bitmap = &self.bitmap;
        let positions = (0..rows).flat_map(move |r| {
            let row = &bitmap[r * rb..(r + 1) * rb];
            (0..cols).filter(move |&c| bit(row, c)).map(move |c| r * cols + c)
        });
        let mut out = zeros_like(self.values.dtype(), rows * cols);
        scatter(&mut out, &self.values, positions)?;
        Ok(out)
    }
}

/// A copy of a keep bitmap with the bits past `cols` in each row cleared.
fn clear_padding_bits(keep: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let rb = bitmap_row_bytes(cols);
    let mut out = keep.to_vec();
    if !cols.is_multiple_of(8) {
        let m = (1u8 << (cols % 8)) - 1;
        for r in 0..rows {
            out[r * rb + rb - 1] &= m;
        }
    }
    out
}

impl Weight {
    /// The dense matrix in the stored dtype.
    pub fn to_dense_host(&self) -> Result<HostData> {
        match self {
            Weight::Dense(t) => t.to_host_data(),
            Weight::Sparse24(w) => w.to_dense(),
            Weight::Bitmap(w) => w.to_dense(),
        }
    }
}
