// Host stand-in for <cuda_bf16.h>: the bf16 storage type and its round-to-nearest-even
// conversions (the subset cuda/include/sdsparse_dtype.cuh uses). See sds_cuda_host.h.
#pragma once
#include <stdint.h>
#include <string.h>

struct __nv_bfloat16 {
    uint16_t bits;
};

inline float __bfloat162float(__nv_bfloat16 h) {
    const uint32_t f = static_cast<uint32_t>(h.bits) << 16;
    float out;
    memcpy(&out, &f, 4);
    return out;
}

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    uint32_t f;
    memcpy(&f, &x, 4);
    if ((f & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((f >> 16) | 0x40u)};  // NaN
    f += 0x7fffu + ((f >> 16) & 1u);
    return {static_cast<uint16_t>(f >> 16)};
}
