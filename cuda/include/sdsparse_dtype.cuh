// Storage element types of the activation kernels (cuda/norm.cu, cuda/pointwise.cu): values are
// stored as f32, f16 or bf16 and every kernel computes in f32. One place for the conversions so the
// kernel families do not each carry their own (they share one translation unit, see docs/CUDA.md).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace sds_dtype {

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest-even conversion to the storage type (what the CPU twins model with half::f16 /
// half::bf16 ::from_f32).
template <typename T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
    return x;
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
    return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Element i of a type-erased buffer as f32 / stored from f32.
template <typename T>
__device__ __forceinline__ float load(const void* p, unsigned i) {
    return to_f32(static_cast<const T*>(p)[i]);
}
template <typename T>
__device__ __forceinline__ void store(void* p, unsigned i, float v) {
    static_cast<T*>(p)[i] = from_f32<T>(v);
}

// Activations shared by the families, in f32. GELU is the exact (erf) form diffusers uses
// (`F.gelu(x)`, approximate="none"), written with erfc: 1 + erf(z) = erfc(-z) keeps its relative
// accuracy in the negative tail, where 1 + erff(z) cancels (x = -5: 1 + erf is 5.7e-7, a few f32
// ulps of 1; the host-run test caught a 2e-3 relative error there). SiLU is x * sigmoid(x).
__device__ __forceinline__ float gelu(float x) { return 0.5f * x * erfcf(x * -0.70710678118654752f); }
__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

}  // namespace sds_dtype

// Instantiates MACRO(name, type) for every storage type; kernel names end in _f32 / _f16 / _bf16.
#define SDS_FOR_EACH_DTYPE(MACRO) \
    MACRO(f32, float)             \
    MACRO(f16, __half)            \
    MACRO(bf16, __nv_bfloat16)
