//! Loading a compressed weight out of a checkpoint component: finds the stored entries of a
//! pruned tensor (also under a legacy alias), verifies their checksums and shapes against the
//! sparse header, and builds the [`Weight`]. The byte layouts themselves are `format::codec`'s;
//! this file is the store side, so the format knows bytes and not folders.

use super::{ComponentStore, RawTensor};
use crate::error::{Error, Result};
use crate::format::codec::{
    crc32_hex, matrix_dims, PatternName, BITMAP_MASK, BITMAP_VALUES, S24_META, S24_VALUES,
};
use crate::format::{
    bitmap_row_bytes, sparse24_meta_row_bytes, BitmapWeight, HostData, Sparse24Weight, Weight,
};

/// Finds the stored name under which `name` (or a legacy alias of it) is compressed.
pub fn compressed_name(store: &ComponentStore, name: &str) -> Option<(String, PatternName)> {
    let header = store.sparse_header()?;
    std::iter::once(name.to_string())
        .chain(super::aliases(name))
        .find_map(|n| header.layers.get(&n).map(|rec| (n.clone(), rec.pattern)))
}

/// Loads a compressed weight stored under `name` plus the format's suffixes, verifying
/// part shapes and checksums against the header.
pub fn load_compressed(store: &ComponentStore, name: &str) -> Result<Weight> {
    let (stored, _) = compressed_name(store, name).ok_or_else(|| {
        Error::Checkpoint(format!("{}: tensor {name} not found in the checkpoint", store.describe()))
    })?;
    let header = store.sparse_header().ok_or_else(|| Error::Format("no sparse header".into()))?;
    let rec = &header.layers[&stored];
    let (rows, cols) = matrix_dims(&rec.shape);
    let ctx = || format!("{}: {stored}", store.describe());
    let part = |suffix: &str| -> Result<RawTensor<'_>> {
        let raw = store.raw(&format!("{stored}{suffix}"))?;
        let want = rec
            .crc32
            .get(suffix)
            .ok_or_else(|| Error::Format(format!("{}: no checksum for {suffix}", ctx())))?;
        let got = crc32_hex(raw.bytes);
        if &got != want {
            return Err(Error::Format(format!(
                "{}{suffix}: checksum mismatch (stored {want}, computed {got}); the file is corrupt",
                ctx()
            )));
        }
        Ok(raw)
    };
    let values_dtype = |raw: &RawTensor<'_>| -> Result<HostData> {
        if raw.float_dtype().map(|d| d.name()) != Some(rec.dtype.as_str()) {
            return Err(Error::Format(format!(
                "{}: values dtype {:?} differ from the header's {}",
                ctx(),
                raw.dtype,
                rec.dtype
            )));
        }
        raw.host_data()
    };
    match rec.pattern {
        PatternName::Sparse24 => {
            let v = part(S24_VALUES)?;
            let m = part(S24_META)?;
            if !cols.is_multiple_of(4)
                || v.shape != [rows, cols / 2]
                || m.shape != [rows, sparse24_meta_row_bytes(cols)]
            {
                return Err(Error::Format(format!(
                    "{}: stored 2:4 parts do not match shape {:?}",
                    ctx(),
                    rec.shape
                )));
            }
            let w = Sparse24Weight { rows, cols, values: values_dtype(&v)?, meta: m.bytes.to_vec() };
            w.validate().map_err(|e| Error::Format(format!("{}: {e}", ctx())))?;
            for suffix in [S24_VALUES, S24_META] {
                store.release(&format!("{stored}{suffix}"));
            }
            Ok(Weight::Sparse24(w))
        }
        PatternName::Unstructured => {
            let m = part(BITMAP_MASK)?;
            let v = part(BITMAP_VALUES)?;
            if m.shape != [rows, bitmap_row_bytes(cols)] || v.shape.len() != 1 {
                return Err(Error::Format(format!(
                    "{}: stored bitmap parts do not match shape {:?}",
                    ctx(),
                    rec.shape
                )));
            }
            let w = BitmapWeight::from_parts(rows, cols, m.bytes.to_vec(), values_dtype(&v)?)
                .map_err(|e| Error::Format(format!("{}: {e}", ctx())))?;
            for suffix in [BITMAP_MASK, BITMAP_VALUES] {
                store.release(&format!("{stored}{suffix}"));
            }
            Ok(Weight::Bitmap(w))
        }
    }
}
