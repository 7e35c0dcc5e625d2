// Launch parameters of the unstructured sparse GEMM and the fused attention kernels.
//
// Self-contained so that the shared `sdsparse_params.h` can simply `#include` it. Every
// struct here is passed to its kernel by value (one `__grid_constant__` argument) and has
// a `#[repr(C)]` mirror in Rust (src/backend/cuda/unstructured.rs, attention.rs) whose size
// and field offsets are asserted at compile time on both sides.
#pragma once
#include <stddef.h>
#include <stdint.h>

// ---- Tiled bitmap weight layout (built at load from the canonical BitmapWeight) ----------
// W[N = out_features, K = in_features] is cut into 64x64 tiles, tile (tn, tk) stored at index
// tn * tiles_k + tk (a CTA walks its tiles along K contiguously). Per tile:
//   bitmap[tile * 64 + r]  : u64, bit c set when W[tn*64 + r, tk*64 + c] is kept
//   values[tile_offsets[tile] ..]: the kept values of the tile in row-major order (f16),
//                            each tile's run padded with zeros to a multiple of 8 values
//                            so that every tile starts 16-byte aligned (cp.async 16 B)
//   tile_offsets[tiles + 1]: u32, in values (not bytes)
// Rows/columns past N/K inside edge tiles have clear bits.
#define SDS_UNS_TILE_N 64
#define SDS_UNS_TILE_K 64
#define SDS_UNS_VALUE_ALIGN 8

// Epilogue flags: Y = act(X W^T + bias) + residual, in that order.
#define SDS_EPI_BIAS 1
#define SDS_EPI_GELU 2     // exact (erf) GELU, as torch.nn.GELU()
#define SDS_EPI_RESIDUAL 4

typedef struct SdsUnstructuredGemmParams {
    const void* x;                 // f16 [M, K], row stride ldx elements (ldx % 8 == 0, 16 B aligned)
    const uint64_t* bitmap;        // [tiles_n * tiles_k * 64]
    const uint32_t* tile_offsets;  // [tiles_n * tiles_k + 1]
    const void* values;            // f16, 16 B aligned
    const float* bias;             // f32 [N] when flags & SDS_EPI_BIAS
    const void* residual;          // f16 [M, N], row stride ldr, when flags & SDS_EPI_RESIDUAL
    void* y;                       // f16 [M, N], row stride ldy
    float* workspace;              // f32 [splits, M, N] partial sums when splits > 1
    int32_t m, n, k;
    int32_t ldx, ldy, ldr;
    int32_t tiles_k;
    int32_t flags;
    // Split-K (memory-bound shapes with too few CTAs to fill the GPU): CTA z of grid.z covers
    // k-tiles [z * k_tiles_per_split, (z + 1) * k_tiles_per_split) and writes raw f32 partials
    // to workspace[z]; sdsparse_uns_gemm_splitk_reduce sums them and applies the epilogue.
    // splits == 1: the GEMM kernel applies the epilogue and writes y itself.
    int32_t splits;
    int32_t k_tiles_per_split;
} SdsUnstructuredGemmParams;

// ---- Fused attention (head dim 64) -----------------------------------------------------
// Element (b, h, s, d) of Q is at q[b*q_stride_b + s*q_stride_s + h*q_stride_h + d] (d
// contiguous; strides in elements, multiples of 8). This covers both [B, H, S, 64]
// (stride_s = 64, stride_h = S*64) and the projection output [B, S, H*64] (stride_s = H*64,
// stride_h = 64) without a permute. Same for K, V and O.
#define SDS_ATTN_HEAD_DIM 64

typedef struct SdsAttentionParams {
    const void* q;
    const void* k;
    const void* v;
    void* o;
    int64_t q_stride_b, q_stride_s, q_stride_h;
    int64_t k_stride_b, k_stride_s, k_stride_h;
    int64_t v_stride_b, v_stride_s, v_stride_h;
    int64_t o_stride_b, o_stride_s, o_stride_h;
    int32_t batch, heads, seq_q, seq_kv;
    float scale;                   // usually 1/sqrt(64)
    int32_t causal;                // nonzero: query i sees keys j <= i + seq_kv - seq_q (CLIP's mask)
} SdsAttentionParams;

#ifdef __cplusplus
// Every field's offset, mirrored by the Rust const asserts.
static_assert(sizeof(SdsUnstructuredGemmParams) == 104, "update the Rust mirror (unstructured.rs)");
static_assert(offsetof(SdsUnstructuredGemmParams, x) == 0, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, bitmap) == 8, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, tile_offsets) == 16, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, values) == 24, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, bias) == 32, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, residual) == 40, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, y) == 48, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, workspace) == 56, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, m) == 64, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, n) == 68, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, k) == 72, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, ldx) == 76, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, ldy) == 80, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, ldr) == 84, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, tiles_k) == 88, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, flags) == 92, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, splits) == 96, "Rust mirror offset");
static_assert(offsetof(SdsUnstructuredGemmParams, k_tiles_per_split) == 100, "Rust mirror offset");
static_assert(sizeof(SdsAttentionParams) == 152, "update the Rust mirror (attention.rs)");
static_assert(offsetof(SdsAttentionParams, q) == 0, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, k) == 8, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, v) == 16, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, o) == 24, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, q_stride_b) == 32, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, q_stride_s) == 40, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, q_stride_h) == 48, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, k_stride_b) == 56, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, k_stride_s) == 64, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, k_stride_h) == 72, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, v_stride_b) == 80, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, v_stride_s) == 88, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, v_stride_h) == 96, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, o_stride_b) == 104, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, o_stride_s) == 112, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, o_stride_h) == 120, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, batch) == 128, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, heads) == 132, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, seq_q) == 136, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, seq_kv) == 140, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, scale) == 144, "Rust mirror offset");
static_assert(offsetof(SdsAttentionParams, causal) == 148, "Rust mirror offset");
#endif
