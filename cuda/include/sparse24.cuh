// 2:4 sparse GEMM device layout constants and epilogue flags (cuda/sparse24_gemm.cu; the
// Rust side is src/backend/cuda/sparse24.rs).
#pragma once
#include <stdint.h>

#include "sdsparse_params.h"

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

// The launch parameters, SdsSp24GemmParams, live in sdsparse_params.h with every other
// kernel parameter struct.
typedef SdsSp24GemmParams Sp24GemmParams;
