// Kernel parameter structs: the one definition shared by every kernel in cuda/ and by the Rust
// launchers, which mirror each struct with #[repr(C)] in src/backend/cuda/params.rs.
//
// Why one struct per kernel family, passed by value: a launch then pushes a single argument, the
// Rust and C sides cannot disagree on argument order, and a field added here fails to compile on
// the Rust side until the mirror is updated (both sides assert the same sizes and offsets).
//
// Rules for adding a struct (GEMM, attention, ...):
//   1. Plain C: fixed-width integers, device pointers as pointers (8 bytes), no bool, no enums
//      (use uint32_t codes), no bitfields. Order fields largest-alignment first (pointers, then
//      64-bit, then 32-bit) and pad explicitly to a multiple of 8 bytes so there is no implicit
//      padding for the two compilers to disagree on.
//   2. Add SDS_CHECK_SIZE / SDS_CHECK_OFFSET lines below the struct for its size and every field.
//   3. Mirror it in src/backend/cuda/params.rs with the same field order (pointers as u64),
//      `unsafe impl DeviceRepr`, and the matching `assert_layout!` lines.
//   4. Kernels take it by value: `extern "C" __global__ void name(const SdsFooParams p)`.
// Every kernel name starts with `sdsparse_` and is extern "C", because build.rs compiles all of
// cuda/*.cu as one translation unit into one fatbin and Rust looks kernels up by name.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
#define SDS_CHECK_SIZE(T, n) static_assert(sizeof(T) == (n), "size of " #T " changed: update params.rs")
#define SDS_CHECK_OFFSET(T, f, n) \
    static_assert(offsetof(T, f) == (n), "offset of " #T "." #f " changed: update params.rs")
#else
#define SDS_CHECK_SIZE(T, n)
#define SDS_CHECK_OFFSET(T, f, n)
#endif

// ---------------------------------------------------------------------------------------------
// Decompression of the canonical sparse weight layouts (src/format/mod.rs) to dense row-major
// out[rows, cols]. One struct serves both formats:
//   Sparse24: values[rows, cols/2], meta[rows, meta_row_bytes] (a nibble idx0 | idx1 << 2 per
//             group of 4 columns, group g in byte g/2, low nibble for even g); row_offsets unused.
//   Bitmap:   bitmap (in `meta`) [rows, meta_row_bytes], bit c%8 of byte c/8 set when column c is
//             kept; values packed row-major; row_offsets[rows + 1] indexes each row's first value.
// The element types of `values` and `out` are fixed by the kernel name
// (sdsparse_decompress_{sparse24,bitmap}_<in>_<out>, in: f16 | bf16 | f32, out: f16 | f32).
typedef struct SdsDecompressParams {
    const void* values;
    const uint8_t* meta;
    const uint32_t* row_offsets;
    void* out;
    uint32_t rows;
    uint32_t cols;
    uint32_t meta_row_bytes;
    uint32_t pad0;
} SdsDecompressParams;

SDS_CHECK_SIZE(SdsDecompressParams, 48);
SDS_CHECK_OFFSET(SdsDecompressParams, values, 0);
SDS_CHECK_OFFSET(SdsDecompressParams, meta, 8);
SDS_CHECK_OFFSET(SdsDecompressParams, row_offsets, 16);
SDS_CHECK_OFFSET(SdsDecompressParams, out, 24);
SDS_CHECK_OFFSET(SdsDecompressParams, rows, 32);
SDS_CHECK_OFFSET(SdsDecompressParams, cols, 36);
SDS_CHECK_OFFSET(SdsDecompressParams, meta_row_bytes, 40);
SDS_CHECK_OFFSET(SdsDecompressParams, pad0, 44);

// ---------------------------------------------------------------------------------------------
// 2:4 sparse GEMM (cuda/sparse24_gemm.cu, launcher src/backend/cuda/sparse24.rs):
//   y[m, n] = x[m, k] · W[n, k]^T (+ bias) (gelu | geglu) (+ residual)
// x, y, residual f16 row-major; bias f32; W in the device layout of cuda/include/sparse24.cuh
// (values [n_pad][k_pad/2] f16, meta [n_pad/16][k_pad/64][32] u32); flags SP24_FLAG_*.
typedef struct SdsSp24GemmParams {
    const void* x;          // f16 [m][ldx]
    const void* w_values;   // f16 [n_pad][k_pad / 2]
    const uint32_t* w_meta; // [n_pad / 16][k_pad / 64][32]
    const float* bias;      // f32 [n] or null
    const void* residual;   // f16 [m][ldr] or null, added after the activation
    void* y;                // f16 [m][ldy]
    int32_t m, n, k;        // logical GEMM sizes
    int32_t n_pad, k_pad;   // padded weight sizes (multiples of 64)
    int32_t ldx, ldy, ldr;  // row strides in elements (multiples of 8)
    uint32_t flags;         // SP24_FLAG_*
    int32_t reserved;       // pads to a multiple of 8 bytes
} SdsSp24GemmParams;

SDS_CHECK_SIZE(SdsSp24GemmParams, 88);
SDS_CHECK_OFFSET(SdsSp24GemmParams, x, 0);
SDS_CHECK_OFFSET(SdsSp24GemmParams, w_values, 8);
SDS_CHECK_OFFSET(SdsSp24GemmParams, w_meta, 16);
SDS_CHECK_OFFSET(SdsSp24GemmParams, bias, 24);
SDS_CHECK_OFFSET(SdsSp24GemmParams, residual, 32);
SDS_CHECK_OFFSET(SdsSp24GemmParams, y, 40);
SDS_CHECK_OFFSET(SdsSp24GemmParams, m, 48);
SDS_CHECK_OFFSET(SdsSp24GemmParams, n, 52);
SDS_CHECK_OFFSET(SdsSp24GemmParams, k, 56);
SDS_CHECK_OFFSET(SdsSp24GemmParams, n_pad, 60);
SDS_CHECK_OFFSET(SdsSp24GemmParams, k_pad, 64);
SDS_CHECK_OFFSET(SdsSp24GemmParams, ldx, 68);
SDS_CHECK_OFFSET(SdsSp24GemmParams, ldy, 72);
SDS_CHECK_OFFSET(SdsSp24GemmParams, ldr, 76);
SDS_CHECK_OFFSET(SdsSp24GemmParams, flags, 80);
SDS_CHECK_OFFSET(SdsSp24GemmParams, reserved, 84);
