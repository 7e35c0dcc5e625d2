//! Rust mirrors of the kernel parameter structs in `cuda/include/sdsparse_params.h`.
//!
//! Each struct is `#[repr(C)]` with the header's field order (device pointers as `u64`), and the
//! `assert_layout!` lines check at compile time the same sizes and offsets the header checks with
//! `static_assert`: a field changed on one side only fails the build instead of corrupting a launch.
//!
//! Adding a struct (GEMM, attention): write it in the header first (rules at its top), then mirror
//! it here with `unsafe impl DeviceRepr` and one `assert_layout!` line per field.

use cudarc::driver::DeviceRepr;

/// Compile-time check of a struct's size and its fields' offsets, in bytes.
macro_rules! assert_layout {
    ($ty:ty, size = $size:expr, { $($field:ident = $offset:expr),* $(,)? }) => {
        const _: () = assert!(std::mem::size_of::<$ty>() == $size, concat!("size of ", stringify!($ty)));
        $(const _: () = assert!(
            std::mem::offset_of!($ty, $field) == $offset,
            concat!("offset of ", stringify!($ty), ".", stringify!($field))
        );)*
    };
}

/// `SdsDecompressParams`: expansion of a canonical Sparse24 or Bitmap weight to dense row-major
/// `out[rows, cols]`. For Sparse24 `meta` is the nibble metadata and `row_offsets` is 0; for
/// Bitmap `meta` is the bitmap. `meta_row_bytes` is the row stride of `meta` in bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct DecompressParams {
    pub values: u64,
    pub meta: u64,
    pub row_offsets: u64,
    pub out: u64,
    pub rows: u32,
    pub cols: u32,
    pub meta_row_bytes: u32,
    pub pad0: u32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for DecompressParams {}

assert_layout!(DecompressParams, size = 48, {
    values = 0,
    meta = 8,
    row_offsets = 16,
    out = 24,
    rows = 32,
    cols = 36,
    meta_row_bytes = 40,
    pad0 = 44,
});

/// `(size, [(field, offset)])` of a mirrored struct, for the header cross-check below.
#[cfg(test)]
macro_rules! layout_of {
    ($ty:ty { $($field:ident),* $(,)? }) => {
        (std::mem::size_of::<$ty>(), vec![$((stringify!($field), std::mem::offset_of!($ty, $field))),*])
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// The Rust mirror of each header struct, by its C name. Add an arm per new struct.
    fn rust_layout(c_name: &str) -> Option<(usize, Vec<(&'static str, usize)>)> {
        match c_name {
            "SdsDecompressParams" => Some(layout_of!(DecompressParams {
                values,
                meta,
                row_offsets,
                out,
                rows,
                cols,
                meta_row_bytes,
                pad0
            })),
            _ => None,
        }
    }

    /// The header's `SDS_CHECK_SIZE` / `SDS_CHECK_OFFSET` lines agree with the Rust layouts, so
    /// the two sides are checked against each other even where nvcc is not installed.
    #[test]
    fn header_and_rust_layouts_agree() {
        let header =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/cuda/include/sdsparse_params.h"))
                .expect("read sdsparse_params.h");
        let mut sizes = BTreeMap::new();
        let mut offsets: BTreeMap<String, Vec<(String, usize)>> = BTreeMap::new();
        for line in header.lines().map(str::trim) {
            let args = |prefix: &str| -> Option<Vec<String>> {
                let rest = line.strip_prefix(prefix)?.strip_suffix(");")?;
                Some(rest.split(',').map(|s| s.trim().to_string()).collect())
            };
            if let Some(a) = args("SDS_CHECK_SIZE(") {
                sizes.insert(a[0].clone(), a[1].parse::<usize>().expect("size"));
            } else if let Some(a) = args("SDS_CHECK_OFFSET(") {
                offsets.entry(a[0].clone()).or_default().push((a[1].clone(), a[2].parse().expect("offset")));
            }
        }
        assert!(!sizes.is_empty(), "no SDS_CHECK_SIZE lines found");
        for (name, size) in &sizes {
            let (rust_size, rust_fields) =
                rust_layout(name).unwrap_or_else(|| panic!("{name} has no Rust mirror in params.rs"));
            assert_eq!(*size, rust_size, "size of {name}");
            let c_fields = offsets.get(name).cloned().unwrap_or_default();
            assert_eq!(c_fields.len(), rust_fields.len(), "field count of {name}");
            for ((c_field, c_off), (r_field, r_off)) in c_fields.iter().zip(&rust_fields) {
                assert_eq!((c_field.as_str(), *c_off), (*r_field, *r_off), "field of {name}");
            }
        }
    }
}
