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

/// `SdsSp24GemmParams`: one 2:4 sparse GEMM launch (`cuda/sparse24_gemm.cu`, launcher
/// `sparse24.rs`): `y[m, n] = x[m, k] · W[n, k]^T` with the fused epilogue selected by `flags`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Sp24GemmParams {
    pub x: u64,
    pub w_values: u64,
    pub w_meta: u64,
    pub bias: u64,
    pub residual: u64,
    pub y: u64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub n_pad: i32,
    pub k_pad: i32,
    pub ldx: i32,
    pub ldy: i32,
    pub ldr: i32,
    pub flags: u32,
    pub reserved: i32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for Sp24GemmParams {}

assert_layout!(Sp24GemmParams, size = 88, {
    x = 0,
    w_values = 8,
    w_meta = 16,
    bias = 24,
    residual = 32,
    y = 40,
    m = 48,
    n = 52,
    k = 56,
    n_pad = 60,
    k_pad = 64,
    ldx = 68,
    ldy = 72,
    ldr = 76,
    flags = 80,
    reserved = 84,
});

/// `SDS_NORM_FLAG_SILU`: apply SiLU after the group norm.
pub const NORM_FLAG_SILU: u32 = 1;
/// `SDS_NORM_MAX_SPLITS`: most statistics slices per group.
pub const NORM_MAX_SPLITS: usize = 64;

/// `SdsGroupNormParams`: Group norm (`cuda/norm.cu`, launcher `norm.rs`): statistics in `splits` slices per group
/// into `partials`, then the normalisation (+ SiLU with `NORM_FLAG_SILU`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GroupNormParams {
    pub x: u64,
    pub gamma: u64,
    pub beta: u64,
    pub y: u64,
    pub partials: u64,
    pub batch: i32,
    pub channels: i32,
    pub spatial: i32,
    pub groups: i32,
    pub splits: i32,
    pub flags: u32,
    pub eps: f32,
    pub reserved: i32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for GroupNormParams {}

assert_layout!(GroupNormParams, size = 72, {
    x = 0,
    gamma = 8,
    beta = 16,
    y = 24,
    partials = 32,
    batch = 40,
    channels = 44,
    spatial = 48,
    groups = 52,
    splits = 56,
    flags = 60,
    eps = 64,
    reserved = 68,
});

/// `SdsLayerNormParams`: Layer norm over rows (`cuda/norm.cu`, launcher `norm.rs`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct LayerNormParams {
    pub x: u64,
    pub gamma: u64,
    pub beta: u64,
    pub y: u64,
    pub rows: i32,
    pub dim: i32,
    pub eps: f32,
    pub reserved: i32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for LayerNormParams {}

assert_layout!(LayerNormParams, size = 48, {
    x = 0,
    gamma = 8,
    beta = 16,
    y = 24,
    rows = 32,
    dim = 36,
    eps = 40,
    reserved = 44,
});

/// `SdsEltwiseParams`: Element-wise GELU / SiLU / broadcast add / CFG combine (`cuda/pointwise.cu`, launcher
/// `pointwise.rs`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EltwiseParams {
    pub a: u64,
    pub b: u64,
    pub y: u64,
    pub n: i32,
    pub b_div: i32,
    pub b_len: i32,
    pub alpha: f32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for EltwiseParams {}

assert_layout!(EltwiseParams, size = 40, {
    a = 0,
    b = 8,
    y = 16,
    n = 24,
    b_div = 28,
    b_len = 32,
    alpha = 36,
});

/// `SdsGegluParams`: GEGLU over rows (`cuda/pointwise.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GegluParams {
    pub x: u64,
    pub y: u64,
    pub rows: i32,
    pub half: i32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for GegluParams {}

assert_layout!(GegluParams, size = 24, {
    x = 0,
    y = 8,
    rows = 16,
    half = 20,
});

/// `SdsUpsampleParams`: Nearest upsampling to an explicit size (`cuda/pointwise.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct UpsampleParams {
    pub x: u64,
    pub y: u64,
    pub planes: i32,
    pub h: i32,
    pub w: i32,
    pub out_h: i32,
    pub out_w: i32,
    pub reserved: i32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for UpsampleParams {}

assert_layout!(UpsampleParams, size = 40, {
    x = 0,
    y = 8,
    planes = 16,
    h = 20,
    w = 24,
    out_h = 28,
    out_w = 32,
    reserved = 36,
});

/// `SdsConcatParams`: Concatenation of two operands (`cuda/pointwise.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct ConcatParams {
    pub a: u64,
    pub b: u64,
    pub y: u64,
    pub outer: i32,
    pub a_inner: i32,
    pub b_inner: i32,
    pub reserved: i32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for ConcatParams {}

assert_layout!(ConcatParams, size = 40, {
    a = 0,
    b = 8,
    y = 16,
    outer = 24,
    a_inner = 28,
    b_inner = 32,
    reserved = 36,
});

/// `SdsTimestepParams`: Sinusoidal timestep embedding (`cuda/pointwise.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct TimestepParams {
    pub timesteps: u64,
    pub y: u64,
    pub count: i32,
    pub dim: i32,
    pub flip_sin_to_cos: u32,
    pub freq_shift: f32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for TimestepParams {}

assert_layout!(TimestepParams, size = 32, {
    timesteps = 0,
    y = 8,
    count = 16,
    dim = 20,
    flip_sin_to_cos = 24,
    freq_shift = 28,
});

/// `SdsAffineParams`: affine map and dtype casts (`cuda/tensor.cu`, launcher `tensor_ops.rs`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct AffineParams {
    pub x: u64,
    pub y: u64,
    pub n: i32,
    pub mul: f32,
    pub add: f32,
    pub reserved: i32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for AffineParams {}

assert_layout!(AffineParams, size = 32, {
    x = 0,
    y = 8,
    n = 16,
    mul = 20,
    add = 24,
    reserved = 28,
});

/// `SDS_STRIDED_MAX_RANK`: the most dims a strided copy takes.
pub const STRIDED_MAX_RANK: usize = 6;

/// `SdsStridedCopyParams`: strided gather for permute / narrow (`cuda/tensor.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct StridedCopyParams {
    pub x: u64,
    pub y: u64,
    pub n: i32,
    pub rank: i32,
    pub offset: i32,
    pub reserved: i32,
    pub dims: [i32; STRIDED_MAX_RANK],
    pub strides: [i32; STRIDED_MAX_RANK],
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for StridedCopyParams {}

assert_layout!(StridedCopyParams, size = 80, {
    x = 0,
    y = 8,
    n = 16,
    rank = 20,
    offset = 24,
    reserved = 28,
    dims = 32,
    strides = 56,
});

/// `SdsEmbeddingParams`: embedding gather (`cuda/tensor.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct EmbeddingParams {
    pub table: u64,
    pub ids: u64,
    pub y: u64,
    pub count: i32,
    pub dim: i32,
    pub vocab: i32,
    pub reserved: i32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for EmbeddingParams {}

assert_layout!(EmbeddingParams, size = 40, {
    table = 0,
    ids = 8,
    y = 16,
    count = 24,
    dim = 28,
    vocab = 32,
    reserved = 36,
});

/// `SdsSoftmaxParams`: scaled (causal) softmax over the last dim (`cuda/tensor.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct SoftmaxParams {
    pub x: u64,
    pub y: u64,
    pub rows: i32,
    pub cols: i32,
    pub scale: f32,
    pub causal: u32,
    pub q_len: i32,
    pub reserved: i32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for SoftmaxParams {}

assert_layout!(SoftmaxParams, size = 40, {
    x = 0,
    y = 8,
    rows = 16,
    cols = 20,
    scale = 24,
    causal = 28,
    q_len = 32,
    reserved = 36,
});

/// `SdsIm2colParams`: im2col of one image (`cuda/tensor.cu`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Im2colParams {
    pub x: u64,
    pub col: u64,
    pub c_in: i32,
    pub h: i32,
    pub w: i32,
    pub kh: i32,
    pub kw: i32,
    pub stride: i32,
    pub pad: i32,
    pub out_h: i32,
    pub out_w: i32,
    pub reserved: i32,
}

// SAFETY: plain old data with the C layout asserted below; kernels take it by value.
unsafe impl DeviceRepr for Im2colParams {}

assert_layout!(Im2colParams, size = 56, {
    x = 0,
    col = 8,
    c_in = 16,
    h = 20,
    w = 24,
    kh = 28,
    kw = 32,
    stride = 36,
    pad = 40,
    out_h = 44,
    out_w = 48,
    reserved = 52,
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
            "SdsSp24GemmParams" => Some(layout_of!(Sp24GemmParams {
                x,
                w_values,
                w_meta,
                bias,
                residual,
                y,
                m,
                n,
                k,
                n_pad,
                k_pad,
                ldx,
                ldy,
                ldr,
                flags,
                reserved
            })),
            "SdsGroupNormParams" => Some(layout_of!(GroupNormParams {
                x,
                gamma,
                beta,
                y,
                partials,
                batch,
                channels,
                spatial,
                groups,
                splits,
                flags,
                eps,
                reserved
            })),
            "SdsLayerNormParams" => {
                Some(layout_of!(LayerNormParams { x, gamma, beta, y, rows, dim, eps, reserved }))
            }
            "SdsEltwiseParams" => Some(layout_of!(EltwiseParams { a, b, y, n, b_div, b_len, alpha })),
            "SdsGegluParams" => Some(layout_of!(GegluParams { x, y, rows, half })),
            "SdsUpsampleParams" => {
                Some(layout_of!(UpsampleParams { x, y, planes, h, w, out_h, out_w, reserved }))
            }
            "SdsConcatParams" => {
                Some(layout_of!(ConcatParams { a, b, y, outer, a_inner, b_inner, reserved }))
            }
            "SdsTimestepParams" => {
                Some(layout_of!(TimestepParams { timesteps, y, count, dim, flip_sin_to_cos, freq_shift }))
            }
            "SdsAffineParams" => Some(layout_of!(AffineParams { x, y, n, mul, add, reserved })),
            "SdsStridedCopyParams" => {
                Some(layout_of!(StridedCopyParams { x, y, n, rank, offset, reserved, dims, strides }))
            }
            "SdsEmbeddingParams" => {
                Some(layout_of!(EmbeddingParams { table, ids, y, count, dim, vocab, reserved }))
            }
            "SdsSoftmaxParams" => {
                Some(layout_of!(SoftmaxParams { x, y, rows, cols, scale, causal, q_len, reserved }))
            }
            "SdsIm2colParams" => Some(layout_of!(Im2colParams {
                x,
                col,
                c_in,
                h,
                w,
                kh,
                kw,
                stride,
                pad,
                out_h,
                out_w,
                reserved
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
