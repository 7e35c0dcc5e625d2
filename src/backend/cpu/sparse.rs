//! Expansion of compressed weights (2:4 and bitmap, canonical layouts of `format`) into a
//! dense row-major f32 buffer, one layer at a time, for the CPU `linear`. Values may be
//! stored as f32, f16 or bf16; they are widened here. Corrupt layouts are errors.

use super::PAR_MIN_ELEMS;
use crate::error::{Error, Result};
use crate::format::{
    bitmap_row_bytes, sparse24_meta_row_bytes, BitmapWeight, HostData, Sparse24Weight, Weight,
};
use half::{bf16, f16};
use rayon::prelude::*;

/// A stored value type that widens to f32.
trait Widen: Copy + Send + Sync {
    fn widen(self) -> f32;
}
impl Widen for f32 {
    fn widen(self) -> f32 {
        self
    }
}
impl Widen for f16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}
impl Widen for bf16 {
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Writes the dense `[rows, cols]` form of a compressed (or dense) weight into `out`, which
/// must hold exactly `rows * cols` values.
pub fn decompress_into(w: &Weight, out: &mut [f32]) -> Result<()> {
    let (rows, cols) = w.dims2()?;
    if out.len() != rows * cols {
        return Err(Error::Shape(format!("decompress: buffer of {} for [{rows}, {cols}]", out.len())));
    }
    match w {
        Weight::Dense(t) => match t.storage() {
            crate::backend::Storage::Cpu(s) => s.widen_range_into(0, out),
            _ => return Err(Error::Invalid("decompress: the weight is on the GPU".into())),
        },
        Weight::Sparse24(s) => match &s.values {
            HostData::F32(v) => sparse24(s, v, out)?,
            HostData::F16(v) => sparse24(s, v, out)?,
            HostData::BF16(v) => sparse24(s, v, out)?,
        },
        Weight::Bitmap(b) => match &b.values {
            HostData::F32(v) => bitmap(b, v, out)?,
            HostData::F16(v) => bitmap(b, v, out)?,
            HostData::BF16(v) => bitmap(b, v, out)?,
        },
    }
    Ok(())
}

/// The dense form of a weight as a new vector.
pub fn decompress(w: &Weight) -> Result<Vec<f32>> {
    let (rows, cols) = w.dims2()?;
    let mut out = vec![0.0; rows * cols];
    decompress_into(w, &mut out)?;
    Ok(out)
}

fn sparse24<T: Widen>(w: &Sparse24Weight, values: &[T], out: &mut [f32]) -> Result<()> {
    let (rows, cols) = (w.rows, w.cols);
    if cols % 4 != 0 {
        return Err(Error::Format(format!("2:4 weight with {cols} columns (not a multiple of 4)")));
    }
    let meta_row = sparse24_meta_row_bytes(cols);
    if values.len() != rows * cols / 2 || w.meta.len() != rows * meta_row {
        return Err(Error::Format(format!(
            "2:4 weight [{rows}, {cols}]: {} values and {} metadata bytes, expected {} and {}",
            values.len(),
            w.meta.len(),
            rows * cols / 2,
            rows * meta_row
        )));
    }
    if cols == 0 {
        return Ok(());
    }
    let expand_row = |(r, dst): (usize, &mut [f32])| -> Result<()> {
        let vals = &values[r * cols / 2..(r + 1) * cols / 2];
        let meta = &w.meta[r * meta_row..(r + 1) * meta_row];
        for (g, (quad, pair)) in dst.chunks_exact_mut(4).zip(vals.chunks_exact(2)).enumerate() {
            let nibble = (meta[g / 2] >> (4 * (g % 2))) & 0xf;
            let (i0, i1) = ((nibble & 3) as usize, (nibble >> 2) as usize);
            if i0 >= i1 {
                return Err(Error::Format(format!("2:4 weight: bad metadata in row {r}, group {g}")));
            }
            quad.fill(0.0);
            quad[i0] = pair[0].widen();
            quad[i1] = pair[1].widen();
        }
        Ok(())
    };
    if rows * cols >= PAR_MIN_ELEMS {
        out.par_chunks_mut(cols).enumerate().try_for_each(expand_row)
    } else {
        out.chunks_mut(cols).enumerate().try_for_each(expand_row)
    }
}

fn bitmap<T: Widen>(w: &BitmapWeight, values: &[T], out: &mut [f32]) -> Result<()> {
    let (rows, cols) = (w.rows, w.cols);
    let map_row = bitmap_row_bytes(cols);
    let offsets = &w.row_offsets;
    let bad = |what: String| Error::Format(format!("bitmap weight [{rows}, {cols}]: {what}"));
    if w.bitmap.len() != rows * map_row || offsets.len() != rows + 1 {
        return Err(bad(format!(
            "{} bitmap bytes and {} row offsets, expected {} and {}",
            w.bitmap.len(),
            offsets.len(),
            rows * map_row,
            rows + 1
        )));
    }
    if offsets[0] != 0 || offsets[rows] as usize != values.len() || offsets.windows(2).any(|p| p[0] > p[1]) {
        return Err(bad(format!("row offsets do not index the {} values", values.len())));
    }
    if cols == 0 {
        return Ok(());
    }
    let expand_row = |(r, dst): (usize, &mut [f32])| -> Result<()> {
        let mut vals = values[offsets[r] as usize..offsets[r + 1] as usize].iter();
        let bits = &w.bitmap[r * map_row..(r + 1) * map_row];
        dst.fill(0.0);
        for (byte_index, &byte) in bits.iter().enumerate() {
            let mut b = byte;
            while b != 0 {
                let c = byte_index * 8 + b.trailing_zeros() as usize;
                b &= b - 1;
                let v = vals.next().ok_or_else(|| bad(format!("row {r} has more bits than values")))?;
                *dst.get_mut(c).ok_or_else(|| bad(format!("row {r} has bits past column {cols}")))? =
                    v.widen();
            }
        }
        if vals.next().is_some() {
            return Err(bad(format!("row {r} has more values than bits")));
        }
        Ok(())
    };
    if rows * cols >= PAR_MIN_ELEMS {
        out.par_chunks_mut(cols).enumerate().try_for_each(expand_row)
    } else {
        out.chunks_mut(cols).enumerate().try_for_each(expand_row)
    }
}
