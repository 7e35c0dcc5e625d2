// Element-wise and data-movement kernels of the SD2 pipeline: GELU, SiLU, GEGLU, residual /
// broadcast add, the classifier-free-guidance combine, nearest upsampling, concatenation and the
// sinusoidal timestep embedding. Storage f32 / f16 / bf16 (kernel name suffix), arithmetic f32.
//
// Kernels (parameter structs in sdsparse_params.h; launchers and CPU twins in
// src/backend/cuda/pointwise.rs, CPU references in src/backend/cpu/):
//   sdsparse_eltwise_{gelu,silu,add,sub,mul,div,cfg}_<T>   y[n]
//   sdsparse_geglu_<T>                         y[rows][half]
//   sdsparse_upsample_nearest_<T>              y[planes][out_h][out_w]
//   sdsparse_concat_<T>                        y[outer][a_inner + b_inner]
//   sdsparse_timestep_embedding_<T>            y[count][dim]
// All: one output element per thread, kThreads threads per block, grid ceil(outputs / kThreads)
// (the launcher checks outputs < 2^31, so the flat index fits 32 bits and the grid fits grid.x).
// Memory-bound and simple on purpose; vectorised (8-byte / 16-byte) variants are a later,
// measured step.
#include <math.h>
#include <stdint.h>

#include "sdsparse_dtype.cuh"
#include "sdsparse_params.h"

namespace sds_pw {

constexpr int kThreads = 256;
static_assert(kThreads % 32 == 0, "whole warps");

// The thread's flat output index; blockIdx.x * kThreads < 2^31 + kThreads cannot wrap 32 bits.
__device__ __forceinline__ unsigned flat_index() { return blockIdx.x * kThreads + threadIdx.x; }

enum class Op { Gelu, Silu, Add, Sub, Mul, Div, Cfg };

template <typename T, Op OP>
__device__ __forceinline__ void eltwise(const SdsEltwiseParams& p) {
    const unsigned i = flat_index();
    if (i >= static_cast<unsigned>(p.n)) return;
    const float a = sds_dtype::load<T>(p.a, i);
    float y;
    if constexpr (OP == Op::Gelu) {
        y = sds_dtype::gelu(a);
    } else if constexpr (OP == Op::Silu) {
        y = sds_dtype::silu(a);
    } else if constexpr (OP == Op::Add || OP == Op::Sub || OP == Op::Mul || OP == Op::Div) {
        // b broadcast: element i of y sees b[(i / b_div) % b_len] ([B, C, 1, 1] over [B, C, H, W]:
        // b_div = H * W, b_len = B * C; same shape: b_div = 1, b_len = n).
        const float b = sds_dtype::load<T>(p.b, (i / static_cast<unsigned>(p.b_div)) % static_cast<unsigned>(p.b_len));
        if constexpr (OP == Op::Add) y = a + b;
        if constexpr (OP == Op::Sub) y = a - b;
        if constexpr (OP == Op::Mul) y = a * b;
        if constexpr (OP == Op::Div) y = a / b;
    } else {
        // uncond + g * (cond - uncond), the order diffusers writes it.
        y = a + p.alpha * (sds_dtype::load<T>(p.b, i) - a);
    }
    sds_dtype::store<T>(p.y, i, y);
}

template <typename T>
__device__ __forceinline__ void geglu(const SdsGegluParams& p) {
    const unsigned i = flat_index();
    const unsigned half = p.half;
    if (i >= static_cast<unsigned>(p.rows) * half) return;
    const unsigned r = i / half, j = i - r * half;
    const unsigned src = r * 2u * half + j;  // hidden at column j, its gate at column half + j
    sds_dtype::store<T>(p.y, i, sds_dtype::load<T>(p.x, src) * sds_dtype::gelu(sds_dtype::load<T>(p.x, src + half)));
}

// PyTorch's nearest source index: min(floor(dst * (in / out)), in - 1) with the scale in f32.
__device__ __forceinline__ unsigned nearest_src(unsigned dst, int in, int out) {
    const float scale = static_cast<float>(in) / static_cast<float>(out);
    return min(static_cast<unsigned>(floorf(static_cast<float>(dst) * scale)), static_cast<unsigned>(in - 1));
}

template <typename T>
__device__ __forceinline__ void upsample_nearest(const SdsUpsampleParams& p) {
    const unsigned i = flat_index();
    const unsigned ow = p.out_w, oh = p.out_h;
    if (i >= static_cast<unsigned>(p.planes) * oh * ow) return;
    const unsigned ox = i % ow, t = i / ow;  // i = (plane * out_h + oy) * out_w + ox
    const unsigned oy = t % oh, plane = t / oh;
    const unsigned src = (plane * p.h + nearest_src(oy, p.h, p.out_h)) * p.w + nearest_src(ox, p.w, p.out_w);
    sds_dtype::store<T>(p.y, i, sds_dtype::load<T>(p.x, src));
}

template <typename T>
__device__ __forceinline__ void concat(const SdsConcatParams& p) {
    const unsigned i = flat_index();
    const unsigned row = p.a_inner + p.b_inner;
    if (i >= static_cast<unsigned>(p.outer) * row) return;
    const unsigned o = i / row, r = i - o * row;  // i = o * row + r
    const float v = r < static_cast<unsigned>(p.a_inner) ? sds_dtype::load<T>(p.a, o * p.a_inner + r)
                                                         : sds_dtype::load<T>(p.b, o * p.b_inner + (r - p.a_inner));
    sds_dtype::store<T>(p.y, i, v);
}

// Same order of f32 operations as src/backend/cpu/embed.rs (and diffusers): the frequency is
// exp((-ln(10000) * j) / (half - shift)), the argument t * freq.
template <typename T>
__device__ __forceinline__ void timestep_embedding(const SdsTimestepParams& p) {
    const unsigned i = flat_index();
    const unsigned dim = p.dim;
    if (i >= static_cast<unsigned>(p.count) * dim) return;
    const unsigned row = i / dim, col = i - row * dim;
    const unsigned half = dim / 2;
    float v = 0.0f;  // the padding column of an odd dim
    if (col < 2 * half) {
        const bool first = col < half;
        const unsigned j = first ? col : col - half;
        const float log_max_period = -9.210340371976184f;  // -ln(10000) rounded to f32
        const float freq = expf(log_max_period * static_cast<float>(j) / (static_cast<float>(half) - p.freq_shift));
        const float arg = p.timesteps[row] * freq;
        // First half sin, second cos; flip_sin_to_cos swaps them.
        v = (first != (p.flip_sin_to_cos != 0)) ? sinf(arg) : cosf(arg);
    }
    sds_dtype::store<T>(p.y, i, v);
}

}  // namespace sds_pw

#define SDS_POINTWISE_KERNELS(NAME, T)                                                                 \
    extern "C" __global__ void __launch_bounds__(sds_pw::kThreads)                                     \
        sdsparse_eltwise_gelu_##NAME(const SdsEltwiseParams p) {                                       \
        sds_pw::eltwise<T, sds_pw::Op::Gelu>(p);                                                       \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_pw::kThreads)                                     \
        sdsparse_eltwise_silu_##NAME(const SdsEltwiseParams p) {                                       \
        sds_pw::eltwise<T, sds_pw::Op::Silu>(p);                                                       \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_pw::kThreads)                                     \
        sdsparse_eltwise_add_##NAME(const SdsEltwiseParams p) {                                        \
        sds_pw::eltwise<T, sds_pw::Op::Add>(p);                                                        \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_pw::kThreads)                                     \
        sdsparse_eltwise_sub_##NAME(const SdsEltwiseParams p) {                                        \
        sds_pw::eltwise<T, sds_pw::Op::Sub>(p);                                                        \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_pw::kThreads)                                     \
        sdsparse_eltwise_mul_##NAME(const SdsEltwiseParams p) {                                        \
        sds_pw::eltwise<T, sds_pw::Op::Mul>(p);                                                        \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_pw::kThreads)                                     \
        sdsparse_eltwise_div_##NAME(const SdsEltwiseParams p) {                                        \
        sds_pw::eltwise<T, sds_pw::Op::Div>(p);                                                        \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_pw::kThreads)                                     \
        sdsparse_eltwise_cfg_##NAME(const SdsEltwiseParams p) {                                        \
        sds_pw::eltwise<T, sds_pw::Op::Cfg>(p);                                                        \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_pw::kThreads) sdsparse_geglu_##NAME(const SdsGegluParams p) { \
        sds_pw::geglu<T>(p);                                                                           \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_pw::kThreads)                                     \
        sdsparse_upsample_nearest_##NAME(const SdsUpsampleParams p) {                                  \
        sds_pw::upsample_nearest<T>(p);                                                                \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_pw::kThreads) sdsparse_concat_##NAME(const SdsConcatParams p) { \
        sds_pw::concat<T>(p);                                                                          \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_pw::kThreads)                                     \
        sdsparse_timestep_embedding_##NAME(const SdsTimestepParams p) {                                \
        sds_pw::timestep_embedding<T>(p);                                                              \
    }

SDS_FOR_EACH_DTYPE(SDS_POINTWISE_KERNELS)

#undef SDS_POINTWISE_KERNELS
