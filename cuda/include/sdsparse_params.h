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

// ---------------------------------------------------------------------------------------------
// Activation kernels (cuda/norm.cu, cuda/pointwise.cu; launchers src/backend/cuda/norm.rs and
// pointwise.rs). Storage type T (f32, f16, bf16) is fixed by the kernel name's suffix; all
// arithmetic is f32. Element counts are int32: the launchers reject tensors of 2^31 or more
// elements, so every flat index fits an unsigned 32-bit value (no 64-bit division in the kernels).

// Group norm over x[batch][channels][spatial], `groups` groups of channels / groups channels,
// y = (x - mean) * rstd * gamma[c] + beta[c], then SiLU when flags & SDS_NORM_FLAG_SILU.
// Two kernels: ..._stats writes each group's statistics in `splits` slices to `partials`
// (f32 [batch * groups][splits][2]: slice mean, slice sum of squared deviations), ..._apply merges
// them (Chan et al.) and normalises.
#define SDS_NORM_FLAG_SILU 1u
typedef struct SdsGroupNormParams {
    const void* x;       // T [batch][channels][spatial]
    const float* gamma;  // f32 [channels]
    const float* beta;   // f32 [channels]
    void* y;             // T, the shape of x
    float* partials;     // f32 [batch * groups][splits][2]
    int32_t batch, channels, spatial, groups;
    int32_t splits;      // slices per group in the stats kernel (its grid.x), 1..SDS_NORM_MAX_SPLITS
    uint32_t flags;      // SDS_NORM_FLAG_*
    float eps;
    int32_t reserved;
} SdsGroupNormParams;
#define SDS_NORM_MAX_SPLITS 64

SDS_CHECK_SIZE(SdsGroupNormParams, 72);
SDS_CHECK_OFFSET(SdsGroupNormParams, x, 0);
SDS_CHECK_OFFSET(SdsGroupNormParams, gamma, 8);
SDS_CHECK_OFFSET(SdsGroupNormParams, beta, 16);
SDS_CHECK_OFFSET(SdsGroupNormParams, y, 24);
SDS_CHECK_OFFSET(SdsGroupNormParams, partials, 32);
SDS_CHECK_OFFSET(SdsGroupNormParams, batch, 40);
SDS_CHECK_OFFSET(SdsGroupNormParams, channels, 44);
SDS_CHECK_OFFSET(SdsGroupNormParams, spatial, 48);
SDS_CHECK_OFFSET(SdsGroupNormParams, groups, 52);
SDS_CHECK_OFFSET(SdsGroupNormParams, splits, 56);
SDS_CHECK_OFFSET(SdsGroupNormParams, flags, 60);
SDS_CHECK_OFFSET(SdsGroupNormParams, eps, 64);
SDS_CHECK_OFFSET(SdsGroupNormParams, reserved, 68);

// Layer norm over rows of x[rows][dim]: y = (x - mean) * rstd * gamma + beta.
typedef struct SdsLayerNormParams {
    const void* x;       // T [rows][dim]
    const float* gamma;  // f32 [dim]
    const float* beta;   // f32 [dim]
    void* y;             // T [rows][dim]
    int32_t rows, dim;
    float eps;
    int32_t reserved;
} SdsLayerNormParams;

SDS_CHECK_SIZE(SdsLayerNormParams, 48);
SDS_CHECK_OFFSET(SdsLayerNormParams, x, 0);
SDS_CHECK_OFFSET(SdsLayerNormParams, gamma, 8);
SDS_CHECK_OFFSET(SdsLayerNormParams, beta, 16);
SDS_CHECK_OFFSET(SdsLayerNormParams, y, 24);
SDS_CHECK_OFFSET(SdsLayerNormParams, rows, 32);
SDS_CHECK_OFFSET(SdsLayerNormParams, dim, 36);
SDS_CHECK_OFFSET(SdsLayerNormParams, eps, 40);
SDS_CHECK_OFFSET(SdsLayerNormParams, reserved, 44);

// Element-wise ops over y[n] (sdsparse_eltwise_{gelu,silu,add,cfg}_<T>):
//   gelu, silu: y[i] = f(a[i])                       (b unused)
//   add:        y[i] = a[i] + b[(i / b_div) % b_len]  (b broadcast: same shape, [B, C, 1, 1], [C])
//   sub/mul/div: the same with -, *, /
//   cfg:        y[i] = a[i] + alpha * (b[i] - a[i])   (a uncond, b cond, alpha the guidance scale)
typedef struct SdsEltwiseParams {
    const void* a;  // T [n]
    const void* b;  // T [b_len] (add) or [n] (cfg)
    void* y;        // T [n]
    int32_t n;
    int32_t b_div, b_len;
    float alpha;
} SdsEltwiseParams;

SDS_CHECK_SIZE(SdsEltwiseParams, 40);
SDS_CHECK_OFFSET(SdsEltwiseParams, a, 0);
SDS_CHECK_OFFSET(SdsEltwiseParams, b, 8);
SDS_CHECK_OFFSET(SdsEltwiseParams, y, 16);
SDS_CHECK_OFFSET(SdsEltwiseParams, n, 24);
SDS_CHECK_OFFSET(SdsEltwiseParams, b_div, 28);
SDS_CHECK_OFFSET(SdsEltwiseParams, b_len, 32);
SDS_CHECK_OFFSET(SdsEltwiseParams, alpha, 36);

// GEGLU over rows of x[rows][2 * half]: y[r][j] = x[r][j] * gelu(x[r][half + j]) (diffusers'
// `hidden, gate = proj(x).chunk(2, dim=-1); hidden * gelu(gate)`).
typedef struct SdsGegluParams {
    const void* x;  // T [rows][2 * half]
    void* y;        // T [rows][half]
    int32_t rows, half;
} SdsGegluParams;

SDS_CHECK_SIZE(SdsGegluParams, 24);
SDS_CHECK_OFFSET(SdsGegluParams, x, 0);
SDS_CHECK_OFFSET(SdsGegluParams, y, 8);
SDS_CHECK_OFFSET(SdsGegluParams, rows, 16);
SDS_CHECK_OFFSET(SdsGegluParams, half, 20);

// Nearest upsampling of `planes` images x[planes][h][w] to y[planes][out_h][out_w], PyTorch's
// `F.interpolate(mode="nearest")` index rule: src = min(floor(dst * (in / out)), in - 1) in f32
// (exactly dst / 2 for 2x).
typedef struct SdsUpsampleParams {
    const void* x;  // T [planes][h][w]
    void* y;        // T [planes][out_h][out_w]
    int32_t planes, h, w, out_h, out_w;
    int32_t reserved;
} SdsUpsampleParams;

SDS_CHECK_SIZE(SdsUpsampleParams, 40);
SDS_CHECK_OFFSET(SdsUpsampleParams, x, 0);
SDS_CHECK_OFFSET(SdsUpsampleParams, y, 8);
SDS_CHECK_OFFSET(SdsUpsampleParams, planes, 16);
SDS_CHECK_OFFSET(SdsUpsampleParams, h, 20);
SDS_CHECK_OFFSET(SdsUpsampleParams, w, 24);
SDS_CHECK_OFFSET(SdsUpsampleParams, out_h, 28);
SDS_CHECK_OFFSET(SdsUpsampleParams, out_w, 32);
SDS_CHECK_OFFSET(SdsUpsampleParams, reserved, 36);

// Concatenation of a[outer][a_inner] and b[outer][b_inner] into y[outer][a_inner + b_inner]
// (along channels of [B, C, H, W]: outer = B, a_inner = Ca * H * W, b_inner = Cb * H * W).
typedef struct SdsConcatParams {
    const void* a;  // T [outer][a_inner]
    const void* b;  // T [outer][b_inner]
    void* y;        // T [outer][a_inner + b_inner]
    int32_t outer, a_inner, b_inner;
    int32_t reserved;
} SdsConcatParams;

SDS_CHECK_SIZE(SdsConcatParams, 40);
SDS_CHECK_OFFSET(SdsConcatParams, a, 0);
SDS_CHECK_OFFSET(SdsConcatParams, b, 8);
SDS_CHECK_OFFSET(SdsConcatParams, y, 16);
SDS_CHECK_OFFSET(SdsConcatParams, outer, 24);
SDS_CHECK_OFFSET(SdsConcatParams, a_inner, 28);
SDS_CHECK_OFFSET(SdsConcatParams, b_inner, 32);
SDS_CHECK_OFFSET(SdsConcatParams, reserved, 36);

// diffusers' get_timestep_embedding (max period 10000): half = dim / 2,
// freq_i = exp(-ln(10000) * i / (half - freq_shift)), row = [sin(t freq), cos(t freq)] or
// [cos, sin] with flip_sin_to_cos, a zero column appended when dim is odd.
typedef struct SdsTimestepParams {
    const float* timesteps;  // f32 [count]
    void* y;                 // T [count][dim]
    int32_t count, dim;
    uint32_t flip_sin_to_cos;
    float freq_shift;
} SdsTimestepParams;

SDS_CHECK_SIZE(SdsTimestepParams, 32);
SDS_CHECK_OFFSET(SdsTimestepParams, timesteps, 0);
SDS_CHECK_OFFSET(SdsTimestepParams, y, 8);
SDS_CHECK_OFFSET(SdsTimestepParams, count, 16);
SDS_CHECK_OFFSET(SdsTimestepParams, dim, 20);
SDS_CHECK_OFFSET(SdsTimestepParams, flip_sin_to_cos, 24);
SDS_CHECK_OFFSET(SdsTimestepParams, freq_shift, 28);

// ---------------------------------------------------------------------------------------------
// Tensor-manipulation kernels of cuda/tensor.cu (issue 8, phase 2). T is the storage type of the
// kernel name (_f32 / _f16 / _bf16); arithmetic in f32.

// affine: y[i] = x[i] * mul + add over n elements. The cast kernels
// (sdsparse_cast_<from>_<to>) use the same struct with mul = 1, add = 0 and ignore both.
typedef struct SdsAffineParams {
    const void* x;  // T [n] (cast: the source type)
    void* y;        // T [n] (cast: the destination type)
    int32_t n;
    float mul, add;
    int32_t reserved;
} SdsAffineParams;

SDS_CHECK_SIZE(SdsAffineParams, 32);
SDS_CHECK_OFFSET(SdsAffineParams, x, 0);
SDS_CHECK_OFFSET(SdsAffineParams, y, 8);
SDS_CHECK_OFFSET(SdsAffineParams, n, 16);
SDS_CHECK_OFFSET(SdsAffineParams, mul, 20);
SDS_CHECK_OFFSET(SdsAffineParams, add, 24);
SDS_CHECK_OFFSET(SdsAffineParams, reserved, 28);

#define SDS_STRIDED_MAX_RANK 6

// Strided gather (permute, transpose, narrow): output element i, with coordinates (c_0..c_{r-1})
// of the row-major output shape dims[0..rank), reads x[offset + sum_d c_d * strides[d]].
typedef struct SdsStridedCopyParams {
    const void* x;  // T
    void* y;        // T [prod(dims)]
    int32_t n;      // prod(dims)
    int32_t rank;   // 1..=SDS_STRIDED_MAX_RANK
    int32_t offset;
    int32_t reserved;
    int32_t dims[SDS_STRIDED_MAX_RANK];
    int32_t strides[SDS_STRIDED_MAX_RANK];
} SdsStridedCopyParams;

SDS_CHECK_SIZE(SdsStridedCopyParams, 80);
SDS_CHECK_OFFSET(SdsStridedCopyParams, x, 0);
SDS_CHECK_OFFSET(SdsStridedCopyParams, y, 8);
SDS_CHECK_OFFSET(SdsStridedCopyParams, n, 16);
SDS_CHECK_OFFSET(SdsStridedCopyParams, rank, 20);
SDS_CHECK_OFFSET(SdsStridedCopyParams, offset, 24);
SDS_CHECK_OFFSET(SdsStridedCopyParams, reserved, 28);
SDS_CHECK_OFFSET(SdsStridedCopyParams, dims, 32);
SDS_CHECK_OFFSET(SdsStridedCopyParams, strides, 56);

// Embedding gather: y[r][c] = table[ids[r]][c]; the launcher checked every id < vocab.
typedef struct SdsEmbeddingParams {
    const void* table;    // T [vocab][dim]
    const uint32_t* ids;  // [count]
    void* y;              // T [count][dim]
    int32_t count, dim;
    int32_t vocab, reserved;
} SdsEmbeddingParams;

SDS_CHECK_SIZE(SdsEmbeddingParams, 40);
SDS_CHECK_OFFSET(SdsEmbeddingParams, table, 0);
SDS_CHECK_OFFSET(SdsEmbeddingParams, ids, 8);
SDS_CHECK_OFFSET(SdsEmbeddingParams, y, 16);
SDS_CHECK_OFFSET(SdsEmbeddingParams, count, 24);
SDS_CHECK_OFFSET(SdsEmbeddingParams, dim, 28);
SDS_CHECK_OFFSET(SdsEmbeddingParams, vocab, 32);
SDS_CHECK_OFFSET(SdsEmbeddingParams, reserved, 36);

// Softmax over the last dim of x[rows][cols] of (x * scale), in f32. With `causal`, row r is
// query q = r % q_len of a [.., q_len, cols] score block and column j is masked (probability 0)
// when j > q + cols - q_len (the attention ops' causal rule). A row with no unmasked column
// gives zeros.
typedef struct SdsSoftmaxParams {
    const void* x;  // T [rows][cols]
    void* y;        // T [rows][cols]
    int32_t rows, cols;
    float scale;
    uint32_t causal;
    int32_t q_len;
    int32_t reserved;
} SdsSoftmaxParams;

SDS_CHECK_SIZE(SdsSoftmaxParams, 40);
SDS_CHECK_OFFSET(SdsSoftmaxParams, x, 0);
SDS_CHECK_OFFSET(SdsSoftmaxParams, y, 8);
SDS_CHECK_OFFSET(SdsSoftmaxParams, rows, 16);
SDS_CHECK_OFFSET(SdsSoftmaxParams, cols, 20);
SDS_CHECK_OFFSET(SdsSoftmaxParams, scale, 24);
SDS_CHECK_OFFSET(SdsSoftmaxParams, causal, 28);
SDS_CHECK_OFFSET(SdsSoftmaxParams, q_len, 32);
SDS_CHECK_OFFSET(SdsSoftmaxParams, reserved, 36);

// im2col of one image x[c_in][h][w] for a kh x kw convolution (stride, zero padding):
// col[(c * kh + i) * kw + j][oy * out_w + ox] = x[c][oy * stride + i - pad][ox * stride + j - pad]
// (0 outside the image), so the convolution is W[c_out][c_in * kh * kw] . col.
typedef struct SdsIm2colParams {
    const void* x;  // T [c_in][h][w]
    void* col;      // T [c_in * kh * kw][out_h * out_w]
    int32_t c_in, h, w;
    int32_t kh, kw;
    int32_t stride, pad;
    int32_t out_h, out_w;
    int32_t reserved;
} SdsIm2colParams;

SDS_CHECK_SIZE(SdsIm2colParams, 56);
SDS_CHECK_OFFSET(SdsIm2colParams, x, 0);
SDS_CHECK_OFFSET(SdsIm2colParams, col, 8);
SDS_CHECK_OFFSET(SdsIm2colParams, c_in, 16);
SDS_CHECK_OFFSET(SdsIm2colParams, h, 20);
SDS_CHECK_OFFSET(SdsIm2colParams, w, 24);
SDS_CHECK_OFFSET(SdsIm2colParams, kh, 28);
SDS_CHECK_OFFSET(SdsIm2colParams, kw, 32);
SDS_CHECK_OFFSET(SdsIm2colParams, stride, 36);
SDS_CHECK_OFFSET(SdsIm2colParams, pad, 40);
SDS_CHECK_OFFSET(SdsIm2colParams, out_h, 44);
SDS_CHECK_OFFSET(SdsIm2colParams, out_w, 48);
SDS_CHECK_OFFSET(SdsIm2colParams, reserved, 52);
