// Decompression of the canonical sparse weight layouts (src/format/mod.rs) to dense row-major
// matrices on the GPU: the checks and `export` need the dense-with-zeros weight, and this is the
// first kernel through the build pipeline. Memory-bound and run once per weight, so the kernels aim
// for coalesced, vectorised traffic rather than anything clever.
//
// Kernels (all take SdsDecompressParams by value, see sdsparse_params.h):
//   sdsparse_decompress_sparse24_<in>_<out>   one thread per group of 4 columns
//   sdsparse_decompress_bitmap_<in>_<out>     one warp per row, prefix sums of popcounts
// with <in> the stored value type (f16, bf16, f32) and <out> the dense type (f16, f32).
// Launch with 256 threads per block; any grid size works (grid-stride loops).
// Requirements the host launcher checks: Sparse24 needs cols % 4 == 0; Bitmap needs row_offsets
// consistent with the bitmap (each row's count of set bits below `cols` equals
// row_offsets[r + 1] - row_offsets[r]), otherwise values would be read out of bounds.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "sdsparse_params.h"

namespace sds_decompress {

constexpr int kThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) {
    return __half2float(x);
}
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) {
    return __bfloat162float(x);
}

// Two consecutive stored values (one 2:4 group). The index is even, so the pair is aligned for a
// single 8-byte (f32) or 4-byte (f16, bf16) load.
template <typename T>
__device__ __forceinline__ float2 load_pair(const T* v, size_t i);
template <>
__device__ __forceinline__ float2 load_pair<float>(const float* v, size_t i) {
    return *reinterpret_cast<const float2*>(v + i);
}
template <>
__device__ __forceinline__ float2 load_pair<__half>(const __half* v, size_t i) {
    return __half22float2(*reinterpret_cast<const __half2*>(v + i));
}
template <>
__device__ __forceinline__ float2 load_pair<__nv_bfloat16>(const __nv_bfloat16* v, size_t i) {
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(v + i));
}

// Four consecutive outputs with one store; `dst` is 4-element aligned (16 bytes f32, 8 bytes f16).
__device__ __forceinline__ void store4(float* dst, float a, float b, float c, float d) {
    *reinterpret_cast<float4*>(dst) = make_float4(a, b, c, d);
}
__device__ __forceinline__ void store4(__half* dst, float a, float b, float c, float d) {
    __half2 lo = __floats2half2_rn(a, b);
    __half2 hi = __floats2half2_rn(c, d);
    uint2 packed;
    packed.x = *reinterpret_cast<unsigned*>(&lo);
    packed.y = *reinterpret_cast<unsigned*>(&hi);
    *reinterpret_cast<uint2*>(dst) = packed;
}

__device__ __forceinline__ void store1(float* dst, float a) {
    *dst = a;
}
__device__ __forceinline__ void store1(__half* dst, float a) {
    *dst = __float2half_rn(a);
}

// Sparse24: thread i expands group i (row i / groups_per_row), reading one metadata nibble and two
// values and writing four outputs. Positions are selected without dynamic array indexing so
// everything stays in registers; if a corrupt nibble had idx0 == idx1, the second value wins (the
// CPU reference does the same).
template <typename In, typename Out>
__device__ __forceinline__ void sparse24(const SdsDecompressParams p) {
    const size_t groups_per_row = p.cols / 4;
    const size_t total = static_cast<size_t>(p.rows) * groups_per_row;
    const In* values = static_cast<const In*>(p.values);
    Out* out = static_cast<Out*>(p.out);
    const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
    for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += stride) {
        const size_t r = i / groups_per_row;
        const size_t g = i - r * groups_per_row;
        const unsigned byte = p.meta[r * p.meta_row_bytes + g / 2];
        const unsigned nibble = (g & 1) ? (byte >> 4) : (byte & 0xfu);
        const unsigned i0 = nibble & 3u;
        const unsigned i1 = (nibble >> 2) & 3u;
        const float2 v = load_pair(values, 2 * i);
        float o[4];
#pragma unroll
        for (unsigned k = 0; k < 4; ++k) o[k] = (k == i1) ? v.y : ((k == i0) ? v.x : 0.0f);
        store4(out + 4 * i, o[0], o[1], o[2], o[3]);
    }
}

// Bitmap: one warp per row. The row's bitmap is walked 32 bytes (256 columns) at a time, one byte
// per lane; an exclusive warp scan of the bytes' popcounts gives each lane the index of its first
// kept value, and `base` carries the running count from chunk to chunk.
template <typename In, typename Out>
__device__ __forceinline__ void bitmap(const SdsDecompressParams p) {
    const unsigned lane = threadIdx.x & 31u;
    const unsigned warps_per_block = blockDim.x / 32u;
    const size_t first_row = static_cast<size_t>(blockIdx.x) * warps_per_block + threadIdx.x / 32u;
    const size_t row_stride = static_cast<size_t>(gridDim.x) * warps_per_block;
    // Rows of a multiple of 8 columns are 32-byte (f32) / 16-byte (f16) aligned: 8 outputs per lane
    // then go out as whole vectors.
    const bool vector_rows = (p.cols % 8u) == 0;
    for (size_t r = first_row; r < p.rows; r += row_stride) {
        const uint8_t* bits = p.meta + r * p.meta_row_bytes;
        const In* vals = static_cast<const In*>(p.values) + p.row_offsets[r];
        Out* out_row = static_cast<Out*>(p.out) + r * p.cols;
        unsigned base = 0;
        for (unsigned b0 = 0; b0 < p.meta_row_bytes; b0 += 32u) {
            const unsigned b = b0 + lane;
            const bool active = b < p.meta_row_bytes;
            unsigned byte = 0;
            if (active) {
                byte = bits[b];
                const unsigned first_col = b * 8u;
                // Padding bits past the last column never count, whatever the file holds.
                if (first_col + 8u > p.cols) byte &= (1u << (p.cols - first_col)) - 1u;
            }
            const unsigned count = __popc(byte);
            unsigned inclusive = count;
#pragma unroll
            for (unsigned d = 1; d < 32u; d <<= 1) {
                const unsigned up = __shfl_up_sync(kFullMask, inclusive, d);
                if (lane >= d) inclusive += up;
            }
            if (active) {
                unsigned idx = base + inclusive - count;
                float o[8];
#pragma unroll
                for (unsigned j = 0; j < 8u; ++j) {
                    o[j] = ((byte >> j) & 1u) ? to_f32(vals[idx]) : 0.0f;
                    idx += (byte >> j) & 1u;
                }
                Out* dst = out_row + static_cast<size_t>(b) * 8u;
                if (vector_rows) {
                    store4(dst, o[0], o[1], o[2], o[3]);
                    store4(dst + 4, o[4], o[5], o[6], o[7]);
                } else {
                    const unsigned n = min(8u, p.cols - b * 8u);
                    for (unsigned j = 0; j < n; ++j) store1(dst + j, o[j]);
                }
            }
            base += __shfl_sync(kFullMask, inclusive, 31);
        }
    }
}

}  // namespace sds_decompress

#define SDS_DECOMPRESS_KERNELS(IN_NAME, IN_T, OUT_NAME, OUT_T)                                        \
    extern "C" __global__ void __launch_bounds__(sds_decompress::kThreads)                          \
        sdsparse_decompress_sparse24_##IN_NAME##_##OUT_NAME(const SdsDecompressParams p) {         \
        sds_decompress::sparse24<IN_T, OUT_T>(p);                                                   \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(sds_decompress::kThreads)                          \
        sdsparse_decompress_bitmap_##IN_NAME##_##OUT_NAME(const SdsDecompressParams p) {           \
        sds_decompress::bitmap<IN_T, OUT_T>(p);                                                     \
    }

SDS_DECOMPRESS_KERNELS(f16, __half, f16, __half)
SDS_DECOMPRESS_KERNELS(f16, __half, f32, float)
SDS_DECOMPRESS_KERNELS(bf16, __nv_bfloat16, f16, __half)
SDS_DECOMPRESS_KERNELS(bf16, __nv_bfloat16, f32, float)
SDS_DECOMPRESS_KERNELS(f32, float, f16, __half)
SDS_DECOMPRESS_KERNELS(f32, float, f32, float)

#undef SDS_DECOMPRESS_KERNELS
