// Normalisations of SD2's activations: group norm (+ the SiLU every ResNet block applies right
// after it) and layer norm. Storage f32 / f16 / bf16 (kernel name suffix), statistics in f32.
//
// Kernels (parameter structs in sdsparse_params.h; launchers and CPU twins in
// src/backend/cuda/norm.rs, the CPU reference src/backend/cpu/norm.rs):
//   sdsparse_groupnorm_stats_<T>  grid (splits, batch * groups), 256 threads: each CTA reduces one
//                                 contiguous slice of one group to (mean, M2) in `partials`
//   sdsparse_groupnorm_apply_<T>  grid (ceil(spatial / 256), batch * channels), 256 threads: merges
//                                 the group's slices, then y = x * a + b (+ SiLU) for one channel
//   sdsparse_layernorm_<T>        grid ceil(rows / 8), 256 threads: one warp per row, two passes
//
// Why split group statistics: an SD2 group holds 2,560 (UNet, 8x8) to 10^6 (VAE, 512x512) values
// and there are only batch * 32 groups, so one CTA per group would leave most of a GPU idle on
// the large ones. Each thread folds batches of kBatch strided values into a Welford state (one
// division per batch, not per value); partial states merge with Chan's formula, which stays
// accurate in f32 where a one-pass sum of squares would not.
#include <stdint.h>

#include "sdsparse_dtype.cuh"
#include "sdsparse_params.h"

namespace sds_norm {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBatch = 8;  // strided values a thread folds per Welford update
constexpr unsigned kFull = 0xffffffffu;
static_assert(kThreads % 32 == 0 && kWarps <= 32, "the block merge is one warp wide");
static_assert(SDS_NORM_MAX_SPLITS <= 2 * 32, "apply merges the slices with two per lane");

// Welford / Chan state: count, mean, sum of squared deviations from the mean.
struct Moments {
    float n, mean, m2;
};

// Chan et al.'s pairwise merge; either side may be empty.
__device__ __forceinline__ Moments merge(Moments a, Moments b) {
    const float n = a.n + b.n;
    if (n == 0.0f) return a;
    const float delta = b.mean - a.mean;
    const float wb = b.n / n;
    return {n, a.mean + delta * wb, a.m2 + b.m2 + delta * delta * a.n * wb};
}

__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        Moments o{__shfl_xor_sync(kFull, m.n, off), __shfl_xor_sync(kFull, m.mean, off),
                  __shfl_xor_sync(kFull, m.m2, off)};
        m = merge(m, o);
    }
    return m;
}

// Values [begin, end) of `x` (flat indices) reduced by the whole CTA; the result is valid in
// every thread of warp 0.
template <typename T>
__device__ __forceinline__ Moments block_moments(const void* x, unsigned begin, unsigned end) {
    Moments m{0.0f, 0.0f, 0.0f};
    // Thread t folds values begin + t, begin + t + kThreads, ... in batches of kBatch: consecutive
    // threads read consecutive addresses (coalesced), and a batch's own two-pass moments are merged
    // in with one division.
    for (unsigned base = begin + threadIdx.x; base < end; base += kBatch * kThreads) {
        float v[kBatch];
        int cnt = 0;
        float sum = 0.0f;
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
            const unsigned i = base + k * kThreads;  // < end + kBatch * kThreads <= 2^31 + 2^11
            v[k] = i < end ? sds_dtype::load<T>(x, i) : 0.0f;
            cnt += i < end;
            sum += v[k];
        }
        const float bmean = sum / cnt;
        float bm2 = 0.0f;
#pragma unroll
        for (int k = 0; k < kBatch; ++k) {
            const float d = v[k] - bmean;
            bm2 += k < cnt ? d * d : 0.0f;  // the valid values are a prefix of the batch
        }
        m = merge(m, Moments{static_cast<float>(cnt), bmean, bm2});
    }
    m = warp_merge(m);
    __shared__ Moments warp_sums[kWarps];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) warp_sums[warp] = m;
    __syncthreads();
    if (warp == 0) {
        m = lane < kWarps ? warp_sums[lane] : Moments{0.0f, 0.0f, 0.0f};
        m = warp_merge(m);
    }
    return m;
}

template <typename T>
__device__ __forceinline__ void groupnorm_stats(const SdsGroupNormParams& p) {
    const unsigned bg = blockIdx.y;  // batch * groups + group
    const unsigned group_len = static_cast<unsigned>(p.channels / p.groups) * p.spatial;
    // Slice s of a group covers [s * chunk, min((s + 1) * chunk, group_len)); the apply kernel
    // recomputes the same counts, so only (mean, M2) are stored.
    const unsigned chunk = (group_len + p.splits - 1) / p.splits;
    const unsigned lo = min(blockIdx.x * chunk, group_len);
    const unsigned hi = min(lo + chunk, group_len);
    const unsigned base = bg * group_len;  // groups of one image are consecutive channel ranges
    const Moments m = block_moments<T>(p.x, base + lo, base + hi);
    if (threadIdx.x == 0) {
        float* out = p.partials + (static_cast<size_t>(bg) * p.splits + blockIdx.x) * 2;
        out[0] = m.mean;
        out[1] = m.m2;
    }
}

template <typename T>
__device__ __forceinline__ void groupnorm_apply(const SdsGroupNormParams& p) {
    const unsigned bc = blockIdx.y;  // batch * channels + channel
    const unsigned c = bc % p.channels;
    const unsigned cpg = p.channels / p.groups;
    const unsigned bg = (bc / p.channels) * p.groups + c / cpg;  // this channel's group
    const unsigned group_len = cpg * p.spatial;
    const unsigned chunk = (group_len + p.splits - 1) / p.splits;
    __shared__ float affine[2];
    if (threadIdx.x < 32) {
        // Lane l merges slices l and l + 32, then the warp merges the lanes.
        Moments m{0.0f, 0.0f, 0.0f};
        for (int s = threadIdx.x; s < p.splits; s += 32) {
            const unsigned lo = min(s * chunk, group_len);
            const unsigned n = min(lo + chunk, group_len) - lo;
            const float* part = p.partials + (static_cast<size_t>(bg) * p.splits + s) * 2;
            m = merge(m, Moments{static_cast<float>(n), part[0], part[1]});
        }
        m = warp_merge(m);
        if (threadIdx.x == 0) {
            // y = (x - mean) * rstd * gamma + beta folded into y = x * a + b (as the CPU reference).
            const float rstd = rsqrtf(m.m2 / m.n + p.eps);
            const float a = rstd * p.gamma[c];
            affine[0] = a;
            affine[1] = p.beta[c] - m.mean * a;
        }
    }
    __syncthreads();
    const unsigned s = blockIdx.x * kThreads + threadIdx.x;  // position in the channel plane
    if (s >= static_cast<unsigned>(p.spatial)) return;
    const unsigned i = bc * p.spatial + s;  // < batch * channels * spatial < 2^31
    float v = sds_dtype::load<T>(p.x, i) * affine[0] + affine[1];
    if (p.flags & SDS_NORM_FLAG_SILU) v = sds_dtype::silu(v);
    sds_dtype::store<T>(p.y, i, v);
}

// One warp per row: mean, then the mean of squared deviations (two passes over the row, which
// is in L1/L2 after the first), then the normalised row. Lane l handles columns l, l + 32, ...
template <typename T>
__device__ __forceinline__ void layernorm(const SdsLayerNormParams& p) {
    const unsigned row = blockIdx.x * kWarps + threadIdx.x / 32;
    const unsigned lane = threadIdx.x % 32;
    if (row >= static_cast<unsigned>(p.rows)) return;  // whole warps leave together
    const unsigned base = row * p.dim;  // < rows * dim < 2^31
    const unsigned dim = p.dim;
    float sum = 0.0f;
    for (unsigned j = lane; j < dim; j += 32) sum += sds_dtype::load<T>(p.x, base + j);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
    const float mean = sum / dim;
    float sq = 0.0f;
    for (unsigned j = lane; j < dim; j += 32) {
        const float d = sds_dtype::load<T>(p.x, base + j) - mean;
        sq += d * d;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sq += __shfl_xor_sync(kFull, sq, off);
    const float rstd = rsqrtf(sq / dim + p.eps);
    for (unsigned j = lane; j < dim; j += 32) {
        const float v = (sds_dtype::load<T>(p.x, base + j) - mean) * rstd;
        sds_dtype::store<T>(p.y, base + j, v * p.gamma[j] + p.beta[j]);
    }
}

}  // namespace sds_norm

#define SDS_NORM_KERNELS(NAME, T)                                                                \
    extern "C" __global__ void __launch_bounds__(sds_norm::kThreads)                             \
        sdsparse_groupnorm_stats_##NAME(const SdsGroupNormParams p) {                            \
        sds_norm::groupnorm_stats<T>(p);                                                         \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(sds_norm::kThreads)                             \
        sdsparse_groupnorm_apply_##NAME(const SdsGroupNormParams p) {                            \
        sds_norm::groupnorm_apply<T>(p);                                                         \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(sds_norm::kThreads)                             \
        sdsparse_layernorm_##NAME(const SdsLayerNormParams p) {                                  \
        sds_norm::layernorm<T>(p);                                                               \
    }

SDS_FOR_EACH_DTYPE(SDS_NORM_KERNELS)

#undef SDS_NORM_KERNELS
