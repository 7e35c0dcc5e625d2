//! Sparse weights on the GPU in their canonical layouts, and their expansion to dense row-major
//! matrices by the kernels of `cuda/decompress.cu` (for checks, `export`, and any op without a
//! sparse kernel). The CPU reference each kernel is tested against lives here too.
//!
//! Uploading validates the layout on the host first: the kernels trust `row_offsets` and the
//! sizes, so a corrupt weight must be rejected before it can make them read out of bounds.

use super::device::CudaDevice;
use super::params::DecompressParams;
use super::{to_cuda, CudaStorage};
use crate::backend::{Device, Storage, Tensor};
use crate::error::{Error, Result};
use crate::format::{
    bitmap_row_bytes, sparse24_meta_row_bytes, BitmapWeight, DType, HostData, Sparse24Weight, Weight,
};
use cudarc::driver::{CudaSlice, LaunchConfig};
use half::{bf16, f16};

/// Threads per block of the decompression kernels (their `__launch_bounds__`).
const THREADS: u32 = 256;
/// Grid cap; the kernels loop over the rest (grid-stride).
const MAX_BLOCKS: usize = 1 << 16;

/// Values on the GPU in one of the stored element types.
pub enum DeviceValues {
    F16(CudaSlice<f16>),
    BF16(CudaSlice<bf16>),
    F32(CudaSlice<f32>),
}

impl DeviceValues {
    /// Copies host values to the device. An empty buffer is padded to one zero element (a device
    /// allocation cannot be empty; nothing reads it).
    pub fn upload(device: &CudaDevice, data: &HostData) -> Result<DeviceValues> {
        Ok(match data {
            HostData::F16(v) if v.is_empty() => DeviceValues::F16(device.alloc_zeros(1)?),
            HostData::BF16(v) if v.is_empty() => DeviceValues::BF16(device.alloc_zeros(1)?),
            HostData::F32(v) if v.is_empty() => DeviceValues::F32(device.alloc_zeros(1)?),
            HostData::F16(v) => DeviceValues::F16(device.htod(v)?),
            HostData::BF16(v) => DeviceValues::BF16(device.htod(v)?),
            HostData::F32(v) => DeviceValues::F32(device.htod(v)?),
        })
    }
    /// A poisoned (all bytes 0xFF, i.e. NaN) buffer of `len` elements for a kernel to fill.
    pub fn poisoned(device: &CudaDevice, dtype: DType, len: usize) -> Result<DeviceValues> {
        Ok(match dtype {
            DType::F16 => DeviceValues::F16(device.alloc_poisoned(len)?),
            DType::BF16 => DeviceValues::BF16(device.alloc_poisoned(len)?),
            DType::F32 => DeviceValues::F32(device.alloc_poisoned(len)?),
        })
    }
    pub fn dtype(&self) -> DType {
        match self {
            DeviceValues::F16(_) => DType::F16,
            DeviceValues::BF16(_) => DType::BF16,
            DeviceValues::F32(_) => DType::F32,
        }
    }
    pub fn len(&self) -> usize {
        match self {
            DeviceValues::F16(s) => s.len(),
            DeviceValues::BF16(s) => s.len(),
            DeviceValues::F32(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn device_ptr(&self, device: &CudaDevice) -> u64 {
        match self {
            DeviceValues::F16(s) => device.device_ptr(s),
            DeviceValues::BF16(s) => device.device_ptr(s),
            DeviceValues::F32(s) => device.device_ptr(s),
        }
    }
    /// The device address of element `offset` (in elements of this dtype).
    pub fn device_ptr_at(&self, device: &CudaDevice, offset: usize) -> u64 {
        self.device_ptr(device) + (offset * self.dtype().size_in_bytes()) as u64
    }
    /// Copies the values back to the host.
    pub fn to_host(&self, device: &CudaDevice) -> Result<HostData> {
        Ok(match self {
            DeviceValues::F16(s) => HostData::F16(device.dtoh(s)?),
            DeviceValues::BF16(s) => HostData::BF16(device.dtoh(s)?),
            DeviceValues::F32(s) => HostData::F32(device.dtoh(s)?),
        })
    }
}

/// An f16 device buffer seen as the `u16` bit patterns the sparse GEMM kernels take, without
/// a copy (the f16 activations go to `SparseLinear` natively). The alias never frees the
/// allocation (its drop leaks the handle); the borrow it carries keeps the owner alive and, for
/// [`F16Bits::of_mut`], unaliased.
pub struct F16Bits<'a> {
    slice: std::mem::ManuallyDrop<CudaSlice<u16>>,
    _owner: std::marker::PhantomData<&'a mut CudaSlice<f16>>,
}

impl<'a> F16Bits<'a> {
    fn alias(device: &CudaDevice, ptr: u64, len: usize) -> F16Bits<'a> {
        // SAFETY: `ptr` is a live allocation of `len` f16 values on this device's stream, and
        // u16 has f16's size and alignment; the alias is never freed (Drop leaks it).
        let slice = unsafe { device.stream().upgrade_device_ptr::<u16>(ptr, len) };
        F16Bits { slice: std::mem::ManuallyDrop::new(slice), _owner: std::marker::PhantomData }
    }
    /// A read-only operand (the kernels' `x`).
    pub fn of(device: &CudaDevice, s: &'a CudaSlice<f16>) -> F16Bits<'a> {
        Self::alias(device, device.device_ptr(s), s.len())
    }
    /// An output the kernel writes.
    pub fn of_mut(device: &CudaDevice, s: &'a mut CudaSlice<f16>) -> F16Bits<'a> {
        Self::alias(device, device.device_ptr_mut(s), s.len())
    }
}

impl std::ops::Deref for F16Bits<'_> {
    type Target = CudaSlice<u16>;
    fn deref(&self) -> &CudaSlice<u16> {
        &self.slice
    }
}

impl std::ops::DerefMut for F16Bits<'_> {
    fn deref_mut(&mut self) -> &mut CudaSlice<u16> {
        &mut self.slice
    }
}

impl Drop for F16Bits<'_> {
    fn drop(&mut self) {
        // SAFETY: taken once, here; leak() releases the handle without freeing the memory,
        // which belongs to the aliased buffer.
        let slice = unsafe { std::mem::ManuallyDrop::take(&mut self.slice) };
        slice.leak();
    }
}

/// The short type name used in kernel names.
pub(super) fn kernel_type(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
    }
}

fn check_dims(what: &str, rows: usize, cols: usize) -> Result<(u32, u32)> {
    if rows == 0 || cols == 0 {
        return Err(Error::Invalid(format!("{what}: empty weight [{rows}, {cols}]")));
    }
    let too_big = || Error::Invalid(format!("{what}: [{rows}, {cols}] is too large for the GPU kernels"));
    let r = u32::try_from(rows).map_err(|_| too_big())?;
    let c = u32::try_from(cols).map_err(|_| too_big())?;
    rows.checked_mul(cols).ok_or_else(too_big)?;
    Ok((r, c))
}

/// Checks a canonical 2:4 weight's sizes (module docs: the kernels trust them).
pub fn validate_sparse24(w: &Sparse24Weight) -> Result<()> {
    check_dims("2:4 weight", w.rows, w.cols)?;
    if !w.cols.is_multiple_of(4) {
        return Err(Error::Format(format!("2:4 weight with {} columns (not a multiple of 4)", w.cols)));
    }
    if w.values.len() != w.rows * w.cols / 2 {
        return Err(Error::Format(format!(
            "2:4 weight [{}, {}] has {} values, expected {}",
            w.rows,
            w.cols,
            w.values.len(),
            w.rows * w.cols / 2
        )));
    }
    let meta_bytes = w.rows * sparse24_meta_row_bytes(w.cols);
    if w.meta.len() != meta_bytes {
        return Err(Error::Format(format!(
            "2:4 weight [{}, {}] has {} metadata bytes, expected {meta_bytes}",
            w.rows,
            w.cols,
            w.meta.len()
        )));
    }
    Ok(())
}

/// Kept elements of bitmap row `r` (bits past the last column never count).
fn bitmap_row_count(w: &BitmapWeight, r: usize) -> usize {
    let row_bytes = bitmap_row_bytes(w.cols);
    let row = &w.bitmap[r * row_bytes..(r + 1) * row_bytes];
    let mut count: usize = row.iter().map(|b| b.count_ones() as usize).sum();
    let tail_bits = w.cols % 8;
    if tail_bits != 0 {
        count -= (row[row_bytes - 1] >> tail_bits).count_ones() as usize;
    }
    count
}

/// Checks a canonical bitmap weight: sizes, and `row_offsets` consistent with the bitmap.
pub fn validate_bitmap(w: &BitmapWeight) -> Result<()> {
    check_dims("bitmap weight", w.rows, w.cols)?;
    let bitmap_bytes = w.rows * bitmap_row_bytes(w.cols);
    if w.bitmap.len() != bitmap_bytes {
        return Err(Error::Format(format!(
            "bitmap weight [{}, {}] has {} bitmap bytes, expected {bitmap_bytes}",
            w.rows,
            w.cols,
            w.bitmap.len()
        )));
    }
    if w.row_offsets.len() != w.rows + 1 || w.row_offsets[0] != 0 {
        return Err(Error::Format(format!(
            "bitmap weight with {} rows needs {} row offsets starting at 0",
            w.rows,
            w.rows + 1
        )));
    }
    if w.row_offsets[w.rows] as usize != w.values.len() {
        return Err(Error::Format(format!(
            "bitmap weight: row offsets end at {} but there are {} values",
            w.row_offsets[w.rows],
            w.values.len()
        )));
    }
    for r in 0..w.rows {
        let (start, end) = (w.row_offsets[r], w.row_offsets[r + 1]);
        if end < start || (end - start) as usize != bitmap_row_count(w, r) {
            return Err(Error::Format(format!(
                "bitmap weight: row {r} has {} kept elements but its offsets span {start}..{end}",
                bitmap_row_count(w, r)
            )));
        }
    }
    Ok(())
}

/// CPU reference of `sdsparse_decompress_sparse24_*`: the dense `[rows, cols]` matrix. When a
/// (corrupt) group names one position twice, the second value wins, as in the kernel.
pub fn sparse24_to_dense_ref(w: &Sparse24Weight) -> Result<Vec<f32>> {
    validate_sparse24(w)?;
    let values = w.values.to_f32();
    let meta_row = sparse24_meta_row_bytes(w.cols);
    let mut dense = vec![0f32; w.rows * w.cols];
    for r in 0..w.rows {
        for g in 0..w.cols / 4 {
            let nibble = (w.meta[r * meta_row + g / 2] >> (4 * (g % 2))) & 0xF;
            let (i0, i1) = ((nibble & 3) as usize, ((nibble >> 2) & 3) as usize);
            let v = (r * w.cols + 4 * g) / 2;
            dense[r * w.cols + 4 * g + i0] = values[v];
            dense[r * w.cols + 4 * g + i1] = values[v + 1];
        }
    }
    Ok(dense)
}

/// CPU reference of `sdsparse_decompress_bitmap_*`: the dense `[rows, cols]` matrix.
pub fn bitmap_to_dense_ref(w: &BitmapWeight) -> Result<Vec<f32>> {
    validate_bitmap(w)?;
    let values = w.values.to_f32();
    let row_bytes = bitmap_row_bytes(w.cols);
    let mut dense = vec![0f32; w.rows * w.cols];
    for r in 0..w.rows {
        let mut next = w.row_offsets[r] as usize;
        for c in 0..w.cols {
            if (w.bitmap[r * row_bytes + c / 8] >> (c % 8)) & 1 == 1 {
                dense[r * w.cols + c] = values[next];
                next += 1;
            }
        }
    }
    Ok(dense)
}

/// A 2:4 weight on the GPU, canonical layout.
pub struct DeviceSparse24 {
    pub rows: usize,
    pub cols: usize,
    pub values: DeviceValues,
    pub meta: CudaSlice<u8>,
}

impl DeviceSparse24 {
    /// Validates and uploads.
    pub fn upload(device: &CudaDevice, w: &Sparse24Weight) -> Result<DeviceSparse24> {
        validate_sparse24(w)?;
        Ok(DeviceSparse24 {
            rows: w.rows,
            cols: w.cols,
            values: DeviceValues::upload(device, &w.values)?,
            meta: device.htod(&w.meta)?,
        })
    }

    /// The dense `[rows, cols]` matrix as `out` (F16 or F32).
    pub fn to_dense(&self, device: &CudaDevice, out: DType) -> Result<DeviceValues> {
        let (rows, cols) = check_dims("2:4 weight", self.rows, self.cols)?;
        let dense = DeviceValues::poisoned(device, out_dtype(out)?, self.rows * self.cols)?;
        let params = DecompressParams {
            values: self.values.device_ptr(device),
            meta: device.device_ptr(&self.meta),
            row_offsets: 0,
            out: dense.device_ptr(device),
            rows,
            cols,
            meta_row_bytes: sparse24_meta_row_bytes(self.cols) as u32,
            pad0: 0,
        };
        let groups = self.rows * self.cols / 4;
        let kernel =
            format!("sdsparse_decompress_sparse24_{}_{}", kernel_type(self.values.dtype()), kernel_type(out));
        // SAFETY: the buffers were sized by `upload` from a validated weight and `dense` holds
        // rows * cols elements; the kernel supports any grid with THREADS threads per block.
        unsafe { device.launch(&kernel, grid_for(groups, THREADS as usize), &params)? };
        Ok(dense)
    }
}

/// An unstructured weight on the GPU, canonical layout.
pub struct DeviceBitmap {
    pub rows: usize,
    pub cols: usize,
    pub bitmap: CudaSlice<u8>,
    pub row_offsets: CudaSlice<u32>,
    pub values: DeviceValues,
}

impl DeviceBitmap {
    /// Validates and uploads.
    pub fn upload(device: &CudaDevice, w: &BitmapWeight) -> Result<DeviceBitmap> {
        validate_bitmap(w)?;
        Ok(DeviceBitmap {
            rows: w.rows,
            cols: w.cols,
            bitmap: device.htod(&w.bitmap)?,
            row_offsets: device.htod(&w.row_offsets)?,
            values: DeviceValues::upload(device, &w.values)?,
        })
    }

    /// The dense `[rows, cols]` matrix as `out` (F16 or F32).
    pub fn to_dense(&self, device: &CudaDevice, out: DType) -> Result<DeviceValues> {
        let (rows, cols) = check_dims("bitmap weight", self.rows, self.cols)?;
        let dense = DeviceValues::poisoned(device, out_dtype(out)?, self.rows * self.cols)?;
        let params = DecompressParams {
            values: self.values.device_ptr(device),
            meta: device.device_ptr(&self.bitmap),
            row_offsets: device.device_ptr(&self.row_offsets),
            out: dense.device_ptr(device),
            rows,
            cols,
            meta_row_bytes: bitmap_row_bytes(self.cols) as u32,
            pad0: 0,
        };
        let kernel =
            format!("sdsparse_decompress_bitmap_{}_{}", kernel_type(self.values.dtype()), kernel_type(out));
        // One warp (32 threads) per row.
        // SAFETY: as for 2:4; `upload` checked that row_offsets match the bitmap, so every value
        // index the kernel forms is below values.len().
        unsafe { device.launch(&kernel, grid_for(self.rows * 32, THREADS as usize), &params)? };
        Ok(dense)
    }
}

fn out_dtype(out: DType) -> Result<DType> {
    match out {
        DType::F16 | DType::F32 => Ok(out),
        DType::BF16 => Err(Error::Invalid("decompression writes f16 or f32, not bf16".into())),
    }
}

/// `work` items (threads) in blocks of `threads`, capped at MAX_BLOCKS blocks.
fn grid_for(work: usize, threads: usize) -> LaunchConfig {
    let blocks = work.div_ceil(threads).clamp(1, MAX_BLOCKS) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Any weight as a dense f32 `[rows, cols]` tensor on `device`: the GPU expands sparse weights
/// with the kernels above, the CPU with the reference.
pub fn weight_to_dense(w: &Weight, device: &Device) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    match device {
        Device::Cpu => {
            let dense = match w {
                Weight::Dense(t) => t.to_vec()?,
                Weight::Sparse24(s) => sparse24_to_dense_ref(s)?,
                Weight::Bitmap(b) => bitmap_to_dense_ref(b)?,
            };
            Tensor::from_vec(dense, &[rows, cols])
        }
        Device::Cuda(dev) => {
            let dense = match w {
                Weight::Dense(t) => return to_cuda(t, dev),
                Weight::Sparse24(s) => DeviceSparse24::upload(dev, s)?.to_dense(dev, DType::F32)?,
                Weight::Bitmap(b) => DeviceBitmap::upload(dev, b)?.to_dense(dev, DType::F32)?,
            };
            match dense {
                DeviceValues::F32(slice) => Ok(Tensor::from_storage(
                    Storage::Cuda(CudaStorage::from_slice(dev, slice)),
                    &[rows, cols],
                )),
                _ => Err(Error::Cuda("decompression returned the wrong dtype".into())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::test_util::{random_bitmap, random_sparse24, rel_error, TestRng};
    use crate::test_device;

    /// Shapes that hit every path: one row, odd row counts, one group, rows shorter and longer than
    /// a warp's 256-column chunk, and (bitmap only) columns not a multiple of 8 or 4.
    const SPARSE24_SHAPES: &[(usize, usize)] =
        &[(1, 4), (3, 8), (5, 12), (77, 64), (64, 320), (33, 1028), (7, 2304)];
    const BITMAP_SHAPES: &[(usize, usize)] =
        &[(1, 1), (1, 7), (3, 9), (77, 77), (64, 320), (33, 1030), (7, 2304), (300, 24)];
    const DTYPES: [DType; 3] = [DType::F16, DType::BF16, DType::F32];

    #[test]
    fn sparse24_reference_keeps_exactly_the_stored_values() -> Result<()> {
        let mut rng = TestRng::new(7);
        let w = random_sparse24(&mut rng, 5, 16, DType::F32);
        let dense = sparse24_to_dense_ref(&w)?;
        let values = w.values.to_f32();
        for (r, row) in dense.chunks(16).enumerate() {
            for (g, group) in row.chunks(4).enumerate() {
                let kept: Vec<f32> = group.iter().copied().filter(|&v| v != 0.0).collect();
                let v = (r * 16 + 4 * g) / 2;
                assert_eq!(kept, vec![values[v], values[v + 1]], "row {r} group {g}");
            }
        }
        Ok(())
    }

    #[test]
    fn bitmap_reference_places_values_at_set_bits() -> Result<()> {
        let mut rng = TestRng::new(9);
        let w = random_bitmap(&mut rng, 6, 21, 0.5, DType::F32);
        let dense = bitmap_to_dense_ref(&w)?;
        let kept: Vec<f32> = dense.iter().copied().filter(|&v| v != 0.0).collect();
        assert_eq!(kept, w.values.to_f32());
        for r in 0..6 {
            for c in 0..21 {
                let bit = (w.bitmap[r * 3 + c / 8] >> (c % 8)) & 1 == 1;
                assert_eq!(bit, dense[r * 21 + c] != 0.0, "({r}, {c})");
            }
        }
        Ok(())
    }

    #[test]
    fn corrupt_layouts_are_rejected() {
        let mut rng = TestRng::new(3);
        let mut s = random_sparse24(&mut rng, 4, 8, DType::F16);
        s.meta.pop();
        assert!(validate_sparse24(&s).is_err());
        let s = Sparse24Weight { cols: 6, ..random_sparse24(&mut rng, 4, 8, DType::F16) };
        assert!(validate_sparse24(&s).is_err());

        let good = random_bitmap(&mut rng, 4, 13, 0.5, DType::F16);
        assert!(validate_bitmap(&good).is_ok());
        let mut b = good.clone();
        b.row_offsets[2] += 1;
        assert!(validate_bitmap(&b).is_err(), "offsets disagree with the bitmap");
        let mut b = good.clone();
        b.bitmap[0] ^= 1;
        assert!(validate_bitmap(&b).is_err(), "bitmap disagrees with the offsets");
        let mut b = good.clone();
        b.row_offsets.pop();
        assert!(validate_bitmap(&b).is_err());
        // Padding bits past the last column do not count, in the check as in the kernel.
        let mut b = good;
        b.bitmap[1] |= 0x80;
        assert!(validate_bitmap(&b).is_ok());
        assert!(bitmap_to_dense_ref(&b).is_ok());
    }

    /// Every kernel variant (input dtype x output dtype x format) against the CPU reference on
    /// fresh random weights; output buffers start poisoned (NaN), and f32 outputs must match
    /// exactly, f16 outputs exactly after rounding the reference to f16.
    fn decompress_matches_reference(device: &Device) -> Result<()> {
        let seed = TestRng::fresh_seed();
        let mut rng = TestRng::new(seed);
        for &dtype in &DTYPES {
            for &(rows, cols) in SPARSE24_SHAPES {
                let w = Weight::Sparse24(random_sparse24(&mut rng, rows, cols, dtype));
                check_weight(device, &w, seed)?;
            }
            for &(rows, cols) in BITMAP_SHAPES {
                for density in [0.0, 0.35, 0.65, 1.0] {
                    let w = Weight::Bitmap(random_bitmap(&mut rng, rows, cols, density, dtype));
                    check_weight(device, &w, seed)?;
                }
            }
        }
        Ok(())
    }
    test_device!(decompress_matches_reference);

    fn check_weight(device: &Device, w: &Weight, seed: u64) -> Result<()> {
        let what = format!("{} {:?} {} (seed {seed})", w.format_name(), w.dims2()?, value_dtype(w).name());
        let reference = weight_to_dense(w, &Device::Cpu)?.to_vec()?;
        let out = weight_to_dense(w, device)?.to_vec()?;
        assert_eq!(rel_error(&out, &reference), 0.0, "f32 output of {what}");
        assert_eq!(out, reference, "f32 output of {what}");
        if let Device::Cuda(dev) = device {
            let dense16 = match w {
                Weight::Sparse24(s) => DeviceSparse24::upload(dev, s)?.to_dense(dev, DType::F16)?,
                Weight::Bitmap(b) => DeviceBitmap::upload(dev, b)?.to_dense(dev, DType::F16)?,
                Weight::Dense(_) => unreachable!(),
            };
            let HostData::F16(out16) = dense16.to_host(dev)? else { panic!("f16 output expected") };
            let expected: Vec<u16> = reference.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
            let got: Vec<u16> = out16.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, expected, "f16 output of {what}");
        }
        Ok(())
    }

    fn value_dtype(w: &Weight) -> DType {
        match w {
            Weight::Sparse24(s) => s.values.dtype(),
            Weight::Bitmap(b) => b.values.dtype(),
            Weight::Dense(_) => DType::F32,
        }
    }

    /// Host ↔ device copies round-trip exactly.
    fn storage_round_trip(device: &Device) -> Result<()> {
        let data = TestRng::new(TestRng::fresh_seed()).vec(1000);
        let t = Tensor::from_vec(data.clone(), &[10, 100])?;
        let moved = match device {
            Device::Cpu => t.clone(),
            Device::Cuda(dev) => to_cuda(&t, dev)?,
        };
        assert_eq!(moved.shape(), &[10, 100]);
        assert_eq!(moved.to_vec()?, data);
        Ok(())
    }
    test_device!(storage_round_trip);
}
