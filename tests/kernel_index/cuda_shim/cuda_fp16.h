// Host stand-in for <cuda_fp16.h>: the f16 storage type and its round-to-nearest-even conversions
// (the subset cuda/include/sdsparse_dtype.cuh uses). See sds_cuda_host.h.
#pragma once
#include <stdint.h>
#include <string.h>

struct __half {
    uint16_t bits;
};

inline float __half2float(__half h) {
    const uint32_t sign = (h.bits & 0x8000u) << 16, exp = (h.bits >> 10) & 0x1f, man = h.bits & 0x3ffu;
    uint32_t f;
    if (exp == 0x1f) {
        f = sign | 0x7f800000u | (man << 13);  // inf / NaN
    } else if (exp != 0) {
        f = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        f = sign;
    } else {  // subnormal: normalise
        int e = -1;
        uint32_t m = man;
        do {
            ++e;
            m <<= 1;
        } while ((m & 0x400u) == 0);
        f = sign | ((112 - e) << 23) | ((m & 0x3ffu) << 13);
    }
    float out;
    memcpy(&out, &f, 4);
    return out;
}

inline __half __float2half_rn(float x) {
    uint32_t f;
    memcpy(&f, &x, 4);
    const uint32_t sign = (f >> 16) & 0x8000u;
    const uint32_t abs = f & 0x7fffffffu;
    if (abs > 0x7f800000u) return {static_cast<uint16_t>(sign | 0x7e00u)};  // NaN
    if (abs >= 0x477ff000u) return {static_cast<uint16_t>(sign | 0x7c00u)};  // rounds to inf
    if (abs < 0x38800000u) {  // f16 subnormal or zero: scale to an integer count of 2^-24
        float a;
        memcpy(&a, &abs, 4);
        const float scaled = a * 16777216.0f;  // exact
        uint32_t q = static_cast<uint32_t>(scaled);
        const float rem = scaled - static_cast<float>(q);
        if (rem > 0.5f || (rem == 0.5f && (q & 1u))) ++q;
        return {static_cast<uint16_t>(sign | q)};
    }
    // Normal: rebias, then round the 13 dropped mantissa bits to nearest even.
    const uint32_t rebased = abs - (112u << 23);
    uint32_t h = rebased >> 13;
    const uint32_t rest = rebased & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;
    return {static_cast<uint16_t>(sign | h)};
}
