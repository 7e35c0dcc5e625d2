// 2:4 sparse GEMM launch parameters and device layout constants, shared by
// cuda/sparse24_gemm.cu and mirrored in Rust by `Sp24GemmParams` in
// src/backend/cuda/sparse24.rs (size and offset asserts there). Plain C layout: only
// 8-byte pointers first, then 4-byte integers, no implicit padding.
#pragma once
#include <stdint.h>

// Device layout of a 2:4 weight (built by Sparse24Packed::pack on the host):
//   values [n_pad][k_pad / 2] f16, the canonical kept values, zero padded;
//   meta   [n_pad / 16][k_pad / 64][32] u32, word `lane` of a (16-row, 64-column) block is
//          the metadata register of that lane for two m16n8k32 steps (selector 0, 1).
#define SP24_META_BLOCK_K 64
#define SP24_META_BLOCK_ROWS 16
#define SP24_ROW_PAD 64

// Epilogue flags.
#define SP24_FLAG_GELU 1u  // y = gelu_erf(acc + bias) (+ residual)
// GEGLU (block tiles of 128 weight rows only): the host interleaves the rows so that
// rows 128b .. 128b+63 are value rows 64b .. 64b+63 and rows 128b+64 .. 128b+127 the
// matching gate rows n/2 + 64b ..; y[t, 64b + j] = (acc_j + bias_j) * gelu(acc_{64+j} +
// bias_{64+j}) (+ residual), y and residual have n / 2 columns.
#define SP24_FLAG_GEGLU 2u
#define SP24_GEGLU_GROUP 64

struct Sp24GemmParams {
    const void* x;          // f16 [m][ldx], the activations (B operand, K-major)
    const void* w_values;   // f16 [n_pad][k_pad / 2]
    const uint32_t* w_meta; // [n_pad / 16][k_pad / 64][32]
    const float* bias;      // f32 [n] or null
    const void* residual;   // f16 [m][ldr] or null, added after the activation
    void* y;                // f16 [m][ldy]
    int32_t m, n, k;        // logical GEMM sizes: Y[m, n] = X[m, k] W[n, k]^T
    int32_t n_pad, k_pad;   // padded weight sizes (multiples of 64)
    int32_t ldx, ldy, ldr;  // row strides in elements (multiples of 8)
    uint32_t flags;         // SP24_FLAG_*
    int32_t reserved;       // keeps sizeof a multiple of 8
};

#ifdef __cplusplus
static_assert(sizeof(Sp24GemmParams) == 88, "Sp24GemmParams layout is mirrored in Rust");
#endif
