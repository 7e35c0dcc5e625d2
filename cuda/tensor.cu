// Tensor-manipulation kernels the GPU pipeline needs besides norms and activations (issue 8,
// phase 2): affine map, dtype casts, strided copies (permute / transpose / narrow), embedding
// gather, the f32 softmax of the attention fallback (scale and causal mask folded in), and
// im2col for convolutions through cuBLAS. Storage f32 / f16 / bf16 (kernel name suffix),
// arithmetic f32.
//
// Kernels (parameter structs in sdsparse_params.h; launchers and CPU twins in
// src/backend/cuda/tensor_ops.rs):
//   sdsparse_affine_<T>            y[n] = x * mul + add
//   sdsparse_cast_<S>_<D>          y[n] = x[n] converted (f32 <-> f16, f32 <-> bf16)
//   sdsparse_strided_copy_<T>      y[prod(dims)] gathered through strides (rank <= 6)
//   sdsparse_embedding_<T>         y[count][dim] = table[ids[r]]
//   sdsparse_softmax_<T>           one CTA per row, kThreads threads, f32 max / sum reductions
//   sdsparse_softmax_f32_<D>       the same from f32 scores into f16 / bf16 probabilities
//   sdsparse_im2col_<T>            col[c_in * kh * kw][out_h * out_w] of one image
// All but the softmax: one output element per thread, grid ceil(outputs / kThreads); the
// launchers check every tensor has < 2^31 elements, so 32-bit flat indices cannot wrap.
#include <math.h>
#include <stdint.h>

#include "sdsparse_dtype.cuh"
#include "sdsparse_params.h"

namespace sds_tensor {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFull = 0xffffffffu;
static_assert(kThreads % 32 == 0 && kWarps <= 32, "the block reduction is one warp wide");

// blockIdx.x * kThreads < 2^31 + kThreads cannot wrap 32 bits.
__device__ __forceinline__ unsigned flat_index() { return blockIdx.x * kThreads + threadIdx.x; }

template <typename T>
__device__ __forceinline__ void affine(const SdsAffineParams& p) {
    const unsigned i = flat_index();
    if (i >= static_cast<unsigned>(p.n)) return;
    sds_dtype::store<T>(p.y, i, sds_dtype::load<T>(p.x, i) * p.mul + p.add);
}

template <typename S, typename D>
__device__ __forceinline__ void cast(const SdsAffineParams& p) {
    const unsigned i = flat_index();
    if (i >= static_cast<unsigned>(p.n)) return;
    sds_dtype::store<D>(p.y, i, sds_dtype::load<S>(p.x, i));
}

template <typename T>
__device__ __forceinline__ void strided_copy(const SdsStridedCopyParams& p) {
    const unsigned i = flat_index();
    if (i >= static_cast<unsigned>(p.n)) return;
    // Peel the output coordinates off the flat index, last (fastest) dim first; each coordinate
    // moves the source by its stride. The launcher checked the largest source index < 2^31.
    unsigned rem = i;
    unsigned src = static_cast<unsigned>(p.offset);
#pragma unroll
    for (int d = SDS_STRIDED_MAX_RANK - 1; d >= 0; --d) {
        if (d < p.rank) {
            const unsigned dim = static_cast<unsigned>(p.dims[d]);
            const unsigned c = rem % dim;
            rem /= dim;
            src += c * static_cast<unsigned>(p.strides[d]);
        }
    }
    sds_dtype::store<T>(p.y, i, sds_dtype::load<T>(p.x, src));
}

template <typename T>
__device__ __forceinline__ void embedding(const SdsEmbeddingParams& p) {
    const unsigned i = flat_index();
    const unsigned dim = p.dim;
    if (i >= static_cast<unsigned>(p.count) * dim) return;
    const unsigned r = i / dim, c = i - r * dim;  // i = r * dim + c
    // ids were checked < vocab on the host; vocab * dim < 2^31.
    sds_dtype::store<T>(p.y, i, sds_dtype::load<T>(p.table, p.ids[r] * dim + c));
}

// The CTA-wide max (MAX) or sum of one value per thread; the result is returned to every
// thread. `scratch` holds kWarps floats; the barrier at the end makes it reusable.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* scratch) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(kFull, v, off);
        v = MAX ? fmaxf(v, o) : v + o;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float r = lane < kWarps ? scratch[lane] : (MAX ? -INFINITY : 0.0f);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(kFull, r, off);
        r = MAX ? fmaxf(r, o) : r + o;
    }
    __syncthreads();  // every thread has read scratch before it is written again
    return r;
}

// TI: the scores' storage; TO: the probabilities' (TI, or f16 / bf16 from f32 scores: the
// attention scores path writes P in the activation dtype straight from its f32 scores).
template <typename TI, typename TO>
__device__ __forceinline__ void softmax(const SdsSoftmaxParams& p) {
    __shared__ float scratch[kWarps];
    const unsigned row = blockIdx.x;  // grid = rows exactly, so no early return before barriers
    const unsigned cols = p.cols;
    // Visible columns [0, end): all, or j <= q + cols - q_len for query q = row % q_len.
    unsigned end = cols;
    if (p.causal) {
        const long long q = row % static_cast<unsigned>(p.q_len);
        const long long lim = q + static_cast<long long>(cols) - p.q_len + 1;
        end = static_cast<unsigned>(lim < 0 ? 0 : (lim > cols ? cols : lim));
    }
    const unsigned base = row * cols;  // rows * cols < 2^31 (launcher)
    float m = -INFINITY;
    for (unsigned j = threadIdx.x; j < end; j += kThreads) m = fmaxf(m, sds_dtype::load<TI>(p.x, base + j) * p.scale);
    m = block_reduce<true>(m, scratch);
    float s = 0.0f;
    for (unsigned j = threadIdx.x; j < end; j += kThreads) s += expf(sds_dtype::load<TI>(p.x, base + j) * p.scale - m);
    s = block_reduce<false>(s, scratch);
    const float inv = end > 0 ? 1.0f / s : 0.0f;  // a row without visible columns gives zeros, not NaN
    for (unsigned j = threadIdx.x; j < cols; j += kThreads) {
        const float v = j < end ? expf(sds_dtype::load<TI>(p.x, base + j) * p.scale - m) * inv : 0.0f;
        sds_dtype::store<TO>(p.y, base + j, v);
    }
}

template <typename T>
__device__ __forceinline__ void im2col(const SdsIm2colParams& p) {
    const unsigned i = flat_index();
    const unsigned plane = static_cast<unsigned>(p.out_h) * p.out_w;
    const unsigned kw = p.kw, kh = p.kh;
    if (i >= static_cast<unsigned>(p.c_in) * kh * kw * plane) return;
    // i = ((c * kh + ki) * kw + kj) * plane + oy * out_w + ox
    const unsigned pos = i % plane, row = i / plane;
    const unsigned kj = row % kw, t = row / kw;
    const unsigned ki = t % kh, c = t / kh;
    const unsigned oy = pos / p.out_w, ox = pos - oy * p.out_w;
    const int iy = static_cast<int>(oy) * p.stride + static_cast<int>(ki) - p.pad;
    const int ix = static_cast<int>(ox) * p.stride + static_cast<int>(kj) - p.pad;
    float v = 0.0f;  // zero padding
    if (iy >= 0 && iy < p.h && ix >= 0 && ix < p.w) {
        v = sds_dtype::load<T>(p.x, (c * p.h + iy) * p.w + ix);
    }
    sds_dtype::store<T>(p.col, i, v);
}

}  // namespace sds_tensor

#define SDS_TENSOR_KERNELS(NAME, T)                                                                    \
    extern "C" __global__ void __launch_bounds__(sds_tensor::kThreads) sdsparse_affine_##NAME(const SdsAffineParams p) { \
        sds_tensor::affine<T>(p);                                                                      \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_tensor::kThreads)                                 \
        sdsparse_strided_copy_##NAME(const SdsStridedCopyParams p) {                                   \
        sds_tensor::strided_copy<T>(p);                                                                \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_tensor::kThreads)                                 \
        sdsparse_embedding_##NAME(const SdsEmbeddingParams p) {                                        \
        sds_tensor::embedding<T>(p);                                                                   \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_tensor::kThreads) sdsparse_softmax_##NAME(const SdsSoftmaxParams p) { \
        sds_tensor::softmax<T, T>(p);                                                                   \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_tensor::kThreads) sdsparse_im2col_##NAME(const SdsIm2colParams p) { \
        sds_tensor::im2col<T>(p);                                                                      \
    }

SDS_FOR_EACH_DTYPE(SDS_TENSOR_KERNELS)

#define SDS_CAST_KERNEL(SN, S, DN, D)                                                                  \
    extern "C" __global__ void __launch_bounds__(sds_tensor::kThreads)                                 \
        sdsparse_cast_##SN##_##DN(const SdsAffineParams p) {                                           \
        sds_tensor::cast<S, D>(p);                                                                     \
    }

// Softmax from f32 scores into f16 / bf16 probabilities.
#define SDS_SOFTMAX_NARROW_KERNEL(DN, D)                                                               \
    extern "C" __global__ void __launch_bounds__(sds_tensor::kThreads)                                 \
        sdsparse_softmax_f32_##DN(const SdsSoftmaxParams p) {                                          \
        sds_tensor::softmax<float, D>(p);                                                              \
    }
SDS_SOFTMAX_NARROW_KERNEL(f16, __half)
SDS_SOFTMAX_NARROW_KERNEL(bf16, __nv_bfloat16)

SDS_CAST_KERNEL(f32, float, f16, __half)
SDS_CAST_KERNEL(f16, __half, f32, float)
SDS_CAST_KERNEL(f32, float, bf16, __nv_bfloat16)
SDS_CAST_KERNEL(bf16, __nv_bfloat16, f32, float)

#undef SDS_TENSOR_KERNELS
#undef SDS_CAST_KERNEL
#undef SDS_SOFTMAX_NARROW_KERNEL
